/* graph/observe.c — what pydron records for the user about a run: the traced graph for
 * pydron.visualize (tasks, dependencies, the places the scheduled code waited), the timeline
 * (one record per finished task), the progress of long scheduled calls, the wait report
 * (per scheduled function: tasks, busy time, and where it waited, how often, how long), and the
 * counters of pydron.stats(). Each costs nothing while it is off (one pointer test).
 * Thread and GIL model: GIL held. Sessions (top-level scheduled calls) are per thread. */
#include "graph/internal.h"

PyObject *graph__recording;        /* pydron.visualize: events, or NULL when off */
PyObject *graph__timeline;         /* timeline records, or NULL when off */
static PyObject *report;           /* {qualname: {...}} while the wait report is on */

/* Progress of long scheduled calls: progress_fn(done, known, final) is called at most every
 * PROGRESS_EVERY_S while this process waits, once a top-level call ran for progress_after. */
#define PROGRESS_EVERY_S 0.1
static PyObject *progress_fn;
static double progress_after = 1.0;

/* Waits grouped into one (graph_wait_group_begin): depth, and whether one was counted. */
static _Thread_local int group_depth, group_counted;

void
graph_wait_group_begin(void)
{
    if (group_depth++ == 0)
        group_counted = 0;
}

void
graph_wait_group_end(void)
{
    if (group_depth > 0)
        group_depth--;
}

/* The top-level scheduled call of this thread. */
static _Thread_local struct {
    int depth;
    double started, progress_last;
    uint64_t first_task;           /* graph__submitted() when it began */
    Py_ssize_t cancelled;          /* its tasks cancelled by Ctrl-C */
    PyObject *name;                /* qualname of the scheduled function (strong) */
    double busy;                   /* run time of its tasks on workers */
} session;

/* Set by a replayed call, which runs no frame of its own: the line of its graph being run. */
static _Thread_local PyObject *replay_filename;
static _Thread_local int replay_line;

void
graph_set_location(PyObject *filename, int line)
{
    replay_filename = filename;
    replay_line = line;
}

void
graph_get_location(PyObject **filename, int *line)
{
    *filename = replay_filename;
    *line = replay_line;
}

/* Where the scheduled code is now (the replayed line, else the innermost Python frame):
 * borrowed filename, line. */
static void
current_location(PyObject **filename, int *line)
{
    if (replay_filename != NULL) {
        *filename = replay_filename;
        *line = replay_line;
        return;
    }
    PyFrameObject *frame = PyEval_GetFrame();
    *filename = Py_None;
    *line = 0;
    if (frame != NULL) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        *filename = code->co_filename;      /* kept alive by the frame's code */
        *line = PyFrame_GetLineNumber(frame);
        Py_DECREF(code);
    }
}

/* Append event (stolen) to list; a failure to record never fails the run. Steals event. */
static void
record(PyObject *list, PyObject *event)
{
    if (event == NULL || PyList_Append(list, event) < 0)
        PyErr_Clear();
    Py_XDECREF(event);
}

/* fn's __qualname__, else its repr: new reference, never NULL unless out of memory. */
static PyObject *
qualname_of(PyObject *fn)
{
    PyObject *q = PyObject_GetAttrString(fn, "__qualname__");
    if (q == NULL) {
        PyErr_Clear();
        q = PyObject_Repr(fn);
    }
    return q;
}

/* ---- events ---------------------------------------------------------------------------------- */

void
graph__observe_submit(graph_task *t, graph_task *const *deps, Py_ssize_t ndeps)
{
    if (graph__timeline && graph__extra(t) != NULL)
        t->extra->submitted = pydron_now();
    PyErr_Clear();
    if (graph__recording == NULL)
        return;
    PyObject *ids = PyTuple_New(ndeps), *filename;
    int line;
    if (ids == NULL) {
        PyErr_Clear();
        return;
    }
    for (Py_ssize_t i = 0; i < ndeps; i++)
        PyTuple_SET_ITEM(ids, i, PyLong_FromUnsignedLongLong(deps[i]->node));
    current_location(&filename, &line);
    record(graph__recording, Py_BuildValue("(sKNOiN)", "task", (unsigned long long)t->node,
                                           qualname_of(t->fn), filename, line, ids));
}

void
graph__observe_wait_begin(graph_task *t, double *started)
{
    *started = report ? pydron_now() : 0;
    if (graph__recording) {
        PyObject *filename;
        int line;
        current_location(&filename, &line);
        record(graph__recording, Py_BuildValue("(sKOi)", "wait", (unsigned long long)t->node,
                                               filename, line));
    }
}

/* The report entry of this thread's session (borrowed), created on first use, or NULL. */
static PyObject *
report_entry(void)
{
    if (report == NULL || session.name == NULL)
        return NULL;
    PyObject *e = PyDict_GetItemWithError(report, session.name);
    if (e == NULL && !PyErr_Occurred()) {
        e = Py_BuildValue("{s:i,s:i,s:d,s:d,s:N}", "calls", 0, "tasks", 0, "wall", 0.0,
                          "busy", 0.0, "waits", PyDict_New());
        if (e != NULL && PyDict_SetItem(report, session.name, e) < 0)
            Py_CLEAR(e);
        Py_XDECREF(e);       /* the report keeps it */
    }
    if (e == NULL)
        PyErr_Clear();
    return e;
}

/* entry[key] += amount (a float or an int field). Borrows entry. */
static void
add_to(PyObject *entry, const char *key, double amount)
{
    PyObject *old = PyDict_GetItemString(entry, key);
    PyObject *v = old && PyLong_Check(old) ? PyLong_FromLongLong(PyLong_AsLongLong(old) + (long long)amount)
                                           : PyFloat_FromDouble((old ? PyFloat_AsDouble(old) : 0) + amount);
    if (v == NULL || PyDict_SetItemString(entry, key, v) < 0)
        PyErr_Clear();
    Py_XDECREF(v);
}

void
graph__observe_wait_end(graph_task *t, double started)
{
    if (report == NULL || started == 0)
        return;
    PyObject *entry = report_entry();
    PyObject *waits = entry ? PyDict_GetItemString(entry, "waits") : NULL;
    if (waits == NULL)
        return;
    PyObject *filename;
    int line;
    current_location(&filename, &line);
    PyObject *key = Py_BuildValue("(Oi)", filename, line);
    PyObject *site = key ? PyDict_GetItemWithError(waits, key) : NULL;
    double waited = pydron_now() - started;
    /* Inside a group, only its first wait counts as one; the time of all of them adds up. */
    int count = group_depth == 0 || !group_counted;
    if (group_depth > 0)
        group_counted = 1;
    if (site == NULL && key != NULL && !PyErr_Occurred()) {
        site = Py_BuildValue("[id]", count, waited);
        if (site == NULL || PyDict_SetItem(waits, key, site) < 0)
            PyErr_Clear();
        Py_XDECREF(site);
    }
    else if (site != NULL && PyList_Check(site) && PyList_GET_SIZE(site) == 2) {
        PyObject *n = PyLong_FromLong(PyLong_AsLong(PyList_GET_ITEM(site, 0)) + count);
        PyObject *s = PyFloat_FromDouble(PyFloat_AsDouble(PyList_GET_ITEM(site, 1)) + waited);
        if (n == NULL || s == NULL) {
            Py_XDECREF(n);
            Py_XDECREF(s);
        }
        else {
            PyList_SetItem(site, 0, n);
            PyList_SetItem(site, 1, s);
        }
    }
    Py_XDECREF(key);
    PyErr_Clear();
}

void
graph__observe_finish(graph_task *t, const exec_completion *c)
{
    if (report && c->worker && c->finished > c->started)
        session.busy += c->finished - c->started;
    if (graph__timeline == NULL)
        return;
    double finished = c->finished > 0 ? c->finished : pydron_now();
    double submitted = t->extra ? t->extra->submitted : 0;
    double started = c->started > 0 ? c->started : submitted;
    record(graph__timeline, Py_BuildValue("(Nidddi)", qualname_of(t->fn), c->worker, submitted,
                                          started, finished, c->failed));
}

/* ---- sessions and progress ------------------------------------------------------------------- */

void
graph_session_enter(PyObject *name)
{
    if (session.depth++ > 0)
        return;
    session.started = pydron_now();
    session.first_task = graph__submitted();
    session.progress_last = 0;
    session.cancelled = 0;
    session.busy = 0;
    Py_XSETREF(session.name, Py_XNewRef(name));
}

int
graph__progress_active(void)
{
    return progress_fn != NULL && session.depth > 0;
}

void
graph__observe_progress(int final)
{
    if (progress_fn == NULL || session.depth == 0)
        return;
    double now = pydron_now();
    if (now - session.started < progress_after ||
        (!final && now - session.progress_last < PROGRESS_EVERY_S))
        return;
    session.progress_last = now;
    uint64_t known = graph__submitted() - session.first_task;
    uint64_t unfinished = (uint64_t)graph__inflight() + (uint64_t)session.cancelled;
    uint64_t done = known > unfinished ? known - unfinished : 0;
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *r = PyObject_CallFunction(progress_fn, "KKi", (unsigned long long)done,
                                        (unsigned long long)known, final);
    if (r == NULL)
        PyErr_WriteUnraisable(progress_fn);
    Py_XDECREF(r);
    PyErr_SetRaisedException(exc);
}

void
graph__observe_cancelled(Py_ssize_t n)
{
    session.cancelled += n;
}

void
graph_session_exit(void)
{
    if (session.depth == 0)
        return;
    if (session.depth == 1) {
        if (session.progress_last != 0)
            graph__observe_progress(1);
        PyObject *entry = report_entry();
        if (entry != NULL) {
            add_to(entry, "calls", 1);
            add_to(entry, "tasks", (double)(graph__submitted() - session.first_task));
            add_to(entry, "wall", pydron_now() - session.started);
            add_to(entry, "busy", session.busy);
        }
        Py_CLEAR(session.name);
    }
    session.depth--;
}

/* ---- switches for the Python side ------------------------------------------------------------- */

/* Turn a log on (a fresh list or dict) or off; returns what it held (new reference). */
static PyObject *
swap_log(PyObject **log, PyObject *on, int as_dict)
{
    int enable = PyObject_IsTrue(on);
    if (enable < 0)
        return NULL;
    PyObject *old = *log;
    if (old == NULL && (old = as_dict ? PyDict_New() : PyList_New(0)) == NULL)
        return NULL;
    *log = NULL;
    if (enable && (*log = as_dict ? PyDict_New() : PyList_New(0)) == NULL) {
        Py_DECREF(old);
        return NULL;
    }
    return old;
}

/* _record(on) -> the events recorded since the last _record(True) when turning it off. */
static PyObject *
core_record(PyObject *module, PyObject *on)
{
    return swap_log(&graph__recording, on, 0);
}

/* _timeline(on) -> the task records since the last _timeline(True) when turning it off. */
static PyObject *
core_timeline(PyObject *module, PyObject *on)
{
    return swap_log(&graph__timeline, on, 0);
}

/* _report(on) -> {qualname: {calls, tasks, wall, busy, waits: {(file, line): [n, seconds]}}} */
static PyObject *
core_report(PyObject *module, PyObject *on)
{
    return swap_log(&report, on, 1);
}

/* _set_progress(fn | None, after_seconds) */
static PyObject *
core_set_progress(PyObject *module, PyObject *args)
{
    PyObject *fn;
    double after = 1.0;
    if (!PyArg_ParseTuple(args, "O|d", &fn, &after))
        return NULL;
    Py_XSETREF(progress_fn, fn == Py_None ? NULL : Py_NewRef(fn));
    progress_after = after;
    Py_RETURN_NONE;
}

static PyObject *
core_clock(PyObject *module, PyObject *unused)
{
    return PyFloat_FromDouble(pydron_now());
}

PyObject *
graph_stats(void)
{
    return Py_BuildValue("{s:K,s:K,s:n,s:n,s:n,s:n}", "submitted",
                         (unsigned long long)graph__submitted(), "finished",
                         (unsigned long long)graph__finished(), "inflight", graph__inflight(),
                         "live", graph_live_tasks, "engine_nodes",
                         (Py_ssize_t)engine_live(graph__engine), "engine_bytes",
                         (Py_ssize_t)engine_bytes(graph__engine));
}

static PyMethodDef observe_methods[] = {
    {"_timeline", core_timeline, METH_O,
     "_timeline(on): record (qualname, worker, submitted, started, finished, failed) per task."},
    {"_clock", core_clock, METH_NOARGS, "The clock of timeline events (CLOCK_MONOTONIC)."},
    {"_record", core_record, METH_O, "_record(on): record tasks and waits (pydron.visualize)."},
    {"_report", core_report, METH_O,
     "_report(on): per scheduled function, tasks, busy time and where it waited."},
    {"_set_progress", core_set_progress, METH_VARARGS,
     "_set_progress(fn, after=1.0): report progress of long scheduled calls."},
    {NULL},
};

int
graph__observe_init(PyObject *module)
{
    return PyModule_AddFunctions(module, observe_methods);
}
