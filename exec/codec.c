/* exec/codec.c — pickling values across processes: pickle protocol 5 with out-of-band buffers
 * placed in the shared arena (so arrays cross without a copy through a pipe), persistent ids
 * for the results of other tasks, cloudpickle for what plain pickle refuses, and decoding back.
 * Also the calls into pydron/_exec_helpers.py for the cold paths (error messages).
 * Thread and GIL model: GIL held throughout; one codec per process is reused, and a codec
 * re-entered (a __reduce__ that submits) hands the nested dump to a temporary one. */
#include "exec/internal.h"

#include <string.h>

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

static PyObject *helpers;          /* the module pydron._exec_helpers */
static PyObject *pickle_loads, *pickle_dumps, *io_BytesIO;
static PyObject *str_buffers, *str_load, *kw_buffers;
static exec_codec *master_codec;

/* What the codec's reducer_override decided for classes, functions and methods that need no
 * fresh look each time: obj -> None (pickle it by name) or a reduction (a module attribute).
 * Emptied when a fork server is forked (what the workers have changes then). */
static PyObject *ship_cache;
/* pydron._ship.streams_seen: classes of open files met while pickling (new reference). */
static PyObject *streams_seen;
/* numpy.ndarray once numpy is imported (new reference), to let contiguous writable arrays take
 * numpy's own reduction without a call into Python. */
static PyObject *ndarray_type;
static PyObject *memmap_type;      /* numpy.memmap, found with ndarray */

/* The head of numpy's PyArrayObject, stable across NumPy 1.x and 2.x (the C-API's
 * PyArrayObject_fields); only the flags are read. */
typedef struct {
    PyObject_HEAD
    char *data;
    int nd;
    Py_ssize_t *dimensions, *strides;
    PyObject *base, *descr;
    int flags;
} np_array_head;
#define NP_C_CONTIGUOUS 0x1
#define NP_F_CONTIGUOUS 0x2
#define NP_WRITEABLE 0x400

/* ---- helpers in Python ------------------------------------------------------------------------ */

/* Borrowed reference to helper `name`, NULL + exception. */
static PyObject *
helper(const char *name)
{
    if (helpers == NULL && (helpers = PyImport_ImportModule("pydron._exec_helpers")) == NULL)
        return NULL;
    PyObject *f = PyObject_GetAttrString(helpers, name);
    Py_XDECREF(f);          /* the module keeps it */
    return f;
}

PyObject *
exec__call_helper(const char *name, PyObject *const *args, size_t nargs)
{
    PyObject *f = helper(name);
    return f ? PyObject_Vectorcall(f, args, nargs, NULL) : NULL;
}

int
exec__raise_from_helper(const char *name, PyObject *const *args, size_t nargs)
{
    PyObject *exc = exec__call_helper(name, args, nargs);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return -1;
}

/* ---- the codec object ------------------------------------------------------------------------- */

struct exec_codec {
    PyObject_HEAD
    /* Picklers writing into this codec (Pickler(self, 5, buffer_callback=...)), reused: [0] plain,
     * [1] with persistent ids; [2], [3] the same with cloudpickle's CloudPickler, for what plain
     * pickle refuses (local functions, lambdas, closures in arguments and results). */
    PyObject *pickler[4], *dump[4], *clear[4];
    exec_dep_fn dep;
    void *dep_ctx;
    char *out;
    size_t out_len, out_cap;
    wire_buf *bufs;
    int64_t *held;                           /* in a worker: held-table entries of bufs[i] */
    uint32_t nbufs, bufs_cap;
    int busy;
};

/* Pickler.write: append to the output buffer. Borrows data; returns a new int. */
static PyObject *
codec_write(exec_codec *c, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t need = c->out_len + (size_t)view.len;
    if (need > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 256;
        while (cap < need)
            cap *= 2;
        char *p = PyMem_RawRealloc(c->out, cap);
        if (p == NULL) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        c->out = p;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, view.buf, (size_t)view.len);
    c->out_len = need;
    Py_ssize_t n = view.len;
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(n);
}

/* Pickler.persistent_id: the index of a dependency, or None to pickle obj itself.
 * Borrows obj; returns a new reference (an int or None). */
static PyObject *
codec_persistent_id(exec_codec *c, PyObject *obj)
{
    if (c->dep == NULL)
        Py_RETURN_NONE;
    Py_ssize_t i = c->dep(c->dep_ctx, obj);
    if (i == -2)
        return NULL;
    if (i < 0)
        Py_RETURN_NONE;
    return PyLong_FromSsize_t(i);
}

/* ---- large buffers copied into the arena once per call -----------------------------------------
 * A buffer outside the arena (an array made before enable(), read from a file, a bytes object)
 * is copied into the arena for each task that takes it: forty tasks taking the same two 34 MB
 * frames copied 2.7 GB. While tasks are outstanding, the master remembers the blocks it copied
 * large buffers into, by address, length and content hash: the same buffer with the same bytes
 * (what the task would see had it been copied at its call) is sent as a reference to the block
 * already made, at the cost of reading it once more to hash it, instead of a new block. Buffers
 * already in the arena need none of this (they are sent by reference, guard.c keeps them as they
 * were at the call). Master only; emptied when no task is outstanding and at shutdown. */
#define COPY_MEMO_MIN ((size_t)1 << 20)
#define COPY_MEMO_SLOTS 16

typedef struct {
    const void *src;            /* NULL: a free slot */
    size_t len;
    uint64_t blk;               /* one reference, the memo's */
    XXH128_hash_t hash;
    uint64_t used;              /* memo_clock at the last use, for eviction */
} copy_memo_entry;

static struct {
    copy_memo_entry e[COPY_MEMO_SLOTS];
    uint64_t clock;
    size_t bytes;
    uint64_t hits, copies, bytes_reused;
} memo;

static XXH128_hash_t
hash_bytes(const void *p, size_t len)
{
    XXH128_hash_t h;
    Py_BEGIN_ALLOW_THREADS
    h = XXH3_128bits(p, len);
    Py_END_ALLOW_THREADS
    return h;
}

static void
copy_memo_drop(copy_memo_entry *e, int release)
{
    if (e->src == NULL)
        return;
    if (release && exec__arena != NULL)
        arena_decref(exec__arena, e->blk);
    memo.bytes -= e->len;
    e->src = NULL;
}

void
exec__codec_memo_clear(int release)
{
    for (int i = 0; i < COPY_MEMO_SLOTS; i++)
        copy_memo_drop(&memo.e[i], release);
}

static int call_scopes;            /* top-level scheduled calls in progress, all threads */

void
exec_call_scope(int delta)
{
    call_scopes += delta;
    if (call_scopes <= 0) {
        call_scopes = 0;
        if (memo.bytes != 0)
            exec__codec_memo_clear(1);
    }
}

/* A block already holding the len bytes at src, with a new reference for the caller: 0 and
 * *blk, or -1 (none: copy them). */
static int
copy_memo_reuse(const void *src, size_t len, uint64_t *blk)
{
    for (int i = 0; i < COPY_MEMO_SLOTS; i++) {
        copy_memo_entry *e = &memo.e[i];
        if (e->src != src || e->len != len)
            continue;
        XXH128_hash_t h = hash_bytes(src, len);
        if (!XXH128_isEqual(h, e->hash)) {
            copy_memo_drop(e, 1);            /* written since: this call sees the new bytes */
            return -1;
        }
        arena_incref(exec__arena, e->blk);
        e->used = ++memo.clock;
        memo.hits++;
        memo.bytes_reused += len;
        *blk = e->blk;
        return 0;
    }
    return -1;
}

/* Remember that block blk now holds the len bytes at src (the memo takes its own reference).
 * The memo keeps at most a quarter of the arena: the least recently used entries go first. */
static void
copy_memo_store(const void *src, size_t len, uint64_t blk)
{
    size_t cap = exec__arena_size / 4;
    if (len > cap)
        return;
    copy_memo_entry *slot = NULL;
    for (;;) {
        copy_memo_entry *oldest = NULL;
        slot = NULL;
        for (int i = 0; i < COPY_MEMO_SLOTS; i++) {
            copy_memo_entry *e = &memo.e[i];
            if (e->src == NULL)
                slot = slot ? slot : e;
            else if (oldest == NULL || e->used < oldest->used)
                oldest = e;
        }
        if (slot != NULL && memo.bytes + len <= cap)
            break;
        if (oldest == NULL)
            return;
        copy_memo_drop(oldest, 1);
    }
    arena_incref(exec__arena, blk);
    slot->src = src;
    slot->len = len;
    slot->blk = blk;
    slot->hash = hash_bytes(src, len);       /* the bytes just copied into blk */
    slot->used = ++memo.clock;
    memo.bytes += len;
    memo.copies++;
}

/* Pickler buffer_callback: out-of-band buffers of EXEC_OOB_MIN bytes or more go to the arena, by
 * reference when they are already inside it (a result forwarded), else copied once. Smaller ones
 * stay in band (returns True), as does everything when the arena is full. */
static PyObject *
codec_buffer_callback(exec_codec *c, PyObject *pb)
{
    arena *a = exec__arena;
    if (a == NULL)
        Py_RETURN_TRUE;
    Py_buffer view;
    if (PyObject_GetBuffer(pb, &view, PyBUF_FULL_RO) < 0)
        return NULL;
    PyObject *in_band = Py_True;
    if ((size_t)view.len < EXEC_OOB_MIN || !PyBuffer_IsContiguous(&view, 'A'))
        goto done;
    if (c->nbufs == c->bufs_cap) {
        uint32_t cap = c->bufs_cap ? c->bufs_cap * 2 : 8;
        wire_buf *b = PyMem_RawRealloc(c->bufs, cap * sizeof(wire_buf));
        if (b != NULL)
            c->bufs = b;
        int64_t *h = b ? PyMem_RawRealloc(c->held, cap * sizeof(int64_t)) : NULL;
        if (h == NULL) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        c->held = h;
        c->bufs_cap = cap;
    }
    wire_buf *b = &c->bufs[c->nbufs];
    size_t blen;
    uint64_t blk;
    /* Already shared (a result forwarded, an array allocated in the arena): a reference; but not
     * when this process holds a private copy of the block (its bytes are not the shared ones). */
    if (arena_block_of(a, view.buf, &blk, &blen) == 0 &&
        (char *)view.buf + view.len <= (char *)arena_ptr(a, blk) + blen &&
        !guard_is_private(view.buf)) {
        arena_incref(a, blk);                  /* already shared: send a reference */
        b->blk = blk;
        b->off = (uint64_t)((char *)view.buf - (char *)a);
    }
    else {
        /* The copy sits at the source's address modulo EXEC_BUF_ALIGN (blocks are page
         * aligned): the receiver's SIMD loops peel the same elements, reductions give the same
         * last bits. */
        size_t shift = (uintptr_t)view.buf % EXEC_BUF_ALIGN;
        int memoised = !exec__in_worker_flag && (size_t)view.len >= COPY_MEMO_MIN;
        if (!memoised || copy_memo_reuse(view.buf, (size_t)view.len, &b->blk) < 0) {
            if (arena_alloc(a, (size_t)view.len + shift, &b->blk) < 0)
                goto done;                     /* arena full: in band, slower but correct */
            Py_BEGIN_ALLOW_THREADS
            memcpy((char *)arena_ptr(a, b->blk) + shift, view.buf, (size_t)view.len);
            Py_END_ALLOW_THREADS
            if (memoised)
                copy_memo_store(view.buf, (size_t)view.len, b->blk);
        }
        b->off = b->blk + shift;
    }
    b->len = (uint64_t)view.len;
    /* A worker that dies before the result is published must not leak this reference. */
    c->held[c->nbufs] = exec__in_worker_flag ? held_add(b->blk) : -1;
    c->nbufs++;
    in_band = Py_False;
done:
    PyBuffer_Release(&view);
    return Py_NewRef(in_band);
}

/* numpy.ndarray, or NULL while numpy is not imported (borrowed; never an error). */
static PyObject *
find_ndarray(void)
{
    if (ndarray_type != NULL)
        return ndarray_type;
    PyObject *np = PyDict_GetItemString(PyImport_GetModuleDict(), "numpy");   /* borrowed */
    if (np == NULL)
        return NULL;
    PyObject *t = PyObject_GetAttrString(np, "ndarray");
    if (t == NULL || !PyType_Check(t)) {     /* numpy half-imported: look again later */
        PyErr_Clear();
        Py_XDECREF(t);
        return NULL;
    }
    PyObject *mm = PyObject_GetAttrString(np, "memmap");
    if (mm == NULL || !PyType_Check(mm)) {
        PyErr_Clear();
        Py_XDECREF(mm);
        Py_DECREF(t);
        return NULL;
    }
    memmap_type = mm;
    ndarray_type = t;
    return t;
}

/* Pickler.reducer_override (the C pickler calls it for every object that is not an int, str,
 * bytes, float, None, bool or exact container): classes and functions travel by name when the
 * workers can import them as they are, else by value (pydron/_ship.py); bound methods of
 * module-level objects by reference; arrays with their layout; read-only memmaps as their file.
 * Everything else: NotImplemented, pickle's own way, decided here in C without a call into
 * Python.
 * Borrows obj; returns a new reference (a reduction or NotImplemented), NULL + exception. */
static PyObject *
codec_reducer_override(exec_codec *c, PyObject *obj)
{
    PyTypeObject *t = Py_TYPE(obj);
    const char *name;
    if (PyType_Check(obj)) {
        name = "reduce_class";
    }
    else if (t == &PyFunction_Type) {
        name = "reduce_function";
    }
    else if (PyCFunction_Check(obj)) {
        PyObject *self = PyCFunction_GET_SELF(obj);
        if (self == NULL || PyModule_Check(self))    /* a module's function: by name */
            Py_RETURN_NOTIMPLEMENTED;
        name = "reduce_method";
    }
    else if (t == &PyMethod_Type) {
        name = "reduce_method";
    }
    else {
        PyObject *nd = find_ndarray();
        if (nd == NULL)
            Py_RETURN_NOTIMPLEMENTED;
        if ((PyObject *)t != nd) {
            /* A read-only memmap crosses as its file: this codec serves this machine's
             * workers only (the cluster pickles its own way: other machines lack the file). */
            if (PyObject_TypeCheck(obj, (PyTypeObject *)memmap_type))
                return exec__call_helper("reduce_memmap", &obj, 1);
            Py_RETURN_NOTIMPLEMENTED;
        }
        int flags = ((np_array_head *)obj)->flags;
        if ((flags & NP_WRITEABLE) && (flags & (NP_C_CONTIGUOUS | NP_F_CONTIGUOUS)))
            Py_RETURN_NOTIMPLEMENTED;               /* numpy's own reduction keeps it as it is */
        return exec__call_helper("reduce_array", &obj, 1);
    }
    if (ship_cache == NULL && (ship_cache = PyDict_New()) == NULL)
        return NULL;
    PyObject *known = PyDict_GetItemWithError(ship_cache, obj);      /* borrowed */
    if (known != NULL)
        return known == Py_None ? Py_NewRef(Py_NotImplemented) : Py_NewRef(known);
    int hashable = !PyErr_Occurred();
    PyErr_Clear();
    PyObject *r = exec__call_helper(name, &obj, 1);
    if (r == NULL)
        return NULL;
    if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 2) {
        Py_DECREF(r);
        PyErr_Format(PyExc_RuntimeError, "pydron: %s returned a malformed answer", name);
        return NULL;
    }
    PyObject *reduction = PyTuple_GET_ITEM(r, 0);
    if (hashable && PyObject_IsTrue(PyTuple_GET_ITEM(r, 1)) == 1 &&
        PyDict_SetItem(ship_cache, obj, reduction) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    PyObject *out = reduction == Py_None ? Py_NotImplemented : reduction;
    Py_INCREF(out);
    Py_DECREF(r);
    return out;
}

static PyMethodDef codec_methods[] = {
    {"write", (PyCFunction)codec_write, METH_O, NULL},
    {"persistent_id", (PyCFunction)codec_persistent_id, METH_O, NULL},
    {"buffer_callback", (PyCFunction)codec_buffer_callback, METH_O, NULL},
    {"reducer_override", (PyCFunction)codec_reducer_override, METH_O, NULL},
    {NULL},
};

static void
codec_dealloc(exec_codec *c)
{
    for (int i = 0; i < 4; i++) {
        Py_XDECREF(c->pickler[i]);
        Py_XDECREF(c->dump[i]);
        Py_XDECREF(c->clear[i]);
    }
    PyMem_RawFree(c->out);
    PyMem_RawFree(c->bufs);
    PyMem_RawFree(c->held);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyTypeObject Codec_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pydron._core._ExecCodec",
    .tp_basicsize = sizeof(exec_codec),
    .tp_dealloc = (destructor)codec_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = codec_methods,
};

/* Build reusable pickler `which` (see exec_codec) writing into c. It makes a reference cycle
 * through the bound methods: codecs live as long as the process, except temporary ones, which
 * codec_discard breaks. 0, or -1 + exception. */
static int
codec_make_pickler(exec_codec *c, int which)
{
    int rc = -1;
    PyObject *cls = NULL, *cb = NULL, *kw = NULL, *args = NULL, *p = NULL;
    /* [0], [1]: the C pickler, as a subclass that can carry a reducer_override; [2], [3]:
     * cloudpickle's, with pydron's rules (pydron/_ship.py). */
    cls = exec__call_helper(which >= 2 ? "ship_pickler_class" : "fast_pickler_class", NULL, 0);
    if (cls == NULL)
        return -1;
    cb = PyObject_GetAttrString((PyObject *)c, "buffer_callback");
    kw = cb ? Py_BuildValue("{s:i,s:O}", "protocol", 5, "buffer_callback", cb) : NULL;
    args = PyTuple_Pack(1, (PyObject *)c);
    p = (kw && args) ? PyObject_Call(cls, args, kw) : NULL;
    if (p == NULL)
        goto done;
    if (which < 2) {
        /* Reducers of our own (memoryview, ...); cloudpickle's pickler keeps its own table. */
        PyObject *table = exec__call_helper("dispatch_table", NULL, 0);
        int err = table == NULL || PyObject_SetAttrString(p, "dispatch_table", table) < 0;
        Py_XDECREF(table);
        PyObject *ro = err ? NULL : PyObject_GetAttrString((PyObject *)c, "reducer_override");
        err = ro == NULL || PyObject_SetAttrString(p, "reducer_override", ro) < 0;
        Py_XDECREF(ro);
        if (err)
            goto done;
    }
    if (which & 1) {
        PyObject *pid = PyObject_GetAttrString((PyObject *)c, "persistent_id");
        int err = pid == NULL || PyObject_SetAttrString(p, "persistent_id", pid) < 0;
        Py_XDECREF(pid);
        if (err)
            goto done;
    }
    c->dump[which] = PyObject_GetAttrString(p, "dump");
    c->clear[which] = PyObject_GetAttrString(p, "clear_memo");
    if (c->dump[which] == NULL || c->clear[which] == NULL) {
        Py_CLEAR(c->dump[which]);
        Py_CLEAR(c->clear[which]);
        goto done;
    }
    c->pickler[which] = Py_NewRef(p);
    rc = 0;
done:
    Py_XDECREF(cls);
    Py_XDECREF(cb);
    Py_XDECREF(kw);
    Py_XDECREF(args);
    Py_XDECREF(p);
    return rc;
}

exec_codec *
exec__codec_new(void)
{
    exec_codec *c = PyObject_New(exec_codec, &Codec_Type);
    if (c == NULL)
        return NULL;
    memset((char *)c + sizeof(PyObject), 0, sizeof(*c) - sizeof(PyObject));
    return c;
}

/* Break the codec's cycles and drop it (for temporary codecs). Steals c. */
static void
codec_discard(exec_codec *c)
{
    for (int i = 0; i < 4; i++) {
        Py_CLEAR(c->dump[i]);
        Py_CLEAR(c->clear[i]);
        Py_CLEAR(c->pickler[i]);
    }
    Py_DECREF(c);
}

void
exec__codec_forget_held(exec_codec *c)
{
    for (uint32_t i = 0; i < c->nbufs; i++) {
        if (c->held[i] >= 0)
            held_forget(c->held[i]);
        c->held[i] = -1;
    }
}

void
exec__codec_reset(exec_codec *c)
{
    exec__codec_forget_held(c);
    c->out_len = 0;
    c->nbufs = 0;
}

/* One attempt with pickler `which`; 0, or -1 + exception (nothing kept).
 * Borrows obj; the output stays the codec's. */
static int
codec_dump_with(exec_codec *c, int which, PyObject *obj, exec_dep_fn dep, void *ctx)
{
    if (c->dump[which] == NULL && codec_make_pickler(c, which) < 0)
        return -1;
    if (streams_seen != NULL && PyList_GET_SIZE(streams_seen) > 0 &&
        PyList_SetSlice(streams_seen, 0, PyList_GET_SIZE(streams_seen), NULL) < 0)
        return -1;
    c->busy = 1;
    exec__codec_reset(c);
    c->dep = dep;
    c->dep_ctx = ctx;
    PyObject *r = PyObject_CallOneArg(c->dump[which], obj);
    /* The memo holds references to everything pickled: clear it at once, failure or not. */
    PyObject *err = r == NULL ? PyErr_GetRaisedException() : NULL;
    PyObject *cr = PyObject_CallNoArgs(c->clear[which]);
    c->dep = NULL;
    c->busy = 0;
    if (cr == NULL) {
        Py_CLEAR(r);
        if (err)
            PyErr_Clear();
    }
    Py_XDECREF(cr);
    if (err)
        PyErr_SetRaisedException(err);
    if (r == NULL) {
        exec__codec_forget_held(c);
        exec__bufs_release(exec__arena, c->bufs, c->nbufs);
        exec__codec_reset(c);
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

int
exec__codec_dump(exec_codec *c, PyObject *obj, exec_dep_fn dep, void *ctx, const char **data,
                 size_t *len, wire_buf **bufs, uint32_t *nbufs)
{
    int which = dep ? 1 : 0;
    if (codec_dump_with(c, which, obj, dep, ctx) < 0) {
        /* Plain pickle refuses local functions and lambdas: cloudpickle sends them by value.
         * Ctrl-C (or SystemExit) while pickling is not a pickling problem: let it through. */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyObject *first = PyErr_GetRaisedException();
        int rc = codec_dump_with(c, which + 2, obj, dep, ctx);
        if (rc < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
            /* Both failed: the error that says more (a class of the script that could not be
             * sent by value says which and why) is the one to report. */
            PyObject *second = PyErr_GetRaisedException();
            PyObject *a[2] = {first, second};
            PyObject *chosen = exec__call_helper("better_error", a, 2);
            PyErr_SetRaisedException(chosen ? chosen : Py_NewRef(second));
            Py_DECREF(second);
        }
        Py_DECREF(first);
        if (rc < 0)
            return -1;
    }
    *data = c->out;
    *len = c->out_len;
    *bufs = c->bufs;
    *nbufs = c->nbufs;
    return 0;
}

/* The process's codec (borrowed), or, re-entered from a __reduce__, a temporary one (new, to be
 * passed to codec_release): *temporary says which. NULL + exception. */
static exec_codec *
codec_acquire(int *temporary)
{
    *temporary = 0;
    if (master_codec == NULL && (master_codec = exec__codec_new()) == NULL)
        return NULL;
    if (!master_codec->busy)
        return master_codec;
    *temporary = 1;
    return exec__codec_new();
}

static void
codec_release(exec_codec *c, int temporary)
{
    if (temporary)
        codec_discard(c);
}

/* ---- decoding --------------------------------------------------------------------------------- */

/* Unpickle len bytes at data with the given arena buffers (wrapped in ArenaBuffer objects that
 * take their own references) and persistent ids resolved in deps. New reference, NULL + exc. */
static PyObject *
decode_bytes(const char *data, size_t len, const wire_buf *bufs, uint32_t nbufs, PyObject *deps)
{
    PyObject *result = NULL, *holders = NULL, *unpickler = NULL, *file = NULL;
    if (nbufs == 0 && deps == NULL && len <= 4096) {
        PyObject *scalar = exec__scalars_load(data, len);
        if (scalar != NULL)
            return scalar;
        /* Small and self-contained (most results): a bytes copy is cheaper than a view. */
        PyObject *bytes = PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
        if (bytes == NULL)
            return NULL;
        result = PyObject_CallOneArg(pickle_loads, bytes);
        Py_DECREF(bytes);
        return result;
    }
    PyObject *mv = PyMemoryView_FromMemory((char *)data, (Py_ssize_t)len, PyBUF_READ);
    if (mv == NULL)
        return NULL;
    if (nbufs) {
        holders = PyTuple_New(nbufs);
        if (holders == NULL)
            goto done;
        for (uint32_t i = 0; i < nbufs; i++) {
            PyObject *h = exec__arena_buffer_new(exec__arena, bufs[i].blk, bufs[i].off,
                                                 bufs[i].len);
            if (h == NULL)
                goto done;
            PyTuple_SET_ITEM(holders, i, h);
        }
    }
    if (deps == NULL) {
        PyObject *args[2] = {mv, holders};
        result = PyObject_Vectorcall(pickle_loads, args, 1, holders ? kw_buffers : NULL);
        goto done;
    }
    file = PyObject_CallOneArg(io_BytesIO, mv);
    PyObject *cls = file ? helper("DepUnpickler") : NULL;
    if (cls == NULL)
        goto done;
    {
        PyObject *args[3] = {file, deps, holders};
        unpickler = PyObject_Vectorcall(cls, args, 2, holders ? kw_buffers : NULL);
    }
    if (unpickler != NULL)
        result = PyObject_CallMethodNoArgs(unpickler, str_load);
done:
    Py_XDECREF(unpickler);
    Py_XDECREF(file);
    Py_XDECREF(holders);
    /* Nothing may keep a view of the ring or the blob past this point. */
    PyObject *err = result == NULL ? PyErr_GetRaisedException() : NULL;
    PyObject *r = PyObject_CallMethod(mv, "release", NULL);
    if (r == NULL)
        Py_CLEAR(result);
    if (err)
        PyErr_SetRaisedException(err);       /* the decoding error is the one to report */
    Py_XDECREF(r);
    Py_DECREF(mv);
    return result;
}

PyObject *
exec__decode_view(const wire_blob_view *v, PyObject *deps)
{
    return decode_bytes(v->data, v->len, v->bufs, v->nbufs, deps);
}

PyObject *
exec_blob_decode(exec_blob *b)
{
    if (b->remote)
        return exec__remote_fetch(b->remote);
    return decode_bytes(b->data, b->len, b->bufs, b->nbufs, NULL);
}

void
exec_explain_undecodable(PyObject *fn)
{
    PyObject *err = PyErr_GetRaisedException();
    PyObject *args[2] = {fn, err};
    exec__raise_from_helper("undecodable_result", args, 2);
    if (!PyErr_Occurred())
        PyErr_SetRaisedException(err);
    else
        Py_DECREF(err);
}

/* The exception a worker pickled (pickle_exception), rebuilt: see exec_exception_from_bytes. */
static PyObject *
rebuild_exception(PyObject *exc)
{
    if (exc != NULL && PyExceptionInstance_Check(exc)) {
        PyObject *fixed = exec__call_helper("restore_builtin_state", &exc, 1);
        if (fixed == NULL)
            PyErr_Clear();
        Py_XDECREF(fixed);
        return exc;
    }
    PyObject *err;
    if (exc != NULL) {
        Py_DECREF(exc);
        PyErr_SetString(PyExc_TypeError, "the worker sent back something that is not an exception");
    }
    err = PyErr_GetRaisedException();
    PyObject *r = err ? exec__call_helper("undecodable_error", &err, 1) : NULL;
    Py_XDECREF(err);
    if (r == NULL) {
        PyErr_Clear();
        r = PyObject_CallFunction(PyExc_RuntimeError, "s",
                                  "pydron: a task failed in a worker process");
        if (r == NULL) {
            /* Out of memory building the error: a bare RuntimeError instance still says it. */
            PyErr_Clear();
            r = Py_NewRef(PyExc_RuntimeError);
        }
    }
    return r;
}

PyObject *
exec__decode_error(exec_blob *b)
{
    return rebuild_exception(exec_blob_decode(b));
}

PyObject *
exec_exception_from_bytes(PyObject *data)
{
    PyObject *exc = PyBytes_Check(data) ? PyObject_CallOneArg(pickle_loads, data) : NULL;
    if (exc == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "the worker sent back something that is not bytes");
    return rebuild_exception(exc);
}

PyObject *
exec__pickle_exception(PyObject *exc, PyObject *fn)
{
    PyObject *args[2] = {exc, fn ? fn : Py_None};
    PyObject *data = exec__call_helper("pickle_exception", args, 2);
    if (data != NULL && PyBytes_Check(data))
        return data;
    Py_XDECREF(data);
    PyErr_Clear();
    /* Last resort (the helper itself failed): a plain RuntimeError naming the type. */
    PyObject *err = PyObject_CallFunction(PyExc_RuntimeError, "s",
                                          "pydron: a task raised an exception that could not be "
                                          "pickled back from its worker");
    if (err == NULL)
        return NULL;
    data = PyObject_CallOneArg(pickle_dumps, err);
    Py_DECREF(err);
    return data;
}

/* ---- encoding calls --------------------------------------------------------------------------- */

/* Find which argument cannot be pickled and say so; called with the pickling error set.
 * Always returns NULL with a TypeError set.
 * Borrows everything it is given. */
static exec_blob *
explain_encode_failure(exec_codec *c, PyObject *fn, PyObject *args, PyObject *kwargs,
                       exec_dep_fn dep, void *ctx)
{
    PyObject *err = PyErr_GetRaisedException();
    PyObject *where = NULL, *culprit = NULL;
    const char *d;
    size_t l;
    wire_buf *bb;
    uint32_t nb;
    Py_ssize_t n = args ? PyTuple_GET_SIZE(args) : 0;
    for (Py_ssize_t i = 0; i < n && where == NULL; i++) {
        PyObject *a = PyTuple_GET_ITEM(args, i);
        if (exec__codec_dump(c, a, dep, ctx, &d, &l, &bb, &nb) < 0) {
            Py_SETREF(err, PyErr_GetRaisedException());
            where = PyLong_FromSsize_t(i);
            culprit = a;
            if (where == NULL)
                goto done;
        }
        else {
            exec__bufs_release(exec__arena, bb, nb);
        }
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (where == NULL && kwargs && PyDict_Next(kwargs, &pos, &k, &v)) {
        if (exec__codec_dump(c, v, dep, ctx, &d, &l, &bb, &nb) < 0) {
            Py_SETREF(err, PyErr_GetRaisedException());
            where = PyUnicode_FromFormat("argument %R", k);
            culprit = v;
            if (where == NULL)
                goto done;
        }
        else {
            exec__bufs_release(exec__arena, bb, nb);
        }
    }
    exec__codec_reset(c);
    if (where == NULL) {
        where = PyUnicode_FromString("the arguments");
        culprit = args;
        if (where == NULL)
            goto done;
    }
    if (err == NULL)
        err = Py_NewRef(Py_None);
    PyObject *hargs[4] = {fn, where, culprit, err};
    exec__raise_from_helper("bad_argument", hargs, 4);
done:
    Py_XDECREF(where);
    Py_XDECREF(err);
    return NULL;
}

exec_blob *
exec_encode_call(PyObject *fn, PyObject *args, PyObject *kwargs, exec_dep_fn dep, void *ctx)
{
    if (kwargs == NULL || PyDict_GET_SIZE(kwargs) == 0) {
        /* Most calls pass a few numbers or names: written in C, no pickler involved. */
        const char *data;
        size_t len;
        int fast = exec__scalars_dump_call(args, &data, &len);
        if (fast < 0)
            return NULL;
        if (fast)
            return exec__blob_new(data, len, NULL, 0);
    }
    /* Outside any scheduled call, a new batch of calls (nothing outstanding): what the previous
     * one copied is not kept for it. Inside one, the memo lives until the call ends. */
    if (memo.bytes != 0 && call_scopes == 0 && exec_outstanding() == 0)
        exec__codec_memo_clear(1);
    int temporary;
    exec_codec *c = codec_acquire(&temporary);
    if (c == NULL)
        return NULL;
    exec_blob *b = NULL;
    PyObject *call = PyTuple_Pack(2, args, kwargs && PyDict_GET_SIZE(kwargs) ? kwargs : Py_None);
    const char *data;
    size_t len;
    wire_buf *bufs;
    uint32_t nbufs;
    if (call == NULL)
        goto done;
    if (exec__codec_dump(c, call, dep, ctx, &data, &len, &bufs, &nbufs) < 0) {
        if (PyErr_ExceptionMatches(PyExc_Exception))
            b = explain_encode_failure(c, fn, args, kwargs, dep, ctx);
    }
    else {
        if (streams_seen != NULL && PyList_GET_SIZE(streams_seen) > 0) {
            /* An open file among the arguments: say once per function that it is a copy. */
            PyObject *r = exec__call_helper("note_streams", &fn, 1);
            if (r == NULL) {
                exec__bufs_release(exec__arena, bufs, nbufs);
                exec__codec_reset(c);
                goto done;
            }
            Py_DECREF(r);
        }
        b = exec__blob_new(data, len, bufs, nbufs);
        /* Its task reads these buffers from now on, however long it waits to run. */
        if (b != NULL && !exec__in_worker_flag)
            exec_blob_lend(b);
    }
done:
    Py_XDECREF(call);
    codec_release(c, temporary);
    return b;
}

exec_blob *
exec_encode_value(PyObject *value)
{
    int temporary;
    exec_codec *c = codec_acquire(&temporary);
    if (c == NULL)
        return NULL;
    const char *data;
    size_t len;
    wire_buf *bufs;
    uint32_t nbufs;
    exec_blob *b = NULL;
    if (exec__codec_dump(c, value, NULL, NULL, &data, &len, &bufs, &nbufs) == 0)
        b = exec__blob_new(data, len, bufs, nbufs);
    codec_release(c, temporary);
    return b;
}

/* _exec_copy_memo() -> counters of the copy memo, for tests and measurements. */
static PyObject *
core_copy_memo(PyObject *m, PyObject *unused)
{
    int live = 0;
    for (int i = 0; i < COPY_MEMO_SLOTS; i++)
        live += memo.e[i].src != NULL;
    return Py_BuildValue("{s:K,s:K,s:K,s:n,s:i}", "hits", (unsigned long long)memo.hits,
                         "copies", (unsigned long long)memo.copies,
                         "bytes_reused", (unsigned long long)memo.bytes_reused,
                         "bytes", (Py_ssize_t)memo.bytes, "entries", live);
}

static PyMethodDef codec_functions[] = {
    {"_exec_copy_memo", core_copy_memo, METH_NOARGS,
     "Counters of the arena copies of large buffers reused within a call."},
    {NULL},
};

int
exec__codec_module_init(PyObject *module)
{
    if (PyType_Ready(&Codec_Type) < 0 || PyModule_AddFunctions(module, codec_functions) < 0)
        return -1;
    PyObject *pk = PyImport_ImportModule("_pickle");
    PyObject *io = PyImport_ImportModule("io");
    if (pk == NULL || io == NULL) {
        Py_XDECREF(pk);
        Py_XDECREF(io);
        return -1;
    }
    pickle_loads = PyObject_GetAttrString(pk, "loads");
    pickle_dumps = PyObject_GetAttrString(pk, "dumps");
    io_BytesIO = PyObject_GetAttrString(io, "BytesIO");
    Py_DECREF(pk);
    Py_DECREF(io);
    str_buffers = PyUnicode_InternFromString("buffers");
    str_load = PyUnicode_InternFromString("load");
    kw_buffers = str_buffers ? PyTuple_Pack(1, str_buffers) : NULL;
    if (!pickle_loads || !pickle_dumps || !io_BytesIO || !kw_buffers ||
        !str_load)
        return -1;
    return 0;
}

int
exec__helpers_before_fork(void)
{
    /* Left from an arena this process no longer owns (a child forked by user code). */
    exec__codec_memo_clear(0);
    /* What the new fork server's workers can import is decided afresh. */
    if (ship_cache != NULL)
        PyDict_Clear(ship_cache);
    if (streams_seen == NULL && (streams_seen = exec__call_helper("streams_seen", NULL, 0)) == NULL)
        return -1;
    PyObject *r = exec__call_helper("before_fork", NULL, 0);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

PyObject *
exec_chunk_runner(PyObject *fn)
{
    return exec__call_helper("chunk_runner", &fn, 1);
}
