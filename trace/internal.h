/* trace/internal.h — shared by the files of trace/ only: per-code state, forcing, sessions. */
#ifndef PYDRON_TRACE_INTERNAL_H
#define PYDRON_TRACE_INTERNAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "graph/graph.h"
#include "exec/exec.h"
#include "pydron_compat.h"


/* What the decorators say about a code object; kept in the code object's co_extra slot. */
enum trace_kind { TRACE_PLAIN = 0, TRACE_FUNCTIONAL = 1, TRACE_SCHEDULED = 2 };

typedef struct {
    int kind;
    graph_task_options options;   /* functional: how its tasks run */
    int refused;            /* scheduled, but the rewrite refused it: runs plainly */
    int unread_warned;      /* functional: "result never read" was said once */
    PyObject *rewritten;    /* scheduled: the rewritten code object, made on first use */
    struct trace_replay *replay;   /* scheduled: its graph, once lifted (replay.c) */
} trace_codeinfo;

extern Py_ssize_t trace__extra_index;
extern int trace__enabled;
extern PyObject *trace__module;        /* borrowed: pydron._core, the runtime handed to the rewrite */

/* Borrowed pointer to the code object's info, NULL if none (never raises). */
static inline trace_codeinfo *
trace__codeinfo_get(PyObject *code)
{
    void *extra = NULL;
    if (trace__extra_index < 0 || compat_code_get_extra(code, trace__extra_index, &extra) < 0) {
        PyErr_Clear();
        return NULL;
    }
    return (trace_codeinfo *)extra;
}
/* Info for code, created if missing; NULL + exception on failure. */
trace_codeinfo *trace__codeinfo_ensure(PyObject *code);
/* The rewritten code of a scheduled code object (borrowed), or NULL without exception when it
 * must run plainly (rewrite refused); NULL with exception on error. */
PyObject *trace__rewritten(PyObject *code, trace_codeinfo *info);

/* force.c: waiting for values. All return new references or NULL + exception. */
PyObject *trace__force(PyObject *x);
PyObject *trace__force_deep(PyObject *x);
/* Before a plain Python callee runs: force the containers of pending values it can reach by
 * name (its globals, their classes' attributes, its closure cells). 0, or -1 + exception. */
int trace__force_escapes(PyObject *callable);

/* force.c: top-level scheduled calls (sessions). */
typedef struct {
    Py_ssize_t order;        /* graph_mark() at the start */
    Py_ssize_t moved;        /* length of the moved-into log at the start */
} trace_session;
void trace__session_begin(trace_session *s, PyObject *name);
/* End a top-level scheduled call: on success force everything it submitted (first failure wins)
 * and deep-force result and every container a pending was moved into; on error wait too, unless
 * interrupted, so an earlier task failure wins. Steals result (may be NULL with an exception
 * set); returns the final result or NULL. */
PyObject *trace__session_end(trace_session *s, PyObject *result);

/* dispatch.c: run a scheduled function's rewritten code nested in the current trace. */
PyObject *trace__call_rewritten(PyObject *func, PyObject *code, PyObject *const *args,
                               size_t nargsf, PyObject *kwnames);
int trace__dispatch_init(PyObject *module);
/* Every call site of scheduled code: a functional callee becomes a task, a scheduled one runs
 * nested, anything else gets its arguments forced. Borrows; new reference or NULL + exc. */
PyObject *trace__dispatch(PyObject *callable, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames);

/* replay.c: a call of scheduled func through its graph instead of its bytecode. 1: done, *result
 * the outcome (NULL + exception: propagate it); 0: trace the call (no graph, not yet, or the
 * graph gave up without leaving a trace of itself); -1 + exception. */
int trace__replay_call(PyObject *func, trace_codeinfo *info, PyObject *const *args,
                       Py_ssize_t nargs, PyObject *kwnames, PyObject **result);
void trace__replay_free(struct trace_replay *p);
/* Whether func's next call can go to its graph without the rewritten code: 1 a graph is ready
 * (the first call of a fresh process reads it from the disk cache here), 0 not (the entry makes
 * the rewritten code first, as a traced call needs it), -1 + exception (an interrupt). */
int trace__replay_ready(PyObject *func, trace_codeinfo *info);
/* When trace__replay_call returned 0, the caller asks whether to time the traced call (the graph
 * is being compared with its trace): started = trace__replay_clock() before the call,
 * trace__replay_traced(info, started) after it. */
int trace__replay_timing(trace_codeinfo *info);
uint64_t trace__replay_clock(void);
void trace__replay_traced(trace_codeinfo *info, uint64_t started);
int trace__replay_init(PyObject *module);

/* sites.c: where functional calls are made (for the tracebacks of their failures). */
uint32_t trace__site_here(void);
/* The frames of exc's traceback that made the call of site id show its line, not the line
 * where the failure surfaced. */
void trace__site_fix_traceback(PyObject *exc, uint32_t id);

/* hook.c */
int trace__hook_init(void);
int trace__hook_install(void);
void trace__hook_remove(void);
int trace__hook_installed(void);
/* A Python function object, including 3.11's twin type for intercepted scheduled functions. */
extern PyTypeObject *trace__function_twin;
static inline int
trace__is_function(PyObject *op)
{
    return PyFunction_Check(op) || (trace__function_twin && Py_TYPE(op) == trace__function_twin);
}
/* Route calls of func (a scheduled function object) through the trace (on) or not (off). */
int trace__intercept(PyObject *func, int on);

#endif
