/* exec/threads.c — the thread pool behind @pydron.functional(executor="threads"): tasks run on
 * threads of this process. A ctypes function pointer with a declared signature is called
 * through libffi with the GIL released (ffi.c prepares it); any other callable runs as a Python
 * call on a pool thread, which may release the GIL itself.
 * Thread and GIL model: `pool.mu` guards the queue, the running and finished lists and the
 * thread bookkeeping; the GIL guards `outstanding` and the counters. No thread waits for the GIL
 * while holding `mu`. Pool threads take no signals. */
#include "exec/ffi.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 1024
/* At interpreter exit, threads still running a task after this long are abandoned (with a
 * warning) rather than joined: a task that never returns must not keep the process alive. */
#define EXIT_JOIN_S 2.0
#define LIMITS_CHECK_NS 10000000

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work_cv;        /* a job was queued or the pool is stopping */
    pthread_cond_t done_cv;        /* a job finished */
    thread_job *queue_head, *queue_tail;
    Py_ssize_t queued;
    thread_job *running;           /* doubly linked: a cancel marks them */
    thread_job *done_head, *done_tail;
    pthread_t *threads;
    int nthreads, max_threads, idle, stopping;
    int arriving;                  /* threads about to look at the queue without a signal (just
                                    * started, or back from a completion notice): queued work they
                                    * will take needs no new thread */
    pid_t pid;                     /* process the threads belong to */
    Py_ssize_t outstanding;
    uint64_t ffi_calls, python_calls;
    int closed;                    /* interpreter exit: no more tasks */
    int abandoned;                 /* threads stuck in a timed-out task: one more may start */
    Py_ssize_t timed;              /* outstanding jobs with a timeout (GIL) */
    uint64_t limits_checked_ns;
} pool = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .work_cv = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
_Atomic int exec__threads_post_pause_us;

/* Set in pool threads: they must not join the pool they belong to. */
static _Thread_local int in_pool_thread;

/* ---- jobs ------------------------------------------------------------------------------------- */

static thread_job *
job_new(uint64_t task_id, Py_ssize_t nargs)
{
    size_t size = sizeof(thread_job) + (size_t)nargs * (sizeof(native_value) + sizeof(void *));
    thread_job *job = PyMem_RawCalloc(1, size);
    if (job == NULL)
        return NULL;
    job->task_id = task_id;
    job->values = (native_value *)(job + 1);
    job->avalues = (void **)(job->values + nargs);
    return job;
}

/* Drop everything a job holds; GIL held. */
static void
job_free(thread_job *job)
{
    Py_XDECREF(job->fn);
    Py_XDECREF(job->args);
    Py_XDECREF(job->kwargs);
    Py_XDECREF(job->keepalive);
    Py_XDECREF(job->object);
    PyMem_RawFree(job);
}

static void
job_free_list(thread_job *job)
{
    while (job != NULL) {
        thread_job *next = job->next;
        job_free(job);
        job = next;
    }
}

static void
run_python_call(thread_job *job)
{
    PyGILState_STATE g = PyGILState_Ensure();
    job->object = PyObject_Call(job->fn, job->args, job->kwargs);
    if (job->object == NULL) {
        job->failed = 1;
        job->object = PyErr_GetRaisedException();
        if (job->object == NULL)
            job->object = PyObject_CallFunction(PyExc_SystemError, "s",
                                                "pydron threads: call failed without an exception");
    }
    /* Dropped here, with the GIL at hand, so the master's collect does less. */
    Py_CLEAR(job->fn);
    Py_CLEAR(job->args);
    Py_CLEAR(job->kwargs);
    PyGILState_Release(g);
}

/* ---- pool threads ----------------------------------------------------------------------------- */

static void
running_add(thread_job *job)
{
    job->prev = NULL;
    job->next = pool.running;
    if (pool.running)
        pool.running->prev = job;
    pool.running = job;
}

static void
running_remove(thread_job *job)
{
    if (job->prev)
        job->prev->next = job->next;
    else
        pool.running = job->next;
    if (job->next)
        job->next->prev = job->prev;
    job->next = job->prev = NULL;
}

static void *
thread_main(void *unused)
{
    /* A thread state of our own for the thread's whole life, so each Python call only swaps the
     * GIL (threading.local values persist between a thread's tasks). */
    in_pool_thread = 1;
    PyGILState_STATE outer = PyGILState_Ensure();
    PyThreadState *ts = PyEval_SaveThread();

    pthread_mutex_lock(&pool.mu);
    pool.arriving--;
    for (;;) {
        while (pool.queue_head == NULL && !pool.stopping) {
            pool.idle++;
            pthread_cond_wait(&pool.work_cv, &pool.mu);
            pool.idle--;
        }
        if (pool.stopping)
            break;
        thread_job *job = pool.queue_head;
        pool.queue_head = job->next;
        if (pool.queue_head == NULL)
            pool.queue_tail = NULL;
        pool.queued--;
        job->started_ns = pydron_now_ns();
        running_add(job);
        pthread_mutex_unlock(&pool.mu);

        if (job->site != NULL)
            exec__ffi_call(job);
        else
            run_python_call(job);

        pthread_mutex_lock(&pool.mu);
        running_remove(job);
        /* The master takes the whole list at once, so only the first completion after a
         * collect needs to wake anyone: later ones are picked up with it. */
        int first = pool.done_head == NULL;
        if (pool.done_tail != NULL)
            pool.done_tail->next = job;
        else
            pool.done_head = job;
        pool.done_tail = job;
        if (first) {
            pthread_cond_broadcast(&pool.done_cv);
            pool.arriving++;
            pthread_mutex_unlock(&pool.mu);
            exec__notify_master();
            if (atomic_load_explicit(&exec__threads_post_pause_us, memory_order_relaxed))
                usleep((useconds_t)exec__threads_post_pause_us);
            pthread_mutex_lock(&pool.mu);
            pool.arriving--;
        }
    }
    pthread_mutex_unlock(&pool.mu);

    PyEval_RestoreThread(ts);
    PyGILState_Release(outer);
    return NULL;
}

/* ---- fork and sizing -------------------------------------------------------------------------- */

static void
atfork_prepare(void)
{
    pthread_mutex_lock(&pool.mu);
}

static void
atfork_parent(void)
{
    pthread_mutex_unlock(&pool.mu);
}

/* The child has none of the parent's threads: forget them and their jobs (leaked, never run or
 * reported here: the task ids belong to the parent). */
static void
atfork_child(void)
{
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work_cv, NULL);
    pthread_cond_init(&pool.done_cv, NULL);
    pool.queue_head = pool.queue_tail = NULL;
    pool.running = NULL;
    pool.done_head = pool.done_tail = NULL;
    pool.queued = 0;
    pool.threads = NULL;
    pool.nthreads = pool.idle = pool.arriving = pool.stopping = 0;
    pool.outstanding = 0;
    pool.pid = getpid();
}

static void
register_atfork(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Also catches a fork that bypassed pthread_atfork (a raw clone); a system call, so only on the
 * cold paths (cancel, shutdown, stats): submit and collect rely on the atfork handler. */
static void
check_forked(void)
{
    if (pool.pid != 0 && pool.pid != getpid())
        atfork_child();
}

static int
pool_size(void)
{
    int n = exec__options.thread_workers;
    if (n > 0)
        return n < MAX_THREADS ? n : MAX_THREADS;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores > 0 ? (int)cores : 1;
}

/* Start another thread if queued work outnumbers the threads that will take it (idle or
 * arriving); called with pool.mu held.
 * 0, or -1 (errno-style code in *err) if no thread could be started and none exists. */
static int
maybe_spawn_thread(int *err)
{
    if (pool.max_threads == 0)
        pool.max_threads = pool_size();
    if (pool.threads == NULL) {
        pool.threads = calloc(MAX_THREADS, sizeof(pthread_t));
        if (pool.threads == NULL) {
            *err = ENOMEM;
            return -1;
        }
    }
    if (pool.queued <= pool.idle + pool.arriving ||
        pool.nthreads >= pool.max_threads + pool.abandoned || pool.nthreads >= MAX_THREADS)
        return 0;
    /* Pool threads take no signals: they belong to the main thread (and the master's poll). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&pool.threads[pool.nthreads], NULL, thread_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        *err = rc;
        return pool.nthreads > 0 ? 0 : -1;
    }
    pool.nthreads++;
    pool.arriving++;
    return 0;
}

/* ---- the executor ----------------------------------------------------------------------------- */

static int
threads_submit(const exec_task *t)
{
    PyObject *call = t->call;
    if (call == NULL || !PyTuple_Check(call) || PyTuple_GET_SIZE(call) != 2 ||
        !PyTuple_Check(PyTuple_GET_ITEM(call, 0))) {
        PyErr_SetString(PyExc_TypeError, "pydron threads: a task's call must be (args tuple, "
                                         "kwargs dict or None)");
        return -1;
    }
    PyObject *args = PyTuple_GET_ITEM(call, 0), *kwargs = PyTuple_GET_ITEM(call, 1);
    if (kwargs == Py_None)
        kwargs = NULL;
    else if (!PyDict_Check(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "pydron threads: kwargs must be a dict");
        return -1;
    }
    if (pool.closed) {
        PyErr_SetString(PyExc_RuntimeError,
                        "pydron: cannot run thread tasks after interpreter shutdown began");
        return -1;
    }
    pthread_once(&atfork_once, register_atfork);

    thread_job *job = job_new(t->task_id, PyTuple_GET_SIZE(args));
    if (job == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (exec__ffi_prepare(job, t->fn, args, kwargs) < 0) {
        job_free(job);
        return -1;
    }
    double timeout = t->timeout_s > 0 ? t->timeout_s : exec__options.task_timeout_s;
    job->timeout_ns = timeout > 0 ? (uint64_t)(timeout * 1e9) : 0;
    job->fn = Py_NewRef(t->fn);
    job->args = Py_NewRef(args);
    job->kwargs = (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) ? Py_NewRef(kwargs) : NULL;

    int err = 0;
    pthread_mutex_lock(&pool.mu);
    if (pool.stopping) {
        /* Another thread is joining the pool (it released the GIL to do so). */
        pthread_mutex_unlock(&pool.mu);
        job_free(job);
        PyErr_SetString(PyExc_RuntimeError, "pydron: the thread pool is shutting down");
        return -1;
    }
    if (pool.pid == 0)
        pool.pid = getpid();
    if (pool.queue_tail != NULL)
        pool.queue_tail->next = job;
    else
        pool.queue_head = job;
    pool.queue_tail = job;
    pool.queued++;
    int rc = maybe_spawn_thread(&err);
    if (rc < 0) {
        /* Nothing will ever run it: take it back out (it is the tail, and no thread exists). */
        thread_job **p = &pool.queue_head;
        while (*p != job)
            p = &(*p)->next;
        *p = NULL;
        pool.queue_tail = NULL;
        for (thread_job *j = pool.queue_head; j != NULL; j = j->next)
            pool.queue_tail = j;
        pool.queued--;
    }
    else if (pool.idle > 0) {
        pthread_cond_signal(&pool.work_cv);   /* busy threads look at the queue before waiting */
    }
    pthread_mutex_unlock(&pool.mu);
    if (rc < 0) {
        job_free(job);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pool.outstanding++;
    if (job->timeout_ns)
        pool.timed++;
    if (job->site != NULL)
        pool.ffi_calls++;
    else
        pool.python_calls++;
    return 0;
}

/* The completion of a finished job (ownership of its object moves to c). */
static void
job_completion(thread_job *job, exec_completion *c)
{
    memset(c, 0, sizeof(*c));
    c->task_id = job->task_id;
    if (job->site == NULL) {
        c->failed = job->failed;
        c->object = job->object;
        job->object = NULL;
        return;
    }
    c->object = exec__ffi_result(job);
    if (c->object == NULL) {
        c->failed = 1;
        c->object = PyErr_GetRaisedException();
    }
}

/* Jobs running past their timeout fail with TimeoutError now; a thread cannot be stopped, so
 * it is abandoned to finish on its own (its result is dropped) and another may start. Number of
 * completions queued, or -1 + exception. */
static int
expire_timed_out(void)
{
    uint64_t now = pydron_now_ns();
    if (pool.timed == 0 || now - pool.limits_checked_ns < LIMITS_CHECK_NS)
        return 0;
    pool.limits_checked_ns = now;
    enum { BATCH = 32 };
    uint64_t ids[BATCH];
    PyObject *fns[BATCH];
    double limits[BATCH];
    int n = 0;
    pthread_mutex_lock(&pool.mu);
    for (thread_job *j = pool.running; j && n < BATCH; j = j->next) {
        if (j->cancelled || j->timeout_ns == 0 || now - j->started_ns <= j->timeout_ns)
            continue;
        j->cancelled = 1;          /* its result, if it ever comes, is dropped */
        ids[n] = j->task_id;
        fns[n] = Py_NewRef(j->fn);  /* the GIL is held: the thread cannot drop it meanwhile */
        limits[n++] = (double)j->timeout_ns * 1e-9;
        pool.abandoned++;
    }
    pthread_mutex_unlock(&pool.mu);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        pool.outstanding--;
        pool.timed--;
        PyObject *limit = PyFloat_FromDouble(limits[i]);
        PyObject *args[2] = {fns[i], limit};
        PyObject *exc = limit ? exec__call_helper("task_timed_out", args, 2) : NULL;
        Py_XDECREF(limit);
        Py_DECREF(fns[i]);
        exec_completion c = {.task_id = ids[i], .failed = 1, .object = exc};
        if (exc == NULL || exec__complete(&c) < 0)
            rc = -1;
    }
    return rc < 0 ? -1 : n;
}

static int
threads_collect(void)
{
    int expired = expire_timed_out();
    if (expired < 0)
        return -1;
    if (pool.done_head == NULL)        /* a racy peek: a job finishing now is taken next time */
        return expired;
    pthread_mutex_lock(&pool.mu);
    thread_job *list = pool.done_head;
    pool.done_head = pool.done_tail = NULL;
    pthread_mutex_unlock(&pool.mu);

    int n = 0, rc = 0;
    while (list != NULL) {
        thread_job *job = list;
        list = job->next;
        if (job->cancelled) {
            job_free(job);             /* cancelled while it ran: never reported */
            continue;
        }
        if (job->timeout_ns)
            pool.timed--;
        exec_completion c;
        job_completion(job, &c);
        job_free(job);
        pool.outstanding--;
        if (rc == 0 && exec__complete(&c) < 0)
            rc = -1;                   /* out of memory: the rest still leave the pool */
        n++;
    }
    return rc < 0 ? -1 : n + expired;
}

static int
threads_ready(void)
{
    return pool.done_head != NULL;
}

static int
threads_check(void)
{
    return 0;
}

static Py_ssize_t
threads_outstanding(void)
{
    return pool.outstanding;
}

/* Take the jobs of a list that are cancelled (all with sorted NULL) out into *dropped. */
static thread_job *
take_cancelled(thread_job *list, const uint64_t *sorted, Py_ssize_t n, thread_job **dropped,
               thread_job **tail)
{
    thread_job *head = NULL;
    *tail = NULL;
    for (thread_job *next; list; list = next) {
        next = list->next;
        if (sorted == NULL || exec__id_in(sorted, n, list->task_id)) {
            list->next = *dropped;
            *dropped = list;
            continue;
        }
        list->next = NULL;
        if (*tail)
            (*tail)->next = list;
        else
            head = list;
        *tail = list;
    }
    return head;
}

/* Queued ones are dropped now, running ones run to the end (a thread cannot be stopped safely)
 * and are dropped when they finish. GIL held. */
static void
threads_cancel(const uint64_t *sorted, Py_ssize_t n)
{
    check_forked();
    thread_job *dropped = NULL;
    Py_ssize_t forgotten = 0;
    pthread_mutex_lock(&pool.mu);
    pool.queue_head = take_cancelled(pool.queue_head, sorted, n, &dropped, &pool.queue_tail);
    pool.queued = 0;
    for (thread_job *j = pool.queue_head; j; j = j->next)
        pool.queued++;
    pool.done_head = take_cancelled(pool.done_head, sorted, n, &dropped, &pool.done_tail);
    for (thread_job *j = pool.running; j; j = j->next) {
        if (!j->cancelled && (sorted == NULL || exec__id_in(sorted, n, j->task_id))) {
            j->cancelled = 1;
            forgotten++;
        }
    }
    pthread_mutex_unlock(&pool.mu);
    /* Every dropped job was outstanding, unless an earlier cancel already forgot it. */
    for (thread_job *j = dropped; j; j = j->next) {
        forgotten += !j->cancelled;
        pool.timed -= !j->cancelled && j->timeout_ns;
    }
    pool.outstanding -= forgotten;
    job_free_list(dropped);
}

static void
threads_shutdown(int with_python)
{
    if (in_pool_thread)
        return;   /* a task cannot wait for its own thread; the master's shutdown will */
    check_forked();
    pthread_mutex_lock(&pool.mu);
    if (pool.stopping) {
        /* Another thread is joining (it released the GIL to do so): it finishes the job. */
        pthread_mutex_unlock(&pool.mu);
        return;
    }
    pool.stopping = 1;
    pthread_cond_broadcast(&pool.work_cv);
    pthread_t *threads = pool.threads;
    int n = pool.nthreads;
    pthread_mutex_unlock(&pool.mu);

    /* A thread may be waiting for the GIL to finish its Python call. At exit, one that is still
     * inside a task after EXIT_JOIN_S is abandoned: it must not keep the process alive. */
    int have_gil = with_python && PyGILState_Check();
    PyThreadState *ts = (have_gil && n > 0) ? PyEval_SaveThread() : NULL;
    int abandoned = 0;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += (time_t)EXIT_JOIN_S;
    for (int i = 0; i < n; i++) {
        if (pool.closed ? pthread_timedjoin_np(threads[i], NULL, &deadline) != 0
                        : pthread_join(threads[i], NULL) != 0) {
            pthread_detach(threads[i]);
            abandoned++;
        }
    }
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    if (abandoned && have_gil) {
        PyObject *msg = PyUnicode_FromFormat(
            "pydron: %d thread task(s) still running at exit were abandoned (use "
            "@pydron.functional(timeout=...) to stop tasks that may never return)", abandoned);
        PyObject *r = msg ? exec__call_helper("warn", &msg, 1) : NULL;
        Py_XDECREF(msg);
        Py_XDECREF(r);
        PyErr_Clear();
    }

    pthread_mutex_lock(&pool.mu);
    thread_job *queued = pool.queue_head, *done = pool.done_head;
    pool.queue_head = pool.queue_tail = pool.done_head = pool.done_tail = NULL;
    pool.running = NULL;
    pool.queued = 0;
    pool.threads = NULL;
    pool.nthreads = pool.idle = pool.arriving = pool.stopping = pool.abandoned = 0;
    pool.max_threads = 0;
    pthread_mutex_unlock(&pool.mu);
    free(threads);

    if (!have_gil || abandoned)
        return;    /* no safe way to drop Python references (abandoned threads hold jobs) */
    pool.outstanding = 0;
    pool.timed = 0;
    job_free_list(queued);
    job_free_list(done);
    exec__ffi_clear_sites();
}

const exec_backend exec__thread_backend = {
    .name = "threads",
    .submit = threads_submit,
    .collect = threads_collect,
    .ready = threads_ready,
    .check = threads_check,
    .cancel = threads_cancel,
    .outstanding = threads_outstanding,
    .shutdown = threads_shutdown,
};

/* ---- for tests and `pydron info` -------------------------------------------------------------- */

PyObject *
exec__threads_info(void)
{
    check_forked();
    pthread_mutex_lock(&pool.mu);
    int nthreads = pool.nthreads, max_threads = pool.max_threads, idle = pool.idle;
    Py_ssize_t queued = pool.queued, finished = 0;
    for (thread_job *j = pool.done_head; j != NULL; j = j->next)
        finished++;
    pthread_mutex_unlock(&pool.mu);
    PyObject *nsites = exec__ffi_stats();
    if (nsites == NULL)
        return NULL;
    return Py_BuildValue("{s:i,s:i,s:i,s:n,s:n,s:n,s:K,s:K,s:N}", "threads", nthreads,
                         "max_threads", max_threads == 0 ? pool_size() : max_threads,
                         "idle", idle, "queued", queued, "finished", finished,
                         "outstanding", pool.outstanding,
                         "ffi_calls", (unsigned long long)pool.ffi_calls,
                         "python_calls", (unsigned long long)pool.python_calls,
                         "cif_cache", nsites);
}

/* Interpreter exit: join the threads while the interpreter is whole, and refuse work from then
 * on (a daemon thread may still submit; its task would start during finalization). */
void
exec__threads_close(void)
{
    pool.closed = 1;
    threads_shutdown(1);
}
