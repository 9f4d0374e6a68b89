/* exec/pool_internal.h — shared by the two files of the process pool's master side only: a task
 * as the master keeps it, a worker slot as the master sees it, the pool's state, and what the
 * files call across each other. Functions and data one of them gives the other are pool__*.
 *   pool.c          start and stop, submitting, dispatching tasks into the workers' rings
 *   pool_collect.c  what comes back: results, worker deaths, limits, fork server restarts, and
 *                   tasks taken back by a cancel
 * Thread and GIL model: master only, GIL held; workers and the fork server touch only the
 * shared control block, the rings and the arena. */
#ifndef PYDRON_EXEC_POOL_INTERNAL_H
#define PYDRON_EXEC_POOL_INTERNAL_H

#include "exec/internal.h"

#define POOL_REAP_WAIT_MS 2000         /* for the fork server to quit, a killed worker to die */

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

typedef struct {
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
    Py_ssize_t limited;                /* outstanding tasks with a timeout or a memory limit */
    Py_ssize_t synced_modules;         /* len(sys.modules) when the fork server last imported */
} pool_state;

extern pool_state pool__m;             /* pool.c: the one pool of this process */

static inline void
pool__list_append(mtask **head, mtask **tail, mtask *t)
{
    t->next = NULL;
    if (*tail)
        (*tail)->next = t;
    else
        *head = t;
    *tail = t;
}

/* ---- pool.c ----------------------------------------------------------------------------------- */
/* Free a task and drop its references (the caller counts it out of pool__m.outstanding). */
void pool__task_free(mtask *t);
/* Ask the fork server for worker i (unless its slot is disabled). */
void pool__spawn_worker(int i);
/* Ask for every worker, the first time a task is submitted since the fork server started. */
void pool__start_workers(void);
/* Move queued tasks into the workers' rings while they have room. */
void pool__flush_queue(void);
/* Stop the fork server and its workers, drop every task. with_python: the interpreter is alive
 * (GIL held), else Python references are simply forgotten (Py_AtExit). */
void pool__shutdown(int with_python);

/* ---- pool_collect.c (the process executor's collect, ready, check, cancel, forget) ------------ */
/* One round: deaths, results, failures, limits; then refill the rings. Completions, -1 + exc. */
int pool__collect(void);
int pool__ready(void);
/* The fork server died: restart it (0), or -1 + exception when it keeps dying. */
int pool__check(void);
void pool__cancel(const uint64_t *sorted, Py_ssize_t n);
void pool__forget(const uint64_t *sorted, Py_ssize_t n);

#endif
