/* exec/pool.c — the master side of the process pool: the shared control block and arena, the
 * queue of tasks not yet in a worker's ring, dispatching tasks (and function definitions) into
 * rings, reading results back, blaming and replacing dead workers, cancelling, start and stop.
 * Thread and GIL model: master only, GIL held; workers and the fork server touch only the
 * shared control block, the rings and the arena. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/internal.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <sys/wait.h>
#include <unistd.h>

/* A worker gets tasks while it has fewer than MIN_INFLIGHT, or while the expected run time of
 * what it has stays under QUEUE_NS (and MAX_INFLIGHT): tiny tasks stream in hundreds, long ones
 * stay in the master's queue and go to whichever worker frees up first. */
#define MAX_INFLIGHT 256
#define MIN_INFLIGHT 2
#define QUEUE_NS 50e6
#define UNKNOWN_NS 1e6                 /* expected run time of a function never timed yet */
#define MAX_KILLS 3                    /* a task that killed this many workers fails */
#define MAX_IDLE_DEATHS 20             /* a slot whose workers die this often idle is disabled */
#define ARENA_MAX ((size_t)32 << 30)   /* the arena reserves up to this, never beyond RAM */
#define ARENA_MIN ((size_t)64 << 20)
#define REAP_WAIT_MS 2000              /* for the fork server to quit before it is killed */
#define RING_CAPACITY ring_capacity_for(EXEC_RING_BYTES)   /* the master's own copy */
#define MAX_FORKSERVER_RESTARTS 5      /* crashes within FORKSERVER_RESTART_WINDOW_S: give up */
#define LIMITS_CHECK_NS 10000000       /* how often timeouts and memory limits are checked */
#define FORKSERVER_RESTART_WINDOW_S 10.0

typedef struct mtask {
    struct mtask *next;
    uint64_t id;
    uint32_t fn_id;
    int kills;
    double est_ns;             /* expected run time when dispatched */
    uint64_t timeout_ns;       /* 0: none */
    size_t memory_limit;       /* 0: none */
    int chunk;                 /* a chunk of a map: WIRE_TASK_CHUNK */
    int forgotten;             /* cancelled softly while in a ring: its result is dropped */
    PyObject *fn;              /* strong */
    PyObject *error;           /* WorkerLostError once given up on */
    exec_blob *args;           /* owned */
    Py_ssize_t ndeps;
    exec_blob *deps[];         /* owned */
} mtask;

typedef struct {
    mtask *head, *tail;        /* written to the worker's ring, result not yet read: ring order */
    Py_ssize_t count;
    double queued_ns;          /* expected run time of the tasks in flight */
    int spawned;               /* the fork server was asked for a worker and it has not died */
    int killing;               /* SIGKILLed by a cancel: its death is expected */
    int disabled;              /* died too often without running anything */
    int poisoned;              /* wrote a malformed record: nothing more is read from it */
    int idle_deaths;
    uint32_t seen_deaths;
    uint8_t *defined;          /* fn ids already sent to the current worker */
    size_t defined_cap;
} mslot;

static struct {
    int running, nworkers;
    void *ctl;
    size_t ctl_size;
    void *arena_mem;
    size_t arena_size;
    pid_t fs_pid;
    int fs_sock;
    int workers_started;
    mslot slots[EXEC_MAX_WORKERS];
    mtask *q_head, *q_tail;            /* submitted, not yet in a ring */
    mtask *failed_head, *failed_tail;  /* given up on, to report */
    Py_ssize_t outstanding;
    uint32_t seen_deaths;
    int rr;
    int forgotten;                     /* a fork of user code dropped the parent's pool */
    int restarts;                      /* fork server restarts in the current window */
    Py_ssize_t limited;                /* outstanding tasks with a timeout or a memory limit */
    Py_ssize_t synced_modules;         /* len(sys.modules) when the fork server last imported */
    uint64_t limits_checked_ns;
    double restart_window_start;
} M;

int
exec_running(void)
{
    return M.running;
}

int
exec_nworkers(void)
{
    return M.running ? M.nworkers : 0;
}

static void
task_free(mtask *t)
{
    if (t->timeout_ns || t->memory_limit)
        M.limited--;
    Py_XDECREF(t->fn);
    Py_XDECREF(t->error);
    exec_blob_decref(t->args);
    for (Py_ssize_t i = 0; i < t->ndeps; i++)
        exec_blob_decref(t->deps[i]);
    PyMem_RawFree(t);
}

/* Forget a list of tasks; with_python 0 (interpreter gone) leaks their Python references. */
static void
free_task_list(mtask *t, int with_python)
{
    while (t) {
        mtask *next = t->next;
        if (with_python)
            task_free(t);
        M.outstanding--;
        t = next;
    }
}

static void
list_append(mtask **head, mtask **tail, mtask *t)
{
    t->next = NULL;
    if (*tail)
        (*tail)->next = t;
    else
        *head = t;
    *tail = t;
}

static int
slot_defined(mslot *s, uint32_t fn_id)
{
    return fn_id < s->defined_cap && s->defined[fn_id];
}

static int
slot_mark_defined(mslot *s, uint32_t fn_id)
{
    if (fn_id >= s->defined_cap) {
        size_t cap = s->defined_cap ? s->defined_cap : 64;
        while (cap <= fn_id)
            cap *= 2;
        uint8_t *d = PyMem_RawRealloc(s->defined, cap);
        if (d == NULL)
            return -1;
        memset(d + s->defined_cap, 0, cap - s->defined_cap);
        s->defined = d;
        s->defined_cap = cap;
    }
    s->defined[fn_id] = 1;
    return 0;
}

/* ---- dispatching ------------------------------------------------------------------------------ */

/* The modules the master imported since the fork server was forked are imported there before
 * it forks a worker: pydron run enables pydron before the script's first line, and every worker
 * would otherwise import the script's libraries again on its first task. */
static void
sync_imports(void)
{
    PyObject *modules = PySys_GetObject("modules");          /* borrowed */
    if (modules == NULL || !PyDict_Check(modules) || PyDict_GET_SIZE(modules) == M.synced_modules)
        return;
    PyObject *names = exec__call_helper("imports_since_fork", NULL, 0);
    if (names != NULL && PyBytes_Check(names))
        exec__forkserver_import(M.fs_sock, PyBytes_AS_STRING(names),
                                (size_t)PyBytes_GET_SIZE(names));
    Py_XDECREF(names);
    PyErr_Clear();
    M.synced_modules = PyDict_GET_SIZE(modules);
}

int
exec_sync_imports(void)
{
    if (!M.running || M.workers_started)
        return 0;
    sync_imports();
    return 1;
}

static void
spawn_worker(int i)
{
    mslot *s = &M.slots[i];
    if (s->disabled)
        return;
    sync_imports();
    if (exec__forkserver_spawn(M.fs_sock, i) == 0)
        s->spawned = 1;
}

static void
start_workers(void)
{
    if (M.workers_started)
        return;
    M.workers_started = 1;
    for (int i = 0; i < M.nworkers; i++)
        spawn_worker(i);
}

/* Least-outstanding live worker with room for a task expected to run est_ns, or -1. */
static int
pick_slot(double est_ns)
{
    int best = -1;
    for (int k = 0; k < M.nworkers; k++) {
        int i = (M.rr + k) % M.nworkers;
        mslot *s = &M.slots[i];
        if (!s->spawned || s->killing || s->disabled || s->count >= MAX_INFLIGHT)
            continue;
        if (s->count >= MIN_INFLIGHT && s->queued_ns + est_ns > QUEUE_NS)
            continue;
        if (best < 0 || s->count < M.slots[best].count)
            best = i;
    }
    M.rr = M.nworkers ? (M.rr + 1) % M.nworkers : 0;
    return best;
}

/* Write the DEFINE record of fn_id into ring r. 0, or -1 when there is no room now. */
static int
write_define(ring *r, uint32_t fn_id)
{
    exec_blob *fb = exec__fn_blob(fn_id);
    wire_out o;
    int full;
    char *dst = wire_begin(&o, r, exec__arena, WIRE_DEFINE,
                           sizeof(wire_define) + exec__blob_wire_size(fb), &full);
    if (dst == NULL)
        return -1;
    ((wire_define *)dst)->fn_id = fn_id;
    exec__blob_wire_write(dst + sizeof(wire_define), fb);
    if (wire_finish(&o) < 0) {
        wire_abandon(&o);
        return -1;
    }
    return 0;
}

/* Write t's TASK record into ring r (the blobs' references stay the task's). 0, or -1 when there
 * is no room now. */
static int
write_task(ring *r, mtask *t)
{
    size_t n = sizeof(wire_task) + exec__blob_wire_size(t->args);
    for (Py_ssize_t d = 0; d < t->ndeps; d++)
        n += exec__blob_wire_size(t->deps[d]);
    wire_out o;
    int full;
    char *dst = wire_begin(&o, r, exec__arena, WIRE_TASK, n, &full);
    if (dst == NULL)
        return -1;
    wire_task *hdr = (wire_task *)dst;
    hdr->task_id = t->id;
    hdr->fn_id = t->fn_id;
    hdr->ndeps = (uint32_t)t->ndeps;
    hdr->flags = t->chunk ? WIRE_TASK_CHUNK : 0;
    hdr->pad = 0;
    char *p = dst + sizeof(wire_task);
    for (Py_ssize_t d = 0; d < t->ndeps; d++)
        p += exec__blob_wire_write(p, t->deps[d]);
    exec__blob_wire_write(p, t->args);
    if (wire_finish(&o) < 0) {
        wire_abandon(&o);
        return -1;
    }
    return 0;
}

/* Write t (and its function's definition, first time on that worker) into a worker's ring.
 * 0, or -1 when no worker has room now (t stays the caller's). */
static int
dispatch(mtask *t)
{
    double est = exec__fn_estimate(t->fn_id);
    t->est_ns = est < 0 ? UNKNOWN_NS : est;
    int i = pick_slot(t->est_ns);
    if (i < 0)
        return -1;
    mslot *s = &M.slots[i];
    ring *r = exec__to_worker(i);
    if (!slot_defined(s, t->fn_id)) {
        if (write_define(r, t->fn_id) < 0 || slot_mark_defined(s, t->fn_id) < 0)
            return -1;
    }
    if (write_task(r, t) < 0) {
        wake_notify(&r->readable);
        return -1;
    }
    wake_notify(&r->readable);
    list_append(&s->head, &s->tail, t);
    s->count++;
    s->queued_ns += t->est_ns;
    return 0;
}

static void
flush_queue(void)
{
    while (M.q_head) {
        mtask *t = M.q_head;
        mtask *next = t->next;
        if (dispatch(t) < 0)
            return;
        M.q_head = next;
        if (M.q_head == NULL)
            M.q_tail = NULL;
    }
}

static int
pool_submit(const exec_task *et)
{
    if (!M.running) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: the process executor is not running");
        return -1;
    }
    int missing = et->args == NULL || (et->ndeps > 0 && et->deps == NULL);
    for (Py_ssize_t d = 0; !missing && d < et->ndeps; d++)
        missing = et->deps[d] == NULL;
    if (missing) {
        PyErr_Format(PyExc_SystemError, "pydron: task %llu: its arguments or a dependency are "
                     "not encoded (encode thread results with exec_encode_value)",
                     (unsigned long long)et->task_id);
        return -1;
    }
    Py_ssize_t fn_id = exec__fn_id(et->fn);
    if (fn_id < 0)
        return -1;
    mtask *t = PyMem_RawMalloc(sizeof(mtask) + et->ndeps * sizeof(exec_blob *));
    if (t == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->next = NULL;
    t->id = et->task_id;
    t->fn_id = (uint32_t)fn_id;
    t->kills = 0;
    double timeout = et->timeout_s > 0 ? et->timeout_s : exec__options.task_timeout_s;
    t->timeout_ns = timeout > 0 ? (uint64_t)(timeout * 1e9) : 0;
    t->memory_limit = et->memory_limit;
    t->chunk = et->chunk;
    t->forgotten = 0;
    if (t->timeout_ns || t->memory_limit)
        M.limited++;
    t->fn = Py_NewRef(et->fn);
    t->error = NULL;
    t->args = et->args;
    exec_blob_incref(t->args);
    t->ndeps = et->ndeps;
    for (Py_ssize_t d = 0; d < et->ndeps; d++) {
        t->deps[d] = et->deps[d];
        exec_blob_incref(t->deps[d]);
    }
    M.outstanding++;
    exec__install_array_allocator();    /* once numpy is imported: the master's arrays too */
    exec__note_arena_full();
    start_workers();
    if (M.q_head == NULL && dispatch(t) == 0)
        return 0;
    list_append(&M.q_head, &M.q_tail, t);
    flush_queue();
    return 0;
}

/* ---- results and deaths ----------------------------------------------------------------------- */

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
    M.outstanding--;
    int forgotten = t->forgotten;
    task_free(t);
    if (forgotten) {
        /* Nobody waits for it any more (exec_forget). */
        exec_blob_decref(blob);
        Py_XDECREF(object);
        return 0;
    }
    return exec__complete(&c);
}

static void kill_slot(int i);

/* A worker wrote a record the master cannot trust: fail the task it was for (the oldest one in
 * flight) with an error naming the problem, and replace the worker. -1 + exception only when
 * even that fails. */
static int
reject_record(int i, const char *what, const char *detail)
{
    mslot *s = &M.slots[i];
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
    mslot *s = &M.slots[i];
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

static void
requeue_front(mtask *head, mtask *tail)
{
    if (head == NULL)
        return;
    tail->next = M.q_head;
    M.q_head = head;
    if (M.q_tail == NULL)
        M.q_tail = tail;
}

/* Worker i died: keep what it finished, blame the task it was running (unless blame is 0: the
 * fork server died, or the worker was killed on purpose), re-run the rest on a replacement.
 * Returns the number of completions, or -1 + exception. */
static int
handle_death(int i, int blame)
{
    mslot *s = &M.slots[i];
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
            M.outstanding--;
            task_free(t);
            continue;
        }
        if (blame && !s->killing && t->id == blamed && blamed != 0 && ++t->kills >= MAX_KILLS) {
            t->error = worker_lost_error(t, status, atomic_load(&sh->death_maxrss_kb));
            list_append(&M.failed_head, &M.failed_tail, t);
            continue;
        }
        list_append(&keep_head, &keep_tail, t);
    }
    if (blame && blamed == 0 && !s->killing && ++s->idle_deaths > MAX_IDLE_DEATHS)
        s->disabled = 1;    /* dies without running anything: do not fork it forever */
    s->head = s->tail = NULL;
    s->count = 0;
    s->queued_ns = 0;
    s->killing = 0;
    s->poisoned = 0;
    requeue_front(keep_head, keep_tail);
    if (M.running)
        spawn_worker(i);
    return n;
}

static int
handle_deaths(void)
{
    uint32_t d = atomic_load(&exec__shared->deaths);
    if (d == M.seen_deaths)
        return 0;
    M.seen_deaths = d;
    int n = 0;
    for (int i = 0; i < M.nworkers; i++) {
        uint32_t sd = atomic_load(&exec__shared->slots[i].deaths);
        if (sd == M.slots[i].seen_deaths)
            continue;
        M.slots[i].seen_deaths = sd;
        int k = handle_death(i, 1);
        if (k < 0)
            return -1;
        n += k;
    }
    /* Every worker disabled: nothing will ever run what is queued. */
    int alive = 0;
    for (int i = 0; i < M.nworkers; i++)
        alive += !M.slots[i].disabled;
    while (!alive && M.q_head) {
        mtask *t = M.q_head;
        M.q_head = t->next;
        if (M.q_head == NULL)
            M.q_tail = NULL;
        t->error = exec__call_helper("workers_die_at_start", NULL, 0);
        if (t->error == NULL)
            return -1;
        list_append(&M.failed_head, &M.failed_tail, t);
    }
    return n;
}

static int
complete_failed(void)
{
    int n = 0;
    while (M.failed_head) {
        mtask *t = M.failed_head;
        M.failed_head = t->next;
        if (M.failed_head == NULL)
            M.failed_tail = NULL;
        PyObject *exc = t->error;
        t->error = NULL;
        n++;
        if (complete(t, 1, NULL, exc, 0, 0) < 0)
            return -1;
    }
    return n;
}

static void requeue_front(mtask *head, mtask *tail);

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
    mslot *s = &M.slots[i];
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
            list_append(&keep, &tail, x);
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
    if (M.limited == 0 || now - M.limits_checked_ns < LIMITS_CHECK_NS)
        return 0;
    M.limits_checked_ns = now;
    for (int i = 0; i < M.nworkers; i++) {
        mslot *s = &M.slots[i];
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

/* One round: deaths, results, failures, limits; then refill the rings. */
static int
pool_collect(void)
{
    if (!M.running)
        return 0;
    int total = 0, n;
    if (enforce_limits() < 0)
        return -1;
    if ((n = handle_deaths()) < 0)
        return -1;
    total += n;
    for (int i = 0; i < M.nworkers; i++) {
        if ((n = drain_slot(i, M.slots[i].killing)) < 0)
            return -1;
        total += n;
    }
    if ((n = complete_failed()) < 0)
        return -1;
    total += n;
    flush_queue();
    return total;
}

static int
pool_ready(void)
{
    if (!M.running)
        return 0;
    if (atomic_load(&exec__shared->deaths) != M.seen_deaths)
        return 1;
    for (int i = 0; i < M.nworkers; i++)
        if (!ring_empty(exec__to_master(i)))
            return 1;
    return 0;
}

static Py_ssize_t
pool_outstanding(void)
{
    return M.outstanding;
}

static void shutdown_pool(int with_python);

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
 * rest runs again, and a new fork server is forked from here, as enable() did. 0, or -1 + exc
 * when it keeps dying. */
static int
restart_forkserver(int status)
{
    /* Killed from outside (SIGKILL) it is always restarted; crashing or exiting by itself again
     * and again, it would only crash again: then the pool ends. */
    double now = pydron_now();
    if (now - M.restart_window_start > FORKSERVER_RESTART_WINDOW_S) {
        M.restart_window_start = now;
        M.restarts = 0;
    }
    if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) &&
        ++M.restarts > MAX_FORKSERVER_RESTARTS) {
        shutdown_pool(1);
        PyErr_Format(PyExc_RuntimeError, "pydron: the executor's fork server failed %d times "
                     "within %d s (last: status %d); the process pool is gone",
                     MAX_FORKSERVER_RESTARTS, (int)FORKSERVER_RESTART_WINDOW_S, status);
        return -1;
    }
    close(M.fs_sock);
    M.fs_sock = -1;
    pid_t pids[EXEC_MAX_WORKERS] = {0};
    for (int i = 0; i < M.nworkers; i++) {
        pids[i] = atomic_load(&exec__shared->slots[i].pid);
        if (pids[i] > 0)
            kill(pids[i], SIGKILL);
    }
    for (int i = 0; i < M.nworkers; i++)
        for (int k = 0; pids[i] > 0 && k < REAP_WAIT_MS && !process_gone(pids[i]); k++)
            usleep(1000);
    int total = 0;
    for (int i = 0; i < M.nworkers; i++) {
        atomic_store(&exec__shared->slots[i].pid, 0);
        int n = handle_death(i, 0);
        if (n < 0)
            return -1;
        total += n;
        M.slots[i].seen_deaths = atomic_load(&exec__shared->slots[i].deaths);
    }
    M.seen_deaths = atomic_load(&exec__shared->deaths);
    int sock;
    pid_t pid = exec__forkserver_start(&sock);
    if (pid < 0) {
        PyObject *exc = PyErr_GetRaisedException();
        shutdown_pool(1);
        PyErr_SetRaisedException(exc);
        return -1;
    }
    M.fs_pid = pid;
    M.fs_sock = sock;
    M.synced_modules = 0;
    M.workers_started = 0;
    start_workers();
    flush_queue();
    return total;
}

static int
pool_check(void)
{
    int st;
    if (!M.running || waitpid(M.fs_pid, &st, WNOHANG) == 0)
        return 0;
    return restart_forkserver(st) < 0 ? -1 : 0;
}

/* SIGKILL worker i (waiting briefly for it to have a pid) and expect its death. */
static void
kill_slot(int i)
{
    mslot *s = &M.slots[i];
    exec_slot *sh = &exec__shared->slots[i];
    pid_t pid = 0;
    for (int k = 0; k < 2000 && s->spawned && (pid = atomic_load(&sh->pid)) == 0; k++)
        usleep(1000);
    if (pid > 0)
        kill(pid, SIGKILL);
    s->killing = 1;
}

/* Drop the cancelled tasks of a list; with sorted NULL, all of them. Returns the rest. */
static mtask *
filter_cancelled(mtask *t, const uint64_t *sorted, Py_ssize_t n, mtask **tail)
{
    mtask *head = NULL;
    *tail = NULL;
    for (mtask *next; t; t = next) {
        next = t->next;
        if (sorted == NULL || exec__id_in(sorted, n, t->id)) {
            task_free(t);
            M.outstanding--;
            continue;
        }
        list_append(&head, tail, t);
    }
    return head;
}

/* Soft cancel: queued tasks are dropped, tasks already in a worker's ring run to their end and
 * their results are dropped (no worker is killed: for speculation gone wrong, where the tasks are
 * tiny and side-effect free). */
static void
pool_forget(const uint64_t *sorted, Py_ssize_t n)
{
    if (!M.running)
        return;
    M.q_head = filter_cancelled(M.q_head, sorted, n, &M.q_tail);
    M.failed_head = filter_cancelled(M.failed_head, sorted, n, &M.failed_tail);
    for (int i = 0; i < M.nworkers; i++)
        for (mtask *t = M.slots[i].head; t; t = t->next)
            if (exec__id_in(sorted, n, t->id))
                t->forgotten = 1;
}

static void
pool_cancel(const uint64_t *sorted, Py_ssize_t n)
{
    if (!M.running)
        return;
    M.q_head = filter_cancelled(M.q_head, sorted, n, &M.q_tail);
    M.failed_head = filter_cancelled(M.failed_head, sorted, n, &M.failed_tail);
    for (int i = 0; i < M.nworkers; i++) {
        mslot *s = &M.slots[i];
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
    pool_cancel(NULL, 0);
    exec__thread_backend.cancel(NULL, 0);
    PyErr_SetRaisedException(exc);
}

/* ---- start and shutdown ----------------------------------------------------------------------- */

static size_t
physical_memory(void)
{
    struct sysinfo si;
    if (sysinfo(&si) != 0)
        return (size_t)1 << 30;
    return (size_t)si.totalram * si.mem_unit;
}

static void
atexit_shutdown(void)
{
    shutdown_pool(0);
}

/* In a child forked by user code (os.fork, multiprocessing), the pool is the parent's: forget it
 * without touching it (no QUIT, no kill, no unmap), so the child's exit cannot stop it and its
 * tasks cannot land in the parent's rings. The child may start a pool of its own. */
void
exec__pool_forget_in_child(void)
{
    if (exec__internal_fork || !M.running)
        return;
    if (M.fs_sock >= 0)
        close(M.fs_sock);
    M.running = 0;
    M.forgotten = 1;               /* the Python-side tables are reset by the next exec_start */
    M.q_head = M.q_tail = M.failed_head = M.failed_tail = NULL;
    memset(M.slots, 0, sizeof(M.slots));
    M.outstanding = 0;
    guard_detach_after_fork();     /* the child's arrays keep their bytes, privately */
    exec__user_fork_child = 1;
    exec__shared = NULL;
    exec__arena = NULL;
    exec__set_master_word(NULL);
}

/* The control block: the shared header and two rings per worker. NULL + exception. */
static exec_shared *
map_control(int nworkers, size_t *size)
{
    size_t head = (sizeof(exec_shared) + 4095) & ~(size_t)4095;
    *size = head + (size_t)nworkers * 2 * EXEC_RING_BYTES;
    void *ctl = mmap(NULL, *size, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ctl == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    exec_shared *sh = ctl;
    sh->nslots = nworkers;
    sh->wire_version = WIRE_VERSION;
    for (int i = 0; i < nworkers; i++) {
        sh->slots[i].to_worker_off = head + (size_t)i * 2 * EXEC_RING_BYTES;
        sh->slots[i].to_master_off = sh->slots[i].to_worker_off + EXEC_RING_BYTES;
        ring_init((char *)ctl + sh->slots[i].to_worker_off, EXEC_RING_BYTES);
        ring_init((char *)ctl + sh->slots[i].to_master_off, EXEC_RING_BYTES);
    }
    /* A crashing worker must not dump the shared memory into a core file. */
    madvise(ctl, *size, MADV_DONTDUMP);
    return sh;
}

/* The arena: as much address space as RAM (up to ARENA_MAX), reserved, not committed. It is an
 * anonymous memfd (nothing in /dev/shm, gone with the last process), so that a block's shared
 * mapping can be put back over a private copy of it (guard.c). *fd: the memfd. */
static void *
map_arena(size_t *size, int *fd)
{
    size_t want = physical_memory();
    if (want > ARENA_MAX)
        want = ARENA_MAX;
    *fd = memfd_create("pydron-arena", MFD_CLOEXEC);
    if (*fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    for (; want >= ARENA_MIN; want /= 2) {
        if (ftruncate(*fd, (off_t)want) < 0)
            continue;
        void *mem = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, *fd, 0);
        if (mem != MAP_FAILED) {
            madvise(mem, want, MADV_DONTDUMP);
            *size = want;
            return mem;
        }
    }
    PyErr_SetFromErrno(PyExc_OSError);
    close(*fd);
    *fd = -1;
    return NULL;
}

int
exec_start(int nworkers)
{
    if (exec__in_worker_flag)
        return 0;             /* a worker never runs a pool of its own: calls run plainly there */
    if (nworkers <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nworkers = n > 0 ? (int)n : 1;
    }
    if (nworkers > EXEC_MAX_WORKERS)
        nworkers = EXEC_MAX_WORKERS;
    if (M.running) {
        if (nworkers == M.nworkers)
            return 0;
        shutdown_pool(1);
    }
    if (M.forgotten) {             /* function blobs may point into the parent's arena */
        exec__fn_table_clear(1);
        M.forgotten = 0;
    }
    if (exec__helpers_before_fork() < 0)
        return -1;
    size_t ctl_size, arena_size;
    exec_shared *sh = map_control(nworkers, &ctl_size);
    if (sh == NULL)
        return -1;
    int arena_fd;
    void *mem = map_arena(&arena_size, &arena_fd);
    if (mem == NULL) {
        munmap(sh, ctl_size);
        return -1;
    }
    exec__shared = sh;
    exec__arena = arena_create(mem, arena_size);
    exec__arena_fd = arena_fd;
    exec__arena_size = arena_size;
    if (guard_start(exec__arena, arena_fd, arena_size, GUARD_MERGE) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        munmap(mem, arena_size);
        munmap(sh, ctl_size);
        close(arena_fd);
        exec__shared = NULL;
        exec__arena = NULL;
        return -1;
    }
    M.ctl = sh;
    M.ctl_size = ctl_size;
    M.arena_mem = mem;
    M.arena_size = arena_size;
    M.nworkers = nworkers;
    M.seen_deaths = 0;
    M.workers_started = 0;
    M.outstanding = 0;
    memset(M.slots, 0, sizeof(M.slots));

    int sock;
    pid_t pid = exec__forkserver_start(&sock);
    if (pid < 0) {
        munmap(mem, arena_size);
        munmap(sh, ctl_size);
        exec__shared = NULL;
        exec__arena = NULL;
        return -1;
    }
    M.fs_pid = pid;
    M.fs_sock = sock;
    M.synced_modules = 0;
    M.running = 1;
    exec__set_master_word(&sh->master);
    exec__install_array_allocator();
    static int atexit_registered;
    if (!atexit_registered) {
        Py_AtExit(atexit_shutdown);
        atexit_registered = 1;
    }
    return 0;
}

/* with_python: the interpreter is alive (and the GIL held), so Python references can be dropped;
 * at Py_AtExit time they are simply forgotten. */
static void
shutdown_pool(int with_python)
{
    if (!M.running)
        return;
    M.running = 0;
    exec__forkserver_quit(M.fs_sock);
    close(M.fs_sock);
    int st;
    pid_t r = 0;
    for (int k = 0; k < REAP_WAIT_MS && (r = waitpid(M.fs_pid, &st, WNOHANG)) == 0; k++)
        usleep(1000);
    if (r == 0) {
        for (int i = 0; i < M.nworkers; i++) {
            pid_t w = atomic_load(&exec__shared->slots[i].pid);
            if (w > 0)
                kill(w, SIGKILL);
        }
        kill(M.fs_pid, SIGKILL);
        waitpid(M.fs_pid, &st, 0);
    }
    free_task_list(M.q_head, with_python);
    free_task_list(M.failed_head, with_python);
    M.q_head = M.q_tail = M.failed_head = M.failed_tail = NULL;
    for (int i = 0; i < M.nworkers; i++) {
        free_task_list(M.slots[i].head, with_python);
        PyMem_RawFree(M.slots[i].defined);
    }
    memset(M.slots, 0, sizeof(M.slots));
    M.outstanding = 0;
    exec__codec_memo_clear(with_python);
    exec__fn_table_clear(with_python);
    exec__shared = NULL;
    /* Wake sleepers (they see the pool gone); if one is still inside, leave the control block
     * mapped: it is anonymous memory, gone with the process, and a few pages at most. */
    int unmap = exec__wake_sleepers();
    exec__set_master_word(NULL);
    if (unmap)
        munmap(M.ctl, M.ctl_size);
    /* Lending is over: private copies merged back, protections lifted. */
    guard_stop(0);
    if (atomic_load(&exec__live_arena_refs) == 0) {
        guard_stop(1);
        munmap(M.arena_mem, M.arena_size);   /* else an array still views it: leave it mapped */
    }
    if (exec__arena_fd >= 0 && atomic_load(&exec__live_arena_refs) == 0) {
        close(exec__arena_fd);
        exec__arena_fd = -1;
    }
    exec__arena = NULL;
}

const exec_backend exec__process_backend = {
    .name = "processes",
    .submit = pool_submit,
    .collect = pool_collect,
    .ready = pool_ready,
    .check = pool_check,
    .cancel = pool_cancel,
    .forget = pool_forget,
    .outstanding = pool_outstanding,
    .shutdown = shutdown_pool,
};

PyObject *
exec__pool_info(void)
{
    PyObject *pids = PyList_New(0);
    for (int i = 0; pids && M.running && i < M.nworkers; i++) {
        PyObject *p = PyLong_FromLong(atomic_load(&exec__shared->slots[i].pid));
        if (p == NULL || PyList_Append(pids, p) < 0)
            Py_CLEAR(pids);
        Py_XDECREF(p);
    }
    if (pids == NULL)
        return NULL;
    arena_stats st = {0};
    if (exec__arena)
        arena_get_stats(exec__arena, &st);
    guard_stats gs;
    guard_get_stats(&gs);
    return Py_BuildValue("{s:i,s:i,s:i,s:N,s:n,s:K,s:K,s:K,s:K,s:n,s:n,s:K,s:K,s:K,s:K}",
                         "running", M.running, "nworkers", exec_nworkers(),
                         "forkserver", M.running ? (int)M.fs_pid : 0, "workers", pids,
                         "outstanding", exec_outstanding(),
                         "arena_pages", (unsigned long long)st.total_pages,
                         "arena_used_pages", (unsigned long long)st.used_pages,
                         "arena_free_dirty_pages", (unsigned long long)st.free_dirty_pages,
                         "arena_trims", (unsigned long long)st.trims,
                         "arena_live_refs", (Py_ssize_t)atomic_load(&exec__live_arena_refs),
                         "functions", exec__fn_count(),
                         "guard_protects", (unsigned long long)gs.protects,
                         "guard_copies", (unsigned long long)gs.copies,
                         "guard_merges", (unsigned long long)gs.merges,
                         "guard_discards", (unsigned long long)gs.discards);
}
