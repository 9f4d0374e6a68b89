/* exec/ring.c — the shared-memory SPSC byte ring and futex wake-ups (see ring.h).
 * Positions are monotonic byte counts, so head - tail is the bytes in use and no state is shared
 * between producer and consumer besides those two words. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/ring.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RECORD_HEADER 8u

/* Non-private futexes: the words live in MAP_SHARED memory seen by several processes. */
static long
futex(_Atomic uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, (uint32_t *)addr, op, val, ts, NULL, 0);
}

void
wake_notify(wake_word *w)
{
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&w->waiters, memory_order_relaxed) == 0)
        return;
    atomic_fetch_add_explicit(&w->seq, 1, memory_order_seq_cst);
    futex(&w->seq, FUTEX_WAKE, INT_MAX, NULL);
}

uint32_t
wake_prepare(wake_word *w)
{
    uint32_t seen = atomic_load_explicit(&w->seq, memory_order_seq_cst);
    atomic_fetch_add_explicit(&w->waiters, 1, memory_order_seq_cst);
    atomic_thread_fence(memory_order_seq_cst);
    return seen;
}

void
wake_cancel(wake_word *w)
{
    atomic_fetch_sub_explicit(&w->waiters, 1, memory_order_seq_cst);
}

int
wake_wait(wake_word *w, uint32_t seen, int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    int rc = 0;
    if (futex(&w->seq, FUTEX_WAIT, seen, tsp) < 0 && errno != EAGAIN)
        rc = errno;
    atomic_fetch_sub_explicit(&w->waiters, 1, memory_order_seq_cst);
    return rc;
}

ring *
ring_init(void *mem, size_t bytes)
{
    if (bytes < RING_HEADER_SIZE + 64)
        return NULL;
    ring *r = mem;
    memset(r, 0, RING_HEADER_SIZE);
    r->capacity = ring_capacity_for(bytes);
    return r;
}

void
ring_reset(ring *r)
{
    atomic_store(&r->head, 0);
    atomic_store(&r->tail, 0);
    r->reserved_len = 0;
}

uint32_t
ring_max_payload(const ring *r)
{
    /* Half the buffer, so a record always fits after at most one PAD. */
    uint64_t m = r->capacity / 2 - RECORD_HEADER;
    return m > UINT32_MAX ? UINT32_MAX : (uint32_t)m;
}

void *
ring_reserve(ring *r, uint32_t len)
{
    if (len > ring_max_payload(r))
        return NULL;
    uint64_t need = RECORD_HEADER + RING_ALIGN(len);
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    uint64_t free_bytes = r->capacity - (head - tail);
    uint64_t pos = head % r->capacity;
    uint64_t contig = r->capacity - pos;
    uint64_t skip = 0;
    if (need > contig) {
        skip = contig;             /* PAD to the end, record at offset 0 */
        pos = 0;
    }
    if (skip + need > free_bytes)
        return NULL;
    if (skip) {
        uint32_t *pad = (uint32_t *)(r->data + (head % r->capacity));
        pad[0] = (uint32_t)(skip - RECORD_HEADER);
        pad[1] = RING_KIND_PAD;
    }
    uint32_t *hdr = (uint32_t *)(r->data + pos);
    hdr[0] = len;
    r->reserved_len = skip + need;
    r->reserved_pos = pos;
    return r->data + pos + RECORD_HEADER;
}

void
ring_commit(ring *r, uint32_t kind)
{
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    ((uint32_t *)(r->data + r->reserved_pos))[1] = kind;
    atomic_store_explicit(&r->head, head + r->reserved_len, memory_order_release);
    r->reserved_len = 0;
}

int
ring_push(ring *r, uint32_t kind, const void *payload, uint32_t len)
{
    void *dst = ring_reserve(r, len);
    if (dst == NULL)
        return -1;
    memcpy(dst, payload, len);
    ring_commit(r, kind);
    return 0;
}

void *
ring_peek(ring *r, uint32_t *kind, uint32_t *len)
{
    for (;;) {
        uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
        uint64_t head = atomic_load_explicit(&r->head, memory_order_acquire);
        if (head == tail)
            return NULL;
        uint32_t *hdr = (uint32_t *)(r->data + tail % r->capacity);
        if (hdr[1] == RING_KIND_PAD) {
            atomic_store_explicit(&r->tail, tail + RECORD_HEADER + RING_ALIGN(hdr[0]),
                                  memory_order_release);
            continue;
        }
        *kind = hdr[1];
        *len = hdr[0];
        return hdr + 2;
    }
}

void
ring_pop(ring *r)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    uint32_t *hdr = (uint32_t *)(r->data + tail % r->capacity);
    atomic_store_explicit(&r->tail, tail + RECORD_HEADER + RING_ALIGN(hdr[0]), memory_order_release);
    wake_notify(&r->writable);
}

void *
ring_peek_checked(ring *r, uint64_t capacity, uint32_t *kind, uint32_t *len, int *corrupt)
{
    *corrupt = 0;
    for (;;) {
        uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
        uint64_t head = atomic_load_explicit(&r->head, memory_order_acquire);
        if (head == tail)
            return NULL;
        uint64_t pos = tail % capacity;
        if (head - tail > capacity || (tail & 7) != 0 || capacity - pos < RECORD_HEADER) {
            *corrupt = 1;
            return NULL;
        }
        uint32_t *hdr = (uint32_t *)(r->data + pos);
        uint32_t l = hdr[0], k = hdr[1];
        uint64_t size = RECORD_HEADER + RING_ALIGN(l);
        /* A record never wraps and never goes past what was published. */
        if (size > capacity - pos || size > head - tail) {
            *corrupt = 1;
            return NULL;
        }
        if (k == RING_KIND_PAD) {
            atomic_store_explicit(&r->tail, tail + size, memory_order_release);
            continue;
        }
        *kind = k;
        *len = l;
        return hdr + 2;
    }
}

void
ring_pop_checked(ring *r, uint64_t capacity, uint32_t len)
{
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    atomic_store_explicit(&r->tail, tail + RECORD_HEADER + RING_ALIGN(len), memory_order_release);
    wake_notify(&r->writable);
}

int
ring_empty(ring *r)
{
    return atomic_load_explicit(&r->head, memory_order_acquire) ==
           atomic_load_explicit(&r->tail, memory_order_relaxed);
}

uint64_t
ring_used(ring *r)
{
    return atomic_load_explicit(&r->head, memory_order_acquire) -
           atomic_load_explicit(&r->tail, memory_order_acquire);
}
