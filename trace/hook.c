/* trace/hook.c — how a call from plain code enters a scheduled function: the rewritten code runs
 * instead of the original, as a trace session. Two ways, one per cost model:
 *  - vectorcall interception (default): each scheduled function object gets its own vectorcall
 *    entry, so nothing else pays anything. On 3.12+ PyFunction_SetVectorcall does it (the
 *    evaluator inlines only functions whose vectorcall is the default); 3.11 inlines every exact
 *    function, so there the object is also retyped, while enabled, to a twin of `function` that
 *    the evaluator does not inline (pickling and copying keep treating it as a function).
 *  - the PEP 523 frame-evaluation hook (PYDRON_INTERCEPT=hook): catches every frame of a
 *    scheduled code object, including functions made later from the same code, at the price of
 *    the evaluator's inlining of Python-to-Python calls for all code while enabled.
 * Frame layouts differ by version: this file is the one place that knows them. */
#define Py_BUILD_CORE
#include "trace/internal.h"
#include "exec/exec.h"
#include <internal/pycore_frame.h>
#if PY_VERSION_HEX >= 0x030D0000
#include <internal/pycore_ceval.h>
#endif
#include <internal/pycore_code.h>
#undef Py_BUILD_CORE

/* The layout of co_extra (private to Objects/codeobject.c, the same in 3.11-3.13). */
typedef struct {
    Py_ssize_t ce_size;
    void *ce_extras[1];
} code_extra;

static _PyFrameEvalFunction previous_eval;
static int installed;

#if PY_VERSION_HEX >= 0x030D0000
#define FRAME_CODE(f) ((PyCodeObject *)(f)->f_executable)
#define FRAME_FUNC(f) ((f)->f_funcobj)
#elif PY_VERSION_HEX >= 0x030C0000
#define FRAME_CODE(f) ((f)->f_code)
#define FRAME_FUNC(f) ((f)->f_funcobj)
#else
#define FRAME_CODE(f) ((f)->f_code)
#define FRAME_FUNC(f) ((PyObject *)(f)->f_func)
#endif

#define LOCAL_VALUE(f, i) ((f)->localsplus[i])

/* Returns a new reference (CPython's own evaluation of the frame). */
static inline PyObject *
default_eval(PyThreadState *ts, _PyInterpreterFrame *frame, int throwflag)
{
    if (previous_eval)
        return previous_eval(ts, frame, throwflag);
    return _PyEval_EvalFrameDefault(ts, frame, throwflag);
}

/* The frame was never evaluated: release it the way the evaluator would have on return. */
static void
release_frame(PyThreadState *ts, _PyInterpreterFrame *frame)
{
#if PY_VERSION_HEX >= 0x030D0000
    _PyEval_FrameClearAndPop(ts, frame);
#elif PY_VERSION_HEX >= 0x030C0000
    /* 3.12's _PyEval_Vector leaves the clean-up to the evaluator (clear_thread_frame), whose
     * helpers are not exported: the same steps for a frame that never ran (so no frame object
     * can have escaped and nothing but its arguments is on it). */
    for (int i = 0; i < frame->stacktop; i++)
        Py_XDECREF(frame->localsplus[i]);
    Py_XDECREF(frame->frame_obj);
    Py_XDECREF(frame->f_locals);
    Py_DECREF(frame->f_funcobj);
    Py_DECREF(frame->f_code);
    PyObject **base = (PyObject **)frame;
    _PyStackChunk *chunk = ts->datastack_chunk;
    if (base == &chunk->data[0]) {
        /* The frame opened a chunk: return to the previous one and free it, as the
         * interpreter does, through the arena allocator. */
        _PyStackChunk *previous = chunk->previous;
        PyObjectArenaAllocator arena;
        ts->datastack_top = &previous->data[previous->top];
        ts->datastack_chunk = previous;
        ts->datastack_limit = (PyObject **)(((char *)previous) + previous->size);
        PyObject_GetArenaAllocator(&arena);
        arena.free(arena.ctx, chunk, chunk->size);
    }
    else
        ts->datastack_top = base;
#else
    /* 3.11: _PyEval_Vector clears and pops the frame after the hook returns. */
    (void)ts;
    (void)frame;
#endif
}

/* Call the rewritten code with the frame's already-bound arguments: positionals (and *args) by
 * position, keyword-only (and **kwargs) by name. Returns a new reference or NULL. */
static PyObject *
call_with_frame_args(_PyInterpreterFrame *frame, PyObject *rewritten)
{
    PyCodeObject *co = FRAME_CODE(frame);
    int argc = co->co_argcount, kwonly = co->co_kwonlyargcount, flags = co->co_flags;
    PyObject *varargs = NULL, *varkw = NULL, *kwnames = NULL, *result = NULL;
    int slot = argc + kwonly;
    if (flags & CO_VARARGS)
        varargs = LOCAL_VALUE(frame, slot++);
    if (flags & CO_VARKEYWORDS)
        varkw = LOCAL_VALUE(frame, slot++);
    Py_ssize_t nvar = varargs ? PyTuple_GET_SIZE(varargs) : 0;
    Py_ssize_t nkwd = varkw ? PyDict_GET_SIZE(varkw) : 0;
    Py_ssize_t npos = argc + nvar, nkw = kwonly + nkwd;
    PyObject **stack = PyMem_Malloc((npos + nkw + 1) * sizeof(PyObject *));
    if (stack == NULL)
        return PyErr_NoMemory();
    for (int i = 0; i < argc; i++)
        stack[i] = LOCAL_VALUE(frame, i);
    for (Py_ssize_t i = 0; i < nvar; i++)
        stack[argc + i] = PyTuple_GET_ITEM(varargs, i);
    if (nkw) {
        kwnames = PyTuple_New(nkw);
        if (kwnames == NULL)
            goto done;
        for (int i = 0; i < kwonly; i++) {
            PyTuple_SET_ITEM(kwnames, i,
                             Py_NewRef(PyTuple_GET_ITEM(co->co_localsplusnames, argc + i)));
            stack[npos + i] = LOCAL_VALUE(frame, argc + i);
        }
        PyObject *k, *v;
        Py_ssize_t pos = 0, i = kwonly;
        while (varkw && PyDict_Next(varkw, &pos, &k, &v)) {
            PyTuple_SET_ITEM(kwnames, i, Py_NewRef(k));
            stack[npos + i++] = v;
        }
    }
    result = trace__call_rewritten(FRAME_FUNC(frame), rewritten, stack, npos, kwnames);
done:
    Py_XDECREF(kwnames);
    PyMem_Free(stack);
    return result;
}

/* The frame's call through its code's graph (trace__replay_call), for a plain signature
 * (positional-or-keyword parameters only: all of them are bound in the frame by now). */
static int
replay_frame(_PyInterpreterFrame *frame, trace_codeinfo *info, PyObject **result)
{
    PyCodeObject *co = FRAME_CODE(frame);
    if (co->co_kwonlyargcount || (co->co_flags & (CO_VARARGS | CO_VARKEYWORDS)))
        return 0;
    return trace__replay_call(FRAME_FUNC(frame), info, &LOCAL_VALUE(frame, 0), co->co_argcount,
                              NULL, result);
}

/* Returns a new reference. */
static PyObject *
trace_eval_frame(PyThreadState *ts, _PyInterpreterFrame *frame, int throwflag)
{
    PyCodeObject *co = FRAME_CODE(frame);
    /* Fast path: one look at the code object's extra slot. */
    code_extra *extra = (code_extra *)co->co_extra;
    if (extra == NULL || extra->ce_size <= trace__extra_index || throwflag)
        return default_eval(ts, frame, throwflag);
    trace_codeinfo *info = extra->ce_extras[trace__extra_index];
    if (info == NULL || info->kind != TRACE_SCHEDULED || info->refused || !trace__enabled ||
        exec_in_worker())
        return default_eval(ts, frame, throwflag);

    /* A call its graph takes needs no rewritten code: made when a call is first traced, so a
     * fresh process whose first call replays from the disk cache never rewrites (nor imports
     * the rewriter): milliseconds, and the garbage its first collection then walks. */
    int ready = trace__replay_ready(FRAME_FUNC(frame), info);
    PyObject *rewritten = ready ? NULL : trace__rewritten((PyObject *)co, info);
    if (ready < 0 || (rewritten == NULL && ready == 0)) {
        if (ready == 0 && !PyErr_Occurred())
            return default_eval(ts, frame, throwflag);   /* refused: runs plainly */
        release_frame(ts, frame);
        return NULL;
    }
    trace_session session;
    trace__session_begin(&session, co->co_qualname);
    PyObject *result = NULL;
    int replayed = replay_frame(frame, info, &result);
    if (replayed == 0) {
        uint64_t started = trace__replay_timing(info) ? trace__replay_clock() : 0;
        if (rewritten == NULL)
            rewritten = trace__rewritten((PyObject *)co, info);
        if (rewritten != NULL)
            result = call_with_frame_args(frame, rewritten);
        else if (!PyErr_Occurred()) {
            /* A graph for code the rewrite refuses (never lifted here): plainly, as above. */
            result = default_eval(ts, frame, throwflag);
            result = trace__session_end(&session, result);
            return result;
        }
        if (started)
            trace__replay_traced(info, started);
    }
    else if (replayed < 0)
        result = NULL;
    result = trace__session_end(&session, result);
    release_frame(ts, frame);
    return result;
}

int
trace__hook_install(void)
{
    if (installed)
        return 0;
    PyInterpreterState *interp = PyInterpreterState_Get();
    _PyFrameEvalFunction current = _PyInterpreterState_GetEvalFrameFunc(interp);
    previous_eval = current == _PyEval_EvalFrameDefault ? NULL : current;
    _PyInterpreterState_SetEvalFrameFunc(interp, trace_eval_frame);
    installed = 1;
    return 0;
}

void
trace__hook_remove(void)
{
    if (!installed)
        return;
    PyInterpreterState *interp = PyInterpreterState_Get();
    if (_PyInterpreterState_GetEvalFrameFunc(interp) == trace_eval_frame)
        _PyInterpreterState_SetEvalFrameFunc(interp, previous_eval ? previous_eval
                                                                   : _PyEval_EvalFrameDefault);
    previous_eval = NULL;
    installed = 0;
}

int
trace__hook_installed(void)
{
    return installed;
}

PyTypeObject *trace__function_twin;

/* The interpreter's own vectorcall of Python functions (not exported by 3.13): read once from a
 * function object nobody has touched. */
static vectorcallfunc function_vectorcall;

int
trace__hook_init(void)
{
    PyObject *builtins = PyEval_GetBuiltins();
    PyObject *globals = PyDict_New();
    if (globals == NULL)
        return -1;
    if (PyDict_SetItemString(globals, "__builtins__", builtins) < 0) {
        Py_DECREF(globals);
        return -1;
    }
    PyObject *r = PyRun_String("def probe(): pass", Py_file_input, globals, globals);
    PyObject *probe = r ? PyDict_GetItemString(globals, "probe") : NULL;
    if (probe != NULL)
        function_vectorcall = ((PyFunctionObject *)probe)->vectorcall;
    Py_XDECREF(r);
    Py_DECREF(globals);
    if (function_vectorcall == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "pydron: no vectorcall on Python functions");
        return -1;
    }
    return 0;
}

/* ---- vectorcall interception ------------------------------------------------------------- */

/* Run a scheduled function called from plain code as a trace session.
 * Borrows its arguments; returns a new reference. */
static PyObject *
scheduled_vectorcall(PyObject *func, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *code = PyFunction_GET_CODE(func);
    trace_codeinfo *info = trace__codeinfo_get(code);
    if (!trace__enabled || info == NULL || info->kind != TRACE_SCHEDULED || info->refused ||
        exec_in_worker())
        return function_vectorcall(func, args, nargsf, kwnames);
    /* As trace_eval_frame: the rewritten code is made when a call is first traced. */
    int ready = trace__replay_ready(func, info);
    PyObject *rewritten = ready ? NULL : trace__rewritten(code, info);
    if (ready < 0 || (rewritten == NULL && ready == 0)) {
        if (ready == 0 && !PyErr_Occurred())
            return function_vectorcall(func, args, nargsf, kwnames);   /* refused: plainly */
        return NULL;
    }
    trace_session session;
    trace__session_begin(&session, ((PyFunctionObject *)func)->func_qualname);
    PyObject *result = NULL;
    int replayed = trace__replay_call(func, info, args, PyVectorcall_NARGS(nargsf), kwnames,
                                      &result);
    if (replayed == 0) {
        uint64_t started = trace__replay_timing(info) ? trace__replay_clock() : 0;
        if (rewritten == NULL)
            rewritten = trace__rewritten(code, info);
        if (rewritten != NULL)
            result = trace__call_rewritten(func, rewritten, args, nargsf, kwnames);
        else if (!PyErr_Occurred())
            /* A graph for code the rewrite refuses (never lifted here): plainly, as above. */
            result = function_vectorcall(func, args, nargsf, kwnames);
        if (started)
            trace__replay_traced(info, started);
    }
    else if (replayed < 0)
        result = NULL;
    return trace__session_end(&session, result);
}

#if PY_VERSION_HEX < 0x030C0000
/* 3.11: a twin of PyFunction_Type, so that CALL does not inline the frame (it checks the exact
 * type) and goes through the object's vectorcall instead. */
static PyTypeObject scheduled_function_type;
static PyObject *function_reducer;

static int
twin_type_ready(void)
{
    if (scheduled_function_type.tp_flags & Py_TPFLAGS_READY)
        return 0;
    memcpy(&scheduled_function_type, &PyFunction_Type, sizeof(PyTypeObject));
    Py_SET_REFCNT(&scheduled_function_type, 1);
    scheduled_function_type.tp_flags &= ~(Py_TPFLAGS_READY | Py_TPFLAGS_READYING);
    scheduled_function_type.tp_base = &PyFunction_Type;
    scheduled_function_type.tp_bases = NULL;
    scheduled_function_type.tp_mro = NULL;
    scheduled_function_type.tp_dict = NULL;
    scheduled_function_type.tp_cache = NULL;
    scheduled_function_type.tp_subclasses = NULL;
    scheduled_function_type.tp_weaklist = NULL;
    if (PyType_Ready(&scheduled_function_type) < 0)
        return -1;
    trace__function_twin = &scheduled_function_type;
    /* pickle and copy look types up exactly: make the twin reduce as a function does (by
     * qualified name), through copyreg's dispatch table. */
    PyObject *copyreg = PyImport_ImportModule("copyreg");
    if (copyreg == NULL)
        return -1;
    PyObject *table = PyObject_GetAttrString(copyreg, "dispatch_table");
    Py_DECREF(copyreg);
    if (table == NULL)
        return -1;
    int rc = PyObject_SetItem(table, (PyObject *)&scheduled_function_type, function_reducer);
    Py_DECREF(table);
    return rc;
}

static PyObject *
reduce_function(PyObject *module, PyObject *func)
{
    return PyObject_GetAttrString(func, "__qualname__");
}

static PyMethodDef reduce_def = {"_reduce_scheduled", reduce_function, METH_O, NULL};
#endif

int
trace__intercept(PyObject *func, int on)
{
    if (!PyFunction_Check(func)
#if PY_VERSION_HEX < 0x030C0000
        && Py_TYPE(func) != &scheduled_function_type
#endif
    ) {
        PyErr_SetString(PyExc_TypeError, "pydron: only Python functions can be scheduled");
        return -1;
    }
    PyFunctionObject *f = (PyFunctionObject *)func;
#if PY_VERSION_HEX >= 0x030C0000
    PyFunction_SetVectorcall(f, on ? scheduled_vectorcall : function_vectorcall);
#else
    if (function_reducer == NULL &&
        (function_reducer = PyCFunction_New(&reduce_def, NULL)) == NULL)
        return -1;
    if (twin_type_ready() < 0)
        return -1;
    Py_SET_TYPE(func, on ? &scheduled_function_type : &PyFunction_Type);
    f->vectorcall = on ? scheduled_vectorcall : function_vectorcall;
    f->func_version = 0;   /* no CALL specialization was made for the old entry */
#endif
    return 0;
}
