/* remote/internal.h — shared by the files of remote/ only; nothing outside remote/ includes it.
 * Names exported between remote's files are remote__*; everything else in a file is static. */
#ifndef PYDRON_REMOTE_INTERNAL_H
#define PYDRON_REMOTE_INTERNAL_H

#include "remote/remote.h"
#include "exec/exec.h"
#include "pydron_compat.h"

/* ---- the adapter (backend.c) ------------------------------------------------------------------
 * The attached Python adapter, the Dask client side. What C calls on it (all with the GIL):
 *   submit(task_id, fn, args_hold, deps, timeout_s)  deps: tuple, each a remote reference the
 *                adapter made earlier or a BlobHold. None, or False when the cluster is gone
 *                (remote/ then detaches the adapter and runs the task locally)
 *   collect() -> list of (task_id, kind, payload, worker, started, finished)
 *                kind REMOTE_DONE: payload is the adapter's reference to a result on the cluster
 *                kind REMOTE_VALUE: payload is the value itself (encoded here into a blob)
 *                kind REMOTE_FAILED: payload is the exception to raise
 *   flush()      send what submit queued now (the master is about to wait)
 *   check() -> bool   False: the cluster is gone; every outstanding task has been queued as
 *                     failed, and remote/ detaches the adapter
 *   cancel(ids) -> int   forget these tasks; how many of them were the adapter's
 *   fetch(ref) -> value
 *   close()      interpreter exit
 * and reads its attribute `slots`: the cluster's worker threads (an int), what a map's chunks
 * are spread over. */
enum { REMOTE_DONE = 0, REMOTE_VALUE = 1, REMOTE_FAILED = 2 };

/* Attach adapter (borrowed; a reference is taken) as the EXEC_REMOTE executor. 0, or -1 + exc. */
int remote__attach(PyObject *adapter);
/* Hand over what the adapter has queued, then detach it: tasks go to the local pool again.
 * 0, or -1 + exception (it is detached all the same). */
int remote__detach(void);
/* Something finished on the cluster (any thread, GIL held or not): wake the master. */
void remote__signal(void);
/* {"attached": bool, "outstanding": n}: new reference, NULL + exception. */
PyObject *remote__stats(void);

/* ---- BlobHold (hold.c) ------------------------------------------------------------------------
 * An encoded value (exec_blob) seen from Python, lent while the object lives: the arena blocks it
 * refers to stay as they were when the task was submitted (exec_blob_lend), however long the
 * adapter takes to ship them. New reference, NULL + exception. */
PyObject *remote__hold_new(exec_blob *b);
int remote__hold_init(PyObject *module);

#endif
