/* exec/wire.h — every record the master, the fork server and the workers exchange, as structs.
 * Records travel through the shared-memory rings (ring.h: [u32 length][u32 kind][payload]); a
 * record too large for a ring travels in an arena block, announced by a small INDIRECT record.
 * Pure C (no Python): the validation below is also built into ctest's test_wire and the fuzz
 * target, because the master must trust nothing a worker writes. */
#ifndef PYDRON_EXEC_WIRE_H
#define PYDRON_EXEC_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "exec/arena.h"
#include "exec/ring.h"

/* Bumped whenever a struct below changes; the master writes it into the shared control block
 * and a worker that finds another value refuses to run (it was built from another pydron). */
#define WIRE_VERSION 3u

#define WIRE_NO_BLOCK UINT64_MAX
#define WIRE_ALIGN(n) (((uint64_t)(n) + 7u) & ~(uint64_t)7u)

enum wire_kind {
    WIRE_DEFINE = 1,      /* master -> worker: wire_define, then the pickled function's blob */
    WIRE_TASK = 2,        /* master -> worker: wire_task, ndeps blobs, then the arguments' blob */
    WIRE_RESULT = 3,      /* worker -> master: wire_result, then the result's blob */
    WIRE_ERROR = 4,       /* worker -> master: wire_result, then the pickled exception's blob */
    WIRE_INDIRECT = 5,    /* either way: wire_indirect; the real record is in an arena block */
    WIRE_NOTE = 6,        /* worker -> master: wire_result, then a pickled (key, message) to
                             log once per key (PYDRON_CHECK); before the task's RESULT/ERROR */
};

/* An out-of-band buffer: a reference on arena block blk, whose bytes are [off, off + len). */
typedef struct {
    uint64_t blk, off, len;
} wire_buf;

/* An encoded value: this header, nbufs wire_buf, then (data_blk == WIRE_NO_BLOCK) the pickle
 * bytes inline, padded to 8, else the pickle bytes are [data_off, data_off + len) in arena block
 * data_blk. The arena references it names travel with the record. */
typedef struct {
    uint64_t len, data_blk, data_off;
    uint32_t nbufs, pad;
} wire_blob;

typedef struct {
    uint64_t fn_id;
} wire_define;

typedef struct {
    uint64_t task_id;
    uint32_t fn_id;
    uint32_t ndeps;       /* dependency i is persistent id i in the arguments */
    uint32_t flags;       /* WIRE_TASK_CHUNK */
    uint32_t pad;
} wire_task;

/* The arguments are ((calls,), None), calls a list of argument tuples, or ((values, 1), None),
 * values a list of single arguments: the worker calls the function on each, in order, and
 * returns ("ok", results), or at the first failure ("err", index, pickled exception). */
#define WIRE_TASK_CHUNK 1u

typedef struct {
    uint64_t task_id;
    uint64_t elapsed_ns;  /* the function's run time in the worker */
} wire_result;

typedef struct {
    uint32_t kind;        /* the kind of the record in the block */
    uint32_t pad;
    uint64_t blk;         /* arena block holding the record's payload (one reference) */
    uint64_t len;         /* payload bytes */
} wire_indirect;

/* Size of the wire form of a blob of len bytes and nbufs buffers, or 0 when that overflows. */
static inline uint64_t
wire_blob_size(uint64_t len, uint64_t nbufs, int inline_data)
{
    if (nbufs > (UINT64_MAX / 2) / sizeof(wire_buf) || len > UINT64_MAX / 2)
        return 0;
    return sizeof(wire_blob) + nbufs * sizeof(wire_buf) + (inline_data ? WIRE_ALIGN(len) : 0);
}

/* Write a blob's wire form at dst: header, buffers, inline bytes (data NULL when the bytes are
 * in block data_blk). Returns the bytes written. The references named go with the record. */
size_t wire_write_blob(void *dst, const char *data, uint64_t len, uint64_t data_blk,
                       uint64_t data_off, const wire_buf *bufs, uint32_t nbufs);

/* A blob as read from a record, after wire_check_blob: pointers into the record or the arena. */
typedef struct {
    const char *data;          /* the pickle bytes (inline or in the arena) */
    uint64_t len;
    uint64_t data_blk;         /* WIRE_NO_BLOCK when inline */
    const wire_buf *bufs;
    uint32_t nbufs;
} wire_blob_view;

/* Check the blob at p, with avail bytes of record left, against the arena a (NULL: no arena, so
 * any arena reference is an error): every length, count and offset is inside the record or
 * inside an allocated arena block. On success fills *view and *consumed and returns NULL; else
 * returns a static string saying what is wrong (nothing is read out of bounds either way). */
const char *wire_check_blob(const void *p, size_t avail, arena *a, wire_blob_view *view,
                            size_t *consumed);

/* Check a whole RESULT or ERROR payload of len bytes: the header and exactly one blob. */
const char *wire_check_result(const void *p, size_t len, arena *a, const wire_result **hdr,
                              wire_blob_view *blob);
/* Check an INDIRECT payload: the block is allocated and holds len bytes. On success *payload
 * points at the real record's payload in the arena. */
const char *wire_check_indirect(const void *p, size_t len, arena *a, const wire_indirect **ind,
                                const void **payload);

/* Drop the arena references a checked blob names (buffers and the data block). */
void wire_release_blob(arena *a, const wire_blob_view *view);

/* ---- records of any size. A record whose payload is too large for its ring (over a quarter of
 * it, so one record never holds the ring up) is written into an arena block instead, and a small
 * INDIRECT record naming the block goes through the ring. */
typedef struct {
    ring *r;
    arena *a;
    uint32_t kind;
    uint64_t len;
    uint64_t blk;               /* WIRE_NO_BLOCK: the record is in the ring */
} wire_out;

/* Where to write a record of len payload bytes: NULL when the ring has no room now (*arena_full
 * stays 0: try again later) or when the arena has none for a large record (*arena_full = 1). */
void *wire_begin(wire_out *o, ring *r, arena *a, uint32_t kind, size_t len, int *arena_full);
/* Publish the record: 0, or -1 when the ring has no room for the INDIRECT record now (the record
 * stays written: call again, or wire_abandon). */
int wire_finish(wire_out *o);
/* Give up a begun record (its arena block is freed; references written into it are not). */
void wire_abandon(wire_out *o);

typedef struct {
    ring *r;
    arena *a;
    uint64_t capacity;          /* the reader's own copy of the ring's capacity */
    uint32_t ring_len;          /* length of the ring record being read */
    uint64_t blk;               /* the block of an INDIRECT record being read, or WIRE_NO_BLOCK */
} wire_in;

/* The oldest record of r: its kind and payload (for INDIRECT, the real record's, in the arena),
 * or NULL when r is empty or (*err set) the ring or the record is malformed. capacity is the
 * reader's own copy of r's capacity (every position read is checked against it). Valid until
 * wire_done (or wire_skip, after an error). */
const void *wire_next(wire_in *in, ring *r, uint64_t capacity, arena *a, uint32_t *kind,
                      size_t *len, const char **err);
/* After wire_next failed on a malformed record that still has a length: drop it. */
void wire_skip(wire_in *in);
/* Consume the record wire_next returned (and drop its arena block). */
void wire_done(wire_in *in);

#endif
