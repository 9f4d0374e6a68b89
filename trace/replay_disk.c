/* trace/replay_disk.c — a graph read from the disk cache (pydron/_graph_cache.py) in C, at the
 * first call of a scheduled function in a process; and the cache key of a code object, which the
 * Python side uses too (one rule, one place). A first call runs with cold caches (after the
 * program's start-up or a pause), where the same load in Python cost ~0.4-0.5 ms of the call
 * against ~0.1 ms warm: interpreting key(), pathlib, the checks, the unpickler's set-up. Here it is
 * a hash of the code object's fields, openat/fstat/read/close in the graphs directory (kept open),
 * the header's hash and a decoder of the few pickle opcodes a graph's data is written with (none
 * names a global or calls anything: a payload with any other opcode is _DataOnly's).
 *
 * Only the ordinary case is taken here: a file that is missing (nothing), or present, this user's,
 * not writable by others, of this format, whole (its hash checks out) and holding a graph's data.
 * Anything else, and a cache that is off or not yet checked, goes to the Python loader, which
 * refuses, logs and counts as it always did (what is trusted is said there, once).
 *
 * Thread and GIL model: GIL held throughout (the files are small: a read is a few µs); the
 * settings are set by pydron/_graph_cache.py, GIL held. */
#include "trace/replay_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

/* What _graph_cache.directory() found, given by _disk_cache_use: <cache>/graphs, open (a file is
 * opened relative to it: one name to resolve), -1 while the cache is off or not yet checked (then
 * the Python loader runs). */
static int graphs_fd = -1;
static PyObject *header_prefix;    /* b"pydron-graph <FORMAT> " */
static PyObject *key_prefix;       /* what every key hashes first: magic, format, versions */
static PyObject *unpickler_cls;    /* _graph_cache._DataOnly: makes data and nothing else */
static PyObject *bytes_io;         /* io.BytesIO */
static PyObject *str_load;         /* "load" */

#define MAX_CODE_DEPTH 100        /* nested code objects deeper than this have no key */

/* ---- the key of a code object ---------------------------------------------------------------- */

static void
hash_field(XXH3_state_t *s, const void *data, size_t len)
{
    uint64_t n = (uint64_t)len;
    XXH3_64bits_update(s, &n, sizeof n);
    XXH3_64bits_update(s, data, len);
}

/* A str as its UTF-8 bytes (lone surrogates, as in an undecodable file name, passed through).
 * 0, or -1 + exception. */
static int
hash_str(XXH3_state_t *s, PyObject *u)
{
    if (!PyUnicode_Check(u)) {
        PyErr_SetString(PyExc_TypeError, "pydron: a code object's name is not a str");
        return -1;
    }
    Py_ssize_t n;
    const char *c = PyUnicode_AsUTF8AndSize(u, &n);
    if (c != NULL) {
        hash_field(s, c, (size_t)n);
        return 0;
    }
    PyErr_Clear();
    PyObject *b = PyUnicode_AsEncodedString(u, "utf-8", "surrogatepass");
    if (b == NULL)
        return -1;
    hash_field(s, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    return 0;
}

/* Steals names (a tuple of str, or NULL + exception). 0, or -1 + exception. */
static int
hash_names(XXH3_state_t *s, PyObject *names)
{
    if (names == NULL)
        return -1;
    uint64_t n = (uint64_t)PyTuple_GET_SIZE(names);
    XXH3_64bits_update(s, &n, sizeof n);
    int rc = 0;
    for (Py_ssize_t k = 0; rc == 0 && k < PyTuple_GET_SIZE(names); k++)
        rc = hash_str(s, PyTuple_GET_ITEM(names, k));
    Py_DECREF(names);
    return rc;
}

/* What identifies a code object across processes: file, qualified name, first line, bytecode,
 * constants (nested code objects by their own fields, the others by repr), names, variable
 * names, free variables, line table. Every field is length-prefixed. 0, or -1 + exception. */
static int
hash_code(XXH3_state_t *s, PyCodeObject *co, int depth)
{
    if (depth > MAX_CODE_DEPTH) {
        PyErr_SetString(PyExc_RecursionError, "pydron: code objects nested too deeply for a key");
        return -1;
    }
    int64_t first = co->co_firstlineno;
    if (hash_str(s, co->co_filename) < 0 || hash_str(s, co->co_qualname) < 0)
        return -1;
    hash_field(s, &first, sizeof first);
    PyObject *bytecode = PyCode_GetCode(co);
    if (bytecode == NULL)
        return -1;
    hash_field(s, PyBytes_AS_STRING(bytecode), (size_t)PyBytes_GET_SIZE(bytecode));
    Py_DECREF(bytecode);
    uint64_t nconsts = (uint64_t)PyTuple_GET_SIZE(co->co_consts);
    XXH3_64bits_update(s, &nconsts, sizeof nconsts);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(co->co_consts); k++) {
        PyObject *c = PyTuple_GET_ITEM(co->co_consts, k);
        if (PyCode_Check(c)) {
            XXH3_64bits_update(s, "c", 1);
            if (hash_code(s, (PyCodeObject *)c, depth + 1) < 0)
                return -1;
            continue;
        }
        PyObject *r = PyObject_Repr(c);
        XXH3_64bits_update(s, "r", 1);
        int rc = r ? hash_str(s, r) : -1;
        Py_XDECREF(r);
        if (rc < 0)
            return -1;
    }
    if (hash_names(s, Py_NewRef(co->co_names)) < 0 ||
        hash_names(s, PyCode_GetVarnames(co)) < 0 || hash_names(s, PyCode_GetFreevars(co)) < 0)
        return -1;
    PyObject *lines = co->co_linetable;
    hash_field(s, PyBytes_AS_STRING(lines), (size_t)PyBytes_GET_SIZE(lines));
    return 0;
}

/* The key of code's graph, after prefix (bytes). 0 with *key, or -1 + exception. */
static int
graph_code_key(PyObject *code, PyObject *prefix, uint64_t *key)
{
    XXH3_state_t s;
    XXH3_64bits_reset(&s);
    hash_field(&s, PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix));
    if (hash_code(&s, (PyCodeObject *)code, 0) < 0)
        return -1;
    *key = XXH3_64bits_digest(&s);
    return 0;
}

/* ---- reading a file ---------------------------------------------------------------------------- */

/* The whole of the file at path (in the graphs directory) if it is a regular file of this user's that others may not
 * write: 1 (*data, *len: PyMem memory the caller frees), 0 missing, 2 anything else (the Python
 * loader says what). */
static int
read_trusted(const char *path, char **data, size_t *len)
{
    int fd = openat(graphs_fd, path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : 2;
    struct stat st;
    int rc = 2;
    char *buf = NULL;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_uid != getuid() ||
        (st.st_mode & 022) || st.st_size <= 0 || st.st_size > (1 << 26))
        goto done;
    /* One byte more than fstat said: a file that grew since is the Python loader's. */
    size_t want = (size_t)st.st_size + 1, got = 0;
    buf = PyMem_Malloc(want);
    if (buf == NULL)
        goto done;
    /* Files are replaced whole (renamed into place), never written in place: once st_size
     * bytes are in, the file is read. */
    while (got < want - 1) {
        ssize_t n = read(fd, buf + got, want - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (got != want - 1)
        goto done;
    *data = buf;
    *len = got;
    buf = NULL;
    rc = 1;
done:
    PyMem_Free(buf);
    close(fd);
    return rc;
}

/* The payload after the header line if the header names this format and holds the payload's
 * hash; NULL if not. */
static const char *
checked_payload(const char *data, size_t len, size_t *plen)
{
    size_t np = (size_t)PyBytes_GET_SIZE(header_prefix);
    if (len < np + 17 || memcmp(data, PyBytes_AS_STRING(header_prefix), np) != 0 ||
        data[np + 16] != '\n')
        return NULL;
    const char *payload = data + np + 17;
    *plen = len - (np + 17);
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx",
             (unsigned long long)XXH3_64bits(payload, *plen));
    return memcmp(hex, data + np, 16) == 0 ? payload : NULL;
}

/* What a graph's constants may be (as _graph_cache._is_constant): exact built-in data types,
 * tuples and frozensets of them. */
static int
is_constant(PyObject *v, int depth)
{
    if (depth > MAX_CODE_DEPTH)
        return 0;
    if (PyTuple_CheckExact(v)) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(v); k++)
            if (!is_constant(PyTuple_GET_ITEM(v, k), depth + 1))
                return 0;
        return 1;
    }
    if (PyFrozenSet_CheckExact(v)) {
        PyObject *it = PyObject_GetIter(v), *item;
        int ok = it != NULL;
        while (ok && (item = PyIter_Next(it)) != NULL) {
            ok = is_constant(item, depth + 1);
            Py_DECREF(item);
        }
        Py_XDECREF(it);
        PyErr_Clear();
        return ok;
    }
    return v == Py_None || v == Py_Ellipsis || PyBool_Check(v) || PyLong_CheckExact(v) ||
           PyFloat_CheckExact(v) || PyComplex_CheckExact(v) || PyBytes_CheckExact(v) ||
           PyUnicode_CheckExact(v);
}

/* ---- decoding a payload -------------------------------------------------------------------- */

/* The pickle opcodes that pickle.dumps(program, protocol=5) writes for a graph's data (None,
 * bools, ints, floats, str, bytes, tuples, frozensets). A payload with any other (a complex or
 * Ellipsis constant, a large int, anything a graph file does not hold) is _DataOnly's: nothing
 * here can name a global or call anything. */
enum {
    OP_PROTO = 0x80, OP_FRAME = 0x95, OP_STOP = '.', OP_NONE = 'N', OP_TRUE = 0x88,
    OP_FALSE = 0x89, OP_BININT1 = 'K', OP_BININT2 = 'M', OP_BININT = 'J', OP_LONG1 = 0x8a,
    OP_BINFLOAT = 'G', OP_SHORT_BINUNICODE = 0x8c, OP_BINUNICODE = 'X', OP_BINUNICODE8 = 0x8d,
    OP_SHORT_BINBYTES = 'C', OP_BINBYTES = 'B', OP_BINBYTES8 = 0x8e, OP_EMPTY_TUPLE = ')',
    OP_TUPLE1 = 0x85, OP_TUPLE2 = 0x86, OP_TUPLE3 = 0x87, OP_MARK = '(', OP_TUPLE = 't',
    OP_FROZENSET = 0x91, OP_MEMOIZE = 0x94, OP_BINGET = 'h', OP_LONG_BINGET = 'j',
};

#define MAX_MARKS 64

typedef struct {
    const unsigned char *at, *end;
    const unsigned char *frame_end;   /* the current frame's end, or NULL outside frames */
    PyObject *stack, *memo;       /* lists */
    Py_ssize_t marks[MAX_MARKS];
    int nmarks;
} pickle_reader;

/* n little-endian bytes at the cursor (n <= 8), moved past: 0, or -1 at the end. */
static int
read_le(pickle_reader *r, int n, uint64_t *v)
{
    if (r->end - r->at < n)
        return -1;
    *v = 0;
    for (int k = n - 1; k >= 0; k--)
        *v = (*v << 8) | r->at[k];
    r->at += n;
    return 0;
}

/* The items above the last mark, popped, as a tuple (new reference) or NULL. */
static PyObject *
pop_to_mark(pickle_reader *r)
{
    if (r->nmarks == 0)
        return NULL;
    Py_ssize_t from = r->marks[--r->nmarks], top = PyList_GET_SIZE(r->stack);
    PyObject *items = PyList_GetSlice(r->stack, from, top);
    PyObject *t = items ? PyList_AsTuple(items) : NULL;
    Py_XDECREF(items);
    if (t != NULL && PyList_SetSlice(r->stack, from, top, NULL) < 0)
        Py_CLEAR(t);
    return t;
}

/* The last n items, popped, as a tuple (new reference) or NULL. */
static PyObject *
pop_tuple(pickle_reader *r, Py_ssize_t n)
{
    Py_ssize_t top = PyList_GET_SIZE(r->stack);
    if (top - n < (r->nmarks ? r->marks[r->nmarks - 1] : 0))
        return NULL;
    PyObject *items = PyList_GetSlice(r->stack, top - n, top);
    PyObject *t = items ? PyList_AsTuple(items) : NULL;
    Py_XDECREF(items);
    if (t != NULL && PyList_SetSlice(r->stack, top - n, top, NULL) < 0)
        Py_CLEAR(t);
    return t;
}

/* One opcode: 1 pushed or done, 0 STOP, -1 not ours (an exception may be set: cleared). */
static int
pickle_step(pickle_reader *r)
{
    if (r->at >= r->end)
        return -1;
    int op = *r->at++;
    uint64_t n = 0;
    PyObject *v = NULL;
    switch (op) {
    case OP_PROTO: return read_le(r, 1, &n) < 0 || n > 5 ? -1 : 1;
    case OP_FRAME:      /* a new frame, where the last one ended, within what is left */
        if (r->frame_end != NULL || read_le(r, 8, &n) < 0 || n > (uint64_t)(r->end - r->at))
            return -1;
        r->frame_end = r->at + n;
        return 1;
    case OP_STOP: return 0;
    case OP_MARK:
        if (r->nmarks == MAX_MARKS)
            return -1;
        r->marks[r->nmarks++] = PyList_GET_SIZE(r->stack);
        return 1;
    case OP_MEMOIZE: {
        Py_ssize_t top = PyList_GET_SIZE(r->stack);
        return top > 0 && PyList_Append(r->memo, PyList_GET_ITEM(r->stack, top - 1)) == 0 ? 1
                                                                                         : -1;
    }
    case OP_BINGET: case OP_LONG_BINGET:
        if (read_le(r, op == OP_BINGET ? 1 : 4, &n) < 0 || n >= (uint64_t)PyList_GET_SIZE(r->memo))
            return -1;
        v = Py_NewRef(PyList_GET_ITEM(r->memo, (Py_ssize_t)n));
        break;
    case OP_NONE: v = Py_NewRef(Py_None); break;
    case OP_TRUE: v = Py_NewRef(Py_True); break;
    case OP_FALSE: v = Py_NewRef(Py_False); break;
    case OP_BININT1: case OP_BININT2:
        if (read_le(r, op == OP_BININT1 ? 1 : 2, &n) < 0)
            return -1;
        v = PyLong_FromUnsignedLongLong(n);
        break;
    case OP_BININT:
        if (read_le(r, 4, &n) < 0)
            return -1;
        v = PyLong_FromLong((long)(int32_t)(uint32_t)n);
        break;
    case OP_LONG1: {
        uint64_t len;
        if (read_le(r, 1, &len) < 0 || len > 8 || read_le(r, (int)len, &n) < 0)
            return -1;
        if (len > 0 && len < 8 && (n >> (8 * len - 1)) & 1)
            n |= ~(uint64_t)0 << (8 * len);       /* sign-extend */
        v = PyLong_FromLongLong(len ? (long long)n : 0);
        break;
    }
    case OP_BINFLOAT:
        if (r->end - r->at < 8)
            return -1;
        v = PyFloat_FromDouble(PyFloat_Unpack8((const char *)r->at, 0));
        r->at += 8;
        break;
    case OP_SHORT_BINUNICODE: case OP_BINUNICODE: case OP_BINUNICODE8:
    case OP_SHORT_BINBYTES: case OP_BINBYTES: case OP_BINBYTES8: {
        int w = op == OP_SHORT_BINUNICODE || op == OP_SHORT_BINBYTES ? 1
                : op == OP_BINUNICODE || op == OP_BINBYTES ? 4 : 8;
        if (read_le(r, w, &n) < 0 || n > (uint64_t)(r->end - r->at))
            return -1;
        v = op == OP_SHORT_BINBYTES || op == OP_BINBYTES || op == OP_BINBYTES8
            ? PyBytes_FromStringAndSize((const char *)r->at, (Py_ssize_t)n)
            : PyUnicode_DecodeUTF8((const char *)r->at, (Py_ssize_t)n, "surrogatepass");
        r->at += n;
        break;
    }
    case OP_EMPTY_TUPLE: v = PyTuple_New(0); break;
    case OP_TUPLE1: case OP_TUPLE2: case OP_TUPLE3:
        v = pop_tuple(r, op - OP_TUPLE1 + 1);
        break;
    case OP_TUPLE: v = pop_to_mark(r); break;
    case OP_FROZENSET: {
        PyObject *t = pop_to_mark(r);
        v = t ? PyFrozenSet_New(t) : NULL;
        Py_XDECREF(t);
        break;
    }
    default: return -1;
    }
    if (v == NULL)
        return -1;
    int rc = PyList_Append(r->stack, v);
    Py_DECREF(v);
    return rc == 0 ? 1 : -1;
}

/* The value a payload of the opcodes above holds (new reference), or NULL without exception when
 * the payload has any other (or is malformed): _DataOnly decides then. */
static PyObject *
pickle_decode(const char *payload, size_t plen)
{
    pickle_reader r = {(const unsigned char *)payload, (const unsigned char *)payload + plen,
                       NULL, PyList_New(0), PyList_New(0), {0}, 0};
    PyObject *v = NULL;
    int rc = r.stack && r.memo ? 1 : -1;
    while (rc == 1) {
        /* As pickle reads frames: no opcode straddles a frame's end. */
        if (r.frame_end != NULL && r.at == r.frame_end)
            r.frame_end = NULL;
        rc = pickle_step(&r);
        if (r.frame_end != NULL && r.at > r.frame_end)
            rc = -1;
    }
    if (rc == 0 && r.at == r.end && r.nmarks == 0 && PyList_GET_SIZE(r.stack) == 1)
        v = Py_NewRef(PyList_GET_ITEM(r.stack, 0));
    Py_XDECREF(r.stack);
    Py_XDECREF(r.memo);
    if (v == NULL && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;          /* an interrupt: the caller raises it */
        PyErr_Clear();
    }
    return v;
}

/* The program tuple (or refusal str) a payload holds: decoded above, else unpickled by
 * _DataOnly; a new reference; NULL without exception when it is not a graph's data (the
 * Python loader says why); NULL + exception for an interrupt. */
static PyObject *
unpickle_program(const char *payload, size_t plen)
{
    PyObject *v = pickle_decode(payload, plen);
    if (v == NULL && PyErr_Occurred())
        return NULL;
    if (v == NULL) {
        PyObject *bytes = PyBytes_FromStringAndSize(payload, (Py_ssize_t)plen);
        PyObject *stream = bytes ? PyObject_CallOneArg(bytes_io, bytes) : NULL;
        PyObject *u = stream ? PyObject_CallOneArg(unpickler_cls, stream) : NULL;
        v = u ? PyObject_CallMethodNoArgs(u, str_load) : NULL;
        Py_XDECREF(u);
        Py_XDECREF(stream);
        Py_XDECREF(bytes);
    }
    if (v == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
        return NULL;
    }
    if (PyUnicode_CheckExact(v))
        return v;
    if (PyTuple_CheckExact(v) && PyTuple_GET_SIZE(v) == 9 &&
        PyTuple_CheckExact(PyTuple_GET_ITEM(v, 4)) && is_constant(PyTuple_GET_ITEM(v, 4), 0))
        return v;
    Py_DECREF(v);
    return NULL;
}

/* _graph_decode_payload(payload) -> the value, or None when the payload holds opcodes the C
 * decoder leaves to _DataOnly (tests compare the two). */
static PyObject *
core_graph_decode_payload(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "pydron: _graph_decode_payload expects bytes");
        return NULL;
    }
    PyObject *v = pickle_decode(PyBytes_AS_STRING(arg), (size_t)PyBytes_GET_SIZE(arg));
    if (v == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return v;
}

int
replay__disk_load(PyObject *fn, PyObject **out)
{
    *out = NULL;
    if (graphs_fd < 0)
        return 2;
    uint64_t key;
    if (graph_code_key(PyFunction_GET_CODE(fn), key_prefix, &key) < 0)
        return -1;
    char path[32];
    snprintf(path, sizeof path, "%016llx.graph", (unsigned long long)key);
    char *data;
    size_t len, plen;
    int rc = read_trusted(path, &data, &len);
    if (rc != 1)
        return rc;
    const char *payload = checked_payload(data, len, &plen);
    PyObject *v = payload ? unpickle_program(payload, plen) : NULL;
    PyMem_Free(data);
    if (v == NULL)
        return PyErr_Occurred() ? -1 : 2;
    *out = v;
    return 1;
}

/* ---- the module's functions ------------------------------------------------------------------- */

/* _graph_key(code, prefix) -> str: the hex key of code's graph in the disk cache. */
static PyObject *
core_graph_key(PyObject *module, PyObject *args)
{
    PyObject *code, *prefix;
    if (!PyArg_ParseTuple(args, "O!S:_graph_key", &PyCode_Type, &code, &prefix))
        return NULL;
    uint64_t key;
    if (graph_code_key(code, prefix, &key) < 0)
        return NULL;
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)key);
    return PyUnicode_FromString(hex);
}

/* _disk_cache_use(graphs, header, prefix, unpickler, bytes_io): the directory found usable (a
 * path), or None (off, or not yet checked: the Python loader runs). */
static PyObject *
core_disk_cache_use(PyObject *module, PyObject *args)
{
    PyObject *dir, *header = NULL, *prefix = NULL, *unpickler = NULL, *bio = NULL;
    if (!PyArg_ParseTuple(args, "O|SSOO:_disk_cache_use", &dir, &header, &prefix, &unpickler,
                          &bio))
        return NULL;
    if (graphs_fd >= 0) {
        close(graphs_fd);
        graphs_fd = -1;
    }
    if (dir == Py_None)
        Py_RETURN_NONE;
    if (header == NULL || prefix == NULL || unpickler == NULL || bio == NULL) {
        PyErr_SetString(PyExc_TypeError, "pydron: _disk_cache_use needs the header, the key "
                                         "prefix, the unpickler and BytesIO with a directory");
        return NULL;
    }
    PyObject *path = NULL;
    if (!PyUnicode_FSConverter(dir, &path))
        return NULL;
    if (str_load == NULL && (str_load = PyUnicode_InternFromString("load")) == NULL) {
        Py_DECREF(path);
        return NULL;
    }
    /* Not there, or not a directory: the Python loader says so. */
    graphs_fd = open(PyBytes_AS_STRING(path), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    Py_DECREF(path);
    Py_XSETREF(header_prefix, Py_NewRef(header));
    Py_XSETREF(key_prefix, Py_NewRef(prefix));
    Py_XSETREF(unpickler_cls, Py_NewRef(unpickler));
    Py_XSETREF(bytes_io, Py_NewRef(bio));
    Py_RETURN_NONE;
}

static PyMethodDef disk_methods[] = {
    {"_graph_decode_payload", core_graph_decode_payload, METH_O,
     "_graph_decode_payload(payload): a graph file's payload decoded in C, or None."},
    {"_graph_key", core_graph_key, METH_VARARGS,
     "_graph_key(code, prefix): the disk cache's key of code's graph (hex)."},
    {"_disk_cache_use", core_disk_cache_use, METH_VARARGS,
     "_disk_cache_use(graphs, header=, prefix=, unpickler=, bytes_io=): where the C loader "
     "reads graphs (None: the Python loader runs)."},
    {NULL},
};

int
replay__disk_init(PyObject *module)
{
    return PyModule_AddFunctions(module, disk_methods);
}
