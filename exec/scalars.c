/* exec/scalars.c — the common case of a task's arguments and results, pickled and unpickled in C:
 * calls whose arguments are ints, floats, bools, None, short strs and bytes (and tuples of
 * them), and results that are one such value. One list of such values may appear per pickle
 * (a map's chunk of argument tuples, the results a chunk sends back): with one list there is no
 * second reference to it whose sharing the pickle would have to keep. The bytes written are ordinary pickle protocol 5
 * (any unpickler reads them); writing them here skips the pickler object, its memo and two
 * Python-level calls per task, and reading a scalar result back skips pickle.loads. Anything
 * else goes to the general codec (codec.c).
 * Thread and GIL model: GIL held (it reads Python objects). */
#include "exec/internal.h"

#include <string.h>

/* Pickle opcodes (Lib/pickle.py). */
enum {
    OP_PROTO = 0x80, OP_STOP = '.', OP_NONE = 'N', OP_NEWTRUE = 0x88, OP_NEWFALSE = 0x89,
    OP_BININT = 'J', OP_BININT1 = 'K', OP_BININT2 = 'M', OP_LONG1 = 0x8a,
    OP_BINFLOAT = 'G', OP_SHORT_BINUNICODE = 0x8c, OP_BINUNICODE = 'X',
    OP_SHORT_BINBYTES = 'C', OP_BINBYTES = 'B',
    OP_EMPTY_TUPLE = ')', OP_TUPLE1 = 0x85, OP_TUPLE2 = 0x86, OP_TUPLE3 = 0x87, OP_MARK = '(',
    OP_TUPLE = 't', OP_EMPTY_LIST = ']', OP_APPENDS = 'e',
};

/* Strings and bytes longer than this take the general codec (out-of-band buffers, arena). */
#define SCALAR_TEXT_MAX 4096
/* Tuples nested this deep, or this long, take the general codec. */
#define SCALAR_DEPTH_MAX 2
#define SCALAR_TUPLE_MAX 64
/* A list takes this many items at most (a map's chunk holds up to 4096 calls); pickle's own
 * writer appends in batches of 1000, and so does this one. */
#define SCALAR_LIST_MAX 8192
#define SCALAR_APPENDS_BATCH 1000

typedef struct {
    char *buf;
    size_t len, cap;
    int lists;                  /* lists written into this pickle so far (at most one) */
} out;

static int
put(out *o, const void *data, size_t n)
{
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 256;
        while (cap < o->len + n)
            cap *= 2;
        char *b = PyMem_RawRealloc(o->buf, cap);
        if (b == NULL)
            return -1;
        o->buf = b;
        o->cap = cap;
    }
    memcpy(o->buf + o->len, data, n);
    o->len += n;
    return 0;
}

static int
put1(out *o, unsigned char op)
{
    return put(o, &op, 1);
}

static void
le32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* 1: written; 0: not a value this encoder writes (nothing meaningful was written); -1: memory. */
static int
put_value(out *o, PyObject *v, int depth)
{
    unsigned char b[16];
    if (v == Py_None)
        return put1(o, OP_NONE) < 0 ? -1 : 1;
    if (v == Py_True || v == Py_False)
        return put1(o, v == Py_True ? OP_NEWTRUE : OP_NEWFALSE) < 0 ? -1 : 1;
    if (PyLong_CheckExact(v)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow)
            return 0;
        if (x >= 0 && x < 256) {
            b[0] = OP_BININT1;
            b[1] = (unsigned char)x;
            return put(o, b, 2) < 0 ? -1 : 1;
        }
        if (x >= 0 && x < 65536) {
            b[0] = OP_BININT2;
            b[1] = (unsigned char)x;
            b[2] = (unsigned char)(x >> 8);
            return put(o, b, 3) < 0 ? -1 : 1;
        }
        if (x >= INT32_MIN && x <= INT32_MAX) {
            b[0] = OP_BININT;
            le32(b + 1, (uint32_t)(int32_t)x);
            return put(o, b, 5) < 0 ? -1 : 1;
        }
        /* LONG1: the shortest two's complement little-endian form. */
        unsigned long long u = (unsigned long long)x;
        int n = 8;
        while (n > 1) {
            unsigned char top = (unsigned char)(u >> (8 * (n - 1)));
            unsigned char next = (unsigned char)(u >> (8 * (n - 2)));
            if ((top == 0x00 && !(next & 0x80)) || (top == 0xff && (next & 0x80)))
                n--;
            else
                break;
        }
        b[0] = OP_LONG1;
        b[1] = (unsigned char)n;
        for (int i = 0; i < n; i++)
            b[2 + i] = (unsigned char)(u >> (8 * i));
        return put(o, b, 2 + (size_t)n) < 0 ? -1 : 1;
    }
    if (PyFloat_CheckExact(v)) {
        b[0] = OP_BINFLOAT;
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(v), (char *)b + 1, 0) < 0)
            return -1;
        return put(o, b, 9) < 0 ? -1 : 1;
    }
    if (PyUnicode_CheckExact(v)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL) {
            PyErr_Clear();            /* lone surrogates: pickle escapes them; let it */
            return 0;
        }
        if (n > SCALAR_TEXT_MAX)
            return 0;
        if (n < 256) {
            b[0] = OP_SHORT_BINUNICODE;
            b[1] = (unsigned char)n;
            return put(o, b, 2) < 0 || put(o, s, (size_t)n) < 0 ? -1 : 1;
        }
        b[0] = OP_BINUNICODE;
        le32(b + 1, (uint32_t)n);
        return put(o, b, 5) < 0 || put(o, s, (size_t)n) < 0 ? -1 : 1;
    }
    if (PyBytes_CheckExact(v)) {
        Py_ssize_t n = PyBytes_GET_SIZE(v);
        if (n > SCALAR_TEXT_MAX)
            return 0;
        if (n < 256) {
            b[0] = OP_SHORT_BINBYTES;
            b[1] = (unsigned char)n;
        }
        else {
            b[0] = OP_BINBYTES;
            le32(b + 1, (uint32_t)n);
        }
        return put(o, b, n < 256 ? 2 : 5) < 0 || put(o, PyBytes_AS_STRING(v), (size_t)n) < 0
                   ? -1 : 1;
    }
    if (PyList_CheckExact(v) && o->lists == 0 && PyList_GET_SIZE(v) <= SCALAR_LIST_MAX) {
        /* Only its items' reads run here (no Python code), so the list cannot change size
         * while it is written; its items may be scalars and tuples, not lists. */
        o->lists = 1;
        Py_ssize_t n = PyList_GET_SIZE(v);
        if (put1(o, OP_EMPTY_LIST) < 0)
            return -1;
        for (Py_ssize_t start = 0; start < n; start += SCALAR_APPENDS_BATCH) {
            Py_ssize_t end = n - start > SCALAR_APPENDS_BATCH ? start + SCALAR_APPENDS_BATCH : n;
            if (put1(o, OP_MARK) < 0)
                return -1;
            for (Py_ssize_t k = start; k < end; k++) {
                int rc = put_value(o, PyList_GET_ITEM(v, k), depth < 0 ? 0 : depth);
                if (rc <= 0)
                    return rc;
            }
            if (put1(o, OP_APPENDS) < 0)
                return -1;
        }
        return 1;
    }
    if (PyTuple_CheckExact(v) && depth < SCALAR_DEPTH_MAX &&
        PyTuple_GET_SIZE(v) <= SCALAR_TUPLE_MAX) {
        Py_ssize_t n = PyTuple_GET_SIZE(v);
        if (n > 3 && put1(o, OP_MARK) < 0)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            int rc = put_value(o, PyTuple_GET_ITEM(v, i), depth + 1);
            if (rc <= 0)
                return rc;
        }
        static const unsigned char small[4] = {OP_EMPTY_TUPLE, OP_TUPLE1, OP_TUPLE2, OP_TUPLE3};
        return put1(o, n <= 3 ? small[n] : OP_TUPLE) < 0 ? -1 : 1;
    }
    return 0;
}

static out scratch;

/* The pickle of a task's call, (args, None), when args are only such values (see
 * exec__scalars_dump). */
int
exec__scalars_dump_call(PyObject *args, const char **data, size_t *len)
{
    scratch.len = 0;
    scratch.lists = 0;
    unsigned char proto[2] = {OP_PROTO, 5};
    if (put(&scratch, proto, 2) < 0)
        goto nomem;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n > SCALAR_TUPLE_MAX)
        return 0;
    if (n > 3 && put1(&scratch, OP_MARK) < 0)
        goto nomem;
    for (Py_ssize_t i = 0; i < n; i++) {
        int rc = put_value(&scratch, PyTuple_GET_ITEM(args, i), 1);
        if (rc < 0)
            goto nomem;
        if (rc == 0)
            return 0;
    }
    static const unsigned char small[4] = {OP_EMPTY_TUPLE, OP_TUPLE1, OP_TUPLE2, OP_TUPLE3};
    unsigned char tail[3] = {n <= 3 ? small[n] : OP_TUPLE, OP_NONE, OP_TUPLE2};
    if (put(&scratch, tail, 3) < 0 || put1(&scratch, OP_STOP) < 0)
        goto nomem;
    *data = scratch.buf;
    *len = scratch.len;
    return 1;
nomem:
    PyErr_NoMemory();
    return -1;
}

/* Pickle bytes of obj (a task's (args, None) pair, or a result) when obj is made only of the
 * values above: 1 with *data and *len (valid until the next call), 0 when the general codec must do
 * it, -1 + MemoryError. */
int
exec__scalars_dump(PyObject *obj, const char **data, size_t *len)
{
    scratch.len = 0;
    scratch.lists = 0;
    unsigned char proto[2] = {OP_PROTO, 5};
    if (put(&scratch, proto, 2) < 0)
        goto nomem;
    int rc = put_value(&scratch, obj, -1);
    if (rc < 0)
        goto nomem;
    if (rc == 0)
        return 0;
    if (put1(&scratch, OP_STOP) < 0)
        goto nomem;
    *data = scratch.buf;
    *len = scratch.len;
    return 1;
nomem:
    PyErr_NoMemory();
    return -1;
}

/* The value of a pickle holding one scalar exactly as exec__scalars_dump writes it (a result);
 * new reference. NULL without an exception when it is anything else (use pickle.loads). */
PyObject *
exec__scalars_load(const char *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;
    if (len < 4 || p[0] != OP_PROTO || p[len - 1] != OP_STOP)
        return NULL;
    const unsigned char *v = p + 2, *end = p + len - 1;
    size_t n = (size_t)(end - v);
    switch (v[0]) {
    case OP_NONE:
        return n == 1 ? Py_NewRef(Py_None) : NULL;
    case OP_NEWTRUE:
        return n == 1 ? Py_NewRef(Py_True) : NULL;
    case OP_NEWFALSE:
        return n == 1 ? Py_NewRef(Py_False) : NULL;
    case OP_BININT1:
        return n == 2 ? PyLong_FromLong(v[1]) : NULL;
    case OP_BININT2:
        return n == 3 ? PyLong_FromLong(v[1] | (v[2] << 8)) : NULL;
    case OP_BININT:
        if (n != 5)
            return NULL;
        return PyLong_FromLong((int32_t)((uint32_t)v[1] | ((uint32_t)v[2] << 8) |
                                         ((uint32_t)v[3] << 16) | ((uint32_t)v[4] << 24)));
    case OP_BINFLOAT: {
        if (n != 9)
            return NULL;
        double d = PyFloat_Unpack8((const char *)v + 1, 0);
        if (d == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return NULL;
        }
        return PyFloat_FromDouble(d);
    }
    case OP_SHORT_BINUNICODE: {
        if (n < 2 || n != 2u + v[1])
            return NULL;
        PyObject *s = PyUnicode_DecodeUTF8((const char *)v + 2, v[1], "surrogatepass");
        if (s == NULL)
            PyErr_Clear();
        return s;
    }
    default:
        return NULL;              /* longer forms: pickle.loads knows them all */
    }
}
