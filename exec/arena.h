/* exec/arena.h — the shared-memory arena: large buffers (numpy data, big pickles) shared by the
 * master and the workers without copies. Pure C (no Python): also built into ctest's test_arena.
 * First-fit over 64 KiB pages (bitmap), a robust process-shared mutex, and a per-block atomic
 * reference count in shared memory: a block is freed when the last holder in any process drops
 * it. Blocks are named by their offset from the arena's base, valid in every process. */
#ifndef PYDRON_EXEC_ARENA_H
#define PYDRON_EXEC_ARENA_H

#include <stddef.h>
#include <stdint.h>

#define ARENA_PAGE ((size_t)64 * 1024)

typedef struct arena arena;

/* Format `size` bytes at base (MAP_SHARED memory, page aligned) as an empty arena; the header
 * and page tables live at its start. NULL if the region is too small. */
arena *arena_create(void *base, size_t size);

/* Allocate a block of at least len bytes with reference count 1; its data offset into *blk.
 * 0, or -1 when no run of free pages is long enough. */
int arena_alloc(arena *a, size_t len, uint64_t *blk);
void arena_incref(arena *a, uint64_t blk);
/* Drop one reference; frees the block at zero. Returns 1 if it was freed. */
int arena_decref(arena *a, uint64_t blk);
uint32_t arena_refcount(arena *a, uint64_t blk);

static inline void *arena_ptr(arena *a, uint64_t off) { return (char *)a + off; }
/* The block containing p (which must be held by the caller): its offset and usable length.
 * 0, or -1 when p is not inside an allocated block of this arena. */
int arena_block_of(arena *a, const void *p, uint64_t *blk, size_t *blk_len);
int arena_contains(arena *a, const void *p);
/* Whether blk is the offset of an allocated block (read from a record another process wrote):
 * its usable length into *blk_len. 0, or -1 when it is not. */
int arena_block_len(arena *a, uint64_t blk, size_t *blk_len);

/* Accounting and trimming: freed pages stay resident (re-faulting them costs more than keeping
 * them) until more than trim_bytes of them pile up; then they are returned to the kernel. */
typedef struct {
    uint64_t total_pages, used_pages, free_dirty_pages, trims;
} arena_stats;
void arena_get_stats(arena *a, arena_stats *s);
void arena_set_trim_threshold(arena *a, size_t trim_bytes);
/* Tests only: take the allocator's lock and keep it (a process that then dies must not wedge
 * the others: the lock is robust). */
void arena__lock_for_test(arena *a);

#endif
