/* trace/force.c — where pending results turn into values: shallow and deep forcing (in place,
 * so aliasing and identity stay as plain Python had them), and the end of a top-level scheduled
 * call (a session), where everything it started is waited for.
 * Thread and GIL model: GIL held; a wait releases it inside exec_poll, and another thread may
 * change a container meanwhile (the in-place replacement checks the slot still holds the task). */
#include "trace/internal.h"

PyObject *
trace__force(PyObject *x)
{
    if (graph_is_task(x))
        return graph_wait((graph_task *)x);
    return Py_NewRef(x);
}

/* ---- deep forcing ------------------------------------------------------------------------------
 * Pending values live in exact lists, tuples and dicts (where the trace moved them). While this
 * thread has moved some into containers (the undo log is not empty), such a container may also
 * hang off an object of the user's own classes (self.items, vars(obj)[k], a slot): then the walk
 * descends into instance dicts and slots too, with a budget of WALK_BUDGET instances per walk, so
 * a large object graph costs a bounded amount. The walk keeps its own stack (any depth, as plain
 * Python's repr or pickle would reach) and a visited set (each container once, cycles end). */

#define WALK_BUDGET 100000

typedef struct {
    PyObject *obj;             /* the container or instance (strong) */
    PyObject *items;           /* dict: its (key, value) pairs worth a look; instance: its dict
                                * and slot values; else NULL (strong) */
    Py_ssize_t i;              /* next item */
} walk_frame;

typedef struct {
    int objects;               /* descend into instances of heap types */
    PyObject **seen;           /* open addressing set of visited containers and instances */
    size_t seen_cap, seen_count;
    size_t budget;
    walk_frame *stack;
    Py_ssize_t depth, stack_cap;
} walk;

static void
walk_init(walk *w, int objects)
{
    w->objects = objects;
    w->seen = NULL;
    w->seen_cap = w->seen_count = 0;
    w->budget = WALK_BUDGET;
    w->stack = NULL;
    w->depth = w->stack_cap = 0;
}

static void
walk_clear(walk *w)
{
    PyMem_Free(w->seen);
    PyMem_Free(w->stack);
}

/* 1 if obj was not seen before (it is now), 0 if it was, -1 + MemoryError. */
static int
walk_first_visit(walk *w, PyObject *obj)
{
    if ((w->seen_count + 1) * 2 > w->seen_cap) {
        size_t cap = w->seen_cap ? w->seen_cap * 2 : 64;
        PyObject **seen = PyMem_Calloc(cap, sizeof(PyObject *));
        if (seen == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; i < w->seen_cap; i++) {
            if (w->seen[i] == NULL)
                continue;
            size_t h = ((uintptr_t)w->seen[i] >> 4) & (cap - 1);
            while (seen[h])
                h = (h + 1) & (cap - 1);
            seen[h] = w->seen[i];
        }
        PyMem_Free(w->seen);
        w->seen = seen;
        w->seen_cap = cap;
    }
    size_t h = ((uintptr_t)obj >> 4) & (w->seen_cap - 1);
    while (w->seen[h]) {
        if (w->seen[h] == obj)
            return 0;
        h = (h + 1) & (w->seen_cap - 1);
    }
    w->seen[h] = obj;
    w->seen_count++;
    return 1;
}

/* An instance of one of the user's own classes (heap types), whose dict and slots may hold a
 * container of pending values. Not classes, modules, functions or code. */
static int
is_user_instance(PyObject *obj)
{
    PyTypeObject *t = Py_TYPE(obj);
    return PyType_HasFeature(t, Py_TPFLAGS_HEAPTYPE) && !PyType_Check(obj) &&
           !PyModule_Check(obj) && !PyFunction_Check(obj) && !PyCode_Check(obj) &&
           !graph_is_task(obj);
}

/* Whether the walk has anything to look at inside obj. */
static inline int
walkable(PyObject *obj, walk *w)
{
    return PyList_CheckExact(obj) || PyTuple_CheckExact(obj) || PyDict_CheckExact(obj) ||
           (w->objects && is_user_instance(obj));
}

static PyObject *str_dict;         /* "__dict__", interned on first use */

/* An instance's dict (when exact) and the object slots of the user's classes along its MRO, as
 * a new list. NULL + exception on error. */
static PyObject *
instance_items(PyObject *obj)
{
    PyObject *items = PyList_New(0);
    if (items == NULL)
        return NULL;
    PyTypeObject *t = Py_TYPE(obj);
    if (t->tp_dictoffset != 0 || PyType_HasFeature(t, Py_TPFLAGS_MANAGED_DICT)) {
        PyObject *dict;
        if (str_dict == NULL && (str_dict = PyUnicode_InternFromString("__dict__")) == NULL)
            goto error;
        if (compat_lookup_attr(obj, str_dict, &dict) < 0)
            goto error;
        if (dict != NULL) {
            int rc = PyDict_CheckExact(dict) ? PyList_Append(items, dict) : 0;
            Py_DECREF(dict);
            if (rc < 0)
                goto error;
        }
    }
    PyObject *mro = t->tp_mro;
    for (Py_ssize_t i = 0; mro && i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *base = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!PyType_HasFeature(base, Py_TPFLAGS_HEAPTYPE) || base->tp_members == NULL)
            continue;
        for (PyMemberDef *m = base->tp_members; m->name; m++) {
            if (m->type != COMPAT_T_OBJECT_EX || (m->flags & COMPAT_READONLY))
                continue;
            PyObject *v = PyMember_GetOne((const char *)obj, m);
            if (v == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                    goto error;
                PyErr_Clear();          /* an unset slot */
                continue;
            }
            int rc = PyList_Append(items, v);
            Py_DECREF(v);
            if (rc < 0)
                goto error;
        }
    }
    return items;
error:
    Py_DECREF(items);
    return NULL;
}

/* A dict's (key, value) pairs whose value is a task or walkable, as a new list (a snapshot: a
 * wait may let another thread change the dict). NULL + exception on error. */
static PyObject *
dict_items(PyObject *dict, walk *w)
{
    PyObject *found = PyList_New(0), *k, *v;
    Py_ssize_t pos = 0;
    if (found == NULL)
        return NULL;
    while (PyDict_Next(dict, &pos, &k, &v)) {
        if (v != dict && (graph_is_task(v) || walkable(v, w))) {
            PyObject *pair = PyTuple_Pack(2, k, v);
            if (pair == NULL || PyList_Append(found, pair) < 0) {
                Py_XDECREF(pair);
                Py_DECREF(found);
                return NULL;
            }
            Py_DECREF(pair);
        }
    }
    return found;
}

/* Push obj on the walk's stack if it is walkable and not visited yet. Borrows obj.
 * 0, or -1 + exception. */
static int
walk_push(walk *w, PyObject *obj)
{
    int instance = !PyList_CheckExact(obj) && !PyTuple_CheckExact(obj) && !PyDict_CheckExact(obj);
    if (instance && w->budget == 0)
        return 0;
    int first = walk_first_visit(w, obj);
    if (first <= 0)
        return first;
    PyObject *items = NULL;
    if (instance) {
        w->budget--;
        items = instance_items(obj);
    }
    else if (PyDict_CheckExact(obj))
        items = dict_items(obj, w);
    if ((instance || PyDict_CheckExact(obj)) && items == NULL)
        return -1;
    if (w->depth == w->stack_cap) {
        Py_ssize_t cap = w->stack_cap ? w->stack_cap * 2 : 32;
        walk_frame *stack = PyMem_Realloc(w->stack, cap * sizeof(walk_frame));
        if (stack == NULL) {
            Py_XDECREF(items);
            PyErr_NoMemory();
            return -1;
        }
        w->stack = stack;
        w->stack_cap = cap;
    }
    w->stack[w->depth++] = (walk_frame){Py_NewRef(obj), items, 0};
    return 0;
}

/* The next item of the top frame worth descending into, as a new reference in *child; a task met
 * on the way is waited for and replaced in place (if its slot still holds it). 1 with a child,
 * 0 when the frame is done, -1 + exception. */
static int
walk_next(walk *w, walk_frame *f, PyObject **child)
{
    PyObject *obj = f->obj;
    if (PyList_CheckExact(obj)) {
        for (; f->i < PyList_GET_SIZE(obj); f->i++) {
            PyObject *item = PyList_GET_ITEM(obj, f->i);
            if (graph_is_task(item)) {
                Py_INCREF(item);
                PyObject *v = graph_wait((graph_task *)item);
                if (v == NULL) {
                    Py_DECREF(item);
                    return -1;
                }
                /* Another thread may have changed the list while we waited. */
                if (f->i < PyList_GET_SIZE(obj) && PyList_GET_ITEM(obj, f->i) == item)
                    PyList_SetItem(obj, f->i, v);
                else
                    Py_DECREF(v);
                Py_DECREF(item);
            }
            else if (item != obj && walkable(item, w)) {
                *child = Py_NewRef(item);
                f->i++;
                return 1;
            }
        }
    }
    else if (PyTuple_CheckExact(obj)) {
        for (; f->i < PyTuple_GET_SIZE(obj); f->i++) {
            PyObject *item = PyTuple_GET_ITEM(obj, f->i);
            if (graph_is_task(item)) {
                PyObject *v = graph_wait((graph_task *)item);
                if (v == NULL)
                    return -1;
                if (PyTuple_GET_ITEM(obj, f->i) == item) {
                    PyTuple_SET_ITEM(obj, f->i, v);
                    Py_DECREF(item);
                }
                else
                    Py_DECREF(v);
            }
            else if (walkable(item, w)) {
                *child = Py_NewRef(item);
                f->i++;
                return 1;
            }
        }
    }
    else if (PyDict_CheckExact(obj)) {
        for (; f->i < PyList_GET_SIZE(f->items); f->i++) {
            PyObject *pair = PyList_GET_ITEM(f->items, f->i);
            PyObject *k = PyTuple_GET_ITEM(pair, 0), *v = PyTuple_GET_ITEM(pair, 1);
            if (!graph_is_task(v)) {
                *child = Py_NewRef(v);
                f->i++;
                return 1;
            }
            PyObject *value = graph_wait((graph_task *)v);
            if (value == NULL)
                return -1;
            PyObject *now = PyDict_GetItemWithError(obj, k);
            int rc = now == v ? PyDict_SetItem(obj, k, value) : 0;
            Py_DECREF(value);
            if (rc < 0 || (now == NULL && PyErr_Occurred()))
                return -1;
        }
    }
    else if (f->i < PyList_GET_SIZE(f->items)) {          /* an instance: dict and slots */
        *child = Py_NewRef(PyList_GET_ITEM(f->items, f->i++));
        return 1;
    }
    return 0;
}

/* Replace every task reachable from obj (through exact containers, and with w->objects through
 * instances) by its value, depth first in the order plain Python would meet them. Borrows obj;
 * replaced items become its own references. 0, or -1 + exception. */
static int
force_inplace(PyObject *obj, walk *w)
{
    Py_ssize_t base = w->depth;
    int rc = walk_push(w, obj);
    while (rc == 0 && w->depth > base) {
        walk_frame *f = &w->stack[w->depth - 1];
        PyObject *child = NULL;
        int more = walk_next(w, f, &child);
        if (more < 0)
            rc = -1;
        else if (more > 0) {
            rc = walkable(child, w) ? walk_push(w, child) : 0;
            Py_DECREF(child);
        }
        else {
            w->depth--;
            Py_DECREF(f->obj);
            Py_XDECREF(f->items);
        }
    }
    while (w->depth > base) {          /* after an error: drop what is left */
        walk_frame *f = &w->stack[--w->depth];
        Py_DECREF(f->obj);
        Py_XDECREF(f->items);
    }
    return rc;
}

PyObject *
trace__force_deep(PyObject *x)
{
    if (graph_live_tasks == 0)
        return Py_NewRef(x);
    if (graph_is_task(x))
        return graph_wait((graph_task *)x);
    walk w;
    walk_init(&w, graph_moves_count() > 0);
    graph_wait_group_begin();
    int rc = walkable(x, &w) ? force_inplace(x, &w) : 0;
    graph_wait_group_end();
    walk_clear(&w);
    return rc < 0 ? NULL : Py_NewRef(x);
}

/* ---- escapes through a callee's globals and closure ----------------------------------------------
 * A plain function may read a container of pending values without being handed it: a module
 * global, a class attribute, a closure cell. Before such a callee runs, the containers the trace
 * moved pending values into (the undo log) that it can reach that way are forced: those met in
 * its globals, in the dicts of the classes among its globals, and in its closure cells; objects
 * met there are walked as arguments are. */

/* The logged containers as a walk's visited set would see them: a pointer set. */
typedef struct {
    PyObject **set;
    size_t cap;
} logged;

static int
logged_init(logged *l)
{
    Py_ssize_t n = graph_moves_count();
    size_t cap = 16;
    while (cap < (size_t)n * 2)
        cap *= 2;
    l->set = PyMem_Calloc(cap, sizeof(PyObject *));
    if (l->set == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    l->cap = cap;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = graph_moved_container(i);
        size_t h = ((uintptr_t)c >> 4) & (cap - 1);
        while (l->set[h] && l->set[h] != c)
            h = (h + 1) & (cap - 1);
        l->set[h] = c;
    }
    return 0;
}

static int
is_logged(const logged *l, PyObject *c)
{
    size_t h = ((uintptr_t)c >> 4) & (l->cap - 1);
    while (l->set[h]) {
        if (l->set[h] == c)
            return 1;
        h = (h + 1) & (l->cap - 1);
    }
    return 0;
}

/* A value a callee reaches by name: a logged container is forced, an instance walked, a class's
 * attributes looked at for logged containers. Borrows v. 0, or -1 + exception. */
static int
force_reached(PyObject *v, const logged *l, walk *w)
{
    if ((PyList_CheckExact(v) || PyDict_CheckExact(v)) && is_logged(l, v))
        return force_inplace(v, w);
    if (is_user_instance(v))
        return force_inplace(v, w);
    if (PyType_Check(v) && PyType_HasFeature((PyTypeObject *)v, Py_TPFLAGS_HEAPTYPE)) {
        PyObject *dict = ((PyTypeObject *)v)->tp_dict, *k, *a;
        Py_ssize_t pos = 0;
        while (dict && PyDict_Next(dict, &pos, &k, &a))
            if ((PyList_CheckExact(a) || PyDict_CheckExact(a)) && is_logged(l, a) &&
                force_inplace(a, w) < 0)
                return -1;
    }
    return 0;
}

int
trace__force_escapes(PyObject *callable)
{
    if (graph_live_tasks == 0 || graph_moves_count() == 0)
        return 0;
    PyObject *fn = callable;
    if (PyMethod_Check(fn))
        fn = PyMethod_GET_FUNCTION(fn);
    if (!trace__is_function(fn))
        return 0;                  /* C callees read only what they are handed */
    logged l;
    if (logged_init(&l) < 0)
        return -1;
    walk w;
    walk_init(&w, 1);
    int rc = 0;
    PyObject *globals = PyFunction_GET_GLOBALS(fn), *k, *v;
    Py_ssize_t pos = 0;
    while (rc == 0 && globals && PyDict_Next(globals, &pos, &k, &v))
        rc = force_reached(v, &l, &w);
    PyObject *closure = PyFunction_GET_CLOSURE(fn);
    for (Py_ssize_t i = 0; rc == 0 && closure && i < PyTuple_GET_SIZE(closure); i++) {
        PyObject *cell = PyTuple_GET_ITEM(closure, i);
        PyObject *content = PyCell_GET(cell);
        if (content)
            rc = force_reached(content, &l, &w);
    }
    walk_clear(&w);
    PyMem_Free(l.set);
    return rc;
}

void
trace__session_begin(trace_session *s, PyObject *name)
{
    graph_session_enter(name);
    exec_call_scope(+1);
    s->order = graph_mark();
    s->moved = graph_moves_mark();
}

/* Steals result; returns a new reference or NULL. */
static PyObject *
session_finish(trace_session *s, PyObject *result)
{
    if (result == NULL) {
        /* The call raised. A task that failed before that point would have raised first in
         * plain Python, so wait for those, unless the user interrupted us. */
        PyObject *exc = PyErr_GetRaisedException();
        Py_ssize_t k = graph_raised_by(exc);
        /* A task's failure: its traceback shows the line of the call, as plain Python's. */
        if (k >= 0)
            trace__site_fix_traceback(exc, graph_failed_site(exc));
        if (k < 0 && PyErr_GivenExceptionMatches(exc, PyExc_KeyboardInterrupt)) {
            /* Ctrl-C in this thread (not a task that raised KeyboardInterrupt itself): what
             * this call started is cancelled; other threads' calls go on. */
            PyErr_SetRaisedException(exc);
            graph_cancel_mine();
            return NULL;
        }
        if (graph_force_before(k >= 0 ? k : graph_mark()) == 0)
            PyErr_SetRaisedException(exc);
        else
            Py_XDECREF(exc);
        return NULL;
    }
    if (graph_force_since(s->order) < 0 || graph_force_before(graph_mark()) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    /* Pendings moved into lists reachable from objects (box.items.append(f(x))) get their
     * values too: no pending outlives the call. */
    for (Py_ssize_t i = s->moved; i < graph_moves_count(); i++) {
        PyObject *v = trace__force_deep(graph_moved_container(i));
        if (v == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(v);
    }
    PyObject *value = trace__force_deep(result);
    Py_DECREF(result);
    return value;
}

PyObject *
trace__session_end(trace_session *s, PyObject *result)
{
    graph_wait_group_begin();          /* the end of the call is one wait, at its return */
    result = session_finish(s, result);
    graph_wait_group_end();
    graph_moves_truncate(s->moved);
    graph_order_truncate(s->order);
    graph_session_exit();
    exec_call_scope(-1);
    return result;
}
