/* graph/graph.h — the task graph: the pending results that trace/ hands out, their data
 * dependencies, dispatch of ready tasks to exec/, and routing of results back.
 * A task *is* its pending value: a graph_task object stands in the user's locals and lists. */
#ifndef PYDRON_GRAPH_H
#define PYDRON_GRAPH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct graph_task graph_task;

extern PyTypeObject *graph_task_type;
#define graph_is_task(o) (Py_TYPE(o) == graph_task_type)

/* Live task objects in this process: when 0, no container can hold one, so deep forcing can
 * skip walking containers altogether. */
extern Py_ssize_t graph_live_tasks;

/* Record a call of functional fn(*args, **kwargs) as a task and dispatch it as soon as its
 * dependencies (tasks found inside args, lists, tuples, dicts) are done. `threads` runs it on
 * the in-process thread pool. Returns a new reference to the task, or NULL + exception. */
PyObject *graph_submit(PyObject *fn, PyObject *args, PyObject *kwargs, int threads);

/* Wait for a task and return its value (new reference), or raise the exception plain Python
 * would have raised first: the earliest failure among the tasks submitted before it. */
PyObject *graph_wait(graph_task *t);

/* The submission order of this thread's tasks (a mark is a position in it). A failure is raised
 * once by the range waits below; forcing its task's value raises it again. 0 or -1. */
Py_ssize_t graph_mark(void);
int graph_force_since(Py_ssize_t mark);     /* tasks from mark on; an earlier failure first */
int graph_force_before(Py_ssize_t mark);    /* tasks before mark */
/* At the entry of the handler of a try/with region entered at mark, reached with exc: the
 * exception the handler must see (the region's first failure, new reference), cancelling the
 * tasks plain Python never completed (*cut <= index < *horizon); NULL + exception if exc
 * belongs to an earlier task. */
PyObject *graph_enter_handler(PyObject *exc, Py_ssize_t mark, Py_ssize_t *cut,
                              Py_ssize_t *horizon);
/* At a handler's entry, for an enclosing region entered at mark: re-raise exc if it is the
 * failure of a task submitted before mark (it belongs to an outer try), else force_before. */
int graph_handler_guard(PyObject *exc, Py_ssize_t mark);
/* Whether a handler was entered before plain Python would have finished this call. */
int graph_task_undone(graph_task *t);
/* Local `name` held `old` before this task's result was stored into it (for undo). 0 or -1. */
int graph_task_log_store(graph_task *t, PyObject *name, PyObject *old);
/* What log_store recorded for name (borrowed), or NULL. */
PyObject *graph_task_prev(graph_task *t, PyObject *name);
/* Position of a task in the submission order, -1 once its top-level call has ended. */
Py_ssize_t graph_task_seq(graph_task *t);
/* Index of the task whose failure exc is, or -1. */
Py_ssize_t graph_raised_by(PyObject *exc);
/* A top-level scheduled call that began at mark has ended: forget its part of the order. */
void graph_order_truncate(Py_ssize_t mark);
int graph_task_finished(graph_task *t);

/* Take in finished tasks without waiting (cheap when nothing finished). 0 or -1. */
int graph_pump(void);
/* Cancel every outstanding task (Ctrl-C): they fail with KeyboardInterrupt if forced later. */
void graph_cancel_all(void);

/* A top-level scheduled call starts / ends (for progress reports of long calls). */
void graph_session_enter(void);
void graph_session_exit(void);

/* Statistics for tests and tools: submitted, finished, outstanding counts. */
PyObject *graph_stats(void);

/* XXH3 key of a byte string (cache keys, function ids). */
uint64_t graph_key(const void *data, size_t len, uint64_t seed);

int graph_module_init(PyObject *module);

#endif
