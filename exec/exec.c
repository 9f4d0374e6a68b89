/* exec/exec.c — the master side of the process pool: encoding calls (pickle protocol 5, large
 * buffers out of band into the shared arena), shipping functions and tasks to workers through
 * shared-memory rings, collecting results, replacing dead workers. Also the codec and the
 * ArenaBuffer type shared with the worker loop (worker.c), and the private test helpers. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "exec/internal.h"
#include "pydron_compat.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

exec_shared *exec__shared;
arena *exec__arena;
int exec__in_worker_flag;
int exec__internal_fork;

/* Bumped in every child process at fork: arena references held by objects the child inherited
 * were counted once, for the parent's copies, so only objects made in this process (same
 * generation) drop theirs. */
static unsigned fork_generation;

int exec_in_worker(void) { return exec__in_worker_flag; }

/* Until exec/threads.c provides them (and in pure process builds), the thread pool is empty. */
__attribute__((weak)) int exec__threads_drain(exec_result_fn f, void *c) { return 0; }
__attribute__((weak)) Py_ssize_t exec__threads_outstanding(void) { return 0; }
__attribute__((weak)) void exec__threads_shutdown(void) {}
__attribute__((weak)) void exec__threads_cancel_all(void) {}
__attribute__((weak)) int exec__threads_module_init(PyObject *m) { return 0; }

/* ArenaBuffer objects and blobs alive that hold arena references: the arena is unmapped at
 * shutdown only when none is left (an array may outlive the executor). */
static _Atomic Py_ssize_t live_arena_refs;

static PyObject *WorkerLostError;
static PyObject *helpers;          /* dict: the embedded Python helpers' namespace */
static PyObject *pickle_loads, *pickle_dumps, *pickle_Unpickler, *pickle_Pickler, *io_BytesIO;
static PyObject *str_buffers, *str_load_dep, *str_load, *kw_buffers;

/* ------------------------------------------------------------------ embedded Python helpers */

/* Cold paths only (error messages, exception pickling): clearer in Python, and never on the
 * per-task path. */
static const char helpers_source[] =
"import io, pickle, traceback\n"
"def qualname(fn):\n"
"    mod = getattr(fn, '__module__', None)\n"
"    q = getattr(fn, '__qualname__', None) or getattr(fn, '__name__', None) or repr(fn)\n"
"    return f'{mod}.{q}' if mod and mod != 'builtins' else q\n"
"def typename(x):\n"
"    t = type(x)\n"
"    return t.__qualname__ if t.__module__ == 'builtins' else f'{t.__module__}.{t.__qualname__}'\n"
"class _Dep:\n"
"    pass\n"
"class DepUnpickler(pickle.Unpickler):\n"
"    # persistent_load cannot be set on an Unpickler instance on 3.13: a subclass forwards it.\n"
"    def persistent_load(self, pid):\n"
"        return self.load_dep(pid)\n"
"def describe(x):\n"
"    t = type(x)\n"
"    if isinstance(x, _Dep):\n"
"        return '<result of a task>'\n"
"    if t.__name__ == 'ndarray' and hasattr(x, 'shape') and hasattr(x, 'dtype'):\n"
"        return f\"ndarray({x.dtype}, {'x'.join(map(str, x.shape)) or 'scalar'})\"\n"
"    if isinstance(x, (list, tuple, dict, set, frozenset, str, bytes)):\n"
"        return f'{t.__name__}[{len(x)}]'\n"
"    return typename(x)\n"
"def describe_call(data, buffers):\n"
"    class U(pickle.Unpickler):\n"
"        def persistent_load(self, pid):\n"
"            return _Dep()\n"
"    args, kwargs = U(io.BytesIO(data), buffers=buffers).load()\n"
"    parts = [describe(a) for a in args] + [f'{k}={describe(v)}' for k, v in (kwargs or {}).items()]\n"
"    return '(' + ', '.join(parts) + ')'\n"
"def worker_lost(fn, how, kills, data, buffers):\n"
"    try:\n"
"        shapes = describe_call(data, buffers)\n"
"    except Exception as e:\n"
"        shapes = f'(<arguments not decodable: {e!r}>)'\n"
"    return WorkerLostError(f'pydron: task {qualname(fn)}{shapes} killed its worker process '\n"
"                           f'{kills} times (last: {how}); giving up on it')\n"
"def bad_argument(fn, where, arg, err):\n"
"    if isinstance(where, int):\n"
"        code = getattr(fn, '__code__', None)\n"
"        if code is not None and where < code.co_argcount:\n"
"            where = f'argument {where} ({code.co_varnames[where]!r})'\n"
"        else:\n"
"            where = f'argument {where}'\n"
"    e = TypeError(f'pydron: cannot send {where} of {qualname(fn)}() to a worker process: '\n"
"                  f'{typename(arg)} object cannot be pickled ({type(err).__name__}: {err})')\n"
"    e.__cause__ = err\n"
"    return e\n"
"def bad_result(fn, result, err):\n"
"    return TypeError(f'pydron: the result of {qualname(fn)}() cannot be sent back from the '\n"
"                     f'worker process: {typename(result)} object cannot be pickled '\n"
"                     f'({type(err).__name__}: {err})')\n"
"def bad_function(fn, err):\n"
"    e = TypeError(f'pydron: cannot send function {qualname(fn)} to a worker process '\n"
"                  f'(by reference or by value with cloudpickle): {type(err).__name__}: {err}')\n"
"    e.__cause__ = err\n"
"    return e\n"
"def pickle_function(fn):\n"
"    import cloudpickle\n"
"    code = getattr(fn, '__code__', None)\n"
"    return cloudpickle.dumps((fn, getattr(code, 'co_filename', None)), protocol=5)\n"
"def unpack_function(shipped):\n"
"    # cloudpickle ships code by value with co_filename '<dynamic-code>': put the real file back,\n"
"    # so worker tracebacks name it (and the master can show its source lines).\n"
"    fn, filename = shipped\n"
"    code = getattr(fn, '__code__', None)\n"
"    if filename and code is not None and code.co_filename != filename:\n"
"        import types\n"
"        def fix(c):\n"
"            consts = tuple(fix(k) if isinstance(k, types.CodeType) else k for k in c.co_consts)\n"
"            return c.replace(co_filename=filename, co_consts=consts)\n"
"        try:\n"
"            fn.__code__ = fix(code)\n"
"        except Exception:\n"
"            pass\n"
"    return fn\n"
"def pickle_exception(exc, fn):\n"
"    try:\n"
"        from tblib import pickling_support\n"
"        pickling_support.install(exc)\n"
"    except Exception:\n"
"        pass\n"
"    import cloudpickle\n"
"    # By reference first; classes the worker got by value (defined in __main__, or after\n"
"    # enable()) go back by value with cloudpickle, which maps them to the master's own class.\n"
"    for dumps in (pickle.dumps, cloudpickle.dumps):\n"
"        try:\n"
"            data = dumps(exc, protocol=5)\n"
"            if type(pickle.loads(data)) is type(exc):\n"
"                return data\n"
"        except Exception:\n"
"            pass\n"
"    tb = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))\n"
"    err = RuntimeError(f'{typename(exc)}: {exc}\\n(raised in {qualname(fn)}() on a pydron worker; '\n"
"                       f'the exception could not be pickled back)\\n\\nWorker traceback:\\n{tb}')\n"
"    try:\n"
"        return pickle.dumps(err, protocol=5)\n"
"    except Exception:\n"
"        return pickle.dumps(RuntimeError(f'{typename(exc)} raised in a pydron worker'), protocol=5)\n"
"def restore_builtin_state(exc):\n"
"    # tblib rebuilds exceptions that carry attributes with __new__, skipping __init__: the\n"
"    # builtin classes that derive state from their arguments (SystemExit.code, OSError.errno,\n"
"    # StopIteration.value) get it back by running their own __init__ again.\n"
"    for cls in type(exc).__mro__:\n"
"        if cls.__module__ == 'builtins' and cls.__init__ is not BaseException.__init__ \\\n"
"                and cls is not object and '__init__' in cls.__dict__:\n"
"            try:\n"
"                cls.__init__(exc, *exc.args)\n"
"            except Exception:\n"
"                pass\n"
"            break\n"
"    return exc\n"
"def undecodable_error(err):\n"
"    return RuntimeError(f'pydron: a task failed in a worker process, and its exception could not '\n"
"                        f'be rebuilt here: {type(err).__name__}: {err}')\n";

PyObject *exec__helper(const char *name)
{
    PyObject *f = PyDict_GetItemString(helpers, name);
    if (f == NULL)
        PyErr_Format(PyExc_SystemError, "pydron: exec helper %s missing", name);
    return f;
}

/* Call helper `name` with the given arguments: new reference, NULL + exception. */
static PyObject *call_helper(const char *name, PyObject *const *args, size_t nargs)
{
    PyObject *f = exec__helper(name);
    return f ? PyObject_Vectorcall(f, args, nargs, NULL) : NULL;
}

PyObject *exec__pickle_exception(PyObject *exc, PyObject *fn)
{
    PyObject *args[2] = {exc, fn ? fn : Py_None};
    PyObject *data = call_helper("pickle_exception", args, 2);
    if (data == NULL || !PyBytes_Check(data)) {
        Py_XDECREF(data);
        PyErr_Clear();
        /* Last resort: a plain RuntimeError naming the type. */
        PyObject *msg = PyUnicode_FromFormat("%s raised in a pydron worker (not picklable)",
                                             Py_TYPE(exc)->tp_name);
        PyObject *err = msg ? PyObject_CallOneArg(PyExc_RuntimeError, msg) : NULL;
        Py_XDECREF(msg);
        if (err == NULL)
            return NULL;
        data = PyObject_CallOneArg(pickle_dumps, err);
        Py_DECREF(err);
    }
    return data;
}

/* ------------------------------------------------------------------ ArenaBuffer */

/* Holds one reference on an arena block and exposes part of it through the buffer protocol, so
 * unpickled arrays view shared memory without a copy; the reference goes with the object. */
typedef struct {
    PyObject_HEAD
    arena *arena;
    uint64_t blk;
    char *ptr;
    Py_ssize_t len;
    int held;                 /* index in the worker slot's held table, or -1 */
    unsigned generation;      /* fork_generation when made */
} ArenaBufferObject;

int exec__worker_slot = -1;

/* In a worker, note the reference in the slot's held table (see exec_slot.held). */
static int held_register(uint64_t blk)
{
    if (!exec__in_worker_flag || exec__shared == NULL)
        return -1;
    _Atomic uint64_t *held = exec__shared->slots[exec__worker_slot].held;
    for (int i = 0; i < EXEC_HELD_MAX; i++) {
        if (atomic_load_explicit(&held[i], memory_order_relaxed) == 0) {
            atomic_store(&held[i], blk + 1);
            return i;
        }
    }
    return -1;                /* table full: only a death would leak it */
}

static void held_unregister(int i)
{
    if (i >= 0 && exec__shared)
        atomic_store(&exec__shared->slots[exec__worker_slot].held[i], 0);
}

void exec__held_add(uint64_t blk) { held_register(blk); }

void exec__held_drop(uint64_t blk)
{
    if (!exec__in_worker_flag || exec__shared == NULL)
        return;
    _Atomic uint64_t *held = exec__shared->slots[exec__worker_slot].held;
    for (int i = 0; i < EXEC_HELD_MAX; i++) {
        uint64_t want = blk + 1;
        if (atomic_load_explicit(&held[i], memory_order_relaxed) == want &&
            atomic_compare_exchange_strong(&held[i], &want, 0))
            return;
    }
}

static int arena_buffer_getbuffer(ArenaBufferObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->len, 0, flags);
}

static void arena_buffer_dealloc(ArenaBufferObject *self)
{
    if (self->arena && self->generation == fork_generation) {
        held_unregister(self->held);
        arena_decref(self->arena, self->blk);
        atomic_fetch_sub(&live_arena_refs, 1);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *arena_buffer_repr(ArenaBufferObject *self)
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

PyObject *exec__arena_buffer_new(arena *a, uint64_t blk, uint64_t off, uint64_t len)
{
    ArenaBufferObject *self = PyObject_New(ArenaBufferObject, &ArenaBuffer_Type);
    if (self == NULL)
        return NULL;
    arena_incref(a, blk);
    atomic_fetch_add(&live_arena_refs, 1);
    self->arena = a;
    self->blk = blk;
    self->ptr = arena_ptr(a, off);
    self->len = (Py_ssize_t)len;
    self->held = held_register(blk);
    self->generation = fork_generation;
    return (PyObject *)self;
}

void exec__bufs_release(arena *a, const exec_buf *bufs, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        arena_decref(a, bufs[i].blk);
}

/* ------------------------------------------------------------------ codec */

struct exec_codec {
    PyObject_HEAD
    /* Picklers writing into this codec (Pickler(self, 5, buffer_callback=...)), reused: [0] plain,
     * [1] with persistent ids; [2], [3] the same with cloudpickle's CloudPickler, for what plain
     * pickle refuses (local functions, lambdas, closures in arguments and results). */
    PyObject *pickler[4], *dump[4], *clear[4];
    PyObject *dep_values;                    /* tuple for persistent_load (decoding) */
    exec_dep_fn dep;
    void *dep_ctx;
    char *out;
    size_t out_len, out_cap;
    exec_buf *bufs;
    uint32_t nbufs, bufs_cap;
    int busy;
};

static PyObject *codec_write(exec_codec *c, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t need = c->out_len + (size_t)view.len;
    if (need > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 256;
        while (cap < need)
            cap *= 2;
        char *p = realloc(c->out, cap);
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

static PyObject *codec_persistent_id(exec_codec *c, PyObject *obj)
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

static PyObject *codec_persistent_load(exec_codec *c, PyObject *pid)
{
    Py_ssize_t i = PyLong_AsSsize_t(pid);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (c->dep_values == NULL || i < 0 || i >= PyTuple_GET_SIZE(c->dep_values)) {
        PyErr_Format(PyExc_RuntimeError, "pydron: task refers to dependency %zd it was not given", i);
        return NULL;
    }
    return Py_NewRef(PyTuple_GET_ITEM(c->dep_values, i));
}

/* Out-of-band buffers of EXEC_OOB_MIN bytes or more go to the arena: by reference when they are
 * already inside it (a result forwarded), else copied once. Smaller ones stay in band. */
static PyObject *codec_buffer_callback(exec_codec *c, PyObject *pb)
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
        exec_buf *b = realloc(c->bufs, cap * sizeof(exec_buf));
        if (b == NULL) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        c->bufs = b;
        c->bufs_cap = cap;
    }
    exec_buf *b = &c->bufs[c->nbufs];
    size_t blen;
    uint64_t blk;
    if (arena_block_of(a, view.buf, &blk, &blen) == 0 &&
        (char *)view.buf + view.len <= (char *)arena_ptr(a, blk) + blen) {
        arena_incref(a, blk);                  /* already shared: send a reference */
        b->blk = blk;
        b->off = (uint64_t)((char *)view.buf - (char *)a);
    } else {
        if (arena_alloc(a, (size_t)view.len, &b->blk) < 0)
            goto done;                         /* arena full: in band, slower but correct */
        Py_BEGIN_ALLOW_THREADS
        memcpy(arena_ptr(a, b->blk), view.buf, (size_t)view.len);
        Py_END_ALLOW_THREADS
        b->off = b->blk;
    }
    b->len = (uint64_t)view.len;
    c->nbufs++;
    in_band = Py_False;
done:
    PyBuffer_Release(&view);
    return Py_NewRef(in_band);
}

static PyMethodDef codec_methods[] = {
    {"write", (PyCFunction)codec_write, METH_O, NULL},
    {"persistent_id", (PyCFunction)codec_persistent_id, METH_O, NULL},
    {"persistent_load", (PyCFunction)codec_persistent_load, METH_O, NULL},
    {"buffer_callback", (PyCFunction)codec_buffer_callback, METH_O, NULL},
    {NULL},
};

static void codec_dealloc(exec_codec *c)
{
    for (int i = 0; i < 4; i++) {
        Py_XDECREF(c->pickler[i]);
        Py_XDECREF(c->dump[i]);
        Py_XDECREF(c->clear[i]);
    }
    Py_XDECREF(c->dep_values);
    free(c->out);
    free(c->bufs);
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
 * codec_discard breaks. */
static int codec_make_pickler(exec_codec *c, int which)
{
    int rc = -1;
    PyObject *cls = pickle_Pickler, *cloud = NULL;
    if (which >= 2) {
        cloud = PyImport_ImportModule("cloudpickle");
        cls = cloud ? PyObject_GetAttrString(cloud, "CloudPickler") : NULL;
        Py_XDECREF(cloud);
        if (cls == NULL)
            return -1;
    } else {
        Py_INCREF(cls);
    }
    PyObject *cb = PyObject_GetAttrString((PyObject *)c, "buffer_callback");
    PyObject *kw = cb ? Py_BuildValue("{s:i,s:O}", "protocol", 5, "buffer_callback", cb) : NULL;
    PyObject *args = PyTuple_Pack(1, (PyObject *)c);
    PyObject *p = (kw && args) ? PyObject_Call(cls, args, kw) : NULL;
    if (p == NULL)
        goto done;
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
    Py_DECREF(cls);
    Py_XDECREF(cb);
    Py_XDECREF(kw);
    Py_XDECREF(args);
    Py_XDECREF(p);
    return rc;
}

exec_codec *exec__codec_new(void)
{
    exec_codec *c = PyObject_New(exec_codec, &Codec_Type);
    if (c == NULL)
        return NULL;
    memset((char *)c + sizeof(PyObject), 0, sizeof(*c) - sizeof(PyObject));
    return c;
}

/* Break the codec's cycles and drop it (for temporary codecs). */
static void codec_discard(exec_codec *c)
{
    for (int i = 0; i < 4; i++) {
        Py_CLEAR(c->dump[i]);
        Py_CLEAR(c->clear[i]);
        Py_CLEAR(c->pickler[i]);
    }
    Py_DECREF(c);
}

PyObject *exec__codec_loader(exec_codec *c, PyObject *deps)
{
    Py_XSETREF(c->dep_values, Py_XNewRef(deps));
    return PyObject_GetAttrString((PyObject *)c, "persistent_load");
}

void exec__codec_reset(exec_codec *c)
{
    c->out_len = 0;
    c->nbufs = 0;
}

/* One attempt with pickler `which`; 0, or -1 with an exception (nothing kept). */
static int codec_dump_with(exec_codec *c, int which, PyObject *obj, exec_dep_fn dep, void *ctx)
{
    if (c->dump[which] == NULL && codec_make_pickler(c, which) < 0)
        return -1;
    c->busy = 1;
    c->out_len = 0;
    c->nbufs = 0;
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
        if (exec__arena)
            exec__bufs_release(exec__arena, c->bufs, c->nbufs);
        c->nbufs = 0;
        c->out_len = 0;
        return -1;
    }
    Py_DECREF(r);
    return 0;
}

int exec__codec_dump(exec_codec *c, PyObject *obj, exec_dep_fn dep, void *ctx,
                     const char **data, size_t *len, exec_buf **bufs, uint32_t *nbufs)
{
    int which = dep ? 1 : 0;
    if (codec_dump_with(c, which, obj, dep, ctx) < 0) {
        /* Plain pickle refuses local functions and lambdas: cloudpickle sends them by value. */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyObject *first = PyErr_GetRaisedException();
        if (codec_dump_with(c, which + 2, obj, dep, ctx) < 0) {
            Py_DECREF(first);
            return -1;
        }
        Py_DECREF(first);
    }
    *data = c->out;
    *len = c->out_len;
    *bufs = c->bufs;
    *nbufs = c->nbufs;
    return 0;
}

/* ------------------------------------------------------------------ blobs */

struct exec_blob {
    _Atomic Py_ssize_t refcnt;
    unsigned generation;   /* fork_generation when made (see ArenaBufferObject) */
    arena *arena;          /* set when the blob holds arena references */
    const char *data;      /* pickle bytes: inline after bufs, or inside arena block data_blk */
    size_t len;
    uint64_t data_blk;
    uint32_t nbufs;
    exec_buf bufs[];
};

void exec_blob_incref(exec_blob *b)
{
    atomic_fetch_add_explicit(&b->refcnt, 1, memory_order_relaxed);
}

void exec_blob_decref(exec_blob *b)
{
    if (b == NULL || atomic_fetch_sub_explicit(&b->refcnt, 1, memory_order_acq_rel) != 1)
        return;
    if (b->arena && b->generation == fork_generation) {
        exec__bufs_release(b->arena, b->bufs, b->nbufs);
        if (b->data_blk != EXEC_NO_BLOCK)
            arena_decref(b->arena, b->data_blk);
        atomic_fetch_sub(&live_arena_refs, 1);
    }
    free(b);
}

size_t exec_blob_size(const exec_blob *b)
{
    size_t n = b->len;
    for (uint32_t i = 0; i < b->nbufs; i++)
        n += b->bufs[i].len;
    return n;
}

/* A blob from pickle bytes and buffers (whose references it takes). Bytes longer than
 * EXEC_INLINE_MAX go into the arena now, so the blob can later cross any ring by reference.
 * NULL + exception. */
static exec_blob *blob_new(const char *data, size_t len, const exec_buf *bufs, uint32_t nbufs)
{
    arena *a = exec__arena;
    int in_arena = a != NULL && len > EXEC_INLINE_MAX;
    exec_blob *b = malloc(sizeof(exec_blob) + nbufs * sizeof(exec_buf) + (in_arena ? 0 : len));
    if (b == NULL) {
        if (a)
            exec__bufs_release(a, bufs, nbufs);
        PyErr_NoMemory();
        return NULL;
    }
    atomic_init(&b->refcnt, 1);
    b->generation = fork_generation;
    b->len = len;
    b->nbufs = nbufs;
    b->data_blk = EXEC_NO_BLOCK;
    if (nbufs)
        memcpy(b->bufs, bufs, nbufs * sizeof(exec_buf));
    if (in_arena && arena_alloc(a, len, &b->data_blk) == 0) {
        b->data = arena_ptr(a, b->data_blk);
        memcpy((char *)b->data, data, len);
    } else if (in_arena) {
        exec__bufs_release(a, bufs, nbufs);
        free(b);
        PyErr_Format(PyExc_MemoryError, "pydron: shared arena full (%zu bytes requested)", len);
        return NULL;
    } else {
        b->data = (char *)(b->bufs + nbufs);
        memcpy((char *)b->data, data, len);
    }
    b->arena = (nbufs || b->data_blk != EXEC_NO_BLOCK) ? a : NULL;
    if (b->arena)
        atomic_fetch_add(&live_arena_refs, 1);
    return b;
}

/* A blob from a wire form received from a worker: the wire's arena references become the
 * blob's. *consumed: bytes of wire read. */
static exec_blob *blob_from_wire(const void *src, size_t *consumed)
{
    const exec_wire *w = src;
    const exec_buf *bufs = (const exec_buf *)(w + 1);
    int inline_data = w->data_blk == EXEC_NO_BLOCK;
    *consumed = exec__wire_size(w->len, w->nbufs, inline_data);
    arena *a = exec__arena;
    exec_blob *b = malloc(sizeof(exec_blob) + w->nbufs * sizeof(exec_buf) + (inline_data ? w->len : 0));
    if (b == NULL) {
        exec__bufs_release(a, bufs, w->nbufs);
        if (!inline_data)
            arena_decref(a, w->data_blk);
        PyErr_NoMemory();
        return NULL;
    }
    atomic_init(&b->refcnt, 1);
    b->generation = fork_generation;
    b->len = w->len;
    b->nbufs = w->nbufs;
    b->data_blk = w->data_blk;
    memcpy(b->bufs, bufs, w->nbufs * sizeof(exec_buf));
    if (inline_data) {
        b->data = (char *)(b->bufs + w->nbufs);
        memcpy((char *)b->data, bufs + w->nbufs, w->len);
    } else {
        b->data = arena_ptr(a, w->data_off);
    }
    b->arena = (w->nbufs || !inline_data) ? a : NULL;
    if (b->arena)
        atomic_fetch_add(&live_arena_refs, 1);
    return b;
}

/* Wire form of a blob for a master-to-worker record: the references stay the blob's (the
 * master keeps the blob until the task's result is back, and the worker takes its own). */
static size_t blob_wire_size(const exec_blob *b)
{
    return exec__wire_size(b->len, b->nbufs, b->data_blk == EXEC_NO_BLOCK);
}

static size_t blob_wire_write(void *dst, const exec_blob *b)
{
    exec_wire *w = dst;
    w->len = b->len;
    w->data_blk = b->data_blk;
    w->data_off = b->data_blk == EXEC_NO_BLOCK ? 0 : (uint64_t)(b->data - (char *)b->arena);
    w->nbufs = b->nbufs;
    w->pad = 0;
    memcpy(w + 1, b->bufs, b->nbufs * sizeof(exec_buf));
    if (b->data_blk == EXEC_NO_BLOCK)
        memcpy((exec_buf *)(w + 1) + b->nbufs, b->data, b->len);
    return blob_wire_size(b);
}

size_t exec__wire_write(void *dst, const char *data, size_t len, const exec_buf *bufs,
                        uint32_t nbufs, int inline_data)
{
    exec_wire *w = dst;
    w->len = len;
    w->nbufs = nbufs;
    w->pad = 0;
    if (inline_data) {
        w->data_blk = EXEC_NO_BLOCK;
        w->data_off = 0;
        memcpy((exec_buf *)(w + 1) + nbufs, data, len);
    } else {
        if (exec__arena == NULL || arena_alloc(exec__arena, len, &w->data_blk) < 0)
            return 0;
        w->data_off = w->data_blk;
        memcpy(arena_ptr(exec__arena, w->data_blk), data, len);
    }
    if (nbufs)
        memcpy(w + 1, bufs, nbufs * sizeof(exec_buf));
    return exec__wire_size(len, nbufs, inline_data);
}

/* Unpickle len bytes at data with the given arena buffers (wrapped in ArenaBuffer objects,
 * taking their own references) and optional persistent_load. New reference, NULL + exception. */
static PyObject *decode_bytes(arena *a, const char *data, size_t len, const exec_buf *bufs,
                              uint32_t nbufs, PyObject *persistent_load)
{
    PyObject *result = NULL, *holders = NULL, *unpickler = NULL, *file = NULL;
    if (nbufs == 0 && persistent_load == NULL && len <= 4096) {
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
            PyObject *h = exec__arena_buffer_new(a, bufs[i].blk, bufs[i].off, bufs[i].len);
            if (h == NULL)
                goto done;
            PyTuple_SET_ITEM(holders, i, h);
        }
    }
    if (persistent_load == NULL) {
        PyObject *args[2] = {mv, holders};
        result = PyObject_Vectorcall(pickle_loads, args, 1, holders ? kw_buffers : NULL);
        goto done;
    }
    file = PyObject_CallOneArg(io_BytesIO, mv);
    if (file == NULL)
        goto done;
    PyObject *cls = exec__helper("DepUnpickler");
    if (cls == NULL)
        goto done;
    {
        PyObject *args[2] = {file, holders};
        unpickler = PyObject_Vectorcall(cls, args, 1, holders ? kw_buffers : NULL);
    }
    if (unpickler == NULL || PyObject_SetAttr(unpickler, str_load_dep, persistent_load) < 0)
        goto done;
    result = PyObject_CallMethodNoArgs(unpickler, str_load);
done:
    Py_XDECREF(unpickler);
    Py_XDECREF(file);
    Py_XDECREF(holders);
    if (mv) {
        /* Nothing may keep a view of the ring or the blob past this point. */
        PyObject *err = result == NULL ? PyErr_GetRaisedException() : NULL;
        PyObject *r = PyObject_CallMethod(mv, "release", NULL);
        if (r == NULL)
            Py_CLEAR(result);
        if (err)
            PyErr_SetRaisedException(err);   /* the decoding error is the one to report */
        Py_XDECREF(r);
        Py_DECREF(mv);
    }
    return result;
}

PyObject *exec__wire_decode(const void *src, size_t *consumed, PyObject *persistent_load)
{
    const exec_wire *w = src;
    const exec_buf *bufs = (const exec_buf *)(w + 1);
    int inline_data = w->data_blk == EXEC_NO_BLOCK;
    *consumed = exec__wire_size(w->len, w->nbufs, inline_data);
    const char *data = inline_data ? (const char *)(bufs + w->nbufs)
                                   : (const char *)arena_ptr(exec__arena, w->data_off);
    return decode_bytes(exec__arena, data, w->len, bufs, w->nbufs, persistent_load);
}

PyObject *exec_blob_decode(exec_blob *b)
{
    return decode_bytes(b->arena, b->data, b->len, b->bufs, b->nbufs, NULL);
}

/* The blob's buffers as a tuple of ArenaBuffer (for cold-path decoding in Python). */
static PyObject *blob_buffers(exec_blob *b)
{
    PyObject *t = PyTuple_New(b->nbufs);
    for (uint32_t i = 0; t && i < b->nbufs; i++) {
        PyObject *h = exec__arena_buffer_new(b->arena, b->bufs[i].blk, b->bufs[i].off, b->bufs[i].len);
        if (h == NULL) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, h);
    }
    return t;
}

/* ------------------------------------------------------------------ encoding calls */

static exec_codec *master_codec;

/* Find which argument cannot be pickled and say so; called with the pickling error set.
 * Always returns NULL with a TypeError set. */
static exec_blob *explain_encode_failure(exec_codec *c, PyObject *fn, PyObject *args,
                                         PyObject *kwargs, exec_dep_fn dep, void *ctx)
{
    PyObject *err = PyErr_GetRaisedException();
    PyObject *where = NULL, *culprit = NULL;
    const char *d;
    size_t l;
    exec_buf *bb;
    uint32_t nb;
    Py_ssize_t n = args ? PyTuple_GET_SIZE(args) : 0;
    for (Py_ssize_t i = 0; i < n && where == NULL; i++) {
        PyObject *a = PyTuple_GET_ITEM(args, i);
        if (exec__codec_dump(c, a, dep, ctx, &d, &l, &bb, &nb) < 0) {
            Py_SETREF(err, PyErr_GetRaisedException());
            where = PyLong_FromSsize_t(i);
            culprit = a;
        } else if (exec__arena) {
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
        } else if (exec__arena) {
            exec__bufs_release(exec__arena, bb, nb);
        }
    }
    exec__codec_reset(c);
    if (where == NULL) {
        where = PyUnicode_FromString("the arguments");
        culprit = args;
    }
    if (err == NULL)
        err = Py_NewRef(Py_None);
    PyObject *hargs[4] = {fn, where, culprit, err};
    PyObject *exc = where ? call_helper("bad_argument", hargs, 4) : NULL;
    if (exc)
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_XDECREF(exc);
    Py_XDECREF(where);
    Py_XDECREF(err);
    return NULL;
}

exec_blob *exec_encode_call(PyObject *fn, PyObject *args, PyObject *kwargs, exec_dep_fn dep,
                            void *ctx)
{
    exec_codec *c = master_codec;
    int temporary = 0;
    if (c == NULL || c->busy) {         /* re-entered from a __reduce__: use a fresh codec */
        c = exec__codec_new();
        if (c == NULL)
            return NULL;
        temporary = 1;
    }
    exec_blob *b = NULL;
    PyObject *call = PyTuple_Pack(2, args, kwargs && PyDict_GET_SIZE(kwargs) ? kwargs : Py_None);
    const char *data;
    size_t len;
    exec_buf *bufs;
    uint32_t nbufs;
    if (call == NULL)
        goto done;
    if (exec__codec_dump(c, call, dep, ctx, &data, &len, &bufs, &nbufs) < 0) {
        /* Ctrl-C (or SystemExit) while pickling is not a pickling problem: let it through. */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            goto done;
        b = explain_encode_failure(c, fn, args, kwargs, dep, ctx);
    }
    else
        b = blob_new(data, len, bufs, nbufs);
done:
    Py_XDECREF(call);
    if (temporary)
        codec_discard(c);
    return b;
}

exec_blob *exec_encode_value(PyObject *value)
{
    exec_codec *c = master_codec;
    int temporary = 0;
    if (c == NULL || c->busy) {
        c = exec__codec_new();
        if (c == NULL)
            return NULL;
        temporary = 1;
    }
    const char *data;
    size_t len;
    exec_buf *bufs;
    uint32_t nbufs;
    exec_blob *b = NULL;
    if (exec__codec_dump(c, value, NULL, NULL, &data, &len, &bufs, &nbufs) == 0)
        b = blob_new(data, len, bufs, nbufs);
    if (temporary)
        codec_discard(c);
    return b;
}

/* ------------------------------------------------------------------ master state */

typedef struct mtask {
    struct mtask *next;
    uint64_t id;
    uint32_t fn_id;
    int kills;
    double est_ns;             /* expected run time when dispatched */
    PyObject *fn;              /* strong */
    PyObject *error;           /* WorkerLostError once given up on */
    exec_blob *args;           /* owned */
    Py_ssize_t ndeps;
    exec_blob *deps[];         /* owned */
} mtask;

typedef struct {
    mtask *head, *tail;        /* written to the worker's ring, result not yet read: ring order */
    Py_ssize_t count;
    double queued_ns;          /* expected run time of the tasks in flight */
    int spawned;               /* the fork server was asked for a worker and it has not died */
    int killing;               /* SIGKILLed by exec_cancel_all: its death is expected */
    int disabled;              /* died too often without running anything */
    int idle_deaths;
    uint32_t seen_deaths;
    uint8_t *defined;          /* fn ids already sent to the current worker */
    size_t defined_cap;
} mslot;

typedef struct {
    PyObject *fn;
    exec_blob *blob;
    double est_ns;             /* moving average of its run time on workers; < 0: not yet known */
} fn_entry;

/* A worker gets tasks while it has fewer than EXEC_MIN_INFLIGHT, or while the expected run time
 * of what it has stays under EXEC_QUEUE_NS (and EXEC_MAX_INFLIGHT): tiny tasks stream in
 * hundreds, long ones stay in the master's queue and go to whichever worker frees up first. */
#define EXEC_MAX_INFLIGHT 256
#define EXEC_MIN_INFLIGHT 2
#define EXEC_QUEUE_NS 50e6
#define EXEC_UNKNOWN_NS 1e6
#define EXEC_MAX_KILLS 3

static struct {
    int running, nworkers;
    void *ctl;
    size_t ctl_size;
    void *arena_mem;
    size_t arena_size;
    pid_t fs_pid;
    int fs_sock;
    int workers_started;
    mslot slots[EXEC_MAX_WORKERS];
    mtask *q_head, *q_tail;            /* submitted, not yet in a ring */
    mtask *failed_head, *failed_tail;  /* given up on, to report */
    Py_ssize_t outstanding;
    uint32_t seen_deaths;
    int rr;
    int polling;
    int forgotten;                     /* a fork of user code dropped the parent's pool */
    PyObject *fn_ids;                  /* dict fn -> index into fns */
    fn_entry *fns;
    uint32_t nfns, fns_cap;
} M;

static wake_word local_master_word;    /* when no pool runs (thread pool only) */
/* Threads asleep in exec_poll (GIL released) on the shared master word: while there are any,
 * shutdown must not unmap the word under them (a daemon thread at interpreter exit). */
static _Atomic int sleepers;
static _Atomic uint32_t notifications;

static wake_word *master_word(void)
{
    return exec__shared ? &exec__shared->master : &local_master_word;
}

void exec__notify_master(void)
{
    atomic_fetch_add(&notifications, 1);
    wake_notify(master_word());
}

int exec_running(void) { return M.running; }
int exec_nworkers(void) { return M.running ? M.nworkers : 0; }

Py_ssize_t exec_outstanding(void)
{
    return M.outstanding + exec__threads_outstanding();
}

static void task_free(mtask *t)
{
    Py_XDECREF(t->fn);
    Py_XDECREF(t->error);
    exec_blob_decref(t->args);
    for (Py_ssize_t i = 0; i < t->ndeps; i++)
        exec_blob_decref(t->deps[i]);
    free(t);
}

static void free_task_list(mtask *t, int with_python)
{
    while (t) {
        mtask *next = t->next;
        if (with_python)
            task_free(t);
        M.outstanding--;
        t = next;
    }
}

/* ------------------------------------------------------------------ functions */

/* The id of fn, shipping-ready (pickled by reference when workers can import it, else by value
 * through cloudpickle; cloudpickle makes exactly that choice). -1 + TypeError naming fn. */
static Py_ssize_t fn_lookup(PyObject *fn)
{
    PyObject *idobj = PyDict_GetItemWithError(M.fn_ids, fn);
    if (idobj)
        return PyLong_AsSsize_t(idobj);
    int hashable = !PyErr_Occurred();
    PyErr_Clear();
    PyObject *data = call_helper("pickle_function", &fn, 1);
    if (data == NULL) {
        PyObject *err = PyErr_GetRaisedException();
        PyObject *a[2] = {fn, err};
        PyObject *exc = call_helper("bad_function", a, 2);
        Py_DECREF(err);
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return -1;
    }
    exec_blob *b = blob_new(PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data), NULL, 0);
    Py_DECREF(data);
    if (b == NULL)
        return -1;
    if (M.nfns == M.fns_cap) {
        uint32_t cap = M.fns_cap ? M.fns_cap * 2 : 64;
        fn_entry *f = realloc(M.fns, cap * sizeof(fn_entry));
        if (f == NULL) {
            exec_blob_decref(b);
            PyErr_NoMemory();
            return -1;
        }
        M.fns = f;
        M.fns_cap = cap;
    }
    Py_ssize_t id = M.nfns++;
    M.fns[id].fn = Py_NewRef(fn);
    M.fns[id].blob = b;
    M.fns[id].est_ns = -1;
    if (hashable) {
        PyObject *v = PyLong_FromSsize_t(id);
        if (v == NULL || PyDict_SetItem(M.fn_ids, fn, v) < 0) {
            Py_XDECREF(v);
            return -1;
        }
        Py_DECREF(v);
    }
    return id;
}

static void fn_table_clear(void)
{
    for (uint32_t i = 0; i < M.nfns; i++) {
        Py_DECREF(M.fns[i].fn);
        exec_blob_decref(M.fns[i].blob);
    }
    M.nfns = 0;
    if (M.fn_ids)
        PyDict_Clear(M.fn_ids);
}

static int slot_defined(mslot *s, uint32_t fn_id)
{
    return fn_id < s->defined_cap && s->defined[fn_id];
}

static int slot_mark_defined(mslot *s, uint32_t fn_id)
{
    if (fn_id >= s->defined_cap) {
        size_t cap = s->defined_cap ? s->defined_cap : 64;
        while (cap <= fn_id)
            cap *= 2;
        uint8_t *d = realloc(s->defined, cap);
        if (d == NULL)
            return -1;
        memset(d + s->defined_cap, 0, cap - s->defined_cap);
        s->defined = d;
        s->defined_cap = cap;
    }
    s->defined[fn_id] = 1;
    return 0;
}

/* ------------------------------------------------------------------ dispatching */

static void spawn_worker(int i)
{
    mslot *s = &M.slots[i];
    if (s->disabled)
        return;
    if (exec__forkserver_spawn(M.fs_sock, i) == 0)
        s->spawned = 1;
}

static void start_workers(void)
{
    if (M.workers_started)
        return;
    M.workers_started = 1;
    for (int i = 0; i < M.nworkers; i++)
        spawn_worker(i);
}

/* Least-outstanding live worker with room for a task expected to run est_ns, or -1. */
static int pick_slot(double est_ns)
{
    int best = -1;
    for (int k = 0; k < M.nworkers; k++) {
        int i = (M.rr + k) % M.nworkers;
        mslot *s = &M.slots[i];
        if (!s->spawned || s->killing || s->disabled || s->count >= EXEC_MAX_INFLIGHT)
            continue;
        if (s->count >= EXEC_MIN_INFLIGHT && s->queued_ns + est_ns > EXEC_QUEUE_NS)
            continue;
        if (best < 0 || s->count < M.slots[best].count)
            best = i;
    }
    M.rr = M.nworkers ? (M.rr + 1) % M.nworkers : 0;
    return best;
}

/* Write t (and its function's definition, first time on that worker) into a worker's ring.
 * 0, or -1 when no worker has room now (t stays the caller's). */
static int dispatch(mtask *t)
{
    double est = M.fns[t->fn_id].est_ns;
    t->est_ns = est < 0 ? EXEC_UNKNOWN_NS : est;
    int i = pick_slot(t->est_ns);
    if (i < 0)
        return -1;
    mslot *s = &M.slots[i];
    ring *r = exec__to_worker(i);
    if (!slot_defined(s, t->fn_id)) {
        exec_blob *fb = M.fns[t->fn_id].blob;
        size_t n = 8 + blob_wire_size(fb);
        char *dst = ring_reserve(r, (uint32_t)n);
        if (dst == NULL)
            return -1;
        *(uint64_t *)dst = t->fn_id;
        blob_wire_write(dst + 8, fb);
        ring_commit(r, EXEC_REC_DEFINE);
        if (slot_mark_defined(s, t->fn_id) < 0)
            return -1;
    }
    size_t n = 24 + blob_wire_size(t->args);
    for (Py_ssize_t d = 0; d < t->ndeps; d++)
        n += blob_wire_size(t->deps[d]);
    if (n > ring_max_payload(r))
        return -1;   /* checked at submit time; cannot happen here */
    char *dst = ring_reserve(r, (uint32_t)n);
    if (dst == NULL) {
        wake_notify(&r->readable);
        return -1;
    }
    uint64_t *hdr = (uint64_t *)dst;
    hdr[0] = t->id;
    hdr[1] = t->fn_id;
    hdr[2] = (uint64_t)t->ndeps;
    char *p = dst + 24;
    for (Py_ssize_t d = 0; d < t->ndeps; d++)
        p += blob_wire_write(p, t->deps[d]);
    blob_wire_write(p, t->args);
    ring_commit(r, EXEC_REC_TASK);
    wake_notify(&r->readable);
    t->next = NULL;
    if (s->tail)
        s->tail->next = t;
    else
        s->head = t;
    s->tail = t;
    s->count++;
    s->queued_ns += t->est_ns;
    return 0;
}

static void flush_queue(void)
{
    while (M.q_head) {
        mtask *t = M.q_head;
        mtask *next = t->next;
        if (dispatch(t) < 0)
            return;
        M.q_head = next;
        if (M.q_head == NULL)
            M.q_tail = NULL;
    }
}

/* Move a blob's inline pickle bytes into the arena, so that it crosses rings by reference.
 * 0, or -1 with an exception. */
static int blob_spill(exec_blob *b)
{
    arena *a = exec__arena;
    uint64_t blk;
    if (b->data_blk != EXEC_NO_BLOCK)
        return 0;
    if (a == NULL || arena_alloc(a, b->len, &blk) < 0) {
        PyErr_Format(PyExc_MemoryError, "pydron: shared arena full (%zu bytes requested)", b->len);
        return -1;
    }
    memcpy(arena_ptr(a, blk), b->data, b->len);
    if (b->arena == NULL)
        atomic_fetch_add(&live_arena_refs, 1);
    b->arena = a;
    b->data = arena_ptr(a, blk);
    b->data_blk = blk;
    return 0;
}

/* A TASK record must fit in a ring: while it does not, spill the largest inline blob of the
 * task to the arena. 0, or -1 with an exception. */
static int fit_task_record(const exec_task *et)
{
    uint32_t max = ring_max_payload(exec__to_worker(0));
    for (;;) {
        size_t n = 24 + blob_wire_size(et->args);
        exec_blob *largest = et->args->data_blk == EXEC_NO_BLOCK ? et->args : NULL;
        for (Py_ssize_t d = 0; d < et->ndeps; d++) {
            exec_blob *b = et->deps[d];
            n += blob_wire_size(b);
            if (b->data_blk == EXEC_NO_BLOCK && (largest == NULL || b->len > largest->len))
                largest = b;
        }
        if (n <= max)
            return 0;
        if (largest == NULL || largest->len < 64) {
            PyErr_Format(PyExc_ValueError, "pydron: task %llu has too many dependencies (%zd) to ship",
                         (unsigned long long)et->task_id, et->ndeps);
            return -1;
        }
        if (blob_spill(largest) < 0)
            return -1;
    }
}

int exec_submit(const exec_task *et)
{
    if (!M.running) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: the process executor is not running");
        return -1;
    }
    Py_ssize_t fn_id = fn_lookup(et->fn);
    if (fn_id < 0)
        return -1;
    int missing = et->args == NULL || (et->ndeps > 0 && et->deps == NULL);
    for (Py_ssize_t d = 0; !missing && d < et->ndeps; d++)
        missing = et->deps[d] == NULL;
    if (missing) {
        PyErr_Format(PyExc_SystemError, "pydron: exec_submit(task %llu): arguments or a dependency "
                     "is not a blob (encode thread results with exec_encode_value)",
                     (unsigned long long)et->task_id);
        return -1;
    }
    if (fit_task_record(et) < 0)
        return -1;
    mtask *t = malloc(sizeof(mtask) + et->ndeps * sizeof(exec_blob *));
    if (t == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->next = NULL;
    t->id = et->task_id;
    t->fn_id = (uint32_t)fn_id;
    t->kills = 0;
    t->fn = Py_NewRef(et->fn);
    t->error = NULL;
    t->args = et->args;
    exec_blob_incref(t->args);
    t->ndeps = et->ndeps;
    for (Py_ssize_t d = 0; d < et->ndeps; d++) {
        t->deps[d] = et->deps[d];
        exec_blob_incref(t->deps[d]);
    }
    M.outstanding++;
    start_workers();
    if (M.q_head == NULL && dispatch(t) == 0)
        return 0;
    if (M.q_tail)
        M.q_tail->next = t;
    else
        M.q_head = t;
    M.q_tail = t;
    flush_queue();
    return 0;
}

/* ------------------------------------------------------------------ results and deaths */

static PyObject *decode_error(exec_blob *b)
{
    PyObject *exc = exec_blob_decode(b);
    if (exc != NULL && PyExceptionInstance_Check(exc)) {
        PyObject *fixed = call_helper("restore_builtin_state", &exc, 1);
        if (fixed == NULL)
            PyErr_Clear();
        Py_XDECREF(fixed);
        return exc;
    }
    PyObject *err;
    if (exc) {
        Py_DECREF(exc);
        err = PyObject_CallOneArg(PyExc_TypeError,
                                  PyUnicode_FromString("not an exception"));
    } else {
        err = PyErr_GetRaisedException();
    }
    PyObject *r = err ? call_helper("undecodable_error", &err, 1) : NULL;
    Py_XDECREF(err);
    if (r == NULL) {
        PyErr_Clear();
        r = PyObject_CallOneArg(PyExc_RuntimeError,
                                PyUnicode_FromString("pydron: a task failed in a worker process"));
    }
    return r;
}

/* The slot (1-based) and run time of the result drain_slot is handing over, for timelines. */
static int drained_worker;
static uint64_t drained_elapsed_ns;
static double now_s(void);

/* Hand t's outcome over; consumes t and blob. <0 when on_result failed. */
static int deliver(mtask *t, int failed, exec_blob *blob, PyObject *object, exec_result_fn on_result,
                   void *ctx)
{
    exec_result r = {t->id, failed, blob, object};
    if (drained_worker) {
        /* The worker's run time; it finished about now (results are drained promptly). */
        r.worker = drained_worker;
        r.finished = now_s();
        r.started = r.finished - drained_elapsed_ns * 1e-9;
    }
    M.outstanding--;
    task_free(t);
    if (on_result == NULL) {
        exec_blob_decref(r.blob);
        Py_XDECREF(r.object);
        return 0;
    }
    return on_result(ctx, &r);
}

/* Read every record of worker i's result ring. Returns results handed over, or -1. */
static int drain_slot(int i, int discard, exec_result_fn on_result, void *ctx)
{
    mslot *s = &M.slots[i];
    ring *r = exec__to_master(i);
    int n = 0;
    uint32_t kind, len;
    char *p;
    while ((p = ring_peek(r, &kind, &len)) != NULL) {
        uint64_t task_id = ((uint64_t *)p)[0], elapsed_ns = ((uint64_t *)p)[1];
        size_t used;
        exec_blob *blob = blob_from_wire(p + 16, &used);
        ring_pop(r);
        if (blob == NULL)
            return -1;
        mtask *t = s->head;
        if (t == NULL || t->id != task_id || discard) {
            exec_blob_decref(blob);   /* a cancelled task's result */
            continue;
        }
        s->head = t->next;
        if (s->head == NULL)
            s->tail = NULL;
        s->count--;
        s->queued_ns = s->count ? s->queued_ns - t->est_ns : 0;
        s->idle_deaths = 0;
        if (kind == EXEC_REC_RESULT) {
            fn_entry *f = &M.fns[t->fn_id];
            f->est_ns = f->est_ns < 0 ? (double)elapsed_ns : 0.7 * f->est_ns + 0.3 * (double)elapsed_ns;
        }
        PyObject *exc = NULL;
        if (kind == EXEC_REC_ERROR) {
            exc = decode_error(blob);
            exec_blob_decref(blob);
            blob = NULL;
            if (exc == NULL)
                return -1;
        }
        n++;
        drained_worker = i + 1;
        drained_elapsed_ns = elapsed_ns;
        int rc = deliver(t, kind == EXEC_REC_ERROR, blob, exc, on_result, ctx);
        drained_worker = 0;
        if (rc < 0)
            return -1;
    }
    return n;
}

static const char *signal_name(int sig)
{
    switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGKILL: return "SIGKILL";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGPIPE: return "SIGPIPE";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
    case SIGXCPU: return "SIGXCPU";
    default: return NULL;
    }
}

static PyObject *describe_status(int status)
{
    if (WIFSIGNALED(status)) {
        const char *n = signal_name(WTERMSIG(status));
        return n ? PyUnicode_FromFormat("killed by %s", n)
                 : PyUnicode_FromFormat("killed by signal %d", WTERMSIG(status));
    }
    return PyUnicode_FromFormat("exit status %d", WIFEXITED(status) ? WEXITSTATUS(status) : status);
}

static PyObject *worker_lost_error(mtask *t, int status)
{
    PyObject *how = describe_status(status);
    PyObject *kills = PyLong_FromLong(t->kills);
    PyObject *data = PyBytes_FromStringAndSize(t->args->data, (Py_ssize_t)t->args->len);
    PyObject *bufs = blob_buffers(t->args);
    PyObject *exc = NULL;
    if (how && kills && data && bufs) {
        PyObject *a[5] = {t->fn, how, kills, data, bufs};
        exc = call_helper("worker_lost", a, 5);
    }
    Py_XDECREF(how);
    Py_XDECREF(kills);
    Py_XDECREF(data);
    Py_XDECREF(bufs);
    if (exc == NULL) {
        PyErr_Clear();
        exc = PyObject_CallOneArg(WorkerLostError,
                                  PyUnicode_FromString("pydron: a task killed its worker process"));
    }
    return exc;
}

static void requeue_front(mtask *head, mtask *tail)
{
    if (head == NULL)
        return;
    tail->next = M.q_head;
    M.q_head = head;
    if (M.q_tail == NULL)
        M.q_tail = tail;
}

/* Worker i died: keep what it finished, blame the task it was running, re-run the rest on a
 * replacement. Returns results handed over, or -1. */
static int handle_death(int i, exec_result_fn on_result, void *ctx)
{
    mslot *s = &M.slots[i];
    exec_slot *sh = &exec__shared->slots[i];
    int status = atomic_load(&sh->death_status);
    int n = drain_slot(i, s->killing, on_result, ctx);
    if (n < 0)
        return -1;
    uint64_t blamed = atomic_load(&sh->running_task);
    atomic_store(&sh->running_task, 0);
    for (int k = 0; k < EXEC_HELD_MAX; k++) {
        uint64_t h = atomic_exchange(&sh->held[k], 0);
        if (h)
            arena_decref(exec__arena, h - 1);   /* the dead worker's arrays */
    }
    ring_reset(exec__to_worker(i));
    ring_reset(exec__to_master(i));
    s->spawned = 0;
    if (s->defined)
        memset(s->defined, 0, s->defined_cap);
    mtask *keep_head = NULL, *keep_tail = NULL;
    for (mtask *t = s->head, *next; t; t = next) {
        next = t->next;
        t->next = NULL;
        if (!s->killing && t->id == blamed && blamed != 0) {
            if (++t->kills >= EXEC_MAX_KILLS) {
                t->error = worker_lost_error(t, status);
                if (M.failed_tail)
                    M.failed_tail->next = t;
                else
                    M.failed_head = t;
                M.failed_tail = t;
                continue;
            }
        }
        if (keep_tail)
            keep_tail->next = t;
        else
            keep_head = t;
        keep_tail = t;
    }
    if (blamed == 0 && !s->killing && ++s->idle_deaths > 20)
        s->disabled = 1;    /* dies without running anything: do not fork it forever */
    s->head = s->tail = NULL;
    s->count = 0;
    s->queued_ns = 0;
    s->killing = 0;
    requeue_front(keep_head, keep_tail);
    if (M.running)
        spawn_worker(i);
    return n;
}

static int handle_deaths(exec_result_fn on_result, void *ctx)
{
    uint32_t d = atomic_load(&exec__shared->deaths);
    if (d == M.seen_deaths)
        return 0;
    M.seen_deaths = d;
    int n = 0;
    for (int i = 0; i < M.nworkers; i++) {
        uint32_t sd = atomic_load(&exec__shared->slots[i].deaths);
        if (sd == M.slots[i].seen_deaths)
            continue;
        M.slots[i].seen_deaths = sd;
        int k = handle_death(i, on_result, ctx);
        if (k < 0)
            return -1;
        n += k;
    }
    /* Every worker disabled: nothing will ever run what is queued. */
    int alive = 0;
    for (int i = 0; i < M.nworkers; i++)
        alive += !M.slots[i].disabled;
    while (!alive && M.q_head) {
        mtask *t = M.q_head;
        M.q_head = t->next;
        if (M.q_head == NULL)
            M.q_tail = NULL;
        t->next = NULL;
        t->error = PyObject_CallOneArg(WorkerLostError, PyUnicode_FromString(
            "pydron: worker processes die as soon as they start; cannot run tasks"));
        if (M.failed_tail)
            M.failed_tail->next = t;
        else
            M.failed_head = t;
        M.failed_tail = t;
    }
    return n;
}

static int deliver_failed(exec_result_fn on_result, void *ctx)
{
    int n = 0;
    while (M.failed_head) {
        mtask *t = M.failed_head;
        M.failed_head = t->next;
        if (M.failed_head == NULL)
            M.failed_tail = NULL;
        PyObject *exc = t->error;
        t->error = NULL;
        n++;
        if (deliver(t, 1, NULL, exc, on_result, ctx) < 0)
            return -1;
    }
    return n;
}

/* One round of collecting: deaths, results, failures, the thread pool; then refill rings. */
static int collect(exec_result_fn on_result, void *ctx)
{
    int total = 0, n;
    if (M.running) {
        if ((n = handle_deaths(on_result, ctx)) < 0)
            return -1;
        total += n;
        for (int i = 0; i < M.nworkers; i++) {
            if ((n = drain_slot(i, M.slots[i].killing, on_result, ctx)) < 0)
                return -1;
            total += n;
        }
        if ((n = deliver_failed(on_result, ctx)) < 0)
            return -1;
        total += n;
        flush_queue();
    }
    if ((n = exec__threads_drain(on_result, ctx)) < 0)
        return -1;
    return total + n;
}

static int anything_ready(uint32_t notes)
{
    if (atomic_load(&notifications) != notes)
        return 1;
    if (!M.running)
        return 0;
    if (atomic_load(&exec__shared->deaths) != M.seen_deaths)
        return 1;
    for (int i = 0; i < M.nworkers; i++)
        if (!ring_empty(exec__to_master(i)))
            return 1;
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int forkserver_alive(void)
{
    int st;
    pid_t r = waitpid(M.fs_pid, &st, WNOHANG);
    return r == 0;
}

static void shutdown_internal(int with_python);

int exec_poll(double timeout_s, exec_result_fn on_result, void *ctx)
{
    double deadline = timeout_s > 0 ? now_s() + timeout_s : 0;
    for (;;) {
        uint32_t notes = atomic_load(&notifications);
        int n = collect(on_result, ctx);
        if (n != 0 || timeout_s == 0)
            return n;
        if (exec_outstanding() == 0)
            return 0;
        double left = timeout_s > 0 ? deadline - now_s() : 0.05;
        if (left <= 0)
            return 0;
        /* Spin a little: a result is often microseconds away. */
        int ready = 0;
        for (int k = 0; k < 200 && !(ready = anything_ready(notes)); k++)
            __builtin_ia32_pause();
        if (!ready) {
            wake_word *w = master_word();
            uint32_t seen = wake_prepare(w);
            if (anything_ready(notes)) {
                wake_cancel(w);
            } else {
                int64_t ns = (int64_t)((left < 0.05 ? left : 0.05) * 1e9);
                atomic_fetch_add(&sleepers, 1);
                Py_BEGIN_ALLOW_THREADS
                wake_wait(w, seen, ns);
                atomic_fetch_sub(&sleepers, 1);
                Py_END_ALLOW_THREADS
            }
        }
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (M.running && !anything_ready(notes) && !forkserver_alive()) {
            shutdown_internal(1);
            PyErr_SetString(PyExc_RuntimeError,
                            "pydron: the executor's fork server died; the process pool is gone");
            return -1;
        }
    }
}

void exec_cancel_all(void)
{
    exec__threads_cancel_all();
    if (!M.running)
        return;
    PyObject *pending_exc = PyErr_GetRaisedException();   /* e.g. the KeyboardInterrupt */
    free_task_list(M.q_head, 1);
    M.q_head = M.q_tail = NULL;
    free_task_list(M.failed_head, 1);
    M.failed_head = M.failed_tail = NULL;
    for (int i = 0; i < M.nworkers; i++) {
        mslot *s = &M.slots[i];
        drain_slot(i, 1, NULL, NULL);
        if (s->head == NULL)
            continue;
        /* Results of the worker's tasks can no longer be told apart from new ones: kill it. */
        exec_slot *sh = &exec__shared->slots[i];
        pid_t pid = 0;
        for (int k = 0; k < 2000 && s->spawned && (pid = atomic_load(&sh->pid)) == 0; k++)
            usleep(1000);
        if (pid > 0)
            kill(pid, SIGKILL);
        s->killing = 1;
        free_task_list(s->head, 1);
        s->head = s->tail = NULL;
        s->count = 0;
        s->queued_ns = 0;
    }
    PyErr_SetRaisedException(pending_exc);
}

/* ------------------------------------------------------------------ start and shutdown */

static size_t physical_memory(void)
{
    struct sysinfo si;
    if (sysinfo(&si) != 0)
        return (size_t)1 << 30;
    return (size_t)si.totalram * si.mem_unit;
}

static void atexit_shutdown(void) { shutdown_internal(0); }

/* In a child forked by user code (os.fork, multiprocessing), the pool is the parent's: forget it
 * without touching it (no QUIT, no kill, no unmap), so the child's exit cannot stop it and its
 * tasks cannot land in the parent's rings. The child may start a pool of its own. */
static void atfork_child(void)
{
    fork_generation++;
    if (exec__internal_fork || !M.running)
        return;
    if (M.fs_sock >= 0)
        close(M.fs_sock);
    M.running = 0;
    M.forgotten = 1;               /* the Python-side tables are reset by the next exec_start */
    M.q_head = M.q_tail = M.failed_head = M.failed_tail = NULL;
    memset(M.slots, 0, sizeof(M.slots));
    M.outstanding = 0;
    exec__shared = NULL;
    exec__arena = NULL;
}

int exec_start(int nworkers)
{
    if (exec__in_worker_flag)
        return 0;             /* a worker never runs a pool of its own: calls run plainly there */
    if (nworkers <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nworkers = n > 0 ? (int)n : 1;
    }
    if (nworkers > EXEC_MAX_WORKERS)
        nworkers = EXEC_MAX_WORKERS;
    if (M.running) {
        if (nworkers == M.nworkers)
            return 0;
        shutdown_internal(1);
    }
    if (master_codec == NULL && (master_codec = exec__codec_new()) == NULL)
        return -1;
    if (M.forgotten) {             /* function blobs may point into the parent's arena */
        M.nfns = 0;
        if (M.fn_ids)
            PyDict_Clear(M.fn_ids);
        M.forgotten = 0;
    }
    if (M.fn_ids == NULL && (M.fn_ids = PyDict_New()) == NULL)
        return -1;

    size_t head = (sizeof(exec_shared) + 4095) & ~(size_t)4095;
    size_t ctl_size = head + (size_t)nworkers * 2 * EXEC_RING_BYTES;
    void *ctl = mmap(NULL, ctl_size, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ctl == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    exec_shared *sh = ctl;
    sh->nslots = nworkers;
    for (int i = 0; i < nworkers; i++) {
        sh->slots[i].to_worker_off = head + (size_t)i * 2 * EXEC_RING_BYTES;
        sh->slots[i].to_master_off = sh->slots[i].to_worker_off + EXEC_RING_BYTES;
        ring_init((char *)ctl + sh->slots[i].to_worker_off, EXEC_RING_BYTES);
        ring_init((char *)ctl + sh->slots[i].to_master_off, EXEC_RING_BYTES);
    }

    size_t want = physical_memory();
    if (want > ((size_t)32 << 30))
        want = (size_t)32 << 30;
    void *mem = MAP_FAILED;
    for (; want >= ((size_t)64 << 20); want /= 2) {
        mem = mmap(NULL, want, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem != MAP_FAILED)
            break;
    }
    if (mem == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        munmap(ctl, ctl_size);
        return -1;
    }
    /* A crashing worker must not dump tens of GiB of shared memory into a core file. */
    madvise(ctl, ctl_size, MADV_DONTDUMP);
    madvise(mem, want, MADV_DONTDUMP);
    exec__shared = sh;
    exec__arena = arena_create(mem, want);
    M.ctl = ctl;
    M.ctl_size = ctl_size;
    M.arena_mem = mem;
    M.arena_size = want;
    M.nworkers = nworkers;
    M.seen_deaths = 0;
    M.workers_started = 0;
    M.outstanding = 0;
    memset(M.slots, 0, sizeof(M.slots));

    int sock;
    pid_t pid = exec__forkserver_start(&sock);
    if (pid < 0) {
        munmap(mem, want);
        munmap(ctl, ctl_size);
        exec__shared = NULL;
        exec__arena = NULL;
        return -1;
    }
    M.fs_pid = pid;
    M.fs_sock = sock;
    M.running = 1;
    static int atexit_registered;
    if (!atexit_registered) {
        Py_AtExit(atexit_shutdown);
        atexit_registered = 1;
    }
    return 0;
}

/* with_python: the interpreter is alive (and the GIL held), so Python references can be dropped;
 * at Py_AtExit time they are simply forgotten. */
static void shutdown_internal(int with_python)
{
    if (!M.running)
        return;
    M.running = 0;
    exec__forkserver_quit(M.fs_sock);
    close(M.fs_sock);
    int st;
    pid_t r = 0;
    for (int k = 0; k < 2000 && (r = waitpid(M.fs_pid, &st, WNOHANG)) == 0; k++)
        usleep(1000);
    if (r == 0) {
        for (int i = 0; i < M.nworkers; i++) {
            pid_t w = atomic_load(&exec__shared->slots[i].pid);
            if (w > 0)
                kill(w, SIGKILL);
        }
        kill(M.fs_pid, SIGKILL);
        waitpid(M.fs_pid, &st, 0);
    }
    free_task_list(M.q_head, with_python);
    free_task_list(M.failed_head, with_python);
    M.q_head = M.q_tail = M.failed_head = M.failed_tail = NULL;
    for (int i = 0; i < M.nworkers; i++) {
        free_task_list(M.slots[i].head, with_python);
        free(M.slots[i].defined);
    }
    memset(M.slots, 0, sizeof(M.slots));
    M.outstanding = 0;
    if (with_python)
        fn_table_clear();
    exec__shared = NULL;
    /* Wake sleepers (they see the pool gone); if one is still inside, leave the control region
     * mapped: it is anonymous memory, gone with the process, and a few pages at most. */
    wake_word *w = &((exec_shared *)M.ctl)->master;
    atomic_fetch_add(&w->seq, 1);
    syscall(SYS_futex, &w->seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    for (int k = 0; k < 100 && atomic_load(&sleepers) > 0; k++)
        usleep(1000);
    if (atomic_load(&sleepers) == 0)
        munmap(M.ctl, M.ctl_size);
    if (atomic_load(&live_arena_refs) == 0)
        munmap(M.arena_mem, M.arena_size);   /* else an array still views it: leave it mapped */
    exec__arena = NULL;
}

void exec_shutdown(void)
{
    shutdown_internal(Py_IsInitialized());
    if (Py_IsInitialized())
        exec__threads_shutdown();
}

/* ------------------------------------------------------------------ private test helpers */

/* A task submitted by _exec_submit; passing it as an argument to another _exec_submit makes it
 * a dependency whose result blob is forwarded as it is. */
typedef struct {
    PyObject_HEAD
    uint64_t id;
    int done, failed;
    exec_blob *blob;
    PyObject *error;
} HandleObject;

static void handle_dealloc(HandleObject *h)
{
    exec_blob_decref(h->blob);
    Py_XDECREF(h->error);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyObject *handle_get_done(HandleObject *h, void *c) { return PyBool_FromLong(h->done); }
static PyObject *handle_get_id(HandleObject *h, void *c) { return PyLong_FromUnsignedLongLong(h->id); }
static PyObject *handle_get_size(HandleObject *h, void *c)
{
    return PyLong_FromSize_t(h->blob ? exec_blob_size(h->blob) : 0);
}

static PyGetSetDef handle_getset[] = {
    {"done", (getter)handle_get_done, NULL, NULL, NULL},
    {"id", (getter)handle_get_id, NULL, NULL, NULL},
    {"blob_size", (getter)handle_get_size, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject Handle_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pydron._core._ExecHandle",
    .tp_basicsize = sizeof(HandleObject),
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_getset = handle_getset,
};

static PyObject *pending_handles;   /* dict id -> handle, until done */
static uint64_t next_test_id = 1ull << 62;

typedef struct {
    uint64_t base;
    Py_ssize_t n, done;
    PyObject *results;   /* list */
    char *failed;
} map_state;

static int test_on_result(void *ctx, exec_result *r)
{
    map_state *ms = ctx;
    PyObject *value = NULL;
    if (ms && r->task_id >= ms->base && r->task_id < ms->base + (uint64_t)ms->n) {
        Py_ssize_t i = (Py_ssize_t)(r->task_id - ms->base);
        if (r->failed) {
            value = r->object;
            ms->failed[i] = 1;
        } else {
            value = exec_blob_decode(r->blob);
            exec_blob_decref(r->blob);
            if (value == NULL) {
                value = PyErr_GetRaisedException();
                ms->failed[i] = 1;
            }
        }
        PyList_SET_ITEM(ms->results, i, value);   /* steals; slot held None (borrowed) */
        ms->done++;
        return 0;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(r->task_id);
    HandleObject *h = key ? (HandleObject *)PyDict_GetItemWithError(pending_handles, key) : NULL;
    if (h) {
        h->done = 1;
        h->failed = r->failed;
        h->blob = r->blob;
        h->error = r->object;
        PyDict_DelItem(pending_handles, key);
    } else {
        exec_blob_decref(r->blob);
        Py_XDECREF(r->object);
    }
    Py_XDECREF(key);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *core_exec_start(PyObject *m, PyObject *args)
{
    int n = 0;
    if (!PyArg_ParseTuple(args, "|i", &n) || exec_start(n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_exec_shutdown(PyObject *m, PyObject *unused)
{
    shutdown_internal(1);
    Py_RETURN_NONE;
}

static PyObject *core_exec_cancel_all(PyObject *m, PyObject *unused)
{
    exec_cancel_all();
    Py_RETURN_NONE;
}

static PyObject *core_exec_info(PyObject *m, PyObject *unused)
{
    PyObject *pids = PyList_New(0);
    for (int i = 0; pids && M.running && i < M.nworkers; i++) {
        PyObject *p = PyLong_FromLong(atomic_load(&exec__shared->slots[i].pid));
        if (p == NULL || PyList_Append(pids, p) < 0)
            Py_CLEAR(pids);
        Py_XDECREF(p);
    }
    if (pids == NULL)
        return NULL;
    arena_stats st = {0};
    if (exec__arena)
        arena_get_stats(exec__arena, &st);
    return Py_BuildValue("{s:i,s:i,s:i,s:N,s:n,s:K,s:K,s:K,s:K,s:n,s:n}",
                         "running", M.running, "nworkers", exec_nworkers(),
                         "forkserver", M.running ? (int)M.fs_pid : 0, "workers", pids,
                         "outstanding", exec_outstanding(),
                         "arena_pages", (unsigned long long)st.total_pages,
                         "arena_used_pages", (unsigned long long)st.used_pages,
                         "arena_free_dirty_pages", (unsigned long long)st.free_dirty_pages,
                         "arena_trims", (unsigned long long)st.trims,
                         "arena_live_refs", (Py_ssize_t)atomic_load(&live_arena_refs),
                         "functions", (Py_ssize_t)M.nfns);
}

/* Persistent ids for _exec_submit: handles met in the arguments become dependencies. */
typedef struct {
    PyObject *handles;   /* list, in dependency order */
} dep_ctx;

static Py_ssize_t test_dep(void *ctx, PyObject *obj)
{
    if (Py_TYPE(obj) != &Handle_Type)
        return -1;
    dep_ctx *d = ctx;
    Py_ssize_t n = PyList_GET_SIZE(d->handles);
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyList_GET_ITEM(d->handles, i) == obj)
            return i;
    return PyList_Append(d->handles, obj) < 0 ? -2 : n;
}

/* Poll until handle h is done (as the graph would: a task is submitted once its deps are). */
static int wait_handle(HandleObject *h)
{
    while (!h->done) {
        if (exec_poll(-1, test_on_result, NULL) < 0)
            return -1;
        if (!h->done && exec_outstanding() == 0) {
            PyErr_SetString(PyExc_RuntimeError, "pydron: handle will never complete");
            return -1;
        }
    }
    return 0;
}

/* _exec_submit(fn, args, kwargs=None) -> handle */
static PyObject *core_exec_submit(PyObject *m, PyObject *args)
{
    PyObject *fn, *targs, *kwargs = NULL;
    if (!PyArg_ParseTuple(args, "OO!|O", &fn, &PyTuple_Type, &targs, &kwargs))
        return NULL;
    if (kwargs == Py_None)
        kwargs = NULL;
    dep_ctx d = {PyList_New(0)};
    if (d.handles == NULL)
        return NULL;
    HandleObject *h = NULL;
    exec_blob **deps = NULL;
    exec_blob *blob = exec_encode_call(fn, targs, kwargs, test_dep, &d);
    if (blob == NULL)
        goto done;
    Py_ssize_t nd = PyList_GET_SIZE(d.handles);
    deps = malloc((nd + 1) * sizeof(exec_blob *));
    for (Py_ssize_t i = 0; i < nd; i++) {
        HandleObject *dh = (HandleObject *)PyList_GET_ITEM(d.handles, i);
        if (wait_handle(dh) < 0)
            goto done;
        if (dh->failed) {
            PyErr_SetString(PyExc_RuntimeError, "pydron test: a dependency failed");
            goto done;
        }
        deps[i] = dh->blob;
    }
    h = PyObject_New(HandleObject, &Handle_Type);
    if (h == NULL)
        goto done;
    h->id = next_test_id++;
    h->done = h->failed = 0;
    h->blob = NULL;
    h->error = NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(h->id);
    if (key == NULL || PyDict_SetItem(pending_handles, key, (PyObject *)h) < 0) {
        Py_XDECREF(key);
        Py_CLEAR(h);
        goto done;
    }
    exec_task t = {h->id, fn, blob, deps, nd};
    if (exec_submit(&t) < 0) {
        PyDict_DelItem(pending_handles, key);
        Py_CLEAR(h);
    }
    Py_DECREF(key);
done:
    free(deps);
    exec_blob_decref(blob);
    Py_DECREF(d.handles);
    return (PyObject *)h;
}

/* _exec_wait(handle) -> value (or raises the task's exception) */
static PyObject *core_exec_wait(PyObject *m, PyObject *arg)
{
    if (Py_TYPE(arg) != &Handle_Type) {
        PyErr_SetString(PyExc_TypeError, "_exec_wait expects a handle");
        return NULL;
    }
    HandleObject *h = (HandleObject *)arg;
    if (wait_handle(h) < 0)
        return NULL;
    if (h->failed) {
        PyErr_SetObject((PyObject *)Py_TYPE(h->error), h->error);
        return NULL;
    }
    return exec_blob_decode(h->blob);
}

/* _exec_map(fn, list_of_args_tuples, kwargs_list=None, return_exceptions=False) -> list:
 * submits every call, then polls until all are back. */
static PyObject *core_exec_map(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fn", "args_list", "kwargs_list", "return_exceptions", NULL};
    PyObject *fn, *arglist, *kwlist_obj = Py_None;
    int return_exceptions = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Op", kwlist, &fn, &arglist, &kwlist_obj,
                                     &return_exceptions))
        return NULL;
    PyObject *seq = PySequence_Fast(arglist, "args_list must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    map_state ms = {next_test_id, n, 0, PyList_New(n), calloc(n + 1, 1)};
    next_test_id += (uint64_t)n;
    PyObject *result = NULL;
    Py_ssize_t submitted = 0;
    if (ms.results == NULL || ms.failed == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(ms.results, i, Py_None);   /* borrowed placeholder, replaced below */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *a = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *k = kwlist_obj != Py_None ? PySequence_GetItem(kwlist_obj, i) : NULL;
        if (kwlist_obj != Py_None && k == NULL)
            goto done;
        if (!PyTuple_Check(a)) {
            Py_XDECREF(k);
            PyErr_SetString(PyExc_TypeError, "args_list items must be tuples");
            goto done;
        }
        exec_blob *b = exec_encode_call(fn, a, k == Py_None ? NULL : k, NULL, NULL);
        Py_XDECREF(k);
        if (b == NULL)
            goto done;
        exec_task t = {ms.base + (uint64_t)i, fn, b, NULL, 0};
        int rc = exec_submit(&t);
        exec_blob_decref(b);
        if (rc < 0)
            goto done;
        submitted++;
    }
    while (ms.done < n) {
        if (exec_poll(-1, test_on_result, &ms) < 0)
            goto done;
    }
    if (!return_exceptions) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (ms.failed[i]) {
                PyObject *e = PyList_GET_ITEM(ms.results, i);
                PyErr_SetObject((PyObject *)Py_TYPE(e), e);
                goto done;
            }
        }
    }
    result = Py_NewRef(ms.results);
done:
    if (result == NULL && submitted > ms.done) {
        PyObject *exc = PyErr_GetRaisedException();
        exec_cancel_all();
        PyErr_SetRaisedException(exc);
    }
    if (ms.results) {
        /* Slots never filled hold a borrowed None: make them owned before the list dies. */
        for (Py_ssize_t i = 0; i < n; i++)
            if (PyList_GET_ITEM(ms.results, i) == Py_None)
                Py_INCREF(Py_None);
        Py_DECREF(ms.results);
    }
    free(ms.failed);
    Py_DECREF(seq);
    return result;
}

static PyObject *core_exec_in_worker(PyObject *m, PyObject *unused)
{
    return PyBool_FromLong(exec_in_worker());
}

static PyMethodDef exec_test_methods[] = {
    {"_exec_in_worker", core_exec_in_worker, METH_NOARGS, "True in a pydron worker process."},
    {"_exec_start", core_exec_start, METH_VARARGS, "Start the process pool (n workers, 0: one per core)."},
    {"_exec_shutdown", core_exec_shutdown, METH_NOARGS, "Stop the process pool."},
    {"_exec_cancel_all", core_exec_cancel_all, METH_NOARGS, "Forget every queued and running task."},
    {"_exec_info", core_exec_info, METH_NOARGS, "Pool state: pids, arena accounting."},
    {"_exec_map", (PyCFunction)(void (*)(void))core_exec_map, METH_VARARGS | METH_KEYWORDS,
     "_exec_map(fn, args_list, kwargs_list=None, return_exceptions=False): run on workers."},
    {"_exec_submit", core_exec_submit, METH_VARARGS,
     "_exec_submit(fn, args, kwargs=None) -> handle; handles in args become dependencies."},
    {"_exec_wait", core_exec_wait, METH_O, "_exec_wait(handle) -> the task's value."},
    {NULL},
};

/* ------------------------------------------------------------------ module init */

int exec_module_init(PyObject *module)
{
    if (PyType_Ready(&ArenaBuffer_Type) < 0 || PyType_Ready(&Codec_Type) < 0 ||
        PyType_Ready(&Handle_Type) < 0)
        return -1;
    WorkerLostError = PyErr_NewExceptionWithDoc(
        "pydron.WorkerLostError",
        "A task killed the worker process running it (a crash, a signal, os._exit) every time it "
        "was tried; the message names the function, the signal and the argument shapes.",
        PyExc_RuntimeError, NULL);
    if (WorkerLostError == NULL || PyModule_AddObjectRef(module, "WorkerLostError", WorkerLostError) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "ArenaBuffer", (PyObject *)&ArenaBuffer_Type) < 0)
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
    pickle_Unpickler = PyObject_GetAttrString(pk, "Unpickler");
    pickle_Pickler = PyObject_GetAttrString(pk, "Pickler");
    io_BytesIO = PyObject_GetAttrString(io, "BytesIO");
    Py_DECREF(pk);
    Py_DECREF(io);
    str_buffers = PyUnicode_InternFromString("buffers");
    str_load_dep = PyUnicode_InternFromString("load_dep");
    str_load = PyUnicode_InternFromString("load");
    kw_buffers = str_buffers ? PyTuple_Pack(1, str_buffers) : NULL;
    static int atfork_registered;
    if (!atfork_registered && pthread_atfork(NULL, NULL, atfork_child) == 0)
        atfork_registered = 1;
    pending_handles = PyDict_New();
    if (!pickle_loads || !pickle_dumps || !pickle_Unpickler || !pickle_Pickler || !io_BytesIO || !kw_buffers ||
        !str_load_dep || !str_load || !pending_handles)
        return -1;

    helpers = PyDict_New();
    if (helpers == NULL || PyDict_SetItemString(helpers, "__builtins__", PyEval_GetBuiltins()) < 0 ||
        PyDict_SetItemString(helpers, "WorkerLostError", WorkerLostError) < 0)
        return -1;
    PyObject *r = PyRun_String(helpers_source, Py_file_input, helpers, helpers);
    if (r == NULL)
        return -1;
    Py_DECREF(r);

    for (PyMethodDef *d = exec_test_methods; d->ml_name; d++) {
        PyObject *f = PyCFunction_NewEx(d, NULL, NULL);
        if (f == NULL || PyModule_AddObject(module, d->ml_name, f) < 0) {
            Py_XDECREF(f);
            return -1;
        }
    }
    return exec__threads_module_init(module);
}
