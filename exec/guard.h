/* exec/guard.h — the plain-Python meaning of arrays that live in the shared arena: a task sees
 * its inputs as they were at the call, whatever the caller writes afterwards, and a task's own
 * writes to its inputs stay its own.
 *
 * A block a process *views* (an array or a buffer over it) and that is *lent* to a task (the
 * task reads it) is write-protected in that process. The first write to it, from Python, a
 * ufunc with out=, a C extension or another thread, faults; the handler gives the process a
 * private copy of the block at the same address (copy on write) and the write goes there. The
 * readers keep the shared pages. When the lending ends, a master merges its private copy back
 * into the shared block (its writes are the truth for its arrays); a worker discards its copy
 * (a task's writes to its arguments never reach anyone). Faults that are not ours go to the
 * handler that was installed before.
 *
 * Thread model: every entry point may be called from any thread, with or without the GIL (numpy
 * allocates and frees without it); one spinlock guards the per-block state, which the signal
 * handler reads too. Blocks are named by their offset in the arena, as everywhere in exec/. */
#ifndef PYDRON_EXEC_GUARD_H
#define PYDRON_EXEC_GUARD_H

#include <stddef.h>
#include <stdint.h>

#include "exec/arena.h"

enum guard_policy {
    GUARD_MERGE = 0,       /* the master: private copies are merged back into the block */
    GUARD_DISCARD = 1,     /* a worker: private copies are dropped */
};

/* Start guarding arena a, mapped from memfd (the shared mapping can be restored over a private
 * copy from it), installing the SIGSEGV handler. 0, or -1 with errno. */
int guard_start(arena *a, int memfd, size_t arena_size, enum guard_policy policy);
/* Stop lending: every private copy is merged or dropped, every protection lifted. With forget,
 * the arena is about to be unmapped: the guard lets go of it too. */
void guard_stop(int forget);

void guard_lend(uint64_t blk);
void guard_unlend(uint64_t blk);
void guard_view(uint64_t blk);
void guard_unview(uint64_t blk);

/* Whether p lies in a block this process holds a private copy of (its bytes are not the shared
 * block's: send them by copy, not by reference). */
int guard_is_private(const void *p);

/* In a child forked by user code: the whole arena becomes a private snapshot (the child's writes
 * must not reach the parent's shared memory), keeping the private copies it inherited. */
void guard_detach_after_fork(void);

/* Counters for tests: protections, copies on write, merges, discards. */
typedef struct {
    uint64_t protects, copies, merges, discards;
} guard_stats;
void guard_get_stats(guard_stats *s);

#endif
