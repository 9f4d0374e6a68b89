/* exec/exec.h — the local executor, as the rest of pydron sees it.
 * A fork server forks worker processes; tasks and results cross through shared-memory rings and
 * large buffers through a shared-memory arena (pickle protocol 5, out of band). Tasks marked
 * executor="threads" run on a thread pool in this process instead. Only this header is public. */
#ifndef PYDRON_EXEC_H
#define PYDRON_EXEC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* An encoded value (pickle bytes plus out-of-band buffers in the arena), reference counted.
 * Result blobs of finished tasks are kept encoded in the master and forwarded as they are to the
 * tasks that depend on them, so intermediate results are never unpickled here unless read. */
typedef struct exec_blob exec_blob;

void exec_blob_incref(exec_blob *b);
void exec_blob_decref(exec_blob *b);
/* Decode a blob into a new reference (arrays view the arena without a copy); NULL + exception. */
PyObject *exec_blob_decode(exec_blob *b);
/* Bytes held by the blob (pickle + buffers), for accounting. */
size_t exec_blob_size(const exec_blob *b);

/* Called while encoding task arguments for every object met: returns >= 0, the index of a
 * dependency to pickle as a persistent id; -1 to pickle the object normally; -2 on error. */
typedef Py_ssize_t (*exec_dep_fn)(void *ctx, PyObject *obj);

/* Encode a call's arguments (args tuple, kwargs dict or NULL) at call time, so later writes by the
 * caller cannot change what the task sees. An argument that cannot be pickled raises TypeError
 * naming fn and the argument. Returns a new blob, or NULL with an exception set. */
exec_blob *exec_encode_call(PyObject *fn, PyObject *args, PyObject *kwargs,
                            exec_dep_fn dep, void *ctx);

/* Encode one value as a blob (e.g. a thread-pool result that a process task depends on: deps
 * must all be blobs). A new blob, or NULL with an exception. */
exec_blob *exec_encode_value(PyObject *value);

typedef struct {
    uint64_t task_id;
    PyObject *fn;          /* borrowed; shipped to each worker once (by name, else by value) */
    exec_blob *args;       /* borrowed; from exec_encode_call */
    exec_blob **deps;      /* borrowed; result blob of dependency i = persistent id i */
    Py_ssize_t ndeps;
} exec_task;

/* Start the executor with nworkers processes (0 = one per core): forks the fork server now, from
 * the caller, which should still be single-threaded; workers are forked from it on first use.
 * Idempotent while running with the same size; another size restarts the pool (do that with no
 * task outstanding). A no-op inside a worker. 0, or -1 with an exception. */
int exec_start(int nworkers);
/* Stop everything: workers and fork server are killed and reaped, the shared memory unmapped.
 * Safe to call twice and at interpreter exit. */
void exec_shutdown(void);
int exec_running(void);
int exec_nworkers(void);

/* Queue a task for a worker process; never blocks on a full ring (exec keeps its own queue).
 * 0, or -1 with an exception. */
int exec_submit(const exec_task *t);
/* Run fn(*args, **kwargs) on the thread pool of this process (arguments hold no pending value).
 * A ctypes function pointer with declared argtypes/restype is called through libffi with the
 * GIL released. 0, or -1 with an exception. */
int exec_submit_thread(uint64_t task_id, PyObject *fn, PyObject *args, PyObject *kwargs);

typedef struct {
    uint64_t task_id;
    int failed;            /* 0: value in blob (process) or object (thread); 1: object is the exception */
    exec_blob *blob;       /* owned reference or NULL */
    PyObject *object;      /* owned reference or NULL */
    /* For timelines: 1 + the worker slot that ran it (0: unknown or the thread pool), and when
     * it started and finished there (CLOCK_MONOTONIC seconds, 0 when unknown). */
    int worker;
    double started, finished;
} exec_result;

/* Hand every finished task to on_result (which takes ownership of blob/object) until at least
 * one was handed over or timeout_s passed (0: just poll, < 0: no limit). Sleeps with the GIL
 * released. Replaces dead workers and re-runs their task; after a task has killed 3 workers it is
 * reported failed with a pydron.WorkerLostError naming the function, the signal and the argument
 * shapes. Returns the number handed over, or -1 with an exception (KeyboardInterrupt included). */
typedef int (*exec_result_fn)(void *ctx, exec_result *r);
int exec_poll(double timeout_s, exec_result_fn on_result, void *ctx);

/* Forget every queued and running task (Ctrl-C): workers running one are killed and replaced,
 * their results are never reported. The pool stays usable. */
void exec_cancel_all(void);

/* Tasks submitted and not yet handed to on_result. */
Py_ssize_t exec_outstanding(void);

/* 1 in a worker process (forked by the fork server): pydron must not schedule there, functional
 * calls run as plain calls. */
int exec_in_worker(void);

/* Module plumbing: exceptions and types exec defines (WorkerLostError), added to the module. */
int exec_module_init(PyObject *module);
/* Library versions for `pydron info`: libffi. */
const char *exec_ffi_version(void);

#endif
