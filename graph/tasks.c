/* graph/tasks.c — the life of a task: submission (its dependencies found while its arguments are
 * encoded), dispatch to an executor once the engine says it is ready, results taken in from
 * exec_poll, and the consequences of a finish (dependents dispatched, or failed with the same
 * exception). Results stay encoded (exec_blob) until somebody reads them, so a chain of tasks
 * forwards its intermediate values from worker to worker without unpickling them here.
 * Thread and GIL model: GIL held throughout; exec_poll releases it while it sleeps, so another
 * thread may submit, take results in or finish tasks meanwhile — every loop here re-reads state
 * after a poll. Completions are handled only after exec_poll returned: exec never calls back. */
#include "graph/internal.h"

/* How many completions one poll takes at most. */
#define POLL_BATCH 64
/* Dependencies kept on the C stack while a call is encoded; more go to the heap. */
#define INLINE_DEPS 8
/* While a progress bar is shown, waits wake up this often to redraw it. */
#define PROGRESS_POLL_S 0.1

engine *graph__engine;

static struct {
    uint64_t submitted, finished;
    Py_ssize_t inflight;           /* tasks the graph holds: waiting or queued */
} G;

Py_ssize_t
graph__inflight(void)
{
    return G.inflight;
}

uint64_t
graph__submitted(void)
{
    return G.submitted;
}

uint64_t
graph__finished(void)
{
    return G.finished;
}

/* The graph holds a reference on every unfinished task, so a completion always finds its task
 * (engine_owner) even when the user dropped the pending value. */
void
graph__hold(graph_task *t)
{
    Py_INCREF(t);
    t->held = 1;
    G.inflight++;
}

/* Drop the hold (may deallocate t: call last). */
void
graph__release(graph_task *t)
{
    if (!t->held)
        return;
    t->held = 0;
    G.inflight--;
    Py_DECREF(t);
}

/* ---- dispatch ---------------------------------------------------------------------------------- */

/* Thread tasks get values, not encodings: copy the argument containers, replacing tasks.
 * New reference, NULL + exception. */
static PyObject *
resolve_copy(PyObject *obj, int depth)
{
    if (graph_is_task(obj))
        return graph__task_value((graph_task *)obj);
    if (depth > 64)
        return Py_NewRef(obj);
    if (PyTuple_CheckExact(obj) || PyList_CheckExact(obj)) {
        int is_tuple = PyTuple_CheckExact(obj);
        Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
        PyObject *out = is_tuple ? PyTuple_New(n) : PyList_New(n);
        if (out == NULL)
            return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *v = resolve_copy(PySequence_Fast_GET_ITEM(obj, i), depth + 1);
            if (v == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            if (is_tuple)
                PyTuple_SET_ITEM(out, i, v);
            else
                PyList_SET_ITEM(out, i, v);
        }
        return out;
    }
    if (PyDict_CheckExact(obj)) {
        PyObject *out = PyDict_New(), *k, *v;
        Py_ssize_t pos = 0;
        if (out == NULL)
            return NULL;
        while (PyDict_Next(obj, &pos, &k, &v)) {
            PyObject *rv = resolve_copy(v, depth + 1);
            if (rv == NULL || PyDict_SetItem(out, k, rv) < 0) {
                Py_XDECREF(rv);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(rv);
        }
        return out;
    }
    return Py_NewRef(obj);
}

static int
submit_thread_task(graph_task *t)
{
    PyObject *call = resolve_copy(t->extra->call, 0);
    if (call == NULL)
        return -1;
    exec_task et = {.task_id = t->node, .fn = t->fn, .call = call,
                    .timeout_s = t->extra->timeout_s};
    int rc = exec_submit(EXEC_THREADS, &et);
    Py_DECREF(call);
    if (rc == 0)
        Py_CLEAR(t->extra->call);
    return rc;
}

static int
submit_process_task(graph_task *t)
{
    PyObject *dep_tasks = t->extra ? t->extra->deps : NULL;
    Py_ssize_t n = dep_tasks ? PyTuple_GET_SIZE(dep_tasks) : 0;
    exec_blob *small[INLINE_DEPS];
    exec_blob **deps = n <= INLINE_DEPS ? small : PyMem_Malloc(n * sizeof(exec_blob *));
    if (deps == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        graph_task *d = (graph_task *)PyTuple_GET_ITEM(dep_tasks, i);
        /* A thread task's result is an object: encode it once for the workers. */
        if (d->blob == NULL && (d->blob = exec_encode_value(d->value)) == NULL)
            goto done;
        deps[i] = d->blob;
    }
    exec_task et = {.task_id = t->node, .fn = t->fn, .args = t->args, .deps = deps, .ndeps = n,
                    .timeout_s = t->extra ? t->extra->timeout_s : 0,
                    .memory_limit = t->extra ? t->extra->memory_limit : 0, .chunk = t->chunk};
    rc = exec_submit(exec_task_kind(), &et);
    if (rc == 0) {
        exec_blob_decref(t->args);
        t->args = NULL;
        if (t->extra)
            Py_CLEAR(t->extra->deps);
    }
done:
    if (deps != small)
        PyMem_Free(deps);
    return rc;
}

/* Hand a ready task to its executor. When that fails, the task fails (the error is the task's,
 * raised where it is read) and 0 is returned: -1 only when even recording that fails. */
static int
dispatch(graph_task *t)
{
    if (t->join)
        return graph__join_run(t);
    int rc = t->threads ? submit_thread_task(t) : submit_process_task(t);
    if (rc == 0) {
        t->state = TASK_QUEUED;
        engine_set_running(graph__engine, t->node);
        return 0;
    }
    return graph__task_finish(t, 1, NULL, PyErr_GetRaisedException());
}

/* ---- finishing --------------------------------------------------------------------------------- */

/* t reads b, a dependency's result: b's arena blocks are protected from the master's writes
 * until t has run (copy on write), so t sees them as they were at its call. 0, or -1 + exc. */
static int
lend_to(graph_task *t, exec_blob *b)
{
    if (t->threads || t->join || b == NULL)
        return 0;          /* thread tasks read the objects themselves; joins run here */
    task_extra *x = graph__extra(t);
    if (x == NULL)
        return -1;
    if (x->nlent == x->lent_cap) {
        Py_ssize_t cap = x->lent_cap ? x->lent_cap * 2 : 4;
        exec_blob **l = PyMem_Realloc(x->lent, cap * sizeof(exec_blob *));
        if (l == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        x->lent = l;
        x->lent_cap = cap;
    }
    exec_blob_incref(b);
    exec_blob_lend(b);
    x->lent[x->nlent++] = b;
    return 0;
}

static void
unlend_all(graph_task *t)
{
    if (t->extra == NULL)
        return;
    for (Py_ssize_t i = 0; i < t->extra->nlent; i++) {
        exec_blob_unlend(t->extra->lent[i]);
        exec_blob_decref(t->extra->lent[i]);
    }
    t->extra->nlent = 0;
}

/* d finished with a result: the tasks waiting for it read it as it is now. */
static int
lend_to_dependents(graph_task *d)
{
    engine_handle small[16], *deps = small;
    size_t n = engine_dependents(graph__engine, d->node, small, 16);
    if (n > 16) {
        if ((deps = PyMem_Malloc(n * sizeof(engine_handle))) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        engine_dependents(graph__engine, d->node, deps, n);
    }
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        graph_task *t = engine_owner(graph__engine, deps[i]);
        if (t != NULL)
            rc = lend_to(t, d->blob);
    }
    if (deps != small)
        PyMem_Free(deps);
    return rc;
}

/* Record a finished task's outcome (stealing blob and object); the engine is told by the
 * caller. */
static void
set_outcome(graph_task *t, int failed, exec_blob *blob, PyObject *object)
{
    unlend_all(t);
    t->state = failed ? TASK_FAILED : TASK_DONE;
    Py_XSETREF(t->value, object);
    if (failed)
        exec_blob_decref(blob);
    else
        t->blob = blob;
    if (t->extra) {
        Py_CLEAR(t->extra->call);
        Py_CLEAR(t->extra->deps);
    }
    exec_blob_decref(t->args);
    t->args = NULL;
    G.finished++;
}

int
graph__task_finish(graph_task *t, int failed, exec_blob *blob, PyObject *object)
{
    if (graph_task_finished(t)) {
        exec_blob_decref(blob);
        Py_XDECREF(object);
        return 0;
    }
    if (failed && object == NULL) {
        /* Recording the failure itself failed (out of memory): a bare error still says it. */
        PyErr_Clear();
        object = Py_NewRef(PyExc_MemoryError);
    }
    set_outcome(t, failed, blob, object);
    int rc = 0;
    if (!failed && t->blob != NULL && lend_to_dependents(t) < 0)
        rc = -1;
    engine_events ev = {0};
    if (engine_finish(graph__engine, t->node, failed, &ev) < 0) {
        PyErr_NoMemory();
        rc = -1;
    }
    /* Plain Python never made the dependents' calls: the failing one raised first. */
    for (size_t i = 0; i < ev.nfailed; i++) {
        graph_task *d = engine_owner(graph__engine, ev.failed[i]);
        if (d == NULL || graph_task_finished(d))
            continue;
        set_outcome(d, 1, NULL, Py_NewRef(t->value));
        graph__release(d);
    }
    for (size_t i = 0; i < ev.nready; i++) {
        graph_task *d = engine_owner(graph__engine, ev.ready[i]);
        if (d != NULL && d->state == TASK_WAITING && dispatch(d) < 0)
            rc = -1;
    }
    engine_events_free(&ev);
    graph__release(t);
    return rc;
}

/* Take in what exec_poll hands over (timeout_s as exec_poll). The number taken, or -1 + exc;
 * every completion taken is recorded even when one of them fails to be. */
static int
take_completions(double timeout_s)
{
    exec_completion out[POLL_BATCH];
    int n = exec_poll(timeout_s, out, POLL_BATCH);
    if (n <= 0)
        return n;
    PyObject *err = NULL;
    for (int i = 0; i < n; i++) {
        exec_completion *c = &out[i];
        graph_task *t = engine_owner(graph__engine, c->task_id);
        if (t == NULL || t->state != TASK_QUEUED) {
            /* A cancelled task's late result: drop it. */
            exec_blob_decref(c->blob);
            Py_XDECREF(c->object);
            continue;
        }
        graph__observe_finish(t, c);
        if (graph__task_finish(t, c->failed, c->blob, c->object) < 0 && err == NULL)
            err = PyErr_GetRaisedException();
    }
    if (err) {
        PyErr_SetRaisedException(err);
        return -1;
    }
    return n;
}

int
graph_pump(void)
{
    /* Called at every submission: a full poll only when some executor has something. */
    if (G.inflight == 0 || !exec_ready())
        return 0;
    return take_completions(0) < 0 ? -1 : 0;
}

/* Fail every unfinished task with exc_type(message) (the executors hold none of them any more).
 * Borrows exc_type; each task gets a new exception instance. */
static void
fail_unfinished(PyObject *exc_type, const char *message)
{
    size_t n = engine_unfinished(graph__engine, NULL, 0);
    if (n == 0)
        return;
    engine_handle *ids = PyMem_RawMalloc(n * sizeof(engine_handle));
    if (ids == NULL)
        return;
    n = engine_unfinished(graph__engine, ids, n);
    PyObject *exc = PyErr_GetRaisedException();
    for (size_t i = 0; i < n; i++) {
        graph_task *t = engine_owner(graph__engine, ids[i]);
        if (t == NULL || graph_task_finished(t))
            continue;
        PyObject *err = PyObject_CallFunction(exc_type, "s", message);
        if (graph__task_finish(t, 1, NULL, err) < 0)
            PyErr_Clear();
    }
    PyMem_RawFree(ids);
    PyErr_SetRaisedException(exc);
}

/* ---- submission -------------------------------------------------------------------------------- */

/* Dependencies met while a call's arguments are encoded (persistent id i = deps[i]). Past a few,
 * an open-addressing index (task pointer -> position) keeps a task with a million dependencies
 * linear. */
typedef struct {
    graph_task **deps;            /* borrowed: the arguments keep them alive while encoding */
    Py_ssize_t n, cap;
    Py_ssize_t *index;            /* positions + 1, 0 = empty; index_cap slots, or NULL */
    size_t index_cap;
    graph_task *inline_deps[INLINE_DEPS];
} dep_list;

static size_t
dep_hash(graph_task *d, size_t cap)
{
    return (size_t)(((uintptr_t)d >> 4) * 0x9E3779B97F4A7C15ull) & (cap - 1);
}

/* Position of d in l, or -1; with add, d is recorded at position n when absent. */
static Py_ssize_t
dep_index(dep_list *l, graph_task *d, int add)
{
    size_t h = dep_hash(d, l->index_cap);
    while (l->index[h]) {
        if (l->deps[l->index[h] - 1] == d)
            return l->index[h] - 1;
        h = (h + 1) & (l->index_cap - 1);
    }
    if (add)
        l->index[h] = l->n + 1;
    return -1;
}

/* Rebuild the index for at least 2 * need entries. 0, or -1 + MemoryError. */
static int
dep_reindex(dep_list *l, Py_ssize_t need)
{
    size_t cap = 64;
    while (cap < (size_t)need * 2)
        cap *= 2;
    Py_ssize_t *index = PyMem_Calloc(cap, sizeof(Py_ssize_t));
    if (index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(l->index);
    l->index = index;
    l->index_cap = cap;
    for (Py_ssize_t i = 0; i < l->n; i++) {
        size_t h = dep_hash(l->deps[i], cap);
        while (index[h])
            h = (h + 1) & (cap - 1);
        index[h] = i + 1;
    }
    return 0;
}

/* Borrows obj (the list keeps a borrowed pointer: the arguments hold it). */
static Py_ssize_t
collect_dep(void *ctx, PyObject *obj)
{
    if (!graph_is_task(obj))
        return -1;
    dep_list *l = ctx;
    graph_task *d = (graph_task *)obj;
    /* A result this process read and then wrote while tasks read it holds a private copy: the
     * call sees it as it is now, so its value is encoded (copied), not its old blob forwarded. */
    if (d->state == TASK_DONE && d->value != NULL && exec_blob_is_stale(d->blob))
        return -1;
    if (l->index == NULL) {
        for (Py_ssize_t i = 0; i < l->n; i++)
            if (l->deps[i] == d)
                return i;
    }
    else {
        Py_ssize_t i = dep_index(l, d, 0);
        if (i >= 0)
            return i;
    }
    if (l->n == l->cap) {
        Py_ssize_t cap = l->cap * 2;
        graph_task **nd = l->deps == l->inline_deps ? PyMem_Malloc(cap * sizeof(graph_task *))
                                                    : PyMem_Realloc(l->deps, cap * sizeof(graph_task *));
        if (nd == NULL) {
            PyErr_NoMemory();
            return -2;
        }
        if (l->deps == l->inline_deps)
            memcpy(nd, l->inline_deps, sizeof(l->inline_deps));
        l->deps = nd;
        l->cap = cap;
    }
    if (l->index == NULL ? l->n >= INLINE_DEPS * 4 : (size_t)(l->n + 1) * 2 > l->index_cap) {
        if (dep_reindex(l, l->n + 1) < 0)
            return -2;
    }
    if (l->index)
        dep_index(l, d, 1);
    l->deps[l->n] = d;
    return l->n++;
}

/* Thread tasks: find the tasks in the arguments without encoding anything. 0, or -1 + exc.
 * Borrows obj. */
static int
scan_deps(PyObject *obj, dep_list *l, int depth)
{
    if (graph_is_task(obj))
        return collect_dep(l, obj) < -1 ? -1 : 0;
    if (depth > 64)
        return 0;
    if (PyTuple_CheckExact(obj) || PyList_CheckExact(obj)) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(obj); i++)
            if (scan_deps(PySequence_Fast_GET_ITEM(obj, i), l, depth + 1) < 0)
                return -1;
    }
    else if (PyDict_CheckExact(obj)) {
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(obj, &pos, &k, &v))
            if (scan_deps(v, l, depth + 1) < 0)
                return -1;
    }
    return 0;
}

/* Make t wait for its dependencies; a failed one fails t at once. Then dispatch it if ready.
 * 0, or -1 + exception. */
static int
wire_dependencies(graph_task *t, dep_list *l)
{
    PyObject *deps = NULL;
    if (l->n) {
        if ((deps = PyTuple_New(l->n)) == NULL)
            return -1;
        for (Py_ssize_t i = 0; i < l->n; i++)
            PyTuple_SET_ITEM(deps, i, Py_NewRef(l->deps[i]));
    }
    int rc = graph__wait_for(t, deps);
    Py_XDECREF(deps);
    return rc;
}

int
graph__wait_for(graph_task *t, PyObject *deps)
{
    graph_task *failed_dep = NULL;
    Py_ssize_t n = deps ? PyTuple_GET_SIZE(deps) : 0;
    if (n) {
        if (graph__extra(t) == NULL)
            return -1;
        Py_XSETREF(t->extra->deps, Py_NewRef(deps));
        for (Py_ssize_t i = 0; i < n; i++) {
            graph_task *d = (graph_task *)PyTuple_GET_ITEM(deps, i);
            d->read = 1;               /* feeding another task is a use of its result */
            int rc = engine_depend(graph__engine, t->node, d->node);
            if (rc < 0) {
                PyErr_NoMemory();
                return -1;
            }
            if (rc == 2 && failed_dep == NULL)
                failed_dep = d;
            if (rc == 0 && !t->join && lend_to(t, d->blob) < 0)   /* done: read as it is now */
                return -1;
        }
    }
    if (failed_dep)
        return graph__task_finish(t, 1, NULL, Py_NewRef(failed_dep->value));
    if (engine_seal(graph__engine, t->node))
        return dispatch(t);
    return 0;
}

PyObject *
graph_submit(PyObject *fn, PyObject *args, PyObject *kwargs, const graph_task_options *options)
{
    int threads = options->threads;
    dep_list l = {.n = 0, .cap = INLINE_DEPS, .index = NULL, .index_cap = 0};
    l.deps = l.inline_deps;
    graph_task *t = graph__task_new(fn, threads);
    if (t == NULL)
        return NULL;
    G.submitted++;
    t->chunk = (uint8_t)options->chunk;
    graph__hold(t);
    if (options->timeout_s > 0 || options->memory_limit > 0) {
        if (graph__extra(t) == NULL)
            goto error;
        t->extra->timeout_s = options->timeout_s;
        t->extra->memory_limit = options->memory_limit;
    }
    if (threads) {
        if (graph__extra(t) == NULL)
            goto error;
        t->extra->call = PyTuple_Pack(2, args, kwargs ? kwargs : Py_None);
        if (t->extra->call == NULL || scan_deps(t->extra->call, &l, 0) < 0)
            goto error;
    }
    else {
        t->args = exec_encode_call(fn, args, kwargs, collect_dep, &l);
        if (t->args == NULL)
            goto error;
    }
    if (graph__order_append(t) < 0)
        goto error;
    graph__observe_submit(t, l.deps, l.n);
    if (wire_dependencies(t, &l) < 0)
        goto error;
    /* Take in what finished meanwhile, so dependents start while the caller keeps tracing. */
    if (graph_pump() < 0)
        goto error;
    if (l.deps != l.inline_deps)
        PyMem_Free(l.deps);
    PyMem_Free(l.index);
    return (PyObject *)t;
error:
    if (l.deps != l.inline_deps)
        PyMem_Free(l.deps);
    PyMem_Free(l.index);
    if (!graph_task_finished(t)) {
        /* Never dispatched: it is no task any more, and its error is raised here, once. */
        PyObject *exc = PyErr_GetRaisedException();
        t->reported = 1;
        set_outcome(t, 1, NULL, Py_NewRef(exc));
        engine_events ev = {0};
        engine_finish(graph__engine, t->node, 1, &ev);
        engine_events_free(&ev);
        graph__release(t);
        PyErr_SetRaisedException(exc);
    }
    Py_DECREF(t);
    return NULL;
}

/* ---- waiting ----------------------------------------------------------------------------------- */

int
graph__wait_finished(graph_task *t)
{
    if (graph_task_finished(t))
        return 0;
    double started;
    graph__observe_wait_begin(t, &started);
    int rc = 0;
    Py_INCREF(t);
    while (!graph_task_finished(t)) {
        graph__observe_progress(0);
        if (take_completions(graph__progress_active() ? PROGRESS_POLL_S : -1) < 0) {
            if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
                graph_cancel_mine();
            rc = -1;
            break;
        }
        /* The executors hold nothing any more (shut down at exit under a thread still waiting):
         * these tasks will never come back. Failing them ends this loop, which would otherwise
         * spin holding the GIL and keep the interpreter from finalizing. */
        if (!graph_task_finished(t) && exec_outstanding() == 0)
            fail_unfinished(PyExc_RuntimeError,
                            "pydron: the executor was shut down before this task finished");
    }
    graph__observe_wait_end(t, started);
    Py_DECREF(t);
    return rc;
}

PyObject *
graph__task_value(graph_task *t)
{
    t->read = 1;
    if (t->state != TASK_DONE) {
        if (graph__wait_finished(t) < 0)
            return NULL;
        if (t->state == TASK_FAILED) {
            /* An earlier call that failed is the one plain Python raised. */
            if (t->seq >= 0 && graph_force_before(t->seq) < 0)
                return NULL;
            graph__raise_task_error(t);
            return NULL;
        }
    }
    if (t->value == NULL) {
        t->value = exec_blob_decode(t->blob);
        if (t->value == NULL) {
            if (PyErr_ExceptionMatches(PyExc_Exception))
                exec_explain_undecodable(t->fn);
            return NULL;
        }
        /* The encoding stays: a task submitted later may depend on this one and gets it as it
         * is (for arrays both views share the arena block, so this costs no memory). */
    }
    return Py_NewRef(t->value);
}

PyObject *
graph_wait(graph_task *t)
{
    return graph__task_value(t);
}

/* Fail the unfinished ones of a list of tasks with exc_type(message); soft: through exec_forget
 * (nothing is killed). Returns how many. */
static Py_ssize_t
cancel_tasks(PyObject *all, PyObject *exc_type, const char *message, int soft)
{
    PyObject *tasks = PyList_New(0);
    for (Py_ssize_t i = 0; tasks && i < PyList_GET_SIZE(all); i++) {
        PyObject *t = PyList_GET_ITEM(all, i);
        if (graph_is_task(t) && !graph_task_finished((graph_task *)t) &&
            PyList_Append(tasks, t) < 0)
            Py_CLEAR(tasks);
    }
    if (tasks == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_ssize_t n = PyList_GET_SIZE(tasks);
    uint64_t *ids = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(uint64_t));
    if (ids != NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            ids[i] = ((graph_task *)PyList_GET_ITEM(tasks, i))->node;
        if (soft)
            exec_forget(ids, n);
        else
            exec_cancel(ids, n);
        PyMem_Free(ids);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        graph_task *t = (graph_task *)PyList_GET_ITEM(tasks, i);
        PyObject *err = PyObject_CallFunction(exc_type, "s", message);
        if (graph__task_finish(t, 1, NULL, err) < 0)
            PyErr_Clear();
        if (soft)
            t->reported = 1;      /* nobody is told about it: it was never wanted */
    }
    Py_DECREF(tasks);
    return n;
}

void
graph_cancel_mine(void)
{
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *tasks = graph__order_unfinished(0);
    if (tasks != NULL) {
        graph__observe_cancelled(cancel_tasks(tasks, PyExc_KeyboardInterrupt,
                                              "cancelled by Ctrl-C", 0));
        Py_DECREF(tasks);
    }
    PyErr_Clear();
    PyErr_SetRaisedException(exc);
}

void
graph_forget_tasks(PyObject *tasks)
{
    PyObject *exc = PyErr_GetRaisedException();
    graph__observe_cancelled(cancel_tasks(tasks, PyExc_RuntimeError,
                                          "pydron: cancelled (no longer wanted)", 1));
    PyErr_Clear();
    PyErr_SetRaisedException(exc);
}

void
graph_cancel_since(Py_ssize_t mark)
{
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *tasks = graph_detach_since(mark);
    if (tasks != NULL) {
        graph_forget_tasks(tasks);
        Py_DECREF(tasks);
    }
    PyErr_Clear();
    PyErr_SetRaisedException(exc);
}

int
graph_module_init(PyObject *module)
{
    if (graph__engine == NULL && (graph__engine = engine_new()) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (graph__pending_init(module) < 0 || graph__order_init(module) < 0 ||
        graph__observe_init(module) < 0 || graph__keys_init(module) < 0 ||
        graph__bulk_init(module) < 0)
        return -1;
    return 0;
}
