/* trace/force.c — where pending results turn into values: shallow and deep forcing (in place,
 * so aliasing and identity stay as plain Python had them), and the per-thread submission order
 * that decides which failure plain Python would have raised first. */
#include "trace/internal.h"

/* Tasks of this thread in submission order. Scheduled calls nest: each top-level call is a
 * session owning order[start:]. */
static _Thread_local PyObject *thread_order;

static PyObject *
order_list(void)
{
    if (thread_order == NULL)
        thread_order = PyList_New(0);
    return thread_order;
}

int
trace_record(PyObject *task)
{
    PyObject *order = order_list();
    if (order == NULL)
        return -1;
    graph_set_seq((graph_task *)task, order, PyList_GET_SIZE(order));
    return PyList_Append(order, task);
}

Py_ssize_t
trace_mark(void)
{
    PyObject *order = order_list();
    return order ? PyList_GET_SIZE(order) : 0;
}

int
trace_force_since(Py_ssize_t mark)
{
    PyObject *order = order_list();
    if (order == NULL)
        return -1;
    return graph_wait_range(order, mark, PyList_GET_SIZE(order));
}

int
trace_force_before(Py_ssize_t mark)
{
    PyObject *order = order_list();
    if (order == NULL)
        return -1;
    return graph_wait_range(order, 0, mark);
}

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

Py_ssize_t
trace_session_begin(void)
{
    graph_session_enter();
    return trace_mark();
}

/* Forget order[start:]: the tasks stay alive where the user keeps them, but no longer point
 * into the list. */
static void
order_truncate(Py_ssize_t start)
{
    PyObject *order = thread_order;
    if (order == NULL || start >= PyList_GET_SIZE(order))
        return;
    for (Py_ssize_t i = start; i < PyList_GET_SIZE(order); i++)
        graph_set_seq((graph_task *)PyList_GET_ITEM(order, i), NULL, -1);
    PyObject *exc = PyErr_GetRaisedException();
    PyList_SetSlice(order, start, PyList_GET_SIZE(order), NULL);
    PyErr_SetRaisedException(exc);
}

static PyObject *session_finish(Py_ssize_t start, PyObject *result);

PyObject *
trace_session_end(Py_ssize_t start, PyObject *result)
{
    result = session_finish(start, result);
    graph_session_exit();
    return result;
}

static PyObject *
session_finish(Py_ssize_t start, PyObject *result)
{
    PyObject *order = order_list();
    if (order == NULL) {
        Py_XDECREF(result);
        return NULL;
    }
    if (result == NULL) {
        /* The call raised. A task that failed earlier would have raised first in plain Python,
         * so wait for them, unless the user interrupted us. */
        if (!PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            PyObject *exc = PyErr_GetRaisedException();
            if (graph_wait_range(order, start, PyList_GET_SIZE(order)) == 0)
                PyErr_SetRaisedException(exc);
            else
                Py_XDECREF(exc);
        }
        else
            graph_cancel_all();
        order_truncate(start);
        return NULL;
    }
    if (graph_wait_range(order, start, PyList_GET_SIZE(order)) < 0) {
        Py_DECREF(result);
        order_truncate(start);
        return NULL;
    }
    PyObject *value = trace_force_deep(result);
    Py_DECREF(result);
    order_truncate(start);
    return value;
}
