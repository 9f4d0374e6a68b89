/* exec/internal.h — shared by the files of exec/ only (the process pool, the thread pool, the ring
 * and arena). Nothing outside exec/ includes it. */
#ifndef PYDRON_EXEC_INTERNAL_H
#define PYDRON_EXEC_INTERNAL_H

#include "exec/exec.h"

/* Thread pool (exec/threads.c): completions are kept in a queue until exec_poll drains them. */
int exec__threads_drain(exec_result_fn on_result, void *ctx);   /* number handed over or -1 */
Py_ssize_t exec__threads_outstanding(void);
void exec__threads_shutdown(void);
/* Forget queued thread tasks now and running ones when they finish (for exec_cancel_all). */
void exec__threads_cancel_all(void);
/* Adds the thread pool's private test helpers (_threads_map, _threads_stats, ...) to the module;
 * called from exec_module_init. 0, or -1 with an exception. */
int exec__threads_module_init(PyObject *m);
/* Wake a master sleeping in exec_poll (called by the thread pool after queueing a completion). */
void exec__notify_master(void);

/* ---- Process pool: what exec.c (master side, codec) and worker.c (fork server, worker loop)
 * share. Everything below lives in memory mapped before the fork server is forked, so every
 * process sees it at the same address. */
#include "exec/arena.h"
#include "exec/ring.h"

#include <sys/types.h>

#define EXEC_MAX_WORKERS 64
/* Per direction per worker. Small on purpose: records are small (large pickles and buffers
 * travel through the arena), and a small ring keeps the pages it cycles through few and warm. */
#define EXEC_RING_BYTES ((size_t)256 << 10)
#define EXEC_OOB_MIN ((size_t)64 << 10)         /* out-of-band buffers this large go to the arena */
#define EXEC_INLINE_MAX ((size_t)16 << 10)      /* larger pickle bytes go to the arena too */
#define EXEC_NO_BLOCK UINT64_MAX
#define EXEC_HELD_MAX 1024
extern int exec__worker_slot;                   /* in a worker: its slot */

enum { EXEC_REC_DEFINE = 1, EXEC_REC_TASK = 2, EXEC_REC_RESULT = 3, EXEC_REC_ERROR = 4 };

/* One worker slot, in shared memory. The fork server writes pid and the death fields; the worker
 * writes running_task before it runs a task so that a death is blamed on the right one. */
typedef struct {
    _Atomic int32_t pid;
    _Atomic int32_t death_status;      /* waitpid status of the last death */
    _Atomic uint32_t deaths;           /* bumped (after death_status) at every death */
    uint32_t pad;
    _Atomic uint64_t running_task;     /* 0: none */
    uint64_t to_worker_off, to_master_off;   /* rings, as offsets from exec__shared */
    /* Arena blocks the worker holds references on (its ArenaBuffer objects), as block + 1, so
     * that the master can drop them when the worker dies. Registered after the incref and
     * unregistered before the decref: a death in between leaks a reference, never frees early. */
    _Atomic uint64_t held[EXEC_HELD_MAX];
} exec_slot;

typedef struct {
    wake_word master;                  /* the master sleeps here; workers and the fork server bump it */
    _Atomic uint32_t deaths;           /* sum of the slots' deaths */
    int32_t nslots;
    exec_slot slots[EXEC_MAX_WORKERS];
} exec_shared;

extern exec_shared *exec__shared;
extern arena *exec__arena;
extern int exec__in_worker_flag;
/* Set by worker.c around its own fork() calls (fork server, workers), so that exec's at-fork
 * handler tells them from a fork by user code (which must leave the pool alone). */
extern int exec__internal_fork;

static inline ring *exec__to_worker(int i)
{
    return (ring *)((char *)exec__shared + exec__shared->slots[i].to_worker_off);
}
static inline ring *exec__to_master(int i)
{
    return (ring *)((char *)exec__shared + exec__shared->slots[i].to_master_off);
}

/* An out-of-band buffer: a reference on arena block blk, the bytes at offset off, len long. */
typedef struct {
    uint64_t blk, off, len;
} exec_buf;

/* A blob as it crosses a ring: this header, nbufs exec_buf, then (data_blk == EXEC_NO_BLOCK) the
 * pickle bytes padded to 8, else the pickle bytes are at data_off in arena block data_blk. */
typedef struct {
    uint64_t len, data_blk, data_off;
    uint32_t nbufs, pad;
} exec_wire;

/* Pickling with out-of-band buffers placed in the arena (exec.c). A codec is a Python object
 * (its methods are the pickler's write, persistent_id and buffer_callback); it keeps one pickler
 * for reuse. On success the bytes are in data and len, the buffers in bufs and nbufs (their
 * references are the caller's: pass them on or release them with exec__bufs_release). */
typedef struct exec_codec exec_codec;
exec_codec *exec__codec_new(void);                       /* new reference, NULL + exception */
int exec__codec_dump(exec_codec *c, PyObject *obj, exec_dep_fn dep, void *ctx,
                     const char **data, size_t *len, exec_buf **bufs, uint32_t *nbufs);
void exec__codec_reset(exec_codec *c);                   /* drop the output of the last dump */
/* The codec's persistent_load (a new reference to a bound method) resolving persistent id i to
 * deps[i]; deps is kept by the codec until the next call (pass NULL to drop it). */
PyObject *exec__codec_loader(exec_codec *c, PyObject *deps);
void exec__bufs_release(arena *a, const exec_buf *bufs, uint32_t n);

/* Size of the wire form of (len bytes, nbufs buffers) when the bytes travel inline. */
static inline size_t exec__wire_size(size_t len, uint32_t nbufs, int inline_data)
{
    return sizeof(exec_wire) + nbufs * sizeof(exec_buf) + (inline_data ? RING_ALIGN(len) : 0);
}
/* Write pickle bytes + buffers in wire form at dst (the buffers' references go with it); bytes
 * longer than EXEC_INLINE_MAX are copied into a new arena block. Returns bytes written, or 0 if
 * the arena is full (nothing then changed hands). */
size_t exec__wire_write(void *dst, const char *data, size_t len, const exec_buf *bufs,
                        uint32_t nbufs, int inline_data);
/* Decode a wire blob in place: new reference, NULL + exception. The arena buffers are wrapped
 * in ArenaBuffer objects that take their own references (the wire's stay with the caller). When
 * persistent_load is given, persistent ids are resolved through it. *consumed: wire bytes. */
PyObject *exec__wire_decode(const void *src, size_t *consumed, PyObject *persistent_load);
/* A new reference to an ArenaBuffer over [off, off+len) of arena block blk (takes a new
 * reference on the block). */
PyObject *exec__arena_buffer_new(arena *a, uint64_t blk, uint64_t off, uint64_t len);
/* Bytes of an exception, pickled with its traceback (tblib); never fails for a real exception
 * (falls back to an equivalent RuntimeError). New reference or NULL + exception. */
PyObject *exec__pickle_exception(PyObject *exc, PyObject *fn);
/* The embedded pure-Python helpers (cold paths: error messages, exception pickling). */
PyObject *exec__helper(const char *name);                /* borrowed */

/* The worker's held table for blocks not owned by an ArenaBuffer (numpy array data allocated
 * in the arena): register after taking the reference, drop before releasing it. */
void exec__held_add(uint64_t blk);
void exec__held_drop(uint64_t blk);

/* Fork server (worker.c). Forks it now; returns its pid and the master's end of the command
 * socket, or -1 with an exception. */
pid_t exec__forkserver_start(int *sock);
/* Ask the fork server for a worker in slot i (0, or -1 with errno). */
int exec__forkserver_spawn(int sock, int slot);
/* Ask the fork server to kill its workers and exit. */
void exec__forkserver_quit(int sock);

#endif
