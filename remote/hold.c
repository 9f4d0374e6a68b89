/* remote/hold.c — BlobHold: a task's encoded arguments (or an encoded dependency) as the adapter
 * sees them. The blob is lent while the object lives, so the arena blocks its buffers view keep
 * the bytes they had at the call even when the caller writes to its arrays afterwards (those
 * writes go to private copies): the adapter may ship them later, from another thread, and may
 * keep a large one as a constant it scattered once, recognised by its address.
 * Thread and GIL model: GIL held (the adapter's Dask thread drops holds too, with the GIL). */
#include "remote/internal.h"

typedef struct {
    PyObject_HEAD
    exec_blob *blob;         /* NULL once released */
} BlobHold;

static PyTypeObject BlobHold_Type;

PyObject *
remote__hold_new(exec_blob *b)
{
    BlobHold *self = PyObject_New(BlobHold, &BlobHold_Type);
    if (self == NULL)
        return NULL;
    exec_blob_incref(b);
    exec_blob_lend(b);
    self->blob = b;
    return (PyObject *)self;
}

static void
hold_release_blob(BlobHold *self)
{
    exec_blob *b = self->blob;
    if (b == NULL)
        return;
    self->blob = NULL;
    exec_blob_unlend(b);
    exec_blob_decref(b);
}

static void
hold_dealloc(BlobHold *self)
{
    hold_release_blob(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Borrowed blob of a live hold, or NULL + ValueError. */
static exec_blob *
hold_blob(BlobHold *self)
{
    if (self->blob == NULL)
        PyErr_SetString(PyExc_ValueError, "pydron: this BlobHold was released");
    return self->blob;
}

/* export() -> (pickle bytes, tuple of buffers, tuple of (address, length) of each buffer).
 * The addresses name an arena block's bytes for as long as this hold lives. New reference. */
static PyObject *
hold_export(BlobHold *self, PyObject *unused)
{
    exec_blob *b = hold_blob(self);
    PyObject *pair = b ? exec_blob_export(b) : NULL, *where = NULL, *r = NULL;
    if (pair == NULL)
        return NULL;
    PyObject *bufs = PyTuple_GET_ITEM(pair, 1);
    where = PyTuple_New(PyTuple_GET_SIZE(bufs));
    for (Py_ssize_t i = 0; where != NULL && i < PyTuple_GET_SIZE(bufs); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(bufs, i), &view, PyBUF_SIMPLE) < 0)
            goto done;
        PyObject *item = Py_BuildValue("(Kn)", (unsigned long long)(uintptr_t)view.buf,
                                       view.len);
        PyBuffer_Release(&view);
        if (item == NULL)
            goto done;
        PyTuple_SET_ITEM(where, i, item);
    }
    if (where != NULL)
        r = Py_BuildValue("(OOO)", PyTuple_GET_ITEM(pair, 0), bufs, where);
done:
    Py_DECREF(pair);
    Py_XDECREF(where);
    return r;
}

/* release(): unlend and drop the blob now rather than when the object goes. */
static PyObject *
hold_release(BlobHold *self, PyObject *unused)
{
    hold_release_blob(self);
    Py_RETURN_NONE;
}

/* nbytes: pickle bytes plus buffers (new reference). */
static PyObject *
hold_nbytes(BlobHold *self, void *closure)
{
    exec_blob *b = hold_blob(self);
    return b ? PyLong_FromSize_t(exec_blob_size(b)) : NULL;
}

static PyMethodDef hold_methods[] = {
    {"export", (PyCFunction)hold_export, METH_NOARGS,
     "export() -> (bytes, buffers, ((address, length), ...)): the encoded value."},
    {"release", (PyCFunction)hold_release, METH_NOARGS, "Let the encoded value go now."},
    {NULL},
};

static PyGetSetDef hold_getset[] = {
    {"nbytes", (getter)hold_nbytes, NULL, "Bytes of the encoded value (pickle + buffers).", NULL},
    {NULL},
};

static PyTypeObject BlobHold_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pydron._core.BlobHold",
    .tp_basicsize = sizeof(BlobHold),
    .tp_dealloc = (destructor)hold_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = hold_methods,
    .tp_getset = hold_getset,
    .tp_doc = "An encoded task argument or dependency, kept as it was at the call while held.",
};

int
remote__hold_init(PyObject *module)
{
    if (PyType_Ready(&BlobHold_Type) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "BlobHold", (PyObject *)&BlobHold_Type);
}
