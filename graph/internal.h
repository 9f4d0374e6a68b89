/* graph/internal.h — shared by the files of graph/ only: the task object, the engine instance,
 * and what the files call of each other (graph__* names). */
#ifndef PYDRON_GRAPH_INTERNAL_H
#define PYDRON_GRAPH_INTERNAL_H

#include "graph/graph.h"
#include "graph/engine.h"
#include "exec/exec.h"
#include "pydron_clock.h"
#include "pydron_compat.h"

/* A task's life, as graph sees it (a copy of the engine's state kept in the object, so the hot
 * checks need no table lookup). */
enum task_state {
    TASK_WAITING,    /* dependencies outstanding: not yet handed to exec */
    TASK_QUEUED,     /* handed to exec, result not back */
    TASK_DONE,
    TASK_FAILED,
};

/* What only some tasks need (thread arguments, dependencies, try-region records, timelines),
 * allocated on first use: a million tiny independent tasks never pay for it. */
typedef struct {
    PyObject *call;           /* thread tasks: (args tuple, kwargs dict or None), until dispatched */
    PyObject *deps;           /* tuple of tasks (persistent id i = deps[i]), until dispatched */
    PyObject *prev;           /* {local name: value it held before this result was stored} */
    double submitted;         /* pydron_now(), for timelines */
    double timeout_s;         /* from the function's options (0: the executor's default) */
    size_t memory_limit;
    exec_blob **lent;         /* results of dependencies lent to it (read as at the call) */
    Py_ssize_t nlent, lent_cap;
} task_extra;

struct graph_task {
    PyObject_HEAD
    engine_handle node;       /* its node in the engine; also its task id in exec */
    uint8_t state;
    uint8_t threads;          /* runs on the thread pool */
    uint8_t reported;         /* its failure was raised once: range waits skip it */
    uint8_t undone;           /* a handler was entered before plain Python finished this call */
    uint8_t read;             /* its value was asked for (or it fed another task) */
    uint8_t held;             /* the graph holds a reference while it waits or runs */
    uint8_t join;             /* a map's join: computed here from its chunk tasks (bulk.c) */
    uint8_t chunk;            /* a map's chunk: a loop of calls in one worker task */
    PyObject *fn;
    exec_blob *args;          /* process tasks, until dispatched */
    exec_blob *blob;          /* encoded result */
    PyObject *value;          /* decoded result (or thread result); the exception when failed */
    Py_ssize_t seq;           /* position in its thread's submission order, -1 once gone */
    task_extra *extra;
};

extern engine *graph__engine;

/* ---- pending.c: the Pending type ------------------------------------------------------------- */
graph_task *graph__task_new(PyObject *fn, int threads);   /* new reference, NULL + exception */
/* Write access to a task's extra part, allocated if missing; NULL + MemoryError. */
task_extra *graph__extra(graph_task *t);
int graph__pending_init(PyObject *module);

/* ---- tasks.c --------------------------------------------------------------------------------- */
/* Wait until t finished (its dependencies dispatched as they become ready). 0, or -1 + exc. */
int graph__wait_finished(graph_task *t);
/* t's value (new reference), waiting; a failure raises the error plain Python would raise. */
PyObject *graph__task_value(graph_task *t);
/* Record t's outcome (stealing blob/object) and act on what it releases. 0, or -1 + exc. */
int graph__task_finish(graph_task *t, int failed, exec_blob *blob, PyObject *object);
Py_ssize_t graph__inflight(void);
/* The graph's reference on an unfinished task (taken at submission, dropped at its finish). */
void graph__hold(graph_task *t);
void graph__release(graph_task *t);
/* Make t wait for the tasks of deps (a tuple) and dispatch it once they are done. 0, or -1. */
int graph__wait_for(graph_task *t, PyObject *deps);
uint64_t graph__submitted(void);
uint64_t graph__finished(void);

/* ---- bulk.c: maps as chunk tasks ---------------------------------------------------------- */
/* A join whose chunks are all done: compute its value here and finish it. 0, or -1 + exc. */
int graph__join_run(graph_task *t);
int graph__bulk_init(PyObject *module);

/* ---- order.c --------------------------------------------------------------------------------- */
int graph__order_append(graph_task *t);
/* Raise t's exception (its own instance) and remember which task raised it. Always -1. */
int graph__raise_task_error(graph_task *t);
/* The unfinished tasks of this thread's order (new list), for a cancel. */
PyObject *graph__order_unfinished(Py_ssize_t from);
int graph__order_init(PyObject *module);

/* ---- observe.c ------------------------------------------------------------------------------- */
extern PyObject *graph__recording;   /* pydron.visualize: events, or NULL when off */
extern PyObject *graph__timeline;    /* pydron.enable(timeline=...): records, or NULL */
void graph__observe_submit(graph_task *t, graph_task *const *deps, Py_ssize_t ndeps);
void graph__observe_wait_begin(graph_task *t, double *started);
void graph__observe_wait_end(graph_task *t, double started);
void graph__observe_finish(graph_task *t, const exec_completion *c);
/* Called while a thread waits (at most every 100 ms it reports progress). */
void graph__observe_progress(int final);
/* A progress bar is shown now: waits must wake up to redraw it. */
int graph__progress_active(void);
/* Tasks cancelled by Ctrl-C (the progress report does not count them as done). */
void graph__observe_cancelled(Py_ssize_t n);
int graph__observe_init(PyObject *module);

/* ---- keys.c ---------------------------------------------------------------------------------- */
int graph__keys_init(PyObject *module);

#endif
