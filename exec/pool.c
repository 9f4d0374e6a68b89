/* exec/pool.c — the master side of the process pool, going out: the shared control block and
 * the arena (start and stop), the queue of tasks not yet in a worker's ring, and dispatching
 * tasks (and function definitions) into the rings. What comes back (results, deaths, limits,
 * fork server restarts, cancels) is pool_collect.c; the state both share is pool_internal.h.
 * Thread and GIL model: master only, GIL held; workers and the fork server touch only the
 * shared control block, the rings and the arena. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/pool_internal.h"

#include <signal.h>
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
#define ARENA_MAX ((size_t)32 << 30)   /* the arena reserves up to this, never beyond RAM */
#define ARENA_MIN ((size_t)64 << 20)

pool_state pool__m;

int
exec_running(void)
{
    return pool__m.running;
}

int
exec_nworkers(void)
{
    return pool__m.running ? pool__m.nworkers : 0;
}

void
pool__task_free(mtask *t)
{
    if (t->timeout_ns || t->memory_limit)
        pool__m.limited--;
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
            pool__task_free(t);
        pool__m.outstanding--;
        t = next;
    }
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
    if (modules == NULL || !PyDict_Check(modules) ||
        PyDict_GET_SIZE(modules) == pool__m.synced_modules)
        return;
    PyObject *names = exec__call_helper("imports_since_fork", NULL, 0);
    if (names != NULL && PyBytes_Check(names))
        exec__forkserver_import(pool__m.fs_sock, PyBytes_AS_STRING(names),
                                (size_t)PyBytes_GET_SIZE(names));
    Py_XDECREF(names);
    PyErr_Clear();
    pool__m.synced_modules = PyDict_GET_SIZE(modules);
}

int
exec_sync_imports(void)
{
    if (!pool__m.running || pool__m.workers_started)
        return 0;
    sync_imports();
    return 1;
}

void
pool__spawn_worker(int i)
{
    mslot *s = &pool__m.slots[i];
    if (s->disabled)
        return;
    sync_imports();
    if (exec__forkserver_spawn(pool__m.fs_sock, i) == 0)
        s->spawned = 1;
}

void
pool__start_workers(void)
{
    if (pool__m.workers_started)
        return;
    pool__m.workers_started = 1;
    for (int i = 0; i < pool__m.nworkers; i++)
        pool__spawn_worker(i);
}

/* Least-outstanding live worker with room for a task expected to run est_ns, or -1. */
static int
pick_slot(double est_ns)
{
    int best = -1;
    for (int k = 0; k < pool__m.nworkers; k++) {
        int i = (pool__m.rr + k) % pool__m.nworkers;
        mslot *s = &pool__m.slots[i];
        if (!s->spawned || s->killing || s->disabled || s->count >= MAX_INFLIGHT)
            continue;
        if (s->count >= MIN_INFLIGHT && s->queued_ns + est_ns > QUEUE_NS)
            continue;
        if (best < 0 || s->count < pool__m.slots[best].count)
            best = i;
    }
    pool__m.rr = pool__m.nworkers ? (pool__m.rr + 1) % pool__m.nworkers : 0;
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
    mslot *s = &pool__m.slots[i];
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
    pool__list_append(&s->head, &s->tail, t);
    s->count++;
    s->queued_ns += t->est_ns;
    return 0;
}

void
pool__flush_queue(void)
{
    while (pool__m.q_head) {
        mtask *t = pool__m.q_head;
        mtask *next = t->next;
        if (dispatch(t) < 0)
            return;
        pool__m.q_head = next;
        if (pool__m.q_head == NULL)
            pool__m.q_tail = NULL;
    }
}

static int
pool_submit(const exec_task *et)
{
    if (!pool__m.running) {
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
        pool__m.limited++;
    t->fn = Py_NewRef(et->fn);
    t->error = NULL;
    t->args = et->args;
    exec_blob_incref(t->args);
    t->ndeps = et->ndeps;
    for (Py_ssize_t d = 0; d < et->ndeps; d++) {
        t->deps[d] = et->deps[d];
        exec_blob_incref(t->deps[d]);
    }
    pool__m.outstanding++;
    exec__install_array_allocator();    /* once numpy is imported: the master's arrays too */
    exec__note_arena_full();
    pool__start_workers();
    if (pool__m.q_head == NULL && dispatch(t) == 0)
        return 0;
    pool__list_append(&pool__m.q_head, &pool__m.q_tail, t);
    pool__flush_queue();
    return 0;
}

static Py_ssize_t
pool_outstanding(void)
{
    return pool__m.outstanding;
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
    pool__shutdown(0);
}

/* In a child forked by user code (os.fork, multiprocessing), the pool is the parent's: forget it
 * without touching it (no QUIT, no kill, no unmap), so the child's exit cannot stop it and its
 * tasks cannot land in the parent's rings. The child may start a pool of its own. */
void
exec__pool_forget_in_child(void)
{
    if (exec__internal_fork || !pool__m.running)
        return;
    if (pool__m.fs_sock >= 0)
        close(pool__m.fs_sock);
    pool__m.running = 0;
    pool__m.forgotten = 1;         /* the Python-side tables are reset by the next exec_start */
    pool__m.q_head = pool__m.q_tail = pool__m.failed_head = pool__m.failed_tail = NULL;
    memset(pool__m.slots, 0, sizeof(pool__m.slots));
    pool__m.outstanding = 0;
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
    if (pool__m.running) {
        if (nworkers == pool__m.nworkers)
            return 0;
        pool__shutdown(1);
    }
    if (pool__m.forgotten) {       /* function blobs may point into the parent's arena */
        exec__fn_table_clear(1);
        pool__m.forgotten = 0;
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
    pool__m.ctl = sh;
    pool__m.ctl_size = ctl_size;
    pool__m.arena_mem = mem;
    pool__m.arena_size = arena_size;
    pool__m.nworkers = nworkers;
    pool__m.seen_deaths = 0;
    pool__m.workers_started = 0;
    pool__m.outstanding = 0;
    memset(pool__m.slots, 0, sizeof(pool__m.slots));

    int sock;
    pid_t pid = exec__forkserver_start(&sock);
    if (pid < 0) {
        munmap(mem, arena_size);
        munmap(sh, ctl_size);
        exec__shared = NULL;
        exec__arena = NULL;
        return -1;
    }
    pool__m.fs_pid = pid;
    pool__m.fs_sock = sock;
    pool__m.synced_modules = 0;
    pool__m.running = 1;
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
void
pool__shutdown(int with_python)
{
    if (!pool__m.running)
        return;
    pool__m.running = 0;
    exec__forkserver_quit(pool__m.fs_sock);
    close(pool__m.fs_sock);
    int st;
    pid_t r = 0;
    for (int k = 0; k < POOL_REAP_WAIT_MS && (r = waitpid(pool__m.fs_pid, &st, WNOHANG)) == 0; k++)
        usleep(1000);
    if (r == 0) {
        for (int i = 0; i < pool__m.nworkers; i++) {
            pid_t w = atomic_load(&exec__shared->slots[i].pid);
            if (w > 0)
                kill(w, SIGKILL);
        }
        kill(pool__m.fs_pid, SIGKILL);
        waitpid(pool__m.fs_pid, &st, 0);
    }
    free_task_list(pool__m.q_head, with_python);
    free_task_list(pool__m.failed_head, with_python);
    pool__m.q_head = pool__m.q_tail = pool__m.failed_head = pool__m.failed_tail = NULL;
    for (int i = 0; i < pool__m.nworkers; i++) {
        free_task_list(pool__m.slots[i].head, with_python);
        PyMem_RawFree(pool__m.slots[i].defined);
    }
    memset(pool__m.slots, 0, sizeof(pool__m.slots));
    pool__m.outstanding = 0;
    exec__codec_memo_clear(with_python);
    exec__fn_table_clear(with_python);
    exec__shared = NULL;
    /* Wake sleepers (they see the pool gone); if one is still inside, leave the control block
     * mapped: it is anonymous memory, gone with the process, and a few pages at most. */
    int unmap = exec__wake_sleepers();
    exec__set_master_word(NULL);
    if (unmap)
        munmap(pool__m.ctl, pool__m.ctl_size);
    /* Lending is over: private copies merged back, protections lifted. */
    guard_stop(0);
    if (atomic_load(&exec__live_arena_refs) == 0) {
        guard_stop(1);
        /* no array views it any more (else it stays mapped) */
        munmap(pool__m.arena_mem, pool__m.arena_size);
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
    .collect = pool__collect,
    .ready = pool__ready,
    .check = pool__check,
    .cancel = pool__cancel,
    .forget = pool__forget,
    .outstanding = pool_outstanding,
    .shutdown = pool__shutdown,
};

PyObject *
exec__pool_info(void)
{
    PyObject *pids = PyList_New(0);
    for (int i = 0; pids && pool__m.running && i < pool__m.nworkers; i++) {
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
                         "running", pool__m.running, "nworkers", exec_nworkers(),
                         "forkserver", pool__m.running ? (int)pool__m.fs_pid : 0, "workers", pids,
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
