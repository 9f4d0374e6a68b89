/* exec/pool_collect.c — the master side of the process pool, coming back: results read from
 * the workers' rings, dead workers blamed and replaced, tasks stopped at their timeout or memory
 * limit, the fork server restarted when it dies, and tasks taken back by a cancel. Sending tasks
 * out, start and stop are pool.c; the state both share is pool_internal.h.
 * Thread and GIL model: master only, GIL held; workers and the fork server touch only the
 * shared control block, the rings and the arena. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/pool_internal.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_KILLS 3                    /* a task that killed this many workers fails */
#define MAX_IDLE_DEATHS 20             /* a slot whose workers die this often idle is disabled */
#define RING_CAPACITY ring_capacity_for(EXEC_RING_BYTES)   /* the master's own copy */
#define MAX_FORKSERVER_RESTARTS 5      /* crashes within FORKSERVER_RESTART_WINDOW_S: give up */
#define LIMITS_CHECK_NS 10000000       /* how often timeouts and memory limits are checked */
#define FORKSERVER_RESTART_WINDOW_S 10.0

static int restarts;                   /* fork server restarts in the current window */
static double restart_window_start;
static uint64_t limits_checked_ns;

/* ---- taking tasks back from a worker ---------------------------------------------------------- */

/* SIGKILL worker i (waiting briefly for it to have a pid) and expect its death. */
static void
kill_slot(int i)
{
    mslot *s = &pool__m.slots[i];
    exec_slot *sh = &exec__shared->slots[i];
    pid_t pid = 0;
    for (int k = 0; k < 2000 && s->spawned && (pid = atomic_load(&sh->pid)) == 0; k++)
        usleep(1000);
    if (pid > 0)
        kill(pid, SIGKILL);
    s->killing = 1;
}

/* Tasks taken back from a worker go to the head of the queue: they were submitted before
 * anything still queued. */
static void
requeue_front(mtask *head, mtask *tail)
{
    if (head == NULL)
        return;
    tail->next = pool__m.q_head;
    pool__m.q_head = head;
    if (pool__m.q_tail == NULL)
        pool__m.q_tail = tail;
}

/* ---- results ---------------------------------------------------------------------------------- */

/* Hand t's outcome over as a completion; consumes t and the blob/object references. */
static int
complete(mtask *t, int failed, exec_blob *blob, PyObject *object, int worker, uint64_t elapsed_ns)
{
    exec_completion c = {t->id, failed, blob, object, 0, 0, 0};
    if (worker) {
        /* The worker's run time; it finished about now (results are drained promptly). */
        c.worker = worker;
        c.finished = pydron_now();
        c.started = c.finished - (double)elapsed_ns * 1e-9;
    }
    pool__m.outstanding--;
    int forgotten = t->forgotten;
    pool__task_free(t);
    if (forgotten) {
        /* Nobody waits for it any more (exec_forget). */
        exec_blob_decref(blob);
        Py_XDECREF(object);
        return 0;
    }
    return exec__complete(&c);
}

/* A worker wrote a record the master cannot trust: fail the task it was for (the oldest one in
 * flight) with an error naming the problem, and replace the worker. -1 + exception only when
 * even that fails. */
static int
reject_record(int i, const char *what, const char *detail)
{
    mslot *s = &pool__m.slots[i];
    mtask *t = s->head;
    PyObject *w = PyUnicode_FromString(what), *d = PyUnicode_FromString(detail);
    PyObject *exc = NULL;
    if (w && d) {
        PyObject *args[2] = {w, d};
        exc = exec__call_helper("bad_record", args, 2);
    }
    Py_XDECREF(w);
    Py_XDECREF(d);
    if (exc == NULL)
        return -1;
    kill_slot(i);
    s->poisoned = 1;
    if (t == NULL) {
        Py_DECREF(exc);
        return 0;
    }
    s->head = t->next;
    if (s->head == NULL)
        s->tail = NULL;
    s->count--;
    return complete(t, 1, NULL, exc, i + 1, 0);
}

/* Read every record of worker i's result ring; with discard (its tasks were cancelled), drop
 * them. Returns the number of completions, or -1 + exception. */
static int
drain_slot(int i, int discard)
{
    mslot *s = &pool__m.slots[i];
    int n = 0;
    if (s->poisoned)
        return 0;                  /* its death resets the ring */
    for (;;) {
        wire_in in;
        uint32_t kind;
        size_t len;
        const char *err;
        const void *p = wire_next(&in, exec__to_master(i), RING_CAPACITY, exec__arena, &kind,
                                  &len, &err);
        if (p == NULL) {
            if (err == NULL)
                return n;
            wire_skip(&in);
            return reject_record(i, "record", err) < 0 ? -1 : n;
        }
        const wire_result *hdr;
        wire_blob_view view;
        if (kind == WIRE_NOTE) {              /* PYDRON_CHECK: said once, the task goes on */
            err = wire_check_result(p, len, exec__arena, &hdr, &view);
            exec_blob *note = err ? NULL : exec__blob_from_view(&view);
            wire_done(&in);
            if (err != NULL)
                return reject_record(i, "note record", err) < 0 ? -1 : n;
            PyObject *v = note ? exec_blob_decode(note) : NULL;
            exec_blob_decref(note);
            PyObject *r = v ? exec__call_helper("worker_note", &v, 1) : NULL;
            Py_XDECREF(r);
            Py_XDECREF(v);
            PyErr_Clear();
            continue;
        }
        if (kind != WIRE_RESULT && kind != WIRE_ERROR)
            err = "record of an unknown kind";
        else
            err = wire_check_result(p, len, exec__arena, &hdr, &view);
        if (err != NULL) {
            wire_done(&in);
            if (reject_record(i, "result record", err) < 0)
                return -1;
            return n;
        }
        uint64_t task_id = hdr->task_id, elapsed_ns = hdr->elapsed_ns;
        exec_blob *blob = exec__blob_from_view(&view);
        wire_done(&in);
        if (blob == NULL)
            return -1;
        mtask *t = s->head;
        if (t == NULL || t->id != task_id || discard) {
            exec_blob_decref(blob);   /* a cancelled task's result */
            continue;
        }
        s->head = t->next;
        if (s->head == NULL)
            s->tail = NULL;
        s->count--;
        s->queued_ns = s->count ? s->queued_ns - t->est_ns : 0;
        s->idle_deaths = 0;
        PyObject *exc = NULL;
        if (kind == WIRE_RESULT) {
            exec__fn_observe(t->fn_id, elapsed_ns);
        }
        else {
            exc = exec__decode_error(blob);
            exec_blob_decref(blob);
            blob = NULL;
        }
        n++;
        if (complete(t, kind == WIRE_ERROR, blob, exc, i + 1, elapsed_ns) < 0)
            return -1;
    }
}

/* ---- deaths ----------------------------------------------------------------------------------- */

static const char *
signal_name(int sig)
{
    switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGKILL: return "SIGKILL";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGPIPE: return "SIGPIPE";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
    case SIGXCPU: return "SIGXCPU";
    default: return NULL;
    }
}

/* "killed by SIGSEGV", "exit status 3": new reference, NULL + exception. */
static PyObject *
describe_status(int status)
{
    if (WIFSIGNALED(status)) {
        const char *n = signal_name(WTERMSIG(status));
        return n ? PyUnicode_FromFormat("killed by %s", n)
                 : PyUnicode_FromFormat("killed by signal %d", WTERMSIG(status));
    }
    return PyUnicode_FromFormat("exit status %d", WIFEXITED(status) ? WEXITSTATUS(status) : status);
}

/* The WorkerLostError for a task that killed its workers MAX_KILLS times (new reference; never
 * NULL: falls back to a plainer message). */
static PyObject *
worker_lost_error(mtask *t, int status, uint64_t maxrss_kb)
{
    PyObject *how = describe_status(status);
    PyObject *rss = PyLong_FromUnsignedLongLong(maxrss_kb * 1024);
    PyObject *kills = PyLong_FromLong(t->kills);
    PyObject *data = PyBytes_FromStringAndSize(t->args->data, (Py_ssize_t)t->args->len);
    PyObject *bufs = exec__blob_buffers(t->args);
    PyObject *exc = NULL;
    if (how && kills && data && bufs && rss) {
        PyObject *a[7] = {t->fn, how, kills, data, bufs, rss,
                          WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL ? Py_True : Py_False};
        exc = exec__call_helper("worker_lost", a, 7);
    }
    Py_XDECREF(rss);
    Py_XDECREF(how);
    Py_XDECREF(kills);
    Py_XDECREF(data);
    Py_XDECREF(bufs);
    if (exc == NULL) {
        PyErr_Clear();
        exc = PyObject_CallFunction(PyExc_RuntimeError, "s",
                                    "pydron: a task killed its worker process");
        if (exc == NULL) {
            PyErr_Clear();
            exc = Py_NewRef(PyExc_RuntimeError);
        }
    }
    return exc;
}

/* Worker i died: keep what it finished, blame the task it was running (unless blame is 0: the
 * fork server died, or the worker was killed on purpose), re-run the rest on a replacement.
 * Returns the number of completions, or -1 + exception. */
static int
handle_death(int i, int blame)
{
    mslot *s = &pool__m.slots[i];
    exec_slot *sh = &exec__shared->slots[i];
    int status = atomic_load(&sh->death_status);
    int n = drain_slot(i, s->killing);
    if (n < 0)
        return -1;
    uint64_t blamed = atomic_load(&sh->running_task);
    atomic_store(&sh->running_task, 0);
    held_release_all(&sh->held, exec__arena);     /* the dead worker's references */
    ring_reset(exec__to_worker(i));
    ring_reset(exec__to_master(i));
    s->spawned = 0;
    if (s->defined)
        memset(s->defined, 0, s->defined_cap);
    mtask *keep_head = NULL, *keep_tail = NULL;
    for (mtask *t = s->head, *next; t; t = next) {
        next = t->next;
        if (t->forgotten) {
            pool__m.outstanding--;
            pool__task_free(t);
            continue;
        }
        if (blame && !s->killing && t->id == blamed && blamed != 0 && ++t->kills >= MAX_KILLS) {
            t->error = worker_lost_error(t, status, atomic_load(&sh->death_maxrss_kb));
            pool__list_append(&pool__m.failed_head, &pool__m.failed_tail, t);
            continue;
        }
        pool__list_append(&keep_head, &keep_tail, t);
    }
    if (blame && blamed == 0 && !s->killing && ++s->idle_deaths > MAX_IDLE_DEATHS)
        s->disabled = 1;    /* dies without running anything: do not fork it forever */
    s->head = s->tail = NULL;
    s->count = 0;
    s->queued_ns = 0;
    s->killing = 0;
    s->poisoned = 0;
    requeue_front(keep_head, keep_tail);
    if (pool__m.running)
        pool__spawn_worker(i);
    return n;
}

static int
handle_deaths(void)
{
    uint32_t d = atomic_load(&exec__shared->deaths);
    if (d == pool__m.seen_deaths)
        return 0;
    pool__m.seen_deaths = d;
    int n = 0;
    for (int i = 0; i < pool__m.nworkers; i++) {
        uint32_t sd = atomic_load(&exec__shared->slots[i].deaths);
        if (sd == pool__m.slots[i].seen_deaths)
            continue;
        pool__m.slots[i].seen_deaths = sd;
        int k = handle_death(i, 1);
        if (k < 0)
            return -1;
        n += k;
    }
    /* Every worker disabled: nothing will ever run what is queued. */
    int alive = 0;
    for (int i = 0; i < pool__m.nworkers; i++)
        alive += !pool__m.slots[i].disabled;
    while (!alive && pool__m.q_head) {
        mtask *t = pool__m.q_head;
        pool__m.q_head = t->next;
        if (pool__m.q_head == NULL)
            pool__m.q_tail = NULL;
        t->error = exec__call_helper("workers_die_at_start", NULL, 0);
        if (t->error == NULL)
            return -1;
        pool__list_append(&pool__m.failed_head, &pool__m.failed_tail, t);
    }
    return n;
}

static int
complete_failed(void)
{
    int n = 0;
    while (pool__m.failed_head) {
        mtask *t = pool__m.failed_head;
        pool__m.failed_head = t->next;
        if (pool__m.failed_head == NULL)
            pool__m.failed_tail = NULL;
        PyObject *exc = t->error;
        t->error = NULL;
        n++;
        if (complete(t, 1, NULL, exc, 0, 0) < 0)
            return -1;
    }
    return n;
}

/* ---- timeouts and memory limits --------------------------------------------------------------- */

/* Resident memory of pid in bytes, or 0 when it cannot be read. */
static size_t
resident_bytes(pid_t pid)
{
    char path[64];
    unsigned long long size = 0, resident = 0;
    snprintf(path, sizeof path, "/proc/%d/statm", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    int ok = fscanf(f, "%llu %llu", &size, &resident) == 2;
    fclose(f);
    return ok ? (size_t)resident * (size_t)sysconf(_SC_PAGESIZE) : 0;
}

/* The task worker i runs went past its timeout or memory limit: the worker is killed (the only
 * way to stop it), the task fails with the error, and the rest of what the worker held runs
 * again elsewhere. 0, or -1 + exception. */
static int
stop_running_task(int i, mtask *t, const char *helper_name, PyObject *limit, PyObject *used)
{
    mslot *s = &pool__m.slots[i];
    PyObject *args[3] = {t->fn, limit, used};
    PyObject *exc = exec__call_helper(helper_name, args, used ? 3 : 2);
    if (exc == NULL)
        return -1;
    kill_slot(i);
    /* Take t out; the others go back to the queue (killing: their results are discarded). */
    mtask *keep = NULL, *tail = NULL;
    for (mtask *x = s->head, *next; x; x = next) {
        next = x->next;
        if (x != t)
            pool__list_append(&keep, &tail, x);
    }
    requeue_front(keep, tail);
    s->head = s->tail = NULL;
    s->count = 0;
    s->queued_ns = 0;
    return complete(t, 1, NULL, exc, i + 1, 0);
}

/* Tasks running past their timeout or memory limit are stopped (checked every
 * LIMITS_CHECK_NS while such tasks are outstanding). */
static int
enforce_limits(void)
{
    uint64_t now = pydron_now_ns();
    if (pool__m.limited == 0 || now - limits_checked_ns < LIMITS_CHECK_NS)
        return 0;
    limits_checked_ns = now;
    for (int i = 0; i < pool__m.nworkers; i++) {
        mslot *s = &pool__m.slots[i];
        exec_slot *sh = &exec__shared->slots[i];
        uint64_t running = atomic_load(&sh->running_task);
        if (s->killing || running == 0 || s->head == NULL)
            continue;
        mtask *t = s->head;
        while (t && t->id != running)
            t = t->next;
        if (t == NULL || (t->timeout_ns == 0 && t->memory_limit == 0))
            continue;
        uint64_t since = atomic_load(&sh->running_since_ns);
        if (t->timeout_ns && now > since && now - since > t->timeout_ns) {
            PyObject *limit = PyFloat_FromDouble((double)t->timeout_ns * 1e-9);
            int rc = limit ? stop_running_task(i, t, "task_timed_out", limit, NULL) : -1;
            Py_XDECREF(limit);
            if (rc < 0)
                return -1;
            continue;
        }
        size_t rss = t->memory_limit ? resident_bytes(atomic_load(&sh->pid)) : 0;
        if (t->memory_limit && rss > t->memory_limit) {
            PyObject *limit = PyLong_FromSize_t(t->memory_limit), *used = PyLong_FromSize_t(rss);
            int rc = limit && used ? stop_running_task(i, t, "task_over_memory", limit, used) : -1;
            Py_XDECREF(limit);
            Py_XDECREF(used);
            if (rc < 0)
                return -1;
        }
    }
    return 0;
}

/* ---- one round -------------------------------------------------------------------------------- */

/* One round: deaths, results, failures, limits; then refill the rings. */
int
pool__collect(void)
{
    if (!pool__m.running)
        return 0;
    int total = 0, n;
    if (enforce_limits() < 0)
        return -1;
    if ((n = handle_deaths()) < 0)
        return -1;
    total += n;
    for (int i = 0; i < pool__m.nworkers; i++) {
        if ((n = drain_slot(i, pool__m.slots[i].killing)) < 0)
            return -1;
        total += n;
    }
    if ((n = complete_failed()) < 0)
        return -1;
    total += n;
    pool__flush_queue();
    return total;
}

int
pool__ready(void)
{
    if (!pool__m.running)
        return 0;
    if (atomic_load(&exec__shared->deaths) != pool__m.seen_deaths)
        return 1;
    for (int i = 0; i < pool__m.nworkers; i++)
        if (!ring_empty(exec__to_master(i)))
            return 1;
    return 0;
}

/* ---- fork server restarts --------------------------------------------------------------------- */

/* Whether pid has exited (gone, or a zombie waiting for whoever reaps it now). */
static int
process_gone(pid_t pid)
{
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return 1;
    char path[64], state = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 1;
    int ok = fscanf(f, "%*d (%*[^)]) %c", &state) == 1;
    fclose(f);
    return !ok || state == 'Z' || state == 'X';
}

/* The fork server died (killed from outside): its workers die with it (they are killed here
 * too, and PDEATHSIG kills them anyway). Once they are gone, what they finished is kept, the
 * rest runs again, and a new fork server is forked from here, as enable() did. Returns the
 * number of completions, or -1 + exception when it keeps dying. */
static int
restart_forkserver(int status)
{
    /* Killed from outside (SIGKILL) it is always restarted; crashing or exiting by itself again
     * and again, it would only crash again: then the pool ends. */
    double now = pydron_now();
    if (now - restart_window_start > FORKSERVER_RESTART_WINDOW_S) {
        restart_window_start = now;
        restarts = 0;
    }
    if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) &&
        ++restarts > MAX_FORKSERVER_RESTARTS) {
        pool__shutdown(1);
        PyErr_Format(PyExc_RuntimeError, "pydron: the executor's fork server failed %d times "
                     "within %d s (last: status %d); the process pool is gone",
                     MAX_FORKSERVER_RESTARTS, (int)FORKSERVER_RESTART_WINDOW_S, status);
        return -1;
    }
    close(pool__m.fs_sock);
    pool__m.fs_sock = -1;
    pid_t pids[EXEC_MAX_WORKERS] = {0};
    for (int i = 0; i < pool__m.nworkers; i++) {
        pids[i] = atomic_load(&exec__shared->slots[i].pid);
        if (pids[i] > 0)
            kill(pids[i], SIGKILL);
    }
    for (int i = 0; i < pool__m.nworkers; i++)
        for (int k = 0; pids[i] > 0 && k < POOL_REAP_WAIT_MS && !process_gone(pids[i]); k++)
            usleep(1000);
    int total = 0;
    for (int i = 0; i < pool__m.nworkers; i++) {
        atomic_store(&exec__shared->slots[i].pid, 0);
        int n = handle_death(i, 0);
        if (n < 0)
            return -1;
        total += n;
        pool__m.slots[i].seen_deaths = atomic_load(&exec__shared->slots[i].deaths);
    }
    pool__m.seen_deaths = atomic_load(&exec__shared->deaths);
    int sock;
    pid_t pid = exec__forkserver_start(&sock);
    if (pid < 0) {
        PyObject *exc = PyErr_GetRaisedException();
        pool__shutdown(1);
        PyErr_SetRaisedException(exc);
        return -1;
    }
    pool__m.fs_pid = pid;
    pool__m.fs_sock = sock;
    pool__m.synced_modules = 0;
    pool__m.workers_started = 0;
    pool__start_workers();
    pool__flush_queue();
    return total;
}

int
pool__check(void)
{
    int st;
    if (!pool__m.running || waitpid(pool__m.fs_pid, &st, WNOHANG) == 0)
        return 0;
    return restart_forkserver(st) < 0 ? -1 : 0;
}

/* ---- cancelling ------------------------------------------------------------------------------- */

/* Drop the cancelled tasks of a list; with sorted NULL, all of them. Returns the rest. */
static mtask *
filter_cancelled(mtask *t, const uint64_t *sorted, Py_ssize_t n, mtask **tail)
{
    mtask *head = NULL;
    *tail = NULL;
    for (mtask *next; t; t = next) {
        next = t->next;
        if (sorted == NULL || exec__id_in(sorted, n, t->id)) {
            pool__task_free(t);
            pool__m.outstanding--;
            continue;
        }
        pool__list_append(&head, tail, t);
    }
    return head;
}

/* The cancelled tasks no worker has: queued, or given up on and not reported yet. */
static void
drop_cancelled_unsent(const uint64_t *sorted, Py_ssize_t n)
{
    pool__m.q_head = filter_cancelled(pool__m.q_head, sorted, n, &pool__m.q_tail);
    pool__m.failed_head = filter_cancelled(pool__m.failed_head, sorted, n, &pool__m.failed_tail);
}

/* Soft cancel: queued tasks are dropped, tasks already in a worker's ring run to their end and
 * their results are dropped (no worker is killed: for speculation gone wrong, where the tasks are
 * tiny and side-effect free). */
void
pool__forget(const uint64_t *sorted, Py_ssize_t n)
{
    if (!pool__m.running)
        return;
    drop_cancelled_unsent(sorted, n);
    for (int i = 0; i < pool__m.nworkers; i++)
        for (mtask *t = pool__m.slots[i].head; t; t = t->next)
            if (exec__id_in(sorted, n, t->id))
                t->forgotten = 1;
}

void
pool__cancel(const uint64_t *sorted, Py_ssize_t n)
{
    if (!pool__m.running)
        return;
    drop_cancelled_unsent(sorted, n);
    for (int i = 0; i < pool__m.nworkers; i++) {
        mslot *s = &pool__m.slots[i];
        /* What finished is handed over (exec_cancel drops the cancelled ones' completions). */
        if (drain_slot(i, s->killing) < 0)
            PyErr_Clear();
        int hit = 0;
        for (mtask *t = s->head; t && !hit; t = t->next)
            hit = sorted == NULL || exec__id_in(sorted, n, t->id);
        if (!hit)
            continue;
        /* A ring cannot be taken back: the worker is killed, and the tasks it held that were
         * not cancelled run again on another worker. */
        kill_slot(i);
        mtask *tail;
        mtask *keep = filter_cancelled(s->head, sorted, n, &tail);
        requeue_front(keep, tail);
        s->head = s->tail = NULL;
        s->count = 0;
        s->queued_ns = 0;
    }
}

void
exec__cancel_all(void)
{
    PyObject *exc = PyErr_GetRaisedException();
    pool__cancel(NULL, 0);
    exec__thread_backend.cancel(NULL, 0);
    PyErr_SetRaisedException(exc);
}
