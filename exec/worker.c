/* exec/worker.c — a worker process: forked by the fork server, it runs one loop in C: read a
 * record from its ring (a function definition or a task), run it, write the result back.
 * Thread and GIL model: single-threaded (user code may start threads); the GIL is released only
 * while the worker sleeps waiting for records or for room in its result ring. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/internal.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

/* Results not yet signalled to the master: a worker running a stream of tiny tasks wakes a
 * sleeping master at most every WAKE_INTERVAL_NS (and always before it sleeps itself), instead
 * of paying a futex wake-up per result. */
#define WAKE_INTERVAL_NS 50000
#define SPINS_BEFORE_SLEEP 300
#define SLEEP_NS 1000000000       /* between two looks at the ring while idle */
#define FULL_RING_SLEEP_NS 100000000

/* Exit codes of a worker that cannot go on (seen by the master as its death status). */
enum {
    WORKER_EXIT_NO_CODEC = 73,
    WORKER_EXIT_NO_MEMORY = 74,
    WORKER_EXIT_WIRE_VERSION = 75,
    WORKER_EXIT_BAD_RING = 76,
};

static int my_slot;
static exec_codec *codec;
static PyObject **fns;          /* fn id -> function, or the exception that defining it raised */
static char *fn_failed;
static size_t fns_cap;
static int unsignalled;
static uint64_t last_signal_ns;

static void
signal_master(void)
{
    unsignalled = 0;
    last_signal_ns = pydron_now_ns();
    wake_notify(&exec__shared->master);
}

static void
wait_for_records(ring *in)
{
    if (unsignalled)
        signal_master();
    for (int k = 0; k < SPINS_BEFORE_SLEEP; k++) {
        if (!ring_empty(in))
            return;
        __builtin_ia32_pause();
    }
    /* Going to sleep: what tasks printed should not wait in a buffer for a SIGKILL. */
    exec__flush_std_streams();
    uint32_t seen = wake_prepare(&in->readable);
    if (!ring_empty(in)) {
        wake_cancel(&in->readable);
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    wake_wait(&in->readable, seen, SLEEP_NS);
    Py_END_ALLOW_THREADS
}

/* Room in the result ring: begin a record there (or in the arena), waiting for the master to read
 * while the ring is full. NULL only when the arena is full. */
static void *
begin_result(wire_out *o, ring *out, uint32_t kind, size_t n)
{
    int full;
    void *dst = wire_begin(o, out, exec__arena, kind, n, &full);
    while (dst == NULL && !full) {
        signal_master();
        uint32_t seen = wake_prepare(&out->writable);
        if ((dst = wire_begin(o, out, exec__arena, kind, n, &full)) != NULL || full) {
            wake_cancel(&out->writable);
            break;
        }
        Py_BEGIN_ALLOW_THREADS
        wake_wait(&out->writable, seen, FULL_RING_SLEEP_NS);
        Py_END_ALLOW_THREADS
    }
    return dst;
}

/* Publish a begun result record, waiting for room for its INDIRECT record if needed. */
static void
finish_result(wire_out *o, ring *out)
{
    while (wire_finish(o) < 0) {
        signal_master();
        uint32_t seen = wake_prepare(&out->writable);
        if (wire_finish(o) == 0) {
            wake_cancel(&out->writable);
            return;
        }
        Py_BEGIN_ALLOW_THREADS
        wake_wait(&out->writable, seen, FULL_RING_SLEEP_NS);
        Py_END_ALLOW_THREADS
    }
}

/* Send a RESULT or ERROR record of task_id carrying a blob (its references go with the record;
 * with c, they are the codec's output, recorded in the held table until the record is
 * published). 0, or -1 when the arena has no room for the record (nothing was sent; the
 * references are the caller's still). */
static int
send_blob(ring *out, uint32_t kind, uint64_t task_id, uint64_t elapsed_ns, const char *data,
          size_t len, const wire_buf *bufs, uint32_t nbufs, exec_codec *c)
{
    arena *a = exec__arena;
    uint64_t data_blk = WIRE_NO_BLOCK;
    int64_t data_held = -1, record_held = -1;
    if (len > EXEC_INLINE_MAX) {
        if (arena_alloc(a, len, &data_blk) < 0)
            return -1;
        data_held = held_add(data_blk);
        memcpy(arena_ptr(a, data_blk), data, len);
    }
    size_t n = sizeof(wire_result) + (size_t)wire_blob_size(len, nbufs, data_blk == WIRE_NO_BLOCK);
    wire_out o;
    char *dst = begin_result(&o, out, kind, n);
    if (dst == NULL) {
        if (data_blk != WIRE_NO_BLOCK) {
            held_forget(data_held);
            arena_decref(a, data_blk);
        }
        return -1;
    }
    if (o.blk != WIRE_NO_BLOCK)
        record_held = held_add(o.blk);
    wire_result *hdr = (wire_result *)dst;
    hdr->task_id = task_id;
    hdr->elapsed_ns = elapsed_ns;
    wire_write_blob(dst + sizeof(wire_result), data, len, data_blk, data_blk, bufs, nbufs);
    /* From here the record owns the references: a death before it is published leaks them,
     * never frees them early. */
    if (c)
        exec__codec_forget_held(c);
    held_forget(data_held);
    held_forget(record_held);
    finish_result(&o, out);
    return 0;
}

/* Send an ERROR record for exc (stolen) raised by fn. */
static void
send_error(ring *out, uint64_t task_id, PyObject *exc, PyObject *fn)
{
    PyObject *data = exec__pickle_exception(exc, fn);
    Py_DECREF(exc);
    if (data == NULL) {
        PyErr_Clear();
        data = PyBytes_FromString("");    /* decodes to an error in the master: still reported */
        if (data == NULL)
            _exit(WORKER_EXIT_NO_MEMORY);
    }
    if (send_blob(out, WIRE_ERROR, task_id, 0, PyBytes_AS_STRING(data),
                  (size_t)PyBytes_GET_SIZE(data), NULL, 0, NULL) < 0)
        send_blob(out, WIRE_ERROR, task_id, 0, "", 0, NULL, 0, NULL);   /* arena full: say so */
    Py_DECREF(data);
}

/* Pickle result into a RESULT record. 0, or -1 + exception (nothing sent). Borrows result. */
static int
send_result(ring *out, uint64_t task_id, PyObject *result, uint64_t elapsed_ns)
{
    const char *data;
    size_t len;
    wire_buf *bufs;
    uint32_t nbufs;
    int fast = exec__scalars_dump(result, &data, &len);
    if (fast < 0)
        return -1;
    if (fast)
        return send_blob(out, WIRE_RESULT, task_id, elapsed_ns, data, len, NULL, 0, NULL) == 0
                   ? 0 : (PyErr_NoMemory(), -1);
    if (exec__codec_dump(codec, result, NULL, NULL, &data, &len, &bufs, &nbufs) < 0)
        return -1;
    int rc = send_blob(out, WIRE_RESULT, task_id, elapsed_ns, data, len, bufs, nbufs, codec);
    if (rc < 0) {
        exec__codec_forget_held(codec);
        exec__bufs_release(exec__arena, bufs, nbufs);
        PyErr_Format(PyExc_MemoryError, "pydron: shared arena full (result of %zu bytes)", len);
    }
    exec__codec_reset(codec);
    return rc;
}

/* PYDRON_CHECK: digests of a task's arguments (pydron/_exec_helpers.py), or NULL when they
 * cannot be taken (never an error: the check is advice). New reference. */
static PyObject *
check_digests(PyObject *call, int chunk)
{
    PyObject *args[2] = {call, chunk ? Py_True : Py_False};
    PyObject *d = exec__call_helper("argument_digests", args, 2);
    if (d == NULL)
        PyErr_Clear();
    return d;
}

/* PYDRON_CHECK, after the task ran: if it changed an argument, a NOTE record naming the
 * function and the argument goes to the master (before the task's result). Steals before. */
static void
check_report(ring *out, uint64_t task_id, PyObject *fn, PyObject *call, PyObject *before,
             int chunk)
{
    PyObject *args[4] = {fn, call, before, chunk ? Py_True : Py_False};
    PyObject *note = exec__call_helper("changed_arguments", args, 4);
    Py_DECREF(before);
    if (note != NULL && PyBytes_Check(note))
        send_blob(out, WIRE_NOTE, task_id, 0, PyBytes_AS_STRING(note),
                  (size_t)PyBytes_GET_SIZE(note), NULL, 0, NULL);
    Py_XDECREF(note);
    PyErr_Clear();
}

/* Steals fn. */
static int
store_function(uint64_t id, PyObject *fn, int failed)
{
    if (id >= fns_cap) {
        size_t cap = fns_cap ? fns_cap : 64;
        while (cap <= id)
            cap *= 2;
        PyObject **f = PyMem_RawRealloc(fns, cap * sizeof(PyObject *));
        if (f == NULL)
            return -1;
        fns = f;
        char *ff = PyMem_RawRealloc(fn_failed, cap);
        if (ff == NULL)
            return -1;
        fn_failed = ff;
        memset(fns + fns_cap, 0, (cap - fns_cap) * sizeof(PyObject *));
        memset(fn_failed + fns_cap, 0, cap - fns_cap);
        fns_cap = cap;
    }
    Py_XSETREF(fns[id], fn);
    fn_failed[id] = (char)failed;
    return 0;
}

/* Decode a TASK record's call: (args, kwargs), dependencies first (persistent id i is
 * dependency i). New reference, NULL + exception. */
static PyObject *
decode_call(const char *rec, size_t len)
{
    const wire_task *hdr = (const wire_task *)rec;
    const char *p = rec + sizeof(wire_task), *end = rec + len;
    PyObject *deps = NULL, *call = NULL;
    wire_blob_view view;
    size_t used;
    const char *err;
    if (hdr->ndeps) {
        deps = PyTuple_New(hdr->ndeps);
        if (deps == NULL)
            return NULL;
        for (uint32_t i = 0; i < hdr->ndeps; i++) {
            if ((err = wire_check_blob(p, (size_t)(end - p), exec__arena, &view, &used)) != NULL)
                goto malformed;
            PyObject *v = exec__decode_view(&view, NULL);
            if (v == NULL)
                goto done;
            PyTuple_SET_ITEM(deps, (Py_ssize_t)i, v);
            p += used;
        }
    }
    if ((err = wire_check_blob(p, (size_t)(end - p), exec__arena, &view, &used)) != NULL)
        goto malformed;
    call = exec__decode_view(&view, deps);
    goto done;
malformed:
    PyErr_Format(PyExc_RuntimeError, "pydron: malformed task record: %s", err);
done:
    Py_XDECREF(deps);
    return call;
}

/* A map's chunk: fn(*args) for every args tuple of calls, in order: ("ok", [results]), or at
 * the first failure ("err", index, pickled exception), since plain Python would not have made
 * the calls after it. New reference, or NULL + exception (calls is not a list of tuples). */
static PyObject *
run_chunk(PyObject *fn, PyObject *calls)
{
    /* (calls,), or (values, 1): one argument per call (exec/wire.h WIRE_TASK_CHUNK) */
    Py_ssize_t form = PyTuple_Check(calls) ? PyTuple_GET_SIZE(calls) : 0;
    if ((form != 1 && form != 2) || !PyList_Check(PyTuple_GET_ITEM(calls, 0))) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: malformed chunk of a map");
        return NULL;
    }
    int flat = form == 2;
    calls = PyTuple_GET_ITEM(calls, 0);
    Py_ssize_t n = PyList_GET_SIZE(calls);
    PyObject *results = PyList_New(0);
    if (results == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *args = PyList_GET_ITEM(calls, i);
        PyObject *r = flat ? PyObject_CallOneArg(fn, args)
                           : PyTuple_Check(args) ? PyObject_Call(fn, args, NULL) : NULL;
        if (r == NULL) {
            if (!flat && !PyTuple_Check(args))
                PyErr_SetString(PyExc_TypeError, "pydron: a map's call is not a tuple");
            PyObject *exc = PyErr_GetRaisedException();
            PyObject *data = exec__pickle_exception(exc, fn);
            Py_DECREF(exc);
            Py_DECREF(results);
            return data ? Py_BuildValue("(snN)", "err", i, data) : NULL;
        }
        if (PyList_Append(results, r) < 0) {
            Py_DECREF(r);
            Py_DECREF(results);
            return NULL;
        }
        Py_DECREF(r);
    }
    return Py_BuildValue("(sN)", "ok", results);
}

/* Run the task of a TASK record and send its outcome; consumes the record. */
static void
run_task(wire_in *in, ring *out, const char *rec, size_t len)
{
    exec_slot *slot = &exec__shared->slots[my_slot];
    if (len < sizeof(wire_task)) {
        wire_done(in);
        return;
    }
    const wire_task *hdr = (const wire_task *)rec;
    uint64_t task_id = hdr->task_id, fn_id = hdr->fn_id;
    uint32_t hdr_flags = hdr->flags;
    atomic_store(&slot->running_since_ns, pydron_now_ns());
    atomic_store(&slot->running_task, task_id);
    PyObject *call = decode_call(rec, len), *result = NULL, *exc = NULL;
    wire_done(in);     /* everything needed is decoded (arena buffers hold their own refs) */
    PyObject *fn = fn_id < fns_cap ? fns[fn_id] : NULL;
    if (call == NULL) {
        if (fn != NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
            PyObject *err = PyErr_GetRaisedException();
            PyObject *args[2] = {fn, err};
            exec__raise_from_helper("undecodable_arguments", args, 2);
            Py_DECREF(err);
        }
        goto failed;
    }
    if (fn == NULL) {
        PyErr_Format(PyExc_RuntimeError, "pydron: worker has no function %llu",
                     (unsigned long long)fn_id);
        goto failed;
    }
    if (fn_failed[fn_id]) {               /* unpickling the function raised: that is the error */
        exc = Py_NewRef(fn);
        fn = Py_None;
        goto send_exc;
    }
    if (!PyTuple_Check(call) || PyTuple_GET_SIZE(call) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(call, 0))) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: malformed task arguments");
        goto failed;
    }
    PyObject *kwargs = PyTuple_GET_ITEM(call, 1);
    PyObject *digests = exec__options.check
                            ? check_digests(call, hdr_flags & WIRE_TASK_CHUNK) : NULL;
    uint64_t t0 = pydron_now_ns();
    if (hdr_flags & WIRE_TASK_CHUNK)
        result = run_chunk(fn, PyTuple_GET_ITEM(call, 0));
    else
        result = PyObject_Call(fn, PyTuple_GET_ITEM(call, 0), kwargs == Py_None ? NULL : kwargs);
    uint64_t elapsed = pydron_now_ns() - t0;
    if (digests != NULL) {
        PyObject *err = PyErr_GetRaisedException();
        check_report(out, task_id, fn, call, digests, hdr_flags & WIRE_TASK_CHUNK);
        PyErr_SetRaisedException(err);
    }
    if ((hdr_flags & WIRE_TASK_CHUNK) && PyTuple_GET_SIZE(PyTuple_GET_ITEM(call, 0)) >= 1 &&
        PyList_Check(PyTuple_GET_ITEM(PyTuple_GET_ITEM(call, 0), 0))) {
        /* The estimate is per call of fn, not per chunk. */
        Py_ssize_t calls = PyList_GET_SIZE(PyTuple_GET_ITEM(PyTuple_GET_ITEM(call, 0), 0));
        elapsed /= (uint64_t)(calls > 0 ? calls : 1);
    }
    Py_CLEAR(call);
    if (result == NULL)
        goto failed;
    if (send_result(out, task_id, result, elapsed) == 0)
        goto done;
    /* The result cannot be pickled: say which function and which type. */
    {
        PyObject *err = PyErr_GetRaisedException();
        PyObject *args[3] = {fn, result, err};
        exc = exec__call_helper("bad_result", args, 3);
        Py_XDECREF(err);
        if (exc == NULL)
            goto failed;
        goto send_exc;
    }
failed:
    exc = PyErr_GetRaisedException();
    if (exc == NULL)
        exc = PyObject_CallFunction(PyExc_RuntimeError, "s",
                                    "pydron: the task failed without an exception");
    if (exc == NULL)
        _exit(WORKER_EXIT_NO_MEMORY);
send_exc:
    PyErr_Clear();
    send_error(out, task_id, exc, fn);
done:
    Py_XDECREF(result);
    Py_XDECREF(call);
    atomic_store(&slot->running_task, 0);
    unsignalled = 1;
    if (ring_empty(in->r) || pydron_now_ns() - last_signal_ns >= WAKE_INTERVAL_NS)
        signal_master();
}

/* A DEFINE record: the function for an id (consumes the record). */
static void
define_function(wire_in *in, const char *rec, size_t len)
{
    wire_blob_view view;
    size_t used;
    PyObject *fn = NULL;
    if (len < sizeof(wire_define)) {
        wire_done(in);
        return;
    }
    uint64_t fn_id = ((const wire_define *)rec)->fn_id;
    const char *err = wire_check_blob(rec + sizeof(wire_define), len - sizeof(wire_define),
                                      exec__arena, &view, &used);
    PyObject *shipped = err ? NULL : exec__decode_view(&view, NULL);
    wire_done(in);
    if (err)
        PyErr_Format(PyExc_RuntimeError, "pydron: malformed function record: %s", err);
    else if (shipped)
        fn = exec__call_helper("unpack_function", &shipped, 1);
    Py_XDECREF(shipped);
    int failed = fn == NULL;
    if (failed)
        fn = PyErr_GetRaisedException();
    if (fn == NULL || store_function(fn_id, fn, failed) < 0)
        _exit(WORKER_EXIT_NO_MEMORY);
}

static void worker_loop(void) __attribute__((noreturn));

static void
worker_loop(void)
{
    ring *in = exec__to_worker(my_slot), *out = exec__to_master(my_slot);
    for (;;) {
        wire_in rd;
        uint32_t kind;
        size_t len;
        const char *err;
        const char *rec = wire_next(&rd, in, in->capacity, exec__arena, &kind, &len, &err);
        if (rec == NULL) {
            if (err == NULL) {
                wait_for_records(in);
                continue;
            }
            /* The master wrote it, so this cannot happen; a ring it cannot read is the end. */
            if (rd.ring_len == UINT32_MAX)
                _exit(WORKER_EXIT_BAD_RING);
            wire_skip(&rd);
            continue;
        }
        if (kind == WIRE_DEFINE)
            define_function(&rd, rec, len);
        else if (kind == WIRE_TASK)
            run_task(&rd, out, rec, len);
        else
            wire_done(&rd);
        PyErr_Clear();
        exec__install_array_allocator();
    }
}

void
exec__worker_main(int slot)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* The fork server died between fork and prctl: our parent is init or a subreaper now. */
    if (getppid() != exec__forkserver_pid)
        _exit(0);
    if (exec__shared->wire_version != WIRE_VERSION)
        _exit(WORKER_EXIT_WIRE_VERSION);
    /* Handlers installed in the master (Python's, faulthandler's) do not belong here: a crash
     * is reported by the master, and Ctrl-C is handled by the master, which cancels. */
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction sa;
        if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &sa) != 0)
            continue;
        if (sa.sa_handler != SIG_IGN && sa.sa_handler != SIG_DFL)
            signal(sig, SIG_DFL);
    }
    signal(SIGINT, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    char name[16];
    snprintf(name, sizeof name, "pydron-w%d", slot & 0xff);
    prctl(PR_SET_NAME, name);
    my_slot = slot;
    exec__worker_slot = slot;
    exec__in_worker_flag = 1;
    atomic_store(&exec__shared->slots[slot].pid, getpid());
    held_begin(&exec__shared->slots[slot].held, exec__arena);
    /* A task's writes to its arguments stay its own (copy on write, then dropped). */
    guard_start(exec__arena, exec__arena_fd, exec__arena_size, GUARD_DISCARD);
    codec = exec__codec_new();
    if (codec == NULL)
        _exit(WORKER_EXIT_NO_CODEC);
    exec__install_array_allocator();
    /* Per-worker Python set-up (pydron/_worker_setup.py: BLAS/OpenMP thread limits). Best
     * effort: on any error the worker starts as it is, and prints nothing. */
    PyObject *setup = PyImport_ImportModule("pydron._worker_setup");
    PyObject *r = setup ? PyObject_CallMethod(setup, "start_worker", "i",
                                              (int)exec__shared->nslots) : NULL;
    Py_XDECREF(r);
    Py_XDECREF(setup);
    PyErr_Clear();
    worker_loop();
}
