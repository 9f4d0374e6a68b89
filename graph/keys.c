/* graph/keys.c — keys of byte strings with XXH3 (64 bit): the function ids of the cache and the
 * keys of traced graphs are built from them. xxHash is compiled in (XXH_INLINE_ALL).
 * Thread and GIL model: pure functions; the Python entry holds the GIL like any other. */
#include "graph/internal.h"

#include <xxhash.h>

uint64_t
graph_key(const void *data, size_t len, uint64_t seed)
{
    return XXH3_64bits_withSeed(data, len, seed);
}

/* _xxh3(data, seed=0) -> int: the key of a bytes-like object. */
static PyObject *
core_xxh3(PyObject *module, PyObject *args)
{
    Py_buffer view;
    unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "y*|K:_xxh3", &view, &seed))
        return NULL;
    uint64_t key = graph_key(view.buf, (size_t)view.len, seed);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(key);
}

static PyMethodDef keys_methods[] = {
    {"_xxh3", core_xxh3, METH_VARARGS, "_xxh3(data, seed=0): XXH3 64-bit key of data."},
    {NULL},
};

int
graph__keys_init(PyObject *module)
{
    return PyModule_AddFunctions(module, keys_methods);
}
