/* exec/held.h — the references a worker holds on arena blocks, recorded in shared memory so that
 * the master can drop them when the worker dies: arrays it allocated, buffers of its arguments,
 * references travelling towards a record not yet published. Any number of them: the table grows
 * in chunks allocated from the arena itself. Pure C (no Python): also built into ctest's
 * test_held.
 * Rule: record after taking the reference, forget before handing it on or dropping it; a death
 * in between leaks one reference, never frees a block early.
 * Thread model: the recording side (one worker process) may be called from any of its threads;
 * the master reads a table only after its worker died. */
#ifndef PYDRON_EXEC_HELD_H
#define PYDRON_EXEC_HELD_H

#include <stdatomic.h>
#include <stdint.h>

#include "exec/arena.h"

#define HELD_PER_CHUNK 8190          /* entries per chunk: one 64 KiB arena page with its header */
#define HELD_MAX_CHUNKS 1024         /* 8.4 million references */

/* In shared memory, one per worker slot: arena offsets of the chunks (0: not allocated). A chunk
 * holds HELD_PER_CHUNK entries, each block + 1 or 0. */
typedef struct {
    _Atomic uint64_t chunks[HELD_MAX_CHUNKS];
} held_table;

/* Worker side. The process starts a fresh table (its slot's, emptied by the master). */
void held_begin(held_table *t, arena *a);
/* Record a reference on blk: its index, or -1 when the table cannot grow (arena full, or over
 * HELD_MAX_CHUNKS): the reference then leaks if the worker dies. */
int64_t held_add(uint64_t blk);
void held_forget(int64_t index);
/* The same, for references found again by their block (numpy frees only know the pointer);
 * one keyed reference per block at a time. */
void held_add_keyed(uint64_t blk);
void held_forget_keyed(uint64_t blk);
/* References recorded now (tests, accounting). */
uint64_t held_count(void);

/* Master side, after the worker died: drop every reference recorded in t (entries that are not
 * allocated blocks are skipped: the worker may have scribbled on them), free the chunks and
 * empty t. Returns the number of references dropped. */
uint64_t held_release_all(held_table *t, arena *a);

#endif
