/* graph/graph.h — the task graph, as trace/ sees it: the pending values handed to user code
 * (a task *is* its pending value: a graph_task stands in the user's locals and lists), their
 * data dependencies, dispatch of ready tasks to exec/, results coming back, the program order
 * that decides which failure plain Python would raise first, and what was recorded for the user
 * (visualize, timeline, progress). Everything here is called with the GIL held. */
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

/* ---- tasks (tasks.c) ------------------------------------------------------------------------- */

/* How a functional function's tasks run (from @pydron.functional's arguments). */
typedef struct {
    int threads;             /* on the thread pool of this process */
    double timeout_s;        /* stopped and failed with TimeoutError past this; 0: the default */
    size_t memory_limit;     /* bytes of worker memory; 0: none */
    int chunk;               /* args is one list of argument tuples: a map's chunk (bulk.c) */
} graph_task_options;

/* Record a call of functional fn(*args, **kwargs) as a task and dispatch it as soon as its
 * dependencies (tasks found inside args, lists, tuples, dicts) are done. Borrows everything;
 * a new reference to the task, or NULL + exception. */
PyObject *graph_submit(PyObject *fn, PyObject *args, PyObject *kwargs,
                       const graph_task_options *options);
/* fn(*args) for every args tuple in calls (a list), as a few chunk tasks that each run a loop in
 * a worker, sized from fn's measured run time: a pending list of the results, in order, whose
 * failure is that of the earliest failing call. With flat, calls holds the single argument of
 * each call instead of a tuple (no tuple per call to make, send and free).
 * Borrows; new reference or NULL + exception. */
PyObject *graph_submit_map(PyObject *fn, PyObject *calls, int flat,
                           const graph_task_options *options);
/* Wait for a task and return its value (new reference), or raise the exception plain Python
 * would have raised first: the earliest failure among the tasks submitted before it. */
PyObject *graph_wait(graph_task *t);
int graph_task_finished(graph_task *t);
/* Take in finished tasks without waiting (cheap when nothing is in flight). 0, or -1 + exc. */
int graph_pump(void);
/* Ctrl-C in this thread: cancel the unfinished tasks of its scheduled call (they fail with
 * KeyboardInterrupt if forced later); other threads' calls go on. */
void graph_cancel_mine(void);
/* The tasks submitted from mark on are not wanted any more (a replay gave up, a speculation went
 * the wrong way): the unfinished ones are dropped without killing anything (they are side-effect
 * free) and all of them leave the program order, so their failures are never raised. */
void graph_cancel_since(Py_ssize_t mark);
/* The parts of graph_cancel_since, for a speculation that may reuse some of the tasks: take the
 * tasks from mark on out of the program order (a new list); put one back at the end of the order
 * (1; 0 when it cannot be reused: it failed, or it is in the order; -1 + exception); drop the
 * unfinished ones of a list softly. */
PyObject *graph_detach_since(Py_ssize_t mark);
int graph_order_readd(PyObject *task);
void graph_forget_tasks(PyObject *tasks);

/* ---- program order, try regions, the undo log (order.c) ------------------------------------- */

/* The position in this thread's submission order (a mark). */
Py_ssize_t graph_mark(void);
int graph_force_since(Py_ssize_t mark);     /* tasks from mark on; an earlier failure first */
int graph_force_before(Py_ssize_t mark);    /* tasks before mark; 0, or -1 + the failure */
/* Index of the task whose failure exc is, or -1 (exc was not raised by a task). */
Py_ssize_t graph_raised_by(PyObject *exc);
/* The call site a task was submitted from (an id of trace/sites.c; 0: unknown): set at its
 * submission; read back for the task whose failure exc is (0 if none). */
void graph_task_set_site(PyObject *task, uint32_t site);
uint32_t graph_failed_site(PyObject *exc);
/* A top-level scheduled call that began at mark has ended: forget its part of the order. */
void graph_order_truncate(Py_ssize_t mark);
/* A pending value was moved into an exact list or dict (list.append, d[k] = v, ...): the
 * container is logged, to be forced when the call ends and undone when a handler is entered
 * for calls plain Python never completed. 0, or -1 + exception. */
int graph_note_move(PyObject *container);             /* the log takes its own reference */
Py_ssize_t graph_moves_mark(void);
Py_ssize_t graph_moves_count(void);
PyObject *graph_moved_container(Py_ssize_t i);       /* borrowed */
void graph_moves_truncate(Py_ssize_t mark);

/* ---- what the user sees (observe.c) ----------------------------------------------------------- */

/* A top-level scheduled call of the function named name (borrowed, may be NULL) starts / ends
 * (progress reports, wait reports). */
void graph_session_enter(PyObject *name);
void graph_session_exit(void);
/* Waits between begin and end are one wait for the report (forcing a list of results waits for
 * each, but it is one read at one line). Nest freely. */
void graph_wait_group_begin(void);
void graph_wait_group_end(void);
/* A replayed call runs no frame: it says which line of which file it is at (borrowed, kept
 * alive by the caller until cleared with NULL), for the wait report and the timeline; get
 * returns the current one (to restore it after a nested replay). */
void graph_set_location(PyObject *filename, int line);
void graph_get_location(PyObject **filename, int *line);
/* Counters for tests and tools: submitted, finished, in flight, live pending values, engine
 * nodes and bytes. New reference. */
PyObject *graph_stats(void);

/* ---- keys (keys.c) ---------------------------------------------------------------------------- */

/* XXH3 64-bit key of a byte string. */
uint64_t graph_key(const void *data, size_t len, uint64_t seed);

int graph_module_init(PyObject *module);

#endif
