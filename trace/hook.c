/* trace/hook.c — the PEP 523 frame-evaluation hook. Decoration only tags code objects; when a
 * frame of a scheduled code object starts, the hook runs the cached rewritten code instead, as a
 * trace session, and releases the original frame. Everything else goes straight to the default
 * evaluator after one load of the code object's extra slot. Frame layouts differ by version:
 * this file is the one place that knows them. */
#define Py_BUILD_CORE
#include "trace/internal.h"
#include "exec/exec.h"
#if PY_VERSION_HEX >= 0x030D0000
#include <internal/pycore_interp.h>
#endif
#include <internal/pycore_frame.h>
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

#if PY_VERSION_HEX >= 0x030D0000
#define LOCAL_VALUE(f, i) PyStackRef_AsPyObjectBorrow((f)->localsplus[i])
#else
#define LOCAL_VALUE(f, i) ((f)->localsplus[i])
#endif

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
    /* 3.12's _PyEval_Vector leaves the clean-up to the evaluator (clear_thread_frame). */
    _PyFrame_ClearExceptCode(frame);
    Py_DECREF(frame->f_code);
    ts->c_recursion_remaining--;
    _PyThreadState_PopFrame(ts, frame);
    ts->c_recursion_remaining++;
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
    result = trace_call_rewritten(FRAME_FUNC(frame), rewritten, stack, npos, kwnames);
done:
    Py_XDECREF(kwnames);
    PyMem_Free(stack);
    return result;
}

static PyObject *
trace_eval_frame(PyThreadState *ts, _PyInterpreterFrame *frame, int throwflag)
{
    PyCodeObject *co = FRAME_CODE(frame);
    /* Fast path: one look at the code object's extra slot. */
    code_extra *extra = (code_extra *)co->co_extra;
    if (extra == NULL || extra->ce_size <= trace_extra_index || throwflag)
        return default_eval(ts, frame, throwflag);
    trace_codeinfo *info = extra->ce_extras[trace_extra_index];
    if (info == NULL || info->kind != TRACE_SCHEDULED || info->refused || !trace_enabled ||
        exec_in_worker())
        return default_eval(ts, frame, throwflag);

    PyObject *rewritten = trace_rewritten((PyObject *)co, info);
    if (rewritten == NULL) {
        if (!PyErr_Occurred())
            return default_eval(ts, frame, throwflag);   /* refused: runs plainly */
        release_frame(ts, frame);
        return NULL;
    }
    Py_ssize_t start = trace_session_begin();
    PyObject *result = call_with_frame_args(frame, rewritten);
    result = trace_session_end(start, result);
    release_frame(ts, frame);
    return result;
}

int
trace_hook_install(void)
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
trace_hook_remove(void)
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
trace_hook_installed(void)
{
    return installed;
}
