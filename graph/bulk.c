/* graph/bulk.c — maps: one function over many argument tuples, as a few chunk tasks that each
 * run a loop in a worker (exec/worker.c run_chunk), and a join computed here that
 * gathers their results in order. A thousand tiny calls cost a few records, a few wake-ups and
 * two pickles per chunk instead of all of that per call. The chunk size comes from the measured
 * run time of the function: long tasks still spread over every worker.
 * Failures: a chunk stops at its first failing call (plain Python would not have made the calls
 * after it); the join raises the failure of the earliest failing call.
 * Thread and GIL model: GIL held, like tasks.c. */
#include "graph/internal.h"

/* A chunk aims at this much work, so that tiny calls are amortised and long ones spread out. */
#define CHUNK_TARGET_NS 2e6
/* At least this many chunks per worker (unknown run times, uneven calls). */
#define CHUNKS_PER_WORKER 2
#define CHUNK_MAX 4096

static PyObject *str_ok, *str_err, *flat_marker;     /* flat_marker: the int 1 */

/* How many calls a chunk takes, for n calls of fn over the workers (a cluster's threads when
 * one is attached). */
static Py_ssize_t
chunk_size(PyObject *fn, Py_ssize_t n)
{
    int workers = exec_task_slots();
    if (workers < 1)
        workers = 1;
    Py_ssize_t spread = (n + workers * CHUNKS_PER_WORKER - 1) / (workers * CHUNKS_PER_WORKER);
    double est = exec_estimate_ns(fn);
    Py_ssize_t size = spread;
    if (est > 0) {
        Py_ssize_t by_time = (Py_ssize_t)(CHUNK_TARGET_NS / est);
        if (by_time < size)
            size = by_time;      /* long calls: smaller chunks, more of them, all workers busy */
    }
    if (size < 1)
        size = 1;
    return size > CHUNK_MAX ? CHUNK_MAX : size;
}

PyObject *
graph_submit_map(PyObject *fn, PyObject *calls, int flat, const graph_task_options *options)
{
    if (!PyList_CheckExact(calls)) {
        PyErr_SetString(PyExc_TypeError, "pydron: a map takes a list of argument tuples");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(calls), size = chunk_size(fn, n);
    Py_ssize_t nchunks = n ? (n + size - 1) / size : 0;
    graph_task_options chunk_options = *options;
    chunk_options.threads = 0;
    chunk_options.chunk = 1;
    PyObject *chunks = PyTuple_New(nchunks);
    graph_task *join = NULL;
    if (chunks == NULL)
        return NULL;
    for (Py_ssize_t c = 0; c < nchunks; c++) {
        PyObject *slice = PyList_GetSlice(calls, c * size, (c + 1) * size < n ? (c + 1) * size : n);
        /* (calls,) or, flat, (values, 1): exec/wire.h WIRE_TASK_CHUNK */
        PyObject *args = !slice ? NULL : flat ? PyTuple_Pack(2, slice, flat_marker)
                                                : PyTuple_Pack(1, slice);
        Py_XDECREF(slice);
        PyObject *task = args ? graph_submit(fn, args, NULL, &chunk_options) : NULL;
        Py_XDECREF(args);
        if (task == NULL)
            goto error;
        PyTuple_SET_ITEM(chunks, c, task);
    }
    join = graph__task_new(fn, 0);
    if (join == NULL)
        goto error;
    join->join = 1;
    graph__hold(join);
    if (graph__order_append(join) < 0 || graph__wait_for(join, chunks) < 0) {
        /* Never finished: it fails with this error (raised here, once). */
        PyObject *exc = PyErr_GetRaisedException();
        join->reported = 1;
        graph__task_finish(join, 1, NULL, Py_NewRef(exc));
        PyErr_SetRaisedException(exc);
        goto error;
    }
    Py_DECREF(chunks);
    return (PyObject *)join;
error:
    Py_XDECREF(join);
    Py_DECREF(chunks);
    return NULL;
}

int
graph__join_run(graph_task *t)
{
    PyObject *chunks = t->extra ? Py_XNewRef(t->extra->deps) : NULL;
    PyObject *results = PyList_New(0), *exc = NULL;
    if (results == NULL)
        goto error;
    Py_ssize_t n = chunks ? PyTuple_GET_SIZE(chunks) : 0;
    for (Py_ssize_t c = 0; c < n && exc == NULL; c++) {
        PyObject *r = graph__task_value((graph_task *)PyTuple_GET_ITEM(chunks, c));
        if (r == NULL)
            goto error;
        int ok = PyTuple_Check(r) && PyTuple_GET_SIZE(r) >= 2 &&
                 PyObject_RichCompareBool(PyTuple_GET_ITEM(r, 0), str_ok, Py_EQ) == 1;
        if (ok && PyList_Check(PyTuple_GET_ITEM(r, 1))) {
            PyObject *part = PyTuple_GET_ITEM(r, 1);
            if (PyList_SetSlice(results, PyList_GET_SIZE(results), PyList_GET_SIZE(results),
                                part) < 0) {
                Py_DECREF(r);
                goto error;
            }
        }
        else if (PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 3) {
            /* The chunk's first failing call: the map's failure, in program order. */
            exc = exec_exception_from_bytes(PyTuple_GET_ITEM(r, 2));
        }
        else {
            Py_DECREF(r);
            PyErr_SetString(PyExc_RuntimeError, "pydron: a map's chunk came back malformed");
            goto error;
        }
        Py_DECREF(r);
    }
    Py_XDECREF(chunks);
    if (exc != NULL) {
        Py_DECREF(results);
        return graph__task_finish(t, 1, NULL, exc);
    }
    return graph__task_finish(t, 0, NULL, results);
error:
    Py_XDECREF(chunks);
    Py_XDECREF(results);
    return graph__task_finish(t, 1, NULL, PyErr_GetRaisedException());
}

/* _map(fn, calls) -> a pending list of fn(*args) for args in calls (replay and tests). */
static PyObject *
core_map(PyObject *module, PyObject *args)
{
    PyObject *fn, *calls;
    if (!PyArg_ParseTuple(args, "OO!:_map", &fn, &PyList_Type, &calls))
        return NULL;
    graph_task_options options = {0};
    return graph_submit_map(fn, calls, 0, &options);
}

static PyMethodDef bulk_methods[] = {
    {"_map", core_map, METH_VARARGS,
     "_map(fn, calls): a pending list of fn(*args) for every args tuple, as chunk tasks."},
    {NULL},
};

int
graph__bulk_init(PyObject *module)
{
    str_ok = PyUnicode_InternFromString("ok");
    str_err = PyUnicode_InternFromString("err");
    flat_marker = PyLong_FromLong(1);
    if (str_ok == NULL || str_err == NULL || flat_marker == NULL)
        return -1;
    return PyModule_AddFunctions(module, bulk_methods);
}
