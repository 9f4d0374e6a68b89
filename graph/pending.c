/* graph/pending.c — the Pending type: a task object, standing in the user's locals and lists for
 * a functional call's result until it is read. The rewrite forces pending values before every
 * consuming instruction; the slots below are the safety net for code it did not reach (they
 * wait for the value and apply the operation to it).
 * Thread and GIL model: GIL held, as for any Python object. */
#include "graph/internal.h"

PyTypeObject *graph_task_type;
Py_ssize_t graph_live_tasks;

static const char *const state_names[] = {"waiting", "queued", "done", "failed"};

task_extra *
graph__extra(graph_task *t)
{
    if (t->extra == NULL && (t->extra = PyMem_Calloc(1, sizeof(task_extra))) == NULL)
        PyErr_NoMemory();
    return t->extra;
}

static int
task_traverse(graph_task *t, visitproc visit, void *arg)
{
    Py_VISIT(t->fn);
    Py_VISIT(t->value);
    if (t->extra) {
        Py_VISIT(t->extra->call);
        Py_VISIT(t->extra->deps);
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
        Py_CLEAR(t->extra->call);
        Py_CLEAR(t->extra->deps);
        Py_CLEAR(t->extra->prev);
    }
    return 0;
}

static void
task_dealloc(graph_task *t)
{
    PyObject_GC_UnTrack(t);
    task_clear(t);
    exec_blob_decref(t->args);
    exec_blob_decref(t->blob);
    if (t->extra) {
        for (Py_ssize_t i = 0; i < t->extra->nlent; i++) {
            exec_blob_unlend(t->extra->lent[i]);
            exec_blob_decref(t->extra->lent[i]);
        }
        PyMem_Free(t->extra->lent);
    }
    PyMem_Free(t->extra);
    if (graph__engine)
        engine_remove(graph__engine, t->node);
    graph_live_tasks--;
    PyObject_GC_Del(t);
}

/* New reference. */
static PyObject *
task_repr(graph_task *t)
{
    PyObject *fname = t->fn ? PyObject_GetAttrString(t->fn, "__qualname__") : NULL;
    if (fname == NULL)
        PyErr_Clear();
    PyObject *r = PyUnicode_FromFormat("<pydron pending #%llu %S %s>", (unsigned long long)t->node,
                                       fname ? fname : Py_None, state_names[t->state]);
    Py_XDECREF(fname);
    return r;
}

/* The safety net: code the rewrite did not reach still sees the value through these slots. */
#define FORCED(t) graph__task_value((graph_task *)(t))

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

/* Borrows a and b (either may be the task); new reference. */
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

/* Borrows its operands; new reference. */
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


graph_task *
graph__task_new(PyObject *fn, int threads)
{
    graph_task *t = PyObject_GC_New(graph_task, graph_task_type);
    if (t == NULL)
        return NULL;
    t->node = 0;
    t->state = TASK_WAITING;
    t->threads = (uint8_t)threads;
    t->reported = t->undone = t->read = t->held = t->join = t->chunk = 0;
    t->fn = Py_NewRef(fn);
    t->args = NULL;
    t->blob = NULL;
    t->value = NULL;
    t->seq = -1;
    t->extra = NULL;
    graph_live_tasks++;
    PyObject_GC_Track(t);
    if (engine_add(graph__engine, t, &t->node) < 0) {
        Py_DECREF(t);
        PyErr_NoMemory();
        return NULL;
    }
    return t;
}

int
graph_task_finished(graph_task *t)
{
    return t->state == TASK_DONE || t->state == TASK_FAILED;
}

int
graph__pending_init(PyObject *module)
{
    graph_task_type = (PyTypeObject *)PyType_FromSpec(&task_spec);
    if (graph_task_type == NULL)
        return -1;
    return PyModule_AddObjectRef(module, "Pending", (PyObject *)graph_task_type);
}
