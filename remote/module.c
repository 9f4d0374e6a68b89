/* remote/module.c — what pydron._core offers the cluster adapter (pydron/_cluster.py): attach and
 * detach it as the EXEC_REMOTE executor, the wake-up it calls from Dask's threads when something
 * finished, counters for tests and `pydron info`, and the BlobHold type. */
#include "remote/internal.h"

static PyObject *
remote_attach(PyObject *module, PyObject *adapter)
{
    if (remote__attach(adapter) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
remote_detach(PyObject *module, PyObject *unused)
{
    if (remote__detach() < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
remote_notify(PyObject *module, PyObject *unused)
{
    remote__signal();
    Py_RETURN_NONE;
}

static PyObject *
remote_stats(PyObject *module, PyObject *unused)
{
    return remote__stats();
}

static PyMethodDef remote_methods[] = {
    {"_remote_attach", remote_attach, METH_O,
     "_remote_attach(adapter): run non-thread tasks on the cluster behind adapter."},
    {"_remote_detach", remote_detach, METH_NOARGS,
     "Take what the adapter finished, then run tasks locally again."},
    {"_remote_notify", remote_notify, METH_NOARGS,
     "Something finished on the cluster: wake the thread waiting for tasks (any thread)."},
    {"_remote_stats", remote_stats, METH_NOARGS, "{'attached': bool, 'outstanding': n}."},
    {NULL},
};

int
remote_module_init(PyObject *module)
{
    if (PyModule_AddFunctions(module, remote_methods) < 0)
        return -1;
    return remote__hold_init(module);
}
