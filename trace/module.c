/* trace/module.c — the pydron._core extension module: per-code state for the decorators,
 * enable/disable of the frame hook, and the gathering of what each subsystem adds. */
#include "trace/internal.h"
#include "trace/trace.h"
#include "exec/exec.h"
#include "jit/jit.h"
#include "remote/remote.h"

#include <pthread.h>
#include <xxhash.h>

Py_ssize_t trace__extra_index = -1;
int trace__enabled;
PyObject *trace__module;
static PyObject *rewrite_hook;    /* pydron._api._rewrite_code(code) -> code | None */


static void
codeinfo_free(void *p)
{
    trace_codeinfo *info = p;
    if (info == NULL)
        return;
    Py_XDECREF(info->rewritten);
    trace__replay_free(info->replay);
    PyMem_Free(info);
}

trace_codeinfo *
trace__codeinfo_ensure(PyObject *code)
{
    trace_codeinfo *info = trace__codeinfo_get(code);
    if (info)
        return info;
    info = PyMem_Calloc(1, sizeof(*info));
    if (info == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (compat_code_set_extra(code, trace__extra_index, info) < 0) {
        PyMem_Free(info);
        return NULL;
    }
    return info;
}

PyObject *
trace__rewritten(PyObject *code, trace_codeinfo *info)
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

/* Borrowed reference to fn's code. */
static PyObject *
function_code(PyObject *fn, const char *what)
{
    if (PyMethod_Check(fn))
        fn = PyMethod_GET_FUNCTION(fn);
    if (!trace__is_function(fn)) {
        PyErr_Format(PyExc_TypeError, "pydron.%s expects a Python function, got %.100s", what,
                     Py_TYPE(fn)->tp_name);
        return NULL;
    }
    return PyFunction_GET_CODE(fn);
}

/* _mark(fn, kind, threads=False, timeout=0.0, memory_limit=0): tag fn's code object for the
 * hook and the dispatcher (the options say how a functional function's tasks run). */
static PyObject *
core_mark(PyObject *module, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fn", "kind", "threads", "timeout", "memory_limit", NULL};
    PyObject *fn;
    int kind, threads = 0;
    double timeout = 0;
    unsigned long long memory_limit = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi|pdK:_mark", kwlist, &fn, &kind, &threads,
                                     &timeout, &memory_limit))
        return NULL;
    if (timeout < 0) {
        PyErr_Format(PyExc_ValueError, "pydron: a timeout must be positive, got %g", timeout);
        return NULL;
    }
    PyObject *code = function_code(fn, kind == TRACE_FUNCTIONAL ? "functional" : "schedule");
    if (code == NULL)
        return NULL;
    trace_codeinfo *info = trace__codeinfo_ensure(code);
    if (info == NULL)
        return NULL;
    info->kind = kind;
    info->options.threads = threads;
    info->options.timeout_s = timeout;
    info->options.memory_limit = (size_t)memory_limit;
    Py_RETURN_NONE;
}

static PyObject *
core_kind(PyObject *module, PyObject *fn)
{
    if (PyMethod_Check(fn))
        fn = PyMethod_GET_FUNCTION(fn);
    if (!trace__is_function(fn))
        return PyLong_FromLong(TRACE_PLAIN);
    trace_codeinfo *info = trace__codeinfo_get(PyFunction_GET_CODE(fn));
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
    if (trace__intercept(fn, on) < 0)
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
    if (hook && trace__hook_install() < 0)
        return NULL;
    trace__enabled = 1;
    Py_RETURN_NONE;
}

/* Read one int option from the dict (borrowed); a missing key keeps *out. 0 or -1 with an
 * exception naming the key. */
static int
configure_int(PyObject *options, const char *key, int lo, int hi, int *out)
{
    PyObject *v = PyDict_GetItemString(options, key);   /* borrowed */
    if (v == NULL)
        return 0;
    long n = PyLong_AsLong(v);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < lo || n > hi) {
        PyErr_Format(PyExc_ValueError, "pydron._configure: %s must be from %d to %d, got %ld",
                     key, lo, hi, n);
        return -1;
    }
    *out = (int)n;
    return 0;
}

/* _configure({"thread_workers": n, "arena_arrays": 0|1, "task_timeout": s}): the C core's options,
 * resolved by pydron/config.py (the one reader of PYDRON_* variables); called by pydron.enable()
 * before the fork server starts, so workers inherit them. */
static PyObject *
core_configure(PyObject *module, PyObject *options)
{
    if (!PyDict_Check(options)) {
        PyErr_Format(PyExc_TypeError, "pydron._configure expects a dict, got %.100s",
                     Py_TYPE(options)->tp_name);
        return NULL;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(options, &pos, &key, &value)) {     /* a misspelt key is an error */
        int known = PyUnicode_Check(key) &&
                    (PyUnicode_CompareWithASCIIString(key, "thread_workers") == 0 ||
                     PyUnicode_CompareWithASCIIString(key, "arena_arrays") == 0 ||
                     PyUnicode_CompareWithASCIIString(key, "task_timeout") == 0 ||
                     PyUnicode_CompareWithASCIIString(key, "check") == 0);
        if (!known) {
            PyErr_Format(PyExc_ValueError, "pydron._configure: unknown option %R "
                         "(accepted: thread_workers, arena_arrays, task_timeout, check)", key);
            return NULL;
        }
    }
    exec_options o = exec_current_options();
    if (configure_int(options, "thread_workers", 0, 1024, &o.thread_workers) < 0 ||
        configure_int(options, "arena_arrays", 0, 1, &o.arena_arrays) < 0 ||
        configure_int(options, "check", 0, 1, &o.check) < 0)
        return NULL;
    PyObject *timeout = PyDict_GetItemString(options, "task_timeout");   /* borrowed */
    if (timeout != NULL && timeout != Py_None) {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1 && PyErr_Occurred())
            return NULL;
        if (t < 0) {
            PyErr_Format(PyExc_ValueError, "pydron._configure: task_timeout must be >= 0, "
                         "got %R", timeout);
            return NULL;
        }
        o.task_timeout_s = t;
    }
    exec_configure(&o);
    Py_RETURN_NONE;
}

static PyObject *
core_sync_imports(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(exec_sync_imports());
}

static PyObject *
core_disable(PyObject *module, PyObject *unused)
{
    trace__enabled = 0;
    trace__hook_remove();
    Py_RETURN_NONE;
}

static PyObject *
core_shutdown(PyObject *module, PyObject *unused)
{
    trace__enabled = 0;
    trace__hook_remove();
    exec_shutdown();
    Py_RETURN_NONE;
}

static PyObject *
core_is_enabled(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(trace__enabled);
}

static PyObject *
core_hook_installed(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(trace__hook_installed());
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
    trace__session_begin(&session, ((PyCodeObject *)code)->co_qualname);
    PyObject *result = PyEval_EvalCode(code, globals, locals);
    return trace__session_end(&session, result);
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
    {"_mark", (PyCFunction)(void (*)(void))core_mark, METH_VARARGS | METH_KEYWORDS,
     "_mark(fn, kind, threads=False, timeout=0, memory_limit=0): tag fn's code object."},
    {"_kind", core_kind, METH_O, "_kind(fn): 0 plain, 1 functional, 2 scheduled."},
    {"_set_rewrite", core_set_rewrite, METH_O, "Register the bytecode rewrite function."},
    {"_enable", core_enable, METH_VARARGS, "_enable(workers, hook): start tracing."},
    {"_intercept", core_intercept, METH_VARARGS, "_intercept(fn, on): enter fn through the trace."},
    {"_hook_installed", (PyCFunction)core_hook_installed, METH_NOARGS, NULL},
    {"_configure", core_configure, METH_O, "_configure(dict): the C core's options."},
    {"_disable", core_disable, METH_NOARGS, "Remove the frame hook; workers stay."},
    {"_sync_imports", core_sync_imports, METH_NOARGS,
     "Before the first worker: the fork server imports the master's new modules."},
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

/* In a child forked by user code (os.fork, a multiprocessing worker), the pool is the parent's and
 * exec has just forgotten it: scheduled code runs plainly there, which is always right, rather
 * than failing for want of an executor (or starting a pool per child). */
static void
atfork_child(void)
{
    if (!exec_running())
        trace__enabled = 0;
}

PyMODINIT_FUNC
PyInit__core(void)
{
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL)
        return NULL;
    trace__module = m;
    if (trace__extra_index < 0)
        trace__extra_index = compat_request_code_extra_index(codeinfo_free);
    if (trace__extra_index < 0) {
        PyErr_SetString(PyExc_RuntimeError, "pydron: no code-object extra slot left");
        goto error;
    }
    if (PyModule_AddIntConstant(m, "FUNCTIONAL", TRACE_FUNCTIONAL) < 0 ||
        PyModule_AddIntConstant(m, "SCHEDULED", TRACE_SCHEDULED) < 0)
        goto error;
    if (graph_module_init(m) < 0 || trace__dispatch_init(m) < 0 || trace__replay_init(m) < 0 ||
        trace__hook_init() < 0 || exec_module_init(m) < 0 || jit_module_init(m) < 0 ||
        remote_module_init(m) < 0)
        goto error;
    /* After exec's own handler (registered by exec_module_init), which forgets the pool. */
    static int atfork_registered;
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, atfork_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pydron: pthread_atfork failed");
            goto error;
        }
        atfork_registered = 1;
    }
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
