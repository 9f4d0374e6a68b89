/* exec/exec.h — the executors, as the rest of pydron sees them: one interface for every place a
 * task can run (worker processes of this machine, threads of this process; a cluster next).
 * graph/ hands tasks in with exec_submit and takes finished ones out with exec_poll; exec never
 * calls back into graph. Everything here is called with the GIL held. Only this header is public. */
#ifndef PYDRON_EXEC_H
#define PYDRON_EXEC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* ---- values ---------------------------------------------------------------------------------
 * An encoded value (pickle bytes plus out-of-band buffers in the shared arena), reference
 * counted. Results of finished tasks stay encoded in the master and are forwarded as they are to
 * the tasks that depend on them, so intermediate results are never unpickled here unless read. */
typedef struct exec_blob exec_blob;

/* Take / drop a reference; any thread, GIL or not (the count is atomic). NULL is allowed in
 * decref. */
void exec_blob_incref(exec_blob *b);
void exec_blob_decref(exec_blob *b);
/* A task that will read b (its arguments, or a dependency's result) exists from now on: the
 * arena blocks b refers to are write-protected here (copy on write) until exec_blob_unlend, so
 * the task sees them as they are now. Lent as often as called; a freed blob is unlent. */
void exec_blob_lend(exec_blob *b);
void exec_blob_unlend(exec_blob *b);
/* 1 when this process wrote its view of b's buffers while they were lent (it holds private
 * copies): b's shared bytes are no longer what this process sees. */
int exec_blob_is_stale(exec_blob *b);
/* Decode a blob: a new reference (arrays view the arena without a copy), or NULL + exception. */
PyObject *exec_blob_decode(exec_blob *b);
/* With the error of a failed exec_blob_decode of fn's result set: replace it by one naming fn
 * and saying the result could not be rebuilt here (the original as its __cause__). */
void exec_explain_undecodable(PyObject *fn);
/* Bytes held by the blob (pickle + buffers), for accounting. */
size_t exec_blob_size(const exec_blob *b);

/* Called while encoding task arguments for every object met: returns >= 0, the index of a
 * dependency to pickle as a persistent id; -1 to pickle the object normally; -2 on error. */
typedef Py_ssize_t (*exec_dep_fn)(void *ctx, PyObject *obj);

/* Encode a call's arguments (args tuple, kwargs dict or NULL) at call time, so later writes by the
 * caller cannot change what the task sees. An argument that cannot be pickled raises TypeError
 * naming fn and the argument. A new blob, or NULL + exception. */
exec_blob *exec_encode_call(PyObject *fn, PyObject *args, PyObject *kwargs, exec_dep_fn dep,
                            void *ctx);
/* Encode one value (a thread task's result that a process task depends on). New, or NULL + exc. */
exec_blob *exec_encode_value(PyObject *value);

/* ---- the executor interface ---------------------------------------------------------------- */

typedef enum {
    EXEC_PROCESSES = 0,    /* the local pool of forked worker processes */
    EXEC_THREADS = 1,      /* the thread pool of this process (native work, libffi calls) */
    EXEC_REMOTE = 2,       /* a cluster (remote/), registered with exec_register */
    EXEC_NKINDS
} exec_kind;

typedef struct {
    uint64_t task_id;        /* chosen by the caller, unique among outstanding tasks */
    PyObject *fn;            /* borrowed; shipped to each worker once (by name, else by value) */
    exec_blob *args;         /* borrowed; processes: the call, from exec_encode_call */
    PyObject *call;          /* borrowed; threads: (args tuple, kwargs dict or None), values */
    exec_blob *const *deps;  /* borrowed; processes: result of dependency i = persistent id i */
    Py_ssize_t ndeps;
    double timeout_s;        /* run time after which it is stopped and fails with TimeoutError;
                                0: the configured default (exec_options.task_timeout_s) */
    size_t memory_limit;     /* processes: the worker's resident memory while it runs; 0: none */
    int chunk;               /* args is ([args tuple, ...], None): a chunk of a map (bulk.c) */
} exec_task;

/* A finished task as exec_poll hands it over. Exactly one of blob / object is set; both are the
 * receiver's references. */
typedef struct {
    uint64_t task_id;
    int failed;              /* 0: the value is in blob (processes) or object (threads);
                                1: object is the exception to raise */
    exec_blob *blob;
    PyObject *object;
    /* For timelines: 1 + the worker slot that ran it (0: unknown or the thread pool), and when it
     * started and finished there (pydron_now() seconds, 0 when unknown). */
    int worker;
    double started, finished;
} exec_completion;

/* Queue a task on executor `kind`; never blocks (a full ring waits in exec's own queue).
 * 0, or -1 + exception (the task was not queued). */
int exec_submit(exec_kind kind, const exec_task *t);
/* Where tasks that are not thread tasks go: the cluster while one is attached, else the local
 * process pool. */
exec_kind exec_task_kind(void);

/* ---- implementing an executor ----------------------------------------------------------------
 * What every executor provides (the process pool in exec/pool.c and exec/pool_collect.c, the
 * thread pool in exec/threads.c, a cluster in remote/); exec/executor.c multiplexes them behind
 * the calls above. All with the GIL held; none calls back into graph/. */
typedef struct {
    const char *name;
    int (*submit)(const exec_task *t);                 /* 0, or -1 + exception */
    /* Move what finished into the completion queue (exec_complete): the number moved, or -1 +
     * exception. */
    int (*collect)(void);
    /* Whether collect would find something (cheap: called while exec_poll spins). */
    int (*ready)(void);
    /* After a sleep that found nothing: make sure the executor is alive (0, or -1 + exc). */
    int (*check)(void);
    /* Forget these tasks (ids sorted ascending); their completions must never come. */
    void (*cancel)(const uint64_t *sorted_ids, Py_ssize_t n);
    /* Optional: the same, softly: what already runs may finish (its result is dropped); nothing
     * is killed. NULL: cancel is used. */
    void (*forget)(const uint64_t *sorted_ids, Py_ssize_t n);
    Py_ssize_t (*outstanding)(void);
    /* Stop; with_python: the interpreter is alive and Python references may be dropped. */
    void (*shutdown)(int with_python);
    /* The value of a remote result (exec_blob_remote), fetched: new reference, NULL + exc.
     * NULL for executors whose results are ordinary blobs. */
    PyObject *(*fetch)(PyObject *ref);
    /* Optional: how many tasks it runs at once (a cluster's worker threads); 0 when it does not
     * know. NULL: the process pool's workers are the measure. Never raises. */
    int (*slots)(void);
} exec_backend;

/* For executors that call functions themselves: a callable that runs a map's chunk of fn (an
 * exec_task with chunk set: its one argument is a list of argument tuples) and returns what a
 * local worker's chunk returns. New reference, or NULL + exception. */
PyObject *exec_chunk_runner(PyObject *fn);
/* Attach (or with NULL, detach) the executor of kind EXEC_REMOTE. */
void exec_register_remote(const exec_backend *b);
/* Append a finished task to the completion queue (takes the blob/object references). 0, or
 * -1 + MemoryError (the references are then dropped). */
int exec_complete(const exec_completion *c);
/* Wake a thread sleeping in exec_poll (any thread, GIL or not). */
void exec_notify(void);
/* A result that stays where it was computed: a blob holding the executor's reference to it
 * (new blob, stealing ref). Forwarded as it is to the executor's later tasks; decoding it
 * fetches the value (exec_backend.fetch). */
exec_blob *exec_blob_remote(PyObject *ref);
/* The reference of a remote blob (borrowed), or NULL for an ordinary blob. */
PyObject *exec_blob_remote_ref(exec_blob *b);
/* An ordinary blob's bytes and out-of-band buffers as Python objects, for executors that ship
 * them elsewhere: (bytes, tuple of memoryviews over the arena). New reference, NULL + exc. */
PyObject *exec_blob_export(exec_blob *b);

/* Take up to cap finished tasks into out, waiting until at least one finished or timeout_s passed
 * (0: just look, < 0: no limit while tasks are outstanding). Sleeps with the GIL released.
 * Dead workers are replaced and their task re-run; after a task killed 3 workers it is handed
 * over failed with a pydron.WorkerLostError naming the function, the signal and the argument
 * shapes. Returns the number taken (0: timeout or nothing outstanding), or -1 + exception
 * (KeyboardInterrupt included: nothing is lost, call again to go on). */
int exec_poll(double timeout_s, exec_completion *out, int cap);

/* Forget these tasks, wherever they are: queued ones are dropped, running ones are stopped where
 * that is possible (a worker process running one is killed and replaced; other tasks it held run
 * again elsewhere) and their results are never handed over. Unknown ids are ignored. */
void exec_cancel(const uint64_t *ids, Py_ssize_t n);
/* The same without killing anything: running tasks finish and their results are dropped (for
 * tasks that are only no longer wanted: a replay that gave up, a speculation gone wrong). */
void exec_forget(const uint64_t *ids, Py_ssize_t n);

/* Whether exec_poll(0) would find a completion now (cheap: loads of shared counters). */
int exec_ready(void);
/* The measured run time of fn's tasks on the workers, a moving average in nanoseconds; < 0
 * while none has run. */
double exec_estimate_ns(PyObject *fn);
/* An exception pickled in a worker (exec's own format, with its traceback): the exception
 * rebuilt here (new reference; never NULL: an undecodable one becomes a RuntimeError saying so). */
PyObject *exec_exception_from_bytes(PyObject *data);
/* Tasks submitted and not yet handed over by exec_poll. */
Py_ssize_t exec_outstanding(void);
/* A top-level scheduled call begins (+1) or ends (-1), in any thread. A large buffer the master
 * passes to many tasks is copied into the arena once per such call while its bytes do not
 * change (the copy memo); the memo lets go of its copies when the last call in progress ends.
 * GIL held. */
void exec_call_scope(int delta);

/* ---- the local process pool ---------------------------------------------------------------- */

/* Start the process pool with nworkers processes (0 = one per core): forks the fork server now,
 * from the caller, which should still be single-threaded; workers are forked from it on first
 * use. Idempotent while running with the same size; another size restarts the pool (do that with
 * no task outstanding). A no-op inside a worker. 0, or -1 + exception. */
int exec_start(int nworkers);
/* Interpreter exit: stop every executor. Workers and fork server are killed and reaped, shared
 * memory unmapped; the thread pool is closed (no more thread tasks) and its threads joined, or
 * abandoned with a logged warning when a task keeps one busy for seconds. Safe to call twice. */
void exec_shutdown(void);
int exec_running(void);
/* Before the first worker is forked: have the fork server import what the master imported since
 * it was forked (called now and then from a background thread of pydron.enable(), so a script's
 * libraries are imported there while the script goes on). 1 while that is still useful, 0 once
 * the workers exist. */
int exec_sync_imports(void);
int exec_nworkers(void);
/* How many tasks of kind exec_task_kind() run at once: the attached cluster's worker threads
 * when it says, else the process pool's workers (0 while the pool is not running). What a map
 * spreads its chunks over. */
int exec_task_slots(void);
/* 1 in a worker process (or the fork server, which imports modules for them): pydron never
 * schedules there, functional calls run as plain calls. */
int exec_in_worker(void);

/* ---- module plumbing ------------------------------------------------------------------------ */

/* Options set by pydron.enable() from pydron/config.py (the one place PYDRON_* is read). */
typedef struct {
    int thread_workers;      /* threads of the thread pool; 0: one per core */
    int arena_arrays;        /* workers allocate large numpy arrays in the shared arena */
    double task_timeout_s;   /* default timeout of every task; 0: none */
    int check;               /* workers hash each task's arguments before and after it runs */
} exec_options;
void exec_configure(const exec_options *o);
exec_options exec_current_options(void);

/* Statistics for tests and `pydron info` (new reference). */
PyObject *exec_stats(void);
/* Exceptions and types exec defines (WorkerLostError, ArenaBuffer), and its test helpers. */
int exec_module_init(PyObject *module);
/* Library versions for `pydron info`: libffi. */
const char *exec_ffi_version(void);

#endif
