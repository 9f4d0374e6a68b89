/* trace/replay_calls.c — the calls a graph makes: what kind of callee (functional, scheduled,
 * known pure, other), a functional call's task (reused after a rollback when the same call is
 * made again), a comprehension over one functional callee submitted as a map (graph/bulk.c), and
 * a nested scheduled call through its own graph.
 *
 * Thread and GIL model: GIL held throughout; the tables of pure callables are set at import
 * (replay.c) and only read here; everything of one call is on its C stack. */
#include "trace/replay_internal.h"

/* A builtin method bound to an object (not a module function): its name (new reference), or
 * NULL without exception. */
static PyObject *
builtin_method_name(PyObject *callable)
{
    if (replay__pure_methods == NULL || !PyCFunction_Check(callable))
        return NULL;
    PyObject *self = PyCFunction_GET_SELF(callable);
    if (self == NULL || PyModule_Check(self))
        return NULL;
    PyObject *name = PyUnicode_FromString(((PyCFunctionObject *)callable)->m_ml->ml_name);
    if (name == NULL)
        PyErr_Clear();
    return name;
}

int
replay__callee_kind(PyObject *callable, trace_codeinfo **info_out)
{
    PyObject *fn = PyMethod_Check(callable) ? PyMethod_GET_FUNCTION(callable) : callable;
    if (trace__is_function(fn)) {
        trace_codeinfo *info = trace__codeinfo_get(PyFunction_GET_CODE(fn));
        if (info_out)
            *info_out = info;
        if (info && info->kind == TRACE_FUNCTIONAL)
            return CALLEE_FUNCTIONAL;
        if (info && info->kind == TRACE_SCHEDULED && !info->refused) {
            /* A scheduled callee runs nested: fine when its own graph says it may. */
            if (replay__prepare(fn, info) < 0) {
                PyErr_Clear();
                return CALLEE_OTHER;
            }
            return info->replay && (info->replay->state == REPLAY_READY ||
                                    info->replay->state == REPLAY_SLOWER)
                   ? CALLEE_SCHEDULED : CALLEE_OTHER;
        }
    }
    if (replay__pure_callees != NULL) {
        int found = PySet_Contains(replay__pure_callees, callable);
        if (found < 0) {
            PyErr_Clear();        /* unhashable */
            return CALLEE_OTHER;
        }
        if (found)
            return CALLEE_PURE;
    }
    PyObject *name = builtin_method_name(callable);
    if (name != NULL) {
        PyObject *names = PyDict_GetItemWithError(
            replay__pure_methods, (PyObject *)Py_TYPE(PyCFunction_GET_SELF(callable)));
        int found = names ? PySet_Contains(names, name) : 0;
        Py_DECREF(name);
        if (found < 0 || PyErr_Occurred())
            PyErr_Clear();
        if (found > 0)
            return CALLEE_PURE;
    }
    return CALLEE_OTHER;
}

/* Whether a pure callee's result is always a new object (the call may change it in place). */
int
replay__makes_new_object(PyObject *callable)
{
    int found = PySet_Contains(replay__new_objects, callable);
    if (found < 0) {
        PyErr_Clear();
        found = 0;
    }
    if (!found) {
        PyObject *name = builtin_method_name(callable);
        if (name != NULL) {
            found = PySet_Contains(replay__new_objects, name) > 0;
            Py_DECREF(name);
        }
        PyErr_Clear();
    }
    return found;
}

PyObject *
replay__callee_name(PyObject *callable)
{
    PyObject *n = PyObject_GetAttrString(callable, "__qualname__");
    if (n == NULL) {
        PyErr_Clear();
        n = PyUnicode_FromString(Py_TYPE(callable)->tp_name);
    }
    return n;
}

/* The identity of a functional call for reuse after a wrong guess: (callable's address, then
 * per argument its value when it is a plain scalar, else its address when it is a pending value
 * or an immutable tuple of such), or NULL (no exception) when the call cannot be recognised
 * safely. *kept gets the objects named by address, which the pool keeps alive. */
static PyObject *
call_key(PyObject *callable, PyObject *const *args, Py_ssize_t n, PyObject **kept)
{
    PyObject *key = PyTuple_New(n + 1), *objs = PyTuple_New(n + 1);
    if (key == NULL || objs == NULL)
        goto fail;
    PyTuple_SET_ITEM(key, 0, PyLong_FromVoidPtr(callable));
    PyTuple_SET_ITEM(objs, 0, Py_NewRef(callable));
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *v = args[k], *part;
        if (v == Py_None || PyBool_Check(v) || PyLong_CheckExact(v) || PyUnicode_CheckExact(v) ||
            PyBytes_CheckExact(v) || (PyFloat_CheckExact(v) && PyFloat_AS_DOUBLE(v) ==
                                      PyFloat_AS_DOUBLE(v)))
            part = PyTuple_Pack(2, (PyObject *)Py_TYPE(v), v);
        else if (graph_is_task(v))
            part = PyLong_FromVoidPtr(v);
        else
            goto fail;
        if (part == NULL)
            goto fail;
        PyTuple_SET_ITEM(key, k + 1, part);
        PyTuple_SET_ITEM(objs, k + 1, Py_NewRef(v));
    }
    for (Py_ssize_t k = 0; k <= n; k++)
        if (PyTuple_GET_ITEM(key, k) == NULL)
            goto fail;
    *kept = objs;
    return key;
fail:
    Py_XDECREF(key);
    Py_XDECREF(objs);
    PyErr_Clear();
    return NULL;
}

/* A functional call: the pool's task for the same call if a rollback left one, else a new one;
 * noted for reuse while guesses are open. New reference, or NULL + exception. */
PyObject *
replay__functional_call(run_state *st, PyObject *callable, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    PyObject *kept = NULL, *key = NULL, *task = NULL;
    if (kwnames == NULL && (st->ncp > 0 || (st->pool && PyDict_GET_SIZE(st->pool))))
        key = call_key(callable, args, nargs, &kept);
    if (key != NULL && st->pool != NULL) {
        PyObject *entry = PyDict_GetItemWithError(st->pool, key);
        if (entry != NULL) {
            PyObject *t = Py_NewRef(PyTuple_GET_ITEM(entry, 0));
            if (PyDict_DelItem(st->pool, key) < 0) {
                Py_DECREF(t);
                goto error;
            }
            int rc = graph_order_readd(t);
            if (rc < 0) {
                Py_DECREF(t);
                goto error;
            }
            if (rc > 0) {
                task = t;
                replay__counters.reused_tasks++;
            }
            else {
                PyObject *one = PyList_New(1);
                if (one != NULL) {
                    PyList_SET_ITEM(one, 0, t);
                    graph_forget_tasks(one);
                    Py_DECREF(one);
                }
                else
                    Py_DECREF(t);
            }
        }
        else if (PyErr_Occurred())
            goto error;
    }
    if (task == NULL) {
        task = trace__dispatch(callable, args, nargs, kwnames);
        if (st->ncp > 0 && task != NULL && graph_is_task(task))
            replay__counters.speculative_tasks++;
    }
    if (task != NULL && key != NULL && st->ncp > 0 && graph_is_task(task)) {
        PyObject *rec = PyTuple_Pack(3, task, key, kept);
        if (rec == NULL || (st->records == NULL && (st->records = PyList_New(0)) == NULL) ||
            PyList_Append(st->records, rec) < 0)
            PyErr_Clear();       /* only the reuse is lost */
        Py_XDECREF(rec);
    }
    Py_XDECREF(key);
    Py_XDECREF(kept);
    return task;
error:
    Py_XDECREF(key);
    Py_XDECREF(kept);
    return NULL;
}

/* A MAP: fn(args from template) for each element of seq. Returns the pending list (new ref) or
 * NULL: exception, or bail (*bailed). */
/* A map's argument tuples live until its chunks are encoded, thousands at a time: those holding
 * only values the cycle collector does not track (numbers, strings) are untracked at once, as
 * the collector itself would untrack them at its next pass, so that the collections their
 * allocation triggers have nothing of theirs to traverse. */
static void
replay__untrack_atomic(PyObject *tuple)
{
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(tuple); k++) {
        PyObject *v = PyTuple_GET_ITEM(tuple, k);
        if (PyObject_IS_GC(v) && PyObject_GC_IsTracked(v))
            return;
    }
    PyObject_GC_UnTrack(tuple);
}

PyObject *
replay__run_map(run_state *st, int pc, const rins *i, int *bailed)
{
    struct trace_replay *p = st->p;
    PyObject *callable = st->regs[i->b], *seqv = st->regs[i->c];
    if (callable == NULL || seqv == NULL) {
        *bailed = replay__bail(st, pc, "line %d reads a name that has no value", i->line);
        return NULL;
    }
    PyObject *fn = trace__force(callable);
    if (fn == NULL)
        return NULL;
    trace_codeinfo *info = NULL;
    int kind = replay__callee_kind(fn, &info);
    if (kind == CALLEE_OTHER || kind == CALLEE_SCHEDULED) {
        /* A scheduled callee would run nested, traced when its graph gives up: not here. */
        PyObject *n = replay__callee_name(fn);
        *bailed = replay__bail(st, pc, "line %d calls %S, which is neither functional nor known "
                               "to be pure", i->line, n ? n : Py_None);
        Py_XDECREF(n);
        Py_DECREF(fn);
        return NULL;
    }
    PyObject *seq = trace__force(seqv), *it = NULL, *calls = NULL, *result = NULL;
    if (seq == NULL)
        goto done;
    if (replay__outside_iterator(st, i->c, seq)) {
        *bailed = replay__bail(st, pc, "line %d consumes an iterator it was handed", i->line);
        goto done;
    }
    PyObject *tmpl = PyTuple_GET_ITEM(p->consts, i->d);
    Py_ssize_t ntarget = PyLong_AsSsize_t(PyTuple_GET_ITEM(tmpl, 0));
    PyObject *sources = PyTuple_GET_ITEM(tmpl, 1);
    Py_ssize_t nsrc = PyTuple_GET_SIZE(sources);
    /* A functional function outside the thread executor goes as chunk tasks (more than one
     * call); with one argument, a chunk takes its values as they are (graph_submit_map). */
    int chunkable = kind == CALLEE_FUNCTIONAL && trace__is_function(fn) && !info->options.threads;
    int flat = chunkable && nsrc == 1;
    it = PyObject_GetIter(seq);
    calls = PyList_New(0);
    if (it == NULL || calls == NULL)
        goto done;
    PyObject *elem;
    while ((elem = PyIter_Next(it)) != NULL) {
        PyObject *items = NULL;
        if (ntarget > 0) {
            PyObject *e = trace__force(elem);
            items = e ? PySequence_Tuple(e) : NULL;
            Py_XDECREF(e);
            if (items != NULL && PyTuple_GET_SIZE(items) != ntarget) {
                Py_DECREF(items);
                Py_DECREF(elem);
                *bailed = replay__bail(st, pc, "line %d unpacks an element of the wrong length",
                                       i->line);
                goto done;
            }
            if (items == NULL) {
                Py_DECREF(elem);
                goto done;
            }
        }
        PyObject *args = flat ? NULL : PyTuple_New(nsrc);
        for (Py_ssize_t k = 0; (flat || args) && k < nsrc; k++) {
            PyObject *s = PyTuple_GET_ITEM(sources, k);
            const char *what = PyUnicode_AsUTF8(PyTuple_GET_ITEM(s, 0));
            PyObject *v;
            if (what[0] == 'e')
                v = elem;
            else if (what[0] == 'i')
                v = PyTuple_GET_ITEM(items, PyLong_AsSsize_t(PyTuple_GET_ITEM(s, 1)));
            else if (what[0] == 'r')
                v = st->regs[PyLong_AsSsize_t(PyTuple_GET_ITEM(s, 1))];
            else
                v = PyTuple_GET_ITEM(p->consts, PyLong_AsSsize_t(PyTuple_GET_ITEM(s, 1)));
            if (v == NULL) {
                Py_CLEAR(args);
                Py_XDECREF(items);
                Py_DECREF(elem);
                *bailed = replay__bail(st, pc, "line %d reads a name that has no value", i->line);
                goto done;
            }
            if (flat)
                args = Py_NewRef(v);
            else
                PyTuple_SET_ITEM(args, k, Py_NewRef(v));
        }
        Py_XDECREF(items);
        Py_DECREF(elem);
        if (args != NULL && !flat)
            replay__untrack_atomic(args);
        if (args == NULL || PyList_Append(calls, args) < 0) {
            Py_XDECREF(args);
            goto done;
        }
        Py_DECREF(args);
    }
    if (PyErr_Occurred())
        goto done;
    replay__counters.maps++;
    if (chunkable && PyList_GET_SIZE(calls) > 1) {
        result = graph_submit_map(fn, calls, flat, &info->options);
        goto done;
    }
    /* One call at a time through the dispatcher. */
    result = PyList_New(0);
    for (Py_ssize_t k = 0; result && k < PyList_GET_SIZE(calls); k++) {
        PyObject *args = PyList_GET_ITEM(calls, k);
        PyObject *r = flat ? trace__dispatch(fn, &PyList_GET_ITEM(calls, k), 1, NULL)
                           : trace__dispatch(fn, &PyTuple_GET_ITEM(args, 0),
                                             PyTuple_GET_SIZE(args), NULL);
        if (r == NULL || PyList_Append(result, r) < 0)
            Py_CLEAR(result);
        Py_XDECREF(r);
    }
done:
    Py_DECREF(fn);
    Py_XDECREF(seq);
    Py_XDECREF(it);
    Py_XDECREF(calls);
    return result;
}

/* A nested scheduled call through its graph (self first for a bound method): 0 with *result,
 * -2 bail (it would have traced), -1 exception. */
int
replay__call_scheduled(run_state *st, int here, PyObject *callable, trace_codeinfo *info,
                       PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                       PyObject **result)
{
    PyObject *fn = callable, *self = NULL;
    if (PyMethod_Check(callable)) {
        fn = PyMethod_GET_FUNCTION(callable);
        self = PyMethod_GET_SELF(callable);
    }
    Py_ssize_t ntotal = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[9], **argv = (PyObject **)args;
    if (self != NULL) {
        argv = ntotal < 9 ? small : PyMem_Malloc((ntotal + 1) * sizeof(PyObject *));
        if (argv == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        argv[0] = self;
        memcpy(argv + 1, args, ntotal * sizeof(PyObject *));
    }
    int rc = replay__mode == 0 ? 0
             : replay__execute(fn, info, argv, nargs + (self != NULL), kwnames, result);
    if (argv != args && argv != small)
        PyMem_Free(argv);
    if (rc == 1)
        return 0;
    if (rc < 0)
        return replay__failed(st, here, "a scheduled call");
    PyObject *reason = info->replay ? info->replay->reason : NULL;
    return replay__bail(st, here, "line %d calls scheduled %U, whose graph gave up (%S)",
                        st->p->code[here].line, ((PyFunctionObject *)fn)->func_qualname,
                        reason ? reason : Py_None);
}
