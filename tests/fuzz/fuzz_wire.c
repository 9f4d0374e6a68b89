/* tests/fuzz/fuzz_wire.c — libFuzzer target for what the master reads from shared memory a worker
 * may have scribbled on: blobs, result and indirect records, and a whole result ring (positions
 * and record headers included). Built with clang's -fsanitize=fuzzer,address,undefined by
 * `make fuzz`, which runs it for a bounded time; any read out of bounds, any accepted offset
 * outside an allocated block (asserted: the arena is one mapping, where ASan sees nothing), or
 * any crash is a failure. `make fuzz` first builds it with FUZZ_ORACLE_SELFTEST and requires it
 * to abort, so an oracle that lets everything through fails the build. The other way round too: a well-formed
 * blob made from the input (mode 4) must be accepted and read back exactly as written, and the
 * same blob with one buffer reaching past its block must be refused. */
#include "exec/wire.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define ARENA_BYTES ((size_t)8 << 20)
#define RING_BYTES 8192

static arena *A;
static ring *R;
static uint64_t valid_blk[4];

static void
setup(void)
{
    void *m = mmap(NULL, ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    A = arena_create(m, ARENA_BYTES);
    for (int i = 0; i < 4; i++)
        arena_alloc(A, (size_t)(i + 1) * 40000, &valid_blk[i]);
    R = ring_init(aligned_alloc(64, RING_BYTES), RING_BYTES);
}

/* [off, off + len) lies inside allocated block blk, or the checker accepted what it must not. The
 * arena is one mapping, so ASan cannot see a read past a block that stays inside it: this can. */
static void
assert_in_block(uint64_t blk, uint64_t off, uint64_t len)
{
    size_t blen;
    if (arena_block_len(A, blk, &blen) != 0 || off < blk || off - blk > blen ||
        len > blen - (off - blk))
        abort();
}

/* Whatever a check accepted must lie inside the record (inline bytes) or inside allocated blocks
 * (arena bytes and buffers): asserted, then every byte it points at is touched. */
static void
touch_view(const wire_blob_view *v, const void *rec, size_t avail)
{
    volatile unsigned char sink = 0;
    if (v->data_blk == WIRE_NO_BLOCK) {
        const char *lo = rec, *hi = lo + avail;
        if (v->data < lo || v->data > hi || v->len > (uint64_t)(hi - v->data))
            abort();
    }
    else
        assert_in_block(v->data_blk, (uint64_t)(v->data - (const char *)A), v->len);
    for (uint64_t i = 0; i < v->len; i++)
        sink ^= (unsigned char)v->data[i];
    for (uint32_t b = 0; b < v->nbufs; b++) {
        assert_in_block(v->bufs[b].blk, v->bufs[b].off, v->bufs[b].len);
        const unsigned char *p = arena_ptr(A, v->bufs[b].off);
        for (uint64_t i = 0; i < v->bufs[b].len; i += 4096)
            sink ^= p[i];
    }
    (void)sink;
}

/* Mode 4: a blob written with wire_write_blob from the input (its bytes inline, up to four
 * buffers inside the allocated blocks, at offsets and lengths taken from the input) is accepted,
 * consumed whole and read back field for field; one buffer made one byte too long is refused. */
static void
well_formed_blob(const unsigned char *in, size_t n)
{
    wire_buf bufs[4];
    uint32_t nbufs = n ? in[0] % 5 : 0;
    for (uint32_t b = 0; b < nbufs; b++) {
        size_t blen;
        uint64_t blk = valid_blk[(b + (n > 1 ? in[1] : 0)) % 4];
        if (arena_block_len(A, blk, &blen) != 0)
            abort();
        uint64_t off = n > 2 + b ? (uint64_t)in[2 + b] * 97 % blen : 0;
        bufs[b] = (wire_buf){blk, blk + off, blen - off};
    }
    uint64_t size = wire_blob_size(n, nbufs, 1);
    uint64_t *rec = calloc(1, size + 8);
    size_t written = wire_write_blob(rec, (const char *)in, n, WIRE_NO_BLOCK, 0, bufs, nbufs);
    wire_blob_view v;
    size_t used;
    if (written != size || wire_check_blob(rec, written, A, &v, &used) != NULL || used != written ||
        v.len != n || v.nbufs != nbufs || (n && memcmp(v.data, in, n) != 0) ||
        (nbufs && memcmp(v.bufs, bufs, nbufs * sizeof(wire_buf)) != 0))
        abort();
    touch_view(&v, rec, written);
    if (nbufs) {
        wire_buf *first = (wire_buf *)((wire_blob *)rec + 1);
        first->len++;                                  /* one byte past the end of its block */
        if (wire_check_blob(rec, written, A, &v, &used) == NULL)
            abort();
    }
    free(rec);
}

#ifdef FUZZ_ORACLE_SELFTEST
/* Built this way by `make fuzz`, the target must abort on any input: it hands the oracle a view
 * whose buffer reaches one byte past its block, as a checker that wrongly accepted it would. A
 * target that ran on would be one that cannot fail. */
static void
oracle_selftest(void)
{
    size_t blen;
    if (arena_block_len(A, valid_blk[0], &blen) != 0)
        abort();
    wire_buf past = {valid_blk[0], valid_blk[0], blen + 1};
    wire_blob_view v = {.data = "", .len = 0, .data_blk = WIRE_NO_BLOCK, .bufs = &past,
                        .nbufs = 1};
    touch_view(&v, v.data, 0);
}
#endif

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (A == NULL)
        setup();
#ifdef FUZZ_ORACLE_SELFTEST
    oracle_selftest();
#endif
    if (size < 1)
        return 0;
    /* The input, aligned as records in shared memory are. */
    size_t n = size - 1;
    uint64_t *buf = malloc(n + 8);
    memcpy(buf, data + 1, n);
    const char *p = (const char *)buf;
    wire_blob_view v;
    size_t used;
    const wire_result *hdr;
    const wire_indirect *ind;
    const void *payload;
    switch (data[0] % 5) {
    case 0:
        if (wire_check_blob(p, n, A, &v, &used) == NULL) {
            if (used > n)
                abort();
            touch_view(&v, p, n);
        }
        break;
    case 1:
        if (wire_check_result(p, n, A, &hdr, &v) == NULL)
            touch_view(&v, p, n);
        break;
    case 2:
        if (wire_check_indirect(p, n, A, &ind, &payload) == NULL) {
            assert_in_block(ind->blk, ind->blk, ind->len);
            if (payload != arena_ptr(A, ind->blk))
                abort();
        }
        break;
    case 4:
        well_formed_blob((const unsigned char *)p, n);
        break;
    default: {
        /* A whole ring as a worker left it: its positions from the input, its data too. */
        uint64_t cap = ring_capacity_for(RING_BYTES);
        ring_reset(R);
        if (n >= 16) {
            uint64_t pos[2];
            memcpy(pos, p, 16);
            atomic_store(&R->tail, pos[0] & ~(uint64_t)7);
            atomic_store(&R->head, pos[1]);
            memcpy(R->data, p + 16, n - 16 < cap ? n - 16 : cap);
        }
        R->capacity = data[0] & 0x80 ? 0 : cap;     /* a scribbled capacity changes nothing */
        for (int k = 0; k < 16; k++) {
            wire_in in;
            uint32_t kind;
            size_t len;
            const char *err;
            const void *rec = wire_next(&in, R, cap, A, &kind, &len, &err);
            if (rec == NULL)
                break;
            if (wire_check_result(rec, len, A, &hdr, &v) == NULL)
                touch_view(&v, rec, len);
            ring_pop_checked(R, cap, in.ring_len);   /* no decref: the arena stays as set up */
        }
        break;
    }
    }
    free(buf);
    return 0;
}
