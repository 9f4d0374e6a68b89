/* exec/internal.h — shared by the files of exec/ only; nothing outside exec/ includes it.
 * Names exported between exec's files are exec__*; everything else in a file is static. */
#ifndef PYDRON_EXEC_INTERNAL_H
#define PYDRON_EXEC_INTERNAL_H

#include "exec/exec.h"
#include "exec/arena.h"
#include "exec/ring.h"
#include "exec/wire.h"
#include "exec/held.h"
#include "exec/guard.h"
#include "pydron_clock.h"
#include "pydron_compat.h"

#include <stdatomic.h>
#include <sys/types.h>

/* ---- sizes ------------------------------------------------------------------------------------ */
#define EXEC_MAX_WORKERS 64
/* Per direction per worker. Small on purpose: records are small (large pickles and buffers
 * travel through the arena), and a small ring keeps the pages it cycles through few and warm. */
#define EXEC_RING_BYTES ((size_t)256 << 10)
#define EXEC_OOB_MIN ((size_t)64 << 10)         /* out-of-band buffers this large go to the arena */
#define EXEC_BUF_ALIGN 64                       /* a buffer's copy keeps its address modulo this */
#define EXEC_INLINE_MAX ((size_t)16 << 10)      /* larger pickle bytes go to the arena too */

/* ---- the shared control block (executor.c maps it, pool.c formats it) --------------------------
 * Mapped before the fork server is forked, so every pydron process sees it at the same address. */

/* One worker slot. The fork server writes pid and the death fields; the worker writes
 * running_task before it runs a task so that a death is blamed on the right one. */
typedef struct {
    _Atomic int32_t pid;
    _Atomic int32_t death_status;      /* waitpid status of the last death */
    _Atomic uint32_t deaths;           /* bumped (after death_status) at every death */
    uint32_t pad;
    _Atomic uint64_t running_task;     /* 0: none */
    _Atomic uint64_t running_since_ns; /* pydron_now_ns() when it started running_task */
    _Atomic uint64_t death_maxrss_kb;  /* peak resident memory of the worker that died last */
    uint64_t to_worker_off, to_master_off;   /* rings, as offsets from exec__shared */
    /* Arena references the worker holds (held.h), dropped by the master when it dies. */
    held_table held;
} exec_slot;

typedef struct {
    wake_word master;                  /* the master sleeps here; workers and threads bump it */
    uint32_t wire_version;             /* WIRE_VERSION of the master that made the block */
    _Atomic uint32_t deaths;           /* sum of the slots' deaths */
    int32_t nslots;
    exec_slot slots[EXEC_MAX_WORKERS];
} exec_shared;

extern exec_shared *exec__shared;
extern arena *exec__arena;
extern int exec__arena_fd;                      /* the arena's memfd (guard.c remaps from it) */
extern size_t exec__arena_size;
extern exec_options exec__options;

static inline ring *
exec__to_worker(int i)
{
    return (ring *)((char *)exec__shared + exec__shared->slots[i].to_worker_off);
}

static inline ring *
exec__to_master(int i)
{
    return (ring *)((char *)exec__shared + exec__shared->slots[i].to_master_off);
}

/* ---- processes (executor.c) ------------------------------------------------------------------- */
extern int exec__in_worker_flag;
extern int exec__worker_slot;                   /* in a worker: its slot */
/* Set by forkserver.c around its own fork() calls, so that the at-fork handlers tell them from a
 * fork by user code (which must leave the pool alone). */
extern int exec__internal_fork;
/* Bumped in every child at fork: arena references held by objects the child inherited were
 * counted once, for the parent's copies, so only objects made in this generation drop theirs. */
extern unsigned exec__fork_generation;
/* ArenaBuffer objects and blobs alive that hold arena references: the arena is unmapped at
 * shutdown only when none is left (an array may outlive the executor). */
extern _Atomic Py_ssize_t exec__live_arena_refs;

/* ---- executors (executor.c; exec_backend is in exec.h) ------------------------------------- */
extern const exec_backend exec__process_backend;   /* pool.c, pool_collect.c */
/* The value of a remote result through the attached cluster: new reference, NULL + exc. */
PyObject *exec__remote_fetch(PyObject *ref);
/* At fork, in the child: a child of user code forgets the parent's pool without touching it. */
void exec__pool_forget_in_child(void);
extern const exec_backend exec__thread_backend;    /* threads.c */

#define exec__complete exec_complete
#define exec__notify_master exec_notify
/* The word the master sleeps on: in the shared control block while the pool runs, else local. */
void exec__set_master_word(wake_word *w);
/* Wake every thread asleep in exec_poll and wait briefly for them to leave the master word:
 * 1 when none is left (its memory may then be unmapped). */
int exec__wake_sleepers(void);

/* Sorted copy of ids for exec__id_in (cancel lists can be long). NULL + MemoryError. */
uint64_t *exec__sorted_ids(const uint64_t *ids, Py_ssize_t n);
int exec__id_in(const uint64_t *sorted, Py_ssize_t n, uint64_t id);

/* ---- blobs and arena buffers (blob.c) ---------------------------------------------------------- */
struct exec_blob {
    _Atomic Py_ssize_t refcnt;
    PyObject *remote;           /* a remote result: the executor's reference (no bytes here) */
    _Atomic Py_ssize_t lends;   /* exec_blob_lend calls not undone: its buffers are lent */
    unsigned generation;   /* exec__fork_generation when made */
    arena *arena;          /* set when the blob holds arena references */
    const char *data;      /* pickle bytes: inline after bufs, or inside arena block data_blk */
    size_t len;
    uint64_t data_blk;
    uint32_t nbufs;
    wire_buf bufs[];
};

/* A blob from pickle bytes and buffers (stealing the buffers' references). Bytes longer than
 * EXEC_INLINE_MAX go into the arena now, so the blob can cross any ring by reference. New blob,
 * or NULL + exception (the buffers' references are then dropped). */
exec_blob *exec__blob_new(const char *data, size_t len, const wire_buf *bufs, uint32_t nbufs);
/* A blob from a checked wire view (stealing the references the record carried). New blob, or
 * NULL + MemoryError (the references are then dropped). */
exec_blob *exec__blob_from_view(const wire_blob_view *v);
/* Wire form of a blob for a master-to-worker record; the references stay the blob's (the master
 * keeps it until the task is back, and the worker takes its own). */
size_t exec__blob_wire_size(const exec_blob *b);
size_t exec__blob_wire_write(void *dst, const exec_blob *b);
/* Move a blob's inline bytes into the arena, so it crosses rings by reference. 0, or -1 + exc. */
int exec__blob_spill(exec_blob *b);
/* A new ArenaBuffer over [off, off + len) of arena block blk, holding its own reference. */
PyObject *exec__arena_buffer_new(arena *a, uint64_t blk, uint64_t off, uint64_t len);
/* The blob's buffers as a tuple of ArenaBuffer (cold paths: error messages). New reference. */
PyObject *exec__blob_buffers(exec_blob *b);
void exec__bufs_release(arena *a, const wire_buf *bufs, uint32_t n);
int exec__blob_module_init(PyObject *module);

/* ---- pickling (codec.c) ----------------------------------------------------------------------- */
/* A codec is a Python object (its methods are the pickler's write, persistent_id and
 * buffer_callback) keeping its picklers for reuse. On success the bytes are in *data / *len and
 * the out-of-band buffers in *bufs / *nbufs (their references are the caller's: pass them on or
 * release them with exec__bufs_release); valid until the next dump. */
typedef struct exec_codec exec_codec;
exec_codec *exec__codec_new(void);                       /* new reference, NULL + exception */
int exec__codec_dump(exec_codec *c, PyObject *obj, exec_dep_fn dep, void *ctx,
                     const char **data, size_t *len, wire_buf **bufs, uint32_t *nbufs);
void exec__codec_reset(exec_codec *c);                   /* forget the output of the last dump */
/* In a worker, the references a dump took are recorded in the held table until they are handed
 * on: forget them right before the record carrying them is published. */
void exec__codec_forget_held(exec_codec *c);
/* Decode a checked blob in place: new reference, NULL + exception. Its arena buffers are wrapped
 * in ArenaBuffer objects that take their own references (the view's stay with the caller).
 * deps: values of persistent ids 0..n-1, or NULL. */
PyObject *exec__decode_view(const wire_blob_view *v, PyObject *deps);
/* Pickled exc with its traceback (tblib); never fails for a real exception (falls back to an
 * equivalent RuntimeError). New bytes, or NULL + exception. */
PyObject *exec__pickle_exception(PyObject *exc, PyObject *fn);
/* The exception a failed task's blob holds, rebuilt as the worker raised it. New reference;
 * never NULL (an undecodable one becomes a RuntimeError saying so). */
PyObject *exec__decode_error(exec_blob *b);
/* Call helper `name` of pydron/_exec_helpers.py (cold paths): new reference, NULL + exception. */
PyObject *exec__call_helper(const char *name, PyObject *const *args, size_t nargs);
/* Set the exception returned by helper `name` (for errors built in Python). Always -1. */
int exec__raise_from_helper(const char *name, PyObject *const *args, size_t nargs);
int exec__codec_module_init(PyObject *module);
/* Forget the arena copies of large buffers kept for reuse within a call (release: drop their
 * references; 0 when the arena is not this process's any more). */
void exec__codec_memo_clear(int release);
/* Just before the fork server is forked: pydron._exec_helpers is imported (workers inherit it)
 * and notes which modules are still being imported. 0, or -1 + exception. */
int exec__helpers_before_fork(void);

/* ---- small values pickled in C (scalars.c) ------------------------------------------------------ */
/* Pickle bytes of obj / of the call (args, None) when made only of ints, floats, bools, None,
 * short strs and bytes (and small tuples of them): 1 with *data, *len (valid until the next
 * call); 0 when the general codec must do it; -1 + MemoryError. */
int exec__scalars_dump(PyObject *obj, const char **data, size_t *len);
int exec__scalars_dump_call(PyObject *args, const char **data, size_t *len);
/* The value of a pickle holding one such scalar (a result): new reference, or NULL (no
 * exception) for anything else. */
PyObject *exec__scalars_load(const char *data, size_t len);

/* ---- shipping functions (functions.c) --------------------------------------------------------- */
/* The id of fn, shipping-ready (by reference when workers can import it, else by value through
 * cloudpickle). -1 + TypeError naming fn. */
Py_ssize_t exec__fn_id(PyObject *fn);
exec_blob *exec__fn_blob(uint32_t fn_id);                /* borrowed */
PyObject *exec__fn_object(uint32_t fn_id);               /* borrowed */
/* Moving average of the function's run time on workers (ns); < 0 while unknown. */
double exec__fn_estimate(uint32_t fn_id);
void exec__fn_observe(uint32_t fn_id, uint64_t elapsed_ns);
Py_ssize_t exec__fn_count(void);
void exec__fn_table_clear(int with_python);

/* ---- fork server (forkserver.c) --------------------------------------------------------------- */
/* Fork it now; its pid and the master's end of the command socket, or -1 + exception. */
pid_t exec__forkserver_start(int *sock);
int exec__forkserver_spawn(int sock, int slot);          /* 0, or -1 with errno */
void exec__forkserver_quit(int sock);
/* Ask the fork server to import these modules (newline-separated) before its next fork. */
int exec__forkserver_import(int sock, const char *names, size_t len);
extern pid_t exec__forkserver_pid;       /* in the fork server and its workers */
extern int exec__in_forkserver;          /* 1 in the fork server itself */
/* Flush Python's and C's buffered output (before a fork, before a worker sleeps). */
void exec__flush_std_streams(void);

/* ---- worker processes (worker.c, np_arena.c) -------------------------------------------------- */
void exec__worker_main(int slot) __attribute__((noreturn));
/* Allocate large numpy arrays in the arena once numpy is imported (workers and master). */
void exec__install_array_allocator(void);
/* With the GIL: log once that the arena was found full by the array allocator. */
void exec__note_arena_full(void);
/* 1 in a child forked by user code: the arena is the parent's, left alone. */
extern int exec__user_fork_child;

/* ---- thread pool (threads.c) and native calls (ffi.c) ----------------------------------------- */
typedef struct native_site native_site;
typedef struct thread_job thread_job;
/* How thread job `job` will call fn(*args, **kwargs): through libffi (job->site set) when fn is
 * a ctypes function pointer with a declared signature of plain C types, else as a Python call.
 * 0, or -1 + exception (bad arguments for the declared signature). */
int exec__ffi_prepare(thread_job *job, PyObject *fn, PyObject *args, PyObject *kwargs);
/* The result of a finished libffi call as a Python object (new reference), or NULL + exc. */
PyObject *exec__ffi_result(thread_job *job);
void exec__ffi_call(thread_job *job);                    /* GIL released */
void exec__ffi_clear_sites(void);
int exec__ffi_load_ctypes(void);
PyObject *exec__ffi_stats(void);                        /* new int: cached signatures */

/* ---- test helpers (testing.c) ----------------------------------------------------------------- */
int exec__testing_module_init(PyObject *module);
/* Pool state for tests and `pydron info`: pids, arena accounting (new reference). */
PyObject *exec__pool_info(void);
PyObject *exec__threads_info(void);                      /* new reference */
/* Tests only: a pool thread pauses this long after waking the master for a result, before it
 * looks at the queue again (0: no pause), so that the master's next submit lands in that window. */
extern _Atomic int exec__threads_post_pause_us;
/* Interpreter exit: join the pool's threads and refuse further thread tasks. */
void exec__threads_close(void);
void exec__cancel_all(void);

#endif
