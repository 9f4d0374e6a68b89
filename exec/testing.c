/* exec/testing.c — private entry points for tests and tools (pydron._core._exec_*, _threads_*):
 * the executors driven directly, without graph/: submit, wait, map, cancel, pool state. Not used
 * by pydron itself. Completions of tasks these helpers did not submit are dropped, so do not mix
 * them with scheduled calls running at the same time.
 * Thread and GIL model: GIL held, like the executors they drive. */
#include "exec/internal.h"

#include <stddef.h>
#include <string.h>

/* Ids of tasks submitted here, far above the graph's. */
static uint64_t next_test_id = 1ull << 62;

/* ---- handles: one process task each -------------------------------------------------------- */

/* A task submitted by _exec_submit; passing it as an argument to another _exec_submit makes it a
 * dependency whose result blob is forwarded as it is. */
typedef struct {
    PyObject_HEAD
    uint64_t id;
    int done, failed;
    exec_blob *blob;
    PyObject *error;
} HandleObject;

static PyObject *pending_handles;   /* dict id -> handle, until done */

static void
handle_dealloc(HandleObject *h)
{
    exec_blob_decref(h->blob);
    Py_XDECREF(h->error);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

/* New reference. */
static PyObject *
handle_get_done(HandleObject *h, void *unused)
{
    return PyBool_FromLong(h->done);
}

/* New reference. */
static PyObject *
handle_get_id(HandleObject *h, void *unused)
{
    return PyLong_FromUnsignedLongLong(h->id);
}

/* New reference. */
static PyObject *
handle_get_size(HandleObject *h, void *unused)
{
    return PyLong_FromSize_t(h->blob ? exec_blob_size(h->blob) : 0);
}

static PyGetSetDef handle_getset[] = {
    {"done", (getter)handle_get_done, NULL, NULL, NULL},
    {"id", (getter)handle_get_id, NULL, NULL, NULL},
    {"blob_size", (getter)handle_get_size, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject Handle_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pydron._core._ExecHandle",
    .tp_basicsize = sizeof(HandleObject),
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_getset = handle_getset,
};

/* ---- collecting completions ------------------------------------------------------------------ */

/* What a batch of helper tasks waits for: ids base .. base + n - 1. */
typedef struct {
    uint64_t base;
    Py_ssize_t n, received;
    PyObject *results;      /* list: value or exception per task */
    char *failed;
} batch;

/* Route one completion: to the batch, to its handle, or (not ours) drop it. 0, or -1 + exc. */
static int
route(batch *b, exec_completion *c)
{
    if (b && c->task_id >= b->base && c->task_id < b->base + (uint64_t)b->n) {
        Py_ssize_t i = (Py_ssize_t)(c->task_id - b->base);
        PyObject *value;
        if (c->failed || c->blob == NULL) {
            value = c->object ? c->object : Py_NewRef(Py_None);
            b->failed[i] = (char)c->failed;
        }
        else {
            value = exec_blob_decode(c->blob);
            if (value == NULL) {
                value = PyErr_GetRaisedException();
                b->failed[i] = 1;
            }
        }
        exec_blob_decref(c->blob);
        PyList_SetItem(b->results, i, value);   /* steals value */
        b->received++;
        return 0;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(c->task_id);
    HandleObject *h = key ? (HandleObject *)PyDict_GetItemWithError(pending_handles, key) : NULL;
    if (h) {
        h->done = 1;
        h->failed = c->failed;
        h->blob = c->blob;
        h->error = c->object;
        PyDict_DelItem(pending_handles, key);
    }
    else {
        exec_blob_decref(c->blob);
        Py_XDECREF(c->object);
    }
    Py_XDECREF(key);
    return PyErr_Occurred() ? -1 : 0;
}

/* Poll once (timeout_s as exec_poll) and route what came. Number routed, or -1 + exc. */
static int
poll_and_route(batch *b, double timeout_s)
{
    exec_completion out[64];
    int n = exec_poll(timeout_s, out, 64);
    if (n < 0)
        return -1;
    int rc = 0;
    for (int i = 0; i < n; i++)
        if (route(b, &out[i]) < 0)
            rc = -1;
    return rc < 0 ? -1 : n;
}

/* Wait for every task of the batch; on an error the rest are cancelled. 0, or -1 + exc. */
static int
wait_batch(batch *b)
{
    while (b->received < b->n) {
        if (poll_and_route(b, -1) < 0)
            goto cancel;
        if (b->received < b->n && exec_outstanding() == 0) {
            PyErr_SetString(PyExc_RuntimeError, "pydron test: tasks will never complete");
            goto cancel;
        }
    }
    return 0;
cancel: {
        PyObject *exc = PyErr_GetRaisedException();
        uint64_t *ids = PyMem_RawMalloc((size_t)(b->n ? b->n : 1) * sizeof(uint64_t));
        if (ids) {
            for (Py_ssize_t i = 0; i < b->n; i++)
                ids[i] = b->base + (uint64_t)i;
            exec_cancel(ids, b->n);
            PyMem_RawFree(ids);
        }
        PyErr_SetRaisedException(exc);
        return -1;
    }
}

/* The batch's results: a new list, or (not return_exceptions) NULL + the first failure. */
static PyObject *
batch_results(batch *b, int return_exceptions)
{
    if (!return_exceptions) {
        for (Py_ssize_t i = 0; i < b->n; i++) {
            if (b->failed[i]) {
                PyObject *e = PyList_GET_ITEM(b->results, i);
                PyErr_SetObject((PyObject *)Py_TYPE(e), e);
                return NULL;
            }
        }
    }
    return Py_NewRef(b->results);
}

static int
batch_init(batch *b, Py_ssize_t n)
{
    b->base = next_test_id;
    next_test_id += (uint64_t)n;
    b->n = n;
    b->received = 0;
    b->results = PyList_New(n);
    b->failed = PyMem_Calloc((size_t)n + 1, 1);
    if (b->results == NULL || b->failed == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(b->results, i, Py_NewRef(Py_None));
    return 0;
}

static void
batch_clear(batch *b)
{
    Py_XDECREF(b->results);
    PyMem_Free(b->failed);
}

/* ---- the process pool -------------------------------------------------------------------------- */

static PyObject *
core_exec_start(PyObject *m, PyObject *args)
{
    int n = 0;
    if (!PyArg_ParseTuple(args, "|i", &n) || exec_start(n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
core_exec_shutdown(PyObject *m, PyObject *unused)
{
    exec__process_backend.shutdown(1);
    Py_RETURN_NONE;
}

static PyObject *
core_exec_cancel_all(PyObject *m, PyObject *unused)
{
    exec__cancel_all();
    Py_RETURN_NONE;
}

static PyObject *
core_exec_info(PyObject *m, PyObject *unused)
{
    return exec__pool_info();
}

static PyObject *
core_exec_in_worker(PyObject *m, PyObject *unused)
{
    return PyBool_FromLong(exec_in_worker());
}

/* Persistent ids for _exec_submit: handles met in the arguments become dependencies. */
typedef struct {
    PyObject *handles;   /* list, in dependency order */
} handle_deps;

/* Borrows obj; the handles list takes a new reference. */
static Py_ssize_t
handle_dep(void *ctx, PyObject *obj)
{
    if (Py_TYPE(obj) != &Handle_Type)
        return -1;
    handle_deps *d = ctx;
    Py_ssize_t n = PyList_GET_SIZE(d->handles);
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyList_GET_ITEM(d->handles, i) == obj)
            return i;
    return PyList_Append(d->handles, obj) < 0 ? -2 : n;
}

/* Poll until handle h is done (as the graph would: a task is submitted once its deps are). */
static int
wait_handle(HandleObject *h)
{
    while (!h->done) {
        if (poll_and_route(NULL, -1) < 0)
            return -1;
        if (!h->done && exec_outstanding() == 0) {
            PyErr_SetString(PyExc_RuntimeError, "pydron: handle will never complete");
            return -1;
        }
    }
    return 0;
}

/* _exec_submit(fn, args, kwargs=None) -> handle */
static PyObject *
core_exec_submit(PyObject *m, PyObject *args)
{
    PyObject *fn, *targs, *kwargs = NULL;
    if (!PyArg_ParseTuple(args, "OO!|O", &fn, &PyTuple_Type, &targs, &kwargs))
        return NULL;
    if (kwargs == Py_None)
        kwargs = NULL;
    handle_deps d = {PyList_New(0)};
    if (d.handles == NULL)
        return NULL;
    HandleObject *h = NULL;
    exec_blob **deps = NULL;
    PyObject *key = NULL;
    exec_blob *blob = exec_encode_call(fn, targs, kwargs, handle_dep, &d);
    if (blob == NULL)
        goto done;
    Py_ssize_t nd = PyList_GET_SIZE(d.handles);
    deps = PyMem_Malloc((size_t)(nd + 1) * sizeof(exec_blob *));
    if (deps == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nd; i++) {
        HandleObject *dh = (HandleObject *)PyList_GET_ITEM(d.handles, i);
        if (wait_handle(dh) < 0)
            goto done;
        if (dh->failed) {
            PyErr_SetString(PyExc_RuntimeError, "pydron test: a dependency failed");
            goto done;
        }
        deps[i] = dh->blob;
    }
    h = PyObject_New(HandleObject, &Handle_Type);
    if (h == NULL)
        goto done;
    h->id = next_test_id++;
    h->done = h->failed = 0;
    h->blob = NULL;
    h->error = NULL;
    key = PyLong_FromUnsignedLongLong(h->id);
    if (key == NULL || PyDict_SetItem(pending_handles, key, (PyObject *)h) < 0) {
        Py_CLEAR(h);
        goto done;
    }
    exec_task t = {.task_id = h->id, .fn = fn, .args = blob, .deps = deps, .ndeps = nd};
    if (exec_submit(EXEC_PROCESSES, &t) < 0) {
        PyObject *exc = PyErr_GetRaisedException();
        PyDict_DelItem(pending_handles, key);
        PyErr_SetRaisedException(exc);
        Py_CLEAR(h);
    }
done:
    Py_XDECREF(key);
    PyMem_Free(deps);
    exec_blob_decref(blob);
    Py_DECREF(d.handles);
    return (PyObject *)h;
}

/* _exec_wait(handle) -> value (or raises the task's exception) */
static PyObject *
core_exec_wait(PyObject *m, PyObject *arg)
{
    if (Py_TYPE(arg) != &Handle_Type) {
        PyErr_SetString(PyExc_TypeError, "_exec_wait expects a handle");
        return NULL;
    }
    HandleObject *h = (HandleObject *)arg;
    if (wait_handle(h) < 0)
        return NULL;
    if (h->failed) {
        PyErr_SetObject((PyObject *)Py_TYPE(h->error), h->error);
        return NULL;
    }
    return exec_blob_decode(h->blob);
}

/* Submit fn(*a, **kwargs_list[i]) as task id base + i. 0, or -1 + exception. Borrows fn and a. */
static int
submit_one(PyObject *fn, PyObject *a, PyObject *kwlist_obj, Py_ssize_t i, uint64_t base)
{
    PyObject *k = kwlist_obj != Py_None ? PySequence_GetItem(kwlist_obj, i) : NULL;
    if (kwlist_obj != Py_None && k == NULL)
        return -1;
    if (!PyTuple_Check(a)) {
        Py_XDECREF(k);
        PyErr_SetString(PyExc_TypeError, "args_list items must be tuples");
        return -1;
    }
    exec_blob *blob = exec_encode_call(fn, a, k == Py_None ? NULL : k, NULL, NULL);
    Py_XDECREF(k);
    if (blob == NULL)
        return -1;
    exec_task t = {.task_id = base + (uint64_t)i, .fn = fn, .args = blob};
    int rc = exec_submit(EXEC_PROCESSES, &t);
    exec_blob_decref(blob);
    return rc;
}

/* _exec_map(fn, args_list, kwargs_list=None, return_exceptions=False) -> list: submits every
 * call to the process pool, then waits for all of them. */
static PyObject *
core_exec_map(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fn", "args_list", "kwargs_list", "return_exceptions", NULL};
    PyObject *fn, *arglist, *kwlist_obj = Py_None;
    int return_exceptions = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Op", kwlist, &fn, &arglist, &kwlist_obj,
                                     &return_exceptions))
        return NULL;
    PyObject *seq = PySequence_Fast(arglist, "args_list must be a sequence");
    if (seq == NULL)
        return NULL;
    batch b = {0};
    PyObject *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (batch_init(&b, n) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (submit_one(fn, PySequence_Fast_GET_ITEM(seq, i), kwlist_obj, i, b.base) < 0) {
            b.n = i;       /* wait for what went out, then report the submit error */
            PyObject *exc = PyErr_GetRaisedException();
            wait_batch(&b);
            PyErr_Clear();
            PyErr_SetRaisedException(exc);
            goto done;
        }
    }
    if (wait_batch(&b) == 0)
        result = batch_results(&b, return_exceptions);
done:
    batch_clear(&b);
    Py_DECREF(seq);
    return result;
}

/* ---- the thread pool ------------------------------------------------------------------------- */

/* _threads_map(fn, arglist, kwargs=None, return_exceptions=False): submit fn(*args, **kwargs)
 * for every args in arglist (a tuple, or one non-tuple argument), then wait for all of them.
 * Results in order; a failure raises the first failed task's exception, or with
 * return_exceptions is returned in its place. */
static PyObject *
threads_map(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fn", "arglist", "kwargs", "return_exceptions", NULL};
    PyObject *fn, *arglist, *kwargs = Py_None;
    int return_exceptions = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Op:_threads_map", kwlist, &fn, &arglist,
                                     &kwargs, &return_exceptions))
        return NULL;
    if (kwargs != Py_None && !PyDict_Check(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "kwargs must be a dict or None");
        return NULL;
    }
    PyObject *items = PySequence_Fast(arglist, "arglist must be a sequence");
    if (items == NULL)
        return NULL;
    batch b = {0};
    PyObject *result = NULL, *submit_error = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items), submitted = 0;
    if (batch_init(&b, n) < 0)
        goto done;
    for (; submitted < n; submitted++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, submitted);
        PyObject *call_args = PyTuple_Check(item) ? Py_NewRef(item) : PyTuple_Pack(1, item);
        PyObject *call = call_args ? PyTuple_Pack(2, call_args, kwargs) : NULL;
        Py_XDECREF(call_args);
        int rc = -1;
        if (call != NULL) {
            exec_task t = {.task_id = b.base + (uint64_t)submitted, .fn = fn, .call = call};
            rc = exec_submit(EXEC_THREADS, &t);
            Py_DECREF(call);
        }
        if (rc < 0) {
            submit_error = PyErr_GetRaisedException();
            break;
        }
    }
    b.n = submitted;   /* wait for what went out, even after a submit error */
    if (wait_batch(&b) < 0)
        goto done;
    if (submit_error != NULL) {
        PyErr_SetRaisedException(submit_error);
        submit_error = NULL;
        goto done;
    }
    result = batch_results(&b, return_exceptions);
done:
    Py_XDECREF(submit_error);
    batch_clear(&b);
    Py_DECREF(items);
    return result;
}

/* _threads_submit(task_id, fn, args=(), kwargs=None): one thread task with a chosen id. */
static PyObject *
threads_submit(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"task_id", "fn", "args", "kwargs", NULL};
    unsigned long long task_id;
    PyObject *fn, *call_args = NULL, *kwargs = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KO|O!O:_threads_submit", kwlist, &task_id, &fn,
                                     &PyTuple_Type, &call_args, &kwargs))
        return NULL;
    if (kwargs != Py_None && !PyDict_Check(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "kwargs must be a dict or None");
        return NULL;
    }
    PyObject *empty = call_args == NULL ? PyTuple_New(0) : NULL;
    if (call_args == NULL && empty == NULL)
        return NULL;
    PyObject *call = PyTuple_Pack(2, call_args ? call_args : empty, kwargs);
    Py_XDECREF(empty);
    if (call == NULL)
        return NULL;
    exec_task t = {.task_id = task_id, .fn = fn, .call = call};
    int rc = exec_submit(EXEC_THREADS, &t);
    Py_DECREF(call);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _threads_drain() -> [(task_id, failed, result or exception)]: what finished, without waiting
 * (one exec_poll with timeout 0). */
static PyObject *
threads_drain(PyObject *self, PyObject *unused)
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    exec_completion out[64];
    int n;
    do {
        n = exec_poll(0, out, 64);
        if (n < 0) {
            Py_DECREF(list);
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            exec_completion *c = &out[i];
            PyObject *obj = c->object != NULL ? c->object : Py_NewRef(Py_None);
            exec_blob_decref(c->blob);
            PyObject *item = Py_BuildValue("(KON)", (unsigned long long)c->task_id,
                                           c->failed ? Py_True : Py_False, obj);
            if (item == NULL || PyList_Append(list, item) < 0) {
                Py_XDECREF(item);
                for (int j = i + 1; j < n; j++) {
                    exec_blob_decref(out[j].blob);
                    Py_XDECREF(out[j].object);
                }
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(item);
        }
    } while (n == 64);
    return list;
}

/* _threads_cancel(ids) */
static PyObject *
threads_cancel(PyObject *self, PyObject *ids)
{
    PyObject *seq = PySequence_Fast(ids, "ids must be a sequence of task ids");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *v = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (v == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        v[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            PyMem_Free(v);
            Py_DECREF(seq);
            return NULL;
        }
    }
    exec_cancel(v, n);
    PyMem_Free(v);
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *
threads_cancel_all(PyObject *self, PyObject *unused)
{
    exec__thread_backend.cancel(NULL, 0);
    Py_RETURN_NONE;
}

static PyObject *
threads_stats(PyObject *self, PyObject *unused)
{
    return exec__threads_info();
}

static PyObject *
threads_set_post_pause(PyObject *self, PyObject *arg)
{
    long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred())
        return NULL;
    if (us < 0 || us > 1000000) {
        PyErr_Format(PyExc_ValueError, "_threads_set_post_pause: %ld us is not from 0 to 1e6", us);
        return NULL;
    }
    atomic_store(&exec__threads_post_pause_us, (int)us);
    Py_RETURN_NONE;
}

static PyObject *
threads_shutdown(PyObject *self, PyObject *unused)
{
    exec__thread_backend.shutdown(1);
    Py_RETURN_NONE;
}

static PyObject *
threads_ffi_version(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(exec_ffi_version());
}

/* _exec_worker_ring() -> {"address", "capacity", "head", "tail", "data", "arena", "arena_size"}:
 * in a worker, where its result ring lives (tests scribble on it like a buggy extension). */
static PyObject *
core_exec_worker_ring(PyObject *self, PyObject *unused)
{
    if (!exec__in_worker_flag || exec__shared == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_exec_worker_ring: not in a pydron worker");
        return NULL;
    }
    ring *r = exec__to_master(exec__worker_slot);
    arena_stats st;
    arena_get_stats(exec__arena, &st);
    return Py_BuildValue("{s:K,s:K,s:n,s:n,s:n,s:K,s:K}", "address", (unsigned long long)(uintptr_t)r,
                         "capacity", (unsigned long long)r->capacity,
                         "head", (Py_ssize_t)offsetof(ring, head),
                         "tail", (Py_ssize_t)offsetof(ring, tail),
                         "data", (Py_ssize_t)offsetof(ring, data),
                         "arena", (unsigned long long)(uintptr_t)exec__arena,
                         "arena_size", (unsigned long long)(st.total_pages * ARENA_PAGE));
}

/* What a C pickler of small values answered (rc, data, len as exec__scalars_dump gives them):
 * its bytes, None when it left the value to the general pickler, or NULL + exception. */
static PyObject *
scalars_answer(int rc, const char *data, size_t len)
{
    if (rc < 0)
        return NULL;
    if (rc == 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
}

/* _exec_scalars_dump(obj) -> bytes | None: what the C fast path writes for a result (None when
 * it leaves obj to the general pickler); _exec_scalars_load(bytes) -> value | NotImplemented. */
static PyObject *
core_scalars_dump(PyObject *self, PyObject *obj)
{
    const char *data = NULL;
    size_t len = 0;
    int rc = exec__scalars_dump(obj, &data, &len);
    return scalars_answer(rc, data, len);
}

static PyObject *
core_scalars_dump_call(PyObject *self, PyObject *args)
{
    if (!PyTuple_Check(args)) {
        PyErr_SetString(PyExc_TypeError, "_exec_scalars_dump_call expects the args tuple");
        return NULL;
    }
    const char *data = NULL;
    size_t len = 0;
    int rc = exec__scalars_dump_call(args, &data, &len);
    return scalars_answer(rc, data, len);
}

static PyObject *
core_scalars_load(PyObject *self, PyObject *bytes)
{
    if (!PyBytes_Check(bytes)) {
        PyErr_SetString(PyExc_TypeError, "_exec_scalars_load expects bytes");
        return NULL;
    }
    PyObject *v = exec__scalars_load(PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
    if (v == NULL && !PyErr_Occurred())
        Py_RETURN_NOTIMPLEMENTED;
    return v;
}

static PyObject *
core_exec_stats(PyObject *self, PyObject *unused)
{
    return exec_stats();
}

static PyMethodDef testing_methods[] = {
    {"_exec_in_worker", core_exec_in_worker, METH_NOARGS, "True in a pydron worker process."},
    {"_exec_start", core_exec_start, METH_VARARGS,
     "Start the process pool (n workers, 0: one per core)."},
    {"_exec_shutdown", core_exec_shutdown, METH_NOARGS, "Stop the process pool."},
    {"_exec_cancel_all", core_exec_cancel_all, METH_NOARGS,
     "Forget every queued and running task of both pools."},
    {"_exec_info", core_exec_info, METH_NOARGS, "Process pool state: pids, arena accounting."},
    {"_exec_stats", core_exec_stats, METH_NOARGS, "Every executor's state."},
    {"_exec_scalars_dump", core_scalars_dump, METH_O, "The C pickler of small results."},
    {"_exec_scalars_dump_call", core_scalars_dump_call, METH_O,
     "The C pickler of calls with small arguments: pickle of (args, None)."},
    {"_exec_scalars_load", core_scalars_load, METH_O, "The C unpickler of small results."},
    {"_exec_worker_ring", core_exec_worker_ring, METH_NOARGS,
     "In a worker: where its result ring lives (for tests that scribble on it)."},
    {"_exec_map", (PyCFunction)(void (*)(void))core_exec_map, METH_VARARGS | METH_KEYWORDS,
     "_exec_map(fn, args_list, kwargs_list=None, return_exceptions=False): run on workers."},
    {"_exec_submit", core_exec_submit, METH_VARARGS,
     "_exec_submit(fn, args, kwargs=None) -> handle; handles in args become dependencies."},
    {"_exec_wait", core_exec_wait, METH_O, "_exec_wait(handle) -> the task's value."},
    {"_threads_map", (PyCFunction)(void (*)(void))threads_map, METH_VARARGS | METH_KEYWORDS,
     "_threads_map(fn, arglist, kwargs=None, return_exceptions=False) -> list"},
    {"_threads_submit", (PyCFunction)(void (*)(void))threads_submit, METH_VARARGS | METH_KEYWORDS,
     "_threads_submit(task_id, fn, args=(), kwargs=None)"},
    {"_threads_drain", threads_drain, METH_NOARGS,
     "_threads_drain() -> [(task_id, failed, object)] finished since the last call"},
    {"_threads_cancel", threads_cancel, METH_O, "_threads_cancel(ids): exec_cancel."},
    {"_threads_cancel_all", threads_cancel_all, METH_NOARGS, "Forget queued and running tasks."},
    {"_threads_stats", threads_stats, METH_NOARGS, "Thread pool counters."},
    {"_threads_set_post_pause", threads_set_post_pause, METH_O,
     "_threads_set_post_pause(us): pool threads pause after posting a result (tests)."},
    {"_threads_shutdown", threads_shutdown, METH_NOARGS, "Join the pool's threads."},
    {"_threads_ffi_version", threads_ffi_version, METH_NOARGS, "libffi version string."},
    {NULL},
};

int
exec__testing_module_init(PyObject *module)
{
    if (PyType_Ready(&Handle_Type) < 0)
        return -1;
    pending_handles = PyDict_New();
    if (pending_handles == NULL)
        return -1;
    return PyModule_AddFunctions(module, testing_methods);
}
