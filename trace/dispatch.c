/* trace/dispatch.c — the run-time side of the rewrite: every call site of scheduled code passes
 * through trace_dispatch, which decides with a pointer compare whether the callee is functional
 * (→ task), scheduled (→ nested trace), a move (list.append, len) or anything else (→ its
 * arguments are forced first). The helpers the rewritten bytecode loads as constants live here. */
#include "trace/internal.h"
#include "exec/exec.h"

/* Method definitions of list.append/extend/insert, compared by pointer: moves, not reads. */
static PyMethodDef *list_append_def, *list_extend_def, *list_insert_def;
static PyObject *builtin_len;
static PyObject *builtin_build_class;
static PyObject *str_builtins;     /* "__builtins__": a module namespace holds it */
/* Native callables (ctypes function pointers) marked functional: {id: object}. */
static PyObject *native_functional;

/* Borrows obj; the definition is static memory of the type. */
static PyMethodDef *
method_def_of(PyObject *obj, const char *name)
{
    PyObject *m = PyObject_GetAttrString(obj, name);
    if (m == NULL)
        return NULL;
    PyMethodDef *def = PyCFunction_Check(m) ? ((PyCFunctionObject *)m)->m_ml : NULL;
    Py_DECREF(m);
    if (def == NULL)
        PyErr_Format(PyExc_SystemError, "pydron: %s.%s is not a builtin method",
                     Py_TYPE(obj)->tp_name, name);
    return def;
}

/* Deep-force n arguments into out[] (new references). */
static int
force_args(PyObject *const *args, Py_ssize_t n, PyObject **out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = trace__force_deep(args[i]);
        if (out[i] == NULL) {
            while (i--)
                Py_DECREF(out[i]);
            return -1;
        }
    }
    return 0;
}

/* Whether a value moved into a container must be logged (graph_note_move) so that the end of the
 * call forces it there: a task, or an exact list, tuple or dict holding one at any depth. At most
 * HOLDS_BUDGET objects are looked at; past that the answer is yes (a logged container costs one
 * walk when the call ends, a missed one a pending seen by plain code). Borrows obj. */
#define HOLDS_BUDGET 64

static int
holds_task(PyObject *obj, int *budget)
{
    if (graph_is_task(obj))
        return 1;
    if (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj) && !PyDict_CheckExact(obj))
        return 0;
    if (--*budget < 0)
        return 1;
    if (PyDict_CheckExact(obj)) {
        PyObject *k, *v;
        Py_ssize_t pos = 0;
        while (PyDict_Next(obj, &pos, &k, &v))
            if (v != obj && holds_task(v, budget))
                return 1;
        return 0;
    }
    PyObject **items = PySequence_Fast_ITEMS(obj);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(obj); i++)
        if (items[i] != obj && holds_task(items[i], budget))
            return 1;
    return 0;
}

static int
moved_value_holds_task(PyObject *value)
{
    int budget = HOLDS_BUDGET;
    return holds_task(value, &budget);
}

/* The cells of a plain function's closure that hold a pending value get the value (in place: the
 * scheduled code that owns the cell reads it back as a value). A class body is such a function:
 * the scheduled code's cells are its free variables. Borrows fn. 0, or -1 + exception. */
static int
force_closure_cells(PyObject *fn)
{
    if (!PyFunction_Check(fn))
        return 0;
    PyObject *closure = PyFunction_GET_CLOSURE(fn);
    for (Py_ssize_t i = 0; closure && i < PyTuple_GET_SIZE(closure); i++) {
        PyObject *cell = PyTuple_GET_ITEM(closure, i);
        PyObject *content = PyCell_GET(cell);
        if (content == NULL || !graph_is_task(content))
            continue;
        Py_INCREF(content);
        PyObject *v = graph_wait((graph_task *)content);
        if (v != NULL && PyCell_GET(cell) == content && PyCell_Set(cell, v) < 0)
            Py_CLEAR(v);
        Py_DECREF(content);
        if (v == NULL)
            return -1;
        Py_DECREF(v);
    }
    return 0;
}

/* Call callable with its arguments forced: what a non-functional callee sees.
 * Borrows its arguments; returns a new reference. */
static PyObject *
call_forced(PyObject *callable, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    Py_ssize_t ntotal = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[8], **forced = ntotal <= 8 ? small : PyMem_Malloc(ntotal * sizeof(PyObject *));
    if (forced == NULL)
        return PyErr_NoMemory();
    if (force_args(args, ntotal, forced) < 0) {
        if (forced != small)
            PyMem_Free(forced);
        return NULL;
    }
    /* A builtin method reads its self too: `results.sort()`, `",".join(...)` on containers. */
    PyObject *result = NULL;
    if (trace__force_escapes(callable) < 0)
        goto done;
    /* A class body defined in scheduled code (not rewritten: plain code) reads its cells. */
    if (callable == builtin_build_class && nargs >= 1 &&
        (force_closure_cells(forced[0]) < 0 || trace__force_escapes(forced[0]) < 0))
        goto done;
    /* A plain method reads its self: `box.report()` with results in box.items. */
    if (PyMethod_Check(callable)) {
        PyObject *s = trace__force_deep(PyMethod_GET_SELF(callable));
        if (s == NULL)
            goto done;
        Py_DECREF(s);
    }
    if (PyCFunction_Check(callable)) {
        PyObject *self = PyCFunction_GET_SELF(callable);
        if (self && (PyList_CheckExact(self) || PyDict_CheckExact(self) ||
                     PyTuple_CheckExact(self) || graph_moves_count() > 0)) {
            PyObject *s = trace__force_deep(self);
            if (s == NULL)
                goto done;
            Py_DECREF(s);
        }
    }
    result = PyObject_Vectorcall(callable, forced, nargs, kwnames);
done:
    for (Py_ssize_t i = 0; i < ntotal; i++)
        Py_DECREF(forced[i]);
    if (forced != small)
        PyMem_Free(forced);
    return result;
}

/* Submit a functional call (self prepended for bound methods) and record it in the order.
 * Borrows its arguments; returns a new reference to the task. */
static PyObject *
submit_task(PyObject *fn, PyObject *self, PyObject *const *args, Py_ssize_t nargs,
            PyObject *kwnames, const graph_task_options *options)
{
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *argtuple = PyTuple_New(nargs + (self != NULL));
    PyObject *kwargs = NULL, *task = NULL;
    if (argtuple == NULL)
        return NULL;
    Py_ssize_t j = 0;
    if (self)
        PyTuple_SET_ITEM(argtuple, j++, Py_NewRef(self));
    for (Py_ssize_t i = 0; i < nargs; i++)
        PyTuple_SET_ITEM(argtuple, j++, Py_NewRef(args[i]));
    if (nkw) {
        kwargs = PyDict_New();
        if (kwargs == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < nkw; i++)
            if (PyDict_SetItem(kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0)
                goto done;
    }
    task = graph_submit(fn, argtuple, kwargs, options);
    if (task != NULL)
        graph_task_set_site(task, trace__site_here());
done:
    Py_DECREF(argtuple);
    Py_XDECREF(kwargs);
    return task;
}

PyObject *
trace__call_rewritten(PyObject *func, PyObject *code, PyObject *const *args, size_t nargsf,
                     PyObject *kwnames)
{
    PyFunctionObject *f = (PyFunctionObject *)func;
    PyObject *g = PyFunction_New(code, f->func_globals);
    if (g == NULL)
        return NULL;
    PyFunctionObject *gf = (PyFunctionObject *)g;
    Py_XSETREF(gf->func_name, Py_NewRef(f->func_name));
    Py_XSETREF(gf->func_qualname, Py_NewRef(f->func_qualname));
    Py_XSETREF(gf->func_defaults, Py_XNewRef(f->func_defaults));
    Py_XSETREF(gf->func_kwdefaults, Py_XNewRef(f->func_kwdefaults));
    Py_XSETREF(gf->func_closure, Py_XNewRef(f->func_closure));
    Py_XSETREF(gf->func_module, Py_XNewRef(f->func_module));
    PyObject *r = PyObject_Vectorcall(g, args, nargsf, kwnames);
    Py_DECREF(g);
    return r;
}

/* A nested scheduled call through its graph (self prepended for a bound method): as
 * trace__replay_call. */
static int
replay_nested(PyObject *fn, PyObject *self, trace_codeinfo *info, PyObject *const *args,
              Py_ssize_t nargs, PyObject *kwnames, PyObject **result)
{
    if (self == NULL)
        return trace__replay_call(fn, info, args, nargs, kwnames, result);
    Py_ssize_t ntotal = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[9], **with_self = ntotal < 9 ? small
                                                 : PyMem_Malloc((ntotal + 1) * sizeof(PyObject *));
    if (with_self == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    with_self[0] = self;
    memcpy(with_self + 1, args, ntotal * sizeof(PyObject *));
    int rc = trace__replay_call(fn, info, with_self, nargs + 1, kwnames, result);
    if (with_self != small)
        PyMem_Free(with_self);
    return rc;
}

/* Borrows its arguments; returns a new reference. */
static PyObject *
trace_dispatch(PyObject *callable, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *forced_callable = NULL, *result;
    if (graph_is_task(callable)) {
        callable = forced_callable = graph_wait((graph_task *)callable);
        if (callable == NULL)
            return NULL;
    }
    PyObject *fn = callable, *self = NULL;
    if (PyMethod_Check(callable)) {
        fn = PyMethod_GET_FUNCTION(callable);
        self = PyMethod_GET_SELF(callable);
    }
    if (trace__is_function(fn) && trace__enabled && !exec_in_worker()) {
        PyObject *code = PyFunction_GET_CODE(fn);
        trace_codeinfo *info = trace__codeinfo_get(code);
        if (info && info->kind == TRACE_FUNCTIONAL) {
            result = submit_task(fn, self, args, nargs, kwnames, &info->options);
            goto done;
        }
        if (info && info->kind == TRACE_SCHEDULED && !info->refused) {
            int replayed = replay_nested(fn, self, info, args, nargs, kwnames, &result);
            if (replayed != 0) {
                if (replayed < 0)
                    result = NULL;
                goto done;
            }
            PyObject *rewritten = trace__rewritten(code, info);
            if (rewritten == NULL && PyErr_Occurred()) {
                result = NULL;
                goto done;
            }
            if (rewritten) {
                uint64_t started = trace__replay_timing(info) ? trace__replay_clock() : 0;
                if (self == NULL) {
                    result = trace__call_rewritten(fn, rewritten, args, nargs, kwnames);
                    if (started)
                        trace__replay_traced(info, started);
                    goto done;
                }
                Py_ssize_t ntotal = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
                PyObject **with_self = PyMem_Malloc((ntotal + 1) * sizeof(PyObject *));
                if (with_self == NULL) {
                    result = PyErr_NoMemory();
                    goto done;
                }
                with_self[0] = self;
                memcpy(with_self + 1, args, ntotal * sizeof(PyObject *));
                result = trace__call_rewritten(fn, rewritten, with_self, nargs + 1, kwnames);
                if (started)
                    trace__replay_traced(info, started);
                PyMem_Free(with_self);
                goto done;
            }
        }
    }
    if (native_functional && PyDict_GET_SIZE(native_functional) && trace__enabled &&
        !exec_in_worker()) {
        /* A ctypes function pointer marked functional: a thread task called through libffi. */
        PyObject *key = PyLong_FromVoidPtr(callable);
        int found = key ? PyDict_Contains(native_functional, key) : -1;
        Py_XDECREF(key);
        if (found < 0) {
            result = NULL;
            goto done;
        }
        if (found) {
            static const graph_task_options native = {.threads = 1};
            result = submit_task(callable, NULL, args, nargs, kwnames, &native);
            goto done;
        }
    }
    if (PyCFunction_Check(callable)) {
        PyMethodDef *def = ((PyCFunctionObject *)callable)->m_ml;
        PyObject *owner = PyCFunction_GET_SELF(callable);
        if ((def == list_append_def || def == list_extend_def) && owner &&
            PyList_CheckExact(owner) && kwnames == NULL) {
            /* Moving results into a list: no wait. extend() of a pending iterable reads it. */
            if (def == list_extend_def && nargs == 1 && graph_is_task(args[0])) {
                result = call_forced(callable, args, nargs, kwnames);
                goto done;
            }
            if (nargs == 1 && (PyList_CheckExact(args[0]) || moved_value_holds_task(args[0])) &&
                graph_note_move(owner) < 0) {
                result = NULL;
                goto done;
            }
            result = PyObject_Vectorcall(callable, args, nargs, NULL);
            goto done;
        }
        if (def == list_insert_def && owner && PyList_CheckExact(owner) && nargs == 2 &&
            kwnames == NULL) {
            PyObject *index = trace__force_deep(args[0]);
            if (index == NULL) {
                result = NULL;
                goto done;
            }
            if (moved_value_holds_task(args[1]) && graph_note_move(owner) < 0) {
                Py_DECREF(index);
                result = NULL;
                goto done;
            }
            PyObject *pair[2] = {index, args[1]};
            result = PyObject_Vectorcall(callable, pair, 2, NULL);
            Py_DECREF(index);
            goto done;
        }
    }
    if (callable == builtin_len && nargs == 1 && kwnames == NULL) {
        /* len() of a container of pendings is a move: only the container itself is read. */
        PyObject *container = trace__force(args[0]);
        if (container == NULL) {
            result = NULL;
            goto done;
        }
        result = PyObject_Vectorcall(callable, &container, 1, NULL);
        Py_DECREF(container);
        goto done;
    }
    if (graph_live_tasks == 0)
        result = PyObject_Vectorcall(callable, args, nargs, kwnames);
    else
        result = call_forced(callable, args, nargs, kwnames);
done:
    Py_XDECREF(forced_callable);
    return result;
}

PyObject *
trace__dispatch(PyObject *callable, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    return trace_dispatch(callable, args, nargs, kwnames);
}

/* ---- helpers loaded by rewritten code ---------------------------------------------------- */

/* call(callable, args: tuple, kwnames: tuple | None) */
static PyObject *
helper_call(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc < 2 || argc > 3 || !PyTuple_CheckExact(argv[1])) {
        PyErr_SetString(PyExc_TypeError, "call(callable, args, kwnames=None)");
        return NULL;
    }
    PyObject *kwnames = argc == 3 && argv[2] != Py_None ? argv[2] : NULL;
    if (kwnames && PyTuple_GET_SIZE(kwnames) == 0)
        kwnames = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(argv[1]);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    return trace_dispatch(argv[0], &PyTuple_GET_ITEM(argv[1], 0), n - nkw, kwnames);
}

/* call_discarded(callable, args, kwnames): a call statement, its result dropped. A functional
 * callee is then called for a side effect its task cannot have (it happens in a worker, on
 * copies): said once per function (pydron.check.warn_result_unread), then called as any call. */
static PyObject *
helper_call_discarded(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc >= 1 && trace__enabled) {
        PyObject *fn = PyMethod_Check(argv[0]) ? PyMethod_GET_FUNCTION(argv[0]) : argv[0];
        trace_codeinfo *info = trace__is_function(fn)
                               ? trace__codeinfo_get(PyFunction_GET_CODE(fn)) : NULL;
        if (info && info->kind == TRACE_FUNCTIONAL && !info->unread_warned) {
            info->unread_warned = 1;
            PyObject *check = PyImport_ImportModule("pydron.check");
            PyObject *r = check ? PyObject_CallMethod(check, "warn_result_unread", "O", fn) : NULL;
            Py_XDECREF(check);
            if (r == NULL)
                PyErr_Clear();         /* a warning never fails the call */
            Py_XDECREF(r);
        }
    }
    return helper_call(module, argv, argc);
}

/* call_ex(callable, args: iterable, kwargs: mapping | None) — f(*a, **k) */
static PyObject *
helper_call_ex(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc < 2 || argc > 3) {
        PyErr_SetString(PyExc_TypeError, "call_ex(callable, args, kwargs=None)");
        return NULL;
    }
    PyObject *seq = trace__force(argv[1]), *args = NULL, *kwargs = NULL, *kwnames = NULL;
    PyObject *result = NULL, **stack = NULL;
    if (seq == NULL)
        return NULL;
    args = PyTuple_CheckExact(seq) ? Py_NewRef(seq) : PySequence_Tuple(seq);
    Py_DECREF(seq);
    if (args == NULL)
        return NULL;
    Py_ssize_t nargs = PyTuple_GET_SIZE(args), nkw = 0;
    if (argc == 3 && argv[2] != Py_None) {
        PyObject *k = trace__force(argv[2]);
        if (k == NULL)
            goto done;
        kwargs = PyDict_New();
        if (kwargs == NULL || PyDict_Merge(kwargs, k, 1) < 0) {
            Py_DECREF(k);
            goto done;
        }
        Py_DECREF(k);
        nkw = PyDict_GET_SIZE(kwargs);
    }
    stack = PyMem_Malloc((nargs + nkw + 1) * sizeof(PyObject *));
    if (stack == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        stack[i] = PyTuple_GET_ITEM(args, i);
    if (nkw) {
        kwnames = PyTuple_New(nkw);
        if (kwnames == NULL)
            goto done;
        PyObject *k, *v;
        Py_ssize_t pos = 0, i = 0;
        while (PyDict_Next(kwargs, &pos, &k, &v)) {
            if (!PyUnicode_Check(k)) {
                PyErr_SetString(PyExc_TypeError, "keywords must be strings");
                goto done;
            }
            PyTuple_SET_ITEM(kwnames, i, Py_NewRef(k));
            stack[nargs + i++] = v;
        }
    }
    result = trace_dispatch(argv[0], stack, nargs, kwnames);
done:
    PyMem_Free(stack);
    Py_XDECREF(args);
    Py_XDECREF(kwargs);
    Py_XDECREF(kwnames);
    return result;
}

static PyObject *
helper_force(PyObject *module, PyObject *x)
{
    return trace__force(x);
}

static PyObject *
helper_force_deep(PyObject *module, PyObject *x)
{
    return trace__force_deep(x);
}

/* Borrows dict. */
static int
is_module_namespace(PyObject *dict)
{
    return PyDict_GetItem(dict, str_builtins) != NULL;
}

/* store_subscr(value, container, key): container[key] = value; a move into exact lists/dicts. */
static PyObject *
helper_store_subscr(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 3) {
        PyErr_SetString(PyExc_TypeError, "store_subscr(value, container, key)");
        return NULL;
    }
    PyObject *container = trace__force(argv[1]), *key = NULL, *value = NULL;
    int rc = -1;
    if (container == NULL)
        return NULL;
    key = trace__force_deep(argv[2]);
    if (key == NULL)
        goto done;
    /* A move into a list or dict; not into a module's namespace (globals()[k] = v), which any
     * plain function may read at once. */
    if (PyList_CheckExact(container) ||
        (PyDict_CheckExact(container) && !is_module_namespace(container))) {
        value = Py_NewRef(argv[0]);
        if (moved_value_holds_task(value) && graph_note_move(container) < 0)
            goto done;
    }
    else
        value = trace__force_deep(argv[0]);
    if (value == NULL)
        goto done;
    rc = PyObject_SetItem(container, key, value);
done:
    Py_DECREF(container);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

/* _mark_native(fn): a ctypes function pointer becomes a functional thread task when called from
 * scheduled code (its declared argtypes/restype let libffi call it with the GIL released). */
static PyObject *
helper_mark_native(PyObject *module, PyObject *fn)
{
    if (native_functional == NULL && (native_functional = PyDict_New()) == NULL)
        return NULL;
    PyObject *key = PyLong_FromVoidPtr(fn);
    if (key == NULL)
        return NULL;
    int rc = PyDict_SetItem(native_functional, key, fn);
    Py_DECREF(key);
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

static PyMethodDef dispatch_methods[] = {
    {"_mark_native", helper_mark_native, METH_O,
     "_mark_native(fn): a ctypes function pointer called from scheduled code is a thread task."},
    {"call", (PyCFunction)(void (*)(void))helper_call, METH_FASTCALL,
     "call(callable, args, kwnames=None): a call site of scheduled code."},
    {"call_discarded", (PyCFunction)(void (*)(void))helper_call_discarded, METH_FASTCALL,
     "call_discarded(callable, args, kwnames=None): a call statement (its result dropped)."},
    {"call_ex", (PyCFunction)(void (*)(void))helper_call_ex, METH_FASTCALL,
     "call_ex(callable, args, kwargs=None): f(*args, **kwargs) in scheduled code."},
    {"force", helper_force, METH_O, "force(x): the value of x, waiting if it is pending."},
    {"force_deep", helper_force_deep, METH_O,
     "force_deep(x): force x and every pending inside its lists, tuples and dicts, in place."},
    {"store_subscr", (PyCFunction)(void (*)(void))helper_store_subscr, METH_FASTCALL,
     "store_subscr(value, container, key): container[key] = value."},
    {NULL},
};

int
trace__dispatch_init(PyObject *module)
{
    PyObject *list = PyList_New(0), *builtins;
    if (list == NULL)
        return -1;
    list_append_def = method_def_of(list, "append");
    list_extend_def = method_def_of(list, "extend");
    list_insert_def = method_def_of(list, "insert");
    Py_DECREF(list);
    if (!list_append_def || !list_extend_def || !list_insert_def)
        return -1;
    builtins = PyImport_ImportModule("builtins");
    if (builtins == NULL)
        return -1;
    builtin_len = PyObject_GetAttrString(builtins, "len");
    builtin_build_class = PyObject_GetAttrString(builtins, "__build_class__");
    Py_DECREF(builtins);
    if (builtin_len == NULL || builtin_build_class == NULL)
        return -1;
    if ((str_builtins = PyUnicode_InternFromString("__builtins__")) == NULL)
        return -1;
    return PyModule_AddFunctions(module, dispatch_methods);
}
