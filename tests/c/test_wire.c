/* tests/c/test_wire.c — the wire records of exec/wire.h: blobs written and read back, every kind
 * of malformed record refused with a reason (lengths, counts that overflow, offsets outside the
 * arena or in free blocks), records too large for a ring crossing through the arena, and random
 * bytes that must never be read out of bounds (run under ASan by `make asan`). */
#include "exec/wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c); exit(1); } } while (0)

static void *
shared(size_t bytes)
{
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(m != MAP_FAILED);
    return m;
}

static arena *A;

static void
test_blob_round_trip(void)
{
    uint64_t blk, data_blk;
    CHECK(arena_alloc(A, 100000, &blk) == 0);
    CHECK(arena_alloc(A, 5000, &data_blk) == 0);
    memset(arena_ptr(A, data_blk), 'p', 5000);
    wire_buf bufs[2] = {{blk, blk, 100000}, {blk, blk + 64, 10}};
    _Alignas(8) char rec[4096];
    const char *pickle = "hello pickle";
    size_t n = wire_write_blob(rec, pickle, 12, WIRE_NO_BLOCK, 0, bufs, 2);
    CHECK(n == sizeof(wire_blob) + 2 * sizeof(wire_buf) + 16);
    wire_blob_view v;
    size_t used;
    CHECK(wire_check_blob(rec, n, A, &v, &used) == NULL);
    CHECK(used == n && v.len == 12 && memcmp(v.data, pickle, 12) == 0 && v.nbufs == 2);
    CHECK(v.bufs[1].off == blk + 64 && v.data_blk == WIRE_NO_BLOCK);

    /* Pickle bytes in the arena. */
    n = wire_write_blob(rec, NULL, 5000, data_blk, data_blk, NULL, 0);
    CHECK(wire_check_blob(rec, n, A, &v, &used) == NULL);
    CHECK(v.data == (const char *)arena_ptr(A, data_blk) && v.data[4999] == 'p');

    /* A result record: header then exactly one blob. */
    wire_result *r = (wire_result *)rec;
    r->task_id = 42;
    r->elapsed_ns = 7;
    n = sizeof(wire_result) + wire_write_blob(rec + sizeof(wire_result), "x", 1, WIRE_NO_BLOCK, 0,
                                              NULL, 0);
    const wire_result *hdr;
    CHECK(wire_check_result(rec, n, A, &hdr, &v) == NULL && hdr->task_id == 42);
    CHECK(wire_check_result(rec, n + 8, A, &hdr, &v) != NULL);   /* trailing bytes */
    CHECK(wire_check_result(rec, 8, A, &hdr, &v) != NULL);       /* shorter than its header */
    arena_decref(A, blk);
    arena_decref(A, data_blk);
}

static void
test_malformed_blobs(void)
{
    uint64_t blk;
    CHECK(arena_alloc(A, ARENA_PAGE, &blk) == 0);
    _Alignas(8) char rec[1024];
    wire_blob *w = (wire_blob *)rec;
    wire_buf *b = (wire_buf *)(w + 1);
    wire_blob_view v;
    size_t used;

    memset(rec, 0, sizeof rec);
    w->data_blk = WIRE_NO_BLOCK;
    w->len = 2000;                                   /* inline bytes past the record */
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) != NULL);

    w->len = 0;
    w->nbufs = UINT32_MAX;                           /* count whose size overflows the record */
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) != NULL);

    w->len = UINT64_MAX - 3;                         /* length that overflows when padded */
    w->nbufs = 0;
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) != NULL);

    w->len = 0;
    w->nbufs = 1;
    b[0] = (wire_buf){blk, blk, ARENA_PAGE + 1};    /* one byte past its block */
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) != NULL);
    b[0] = (wire_buf){blk, blk - 8, 8};              /* before its block */
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) != NULL);
    b[0] = (wire_buf){blk + 8, blk + 8, 8};          /* not a block start */
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) != NULL);
    b[0] = (wire_buf){UINT64_MAX - 7, 0, 8};         /* far outside the arena */
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) != NULL);
    b[0] = (wire_buf){blk, blk, ARENA_PAGE};         /* exactly the block: fine */
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) == NULL);
    CHECK(wire_check_blob(rec, sizeof rec, NULL, &v, &used) != NULL);   /* no arena at all */

    w->nbufs = 0;
    w->data_blk = blk;                               /* pickle bytes in a block... */
    w->data_off = blk;
    w->len = 16;
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) == NULL);
    arena_decref(A, blk);                            /* ...that is freed meanwhile */
    CHECK(wire_check_blob(rec, sizeof rec, A, &v, &used) != NULL);
    CHECK(wire_check_blob(rec + 4, sizeof rec - 8, A, &v, &used) != NULL);   /* misaligned */
    CHECK(wire_check_blob(rec, 8, A, &v, &used) != NULL);                    /* cut short */
}

static void
test_records_of_any_size(void)
{
    ring *r = ring_init(shared(64 << 10), 64 << 10);
    CHECK(r != NULL);
    size_t big = 3 * ring_max_payload(r);            /* far too large for the ring */
    wire_out o;
    int full;
    char *dst = wire_begin(&o, r, A, WIRE_TASK, big, &full);
    CHECK(dst != NULL && !full && o.blk != WIRE_NO_BLOCK);
    for (size_t i = 0; i < big; i++)
        dst[i] = (char)(i * 7);
    CHECK(wire_finish(&o) == 0);
    /* A small record behind it stays in the ring. */
    dst = wire_begin(&o, r, A, WIRE_DEFINE, 16, &full);
    CHECK(dst != NULL && o.blk == WIRE_NO_BLOCK);
    memcpy(dst, "sixteen bytes!!", 16);
    CHECK(wire_finish(&o) == 0);

    arena_stats before, after;
    arena_get_stats(A, &before);
    wire_in in;
    uint32_t kind;
    size_t len;
    const char *err;
    const char *p = wire_next(&in, r, r->capacity, A, &kind, &len, &err);
    CHECK(p != NULL && err == NULL && kind == WIRE_TASK && len == big);
    for (size_t i = 0; i < big; i++)
        CHECK(p[i] == (char)(i * 7));
    wire_done(&in);
    arena_get_stats(A, &after);
    CHECK(after.used_pages < before.used_pages);     /* the record's block was released */
    p = wire_next(&in, r, r->capacity, A, &kind, &len, &err);
    CHECK(p != NULL && kind == WIRE_DEFINE && len == 16 && memcmp(p, "sixteen bytes!!", 16) == 0);
    wire_done(&in);
    CHECK(wire_next(&in, r, r->capacity, A, &kind, &len, &err) == NULL && err == NULL);

    /* A forged INDIRECT record naming memory outside the arena is refused, not followed. */
    wire_indirect forged = {WIRE_RESULT, 0, 12345, 1 << 20};
    CHECK(ring_push(r, WIRE_INDIRECT, &forged, sizeof forged) == 0);
    CHECK(wire_next(&in, r, r->capacity, A, &kind, &len, &err) == NULL && err != NULL);
    wire_skip(&in);
    wire_indirect nested = {WIRE_INDIRECT, 0, 0, 0};
    CHECK(ring_push(r, WIRE_INDIRECT, &nested, sizeof nested) == 0);
    CHECK(wire_next(&in, r, r->capacity, A, &kind, &len, &err) == NULL && err != NULL);
    wire_skip(&in);
    CHECK(ring_empty(r));

    /* A scribbled ring: a record header longer than the ring, then positions out of order.
     * The reader uses its own copy of the capacity, so zeroing the shared one changes nothing. */
    uint64_t cap = r->capacity;
    CHECK(ring_push(r, WIRE_RESULT, "12345678", 8) == 0);
    uint32_t *hdr = (uint32_t *)(r->data + atomic_load(&r->tail) % cap);
    hdr[0] = (uint32_t)cap;
    r->capacity = 0;
    CHECK(wire_next(&in, r, cap, A, &kind, &len, &err) == NULL && err != NULL);
    CHECK(in.ring_len == UINT32_MAX);
    atomic_store(&r->head, atomic_load(&r->tail) + 3 * cap);
    CHECK(wire_next(&in, r, cap, A, &kind, &len, &err) == NULL && err != NULL);
    atomic_store(&r->head, atomic_load(&r->tail));
    r->capacity = cap;

    /* A full arena: the large record cannot be begun, and says why. */
    uint64_t hog;
    arena_stats st;
    arena_get_stats(A, &st);
    CHECK(arena_alloc(A, (st.total_pages - st.used_pages) * ARENA_PAGE, &hog) == 0);
    CHECK(wire_begin(&o, r, A, WIRE_TASK, big, &full) == NULL && full);
    arena_decref(A, hog);
}

static void
test_random_bytes(void)
{
    /* Whatever a worker scribbles, checking it reads nothing outside the record and the arena
     * (ASan would say so) and never accepts an offset outside allocated blocks. */
    uint64_t blk;
    CHECK(arena_alloc(A, 4 * ARENA_PAGE, &blk) == 0);
    srand(1234);
    size_t cap = 512;
    char *rec = aligned_alloc(8, cap);
    for (int round = 0; round < 200000; round++) {
        size_t len = (size_t)(rand() % (int)cap);
        for (size_t i = 0; i < len; i++)
            rec[i] = (char)rand();
        if (round % 3 == 0 && len >= sizeof(wire_result) + sizeof(wire_blob)) {
            /* Plausible headers reach the deeper checks. */
            wire_blob *w = (wire_blob *)(rec + sizeof(wire_result));
            w->nbufs %= 8;
            w->len %= 256;
            if (round % 2)
                w->data_blk = WIRE_NO_BLOCK;
        }
        const wire_result *hdr;
        wire_blob_view v;
        if (wire_check_result(rec, len, A, &hdr, &v) == NULL) {
            for (uint32_t i = 0; i < v.nbufs; i++)
                CHECK(v.bufs[i].off >= v.bufs[i].blk);
            volatile char sink = 0;
            for (uint64_t i = 0; i < v.len; i++)
                sink ^= v.data[i];
            (void)sink;
        }
    }
    free(rec);
    arena_decref(A, blk);
}

int
main(void)
{
    size_t size = 64 << 20;
    A = arena_create(shared(size), size);
    CHECK(A != NULL);
    test_blob_round_trip();
    test_malformed_blobs();
    test_records_of_any_size();
    test_random_bytes();
    printf("test_wire: ok\n");
    return 0;
}
