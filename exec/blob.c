/* exec/blob.c — values that live in the shared arena, with their references: exec_blob (an
 * encoded value: pickle bytes and out-of-band buffers), the ArenaBuffer type (a Python view of
 * an arena block that keeps it alive; in a worker it is recorded in the held table, held.h).
 * Thread and GIL model: blobs are reference counted atomically and may be dropped without the
 * GIL; everything that makes Python objects needs the GIL. */
#include "exec/internal.h"

#include <string.h>

/* ---- ArenaBuffer ------------------------------------------------------------------------------ */

/* Holds one reference on an arena block and exposes part of it through the buffer protocol, so
 * unpickled arrays view shared memory without a copy; the reference goes with the object. */
typedef struct {
    PyObject_HEAD
    arena *arena;
    uint64_t blk;
    char *ptr;
    Py_ssize_t len;
    int64_t held;             /* in a worker: its entry in the held table (held.h), else -1 */
    unsigned generation;      /* exec__fork_generation when made */
} ArenaBufferObject;

static int
arena_buffer_getbuffer(ArenaBufferObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->len, 0, flags);
}

static void
arena_buffer_dealloc(ArenaBufferObject *self)
{
    if (self->arena && self->generation == exec__fork_generation) {
        if (exec__in_worker_flag)
            guard_unlend(self->blk);
        guard_unview(self->blk);
        if (self->held >= 0)
            held_forget(self->held);
        arena_decref(self->arena, self->blk);
        atomic_fetch_sub(&exec__live_arena_refs, 1);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* New reference. */
static PyObject *
arena_buffer_repr(ArenaBufferObject *self)
{
    return PyUnicode_FromFormat("<pydron ArenaBuffer %zd bytes at offset %llu>", self->len,
                                (unsigned long long)(self->ptr - (char *)self->arena));
}

static PyBufferProcs arena_buffer_as_buffer = {(getbufferproc)arena_buffer_getbuffer, NULL};

static PyTypeObject ArenaBuffer_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pydron._core.ArenaBuffer",
    .tp_basicsize = sizeof(ArenaBufferObject),
    .tp_dealloc = (destructor)arena_buffer_dealloc,
    .tp_repr = (reprfunc)arena_buffer_repr,
    .tp_as_buffer = &arena_buffer_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A view of a block of pydron's shared-memory arena (keeps the block alive).",
};

PyObject *
exec__arena_buffer_new(arena *a, uint64_t blk, uint64_t off, uint64_t len)
{
    ArenaBufferObject *self = PyObject_New(ArenaBufferObject, &ArenaBuffer_Type);
    if (self == NULL)
        return NULL;
    arena_incref(a, blk);
    atomic_fetch_add(&exec__live_arena_refs, 1);
    self->arena = a;
    self->blk = blk;
    self->ptr = arena_ptr(a, off);
    self->len = (Py_ssize_t)len;
    self->held = exec__in_worker_flag ? held_add(blk) : -1;
    self->generation = exec__fork_generation;
    /* An array over it may be written: in a worker it is a task's input, protected so that the
     * task's writes stay its own; in the master, protected while tasks read the block. */
    guard_view(blk);
    if (exec__in_worker_flag)
        guard_lend(blk);
    return (PyObject *)self;
}

void
exec__bufs_release(arena *a, const wire_buf *bufs, uint32_t n)
{
    for (uint32_t i = 0; a && i < n; i++)
        arena_decref(a, bufs[i].blk);
}

/* ---- blobs ------------------------------------------------------------------------------------ */

static exec_blob *blob_alloc(size_t len, uint32_t nbufs, int inline_data);

void
exec_blob_incref(exec_blob *b)
{
    atomic_fetch_add_explicit(&b->refcnt, 1, memory_order_relaxed);
}

void
exec_blob_lend(exec_blob *b)
{
    if (b == NULL || b->arena == NULL || b->generation != exec__fork_generation)
        return;
    atomic_fetch_add(&b->lends, 1);
    for (uint32_t i = 0; i < b->nbufs; i++)
        guard_lend(b->bufs[i].blk);
}

void
exec_blob_unlend(exec_blob *b)
{
    if (b == NULL || b->arena == NULL || b->generation != exec__fork_generation)
        return;
    atomic_fetch_sub(&b->lends, 1);
    for (uint32_t i = 0; i < b->nbufs; i++)
        guard_unlend(b->bufs[i].blk);
}

int
exec_blob_is_stale(exec_blob *b)
{
    if (b == NULL || b->arena == NULL || b->generation != exec__fork_generation)
        return 0;
    for (uint32_t i = 0; i < b->nbufs; i++)
        if (guard_is_private(arena_ptr(b->arena, b->bufs[i].off)))
            return 1;
    return 0;
}

exec_blob *
exec_blob_remote(PyObject *ref)
{
    exec_blob *b = blob_alloc(0, 0, 1);
    if (b == NULL) {
        Py_DECREF(ref);
        PyErr_NoMemory();
        return NULL;
    }
    b->remote = ref;
    return b;
}

PyObject *
exec_blob_remote_ref(exec_blob *b)
{
    return b->remote;
}

PyObject *
exec_blob_export(exec_blob *b)
{
    if (b->remote) {
        PyErr_SetString(PyExc_TypeError, "pydron: a remote result has no bytes here");
        return NULL;
    }
    PyObject *data = PyBytes_FromStringAndSize(b->data, (Py_ssize_t)b->len);
    PyObject *bufs = data ? exec__blob_buffers(b) : NULL;
    if (bufs == NULL) {
        Py_XDECREF(data);
        return NULL;
    }
    return Py_BuildValue("(NN)", data, bufs);
}

void
exec_blob_decref(exec_blob *b)
{
    if (b == NULL || atomic_fetch_sub_explicit(&b->refcnt, 1, memory_order_acq_rel) != 1)
        return;
    if (b->remote) {
        /* Remote blobs are made and dropped by graph, with the GIL. */
        Py_DECREF(b->remote);
        PyMem_RawFree(b);
        return;
    }
    while (atomic_load(&b->lends) > 0)
        exec_blob_unlend(b);
    if (b->arena && b->generation == exec__fork_generation) {
        exec__bufs_release(b->arena, b->bufs, b->nbufs);
        if (b->data_blk != WIRE_NO_BLOCK)
            arena_decref(b->arena, b->data_blk);
        atomic_fetch_sub(&exec__live_arena_refs, 1);
    }
    PyMem_RawFree(b);
}

size_t
exec_blob_size(const exec_blob *b)
{
    size_t n = b->len;
    for (uint32_t i = 0; i < b->nbufs; i++)
        n += b->bufs[i].len;
    return n;
}

/* A blob with room for nbufs buffers and, inline, len bytes (refcount 1, no arena yet).
 * A new blob (refcount 1, owning nothing yet), or NULL without an exception. */
static exec_blob *
blob_alloc(size_t len, uint32_t nbufs, int inline_data)
{
    exec_blob *b = PyMem_RawMalloc(sizeof(exec_blob) + nbufs * sizeof(wire_buf) +
                                   (inline_data ? len : 0));
    if (b == NULL)
        return NULL;
    atomic_init(&b->refcnt, 1);
    atomic_init(&b->lends, 0);
    b->remote = NULL;
    b->generation = exec__fork_generation;
    b->arena = NULL;
    b->len = len;
    b->nbufs = nbufs;
    b->data_blk = WIRE_NO_BLOCK;
    b->data = inline_data ? (char *)(b->bufs + nbufs) : NULL;
    return b;
}

/* The blob takes over the arena references its buffers and data name. */
static void
blob_adopt_arena(exec_blob *b)
{
    if (b->nbufs || b->data_blk != WIRE_NO_BLOCK) {
        b->arena = exec__arena;
        atomic_fetch_add(&exec__live_arena_refs, 1);
    }
}

exec_blob *
exec__blob_new(const char *data, size_t len, const wire_buf *bufs, uint32_t nbufs)
{
    arena *a = exec__arena;
    int in_arena = a != NULL && len > EXEC_INLINE_MAX;
    exec_blob *b = blob_alloc(len, nbufs, !in_arena);
    if (b == NULL) {
        exec__bufs_release(a, bufs, nbufs);
        PyErr_NoMemory();
        return NULL;
    }
    if (nbufs)
        memcpy(b->bufs, bufs, nbufs * sizeof(wire_buf));
    if (in_arena) {
        if (arena_alloc(a, len, &b->data_blk) < 0) {
            exec__bufs_release(a, bufs, nbufs);
            PyMem_RawFree(b);
            PyErr_Format(PyExc_MemoryError, "pydron: shared arena full (%zu bytes requested)", len);
            return NULL;
        }
        b->data = arena_ptr(a, b->data_blk);
    }
    memcpy((char *)b->data, data, len);
    blob_adopt_arena(b);
    return b;
}

exec_blob *
exec__blob_from_view(const wire_blob_view *v)
{
    int inline_data = v->data_blk == WIRE_NO_BLOCK;
    exec_blob *b = blob_alloc(v->len, v->nbufs, inline_data);
    if (b == NULL) {
        wire_release_blob(exec__arena, v);
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(b->bufs, v->bufs, v->nbufs * sizeof(wire_buf));
    if (inline_data) {
        memcpy((char *)b->data, v->data, v->len);
    }
    else {
        b->data_blk = v->data_blk;
        b->data = v->data;
    }
    blob_adopt_arena(b);
    return b;
}

size_t
exec__blob_wire_size(const exec_blob *b)
{
    return (size_t)wire_blob_size(b->len, b->nbufs, b->data_blk == WIRE_NO_BLOCK);
}

size_t
exec__blob_wire_write(void *dst, const exec_blob *b)
{
    uint64_t off = b->data_blk == WIRE_NO_BLOCK ? 0 : (uint64_t)(b->data - (char *)b->arena);
    return wire_write_blob(dst, b->data, b->len, b->data_blk, off, b->bufs, b->nbufs);
}

int
exec__blob_spill(exec_blob *b)
{
    arena *a = exec__arena;
    uint64_t blk;
    if (b->data_blk != WIRE_NO_BLOCK)
        return 0;
    if (a == NULL || arena_alloc(a, b->len, &blk) < 0) {
        PyErr_Format(PyExc_MemoryError, "pydron: shared arena full (%zu bytes requested)", b->len);
        return -1;
    }
    memcpy(arena_ptr(a, blk), b->data, b->len);
    if (b->arena == NULL)
        atomic_fetch_add(&exec__live_arena_refs, 1);
    b->arena = a;
    b->data = arena_ptr(a, blk);
    b->data_blk = blk;
    return 0;
}

PyObject *
exec__blob_buffers(exec_blob *b)
{
    PyObject *t = PyTuple_New(b->nbufs);
    for (uint32_t i = 0; t && i < b->nbufs; i++) {
        PyObject *h = exec__arena_buffer_new(b->arena, b->bufs[i].blk, b->bufs[i].off,
                                             b->bufs[i].len);
        if (h == NULL) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, h);
    }
    return t;
}

int
exec__blob_module_init(PyObject *module)
{
    if (PyType_Ready(&ArenaBuffer_Type) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "ArenaBuffer", (PyObject *)&ArenaBuffer_Type);
}
