/* tests/c/test_held.c — the held-reference table: any number of references (several chunks),
 * entries reused after they are forgotten, keyed entries for numpy frees, and the master's
 * release after a death dropping exactly what is recorded (a scribbled entry is skipped). */
#include "exec/held.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c); exit(1); } } while (0)

int
main(void)
{
    size_t size = 256 << 20;
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(mem != MAP_FAILED);
    arena *a = arena_create(mem, size);
    CHECK(a != NULL);
    static held_table table;
    arena_stats empty;
    arena_get_stats(a, &empty);

    held_begin(&table, a);
    /* 3 blocks, referenced 9,000 times each: more than one chunk of entries. */
    enum { BLOCKS = 3, REFS = 9000 };
    uint64_t blk[BLOCKS];
    int64_t *idx = malloc(sizeof(int64_t) * BLOCKS * REFS);
    for (int b = 0; b < BLOCKS; b++) {
        CHECK(arena_alloc(a, 1000, &blk[b]) == 0);
        for (int r = 0; r < REFS; r++) {
            arena_incref(a, blk[b]);
            idx[b * REFS + r] = held_add(blk[b]);
            CHECK(idx[b * REFS + r] >= 0);
        }
    }
    CHECK(held_count() == BLOCKS * REFS);
    CHECK(table.chunks[0] != 0 && table.chunks[3] != 0);      /* 27,000 entries: 4 chunks */
    /* Forgetting (the reference was handed on) frees the entry for reuse. */
    for (int r = 0; r < REFS; r++) {
        held_forget(idx[r]);
        arena_decref(a, blk[0]);
    }
    CHECK(held_count() == 2 * REFS);
    int64_t again = held_add(blk[0]);
    CHECK(again >= 0 && again < REFS);                         /* a freed entry, reused */
    arena_incref(a, blk[0]);
    held_forget(again);
    arena_decref(a, blk[0]);

    /* Keyed entries: found again by their block. */
    uint64_t arr;
    CHECK(arena_alloc(a, 300000, &arr) == 0);
    held_add_keyed(arr);
    CHECK(held_count() == 2 * REFS + 1);
    held_forget_keyed(arr);
    CHECK(held_count() == 2 * REFS);
    held_add_keyed(arr);

    /* A scribbled entry (not a block) is skipped by the release. */
    uint64_t *chunk0 = arena_ptr(a, table.chunks[0]);
    chunk0[5] = 12345 + 1;                                     /* a forgotten entry, scribbled */

    /* The worker "dies": the master drops every recorded reference and the chunks. */
    CHECK(arena_refcount(a, blk[1]) == REFS + 1);
    uint64_t dropped = held_release_all(&table, a);
    CHECK(dropped == 2 * REFS + 1);
    CHECK(arena_refcount(a, blk[0]) == 1 && arena_refcount(a, blk[1]) == 1);
    for (int b = 0; b < BLOCKS; b++)
        arena_decref(a, blk[b]);
    arena_stats after;
    arena_get_stats(a, &after);
    CHECK(after.used_pages == empty.used_pages);               /* chunks and arrays all freed */
    for (int c = 0; c < HELD_MAX_CHUNKS; c++)
        CHECK(table.chunks[c] == 0);
    free(idx);
    printf("test_held: ok\n");
    return 0;
}
