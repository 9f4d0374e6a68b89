/* tests/c/test_ring.c — the shared-memory SPSC ring: order, wrap-around, full ring, large records,
 * and a producer and a consumer in two processes sleeping on futexes. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/ring.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c); exit(1); } } while (0)

static ring *new_ring(size_t bytes)
{
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    ring *r = ring_init(m, bytes);
    CHECK(r != NULL);
    return r;
}

static void test_order_and_empty(void)
{
    ring *r = new_ring(4096);
    uint32_t kind, len;
    CHECK(ring_empty(r));
    CHECK(ring_peek(r, &kind, &len) == NULL);
    for (uint32_t i = 0; i < 10; i++)
        CHECK(ring_push(r, 7, &i, sizeof i) == 0);
    for (uint32_t i = 0; i < 10; i++) {
        uint32_t *p = ring_peek(r, &kind, &len);
        CHECK(p && kind == 7 && len == 4 && *p == i);
        ring_pop(r);
    }
    CHECK(ring_empty(r) && ring_used(r) == 0);
}

/* Odd-sized records through a small ring many times: every wrap position is met. */
static void test_wrap_around(void)
{
    ring *r = new_ring(RING_HEADER_SIZE + 1024);
    unsigned char buf[300];
    uint32_t kind, len;
    for (int round = 0; round < 5000; round++) {
        uint32_t n = 1 + (round * 37) % 299;
        memset(buf, round & 0xff, n);
        CHECK(ring_push(r, 1 + round % 5, buf, n) == 0);
        if (round % 3 == 0) {      /* keep a few records in flight across the wrap */
            CHECK(ring_push(r, 9, buf, 1) == 0);
            unsigned char *p = ring_peek(r, &kind, &len);
            CHECK(p && len == n && kind == (uint32_t)(1 + round % 5));
            for (uint32_t i = 0; i < n; i++)
                CHECK(p[i] == (round & 0xff));
            ring_pop(r);
            p = ring_peek(r, &kind, &len);
            CHECK(p && kind == 9 && len == 1);
            ring_pop(r);
        } else {
            unsigned char *p = ring_peek(r, &kind, &len);
            CHECK(p && len == n);
            for (uint32_t i = 0; i < n; i++)
                CHECK(p[i] == (round & 0xff));
            ring_pop(r);
        }
    }
    CHECK(ring_empty(r));
}

static void test_full_and_large(void)
{
    ring *r = new_ring(RING_HEADER_SIZE + 4096);
    uint32_t max = ring_max_payload(r), kind, len;
    CHECK(max >= 1024 && max < 4096);
    CHECK(ring_reserve(r, max + 1) == NULL);       /* too large for this ring, ever */
    unsigned char *big = malloc(max);
    for (uint32_t i = 0; i < max; i++)
        big[i] = (unsigned char)(i * 7);
    CHECK(ring_push(r, 2, big, max) == 0);
    int pushed = 1;
    while (ring_push(r, 3, big, 100) == 0)
        pushed++;
    CHECK(pushed > 1);
    CHECK(ring_push(r, 3, big, 100) == -1);       /* full stays full */
    unsigned char *p = ring_peek(r, &kind, &len);
    CHECK(p && kind == 2 && len == max && memcmp(p, big, max) == 0);
    ring_pop(r);
    CHECK(ring_push(r, 4, big, max) == 0);         /* room again, after a wrap */
    for (int i = 1; i < pushed; i++) {
        p = ring_peek(r, &kind, &len);
        CHECK(p && kind == 3 && len == 100);
        ring_pop(r);
    }
    p = ring_peek(r, &kind, &len);
    CHECK(p && kind == 4 && len == max && memcmp(p, big, max) == 0);
    ring_pop(r);
    CHECK(ring_empty(r));
    ring_reset(r);
    CHECK(ring_empty(r));
    free(big);
}

/* A child produces 200,000 records through a 64 KiB ring; the parent checks every one. Both
 * sides sleep on futexes when the ring is empty or full. */
static void test_across_fork(void)
{
    ring *r = new_ring(RING_HEADER_SIZE + 65536);
    const uint64_t count = 200000;
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        for (uint64_t i = 0; i < count; i++) {
            uint64_t rec[8] = {i, i * 3};
            uint32_t len = 16 + (uint32_t)(i % 7) * 8;
            for (;;) {
                void *dst = ring_reserve(r, len);
                if (dst) {
                    memcpy(dst, rec, len);
                    ring_commit(r, 1);
                    wake_notify(&r->readable);
                    break;
                }
                uint32_t seen = wake_prepare(&r->writable);
                if (ring_reserve(r, len)) {
                    wake_cancel(&r->writable);
                    continue;
                }
                wake_wait(&r->writable, seen, 100000000);
            }
        }
        _exit(0);
    }
    for (uint64_t i = 0; i < count; i++) {
        uint32_t kind, len;
        uint64_t *p;
        while ((p = ring_peek(r, &kind, &len)) == NULL) {
            uint32_t seen = wake_prepare(&r->readable);
            if (!ring_empty(r)) {
                wake_cancel(&r->readable);
                continue;
            }
            wake_wait(&r->readable, seen, 100000000);
        }
        CHECK(kind == 1 && len == 16 + (i % 7) * 8 && p[0] == i && p[1] == i * 3);
        ring_pop(r);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(ring_empty(r));
}

int main(void)
{
    test_order_and_empty();
    test_wrap_around();
    test_full_and_large();
    test_across_fork();
    printf("test_ring: ok\n");
    return 0;
}
