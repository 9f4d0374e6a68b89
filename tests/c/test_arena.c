/* tests/c/test_arena.c — the shared arena: first fit, freeing and coalescing, reference counts,
 * trimming, and allocation from several processes at once. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/arena.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c); exit(1); } } while (0)

static arena *new_arena(size_t bytes)
{
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CHECK(m != MAP_FAILED);
    arena *a = arena_create(m, bytes);
    CHECK(a != NULL);
    return a;
}

static uint64_t used(arena *a)
{
    arena_stats s;
    arena_get_stats(a, &s);
    return s.used_pages;
}

static void test_alloc_free_coalesce(void)
{
    arena *a = new_arena(64 * ARENA_PAGE);
    arena_stats s;
    arena_get_stats(a, &s);
    CHECK(s.total_pages > 50 && s.total_pages < 64);
    uint64_t b1, b2, b3, b4, big;
    CHECK(arena_alloc(a, 1, &b1) == 0);
    CHECK(arena_alloc(a, ARENA_PAGE + 1, &b2) == 0);     /* 2 pages */
    CHECK(arena_alloc(a, ARENA_PAGE, &b3) == 0);
    CHECK(b2 == b1 + ARENA_PAGE && b3 == b2 + 2 * ARENA_PAGE);   /* first fit, contiguous */
    CHECK(used(a) == 4);
    memset(arena_ptr(a, b2), 0xab, 2 * ARENA_PAGE);      /* writable, whole block */
    uint64_t blk;
    size_t blen;
    CHECK(arena_block_of(a, (char *)arena_ptr(a, b2) + ARENA_PAGE + 5, &blk, &blen) == 0);
    CHECK(blk == b2 && blen == 2 * ARENA_PAGE);
    CHECK(arena_block_of(a, (char *)a + 10, &blk, &blen) == -1);
    /* Free the middle: a 1-page request reuses its first page (first fit). */
    CHECK(arena_decref(a, b2) == 1);
    CHECK(arena_alloc(a, 10, &b4) == 0 && b4 == b2);
    CHECK(arena_decref(a, b4) == 1);
    /* b1 + b2 + b3 freed: they coalesce into one 4-page run at the start. */
    CHECK(arena_decref(a, b1) == 1 && arena_decref(a, b3) == 1);
    CHECK(used(a) == 0);
    CHECK(arena_alloc(a, 4 * ARENA_PAGE, &big) == 0 && big == b1);
    CHECK(arena_decref(a, big) == 1);
    /* Exhaustion: the whole arena, then nothing. */
    CHECK(arena_alloc(a, s.total_pages * ARENA_PAGE, &big) == 0);
    CHECK(arena_alloc(a, 1, &b1) == -1);
    CHECK(arena_decref(a, big) == 1);
    CHECK(arena_alloc(a, (s.total_pages + 1) * ARENA_PAGE, &big) == -1);
}

static void test_refcounts_and_trim(void)
{
    arena *a = new_arena(64 * ARENA_PAGE);
    arena_set_trim_threshold(a, 4 * ARENA_PAGE);
    uint64_t b;
    CHECK(arena_alloc(a, 3 * ARENA_PAGE, &b) == 0);
    CHECK(arena_refcount(a, b) == 1);
    arena_incref(a, b);
    arena_incref(a, b);
    CHECK(arena_refcount(a, b) == 3);
    CHECK(arena_decref(a, b) == 0 && arena_decref(a, b) == 0);
    CHECK(used(a) == 3);
    CHECK(arena_decref(a, b) == 1 && used(a) == 0);
    arena_stats s;
    arena_get_stats(a, &s);
    CHECK(s.free_dirty_pages == 3 && s.trims == 0);
    CHECK(arena_alloc(a, 6 * ARENA_PAGE, &b) == 0);       /* reuses the 3 dirty pages */
    arena_get_stats(a, &s);
    CHECK(s.free_dirty_pages == 0);
    CHECK(arena_decref(a, b) == 1);                       /* 6 dirty > 4: trimmed */
    arena_get_stats(a, &s);
    CHECK(s.free_dirty_pages == 0 && s.trims == 1);
}

/* Four processes allocate, fill, check and free blocks in the same arena; a block's refcount is
 * dropped by another process than the one that allocated it. */
static void test_across_fork(void)
{
    arena *a = new_arena(256 * ARENA_PAGE);
    uint64_t shared;
    CHECK(arena_alloc(a, ARENA_PAGE, &shared) == 0);
    arena_incref(a, shared);                            /* one reference per child below */
    arena_incref(a, shared);
    arena_incref(a, shared);
    pid_t pids[4];
    for (int c = 0; c < 4; c++) {
        pids[c] = fork();
        CHECK(pids[c] >= 0);
        if (pids[c] == 0) {
            srand(c + 1);
            for (int i = 0; i < 2000; i++) {
                size_t len = (size_t)(1 + rand() % 5) * ARENA_PAGE - (size_t)(rand() % 100);
                uint64_t b;
                if (arena_alloc(a, len, &b) != 0)
                    continue;                           /* momentarily full: fine */
                unsigned char *p = arena_ptr(a, b);
                memset(p, c + 1, len);
                for (size_t k = 0; k < len; k += 4096)
                    if (p[k] != c + 1)
                        _exit(2);
                arena_decref(a, b);
            }
            if (c < 3)
                arena_decref(a, shared);
            _exit(0);
        }
    }
    for (int c = 0; c < 4; c++) {
        int status;
        CHECK(waitpid(pids[c], &status, 0) == pids[c] && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    CHECK(arena_refcount(a, shared) == 1);
    CHECK(used(a) == 1);
    CHECK(arena_decref(a, shared) == 1 && used(a) == 0);
}

/* A process dying while it holds the allocator's lock does not block the others. */
static void test_owner_died(void)
{
    arena *a = new_arena(16 * ARENA_PAGE);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        arena__lock_for_test(a);
        _exit(0);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid);
    uint64_t b;
    CHECK(arena_alloc(a, 1, &b) == 0);
    CHECK(arena_decref(a, b) == 1 && used(a) == 0);
}

int main(void)
{
    test_alloc_free_coalesce();
    test_refcounts_and_trim();
    test_across_fork();
    test_owner_died();
    printf("test_arena: ok\n");
    return 0;
}
