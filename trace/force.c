/* trace/force.c — where pending results turn into values: shallow and deep forcing (in place,
 * so aliasing and identity stay as plain Python had them), and the end of a top-level scheduled
 * call (a session), where everything it started is waited for.
 * Thread and GIL model: GIL held; a wait releases it inside exec_poll, and another thread may
 * change a container meanwhile (the in-place replacement checks the slot still holds the task). */
#include "trace/internal.h"

PyObject *
trace__force(PyObject *x)
{
    if (graph_is_task(x))
        return graph_wait((graph_task *)x);
    return Py_NewRef(x);
}

/* Replace every task inside the exact containers reachable from obj by its value.
 * Borrows obj; replaced items become its own references. */
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
trace__force_deep(PyObject *x)
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

void
trace__session_begin(trace_session *s, PyObject *name)
{
    graph_session_enter(name);
    s->order = graph_mark();
    s->moved = graph_moves_mark();
}

/* Steals result; returns a new reference or NULL. */
static PyObject *
session_finish(trace_session *s, PyObject *result)
{
    if (result == NULL) {
        /* The call raised. A task that failed before that point would have raised first in
         * plain Python, so wait for those, unless the user interrupted us. */
        PyObject *exc = PyErr_GetRaisedException();
        Py_ssize_t k = graph_raised_by(exc);
        if (k < 0 && PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt)) {
            /* Ctrl-C in this thread (not a task that raised KeyboardInterrupt itself): what
             * this call started is cancelled; other threads' calls go on. */
            PyErr_SetRaisedException(exc);
            graph_cancel_mine();
            return NULL;
        }
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
    for (Py_ssize_t i = s->moved; i < graph_moves_count(); i++) {
        PyObject *v = trace__force_deep(graph_moved_container(i));
        if (v == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(v);
    }
    PyObject *value = trace__force_deep(result);
    Py_DECREF(result);
    return value;
}

PyObject *
trace__session_end(trace_session *s, PyObject *result)
{
    result = session_finish(s, result);
    graph_moves_truncate(s->moved);
    graph_order_truncate(s->order);
    graph_session_exit();
    return result;
}
