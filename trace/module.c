/* trace/module.c — the pydron._core extension module: per-code state for the decorators,
 * enable/disable of the frame hook, and the gathering of what each subsystem adds. */
#include "trace/internal.h"
#include "trace/trace.h"
#include "exec/exec.h"
#include "jit/jit.h"

#include <xxhash.h>

Py_ssize_t trace_extra_index = -1;
int trace_enabled;
PyObject *trace_module;
static PyObject *rewrite_hook;    /* pydron._api._rewrite_code(code) -> code | None */

static void
codeinfo_free(void *p)
{
    trace_codeinfo *info = p;
    if (info == NULL)
        return;
    Py_XDECREF(info->rewritten);
    PyMem_Free(info);
}

trace_codeinfo *
trace_codeinfo_ensure(PyObject *code)
{
    trace_codeinfo *info = trace_codeinfo_get(code);
    if (info)
        return info;
    info = PyMem_Calloc(1, sizeof(*info));
    if (info == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (compat_code_set_extra(code, trace_extra_index, info) < 0) {
        PyMem_Free(info);
        return NULL;
    }
    return info;
}

PyObject *
trace_rewritten(PyObject *code, trace_codeinfo *info)
{
    if (info->rewritten)
        return info->rewritten;
    if (info->refused)
        return NULL;
    if (rewrite_hook == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: the rewrite is not registered");
        return NULL;
    }
    PyObject *r = PyObject_CallOneArg(rewrite_hook, code);
    if (r == NULL)
        return NULL;
    if (r == Py_None) {
        Py_DECREF(r);
        info->refused = 1;
        return NULL;
    }
    info->rewritten = r;
    return r;
}

static PyObject *
function_code(PyObject *fn, const char *what)
{
    if (PyMethod_Check(fn))
        fn = PyMethod_GET_FUNCTION(fn);
    if (!trace_is_function(fn)) {
        PyErr_Format(PyExc_TypeError, "pydron.%s expects a Python function, got %.100s", what,
                     Py_TYPE(fn)->tp_name);
        return NULL;
    }
    return PyFunction_GET_CODE(fn);
}

/* _mark(fn, kind, threads): tag fn's code object for the hook and the dispatcher. */
static PyObject *
core_mark(PyObject *module, PyObject *args)
{
    PyObject *fn;
    int kind, threads = 0;
    if (!PyArg_ParseTuple(args, "Oi|p", &fn, &kind, &threads))
        return NULL;
    PyObject *code = function_code(fn, kind == TRACE_FUNCTIONAL ? "functional" : "schedule");
    if (code == NULL)
        return NULL;
    trace_codeinfo *info = trace_codeinfo_ensure(code);
    if (info == NULL)
        return NULL;
    info->kind = kind;
    info->threads = threads;
    Py_RETURN_NONE;
}

static PyObject *
core_kind(PyObject *module, PyObject *fn)
{
    if (PyMethod_Check(fn))
        fn = PyMethod_GET_FUNCTION(fn);
    if (!trace_is_function(fn))
        return PyLong_FromLong(TRACE_PLAIN);
    trace_codeinfo *info = trace_codeinfo_get(PyFunction_GET_CODE(fn));
    return PyLong_FromLong(info ? info->kind : TRACE_PLAIN);
}

static PyObject *
core_set_rewrite(PyObject *module, PyObject *fn)
{
    Py_XSETREF(rewrite_hook, Py_NewRef(fn));
    Py_RETURN_NONE;
}

/* _intercept(fn, on): route plain calls of a scheduled function object through the trace. */
static PyObject *
core_intercept(PyObject *module, PyObject *args)
{
    PyObject *fn;
    int on;
    if (!PyArg_ParseTuple(args, "Op", &fn, &on))
        return NULL;
    if (trace_intercept(fn, on) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* _enable(workers, hook): start the executor's fork server; with hook, also install the PEP 523
 * frame hook (otherwise scheduled functions are entered through _intercept). */
static PyObject *
core_enable(PyObject *module, PyObject *args)
{
    int workers = 0, hook = 0;
    if (!PyArg_ParseTuple(args, "|ip", &workers, &hook))
        return NULL;
    if (workers < 0) {
        PyErr_Format(PyExc_ValueError, "pydron.enable: workers must be >= 0, got %d", workers);
        return NULL;
    }
    if (exec_in_worker())
        Py_RETURN_NONE;   /* a module imported by a worker enables pydron: tasks run plainly */
    if (exec_start(workers) < 0)
        return NULL;
    if (hook && trace_hook_install() < 0)
        return NULL;
    trace_enabled = 1;
    Py_RETURN_NONE;
}

static PyObject *
core_disable(PyObject *module, PyObject *unused)
{
    trace_enabled = 0;
    trace_hook_remove();
    Py_RETURN_NONE;
}

static PyObject *
core_shutdown(PyObject *module, PyObject *unused)
{
    trace_enabled = 0;
    trace_hook_remove();
    exec_shutdown();
    Py_RETURN_NONE;
}

static PyObject *
core_is_enabled(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(trace_enabled);
}

static PyObject *
core_hook_installed(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(trace_hook_installed());
}

static PyObject *
core_stats(PyObject *module, PyObject *unused)
{
    return graph_stats();
}

/* _run_scheduled_module(code, globals, locals=None): run a module's rewritten code object as a
 * top-level scheduled call does its function (`pydron run` scheduling a script's top level): in
 * a trace session, so that whatever it submitted is waited for, first failure first, and the
 * containers pendings were moved into are forced through before it returns. Returns the code's
 * result (None for a module), new reference, or NULL with the exception. */
static PyObject *
core_run_scheduled_module(PyObject *module, PyObject *args)
{
    PyObject *code, *globals, *locals = Py_None;
    if (!PyArg_ParseTuple(args, "O!O!|O:_run_scheduled_module", &PyCode_Type, &code,
                          &PyDict_Type, &globals, &locals))
        return NULL;
    if (locals == Py_None)
        locals = globals;
    else if (!PyMapping_Check(locals)) {
        PyErr_Format(PyExc_TypeError, "_run_scheduled_module: locals must be a mapping, not %.100s",
                     Py_TYPE(locals)->tp_name);
        return NULL;
    }
    trace_session session;
    trace_session_begin(&session);
    PyObject *result = PyEval_EvalCode(code, globals, locals);
    return trace_session_end(&session, result);
}

static PyObject *
core_versions(PyObject *module, PyObject *unused)
{
    unsigned xxh = XXH_versionNumber();
    char xxh_version[32];
    snprintf(xxh_version, sizeof xxh_version, "%u.%u.%u", xxh / 10000, (xxh / 100) % 100,
             xxh % 100);
    return Py_BuildValue("{s:s,s:s,s:s,s:s}", "python", Py_GetVersion(), "llvm",
                         jit_llvm_version(), "libffi", exec_ffi_version(), "xxhash", xxh_version);
}

static PyMethodDef core_methods[] = {
    {"_mark", core_mark, METH_VARARGS, "_mark(fn, kind, threads=False): tag fn's code object."},
    {"_kind", core_kind, METH_O, "_kind(fn): 0 plain, 1 functional, 2 scheduled."},
    {"_set_rewrite", core_set_rewrite, METH_O, "Register the bytecode rewrite function."},
    {"_enable", core_enable, METH_VARARGS, "_enable(workers, hook): start tracing."},
    {"_intercept", core_intercept, METH_VARARGS, "_intercept(fn, on): enter fn through the trace."},
    {"_hook_installed", (PyCFunction)core_hook_installed, METH_NOARGS, NULL},
    {"_disable", core_disable, METH_NOARGS, "Remove the frame hook; workers stay."},
    {"_shutdown", core_shutdown, METH_NOARGS, "Remove the hook and stop every worker."},
    {"_is_enabled", core_is_enabled, METH_NOARGS, NULL},
    {"_stats", core_stats, METH_NOARGS, "Task counters of this process."},
    {"_run_scheduled_module", core_run_scheduled_module, METH_VARARGS,
     "_run_scheduled_module(code, globals, locals=None): run a module's rewritten code as "
     "scheduled code."},
    {"versions", core_versions, METH_NOARGS, "Versions of CPython, LLVM, libffi and xxHash."},
    {NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "pydron._core", "pydron's C core.", -1, core_methods,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL)
        return NULL;
    trace_module = m;
    if (trace_extra_index < 0)
        trace_extra_index = compat_request_code_extra_index(codeinfo_free);
    if (trace_extra_index < 0) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: no code-object extra slot left");
        goto error;
    }
    if (PyModule_AddIntConstant(m, "FUNCTIONAL", TRACE_FUNCTIONAL) < 0 ||
        PyModule_AddIntConstant(m, "SCHEDULED", TRACE_SCHEDULED) < 0)
        goto error;
    if (graph_module_init(m) < 0 || trace_dispatch_init(m) < 0 || trace_hook_init() < 0 || exec_module_init(m) < 0 ||
        jit_module_init(m) < 0)
        goto error;
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
