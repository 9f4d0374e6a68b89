/* exec/held.c — the held-reference table of held.h. The shared part is only the entries; which
 * entries are free, and which entry a keyed block lives at, are private to the worker (a free
 * stack and an open-addressing index), under one mutex since numpy may allocate and free from
 * threads that do not hold the GIL. */
#include "exec/held.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* A chunk: one arena block of entries. */
typedef struct {
    _Atomic uint64_t entry[HELD_PER_CHUNK];
} held_chunk;

static struct {
    pthread_mutex_t mu;
    held_table *table;
    arena *arena;
    held_chunk *chunk[HELD_MAX_CHUNKS];  /* this process's pointers to its chunks */
    int64_t next;                        /* entries ever used */
    int64_t *free_stack;
    size_t nfree, free_cap;
    uint64_t *keys;                      /* keyed index: blk + 1, 0 empty, UINT64_MAX deleted */
    int64_t *key_index;
    size_t key_cap, key_used;
    uint64_t count;
} H = {.mu = PTHREAD_MUTEX_INITIALIZER};

static _Atomic uint64_t *entry_locked(int64_t i);

void
held_begin(held_table *t, arena *a)
{
    pthread_mutex_lock(&H.mu);
    H.table = t;
    H.arena = a;
    memset(H.chunk, 0, sizeof(H.chunk));
    H.next = 0;
    H.nfree = 0;
    H.count = 0;
    free(H.keys);
    free(H.key_index);
    H.keys = NULL;
    H.key_index = NULL;
    H.key_cap = H.key_used = 0;
    entry_locked(0);          /* the first chunk now: a live worker always holds exactly one */
    pthread_mutex_unlock(&H.mu);
}

/* The entry of index i, its chunk allocated if needed; NULL when it cannot be. Lock held. */
static _Atomic uint64_t *
entry_locked(int64_t i)
{
    int64_t c = i / HELD_PER_CHUNK;
    if (c >= HELD_MAX_CHUNKS || H.table == NULL)
        return NULL;
    if (H.chunk[c] == NULL) {
        uint64_t blk;
        if (arena_alloc(H.arena, sizeof(held_chunk), &blk) < 0)
            return NULL;
        held_chunk *ch = arena_ptr(H.arena, blk);
        memset(ch, 0, sizeof(*ch));       /* reused pages are not zero */
        H.chunk[c] = ch;
        atomic_store(&H.table->chunks[c], blk);   /* published only once it is clean */
    }
    return &H.chunk[c]->entry[i % HELD_PER_CHUNK];
}

static int64_t
add_locked(uint64_t blk)
{
    int64_t i = H.nfree ? H.free_stack[--H.nfree] : H.next;
    _Atomic uint64_t *e = entry_locked(i);
    if (e == NULL) {
        if (i != H.next)
            H.free_stack[H.nfree++] = i;
        return -1;
    }
    if (i == H.next)
        H.next++;
    atomic_store(e, blk + 1);
    H.count++;
    return i;
}

static void
forget_locked(int64_t i)
{
    if (i < 0 || i >= H.next)
        return;
    _Atomic uint64_t *e = &H.chunk[i / HELD_PER_CHUNK]->entry[i % HELD_PER_CHUNK];
    if (atomic_exchange(e, 0) == 0)
        return;
    H.count--;
    if (H.nfree == H.free_cap) {
        size_t cap = H.free_cap ? H.free_cap * 2 : 256;
        int64_t *s = realloc(H.free_stack, cap * sizeof(int64_t));
        if (s == NULL)
            return;                       /* the entry is simply never reused */
        H.free_stack = s;
        H.free_cap = cap;
    }
    H.free_stack[H.nfree++] = i;
}

int64_t
held_add(uint64_t blk)
{
    pthread_mutex_lock(&H.mu);
    int64_t i = add_locked(blk);
    pthread_mutex_unlock(&H.mu);
    return i;
}

void
held_forget(int64_t index)
{
    pthread_mutex_lock(&H.mu);
    forget_locked(index);
    pthread_mutex_unlock(&H.mu);
}

/* ---- keyed entries ---------------------------------------------------------------------------- */

#define KEY_DELETED UINT64_MAX

static size_t
key_slot(uint64_t blk, size_t cap)
{
    return (size_t)((blk >> 16) * 0x9E3779B97F4A7C15ull) & (cap - 1);
}

/* Grow the keyed index to at least twice what it holds. 0, or -1 when out of memory. */
static int
rekey_locked(void)
{
    size_t cap = H.key_cap ? H.key_cap * 2 : 256;
    uint64_t *keys = calloc(cap, sizeof(uint64_t));
    int64_t *index = calloc(cap, sizeof(int64_t));
    if (keys == NULL || index == NULL) {
        free(keys);
        free(index);
        return -1;
    }
    size_t used = 0;
    for (size_t i = 0; i < H.key_cap; i++) {
        if (H.keys[i] == 0 || H.keys[i] == KEY_DELETED)
            continue;
        size_t s = key_slot(H.keys[i] - 1, cap);
        while (keys[s])
            s = (s + 1) & (cap - 1);
        keys[s] = H.keys[i];
        index[s] = H.key_index[i];
        used++;
    }
    free(H.keys);
    free(H.key_index);
    H.keys = keys;
    H.key_index = index;
    H.key_cap = cap;
    H.key_used = used;
    return 0;
}

void
held_add_keyed(uint64_t blk)
{
    pthread_mutex_lock(&H.mu);
    if ((H.key_used + 1) * 2 > H.key_cap && rekey_locked() < 0) {
        pthread_mutex_unlock(&H.mu);
        return;
    }
    int64_t i = add_locked(blk);
    if (i >= 0) {
        size_t s = key_slot(blk, H.key_cap);
        while (H.keys[s] && H.keys[s] != KEY_DELETED)
            s = (s + 1) & (H.key_cap - 1);
        if (H.keys[s] == 0)
            H.key_used++;
        H.keys[s] = blk + 1;
        H.key_index[s] = i;
    }
    pthread_mutex_unlock(&H.mu);
}

void
held_forget_keyed(uint64_t blk)
{
    pthread_mutex_lock(&H.mu);
    if (H.key_cap) {
        size_t s = key_slot(blk, H.key_cap);
        while (H.keys[s]) {
            if (H.keys[s] == blk + 1) {
                forget_locked(H.key_index[s]);
                H.keys[s] = KEY_DELETED;
                break;
            }
            s = (s + 1) & (H.key_cap - 1);
        }
    }
    pthread_mutex_unlock(&H.mu);
}

uint64_t
held_count(void)
{
    pthread_mutex_lock(&H.mu);
    uint64_t n = H.count;
    pthread_mutex_unlock(&H.mu);
    return n;
}

/* ---- master side ------------------------------------------------------------------------------ */

uint64_t
held_release_all(held_table *t, arena *a)
{
    uint64_t dropped = 0;
    for (int c = 0; c < HELD_MAX_CHUNKS; c++) {
        uint64_t blk = atomic_exchange(&t->chunks[c], 0);
        size_t blen;
        if (blk == 0 || arena_block_len(a, blk, &blen) < 0 || blen < sizeof(held_chunk))
            continue;
        held_chunk *ch = arena_ptr(a, blk);
        for (int i = 0; i < HELD_PER_CHUNK; i++) {
            uint64_t h = atomic_exchange(&ch->entry[i], 0);
            if (h && arena_block_len(a, h - 1, &blen) == 0) {
                arena_decref(a, h - 1);
                dropped++;
            }
        }
        arena_decref(a, blk);
    }
    return dropped;
}
