/* graph/graph.c — tasks, their dependencies and their results.
 * A graph_task is both a node of the task graph and the pending value trace/ hands to user code.
 * Results stay encoded (exec_blob) until somebody reads them, so a chain of tasks forwards its
 * intermediate values from worker to worker without unpickling them here. */
#include "graph/graph.h"
#include "exec/exec.h"
#include "pydron_compat.h"

#include <time.h>
#include <xxhash.h>

enum task_state {
    TASK_WAITING,    /* dependencies outstanding: not yet handed to exec */
    TASK_QUEUED,     /* handed to exec, result not back */
    TASK_DONE,
    TASK_FAILED,
};

/* What only some tasks need (dependencies, thread arguments, try-region records, timelines),
 * allocated on first use: a million tiny independent tasks never pay for it. */
typedef struct {
    PyObject *thread_args;    /* thread tasks: (args tuple, kwargs dict or None), until dispatched */
    PyObject *deps;           /* tuple of tasks (persistent id i = deps[i]), until dispatched */
    PyObject *dependents;     /* list of tasks waiting for this one, or NULL */
    PyObject *prev;           /* {local name: value it held before this result was stored} */
    Py_ssize_t nwaiting;      /* dependencies not finished yet */
    double submitted;         /* CLOCK_MONOTONIC seconds, for timelines */
} task_extra;

struct graph_task {
    PyObject_HEAD
    uint64_t id;
    uint8_t state;
    uint8_t threads;
    uint8_t reported;         /* its failure was raised once: range waits skip it */
    uint8_t undone;           /* a handler was entered before plain Python finished this call */
    PyObject *fn;
    exec_blob *args;          /* process tasks, until dispatched */
    exec_blob *blob;          /* encoded result */
    PyObject *value;          /* decoded result (or thread result); the exception when failed */
    Py_ssize_t seq;           /* position in this thread's submission order, -1 once gone */
    task_extra *extra;
};

static const task_extra no_extra;
/* Read access to a task's extra part (all zero when it has none). */
#define EXTRA(t) ((const task_extra *)((t)->extra ? (t)->extra : &no_extra))

/* Write access: the extra part, allocated if missing; NULL + MemoryError. */
static task_extra *
task_extra_of(graph_task *t)
{
    if (t->extra == NULL && (t->extra = PyMem_Calloc(1, sizeof(task_extra))) == NULL)
        PyErr_NoMemory();
    return t->extra;
}

PyTypeObject *graph_task_type;
Py_ssize_t graph_live_tasks;

/* Tasks handed to exec and not back yet, by id: a dict {int: task} owning a reference. */
static PyObject *inflight;
static uint64_t next_task_id = 1;
static uint64_t n_submitted, n_finished;

/* pydron.visualize: when not NULL, every task and every real wait is appended here as a tuple
 * ("task", id, qualname, filename, line, dep ids) or ("wait", id, filename, line). */
static PyObject *recording;

/* pydron.enable(timeline=...): when not NULL, one tuple per finished task:
 * (qualname, worker, submitted, started, finished, failed); times in CLOCK_MONOTONIC seconds. */
static PyObject *timeline;

/* Progress of long scheduled calls: progress_fn(done, known) is called at most every 100 ms
 * while this process waits, once a top-level call has run for progress_after seconds. */
static PyObject *progress_fn;
static double progress_after = 1.0, progress_last, session_started;
static uint64_t session_first_id;
static int session_depth;

static double
now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Where the scheduled code is now (the innermost Python frame). */
static void
current_location(PyObject **filename, int *line)
{
    PyFrameObject *frame = PyEval_GetFrame();
    *filename = Py_None;
    *line = 0;
    if (frame != NULL) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        *filename = code->co_filename;
        *line = PyFrame_GetLineNumber(frame);
        Py_DECREF(code);
    }
}

static void
record_event(PyObject *event)
{
    if (event == NULL || PyList_Append(recording, event) < 0)
        PyErr_Clear();
    Py_XDECREF(event);
}

void
graph_session_enter(void)
{
    if (session_depth++ == 0) {
        session_started = now_seconds();
        session_first_id = next_task_id;
        progress_last = 0;
    }
}

static void
progress_report(int final)
{
    if (progress_fn == NULL || session_depth == 0)
        return;
    double now = now_seconds();
    if (now - session_started < progress_after || (!final && now - progress_last < 0.1))
        return;
    progress_last = now;
    uint64_t known = next_task_id - session_first_id;
    uint64_t done = known - (uint64_t)PyDict_GET_SIZE(inflight);
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *r = PyObject_CallFunction(progress_fn, "KKi", (unsigned long long)done,
                                        (unsigned long long)known, final);
    if (r == NULL)
        PyErr_WriteUnraisable(progress_fn);
    Py_XDECREF(r);
    PyErr_SetRaisedException(exc);
}

void
graph_session_exit(void)
{
    if (session_depth == 1 && progress_last != 0)
        progress_report(1);
    if (session_depth > 0)
        session_depth--;
}

uint64_t
graph_key(const void *data, size_t len, uint64_t seed)
{
    return XXH3_64bits_withSeed(data, len, seed);
}

/* ---- task object ------------------------------------------------------------------------- */

static PyObject *task_force_value(graph_task *t);   /* new reference */

static int
task_traverse(graph_task *t, visitproc visit, void *arg)
{
    Py_VISIT(t->fn);
    Py_VISIT(t->value);
    if (t->extra) {
        Py_VISIT(t->extra->thread_args);
        Py_VISIT(t->extra->deps);
        Py_VISIT(t->extra->dependents);
        Py_VISIT(t->extra->prev);
    }
    return 0;
}

static int
task_clear(graph_task *t)
{
    Py_CLEAR(t->fn);
    Py_CLEAR(t->value);
    if (t->extra) {
        Py_CLEAR(t->extra->thread_args);
        Py_CLEAR(t->extra->deps);
        Py_CLEAR(t->extra->dependents);
        Py_CLEAR(t->extra->prev);
    }
    return 0;
}

static void
task_dealloc(graph_task *t)
{
    PyObject_GC_UnTrack(t);
    task_clear(t);
    if (t->args)
        exec_blob_decref(t->args);
    if (t->blob)
        exec_blob_decref(t->blob);
    PyMem_Free(t->extra);
    graph_live_tasks--;
    PyObject_GC_Del(t);
}

static PyObject *
task_repr(graph_task *t)
{
    static const char *names[] = {"waiting", "queued", "done", "failed"};
    PyObject *fname = t->fn ? PyObject_GetAttrString(t->fn, "__qualname__") : NULL;
    if (fname == NULL)
        PyErr_Clear();
    PyObject *r = PyUnicode_FromFormat("<pydron pending #%llu %S %s>", (unsigned long long)t->id,
                                       fname ? fname : Py_None, names[t->state]);
    Py_XDECREF(fname);
    return r;
}

/* The safety net: code the rewrite did not reach still sees the value through these slots. */
#define FORCED(t) task_force_value((graph_task *)(t))

/* Either operand of a binary slot may be the task: both as values (new references). */
static int
force_pair(PyObject *a, PyObject *b, PyObject **va, PyObject **vb)
{
    *va = graph_is_task(a) ? FORCED(a) : Py_NewRef(a);
    if (*va == NULL)
        return -1;
    *vb = graph_is_task(b) ? FORCED(b) : Py_NewRef(b);
    if (*vb == NULL) {
        Py_CLEAR(*va);
        return -1;
    }
    return 0;
}

/* slot(self) -> call(value), for slots returning an object. */
#define TASK_UNARY(name, call)                                                                  \
    static PyObject *task_##name(PyObject *self)                                                \
    {                                                                                           \
        PyObject *v = FORCED(self);                                                             \
        if (v == NULL)                                                                          \
            return NULL;                                                                        \
        PyObject *r = call(v);                                                                  \
        Py_DECREF(v);                                                                           \
        return r;                                                                               \
    }

/* slot(self, arg) -> call(value, arg): the argument is not the task. */
#define TASK_WITH_ARG(name, call)                                                               \
    static PyObject *task_##name(PyObject *self, PyObject *arg)                                 \
    {                                                                                           \
        PyObject *v = FORCED(self);                                                             \
        if (v == NULL)                                                                          \
            return NULL;                                                                        \
        PyObject *r = call(v, arg);                                                             \
        Py_DECREF(v);                                                                           \
        return r;                                                                               \
    }

/* slot(self) -> call(value), for slots returning a C scalar with `err` on failure. */
#define TASK_SCALAR(name, type, err, call)                                                      \
    static type task_##name(PyObject *self)                                                     \
    {                                                                                           \
        PyObject *v = FORCED(self);                                                             \
        if (v == NULL)                                                                          \
            return err;                                                                         \
        type r = call(v);                                                                       \
        Py_DECREF(v);                                                                           \
        return r;                                                                               \
    }

/* Binary operators: either side may be the task. */
#define TASK_BINARY(name, call)                                                                 \
    static PyObject *task_##name(PyObject *a, PyObject *b)                                      \
    {                                                                                           \
        PyObject *va, *vb;                                                                      \
        if (force_pair(a, b, &va, &vb) < 0)                                                     \
            return NULL;                                                                        \
        PyObject *r = call(va, vb);                                                             \
        Py_DECREF(va);                                                                          \
        Py_DECREF(vb);                                                                          \
        return r;                                                                               \
    }

/* The safety net: code the rewrite did not reach still sees the value through these slots. */
TASK_WITH_ARG(getattro, PyObject_GetAttr)
TASK_WITH_ARG(subscript, PyObject_GetItem)
TASK_WITH_ARG(format, PyObject_Format)
TASK_UNARY(str, PyObject_Str)
TASK_UNARY(iter, PyObject_GetIter)
TASK_UNARY(neg, PyNumber_Negative)
TASK_UNARY(pos, PyNumber_Positive)
TASK_UNARY(abs, PyNumber_Absolute)
TASK_UNARY(invert, PyNumber_Invert)
TASK_UNARY(int, PyNumber_Long)
TASK_UNARY(float, PyNumber_Float)
TASK_UNARY(index, PyNumber_Index)
TASK_SCALAR(hash, Py_hash_t, -1, PyObject_Hash)
TASK_SCALAR(bool, int, -1, PyObject_IsTrue)
TASK_SCALAR(length, Py_ssize_t, -1, PyObject_Length)
TASK_BINARY(add, PyNumber_Add)
TASK_BINARY(sub, PyNumber_Subtract)
TASK_BINARY(mul, PyNumber_Multiply)
TASK_BINARY(truediv, PyNumber_TrueDivide)
TASK_BINARY(floordiv, PyNumber_FloorDivide)
TASK_BINARY(mod, PyNumber_Remainder)
TASK_BINARY(divmod, PyNumber_Divmod)
TASK_BINARY(lshift, PyNumber_Lshift)
TASK_BINARY(rshift, PyNumber_Rshift)
TASK_BINARY(and, PyNumber_And)
TASK_BINARY(or, PyNumber_Or)
TASK_BINARY(xor, PyNumber_Xor)
TASK_BINARY(matmul, PyNumber_MatrixMultiply)

static PyObject *
task_richcompare(PyObject *a, PyObject *b, int op)
{
    PyObject *va, *vb;
    if (force_pair(a, b, &va, &vb) < 0)
        return NULL;
    PyObject *r = PyObject_RichCompare(va, vb, op);
    Py_DECREF(va);
    Py_DECREF(vb);
    return r;
}

static PyObject *
task_pow(PyObject *a, PyObject *b, PyObject *c)
{
    PyObject *va, *vb;
    if (force_pair(a, b, &va, &vb) < 0)
        return NULL;
    PyObject *r = PyNumber_Power(va, vb, c);
    Py_DECREF(va);
    Py_DECREF(vb);
    return r;
}

static PyObject *
task_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *v = FORCED(self);
    if (v == NULL)
        return NULL;
    PyObject *r = PyObject_Call(v, args, kwargs);
    Py_DECREF(v);
    return r;
}

static int
task_contains(PyObject *self, PyObject *item)
{
    PyObject *v = FORCED(self);
    if (v == NULL)
        return -1;
    int r = PySequence_Contains(v, item);
    Py_DECREF(v);
    return r;
}

static PyObject *
task_reduce_ex(PyObject *self, PyObject *protocol)
{
    /* A pending value that escapes into pickle is pickled as its value. */
    PyObject *v = FORCED(self);
    if (v == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethod(v, "__reduce_ex__", "O", protocol);
    Py_DECREF(v);
    return r;
}

static PyObject *
task_value(PyObject *self, PyObject *unused)
{
    return FORCED(self);
}

static PyObject *
task_done(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(graph_task_finished((graph_task *)self));
}

static PyMethodDef task_methods[] = {
    {"__format__", task_format, METH_O, NULL},
    {"__reduce_ex__", task_reduce_ex, METH_O, NULL},
    {"_pydron_value", task_value, METH_NOARGS, "Wait for the task and return its value."},
    {"_pydron_done", task_done, METH_NOARGS, "Whether the task has finished."},
    {NULL},
};

static PyType_Slot task_slots[] = {
    {Py_tp_dealloc, task_dealloc},
    {Py_tp_traverse, task_traverse},
    {Py_tp_clear, task_clear},
    {Py_tp_repr, task_repr},
    {Py_tp_str, task_str},
    {Py_tp_hash, task_hash},
    {Py_tp_richcompare, task_richcompare},
    {Py_tp_getattro, task_getattro},
    {Py_tp_iter, task_iter},
    {Py_tp_call, task_call},
    {Py_tp_methods, task_methods},
    {Py_nb_bool, task_bool},
    {Py_nb_negative, task_neg},
    {Py_nb_positive, task_pos},
    {Py_nb_absolute, task_abs},
    {Py_nb_invert, task_invert},
    {Py_nb_int, task_int},
    {Py_nb_float, task_float},
    {Py_nb_index, task_index},
    {Py_nb_add, task_add},
    {Py_nb_subtract, task_sub},
    {Py_nb_multiply, task_mul},
    {Py_nb_true_divide, task_truediv},
    {Py_nb_floor_divide, task_floordiv},
    {Py_nb_remainder, task_mod},
    {Py_nb_divmod, task_divmod},
    {Py_nb_power, task_pow},
    {Py_nb_lshift, task_lshift},
    {Py_nb_rshift, task_rshift},
    {Py_nb_and, task_and},
    {Py_nb_or, task_or},
    {Py_nb_xor, task_xor},
    {Py_nb_matrix_multiply, task_matmul},
    {Py_mp_length, task_length},
    {Py_mp_subscript, task_subscript},
    {Py_sq_contains, task_contains},
    {0, NULL},
};

static PyType_Spec task_spec = {
    .name = "pydron.Pending",
    .basicsize = sizeof(graph_task),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = task_slots,
};

static graph_task *
task_new(PyObject *fn, int threads)
{
    graph_task *t = PyObject_GC_New(graph_task, graph_task_type);
    if (t == NULL)
        return NULL;
    t->id = next_task_id++;
    t->state = TASK_WAITING;
    t->threads = threads;
    t->fn = Py_NewRef(fn);
    t->args = NULL;
    t->blob = NULL;
    t->value = NULL;
    t->seq = -1;
    t->reported = 0;
    t->undone = 0;
    t->extra = NULL;
    graph_live_tasks++;
    if (timeline) {
        if (task_extra_of(t) == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        t->extra->submitted = now_seconds();
    }
    PyObject_GC_Track(t);
    return t;
}

int
graph_task_finished(graph_task *t)
{
    return t->state == TASK_DONE || t->state == TASK_FAILED;
}

/* ---- dispatch ---------------------------------------------------------------------------- */

static int task_finish(graph_task *t, int failed, exec_blob *blob, PyObject *object);
static int order_append(graph_task *t);
static void fail_inflight(PyObject *exc_type, const char *message);

/* Thread tasks get values, not encodings: copy the argument containers, replacing tasks. */
static PyObject *
resolve_copy(PyObject *obj, int depth)
{
    if (graph_is_task(obj))
        return task_force_value((graph_task *)obj);
    if (depth > 64)
        return Py_NewRef(obj);
    if (PyTuple_CheckExact(obj) || PyList_CheckExact(obj)) {
        int is_tuple = PyTuple_CheckExact(obj);
        Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
        PyObject *out = is_tuple ? PyTuple_New(n) : PyList_New(n);
        if (out == NULL)
            return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_Fast_GET_ITEM(obj, i);
            PyObject *v = resolve_copy(item, depth + 1);
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

/* Hand a task whose dependencies are all done to exec. On failure the task fails (the error is
 * the task's, raised where it is read) and 0 is returned: only a broken executor returns -1. */
static int
task_dispatch(graph_task *t)
{
    if (t->threads) {
        PyObject *call = resolve_copy(t->extra->thread_args, 0);
        if (call == NULL)
            goto failed;
        PyObject *kw = PyTuple_GET_ITEM(call, 1);
        int rc = exec_submit_thread(t->id, t->fn, PyTuple_GET_ITEM(call, 0),
                                    kw == Py_None ? NULL : kw);
        Py_DECREF(call);
        if (rc < 0)
            goto failed;
        Py_CLEAR(t->extra->thread_args);
    }
    else {
        PyObject *dep_tasks = EXTRA(t)->deps;
        Py_ssize_t n = dep_tasks ? PyTuple_GET_SIZE(dep_tasks) : 0;
        exec_blob *small[8];
        exec_blob **deps = n <= 8 ? small : PyMem_Malloc(n * sizeof(exec_blob *));
        if (deps == NULL) {
            PyErr_NoMemory();
            goto failed;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            graph_task *d = (graph_task *)PyTuple_GET_ITEM(dep_tasks, i);
            if (d->blob == NULL) {
                /* A thread task's result is an object: encode it once for the workers. */
                d->blob = exec_encode_value(d->value);
                if (d->blob == NULL) {
                    if (deps != small)
                        PyMem_Free(deps);
                    goto failed;
                }
            }
            deps[i] = d->blob;
        }
        exec_task et = {.task_id = t->id, .fn = t->fn, .args = t->args, .deps = deps, .ndeps = n};
        int rc = exec_submit(&et);
        if (deps != small)
            PyMem_Free(deps);
        if (rc < 0)
            goto failed;
        exec_blob_decref(t->args);
        t->args = NULL;
        if (t->extra)
            Py_CLEAR(t->extra->deps);
    }
    PyObject *key = PyLong_FromUnsignedLongLong(t->id);
    if (key == NULL || PyDict_SetItem(inflight, key, (PyObject *)t) < 0) {
        Py_XDECREF(key);
        return -1;
    }
    Py_DECREF(key);
    t->state = TASK_QUEUED;
    return 0;

failed: {
        PyObject *exc = PyErr_GetRaisedException();
        return task_finish(t, 1, NULL, exc);
    }
}

/* Record a task's outcome (stealing blob/object) and release the tasks that waited for it. */
static int
task_finish(graph_task *t, int failed, exec_blob *blob, PyObject *object)
{
    t->state = failed ? TASK_FAILED : TASK_DONE;
    t->value = object;
    if (failed) {
        if (blob)
            exec_blob_decref(blob);
    }
    else
        t->blob = blob;
    PyObject *dependents = NULL;
    if (t->extra) {
        Py_CLEAR(t->extra->thread_args);
        Py_CLEAR(t->extra->deps);
        dependents = t->extra->dependents;
        t->extra->dependents = NULL;
    }
    if (t->args) {
        exec_blob_decref(t->args);
        t->args = NULL;
    }
    n_finished++;
    int rc = 0;
    if (dependents) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(dependents); i++) {
            graph_task *d = (graph_task *)PyList_GET_ITEM(dependents, i);
            if (d->state != TASK_WAITING)
                continue;
            if (failed) {
                /* Plain Python never made this call: the failing one raised first. */
                if (task_finish(d, 1, NULL, Py_NewRef(t->value)) < 0)
                    rc = -1;
            }
            else if (--d->extra->nwaiting == 0 && task_dispatch(d) < 0)
                rc = -1;
        }
        Py_DECREF(dependents);
    }
    return rc;
}

static void
timeline_record(graph_task *t, exec_result *r)
{
    PyObject *qualname = PyObject_GetAttrString(t->fn, "__qualname__");
    if (qualname == NULL) {
        PyErr_Clear();
        qualname = PyObject_Repr(t->fn);
    }
    double finished = r->finished > 0 ? r->finished : now_seconds();
    double submitted = EXTRA(t)->submitted;
    double started = r->started > 0 ? r->started : submitted;
    PyObject *event = Py_BuildValue("(Nidddi)", qualname, r->worker, submitted, started,
                                    finished, r->failed);
    if (event == NULL || PyList_Append(timeline, event) < 0)
        PyErr_Clear();
    Py_XDECREF(event);
}

static int
on_result(void *ctx, exec_result *r)
{
    PyObject *key = PyLong_FromUnsignedLongLong(r->task_id);
    if (key == NULL)
        return -1;
    PyObject *t = PyDict_GetItemWithError(inflight, key);
    if (t == NULL) {
        /* A cancelled task's late result: drop it. */
        Py_DECREF(key);
        if (r->blob)
            exec_blob_decref(r->blob);
        Py_XDECREF(r->object);
        return PyErr_Occurred() ? -1 : 0;
    }
    Py_INCREF(t);
    int rc = PyDict_DelItem(inflight, key);
    Py_DECREF(key);
    if (timeline)
        timeline_record((graph_task *)t, r);
    if (rc == 0)
        rc = task_finish((graph_task *)t, r->failed, r->blob, r->object);
    Py_DECREF(t);
    return rc;
}

int
graph_pump(void)
{
    if (PyDict_GET_SIZE(inflight) == 0)
        return 0;
    return exec_poll(0, on_result, NULL) < 0 ? -1 : 0;
}

/* ---- submission -------------------------------------------------------------------------- */

typedef struct {
    PyObject *deps;          /* list of dependency tasks, in persistent-id order */
    graph_task *failed_dep;  /* borrowed: first dependency found failed */
} dep_ctx;

static Py_ssize_t
collect_dep(void *vctx, PyObject *obj)
{
    if (!graph_is_task(obj))
        return -1;
    dep_ctx *ctx = vctx;
    graph_task *d = (graph_task *)obj;
    if (d->state == TASK_FAILED && ctx->failed_dep == NULL)
        ctx->failed_dep = d;
    Py_ssize_t n = PyList_GET_SIZE(ctx->deps);
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyList_GET_ITEM(ctx->deps, i) == obj)
            return i;
    if (PyList_Append(ctx->deps, obj) < 0)
        return -2;
    return n;
}

/* Thread tasks: find the tasks in the arguments without encoding anything. */
static int
scan_deps(PyObject *obj, dep_ctx *ctx, int depth)
{
    if (graph_is_task(obj))
        return collect_dep(ctx, obj) < -1 ? -1 : 0;
    if (depth > 64)
        return 0;
    if (PyTuple_CheckExact(obj) || PyList_CheckExact(obj)) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(obj); i++)
            if (scan_deps(PySequence_Fast_GET_ITEM(obj, i), ctx, depth + 1) < 0)
                return -1;
    }
    else if (PyDict_CheckExact(obj)) {
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(obj, &pos, &k, &v))
            if (scan_deps(v, ctx, depth + 1) < 0)
                return -1;
    }
    return 0;
}

PyObject *
graph_submit(PyObject *fn, PyObject *args, PyObject *kwargs, int threads)
{
    dep_ctx ctx = {PyList_New(0), NULL};
    graph_task *t = NULL;
    if (ctx.deps == NULL)
        return NULL;
    t = task_new(fn, threads);
    if (t == NULL)
        goto error;
    n_submitted++;
    if (threads) {
        if (task_extra_of(t) == NULL)
            goto error;
        t->extra->thread_args = PyTuple_Pack(2, args, kwargs ? kwargs : Py_None);
        if (t->extra->thread_args == NULL || scan_deps(t->extra->thread_args, &ctx, 0) < 0)
            goto error;
    }
    else {
        t->args = exec_encode_call(fn, args, kwargs, collect_dep, &ctx);
        if (t->args == NULL)
            goto error;
    }
    if (order_append(t) < 0)
        goto error;
    if (ctx.failed_dep) {
        task_finish(t, 1, NULL, Py_NewRef(ctx.failed_dep->value));
        goto done;
    }
    Py_ssize_t ndeps = PyList_GET_SIZE(ctx.deps);
    if (ndeps) {
        if (task_extra_of(t) == NULL || (t->extra->deps = PyList_AsTuple(ctx.deps)) == NULL)
            goto error;
    }
    for (Py_ssize_t i = 0; i < ndeps; i++) {
        graph_task *d = (graph_task *)PyList_GET_ITEM(ctx.deps, i);
        if (graph_task_finished(d))
            continue;
        if (task_extra_of(d) == NULL)
            goto error;
        if (d->extra->dependents == NULL && (d->extra->dependents = PyList_New(0)) == NULL)
            goto error;
        if (PyList_Append(d->extra->dependents, (PyObject *)t) < 0)
            goto error;
        t->extra->nwaiting++;
    }
    if (recording) {
        PyObject *ids = PyTuple_New(ndeps), *filename, *qualname;
        int line;
        if (ids == NULL)
            goto error;
        for (Py_ssize_t i = 0; i < ndeps; i++)
            PyTuple_SET_ITEM(ids, i, PyLong_FromUnsignedLongLong(
                                         ((graph_task *)PyList_GET_ITEM(ctx.deps, i))->id));
        current_location(&filename, &line);
        qualname = PyObject_GetAttrString(fn, "__qualname__");
        if (qualname == NULL) {
            PyErr_Clear();
            qualname = PyObject_Repr(fn);
        }
        record_event(Py_BuildValue("(sKNOiN)", "task", (unsigned long long)t->id, qualname,
                                   filename, line, ids));
    }
    if (EXTRA(t)->nwaiting == 0 && task_dispatch(t) < 0)
        goto error;
    /* Take in what finished meanwhile, so dependents start while the caller keeps tracing. */
    if (graph_pump() < 0)
        goto error;
done:
    Py_DECREF(ctx.deps);
    return (PyObject *)t;
error:
    Py_DECREF(ctx.deps);
    Py_XDECREF(t);
    return NULL;
}

/* ---- waiting ----------------------------------------------------------------------------- */

static int
wait_finished(graph_task *t)
{
    if (recording && !graph_task_finished(t)) {
        PyObject *filename;
        int line;
        current_location(&filename, &line);
        record_event(Py_BuildValue("(sKOi)", "wait", (unsigned long long)t->id, filename, line));
    }
    while (!graph_task_finished(t)) {
        if (t->state == TASK_WAITING && EXTRA(t)->nwaiting == 0 && task_dispatch(t) < 0)
            return -1;
        progress_report(0);
        if (exec_poll(progress_fn ? 0.1 : -1, on_result, NULL) < 0) {
            if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
                graph_cancel_all();
            return -1;
        }
        /* The executor holds nothing any more (shut down at exit under a thread still waiting):
         * its tasks will never come back. Failing them ends this loop, which would otherwise
         * spin holding the GIL and keep the interpreter from finalizing. */
        if (t->state == TASK_QUEUED && exec_outstanding() == 0)
            fail_inflight(PyExc_RuntimeError,
                          "pydron: the executor was shut down before this task finished");
    }
    return 0;
}

/* ---- submission order ----------------------------------------------------------------------
 * Each thread keeps its tasks in the order the calls were made: plain Python raises the failure
 * of the earliest failing call, so that order decides which exception is raised. Everything in
 * order[0:resolved_upto] is finished and its failure, if any, already raised. */

static _Thread_local PyObject *order;            /* list of tasks */
static _Thread_local Py_ssize_t resolved_upto;
static _Thread_local PyObject *raised;           /* {exception: seq of the task that raised it} */

static PyObject *
order_list(void)
{
    if (order == NULL)
        order = PyList_New(0);
    return order;
}

static int
order_append(graph_task *t)
{
    PyObject *o = order_list();
    if (o == NULL)
        return -1;
    t->seq = PyList_GET_SIZE(o);
    return PyList_Append(o, (PyObject *)t);
}

Py_ssize_t
graph_mark(void)
{
    return order ? PyList_GET_SIZE(order) : 0;
}

/* Raise a task's exception (its own instance, so `except` and `raise` behave as in plain
 * Python; the worker traceback hangs on it) and remember which task raised it. */
static void
raise_task_error(graph_task *t)
{
    t->reported = 1;
    if (raised == NULL)
        raised = PyDict_New();
    if (raised != NULL && t->seq >= 0 && PyDict_GetItem(raised, t->value) == NULL) {
        PyObject *seq = PyLong_FromSsize_t(t->seq);
        if (seq == NULL || PyDict_SetItem(raised, t->value, seq) < 0)
            PyErr_Clear();
        Py_XDECREF(seq);
    }
    /* SetObject, not Restore: chains __context__ to an exception being handled, as a raise in
     * plain Python would; the worker traceback already on the exception is kept. */
    PyErr_SetObject((PyObject *)Py_TYPE(t->value), t->value);
}

static graph_task *
order_item(Py_ssize_t k)
{
    return (graph_task *)PyList_GET_ITEM(order, k);
}

/* Wait for order[resolved_upto:stop]; raise the first failure not raised before. */
int
graph_force_before(Py_ssize_t stop)
{
    if (order == NULL)
        return 0;
    Py_ssize_t k = resolved_upto;
    while (k < stop && k < PyList_GET_SIZE(order)) {
        graph_task *t = order_item(k);
        Py_INCREF(t);
        if (wait_finished(t) < 0) {
            Py_DECREF(t);
            return -1;
        }
        k++;
        if (t->state == TASK_FAILED && !t->reported) {
            resolved_upto = k;
            raise_task_error(t);
            Py_DECREF(t);
            return -1;
        }
        Py_DECREF(t);
    }
    if (k > resolved_upto)
        resolved_upto = k;
    return 0;
}

/* Wait for every task submitted since mark; raise the first failure (an earlier one first). */
int
graph_force_since(Py_ssize_t mark)
{
    if (order == NULL)
        return 0;
    for (Py_ssize_t k = mark > resolved_upto ? mark : resolved_upto;
         k < PyList_GET_SIZE(order); k++) {
        graph_task *t = order_item(k);
        Py_INCREF(t);
        if (wait_finished(t) < 0) {
            Py_DECREF(t);
            return -1;
        }
        if (t->state == TASK_FAILED && !t->reported) {
            if (graph_force_before(t->seq) == 0)
                raise_task_error(t);
            Py_DECREF(t);
            return -1;
        }
        Py_DECREF(t);
    }
    return 0;
}

/* Submission index of the task whose failure exc is, or -1. */
static Py_ssize_t
raised_by(PyObject *exc)
{
    if (raised == NULL || exc == NULL)
        return -1;
    PyObject *seq = PyDict_GetItem(raised, exc);
    return seq ? PyLong_AsSsize_t(seq) : -1;
}

Py_ssize_t
graph_task_seq(graph_task *t)
{
    return t->seq;
}

int
graph_task_undone(graph_task *t)
{
    return t->undone;
}

int
graph_task_log_store(graph_task *t, PyObject *name, PyObject *old)
{
    if (task_extra_of(t) == NULL)
        return -1;
    if (t->extra->prev == NULL && (t->extra->prev = PyDict_New()) == NULL)
        return -1;
    return PyDict_SetItem(t->extra->prev, name, old);
}

PyObject *
graph_task_prev(graph_task *t, PyObject *name)
{
    return EXTRA(t)->prev ? PyDict_GetItem(EXTRA(t)->prev, name) : NULL;
}

int
graph_handler_guard(PyObject *exc, Py_ssize_t mark)
{
    Py_ssize_t k = raised_by(exc);
    if (k >= 0 && k < mark) {
        /* The failure of a task submitted before the region: it belongs to an outer try. */
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        return -1;
    }
    return graph_force_before(mark);
}

/* {exception: submission index}: how far the order reached when exc first met a handler. */
static _Thread_local PyObject *horizons;

static void
set_horizon(PyObject *exc, Py_ssize_t horizon)
{
    if (horizons == NULL && (horizons = PyDict_New()) == NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *h = PyLong_FromSsize_t(horizon);
    if (h == NULL || PyDict_SetItem(horizons, exc, h) < 0)
        PyErr_Clear();
    Py_XDECREF(h);
}

PyObject *
graph_enter_handler(PyObject *exc, Py_ssize_t mark, Py_ssize_t *cutp, Py_ssize_t *horizonp)
{
    /* The calls made before the exception first reached a handler are the ones plain Python
     * may not have made; handlers and finally blocks on its way made theirs. */
    Py_ssize_t horizon = graph_mark();
    PyObject *seen = horizons ? PyDict_GetItem(horizons, exc) : NULL;
    if (seen)
        horizon = PyLong_AsSsize_t(seen);
    Py_ssize_t cut = horizon, k = raised_by(exc);
    if (k >= 0) {
        if (k < mark) {
            /* Failed before the region began: not this handler's business. */
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            return NULL;
        }
        if (k < cut)
            cut = k;
    }
    PyObject *result = Py_NewRef(exc);
    Py_ssize_t from = mark > resolved_upto ? mark : resolved_upto;
    for (Py_ssize_t i = from; i < cut && order && i < PyList_GET_SIZE(order); i++) {
        graph_task *t = order_item(i);
        Py_INCREF(t);
        if (wait_finished(t) < 0) {
            Py_DECREF(t);
            Py_DECREF(result);
            return NULL;
        }
        if (t->state == TASK_FAILED && !t->reported) {
            /* An earlier call of the region failed first: its exception is the one caught. */
            raise_task_error(t);
            PyErr_Clear();
            Py_SETREF(result, Py_NewRef(t->value));
            cut = i;
            Py_DECREF(t);
            break;
        }
        Py_DECREF(t);
    }
    /* Plain Python never completed the calls from cut on: their failures never count. */
    for (Py_ssize_t i = cut; order && i < horizon && i < PyList_GET_SIZE(order); i++) {
        order_item(i)->undone = 1;
        if (i > cut)
            order_item(i)->reported = 1;
    }
    set_horizon(exc, horizon);
    set_horizon(result, horizon);
    *cutp = cut;
    *horizonp = horizon;
    return result;
}

/* End of a top-level scheduled call that started at mark: forget order[mark:]. */
void
graph_order_truncate(Py_ssize_t mark)
{
    if (order == NULL || mark >= PyList_GET_SIZE(order))
        goto forget_raised;
    for (Py_ssize_t i = mark; i < PyList_GET_SIZE(order); i++)
        order_item(i)->seq = -1;
    PyObject *exc = PyErr_GetRaisedException();
    PyList_SetSlice(order, mark, PyList_GET_SIZE(order), NULL);
    PyErr_SetRaisedException(exc);
    if (resolved_upto > mark)
        resolved_upto = mark;
forget_raised:
    if (mark == 0 && raised != NULL)
        PyDict_Clear(raised);
    if (mark == 0 && horizons != NULL)
        PyDict_Clear(horizons);
}

Py_ssize_t
graph_raised_by(PyObject *exc)
{
    return raised_by(exc);
}

static PyObject *
task_force_value(graph_task *t)
{
    if (t->state != TASK_DONE) {
        if (wait_finished(t) < 0)
            return NULL;
        if (t->state == TASK_FAILED) {
            /* An earlier call that failed is the one plain Python raised. */
            if (t->seq >= 0 && graph_force_before(t->seq) < 0)
                return NULL;
            raise_task_error(t);
            return NULL;
        }
    }
    if (t->value == NULL) {
        t->value = exec_blob_decode(t->blob);
        if (t->value == NULL)
            return NULL;
        /* The encoding stays: a task submitted later may depend on this one and gets it as it
         * is (for arrays both views share the arena block, so this costs no memory). */
    }
    return Py_NewRef(t->value);
}

PyObject *
graph_wait(graph_task *t)
{
    return task_force_value(t);
}

/* Fail every task handed to exec and not back, with exc_type(message). */
static void
fail_inflight(PyObject *exc_type, const char *message)
{
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *tasks = PyDict_Values(inflight);
    PyDict_Clear(inflight);
    if (tasks != NULL) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tasks); i++) {
            PyObject *err = PyObject_CallFunction(exc_type, "s", message);
            if (err == NULL) {
                PyErr_Clear();
                continue;
            }
            task_finish((graph_task *)PyList_GET_ITEM(tasks, i), 1, NULL, err);
        }
        Py_DECREF(tasks);
    }
    PyErr_Clear();
    PyErr_SetRaisedException(exc);
}

void
graph_cancel_all(void)
{
    PyObject *exc = PyErr_GetRaisedException();
    exec_cancel_all();
    PyErr_SetRaisedException(exc);
    fail_inflight(PyExc_KeyboardInterrupt, "cancelled by Ctrl-C");
}

PyObject *
graph_stats(void)
{
    return Py_BuildValue("{s:K,s:K,s:n,s:n}", "submitted", (unsigned long long)n_submitted,
                         "finished", (unsigned long long)n_finished, "inflight",
                         PyDict_GET_SIZE(inflight), "live", graph_live_tasks);
}

/* Turn an event log on (a fresh list) or off; returns what it held (new reference). */
static PyObject *
swap_event_log(PyObject **log, PyObject *on)
{
    int enable = PyObject_IsTrue(on);
    if (enable < 0)
        return NULL;
    PyObject *events = *log ? *log : PyList_New(0);
    *log = enable ? PyList_New(0) : NULL;
    if (enable && *log == NULL) {
        Py_XDECREF(events);
        return NULL;
    }
    return events;
}

/* _record(on) -> the events recorded since the last _record(True) when turning it off. */
static PyObject *
graph_record(PyObject *module, PyObject *on)
{
    return swap_event_log(&recording, on);
}

/* _set_progress(fn | None, after_seconds) */
static PyObject *
graph_set_progress(PyObject *module, PyObject *args)
{
    PyObject *fn;
    double after = 1.0;
    if (!PyArg_ParseTuple(args, "O|d", &fn, &after))
        return NULL;
    Py_XSETREF(progress_fn, fn == Py_None ? NULL : Py_NewRef(fn));
    progress_after = after;
    Py_RETURN_NONE;
}

/* _timeline(on) -> the task events recorded since the last _timeline(True) when turning off. */
static PyObject *
graph_timeline(PyObject *module, PyObject *on)
{
    return swap_event_log(&timeline, on);
}

static PyObject *
graph_clock(PyObject *module, PyObject *unused)
{
    return PyFloat_FromDouble(now_seconds());
}

static PyMethodDef graph_methods[] = {
    {"_timeline", graph_timeline, METH_O,
     "_timeline(on): record (qualname, worker, submitted, started, finished, failed) per task."},
    {"_clock", graph_clock, METH_NOARGS, "The clock of timeline events (CLOCK_MONOTONIC)."},
    {"_record", graph_record, METH_O, "_record(on): record tasks and waits (pydron.visualize)."},
    {"_set_progress", graph_set_progress, METH_VARARGS,
     "_set_progress(fn, after=1.0): report progress of long scheduled calls."},
    {NULL},
};

int
graph_module_init(PyObject *module)
{
    if (PyModule_AddFunctions(module, graph_methods) < 0)
        return -1;
    graph_task_type = (PyTypeObject *)PyType_FromSpec(&task_spec);
    if (graph_task_type == NULL)
        return -1;
    if (PyModule_AddObjectRef(module, "Pending", (PyObject *)graph_task_type) < 0)
        return -1;
    inflight = PyDict_New();
    return inflight ? 0 : -1;
}
