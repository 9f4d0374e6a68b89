/* exec/worker.c — the fork server and the worker loop.
 * The fork server is forked by exec_start while the master is still young and single-threaded;
 * it forks workers on request (so workers never inherit the master's later threads and locks),
 * reaps them and reports their deaths in shared memory. A worker runs one loop in C: read a
 * record from its ring, run it, write the result back. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/internal.h"
#include "pydron_compat.h"
#include "pydron_options.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { CMD_SPAWN = 1, CMD_QUIT = 2 };

typedef struct {
    int32_t op, slot;
} fs_command;

/* ------------------------------------------------------------------ master side */

/* Buffered output of the master would be written twice (by it and by a child) if not flushed. */
static void flush_std_streams(void)
{
    const char *names[2] = {"stdout", "stderr"};
    for (int i = 0; i < 2; i++) {
        PyObject *f = PySys_GetObject(names[i]);   /* borrowed */
        if (f && f != Py_None) {
            PyObject *r = PyObject_CallMethod(f, "flush", NULL);
            Py_XDECREF(r);
            PyErr_Clear();
        }
    }
    fflush(NULL);
}

static void forkserver_main(int sock, pid_t master) __attribute__((noreturn));
static int fs_gc_was_enabled;

pid_t exec__forkserver_start(int *sock)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    flush_std_streams();
    pid_t master = getpid();
    PyOS_BeforeFork();
    exec__internal_fork = 1;
    pid_t pid = fork();
    exec__internal_fork = 0;
    if (pid == 0) {
        /* No collection in the fork server: finalizers of the master's objects must not run
         * there (workers get the collector back). */
        fs_gc_was_enabled = PyGC_Disable();
        PyOS_AfterFork_Child();
        close(sv[0]);
        forkserver_main(sv[1], master);
    }
    int err = errno;
    PyOS_AfterFork_Parent();
    close(sv[1]);
    if (pid < 0) {
        close(sv[0]);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    *sock = sv[0];
    return pid;
}

static int send_command(int sock, int op, int slot)
{
    fs_command c = {op, slot};
    ssize_t n;
    do
        n = send(sock, &c, sizeof c, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof c ? 0 : -1;
}

int exec__forkserver_spawn(int sock, int slot) { return send_command(sock, CMD_SPAWN, slot); }
void exec__forkserver_quit(int sock) { send_command(sock, CMD_QUIT, 0); }

/* ------------------------------------------------------------------ fork server */

static pid_t worker_pids[EXEC_MAX_WORKERS];
static int fs_sock = -1, fs_sigfd = -1;

static void worker_main(int slot) __attribute__((noreturn));
static void worker_loop(void) __attribute__((noreturn));

static void fs_spawn(int slot)
{
    if (slot < 0 || slot >= exec__shared->nslots || worker_pids[slot] > 0)
        return;
    /* As os.fork does (the child's re-initialisation expects the import lock taken here); the
     * collector stays off in the fork server, so no finalizer of the master's objects runs. */
    PyOS_BeforeFork();
    exec__internal_fork = 1;
    pid_t pid = fork();
    exec__internal_fork = 0;
    if (pid == 0) {
        PyOS_AfterFork_Child();
        if (fs_gc_was_enabled)
            PyGC_Enable();
        worker_main(slot);
    }
    PyOS_AfterFork_Parent();
    if (pid < 0) {
        /* Report it as a death, so the master sees the slot failing instead of waiting. */
        exec_slot *s = &exec__shared->slots[slot];
        atomic_store(&s->death_status, 127 << 8);
        atomic_fetch_add(&s->deaths, 1);
        atomic_fetch_add(&exec__shared->deaths, 1);
        wake_notify(&exec__shared->master);
        return;
    }
    worker_pids[slot] = pid;
    atomic_store(&exec__shared->slots[slot].pid, pid);
}

static void fs_reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < EXEC_MAX_WORKERS; i++) {
            if (worker_pids[i] != pid)
                continue;
            worker_pids[i] = 0;
            exec_slot *s = &exec__shared->slots[i];
            atomic_store(&s->pid, 0);
            atomic_store(&s->death_status, status);
            atomic_fetch_add(&s->deaths, 1);
            atomic_fetch_add(&exec__shared->deaths, 1);
            wake_notify(&exec__shared->master);
            break;
        }
    }
}

static void fs_quit(void) __attribute__((noreturn));
static void fs_quit(void)
{
    for (int i = 0; i < EXEC_MAX_WORKERS; i++)
        if (worker_pids[i] > 0)
            kill(worker_pids[i], SIGKILL);
    for (int i = 0; i < EXEC_MAX_WORKERS; i++)
        if (worker_pids[i] > 0)
            waitpid(worker_pids[i], NULL, 0);
    _exit(0);
}

/* Runs no Python: waits for commands and for SIGCHLD. Dies with the master (PDEATHSIG). */
static void forkserver_main(int sock, pid_t master)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != master)
        _exit(0);
    prctl(PR_SET_NAME, "pydron-forksrv");
    signal(SIGINT, SIG_IGN);      /* Ctrl-C is the master's business */
    signal(SIGPIPE, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    fs_sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    fs_sock = sock;
    if (fs_sigfd < 0)
        _exit(70);
    for (;;) {
        struct pollfd fds[2] = {{sock, POLLIN, 0}, {fs_sigfd, POLLIN, 0}};
        if (poll(fds, 2, 1000) < 0 && errno != EINTR)
            _exit(71);
        if (fds[1].revents) {
            struct signalfd_siginfo si;
            while (read(fs_sigfd, &si, sizeof si) > 0)
                ;
        }
        fs_reap();
        if (fds[0].revents) {
            fs_command c;
            ssize_t n = recv(sock, &c, sizeof c, 0);
            if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN))
                fs_quit();                 /* the master is gone */
            if (n == (ssize_t)sizeof c) {
                if (c.op == CMD_QUIT)
                    fs_quit();
                if (c.op == CMD_SPAWN)
                    fs_spawn(c.slot);
            }
        }
    }
}

/* ------------------------------------------------------------------ worker */

static int my_slot;
static exec_codec *codec;
static PyObject **fns;          /* fn id -> function, or the exception that defining it raised */
static char *fn_failed;
static size_t fns_cap;

/* Results not yet signalled to the master: a worker running a stream of tiny tasks wakes a
 * sleeping master at most every WAKE_INTERVAL_NS (and always before it sleeps itself), instead
 * of paying a futex wake-up per result. */
#define WAKE_INTERVAL_NS 50000
static int unsignalled;
static uint64_t last_signal_ns;

static uint64_t now_ns(void);

static void signal_master(void)
{
    unsignalled = 0;
    last_signal_ns = now_ns();
    wake_notify(&exec__shared->master);
}

static void wait_for_records(ring *in)
{
    if (unsignalled)
        signal_master();
    for (int k = 0; k < 300; k++) {
        if (!ring_empty(in))
            return;
        __builtin_ia32_pause();
    }
    /* Going to sleep: what tasks printed should not wait in a buffer for a SIGKILL. */
    flush_std_streams();
    uint32_t seen = wake_prepare(&in->readable);
    if (!ring_empty(in)) {
        wake_cancel(&in->readable);
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    wake_wait(&in->readable, seen, 1000000000);
    Py_END_ALLOW_THREADS
}

/* Room for a record in the result ring, waiting for the master to read if it is full. */
static void *reserve_result(ring *out, uint32_t len)
{
    for (;;) {
        void *p = ring_reserve(out, len);
        if (p)
            return p;
        signal_master();
        uint32_t seen = wake_prepare(&out->writable);
        if ((p = ring_reserve(out, len)) != NULL) {
            wake_cancel(&out->writable);
            return p;
        }
        Py_BEGIN_ALLOW_THREADS
        wake_wait(&out->writable, seen, 100000000);
        Py_END_ALLOW_THREADS
    }
}

static int store_function(uint64_t id, PyObject *fn, int failed)
{
    if (id >= fns_cap) {
        size_t cap = fns_cap ? fns_cap : 64;
        while (cap <= id)
            cap *= 2;
        PyObject **f = realloc(fns, cap * sizeof(PyObject *));
        char *ff = realloc(fn_failed, cap);
        if (f == NULL || ff == NULL)
            return -1;
        memset(f + fns_cap, 0, (cap - fns_cap) * sizeof(PyObject *));
        memset(ff + fns_cap, 0, cap - fns_cap);
        fns = f;
        fn_failed = ff;
        fns_cap = cap;
    }
    Py_XSETREF(fns[id], fn);
    fn_failed[id] = (char)failed;
    return 0;
}

/* Send an ERROR record for exc (consumed) raised by fn. */
static void send_error(ring *out, uint64_t task_id, PyObject *exc, PyObject *fn)
{
    PyObject *data = exec__pickle_exception(exc, fn);
    Py_DECREF(exc);
    if (data == NULL) {
        PyErr_Clear();
        data = PyBytes_FromString("");    /* decodes to an error in the master: still reported */
        if (data == NULL)
            _exit(72);
    }
    size_t len = (size_t)PyBytes_GET_SIZE(data);
    int inline_data = len <= EXEC_INLINE_MAX;
    char *dst = reserve_result(out, (uint32_t)(16 + exec__wire_size(len, 0, inline_data)));
    ((uint64_t *)dst)[0] = task_id;
    ((uint64_t *)dst)[1] = 0;
    if (exec__wire_write(dst + 16, PyBytes_AS_STRING(data), len, NULL, 0, inline_data) == 0)
        exec__wire_write(dst + 16, "", 0, NULL, 0, 1);
    Py_DECREF(data);
    ring_commit(out, EXEC_REC_ERROR);
}

/* Pickle result into a RESULT record. 0, or -1 with an exception (nothing sent). */
static int send_result(ring *out, uint64_t task_id, PyObject *result, uint64_t elapsed_ns)
{
    const char *data;
    size_t len;
    exec_buf *bufs;
    uint32_t nbufs;
    if (exec__codec_dump(codec, result, NULL, NULL, &data, &len, &bufs, &nbufs) < 0)
        return -1;
    int inline_data = len <= EXEC_INLINE_MAX;
    char *dst = reserve_result(out, (uint32_t)(16 + exec__wire_size(len, nbufs, inline_data)));
    ((uint64_t *)dst)[0] = task_id;
    ((uint64_t *)dst)[1] = elapsed_ns;
    if (exec__wire_write(dst + 16, data, len, bufs, nbufs, inline_data) == 0) {
        exec__bufs_release(exec__arena, bufs, nbufs);
        exec__codec_reset(codec);
        PyErr_Format(PyExc_MemoryError, "pydron: shared arena full (result of %zu bytes)", len);
        return -1;
    }
    exec__codec_reset(codec);
    ring_commit(out, EXEC_REC_RESULT);
    return 0;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ numpy arrays in the arena */

/* In a worker, large numpy arrays are allocated in the arena (numpy's PyDataMem_Handler, NumPy
 * >= 1.22): a result array is then sent by reference, with no copy, and temporaries reuse warm
 * arena pages instead of fresh mmaps. Small arrays and a full arena fall back to malloc. Set
 * PYDRON_ARENA_ARRAYS=0 to turn it off. The structs are NumPy's stable ABI (ndarraytypes.h). */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator;

typedef struct {
    char name[127];
    uint8_t version;
    np_allocator allocator;
} np_handler;

#define ARRAY_IN_ARENA_MIN ((size_t)256 << 10)
#define NP_API_SET_HANDLER 304          /* PyDataMem_SetHandler in NumPy's C-API table */
#define NP_API_FEATURE_VERSION 211      /* PyArray_GetNDArrayCFeatureVersion */
#define NP_1_22_API_VERSION 0xf

static void *arena_array(size_t size)
{
    arena *a = exec__arena;
    uint64_t blk;
    if (a == NULL || size < ARRAY_IN_ARENA_MIN || arena_alloc(a, size, &blk) < 0)
        return NULL;
    exec__held_add(blk);
    return arena_ptr(a, blk);
}

static void np_free(void *ctx, void *ptr, size_t size)
{
    arena *a = exec__arena;
    uint64_t blk;
    size_t blen;
    if (ptr && a && arena_contains(a, ptr) && arena_block_of(a, ptr, &blk, &blen) == 0) {
        exec__held_drop(blk);
        arena_decref(a, blk);
        return;
    }
    free(ptr);
}

static void *np_malloc(void *ctx, size_t size)
{
    void *p = arena_array(size);
    return p ? p : malloc(size ? size : 1);
}

static void *np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (elsize && nelem > SIZE_MAX / elsize)
        return NULL;
    void *p = arena_array(nelem * elsize);
    if (p) {
        memset(p, 0, nelem * elsize);   /* reused pages are not zero */
        return p;
    }
    return calloc(nelem ? nelem : 1, elsize ? elsize : 1);
}

static void *np_realloc(void *ctx, void *ptr, size_t new_size)
{
    arena *a = exec__arena;
    uint64_t blk;
    size_t blen;
    if (ptr && a && arena_contains(a, ptr) && arena_block_of(a, ptr, &blk, &blen) == 0) {
        size_t avail = blen - (size_t)((char *)ptr - (char *)arena_ptr(a, blk));
        if (new_size <= avail)
            return ptr;
        void *q = np_malloc(ctx, new_size);
        if (q == NULL)
            return NULL;
        memcpy(q, ptr, avail);
        np_free(ctx, ptr, 0);
        return q;
    }
    return realloc(ptr, new_size ? new_size : 1);
}

static np_handler arena_handler = {
    "pydron_arena", 1, {NULL, np_malloc, np_calloc, np_realloc, np_free},
};

static int arrays_state;   /* 0: numpy not seen yet, 1: installed, -1: not possible or off */

/* Install the handler once numpy is imported in this worker (checked between tasks). */
static void install_array_allocator(void)
{
    if (arrays_state != 0)
        return;
    PyObject *modules = PySys_GetObject("modules");   /* borrowed */
    PyObject *umath = NULL;
    if (modules) {
        umath = PyDict_GetItemString(modules, "numpy._core._multiarray_umath");
        if (umath == NULL)
            umath = PyDict_GetItemString(modules, "numpy.core._multiarray_umath");
    }
    if (umath == NULL)
        return;                         /* not imported (yet) */
    arrays_state = -1;
    if (!pydron_opt_arena_arrays)
        return;
    PyObject *cap = PyObject_GetAttrString(umath, "_ARRAY_API");
    void **api = cap && PyCapsule_CheckExact(cap) ? PyCapsule_GetPointer(cap, NULL) : NULL;
    Py_XDECREF(cap);
    if (api == NULL) {
        PyErr_Clear();
        return;
    }
    unsigned (*feature_version)(void) = (unsigned (*)(void))api[NP_API_FEATURE_VERSION];
    if (feature_version() < NP_1_22_API_VERSION)
        return;
    PyObject *handler = PyCapsule_New(&arena_handler, "mem_handler", NULL);
    PyObject *(*set_handler)(PyObject *) = (PyObject * (*)(PyObject *)) api[NP_API_SET_HANDLER];
    PyObject *old = handler ? set_handler(handler) : NULL;
    Py_XDECREF(handler);
    if (old == NULL) {
        PyErr_Clear();
        return;
    }
    Py_DECREF(old);
    arrays_state = 1;
}

/* A TASK record: [task id][fn id][ndeps] then the dependency blobs and the arguments blob.
 * Dependencies are decoded first; persistent id i in the arguments is dependency i. */
static void run_task(ring *in, ring *out, const char *rec)
{
    exec_slot *slot = &exec__shared->slots[my_slot];
    const uint64_t *hdr = (const uint64_t *)rec;
    uint64_t task_id = hdr[0], fn_id = hdr[1], ndeps = hdr[2];
    atomic_store(&slot->running_task, task_id);
    const char *p = rec + 24;
    PyObject *deps = NULL, *loader = NULL, *call = NULL, *result = NULL, *exc = NULL;
    PyObject *fn = fn_id < fns_cap ? fns[fn_id] : NULL;
    size_t used;
    if (ndeps) {
        deps = PyTuple_New((Py_ssize_t)ndeps);
        for (uint64_t i = 0; deps && i < ndeps; i++) {
            PyObject *v = exec__wire_decode(p, &used, NULL);
            if (v == NULL) {
                Py_CLEAR(deps);
                break;
            }
            PyTuple_SET_ITEM(deps, (Py_ssize_t)i, v);
            p += used;
        }
        if (deps)
            loader = exec__codec_loader(codec, deps);
        if (loader)
            call = exec__wire_decode(p, &used, loader);
    } else {
        call = exec__wire_decode(p, &used, NULL);
    }
    ring_pop(in);     /* everything needed is decoded (arena buffers hold their own refs) */
    Py_XDECREF(loader);
    Py_XDECREF(deps);
    if (loader)
        Py_XDECREF(exec__codec_loader(codec, NULL));
    if (call == NULL)
        goto failed;
    if (fn == NULL) {
        PyErr_Format(PyExc_RuntimeError, "pydron: worker has no function %llu", (unsigned long long)fn_id);
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
    uint64_t t0 = now_ns();
    result = PyObject_Call(fn, PyTuple_GET_ITEM(call, 0), kwargs == Py_None ? NULL : kwargs);
    uint64_t elapsed = now_ns() - t0;
    Py_CLEAR(call);
    if (result == NULL)
        goto failed;
    if (send_result(out, task_id, result, elapsed) == 0)
        goto done;
    /* The result cannot be pickled: say which function and which type. */
    {
        PyObject *err = PyErr_GetRaisedException();
        PyObject *args[3] = {fn, result, err};
        PyObject *f = exec__helper("bad_result");
        exc = f ? PyObject_Vectorcall(f, args, 3, NULL) : NULL;
        Py_XDECREF(err);
        if (exc == NULL)
            goto failed;
        goto send_exc;
    }
failed:
    exc = PyErr_GetRaisedException();
    if (exc == NULL)
        exc = PyObject_CallOneArg(PyExc_RuntimeError, Py_None);
send_exc:
    PyErr_Clear();
    send_error(out, task_id, exc, fn);
done:
    Py_XDECREF(result);
    Py_XDECREF(call);
    atomic_store(&slot->running_task, 0);
    unsignalled = 1;
    if (ring_empty(in) || now_ns() - last_signal_ns >= WAKE_INTERVAL_NS)
        signal_master();
}

/* A DEFINE record: [fn id] then the pickled function. */
static void define_function(ring *in, const char *rec)
{
    uint64_t fn_id = ((const uint64_t *)rec)[0];
    size_t used;
    PyObject *shipped = exec__wire_decode(rec + 8, &used, NULL);
    ring_pop(in);
    PyObject *unpack = shipped ? exec__helper("unpack_function") : NULL;
    PyObject *fn = unpack ? PyObject_CallOneArg(unpack, shipped) : NULL;
    Py_XDECREF(shipped);
    int failed = fn == NULL;
    if (failed)
        fn = PyErr_GetRaisedException();
    if (fn == NULL || store_function(fn_id, fn, failed) < 0)
        _exit(74);
}

static void worker_loop(void)
{
    ring *in = exec__to_worker(my_slot), *out = exec__to_master(my_slot);
    for (;;) {
        uint32_t kind, len;
        const char *rec = ring_peek(in, &kind, &len);
        if (rec == NULL) {
            wait_for_records(in);
            continue;
        }
        if (kind == EXEC_REC_DEFINE)
            define_function(in, rec);
        else if (kind == EXEC_REC_TASK)
            run_task(in, out, rec);
        else
            ring_pop(in);
        PyErr_Clear();
        install_array_allocator();
    }
}


static void worker_main(int slot)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (fs_sock >= 0)
        close(fs_sock);
    if (fs_sigfd >= 0)
        close(fs_sigfd);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (getppid() == 1)
        _exit(0);
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
    codec = exec__codec_new();
    if (codec == NULL)
        _exit(73);
    install_array_allocator();
    /* ---- per-worker Python setup: pydron/_worker_setup.py (BLAS/OpenMP thread limits).
     * Best effort: on any error the worker starts as it is, and prints nothing. */
    {
        PyObject *setup = PyImport_ImportModule("pydron._worker_setup");
        PyObject *r = setup ? PyObject_CallMethod(setup, "start_worker", "i",
                                                  (int)exec__shared->nslots) : NULL;
        Py_XDECREF(r);
        Py_XDECREF(setup);
        PyErr_Clear();
    }
    /* ---- end of per-worker Python setup */
    worker_loop();
}
