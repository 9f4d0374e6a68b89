/* exec/internal.h — shared by the files of exec/ only (the process pool, the thread pool, the ring
 * and arena). Nothing outside exec/ includes it. */
#ifndef PYDRON_EXEC_INTERNAL_H
#define PYDRON_EXEC_INTERNAL_H

#include "exec/exec.h"

/* Thread pool (exec/threads.c): completions are kept in a queue until exec_poll drains them. */
int exec__threads_drain(exec_result_fn on_result, void *ctx);   /* number handed over or -1 */
Py_ssize_t exec__threads_outstanding(void);
void exec__threads_shutdown(void);
/* Adds the thread pool's private test helpers (_threads_map, _threads_stats, ...) to the module;
 * called from exec_module_init. 0, or -1 with an exception. */
int exec__threads_module_init(PyObject *m);
/* Wake a master sleeping in exec_poll (called by the thread pool after queueing a completion). */
void exec__notify_master(void);

#endif
