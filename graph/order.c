/* graph/order.c — which failure plain Python would have raised, and what it would have seen
 * after an exception: program order, try regions and the undo log, in one place.
 *
 * The rule. Plain Python makes calls one after another, so the exception a scheduled call
 * raises is the failure of the *earliest* failing call, and a `try` handler sees only what
 * happened before that call failed. pydron runs calls at once, so:
 *   - each thread keeps its tasks in submission order (`order`); a failure is raised at the
 *     latest when the scheduled call returns, and always after every earlier task was checked
 *     (graph_force_before / graph_force_since);
 *   - a try/with region remembers where it began (a mark = a position in `order`). At the
 *     entry of its handler (graph enter_handler) the tasks of the region submitted before the
 *     exception arose are checked first: an earlier failure is the exception the handler sees.
 *     Calls plain Python never completed (from the failing one up to where the trace was when
 *     the exception first met a handler: the *horizon*) are marked undone: their failures never
 *     count;
 *   - the undo log takes their results back out of where the trace moved them: locals (each
 *     store of a maybe-pending value in a region logs the local's previous value: log_store /
 *     undo) and containers (graph_note_move logs every exact list or dict a pending was moved
 *     into; at a handler the undone ones are removed from them).
 * The helpers below are loaded as constants by rewritten bytecode (pydron/_rewrite): mark,
 * force_since, force_before, enter_handler, handler_guard, log_store, undo.
 *
 * Thread and GIL model: GIL held. The order, the raised and horizon tables and the moved-into
 * log are per thread (_Thread_local): a scheduled call's failures belong to its thread. */
#include "graph/internal.h"

static _Thread_local PyObject *order;            /* list of tasks */
static _Thread_local Py_ssize_t resolved_upto;   /* order[:resolved_upto] finished, raised once */
static _Thread_local PyObject *raised;           /* {exception: seq of the task that raised it} */
static _Thread_local PyObject *horizons;         /* {exception: order length when first handled} */
static _Thread_local PyObject *moved_into;       /* containers a pending was moved into */

/* ---- the order ------------------------------------------------------------------------------- */

int
graph__order_append(graph_task *t)
{
    if (order == NULL && (order = PyList_New(0)) == NULL)
        return -1;
    t->seq = PyList_GET_SIZE(order);
    return PyList_Append(order, (PyObject *)t);
}

PyObject *
graph_detach_since(Py_ssize_t mark)
{
    if (order == NULL || mark >= PyList_GET_SIZE(order))
        return PyList_New(0);
    PyObject *out = PyList_GetSlice(order, mark, PyList_GET_SIZE(order));
    if (out == NULL)
        return NULL;
    graph_order_truncate(mark);
    return out;
}

int
graph_order_readd(PyObject *task)
{
    graph_task *t = (graph_task *)task;
    if (!graph_is_task(task) || t->seq >= 0 || t->state == TASK_FAILED)
        return 0;
    return graph__order_append(t) < 0 ? -1 : 1;
}

Py_ssize_t
graph_mark(void)
{
    return order ? PyList_GET_SIZE(order) : 0;
}

/* Borrowed reference (the order list keeps it). */
static graph_task *
order_item(Py_ssize_t k)
{
    return (graph_task *)PyList_GET_ITEM(order, k);
}

PyObject *
graph__order_unfinished(Py_ssize_t from)
{
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = from; out && order && i < PyList_GET_SIZE(order); i++) {
        PyObject *t = PyList_GET_ITEM(order, i);
        if (!graph_task_finished((graph_task *)t) && PyList_Append(out, t) < 0)
            Py_CLEAR(out);
    }
    return out;
}

int
graph__raise_task_error(graph_task *t)
{
    t->reported = 1;
    if (raised == NULL)
        raised = PyDict_New();
    if (raised != NULL && t->seq >= 0 && PyDict_GetItem(raised, t->value) == NULL) {
        PyObject *seq = PyLong_FromSsize_t(t->seq);
        if (seq == NULL || PyDict_SetItem(raised, t->value, seq) < 0)
            PyErr_Clear();       /* only the try bookkeeping is lost: the error is still raised */
        Py_XDECREF(seq);
    }
    /* SetObject, not Restore: chains __context__ to an exception being handled, as a raise in
     * plain Python would; the worker traceback already on the exception is kept. */
    PyErr_SetObject((PyObject *)Py_TYPE(t->value), t->value);
    return -1;
}

int
graph_force_before(Py_ssize_t stop)
{
    if (order == NULL)
        return 0;
    Py_ssize_t k = resolved_upto;
    while (k < stop && k < PyList_GET_SIZE(order)) {
        graph_task *t = order_item(k);
        Py_INCREF(t);
        if (graph__wait_finished(t) < 0) {
            Py_DECREF(t);
            return -1;
        }
        k++;
        if (t->state == TASK_FAILED && !t->reported) {
            resolved_upto = k;
            graph__raise_task_error(t);
            Py_DECREF(t);
            return -1;
        }
        Py_DECREF(t);
    }
    if (k > resolved_upto)
        resolved_upto = k;
    return 0;
}

int
graph_force_since(Py_ssize_t mark)
{
    if (order == NULL)
        return 0;
    for (Py_ssize_t k = mark > resolved_upto ? mark : resolved_upto;
         k < PyList_GET_SIZE(order); k++) {
        graph_task *t = order_item(k);
        Py_INCREF(t);
        if (graph__wait_finished(t) < 0) {
            Py_DECREF(t);
            return -1;
        }
        if (t->state == TASK_FAILED && !t->reported) {
            if (graph_force_before(t->seq) == 0)
                graph__raise_task_error(t);
            Py_DECREF(t);
            return -1;
        }
        Py_DECREF(t);
    }
    return 0;
}

Py_ssize_t
graph_raised_by(PyObject *exc)
{
    if (raised == NULL || exc == NULL)
        return -1;
    PyObject *seq = PyDict_GetItem(raised, exc);
    return seq ? PyLong_AsSsize_t(seq) : -1;
}

void
graph_order_truncate(Py_ssize_t mark)
{
    if (order != NULL && mark < PyList_GET_SIZE(order)) {
        for (Py_ssize_t i = mark; i < PyList_GET_SIZE(order); i++)
            order_item(i)->seq = -1;
        PyObject *exc = PyErr_GetRaisedException();
        PyList_SetSlice(order, mark, PyList_GET_SIZE(order), NULL);
        PyErr_SetRaisedException(exc);
        if (resolved_upto > mark)
            resolved_upto = mark;
    }
    if (mark == 0 && raised != NULL)
        PyDict_Clear(raised);
    if (mark == 0 && horizons != NULL)
        PyDict_Clear(horizons);
}

/* ---- try regions ----------------------------------------------------------------------------- */

/* Borrows exc; the horizons dict takes its own reference. */
static void
set_horizon(PyObject *exc, Py_ssize_t horizon)
{
    if (horizons == NULL && (horizons = PyDict_New()) == NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *h = PyLong_FromSsize_t(horizon);
    if (h == NULL || PyDict_SetItem(horizons, exc, h) < 0)
        PyErr_Clear();           /* a later handler then takes the current length: safe side */
    Py_XDECREF(h);
}

/* At the entry of the handler of a region entered at mark, reached with exc: the exception the
 * handler must see (new reference): the region's first failure. Calls plain Python never
 * completed (*cut <= index < *horizon) are marked undone. NULL + exception when exc belongs to
 * a task submitted before the region (an outer try's business). */
static PyObject *
enter_handler(PyObject *exc, Py_ssize_t mark, Py_ssize_t *cutp, Py_ssize_t *horizonp)
{
    /* The calls made before the exception first reached a handler are the ones plain Python
     * may not have made; handlers and finally blocks on its way made theirs. */
    Py_ssize_t horizon = graph_mark();
    PyObject *seen = horizons ? PyDict_GetItem(horizons, exc) : NULL;
    if (seen)
        horizon = PyLong_AsSsize_t(seen);
    Py_ssize_t cut = horizon, k = graph_raised_by(exc);
    if (k >= 0) {
        if (k < mark) {
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
        if (graph__wait_finished(t) < 0) {
            Py_DECREF(t);
            Py_DECREF(result);
            return NULL;
        }
        if (t->state == TASK_FAILED && !t->reported) {
            /* An earlier call of the region failed first: its exception is the one caught. */
            graph__raise_task_error(t);
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

/* ---- the undo log ---------------------------------------------------------------------------- */

int
graph_note_move(PyObject *container)
{
    if (moved_into == NULL && (moved_into = PyList_New(0)) == NULL)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(moved_into);
    if (n && PyList_GET_ITEM(moved_into, n - 1) == container)
        return 0;
    return PyList_Append(moved_into, container);
}

Py_ssize_t
graph_moves_mark(void)
{
    return moved_into ? PyList_GET_SIZE(moved_into) : 0;
}

Py_ssize_t
graph_moves_count(void)
{
    return graph_moves_mark();
}

PyObject *
graph_moved_container(Py_ssize_t i)
{
    return PyList_GET_ITEM(moved_into, i);
}

void
graph_moves_truncate(Py_ssize_t mark)
{
    if (moved_into == NULL || mark >= PyList_GET_SIZE(moved_into))
        return;
    PyObject *exc = PyErr_GetRaisedException();
    if (PyList_SetSlice(moved_into, mark, PyList_GET_SIZE(moved_into), NULL) < 0)
        PyErr_Clear();
    PyErr_SetRaisedException(exc);
}

/* Borrows v. */
static int
in_cut(PyObject *v, Py_ssize_t cut, Py_ssize_t horizon)
{
    if (!graph_is_task(v))
        return 0;
    Py_ssize_t seq = ((graph_task *)v)->seq;
    return cut <= seq && seq < horizon;
}

/* A handler was entered: calls from submission index cut to horizon never happened in plain
 * Python, so their pending values are taken back out of the containers they moved into. */
static int
undo_moves(Py_ssize_t cut, Py_ssize_t horizon)
{
    for (Py_ssize_t i = 0; moved_into && i < PyList_GET_SIZE(moved_into); i++) {
        PyObject *c = PyList_GET_ITEM(moved_into, i);
        if (PyList_CheckExact(c)) {
            for (Py_ssize_t j = PyList_GET_SIZE(c) - 1; j >= 0; j--)
                if (in_cut(PyList_GET_ITEM(c, j), cut, horizon) &&
                    PyList_SetSlice(c, j, j + 1, NULL) < 0)
                    return -1;
        }
        else if (PyDict_CheckExact(c)) {
            PyObject *k, *v, *doomed = PyList_New(0);
            Py_ssize_t pos = 0;
            if (doomed == NULL)
                return -1;
            while (PyDict_Next(c, &pos, &k, &v))
                if (in_cut(v, cut, horizon) && PyList_Append(doomed, k) < 0) {
                    Py_DECREF(doomed);
                    return -1;
                }
            for (Py_ssize_t j = 0; j < PyList_GET_SIZE(doomed); j++)
                if (PyDict_DelItem(c, PyList_GET_ITEM(doomed, j)) < 0)
                    PyErr_Clear();   /* removed meanwhile by another thread: nothing to undo */
            Py_DECREF(doomed);
        }
    }
    return 0;
}

/* Borrows v. */
static int
is_undone(PyObject *v)
{
    return graph_is_task(v) && ((graph_task *)v)->undone;
}

/* ---- helpers loaded by rewritten code ----------------------------------------------------------- */

/* Borrows obj. */
static int
mark_arg(PyObject *obj, Py_ssize_t *m)
{
    *m = PyLong_AsSsize_t(obj);
    return *m == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *
helper_mark(PyObject *module, PyObject *unused)
{
    return PyLong_FromSsize_t(graph_mark());
}

static PyObject *
helper_force_since(PyObject *module, PyObject *mark)
{
    Py_ssize_t m;
    if (mark_arg(mark, &m) < 0)
        return NULL;
    return graph_force_since(m) < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *
helper_force_before(PyObject *module, PyObject *mark)
{
    Py_ssize_t m;
    if (mark_arg(mark, &m) < 0)
        return NULL;
    return graph_force_before(m) < 0 ? NULL : Py_NewRef(Py_None);
}

/* enter_handler(exc, mark) -> the exception the handler of a region entered at mark sees. */
static PyObject *
helper_enter_handler(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    Py_ssize_t m, cut, horizon;
    if (argc != 2) {
        PyErr_SetString(PyExc_TypeError, "enter_handler(exc, mark)");
        return NULL;
    }
    if (mark_arg(argv[1], &m) < 0)
        return NULL;
    PyObject *exc = enter_handler(argv[0], m, &cut, &horizon);
    if (exc != NULL && undo_moves(cut, horizon) < 0)
        Py_CLEAR(exc);
    return exc;
}

/* handler_guard(exc, mark): at a handler's entry, for an enclosing region entered at mark:
 * re-raise exc if it is the failure of a task submitted before mark (it belongs to an outer
 * try), else force what was submitted before mark. */
static PyObject *
helper_handler_guard(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    Py_ssize_t m;
    if (argc != 2) {
        PyErr_SetString(PyExc_TypeError, "handler_guard(exc, mark)");
        return NULL;
    }
    if (mark_arg(argv[1], &m) < 0)
        return NULL;
    Py_ssize_t k = graph_raised_by(argv[0]);
    if (k >= 0 && k < m) {
        PyErr_SetObject((PyObject *)Py_TYPE(argv[0]), argv[0]);
        return NULL;
    }
    return graph_force_before(m) < 0 ? NULL : Py_NewRef(Py_None);
}

/* log_store(new, old, name) -> new: in a try region, local `name` held `old` before a maybe
 * pending value was stored into it. */
static PyObject *
helper_log_store(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 3) {
        PyErr_SetString(PyExc_TypeError, "log_store(new, old, name)");
        return NULL;
    }
    if (graph_is_task(argv[0])) {
        graph_task *t = (graph_task *)argv[0];
        if (graph__extra(t) == NULL)
            return NULL;
        if (t->extra->prev == NULL && (t->extra->prev = PyDict_New()) == NULL)
            return NULL;
        if (PyDict_SetItem(t->extra->prev, argv[2], argv[1]) < 0)
            return NULL;
    }
    return Py_NewRef(argv[0]);
}

/* undo(current, saved, name): at a handler, local `name` assigned in the aborted region gets
 * back the value it held before the calls plain Python never completed (following log_store's
 * record, else saved, its value at the region's entry); a container built there that directly
 * holds such a call gives way to saved too. */
static PyObject *
helper_undo(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 3) {
        PyErr_SetString(PyExc_TypeError, "undo(current, saved, name)");
        return NULL;
    }
    PyObject *current = argv[0], *saved = argv[1], *name = argv[2];
    while (is_undone(current)) {
        graph_task *t = (graph_task *)current;
        PyObject *prev = t->extra && t->extra->prev ? PyDict_GetItem(t->extra->prev, name) : NULL;
        if (prev == NULL)
            return Py_NewRef(saved);
        current = prev;
    }
    int back = 0;
    if (!graph_is_task(current) && current != saved) {
        if (PyList_CheckExact(current) || PyTuple_CheckExact(current)) {
            for (Py_ssize_t i = 0; !back && i < PySequence_Fast_GET_SIZE(current); i++)
                back = is_undone(PySequence_Fast_GET_ITEM(current, i));
        }
        else if (PyDict_CheckExact(current)) {
            PyObject *k, *v;
            Py_ssize_t pos = 0;
            while (!back && PyDict_Next(current, &pos, &k, &v))
                back = is_undone(v);
        }
    }
    return Py_NewRef(back ? saved : current);
}

static PyMethodDef order_methods[] = {
    {"mark", helper_mark, METH_NOARGS, "mark(): the current position in the submission order."},
    {"force_since", helper_force_since, METH_O,
     "force_since(mark): wait for every task submitted since mark; raise the first failure."},
    {"force_before", helper_force_before, METH_O,
     "force_before(mark): wait for every task submitted before mark; raise the first failure."},
    {"enter_handler", (PyCFunction)(void (*)(void))helper_enter_handler, METH_FASTCALL,
     "enter_handler(exc, mark): the exception a handler entered at mark must see."},
    {"handler_guard", (PyCFunction)(void (*)(void))helper_handler_guard, METH_FASTCALL,
     "handler_guard(exc, mark): at a handler's entry, for an enclosing region."},
    {"undo", (PyCFunction)(void (*)(void))helper_undo, METH_FASTCALL,
     "undo(current, saved, name): a local's value after its try region was aborted."},
    {"log_store", (PyCFunction)(void (*)(void))helper_log_store, METH_FASTCALL,
     "log_store(new, old, name): record a local's value before a pending was stored in it."},
    {NULL},
};

int
graph__order_init(PyObject *module)
{
    return PyModule_AddFunctions(module, order_methods);
}
