/* exec/arena.c — first-fit page allocator over a shared-memory region (see arena.h).
 * Everything, the header included, lives inside the region, so every process that maps it at the
 * same address (fork after mmap) shares one allocator. The bitmap is only written under the
 * robust mutex; reference counts are atomics and need no lock. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/arena.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

#define ARENA_MAGIC 0x616e657261647970ULL  /* "pydarena" */

struct arena {
    uint64_t magic;
    uint64_t size;
    uint64_t npages;
    uint64_t data_start;          /* offset of page 0 */
    uint64_t used_off, dirty_off; /* bitmaps: page in use; page touched since the last trim */
    uint64_t refcnt_off;          /* _Atomic uint32_t per page (valid at a block's first page) */
    uint64_t npages_off;          /* uint32_t per page: block length (at a block's first page) */
    uint64_t owner_off;           /* uint32_t per page: first page of the block holding it */
    pthread_mutex_t lock;
    uint64_t first_free;          /* no free page below this one */
    uint64_t used_pages;
    uint64_t free_dirty_pages;
    uint64_t trim_pages;
    uint64_t trims;
};

static inline uint64_t *used_map(arena *a) { return (uint64_t *)((char *)a + a->used_off); }
static inline uint64_t *dirty_map(arena *a) { return (uint64_t *)((char *)a + a->dirty_off); }
static inline _Atomic uint32_t *refcnt(arena *a) { return (_Atomic uint32_t *)((char *)a + a->refcnt_off); }
static inline uint32_t *block_pages(arena *a) { return (uint32_t *)((char *)a + a->npages_off); }
static inline uint32_t *owner(arena *a) { return (uint32_t *)((char *)a + a->owner_off); }

static inline int bit_get(const uint64_t *m, uint64_t i) { return (m[i >> 6] >> (i & 63)) & 1; }
static inline void bit_set(uint64_t *m, uint64_t i) { m[i >> 6] |= (uint64_t)1 << (i & 63); }
static inline void bit_clear(uint64_t *m, uint64_t i) { m[i >> 6] &= ~((uint64_t)1 << (i & 63)); }

static inline uint64_t page_of(arena *a, uint64_t blk) { return (blk - a->data_start) / ARENA_PAGE; }
static inline uint64_t offset_of(arena *a, uint64_t page) { return a->data_start + page * ARENA_PAGE; }

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

static size_t
metadata_bytes(uint64_t npages)
{
    size_t bitmap = round_up((npages + 63) / 64 * 8, 64);
    return round_up(sizeof(arena), 64) + 2 * bitmap + 3 * round_up(npages * 4, 64);
}

/* A process that died holding the lock leaves the bitmap as it was between two of our updates
 * at worst (each update is a few stores); mark it consistent and carry on. */
static void
arena_lock(arena *a)
{
    int rc = pthread_mutex_lock(&a->lock);
    if (rc == EOWNERDEAD)
        pthread_mutex_consistent(&a->lock);
}

static void arena_unlock(arena *a) { pthread_mutex_unlock(&a->lock); }

arena *
arena_create(void *base, size_t size)
{
    uint64_t npages = size / ARENA_PAGE;
    while (npages > 0 && round_up(metadata_bytes(npages), ARENA_PAGE) + npages * ARENA_PAGE > size)
        npages--;
    if (npages == 0)
        return NULL;
    arena *a = base;
    memset(a, 0, sizeof(*a));
    a->magic = ARENA_MAGIC;
    a->size = size;
    a->npages = npages;
    size_t bitmap = round_up((npages + 63) / 64 * 8, 64);
    size_t off = round_up(sizeof(arena), 64);
    a->used_off = off;   off += bitmap;
    a->dirty_off = off;  off += bitmap;
    a->refcnt_off = off; off += round_up(npages * 4, 64);
    a->npages_off = off; off += round_up(npages * 4, 64);
    a->owner_off = off;  off += round_up(npages * 4, 64);
    a->data_start = round_up(off, ARENA_PAGE);
    /* The region is fresh anonymous memory: tables are already zero, and are not touched here
     * so that a huge MAP_NORESERVE arena costs nothing until used. */
    a->trim_pages = ((size_t)1 << 30) / ARENA_PAGE;

    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&a->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    return a;
}

/* First run of n free pages at or after `from`, or npages when there is none. */
static uint64_t
find_run(arena *a, uint64_t from, uint64_t n)
{
    const uint64_t *m = used_map(a);
    uint64_t i = from;
    while (i + n <= a->npages) {
        if ((i & 63) == 0 && m[i >> 6] == UINT64_MAX) {
            i += 64;
            continue;
        }
        if (bit_get(m, i)) {
            i++;
            continue;
        }
        uint64_t j = i;
        while (j < i + n) {
            if ((j & 63) == 0 && j + 64 <= i + n && m[j >> 6] == 0) {
                j += 64;
                continue;
            }
            if (bit_get(m, j))
                break;
            j++;
        }
        if (j >= i + n)
            return i;
        i = j + 1;
    }
    return a->npages;
}

int
arena_alloc(arena *a, size_t len, uint64_t *blk)
{
    uint64_t n = len == 0 ? 1 : (len + ARENA_PAGE - 1) / ARENA_PAGE;
    if (n > a->npages || n > UINT32_MAX)
        return -1;
    arena_lock(a);
    uint64_t p = find_run(a, a->first_free, n);
    if (p >= a->npages) {
        arena_unlock(a);
        return -1;
    }
    uint64_t *used = used_map(a), *dirty = dirty_map(a);
    uint32_t *own = owner(a);
    uint64_t was_dirty = 0;
    for (uint64_t i = p; i < p + n; i++) {
        bit_set(used, i);
        if (bit_get(dirty, i))
            was_dirty++;
        else
            bit_set(dirty, i);
        own[i] = (uint32_t)p;
    }
    a->free_dirty_pages -= was_dirty;
    a->used_pages += n;
    if (p == a->first_free)
        a->first_free = p + n;
    block_pages(a)[p] = (uint32_t)n;
    atomic_store_explicit(&refcnt(a)[p], 1, memory_order_release);
    arena_unlock(a);
    *blk = offset_of(a, p);
    return 0;
}

/* Give free, touched pages back to the kernel (MADV_REMOVE frees shmem pages for real). */
static void
trim_locked(arena *a)
{
    uint64_t *used = used_map(a), *dirty = dirty_map(a);
    uint64_t i = 0;
    while (i < a->npages) {
        if (bit_get(used, i) || !bit_get(dirty, i)) {
            i++;
            continue;
        }
        uint64_t j = i;
        while (j < a->npages && !bit_get(used, j) && bit_get(dirty, j))
            bit_clear(dirty, j++);
        char *start = (char *)a + offset_of(a, i);
        if (madvise(start, (j - i) * ARENA_PAGE, MADV_REMOVE) != 0)
            madvise(start, (j - i) * ARENA_PAGE, MADV_DONTNEED);
        i = j;
    }
    a->free_dirty_pages = 0;
    a->trims++;
}

static void
free_block(arena *a, uint64_t p)
{
    arena_lock(a);
    uint64_t n = block_pages(a)[p];
    uint64_t *used = used_map(a);
    for (uint64_t i = p; i < p + n; i++)
        bit_clear(used, i);
    block_pages(a)[p] = 0;
    a->used_pages -= n;
    a->free_dirty_pages += n;
    if (p < a->first_free)
        a->first_free = p;
    if (a->free_dirty_pages > a->trim_pages)
        trim_locked(a);
    arena_unlock(a);
}

void
arena_incref(arena *a, uint64_t blk)
{
    atomic_fetch_add_explicit(&refcnt(a)[page_of(a, blk)], 1, memory_order_relaxed);
}

int
arena_decref(arena *a, uint64_t blk)
{
    uint64_t p = page_of(a, blk);
    if (atomic_fetch_sub_explicit(&refcnt(a)[p], 1, memory_order_acq_rel) != 1)
        return 0;
    free_block(a, p);
    return 1;
}

uint32_t
arena_refcount(arena *a, uint64_t blk)
{
    return atomic_load_explicit(&refcnt(a)[page_of(a, blk)], memory_order_acquire);
}

int
arena_contains(arena *a, const void *p)
{
    uintptr_t off = (uintptr_t)p - (uintptr_t)a;
    return (uintptr_t)p >= (uintptr_t)a && off >= a->data_start &&
           off < a->data_start + a->npages * ARENA_PAGE;
}

int
arena_block_of(arena *a, const void *p, uint64_t *blk, size_t *blk_len)
{
    if (!arena_contains(a, p))
        return -1;
    uint64_t page = ((uintptr_t)p - (uintptr_t)a - a->data_start) / ARENA_PAGE;
    if (!bit_get(used_map(a), page))
        return -1;
    uint64_t first = owner(a)[page];
    *blk = offset_of(a, first);
    *blk_len = (size_t)block_pages(a)[first] * ARENA_PAGE;
    return 0;
}

int
arena_block_len(arena *a, uint64_t blk, size_t *blk_len)
{
    if (blk < a->data_start || (blk - a->data_start) % ARENA_PAGE != 0)
        return -1;
    uint64_t page = page_of(a, blk);
    if (page >= a->npages || !bit_get(used_map(a), page) || owner(a)[page] != page)
        return -1;
    uint32_t n = block_pages(a)[page];
    if (n == 0 || page + n > a->npages)
        return -1;
    *blk_len = (size_t)n * ARENA_PAGE;
    return 0;
}

void
arena_get_stats(arena *a, arena_stats *s)
{
    arena_lock(a);
    s->total_pages = a->npages;
    s->used_pages = a->used_pages;
    s->free_dirty_pages = a->free_dirty_pages;
    s->trims = a->trims;
    arena_unlock(a);
}

void
arena_set_trim_threshold(arena *a, size_t trim_bytes)
{
    arena_lock(a);
    a->trim_pages = trim_bytes / ARENA_PAGE;
    arena_unlock(a);
}

void arena__lock_for_test(arena *a) { arena_lock(a); }
