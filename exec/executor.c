/* exec/executor.c — the executor interface of exec.h over the executors (the process pool in
 * pool.c and pool_collect.c, the thread pool in threads.c): submission by kind, one completion
 * queue that exec_poll fills from every executor and hands out, the word the master sleeps on,
 * cancel, shutdown.
 * Thread and GIL model: everything here runs with the GIL held, except the sleep in exec_poll
 * (GIL released) and exec__notify_master, which pool threads call without it. */
#include "exec/internal.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

exec_shared *exec__shared;
arena *exec__arena;
int exec__arena_fd = -1;
size_t exec__arena_size;
int exec__in_worker_flag;
int exec__worker_slot = -1;
int exec__internal_fork;
int exec__user_fork_child;
int exec__in_forkserver;
unsigned exec__fork_generation;
_Atomic Py_ssize_t exec__live_arena_refs;
exec_options exec__options = {.thread_workers = 0, .arena_arrays = 1};

/* Spin this many pause instructions before sleeping: a result is often microseconds away. */
#define POLL_SPINS 200
/* Longest sleep between two looks at signals (Ctrl-C) and at the executors' health. */
#define POLL_SLEEP_MAX_S 0.05

/* The remote kind's slot holds this until a cluster is attached: it runs nothing. */
static int none_submit(const exec_task *t)
{
    PyErr_SetString(PyExc_RuntimeError, "pydron: no cluster is attached");
    return -1;
}
static int none_int(void) { return 0; }
static void none_cancel(const uint64_t *ids, Py_ssize_t n) {}
static Py_ssize_t none_outstanding(void) { return 0; }
static void none_shutdown(int with_python) {}

static const exec_backend no_backend = {
    .name = "none", .submit = none_submit, .collect = none_int, .ready = none_int,
    .check = none_int, .cancel = none_cancel, .outstanding = none_outstanding,
    .shutdown = none_shutdown,
};

static const exec_backend *backends[EXEC_NKINDS] = {
    [EXEC_PROCESSES] = &exec__process_backend,
    [EXEC_THREADS] = &exec__thread_backend,
    [EXEC_REMOTE] = &no_backend,
};

void
exec_register_remote(const exec_backend *b)
{
    backends[EXEC_REMOTE] = b ? b : &no_backend;
}

exec_kind
exec_task_kind(void)
{
    return backends[EXEC_REMOTE] != &no_backend ? EXEC_REMOTE : EXEC_PROCESSES;
}

int
exec_task_slots(void)
{
    const exec_backend *b = backends[exec_task_kind()];
    int n = b->slots ? b->slots() : 0;
    return n > 0 ? n : exec_nworkers();
}

PyObject *
exec__remote_fetch(PyObject *ref)
{
    const exec_backend *b = backends[EXEC_REMOTE];
    if (b->fetch == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "pydron: a cluster result is read after its cluster was detached");
        return NULL;
    }
    return b->fetch(ref);
}

/* The completion queue: a ring of exec_completion, grown on demand. GIL held. */
static struct {
    exec_completion *items;
    size_t cap, head, count;
} done;

static wake_word local_word;           /* the master's word while no pool runs */
static wake_word *master_word = &local_word;
/* Threads asleep in exec_poll (GIL released) on the master word: while there are any, the
 * control block holding it must stay mapped (a daemon thread at interpreter exit). */
static _Atomic int sleepers;
static _Atomic uint32_t notifications;

int
exec_in_worker(void)
{
    return exec__in_worker_flag || exec__in_forkserver;
}

void
exec_configure(const exec_options *o)
{
    exec__options = *o;
}

exec_options
exec_current_options(void)
{
    return exec__options;
}

void
exec__set_master_word(wake_word *w)
{
    master_word = w ? w : &local_word;
}

void
exec_notify(void)
{
    atomic_fetch_add(&notifications, 1);
    wake_notify(master_word);
}

/* Wake every sleeper (the pool is going away under them) and wait briefly until they are out:
 * 1 if none is left inside the word's memory. */
int
exec__wake_sleepers(void)
{
    wake_word *w = master_word;
    atomic_fetch_add(&w->seq, 1);
    syscall(SYS_futex, &w->seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    for (int k = 0; k < 100 && atomic_load(&sleepers) > 0; k++)
        usleep(1000);
    return atomic_load(&sleepers) == 0;
}

/* ---- the completion queue --------------------------------------------------------------------- */

int
exec_complete(const exec_completion *c)
{
    if (done.count == done.cap) {
        size_t cap = done.cap ? done.cap * 2 : 256;
        exec_completion *items = PyMem_RawMalloc(cap * sizeof(exec_completion));
        if (items == NULL) {
            exec_blob_decref(c->blob);
            Py_XDECREF(c->object);
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; i < done.count; i++)
            items[i] = done.items[(done.head + i) % done.cap];
        PyMem_RawFree(done.items);
        done.items = items;
        done.cap = cap;
        done.head = 0;
    }
    done.items[(done.head + done.count) % done.cap] = *c;
    done.count++;
    return 0;
}

/* A queue that grew past this during a burst is given back once it is empty again. */
#define DONE_KEEP_CAP 256

static int
take_completions(exec_completion *out, int cap)
{
    int n = 0;
    while (n < cap && done.count) {
        out[n++] = done.items[done.head];
        done.head = (done.head + 1) % done.cap;
        done.count--;
    }
    if (done.count == 0 && done.cap > DONE_KEEP_CAP) {
        PyMem_RawFree(done.items);
        done.items = NULL;
        done.cap = done.head = 0;
    }
    return n;
}

/* Drop queued completions of the given tasks (cancelled after they finished). */
static void
drop_completions(const uint64_t *sorted, Py_ssize_t n)
{
    size_t kept = 0;
    for (size_t i = 0; i < done.count; i++) {
        exec_completion *c = &done.items[(done.head + i) % done.cap];
        if (exec__id_in(sorted, n, c->task_id)) {
            exec_blob_decref(c->blob);
            Py_XDECREF(c->object);
            continue;
        }
        done.items[(done.head + kept) % done.cap] = *c;
        kept++;
    }
    done.count = kept;
}

/* ---- the interface ---------------------------------------------------------------------------- */

int
exec_submit(exec_kind kind, const exec_task *t)
{
    if ((unsigned)kind >= EXEC_NKINDS) {
        PyErr_Format(PyExc_SystemError, "pydron: no executor of kind %d", (int)kind);
        return -1;
    }
    return backends[kind]->submit(t);
}

Py_ssize_t
exec_outstanding(void)
{
    Py_ssize_t n = (Py_ssize_t)done.count;
    for (int k = 0; k < EXEC_NKINDS; k++)
        n += backends[k]->outstanding();
    return n;
}

static int
collect_all(void)
{
    int total = 0;
    for (int k = 0; k < EXEC_NKINDS; k++) {
        int n = backends[k]->collect();
        if (n < 0)
            return -1;
        total += n;
    }
    return total;
}

/* Whether an executor has something for collect_all. */
static int
backends_ready(void)
{
    for (int k = 0; k < EXEC_NKINDS; k++)
        if (backends[k]->ready())
            return 1;
    return 0;
}

static int
anything_ready(uint32_t notes)
{
    return atomic_load(&notifications) != notes || backends_ready();
}

int
exec_ready(void)
{
    return done.count || backends_ready();
}

int
exec_poll(double timeout_s, exec_completion *out, int cap)
{
    double deadline = timeout_s > 0 ? pydron_now() + timeout_s : 0;
    for (;;) {
        if (done.count)
            return take_completions(out, cap);
        uint32_t notes = atomic_load(&notifications);
        if (collect_all() < 0)
            return -1;
        if (done.count)
            return take_completions(out, cap);
        if (timeout_s == 0 || exec_outstanding() == 0)
            return 0;
        double left = timeout_s > 0 ? deadline - pydron_now() : POLL_SLEEP_MAX_S;
        if (left <= 0)
            return 0;
        int ready = 0;
        for (int k = 0; k < POLL_SPINS && !(ready = anything_ready(notes)); k++)
            __builtin_ia32_pause();
        if (!ready) {
            wake_word *w = master_word;
            uint32_t seen = wake_prepare(w);
            if (anything_ready(notes)) {
                wake_cancel(w);
            }
            else {
                int64_t ns = (int64_t)((left < POLL_SLEEP_MAX_S ? left : POLL_SLEEP_MAX_S) * 1e9);
                atomic_fetch_add(&sleepers, 1);
                Py_BEGIN_ALLOW_THREADS
                wake_wait(w, seen, ns);
                atomic_fetch_sub(&sleepers, 1);
                Py_END_ALLOW_THREADS
            }
        }
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (!anything_ready(notes)) {
            for (int k = 0; k < EXEC_NKINDS; k++)
                if (backends[k]->check() < 0)
                    return -1;
        }
    }
}

uint64_t *
exec__sorted_ids(const uint64_t *ids, Py_ssize_t n)
{
    uint64_t *s = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (s == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(s, ids, (size_t)n * sizeof(uint64_t));
    /* Insertion sort is fine for the short lists of a cancel; a long one is already nearly in
     * order (task ids grow with submission), which insertion sort handles in linear time. */
    for (Py_ssize_t i = 1; i < n; i++) {
        uint64_t v = s[i];
        Py_ssize_t j = i;
        while (j > 0 && s[j - 1] > v) {
            s[j] = s[j - 1];
            j--;
        }
        s[j] = v;
    }
    return s;
}

int
exec__id_in(const uint64_t *sorted, Py_ssize_t n, uint64_t id)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (sorted[mid] < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && sorted[lo] == id;
}

static void
cancel_or_forget(const uint64_t *ids, Py_ssize_t n, int soft)
{
    if (n <= 0)
        return;
    PyObject *exc = PyErr_GetRaisedException();   /* e.g. the KeyboardInterrupt being handled */
    uint64_t *sorted = exec__sorted_ids(ids, n);
    if (sorted != NULL) {
        for (int k = 0; k < EXEC_NKINDS; k++) {
            if (soft && backends[k]->forget)
                backends[k]->forget(sorted, n);
            else
                backends[k]->cancel(sorted, n);
        }
        drop_completions(sorted, n);
        PyMem_RawFree(sorted);
    }
    PyErr_Clear();
    PyErr_SetRaisedException(exc);
}

void
exec_cancel(const uint64_t *ids, Py_ssize_t n)
{
    cancel_or_forget(ids, n, 0);
}

void
exec_forget(const uint64_t *ids, Py_ssize_t n)
{
    cancel_or_forget(ids, n, 1);
}

void
exec_shutdown(void)
{
    int with_python = Py_IsInitialized();
    /* This is the interpreter's exit: the thread pool is closed for good, and a thread stuck in
     * a task is abandoned after a bounded wait rather than joined forever. */
    exec__threads_close();
    for (int k = 0; k < EXEC_NKINDS; k++)
        if (k != EXEC_THREADS)
            backends[k]->shutdown(with_python);
    if (with_python) {
        exec_completion c;
        while (take_completions(&c, 1)) {
            exec_blob_decref(c.blob);
            Py_XDECREF(c.object);
        }
    }
}

PyObject *
exec_stats(void)
{
    PyObject *pool = exec__pool_info(), *threads = pool ? exec__threads_info() : NULL;
    if (threads == NULL) {
        Py_XDECREF(pool);
        return NULL;
    }
    return Py_BuildValue("{s:N,s:N,s:n,s:n}", "processes", pool, "threads", threads,
                         "completions_queued", (Py_ssize_t)done.count,
                         "outstanding", exec_outstanding());
}

/* ---- module plumbing -------------------------------------------------------------------------- */

static PyObject *
threads_atexit(PyObject *module, PyObject *unused)
{
    exec__threads_close();
    Py_RETURN_NONE;
}

static PyMethodDef threads_atexit_def = {
    "_threads_atexit", threads_atexit, METH_NOARGS,
    "Interpreter exit: join the thread pool and close it for good."};

/* Join the pool's threads before the interpreter goes away (exec_shutdown may do it first):
 * registered with Python's atexit, which runs while the interpreter is still whole. */
static int
register_threads_atexit(void)
{
    PyObject *fn = PyCFunction_New(&threads_atexit_def, NULL);
    PyObject *atexit = fn ? PyImport_ImportModule("atexit") : NULL;
    PyObject *r = atexit ? PyObject_CallMethod(atexit, "register", "O", fn) : NULL;
    Py_XDECREF(atexit);
    Py_XDECREF(fn);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* In every child process: a new generation of arena references, and (in a child of user code)
 * the parent's pool forgotten. */
static void
atfork_child(void)
{
    exec__fork_generation++;
    exec__pool_forget_in_child();
}

int
exec_module_init(PyObject *module)
{
    PyObject *lost = PyErr_NewExceptionWithDoc(
        "pydron.WorkerLostError",
        "A task killed the worker process running it (a crash, a signal, os._exit) every time it "
        "was tried; the message names the function, the signal and the argument shapes.",
        PyExc_RuntimeError, NULL);
    if (lost == NULL || PyModule_AddObject(module, "WorkerLostError", lost) < 0) {
        Py_XDECREF(lost);
        return -1;
    }
    static int atfork_registered;
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, atfork_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pydron: pthread_atfork failed");
            return -1;
        }
        atfork_registered = 1;
    }
    if (exec__blob_module_init(module) < 0 || exec__codec_module_init(module) < 0 ||
        exec__testing_module_init(module) < 0 || register_threads_atexit() < 0)
        return -1;
    return 0;
}
