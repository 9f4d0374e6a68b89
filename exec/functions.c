/* exec/functions.c — the functions the process pool ships to its workers: each gets an id and
 * its pickled definition (by reference when workers can import it, else by value through
 * cloudpickle, which makes exactly that choice), sent to a worker once before its first task
 * there, and a moving average of its run time, which decides how many of its tasks a worker is
 * given at once.
 * Thread and GIL model: master only, GIL held. */
#include "exec/internal.h"

/* Weight of the newest run time in the moving average (the rest stays with the history). */
#define ESTIMATE_NEW_WEIGHT 0.3

typedef struct {
    PyObject *fn;              /* strong */
    exec_blob *blob;           /* the pickled definition */
    double est_ns;             /* moving average of its run time on workers; < 0: not known */
} fn_entry;

static struct {
    PyObject *ids;             /* dict fn -> index into entries (hashable functions) */
    fn_entry *entries;
    uint32_t count, cap;
    PyObject *last_fn;         /* borrowed: entries[last_id].fn holds it */
    uint32_t last_id;
} F;

static Py_ssize_t lookup_or_add(PyObject *fn);

Py_ssize_t
exec__fn_id(PyObject *fn)
{
    /* Tasks come in runs of one function: the last one answers without a dict lookup. */
    if (F.last_fn == fn && F.last_id < F.count && F.entries[F.last_id].fn == fn)
        return F.last_id;
    if (F.ids == NULL && (F.ids = PyDict_New()) == NULL)
        return -1;
    Py_ssize_t id = lookup_or_add(fn);
    if (id >= 0) {
        F.last_fn = fn;
        F.last_id = (uint32_t)id;
    }
    return id;
}

static Py_ssize_t
lookup_or_add(PyObject *fn)
{
    PyObject *idobj = PyDict_GetItemWithError(F.ids, fn);
    if (idobj)
        return PyLong_AsSsize_t(idobj);
    int hashable = !PyErr_Occurred();
    PyErr_Clear();
    PyObject *data = exec__call_helper("pickle_function", &fn, 1);
    if (data == NULL) {
        PyObject *err = PyErr_GetRaisedException();
        PyObject *a[2] = {fn, err};
        exec__raise_from_helper("bad_function", a, 2);
        Py_DECREF(err);
        return -1;
    }
    exec_blob *b = exec__blob_new(PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data), NULL, 0);
    Py_DECREF(data);
    if (b == NULL)
        return -1;
    if (F.count == F.cap) {
        uint32_t cap = F.cap ? F.cap * 2 : 64;
        fn_entry *e = PyMem_RawRealloc(F.entries, cap * sizeof(fn_entry));
        if (e == NULL) {
            exec_blob_decref(b);
            PyErr_NoMemory();
            return -1;
        }
        F.entries = e;
        F.cap = cap;
    }
    Py_ssize_t id = F.count++;
    F.entries[id].fn = Py_NewRef(fn);
    F.entries[id].blob = b;
    F.entries[id].est_ns = -1;
    if (hashable) {
        PyObject *v = PyLong_FromSsize_t(id);
        if (v == NULL || PyDict_SetItem(F.ids, fn, v) < 0) {
            Py_XDECREF(v);
            return -1;
        }
        Py_DECREF(v);
    }
    return id;
}

exec_blob *
exec__fn_blob(uint32_t fn_id)
{
    return F.entries[fn_id].blob;
}

PyObject *
exec__fn_object(uint32_t fn_id)
{
    return F.entries[fn_id].fn;
}

double
exec_estimate_ns(PyObject *fn)
{
    if (F.ids == NULL)
        return -1;
    PyObject *idobj = PyDict_GetItemWithError(F.ids, fn);
    if (idobj == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t id = PyLong_AsSsize_t(idobj);
    return id >= 0 && (uint32_t)id < F.count ? F.entries[id].est_ns : -1;
}

double
exec__fn_estimate(uint32_t fn_id)
{
    return F.entries[fn_id].est_ns;
}

void
exec__fn_observe(uint32_t fn_id, uint64_t elapsed_ns)
{
    fn_entry *f = &F.entries[fn_id];
    f->est_ns = f->est_ns < 0 ? (double)elapsed_ns
                              : (1 - ESTIMATE_NEW_WEIGHT) * f->est_ns +
                                    ESTIMATE_NEW_WEIGHT * (double)elapsed_ns;
}

Py_ssize_t
exec__fn_count(void)
{
    return F.count;
}

void
exec__fn_table_clear(int with_python)
{
    for (uint32_t i = 0; with_python && i < F.count; i++) {
        Py_DECREF(F.entries[i].fn);
        exec_blob_decref(F.entries[i].blob);
    }
    F.count = 0;
    F.last_fn = NULL;
    if (with_python && F.ids)
        PyDict_Clear(F.ids);
    else
        F.ids = NULL;       /* a forked child: the parent's dict is not ours to touch */
}
