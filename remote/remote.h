/* remote/remote.h — the cluster backend: an executor (exec.h's exec_backend, kind EXEC_REMOTE)
 * whose tasks run on a Dask distributed cluster. The C side here is thin on purpose: it carries
 * tasks from exec/ to a Python adapter object (pydron/_cluster.py, the Dask client side) and the
 * adapter's completions back into exec's queue. Nothing in C calls remote/ but the module
 * initialisation; Python attaches an adapter with pydron._core._remote_attach(adapter). */
#ifndef PYDRON_REMOTE_H
#define PYDRON_REMOTE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Add remote's functions (_remote_attach, _remote_detach, _remote_notify, _remote_stats) and
 * the BlobHold type to the extension module. 0, or -1 + exception. */
int remote_module_init(PyObject *module);

#endif
