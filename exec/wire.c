/* exec/wire.c — writing and checking the records of wire.h. Pure C: the master runs every record
 * a worker wrote through these checks before it follows an offset or a length in it. */
#include "exec/wire.h"

#include <string.h>

size_t
wire_write_blob(void *dst, const char *data, uint64_t len, uint64_t data_blk, uint64_t data_off,
                const wire_buf *bufs, uint32_t nbufs)
{
    wire_blob *w = dst;
    int inline_data = data_blk == WIRE_NO_BLOCK;
    w->len = len;
    w->data_blk = data_blk;
    w->data_off = inline_data ? 0 : data_off;
    w->nbufs = nbufs;
    w->pad = 0;
    wire_buf *out = (wire_buf *)(w + 1);
    if (nbufs)
        memcpy(out, bufs, nbufs * sizeof(wire_buf));
    if (inline_data && len) {
        memcpy(out + nbufs, data, len);
        memset((char *)(out + nbufs) + len, 0, WIRE_ALIGN(len) - len);
    }
    return (size_t)wire_blob_size(len, nbufs, inline_data);
}

/* [off, off + len) lies inside allocated block blk. */
static int
range_in_block(arena *a, uint64_t blk, uint64_t off, uint64_t len)
{
    size_t blen;
    if (a == NULL || arena_block_len(a, blk, &blen) < 0)
        return 0;
    return off >= blk && off - blk <= blen && len <= blen - (off - blk);
}

const char *
wire_check_blob(const void *p, size_t avail, arena *a, wire_blob_view *view, size_t *consumed)
{
    if (((uintptr_t)p & 7) != 0)
        return "misaligned blob";
    if (avail < sizeof(wire_blob))
        return "blob header past the end of the record";
    const wire_blob *w = p;
    int inline_data = w->data_blk == WIRE_NO_BLOCK;
    uint64_t size = wire_blob_size(w->len, w->nbufs, inline_data);
    if (size == 0 || size > avail)
        return "blob longer than its record";
    const wire_buf *bufs = (const wire_buf *)(w + 1);
    for (uint32_t i = 0; i < w->nbufs; i++)
        if (!range_in_block(a, bufs[i].blk, bufs[i].off, bufs[i].len))
            return "out-of-band buffer outside the shared arena's allocated blocks";
    if (!inline_data && !range_in_block(a, w->data_blk, w->data_off, w->len))
        return "pickle bytes outside the shared arena's allocated blocks";
    view->len = w->len;
    view->data_blk = w->data_blk;
    view->bufs = bufs;
    view->nbufs = w->nbufs;
    view->data = inline_data ? (const char *)(bufs + w->nbufs) : (const char *)a + w->data_off;
    *consumed = (size_t)size;
    return NULL;
}

const char *
wire_check_result(const void *p, size_t len, arena *a, const wire_result **hdr,
                  wire_blob_view *blob)
{
    if (len < sizeof(wire_result))
        return "result record shorter than its header";
    size_t used;
    const char *err = wire_check_blob((const char *)p + sizeof(wire_result),
                                      len - sizeof(wire_result), a, blob, &used);
    if (err)
        return err;
    if (used != len - sizeof(wire_result))
        return "result record longer than its blob";
    *hdr = p;
    return NULL;
}

const char *
wire_check_indirect(const void *p, size_t len, arena *a, const wire_indirect **ind,
                    const void **payload)
{
    if (len != sizeof(wire_indirect))
        return "indirect record of the wrong size";
    const wire_indirect *w = p;
    if (w->kind == WIRE_INDIRECT || w->kind == 0)
        return "indirect record of a bad kind";
    if (!range_in_block(a, w->blk, w->blk, w->len))
        return "indirect record outside the shared arena's allocated blocks";
    *ind = w;
    *payload = (const char *)a + w->blk;
    return NULL;
}

void
wire_release_blob(arena *a, const wire_blob_view *view)
{
    if (a == NULL)
        return;
    for (uint32_t i = 0; i < view->nbufs; i++)
        arena_decref(a, view->bufs[i].blk);
    if (view->data_blk != WIRE_NO_BLOCK)
        arena_decref(a, view->data_blk);
}

/* ---- records of any size ------------------------------------------------------------------ */

void *
wire_begin(wire_out *o, ring *r, arena *a, uint32_t kind, size_t len, int *arena_full)
{
    o->r = r;
    o->a = a;
    o->kind = kind;
    o->blk = WIRE_NO_BLOCK;
    o->len = len;
    *arena_full = 0;
    if (len <= ring_max_payload(r) / 4)
        return ring_reserve(r, (uint32_t)len);
    if (a == NULL || arena_alloc(a, len, &o->blk) < 0) {
        o->blk = WIRE_NO_BLOCK;
        *arena_full = 1;
        return NULL;
    }
    return arena_ptr(a, o->blk);
}

int
wire_finish(wire_out *o)
{
    if (o->blk == WIRE_NO_BLOCK) {
        ring_commit(o->r, o->kind);
        return 0;
    }
    wire_indirect ind = {o->kind, 0, o->blk, o->len};
    if (ring_push(o->r, WIRE_INDIRECT, &ind, sizeof ind) < 0)
        return -1;
    o->blk = WIRE_NO_BLOCK;     /* the reference travels with the record */
    return 0;
}

void
wire_abandon(wire_out *o)
{
    if (o->blk != WIRE_NO_BLOCK)
        arena_decref(o->a, o->blk);
    o->blk = WIRE_NO_BLOCK;
}

const void *
wire_next(wire_in *in, ring *r, uint64_t capacity, arena *a, uint32_t *kind, size_t *len,
          const char **err)
{
    uint32_t k, l;
    int corrupt;
    in->r = r;
    in->a = a;
    in->capacity = capacity;
    in->blk = WIRE_NO_BLOCK;
    in->ring_len = UINT32_MAX;
    *err = NULL;
    const void *p = ring_peek_checked(r, capacity, &k, &l, &corrupt);
    if (p == NULL) {
        if (corrupt)
            *err = "ring positions or a record header outside the ring";
        return NULL;
    }
    in->ring_len = l;
    if (k != WIRE_INDIRECT) {
        *kind = k;
        *len = l;
        return p;
    }
    const wire_indirect *ind;
    const void *payload;
    if ((*err = wire_check_indirect(p, l, a, &ind, &payload)) != NULL)
        return NULL;
    in->blk = ind->blk;
    *kind = ind->kind;
    *len = (size_t)ind->len;
    return payload;
}

void
wire_done(wire_in *in)
{
    ring_pop_checked(in->r, in->capacity, in->ring_len);
    if (in->blk != WIRE_NO_BLOCK)
        arena_decref(in->a, in->blk);
    in->blk = WIRE_NO_BLOCK;
}

void
wire_skip(wire_in *in)
{
    if (in->ring_len != UINT32_MAX)
        ring_pop_checked(in->r, in->capacity, in->ring_len);
}
