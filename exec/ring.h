/* exec/ring.h — single-producer single-consumer byte ring in shared memory, and the futex
 * wake-ups that go with it. Pure C (no Python): also built into the ctest unit test_ring.
 * Records are [u32 length][u32 kind][payload], 8-byte aligned; a record never wraps (a PAD record
 * fills the end of the buffer instead), so the consumer reads every payload in place. */
#ifndef PYDRON_EXEC_RING_H
#define PYDRON_EXEC_RING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* A futex word plus a waiter count, both in shared memory. A sleeper announces itself in
 * `waiters` before FUTEX_WAIT, so a notifier skips the system call when nobody sleeps. */
typedef struct {
    _Atomic uint32_t seq;
    _Atomic uint32_t waiters;
} wake_word;

/* Wake every process sleeping on w (cheap when none is). Call after making the condition true. */
void wake_notify(wake_word *w);
/* Sleeping on w: seen = wake_prepare(w); then re-check the condition; if it holds,
 * wake_cancel(w), else wake_wait(w, seen, timeout_ns) (< 0: no limit), which returns 0 on a
 * wake-up or the errno of the wait (ETIMEDOUT, EINTR). */
uint32_t wake_prepare(wake_word *w);
void wake_cancel(wake_word *w);
int wake_wait(wake_word *w, uint32_t seen, int64_t timeout_ns);

enum { RING_KIND_PAD = 0 };  /* filler at the end of the buffer; never returned to callers */

typedef struct {
    _Atomic uint64_t head;        /* bytes ever written (producer's) */
    char pad0[56];
    _Atomic uint64_t tail;        /* bytes ever consumed (consumer's) */
    char pad1[56];
    wake_word readable;              /* bumped when a record is committed (consumer sleeps here) */
    wake_word writable;             /* bumped when records are consumed (producer sleeps here) */
    uint64_t capacity;            /* size of data[], a multiple of 8 */
    uint64_t reserved_len;        /* producer's pending reservation: bytes it advances head */
    uint64_t reserved_pos;        /* ... and where its record header is (producer-private) */
    char pad2[24];
    _Alignas(64) unsigned char data[];
} ring;

#define RING_HEADER_SIZE offsetof(ring, data)
#define RING_ALIGN(n) (((uint64_t)(n) + 7u) & ~(uint64_t)7u)

/* The capacity ring_init gives a ring of `bytes` (a consumer keeps its own copy of it). */
static inline uint64_t
ring_capacity_for(size_t bytes)
{
    return bytes < RING_HEADER_SIZE + 64 ? 0 : ((uint64_t)(bytes - RING_HEADER_SIZE) & ~(uint64_t)7u);
}

/* Format `bytes` of memory at mem as an empty ring. Returns it, or NULL if too small. */
ring *ring_init(void *mem, size_t bytes);
/* Forget every record (only when neither side is using the ring). */
void ring_reset(ring *r);
/* Largest payload a single record may carry. */
uint32_t ring_max_payload(const ring *r);

/* Producer: reserve room for a payload of len bytes; returns where to write it, or NULL when the
 * ring is currently too full (or len > ring_max_payload). Then ring_commit publishes it; the
 * producer then wakes the consumer with wake_notify on whichever word the consumer sleeps on. */
void *ring_reserve(ring *r, uint32_t len);
void ring_commit(ring *r, uint32_t kind);
/* Producer convenience: copy one payload in; 0, or -1 when full. */
int ring_push(ring *r, uint32_t kind, const void *payload, uint32_t len);

/* Consumer: the oldest record's payload (kind and length through the pointers), or NULL if the
 * ring is empty. The payload stays valid until ring_pop. */
void *ring_peek(ring *r, uint32_t *kind, uint32_t *len);
void ring_pop(ring *r);   /* also wakes a producer sleeping on r->writable */

/* Consumer of a ring whose producer is not trusted (the master reading what a worker wrote):
 * capacity is the consumer's own copy (the one in shared memory may have been scribbled over),
 * and every position and length read from the ring is checked against it. NULL with *corrupt
 * set when the ring's state or a record header cannot be right. Pop with the length returned. */
void *ring_peek_checked(ring *r, uint64_t capacity, uint32_t *kind, uint32_t *len, int *corrupt);
void ring_pop_checked(ring *r, uint64_t capacity, uint32_t len);
int ring_empty(ring *r);
/* Bytes in use (records plus padding). */
uint64_t ring_used(ring *r);

#endif
