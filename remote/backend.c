/* remote/backend.c — the exec_backend of kind EXEC_REMOTE over the Python adapter (see
 * remote/internal.h for what is called on it): tasks go out through adapter.submit, completions
 * come back through adapter.collect into exec's completion queue.
 * Thread and GIL model: everything runs on the thread that called exec (the master), GIL held,
 * except remote__signal, which the adapter's Dask threads call; it only bumps an atomic word and
 * wakes the master, so the master learns of completions without calling into Python while it
 * spins in exec_poll. */
#include "remote/internal.h"

#include <stdatomic.h>

static PyObject *adapter;                /* the attached adapter, or NULL */
static _Atomic uint64_t signalled;       /* bumped by remote__signal */
static uint64_t seen;                    /* `signalled` when collect last asked the adapter */
static int unflushed;                    /* submitted since the last flush request */
static Py_ssize_t outstanding;           /* submitted, neither handed over nor cancelled */
static PyObject *str_submit, *str_collect, *str_flush, *str_check, *str_cancel, *str_fetch,
                *str_close, *str_slots;

static const exec_backend remote_backend;

/* adapter.<name>(*args): new reference, NULL + exception. */
static PyObject *
call_adapter(PyObject *name, PyObject *const *args, size_t nargs)
{
    if (adapter == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: no cluster is attached");
        return NULL;
    }
    PyObject *stack[8];
    stack[0] = adapter;
    for (size_t i = 0; i < nargs; i++)
        stack[i + 1] = args[i];
    return PyObject_VectorcallMethod(name, stack, (nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

void
remote__signal(void)
{
    atomic_fetch_add(&signalled, 1);
    exec_notify();
}

/* ---- submit ----------------------------------------------------------------------------------- */

/* The dependencies as the adapter takes them: its own reference for a result on the cluster, a
 * BlobHold for any other encoded value. New reference, NULL + exception. */
static PyObject *
dependencies(const exec_task *t)
{
    PyObject *deps = PyTuple_New(t->ndeps);
    for (Py_ssize_t i = 0; deps != NULL && i < t->ndeps; i++) {
        PyObject *ref = exec_blob_remote_ref(t->deps[i]);
        PyObject *item = ref ? Py_NewRef(ref) : remote__hold_new(t->deps[i]);
        if (item == NULL) {
            Py_CLEAR(deps);
            break;
        }
        PyTuple_SET_ITEM(deps, i, item);
    }
    return deps;
}

/* adapter.submit returns None, or False when the cluster is gone. */
static int
remote_submit(const exec_task *t)
{
    PyObject *id = NULL, *hold = NULL, *deps = NULL, *timeout = NULL, *r = NULL, *fn = NULL;
    int rc = -1;
    if (t->args == NULL) {
        PyErr_SetString(PyExc_SystemError, "pydron: a cluster task without encoded arguments");
        goto done;
    }
    id = PyLong_FromUnsignedLongLong(t->task_id);
    hold = id ? remote__hold_new(t->args) : NULL;
    deps = hold ? dependencies(t) : NULL;
    timeout = deps ? PyFloat_FromDouble(t->timeout_s) : NULL;
    if (timeout == NULL)
        goto done;
    /* A map's chunk runs its loop on the Dask worker as it would in a local worker. */
    fn = t->chunk ? exec_chunk_runner(t->fn) : Py_NewRef(t->fn);
    if (fn == NULL)
        goto done;
    PyObject *args[5] = {id, fn, hold, deps, timeout};
    r = call_adapter(str_submit, args, 5);
    if (r == NULL)
        goto done;
    if (r == Py_False) {
        /* The cluster is gone: detach it and run this task (and the next ones) here. */
        if (remote__detach() < 0)
            goto done;
        rc = exec_submit(exec_task_kind(), t);
        goto done;
    }
    outstanding++;
    unflushed = 1;
    rc = 0;
done:
    Py_XDECREF(id);
    Py_XDECREF(hold);
    Py_XDECREF(deps);
    Py_XDECREF(timeout);
    Py_XDECREF(fn);
    Py_XDECREF(r);
    return rc;
}

/* ---- completions ------------------------------------------------------------------------------ */

/* One (task_id, kind, payload, worker, started, finished) tuple into exec's queue. Borrows item.
 * 0, or -1 + exception (a malformed item: the adapter's bug, named). */
static int
hand_over_one(PyObject *item)
{
    exec_completion c = {0};
    PyObject *payload;
    int kind;
    unsigned long long id;
    if (!PyTuple_Check(item) ||
        !PyArg_ParseTuple(item, "KiOidd", &id, &kind, &payload, &c.worker, &c.started,
                          &c.finished)) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError))
            PyErr_Format(PyExc_SystemError, "pydron: the cluster adapter handed over %R, not "
                         "(task_id, kind, payload, worker, started, finished)", item);
        return -1;
    }
    c.task_id = id;
    if (kind == REMOTE_DONE) {
        c.blob = exec_blob_remote(Py_NewRef(payload));
        if (c.blob == NULL)
            return -1;
    }
    else if (kind == REMOTE_VALUE) {
        /* A result that came back to this process (its batch failed elsewhere): an ordinary
         * blob, shipped again by value to the tasks that depend on it. */
        c.blob = exec_encode_value(payload);
        if (c.blob == NULL) {
            c.failed = 1;
            c.object = PyErr_GetRaisedException();
        }
    }
    else if (kind == REMOTE_FAILED) {
        c.failed = 1;
        c.object = Py_NewRef(payload);
    }
    else {
        PyErr_Format(PyExc_SystemError, "pydron: the cluster adapter handed over kind %d", kind);
        return -1;
    }
    if (exec_complete(&c) < 0)
        return -1;
    outstanding--;
    return 0;
}

/* Ask the adapter for what finished and queue it. The number queued, or -1 + exception. */
static int
hand_over(void)
{
    PyObject *list = call_adapter(str_collect, NULL, 0);
    if (list == NULL)
        return -1;
    if (!PyList_Check(list)) {
        PyErr_Format(PyExc_SystemError, "pydron: the cluster adapter's collect() returned %.100s, "
                     "not a list", Py_TYPE(list)->tp_name);
        Py_DECREF(list);
        return -1;
    }
    int n = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        if (hand_over_one(PyList_GET_ITEM(list, i)) < 0) {
            Py_DECREF(list);
            return -1;
        }
        n++;
    }
    Py_DECREF(list);
    return n;
}

static int
remote_collect(void)
{
    uint64_t now = atomic_load(&signalled);
    if (adapter == NULL || now == seen)
        return 0;                  /* the usual case on every pump: nothing to ask Python */
    seen = now;                    /* before asking: a signal meanwhile is not lost */
    return hand_over();
}

/* Called while exec_poll spins, i.e. the master is about to wait: tasks the adapter still holds
 * back for batching are sent now rather than when its timer fires. */
static int
remote_ready(void)
{
    if (atomic_load(&signalled) != seen)
        return 1;
    if (unflushed && adapter != NULL) {
        unflushed = 0;
        PyObject *r = call_adapter(str_flush, NULL, 0);
        if (r == NULL)
            PyErr_WriteUnraisable(adapter);    /* its timer sends them all the same */
        Py_XDECREF(r);
    }
    return 0;
}

static int
remote_check(void)
{
    if (adapter == NULL)
        return 0;
    PyObject *r = call_adapter(str_check, NULL, 0);
    if (r == NULL)
        return -1;
    int alive = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (alive < 0)
        return -1;
    /* The cluster is gone: its tasks were queued as failed; from now on tasks run locally. */
    return alive ? 0 : remote__detach();
}

static void
remote_cancel(const uint64_t *sorted_ids, Py_ssize_t n)
{
    if (adapter == NULL || outstanding == 0)
        return;
    PyObject *ids = PyList_New(n), *r = NULL;
    for (Py_ssize_t i = 0; ids != NULL && i < n; i++) {
        PyObject *id = PyLong_FromUnsignedLongLong(sorted_ids[i]);
        if (id == NULL) {
            Py_CLEAR(ids);
            break;
        }
        PyList_SET_ITEM(ids, i, id);
    }
    if (ids != NULL)
        r = call_adapter(str_cancel, &ids, 1);
    Py_ssize_t known = r ? PyLong_AsSsize_t(r) : -1;
    if (known < 0) {
        /* Cancel cannot fail upwards (exec_cancel is void): say it, and let the tasks finish. */
        PyErr_WriteUnraisable(adapter);
    }
    else
        outstanding -= known;
    Py_XDECREF(ids);
    Py_XDECREF(r);
}

static Py_ssize_t
remote_outstanding(void)
{
    return outstanding;
}

static void
remote_shutdown(int with_python)
{
    if (adapter == NULL)
        return;
    exec_register_remote(NULL);
    if (with_python) {
        PyObject *r = call_adapter(str_close, NULL, 0);
        if (r == NULL)
            PyErr_WriteUnraisable(adapter);
        Py_XDECREF(r);
        Py_CLEAR(adapter);
    }
    else
        adapter = NULL;            /* the interpreter is gone: nothing to drop it with */
    outstanding = 0;
}

static PyObject *
remote_fetch(PyObject *ref)
{
    return call_adapter(str_fetch, &ref, 1);
}

/* adapter.slots: the cluster's worker threads as the adapter last counted them; 0 when it has
 * no such count (the error, if any, is dropped: a map then spreads over the local pool's size). */
static int
remote_slots(void)
{
    if (adapter == NULL)
        return 0;
    PyObject *pending = PyErr_GetRaisedException();
    PyObject *r = PyObject_GetAttr(adapter, str_slots);
    long n = r && PyLong_Check(r) ? PyLong_AsLong(r) : 0;
    Py_XDECREF(r);
    PyErr_Clear();
    PyErr_SetRaisedException(pending);
    return n > 0 && n < INT_MAX ? (int)n : 0;
}

static const exec_backend remote_backend = {
    .name = "cluster", .submit = remote_submit, .collect = remote_collect,
    .ready = remote_ready, .check = remote_check, .cancel = remote_cancel,
    .outstanding = remote_outstanding, .shutdown = remote_shutdown, .fetch = remote_fetch,
    .slots = remote_slots,
};

/* ---- attaching -------------------------------------------------------------------------------- */

static int
intern_names(void)
{
    if (str_submit != NULL)
        return 0;
    str_submit = PyUnicode_InternFromString("submit");
    str_collect = PyUnicode_InternFromString("collect");
    str_flush = PyUnicode_InternFromString("flush");
    str_check = PyUnicode_InternFromString("check");
    str_cancel = PyUnicode_InternFromString("cancel");
    str_fetch = PyUnicode_InternFromString("fetch");
    str_close = PyUnicode_InternFromString("close");
    str_slots = PyUnicode_InternFromString("slots");
    if (!str_submit || !str_collect || !str_flush || !str_check || !str_cancel || !str_fetch ||
        !str_close || !str_slots)
        return -1;
    return 0;
}

int
remote__attach(PyObject *a)
{
    if (intern_names() < 0)
        return -1;
    if (adapter != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: a cluster is already attached; detach it "
                        "first (pydron.disable())");
        return -1;
    }
    adapter = Py_NewRef(a);
    seen = atomic_load(&signalled);
    unflushed = 0;
    outstanding = 0;
    exec_register_remote(&remote_backend);
    return 0;
}

int
remote__detach(void)
{
    if (adapter == NULL)
        return 0;
    /* What the adapter finished or failed before letting go is the graph's to take. */
    int rc = hand_over() < 0 ? -1 : 0;
    exec_register_remote(NULL);
    Py_CLEAR(adapter);
    outstanding = 0;
    return rc;
}

PyObject *
remote__stats(void)
{
    return Py_BuildValue("{s:O,s:n}", "attached", adapter ? Py_True : Py_False,
                         "outstanding", outstanding);
}
