/* trace/force.c — where pending results turn into values: shallow and deep forcing (in place,
 * so aliasing and identity stay as plain Python had them), and the per-thread submission order
 * that decides which failure plain Python would have raised first. */
#include "trace/internal.h"

PyObject *
trace_force(PyObject *x)
{
    if (graph_is_task(x))
        return graph_wait((graph_task *)x);
    return Py_NewRef(x);
}

/* Replace every task inside the exact containers reachable from obj by its value. */
static int
force_inplace(PyObject *obj, int depth)
{
    if (depth > 200)
        return 0;
    if (PyList_CheckExact(obj)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(obj); i++) {
            PyObject *item = PyList_GET_ITEM(obj, i);
            if (graph_is_task(item)) {
                Py_INCREF(item);
                PyObject *v = graph_wait((graph_task *)item);
                if (v == NULL) {
                    Py_DECREF(item);
                    return -1;
                }
                /* Another thread may have changed the list while we waited. */
                if (i < PyList_GET_SIZE(obj) && PyList_GET_ITEM(obj, i) == item)
                    PyList_SetItem(obj, i, v);
                else
                    Py_DECREF(v);
                Py_DECREF(item);
            }
            else if ((PyList_CheckExact(item) || PyTuple_CheckExact(item) ||
                      PyDict_CheckExact(item)) && item != obj) {
                Py_INCREF(item);
                int rc = force_inplace(item, depth + 1);
                Py_DECREF(item);
                if (rc < 0)
                    return -1;
            }
        }
    }
    else if (PyTuple_CheckExact(obj)) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(obj); i++) {
            PyObject *item = PyTuple_GET_ITEM(obj, i);
            if (graph_is_task(item)) {
                PyObject *v = graph_wait((graph_task *)item);
                if (v == NULL)
                    return -1;
                if (PyTuple_GET_ITEM(obj, i) == item) {
                    PyTuple_SET_ITEM(obj, i, v);
                    Py_DECREF(item);
                }
                else
                    Py_DECREF(v);
            }
            else if (PyList_CheckExact(item) || PyTuple_CheckExact(item) ||
                     PyDict_CheckExact(item)) {
                if (force_inplace(item, depth + 1) < 0)
                    return -1;
            }
        }
    }
    else if (PyDict_CheckExact(obj)) {
        PyObject *k, *v, *found = NULL;
        Py_ssize_t pos = 0;
        while (PyDict_Next(obj, &pos, &k, &v)) {
            if (graph_is_task(v) || PyList_CheckExact(v) || PyTuple_CheckExact(v) ||
                PyDict_CheckExact(v)) {
                if (found == NULL && (found = PyList_New(0)) == NULL)
                    return -1;
                PyObject *pair = PyTuple_Pack(2, k, v);
                if (pair == NULL || PyList_Append(found, pair) < 0) {
                    Py_XDECREF(pair);
                    Py_DECREF(found);
                    return -1;
                }
                Py_DECREF(pair);
            }
        }
        if (found == NULL)
            return 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(found); i++) {
            PyObject *pair = PyList_GET_ITEM(found, i);
            k = PyTuple_GET_ITEM(pair, 0);
            v = PyTuple_GET_ITEM(pair, 1);
            if (graph_is_task(v)) {
                PyObject *value = graph_wait((graph_task *)v);
                if (value == NULL) {
                    Py_DECREF(found);
                    return -1;
                }
                PyObject *now = PyDict_GetItemWithError(obj, k);
                int rc = now == v ? PyDict_SetItem(obj, k, value) : 0;
                Py_DECREF(value);
                if (rc < 0) {
                    Py_DECREF(found);
                    return -1;
                }
            }
            else if (v != obj && force_inplace(v, depth + 1) < 0) {
                Py_DECREF(found);
                return -1;
            }
        }
        Py_DECREF(found);
    }
    return 0;
}

PyObject *
trace_force_deep(PyObject *x)
{
    if (graph_live_tasks == 0)
        return Py_NewRef(x);
    if (graph_is_task(x))
        return graph_wait((graph_task *)x);
    if (PyList_CheckExact(x) || PyTuple_CheckExact(x) || PyDict_CheckExact(x)) {
        if (force_inplace(x, 0) < 0)
            return NULL;
    }
    return Py_NewRef(x);
}

/* Containers a pending was moved into during this thread's sessions (strong references). */
static _Thread_local PyObject *moved_into;

int
trace_note_move(PyObject *container)
{
    if (moved_into == NULL && (moved_into = PyList_New(0)) == NULL)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(moved_into);
    if (n && PyList_GET_ITEM(moved_into, n - 1) == container)
        return 0;
    return PyList_Append(moved_into, container);
}

static int
is_undone(PyObject *v, Py_ssize_t cut, Py_ssize_t horizon)
{
    if (!graph_is_task(v))
        return 0;
    Py_ssize_t seq = graph_task_seq((graph_task *)v);
    return cut <= seq && seq < horizon;
}

int
trace_undo_moves(Py_ssize_t cut, Py_ssize_t horizon)
{
    if (moved_into == NULL)
        return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(moved_into); i++) {
        PyObject *c = PyList_GET_ITEM(moved_into, i);
        if (PyList_CheckExact(c)) {
            for (Py_ssize_t j = PyList_GET_SIZE(c) - 1; j >= 0; j--)
                if (is_undone(PyList_GET_ITEM(c, j), cut, horizon) &&
                    PyList_SetSlice(c, j, j + 1, NULL) < 0)
                    return -1;
        }
        else if (PyDict_CheckExact(c)) {
            PyObject *k, *v, *doomed = PyList_New(0);
            Py_ssize_t pos = 0;
            if (doomed == NULL)
                return -1;
            while (PyDict_Next(c, &pos, &k, &v))
                if (is_undone(v, cut, horizon) && PyList_Append(doomed, k) < 0) {
                    Py_DECREF(doomed);
                    return -1;
                }
            for (Py_ssize_t j = 0; j < PyList_GET_SIZE(doomed); j++)
                if (PyDict_DelItem(c, PyList_GET_ITEM(doomed, j)) < 0)
                    PyErr_Clear();
            Py_DECREF(doomed);
        }
    }
    return 0;
}

void
trace_session_begin(trace_session *s)
{
    graph_session_enter();
    s->order = graph_mark();
    s->moved = moved_into ? PyList_GET_SIZE(moved_into) : 0;
}

static PyObject *
session_finish(trace_session *s, PyObject *result)
{
    if (result == NULL) {
        /* The call raised. A task that failed before that point would have raised first in
         * plain Python, so wait for those, unless the user interrupted us. */
        if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            graph_cancel_all();
            return NULL;
        }
        PyObject *exc = PyErr_GetRaisedException();
        Py_ssize_t k = graph_raised_by(exc);
        if (graph_force_before(k >= 0 ? k : graph_mark()) == 0)
            PyErr_SetRaisedException(exc);
        else
            Py_XDECREF(exc);
        return NULL;
    }
    if (graph_force_since(s->order) < 0 || graph_force_before(graph_mark()) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    /* Pendings moved into lists reachable from objects (box.items.append(f(x))) get their
     * values too: no pending outlives the call. */
    for (Py_ssize_t i = s->moved; moved_into && i < PyList_GET_SIZE(moved_into); i++) {
        PyObject *v = trace_force_deep(PyList_GET_ITEM(moved_into, i));
        if (v == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(v);
    }
    PyObject *value = trace_force_deep(result);
    Py_DECREF(result);
    return value;
}

PyObject *
trace_session_end(trace_session *s, PyObject *result)
{
    result = session_finish(s, result);
    if (moved_into && s->moved < PyList_GET_SIZE(moved_into)) {
        PyObject *exc = PyErr_GetRaisedException();
        PyList_SetSlice(moved_into, s->moved, PyList_GET_SIZE(moved_into), NULL);
        PyErr_SetRaisedException(exc);
    }
    graph_order_truncate(s->order);
    graph_session_exit();
    return result;
}
