/* exec/threads.c — the in-process thread pool behind @pydron.functional(executor="threads").
 * A ctypes function pointer with a declared signature of plain C types is called through libffi
 * with the GIL released (arguments converted before, the result after, with the GIL held); any
 * other callable runs as a Python call on a pool thread, which may release the GIL itself. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <ffi.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "exec/internal.h"
#include "pydron_options.h"

#ifndef PYDRON_FFI_VERSION
#define PYDRON_FFI_VERSION "unknown"
#endif

/* ctypes _FuncPtr._flags_ bits that make a call need the GIL or ctypes' own bookkeeping. */
#define CTYPES_FUNCFLAG_PYTHONAPI 0x4
#define CTYPES_FUNCFLAG_USE_ERRNO 0x8
#define CTYPES_FUNCFLAG_USE_LASTERROR 0x10

#define SITE_BUCKETS 256
#define MAX_AS_PARAMETER_DEPTH 8

/* Storage for one C argument or return value; libffi reads/writes it through a pointer. */
typedef union {
    ffi_arg u;
    ffi_sarg s;
    signed char b;
    unsigned char B;
    short h;
    unsigned short H;
    int i;
    unsigned int I;
    long l;
    unsigned long L;
    long long q;
    unsigned long long Q;
    float f;
    double d;
    long double g;
    void *p;
} native_value;

/* How one argument or the result crosses between Python and C. `code` is the ctypes type code of
 * the fundamental simple type ('i', 'd', 'P', 'z', ...), '*' for POINTER(T), 'v' for void. */
typedef struct {
    char code;
    char custom_from_param;   /* a subclass overrides from_param: call it (GIL held), then convert */
    ffi_type *ffi;
    PyObject *type;           /* borrowed from the site's argtypes tuple / restype */
    PyObject *pointee;        /* POINTER(T): T, owned */
} native_slot;

/* One cached signature of one function address: the prepared cif and how to convert values.
 * Sites are created with the GIL held and live until exec__threads_shutdown, so a queued call
 * may point at its site without a reference count. */
typedef struct native_site {
    struct native_site *next;  /* hash bucket chain */
    void *fnaddr;
    PyObject *restype;         /* owned */
    PyObject *argtypes;        /* owned tuple */
    int fast;                  /* 0: signature not supported, call through ctypes in Python */
    Py_ssize_t nargs;
    native_slot result;
    ffi_cif cif;
    ffi_type **atypes;         /* owned, nargs entries (the cif points at it) */
    native_slot args[];        /* nargs entries */
} native_site;

/* One submitted call, from the queue through a worker to the completion list. */
typedef struct thread_job {
    struct thread_job *next;
    uint64_t task_id;
    uint64_t generation;            /* pool.generation at submit: older ones were cancelled */
    PyObject *fn, *args, *kwargs;   /* owned (kwargs may be NULL); dropped by the worker */
    native_site *site;              /* NULL: a Python call */
    void *fnaddr;
    PyObject *keepalive;            /* owned list or NULL: converted arguments C memory points into */
    native_value ret;
    void **avalues;                 /* nargs pointers into values */
    native_value *values;
    int failed;
    PyObject *object;               /* Python call: owned result or exception instance */
} thread_job;

/* The pool. `mu` guards the queue, the completion list and the thread bookkeeping; the GIL guards
 * `outstanding`, the statistics and the site cache. No thread waits for the GIL holding `mu`. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t work_cv;        /* a job was queued or the pool is stopping */
    pthread_cond_t done_cv;        /* a job finished */
    thread_job *queue_head, *queue_tail;
    Py_ssize_t queued;
    thread_job *done_head, *done_tail;
    pthread_t *threads;
    int nthreads, max_threads, idle, stopping;
    pid_t pid;                     /* process the threads belong to */
    Py_ssize_t outstanding;
    uint64_t generation;           /* bumped by exec__threads_cancel_all */
    uint64_t ffi_calls, python_calls, helper_ids;
    native_site *sites[SITE_BUCKETS];
    Py_ssize_t nsites;
    int draining;                  /* drains in progress (on_result may re-enter exec) */
    int closed;                    /* interpreter exit: no more tasks */
} pool = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .work_cv = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* ctypes' base classes, looked up once (new references kept for the life of the process). */
static PyObject *ctypes_cfuncptr, *ctypes_simple, *ctypes_pointer, *ctypes_array, *ctypes_c_char;
static PyObject *ctypes_c_char_p, *ctypes_c_char_p_from_param;
/* Attribute names looked up on every ctypes call, interned once. */
static PyObject *str_errcheck, *str_argtypes, *str_restype, *str_flags, *str_as_parameter;

/* Set in pool threads: they must not join the pool they belong to. */
static _Thread_local int in_pool_thread;

/* Falls back to doing nothing until exec/exec.c provides the real wake-up. */
__attribute__((weak)) void
exec__notify_master(void)
{
}

const char *
exec_ffi_version(void)
{
    return PYDRON_FFI_VERSION;
}

/* ---------------------------------------------------------------- small Python helpers */

/* Like PyObject_GetOptionalAttr (3.13): 1 and a new reference, 0 if absent, -1 on error.
 * `name` is an interned string from str_* below. */
static int
lookup_attr(PyObject *obj, PyObject *name, PyObject **result)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, result);
#else
    return _PyObject_LookupAttr(obj, name, result);
#endif
}

/* The raised exception as one normalized instance with its traceback; new reference. */
static PyObject *
fetch_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL)
        return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Raise exc (borrowed) again, with its own traceback. */
static void
restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(Py_NewRef(exc));
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), Py_NewRef(exc), PyException_GetTraceback(exc));
#endif
}

static int
load_ctypes(void)
{
    if (ctypes_cfuncptr != NULL)
        return 0;
    if (str_errcheck == NULL) {
        str_errcheck = PyUnicode_InternFromString("errcheck");
        str_argtypes = PyUnicode_InternFromString("argtypes");
        str_restype = PyUnicode_InternFromString("restype");
        str_flags = PyUnicode_InternFromString("_flags_");
        str_as_parameter = PyUnicode_InternFromString("_as_parameter_");
        if (!str_errcheck || !str_argtypes || !str_restype || !str_flags || !str_as_parameter) {
            Py_CLEAR(str_errcheck);
            Py_CLEAR(str_argtypes);
            Py_CLEAR(str_restype);
            Py_CLEAR(str_flags);
            Py_CLEAR(str_as_parameter);
            return -1;
        }
    }
    PyObject *mod = PyImport_ImportModule("ctypes");
    if (mod == NULL)
        return -1;
    static const char *names[] = {"_SimpleCData", "_Pointer", "Array", "c_char", "c_char_p",
                                  "_CFuncPtr"};
    PyObject *found[6] = {NULL};
    int ok = 1;
    for (int i = 0; i < 6 && ok; i++)
        ok = (found[i] = PyObject_GetAttrString(mod, names[i])) != NULL;
    Py_DECREF(mod);
    /* ctypes makes POINTER(c_char) take c_char_p's from_param: recognised to convert alike. */
    PyObject *from_param = ok ? PyObject_GetAttrString(found[4], "from_param") : NULL;
    if (from_param == NULL) {
        for (int i = 0; i < 6; i++)
            Py_XDECREF(found[i]);
        return -1;
    }
    ctypes_simple = found[0];
    ctypes_pointer = found[1];
    ctypes_array = found[2];
    ctypes_c_char = found[3];
    ctypes_c_char_p = found[4];
    ctypes_c_char_p_from_param = from_param;
    ctypes_cfuncptr = found[5];   /* last: it marks the whole set as loaded */
    return 0;
}

/* The start of a ctypes instance's memory (its buffer); NULL + exception if it has none. */
static void *
cdata_address(PyObject *obj, Py_ssize_t *len)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    void *buf = view.buf;
    if (len != NULL)
        *len = view.len;
    PyBuffer_Release(&view);   /* the instance itself keeps the memory */
    return buf;
}

/* The pointer a pointer-like ctypes instance holds (first word of its memory). */
static int
cdata_pointer_value(PyObject *obj, void **out)
{
    Py_ssize_t len;
    void *buf = cdata_address(obj, &len);
    if (buf == NULL)
        return -1;
    if (len < (Py_ssize_t)sizeof(void *)) {
        PyErr_SetString(PyExc_TypeError, "ctypes instance too small to hold a pointer");
        return -1;
    }
    memcpy(out, buf, sizeof(void *));
    return 0;
}

static int
is_instance_of(PyObject *obj, PyObject *cls)
{
    return cls != NULL && PyObject_TypeCheck(obj, (PyTypeObject *)cls);
}

/* ---------------------------------------------------------------- signatures */

/* The fundamental simple type (the direct subclass of _SimpleCData) that `type` derives from;
 * borrowed, or NULL if `type` is not a simple ctypes type. */
static PyTypeObject *
simple_fundamental(PyTypeObject *type)
{
    if (!PyType_IsSubtype(type, (PyTypeObject *)ctypes_simple) || type == (PyTypeObject *)ctypes_simple)
        return NULL;
    while (type->tp_base != NULL && type->tp_base != (PyTypeObject *)ctypes_simple)
        type = type->tp_base;
    return type->tp_base == NULL ? NULL : type;
}

/* Does a class between `type` (inclusive) and `stop` (exclusive) define its own from_param?
 * 1, 0, or -1 with an exception. */
static int
overrides_from_param(PyTypeObject *type, PyTypeObject *stop)
{
    PyObject *mro = type->tp_mro;
    if (mro == NULL || !PyTuple_Check(mro))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *cls = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (cls == stop)
            return 0;
        PyObject *dict = cls->tp_dict;
        if (dict == NULL)
            continue;
        PyObject *found = PyDict_GetItemString(dict, "from_param");   /* borrowed */
        if (found != NULL)
            return 1;
    }
    return 0;
}

/* Is type's from_param (first found along its MRO) ctypes' c_char_p.from_param?
 * 1, 0, or -1 with an exception. */
static int
takes_char_p_from_param(PyTypeObject *type)
{
    PyObject *mro = type->tp_mro;
    if (mro == NULL || !PyTuple_Check(mro))
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(mro); i++) {
        PyObject *dict = ((PyTypeObject *)PyTuple_GET_ITEM(mro, i))->tp_dict;
        PyObject *found = dict != NULL ? PyDict_GetItemString(dict, "from_param") : NULL;
        if (found != NULL)
            return PyObject_RichCompareBool(found, ctypes_c_char_p_from_param, Py_EQ);
    }
    return 0;
}

static ffi_type *
ffi_type_for_code(char code)
{
    switch (code) {
    case 'b': return &ffi_type_schar;
    case 'B': return &ffi_type_uchar;
    case 'c': return &ffi_type_schar;
    case '?': return &ffi_type_uchar;
    case 'h': return &ffi_type_sshort;
    case 'H': return &ffi_type_ushort;
    case 'i': return &ffi_type_sint;
    case 'I': return &ffi_type_uint;
    case 'l': return &ffi_type_slong;
    case 'L': return &ffi_type_ulong;
    case 'q': return &ffi_type_sint64;
    case 'Q': return &ffi_type_uint64;
    case 'f': return &ffi_type_float;
    case 'd': return &ffi_type_double;
    case 'g': return &ffi_type_longdouble;
    case 'P': case 'z': case '*': return &ffi_type_pointer;
    default: return NULL;
    }
}

/* Fill `slot` for a ctypes type used as an argument (is_result 0) or as the restype.
 * 1: supported, 0: not supported (call through ctypes instead), -1 with an exception. */
static int
classify_type(PyObject *type, int is_result, native_slot *slot)
{
    memset(slot, 0, sizeof(*slot));
    slot->type = type;
    if (is_result && type == Py_None) {
        slot->code = 'v';
        slot->ffi = &ffi_type_void;
        return 1;
    }
    if (!PyType_Check(type))
        return 0;
    PyTypeObject *tp = (PyTypeObject *)type;
    PyTypeObject *fundamental = simple_fundamental(tp);
    if (fundamental != NULL) {
        /* ctypes hands back an instance, or calls _check_retval_, for a subclass as restype. */
        if (is_result && fundamental != tp)
            return 0;
        PyObject *code_obj = PyObject_GetAttrString((PyObject *)fundamental, "_type_");
        if (code_obj == NULL)
            return -1;
        const char *code = PyUnicode_Check(code_obj) ? PyUnicode_AsUTF8(code_obj) : NULL;
        if (code == NULL || strlen(code) != 1) {
            Py_DECREF(code_obj);
            if (PyErr_Occurred())
                return -1;
            return 0;
        }
        slot->code = code[0];
        Py_DECREF(code_obj);
        slot->ffi = ffi_type_for_code(slot->code);
        if (slot->ffi == NULL || slot->code == '*')
            return 0;
        int custom = overrides_from_param(tp, fundamental);
        if (custom < 0)
            return -1;
        /* A custom from_param of a non-pointer type may turn into anything by ConvParam's rules. */
        if (custom && slot->code != 'P' && slot->code != 'z')
            return 0;
        slot->custom_from_param = (char)custom;
        return 1;
    }
    if (PyType_IsSubtype(tp, (PyTypeObject *)ctypes_pointer) && tp != (PyTypeObject *)ctypes_pointer) {
        if (is_result && tp->tp_base != (PyTypeObject *)ctypes_pointer)
            return 0;
        PyObject *pointee = PyObject_GetAttrString(type, "_type_");
        if (pointee == NULL) {
            PyErr_Clear();   /* an incomplete POINTER("name") type */
            return 0;
        }
        slot->pointee = pointee;   /* owned by the slot, released with the site */
        if (!PyType_Check(pointee))
            return 0;
        int custom = overrides_from_param(tp, (PyTypeObject *)ctypes_pointer);
        if (custom < 0)
            return -1;
        if (custom && !is_result) {
            int as_char_p = takes_char_p_from_param(tp);
            if (as_char_p < 0)
                return -1;
            if (as_char_p) {   /* POINTER(c_char): converted exactly as c_char_p */
                slot->code = 'z';
                slot->ffi = &ffi_type_pointer;
                return 1;
            }
        }
        slot->code = '*';
        slot->ffi = &ffi_type_pointer;
        slot->custom_from_param = (char)custom;
        return 1;
    }
    return 0;
}

static void
site_free(native_site *site)
{
    Py_XDECREF(site->result.pointee);
    for (Py_ssize_t i = 0; i < site->nargs; i++)
        Py_XDECREF(site->args[i].pointee);
    Py_XDECREF(site->restype);
    Py_XDECREF(site->argtypes);
    PyMem_RawFree(site->atypes);
    PyMem_RawFree(site);
}

static int
site_matches(native_site *site, void *fnaddr, PyObject *restype, PyObject **types, Py_ssize_t n)
{
    if (site->fnaddr != fnaddr || site->restype != restype || site->nargs != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyTuple_GET_ITEM(site->argtypes, i) != types[i])
            return 0;
    return 1;
}

/* The cached site for this address and signature, made on first use; borrowed, NULL + exception. */
static native_site *
site_lookup(void *fnaddr, PyObject *restype, PyObject *argtypes_seq)
{
    PyObject **types = PySequence_Fast_ITEMS(argtypes_seq);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(argtypes_seq);
    size_t bucket = ((uintptr_t)fnaddr >> 4) % SITE_BUCKETS;
    for (native_site *s = pool.sites[bucket]; s != NULL; s = s->next)
        if (site_matches(s, fnaddr, restype, types, n))
            return s;

    native_site *site = PyMem_RawCalloc(1, sizeof(native_site) + (size_t)n * sizeof(native_slot));
    if (site == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    site->fnaddr = fnaddr;
    site->nargs = n;
    site->restype = Py_NewRef(restype);
    site->argtypes = PyTuple_New(n);
    site->atypes = PyMem_RawCalloc((size_t)n + 1, sizeof(ffi_type *));
    if (site->argtypes == NULL || site->atypes == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(site->argtypes, i, Py_NewRef(types[i]));

    int fast = classify_type(restype, 1, &site->result);
    for (Py_ssize_t i = 0; fast > 0 && i < n; i++) {
        fast = classify_type(PyTuple_GET_ITEM(site->argtypes, i), 0, &site->args[i]);
        site->atypes[i] = site->args[i].ffi;
    }
    if (fast < 0)
        goto error;
    if (fast > 0) {
        ffi_status st = ffi_prep_cif(&site->cif, FFI_DEFAULT_ABI, (unsigned int)n,
                                     site->result.ffi, site->atypes);
        fast = (st == FFI_OK);
    }
    site->fast = fast;
    site->next = pool.sites[bucket];
    pool.sites[bucket] = site;
    pool.nsites++;
    return site;

error:
    site_free(site);
    return NULL;
}

/* ---------------------------------------------------------------- argument conversion */

/* Conversion outcomes: the value is in *out; ctypes must do it (fall back); a real error. */
enum { CONV_FALLBACK = 0, CONV_OK = 1, CONV_ERROR = -1 };

static int
keep_alive(thread_job *job, PyObject *obj)
{
    if (job->keepalive == NULL) {
        job->keepalive = PyList_New(0);
        if (job->keepalive == NULL)
            return -1;
    }
    return PyList_Append(job->keepalive, obj);
}

/* The simple type code of a ctypes instance's class, or 0. */
static char
instance_simple_code(PyObject *obj)
{
    PyTypeObject *fundamental = simple_fundamental(Py_TYPE(obj));
    if (fundamental == NULL)
        return 0;
    PyObject *code_obj = PyObject_GetAttrString((PyObject *)fundamental, "_type_");
    if (code_obj == NULL) {
        PyErr_Clear();
        return 0;
    }
    const char *code = PyUnicode_Check(code_obj) ? PyUnicode_AsUTF8(code_obj) : NULL;
    char c = (code != NULL && strlen(code) == 1) ? code[0] : 0;
    if (code == NULL)
        PyErr_Clear();
    Py_DECREF(code_obj);
    return c;
}

/* A pointer-carrying ctypes instance (array: its address; pointer, function pointer, c_void_p,
 * c_char_p, c_wchar_p: the pointer it holds), as ctypes' ConvParam passes it. Without
 * `any_void_p`, a c_void_p instance is refused (c_void_p.from_param of a subclass takes only
 * its own instances, which the caller has already handled). */
static int
convert_cdata_pointer(PyObject *obj, int any_void_p, void **out)
{
    if (is_instance_of(obj, ctypes_array)) {
        void *addr = cdata_address(obj, NULL);
        if (addr == NULL)
            return CONV_ERROR;
        *out = addr;
        return CONV_OK;
    }
    char code = 0;
    if (!is_instance_of(obj, ctypes_pointer) && !is_instance_of(obj, ctypes_cfuncptr)) {
        code = instance_simple_code(obj);
        if (!(code == 'z' || code == 'Z' || (code == 'P' && any_void_p)))
            return CONV_FALLBACK;
    }
    return cdata_pointer_value(obj, out) < 0 ? CONV_ERROR : CONV_OK;
}

/* Is obj an array or pointer instance whose item type is a subclass of `of`? */
static int
is_sequence_of(PyObject *obj, PyObject *of, int exact)
{
    if (!is_instance_of(obj, ctypes_array) && !is_instance_of(obj, ctypes_pointer))
        return 0;
    PyObject *item = PyObject_GetAttrString((PyObject *)Py_TYPE(obj), "_type_");
    if (item == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = exact ? item == of
                   : (PyType_Check(item) && PyType_IsSubtype((PyTypeObject *)item, (PyTypeObject *)of));
    Py_DECREF(item);
    return ok;
}

/* What a custom from_param returned, by ConvParam's rules, for a pointer-sized argument. */
static int
convert_from_param_result(thread_job *job, PyObject *value, void **out)
{
    Py_INCREF(value);
    for (int depth = 0; depth < MAX_AS_PARAMETER_DEPTH; depth++) {
        if (keep_alive(job, value) < 0)
            goto error;
        if (value == Py_None) {
            Py_DECREF(value);
            *out = NULL;
            return CONV_OK;
        }
        if (PyBytes_Check(value)) {
            *out = PyBytes_AS_STRING(value);
            Py_DECREF(value);
            return CONV_OK;
        }
        if (PyLong_Check(value))
            break;    /* ConvParam passes a C int here: leave that to ctypes */
        if (is_instance_of(value, ctypes_array) || is_instance_of(value, ctypes_pointer)
            || is_instance_of(value, ctypes_cfuncptr) || is_instance_of(value, ctypes_simple)) {
            int rc = convert_cdata_pointer(value, 1, out);
            Py_DECREF(value);
            return rc;
        }
        PyObject *inner;
        int found = lookup_attr(value, str_as_parameter, &inner);
        if (found < 0)
            goto error;
        Py_DECREF(value);
        if (found == 0)
            return CONV_FALLBACK;
        value = inner;
    }
    Py_DECREF(value);
    return CONV_FALLBACK;
error:
    Py_DECREF(value);
    return CONV_ERROR;
}

/* A Python int as ctypes masks it into an integer type (it accepts __index__, never float). */
static int
convert_masked_int(PyObject *arg, unsigned long long *out)
{
    if (PyFloat_Check(arg) || !(PyLong_Check(arg) || PyIndex_Check(arg)))
        return CONV_FALLBACK;
    unsigned long long v = PyLong_AsUnsignedLongLongMask(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return CONV_FALLBACK;
    }
    *out = v;
    return CONV_OK;
}

/* Convert one argument into job->values[i] as ctypes would with argtypes[i]; GIL held. Cases
 * ctypes would reject, or handle in ways not reproduced here, return CONV_FALLBACK. */
static int
convert_argument(thread_job *job, const native_slot *slot, PyObject *arg, native_value *v)
{
    if (slot->custom_from_param) {
        PyObject *conv = PyObject_CallMethod(slot->type, "from_param", "O", arg);
        if (conv == NULL) {
            PyErr_Clear();   /* ctypes will raise the same error as ArgumentError */
            return CONV_FALLBACK;
        }
        int rc = convert_from_param_result(job, conv, &v->p);
        Py_DECREF(conv);
        return rc;
    }

    /* An instance of the declared type itself is passed by value (or, for POINTER(T), a T by
     * reference), exactly as its bytes are. */
    if (slot->code != '*' && is_instance_of(arg, slot->type)) {
        Py_ssize_t len;
        void *buf = cdata_address(arg, &len);
        if (buf == NULL)
            return CONV_ERROR;
        if (len > (Py_ssize_t)sizeof(*v) || len != (Py_ssize_t)slot->ffi->size)
            return CONV_FALLBACK;
        memcpy(v, buf, (size_t)len);
        return CONV_OK;
    }
    if (is_instance_of(arg, ctypes_simple) && slot->code != 'P' && slot->code != 'z'
        && slot->code != '*' && slot->code != '?')
        return CONV_FALLBACK;   /* another ctypes type: ctypes raises, or uses _as_parameter_ */

    unsigned long long m;
    switch (slot->code) {
    case 'b': case 'B': case 'h': case 'H': case 'i': case 'I':
    case 'l': case 'L': case 'q': case 'Q':
        if (convert_masked_int(arg, &m) != CONV_OK)
            return CONV_FALLBACK;
        switch (slot->code) {
        case 'b': v->b = (signed char)m; break;
        case 'B': v->B = (unsigned char)m; break;
        case 'h': v->h = (short)m; break;
        case 'H': v->H = (unsigned short)m; break;
        case 'i': v->i = (int)m; break;
        case 'I': v->I = (unsigned int)m; break;
        case 'l': v->l = (long)m; break;
        case 'L': v->L = (unsigned long)m; break;
        case 'q': v->q = (long long)m; break;
        default: v->Q = m; break;
        }
        return CONV_OK;
    case '?': {
        int truth = PyObject_IsTrue(arg);   /* ctypes takes any object's truth */
        if (truth < 0) {
            PyErr_Clear();
            return CONV_FALLBACK;
        }
        v->B = (unsigned char)truth;
        return CONV_OK;
    }
    case 'c':
        if (PyBytes_Check(arg) && PyBytes_GET_SIZE(arg) == 1) {
            v->b = PyBytes_AS_STRING(arg)[0];
            return CONV_OK;
        }
        if (PyLong_Check(arg)) {
            long c = PyLong_AsLong(arg);
            if (c == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                return CONV_FALLBACK;
            }
            if (c < 0 || c > 255)
                return CONV_FALLBACK;
            v->b = (signed char)c;
            return CONV_OK;
        }
        return CONV_FALLBACK;
    case 'f': case 'd': case 'g': {
        double d = PyFloat_AsDouble(arg);   /* as ctypes: __float__, else __index__ */
        if (d == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return CONV_FALLBACK;
        }
        if (slot->code == 'f')
            v->f = (float)d;
        else if (slot->code == 'd')
            v->d = d;
        else
            v->g = (long double)d;
        return CONV_OK;
    }
    case 'P':
        if (arg == Py_None) {
            v->p = NULL;
            return CONV_OK;
        }
        if (PyLong_Check(arg)) {
            /* ctypes masks an int into a pointer (2**64 + 1 is 1, -1 is all ones). */
            unsigned long long m = PyLong_AsUnsignedLongLongMask(arg);
            if (m == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                return CONV_FALLBACK;
            }
            v->p = (void *)(uintptr_t)m;
            return CONV_OK;
        }
        if (PyBytes_Check(arg)) {
            v->p = PyBytes_AS_STRING(arg);   /* the job's args tuple keeps the bytes alive */
            return CONV_OK;
        }
        return convert_cdata_pointer(arg, 0, &v->p);
    case 'z':
        if (arg == Py_None) {
            v->p = NULL;
            return CONV_OK;
        }
        if (PyBytes_Check(arg)) {
            v->p = PyBytes_AS_STRING(arg);
            return CONV_OK;
        }
        if (is_sequence_of(arg, ctypes_c_char, 1) || is_instance_of(arg, ctypes_c_char_p))
            return convert_cdata_pointer(arg, 0, &v->p);
        return CONV_FALLBACK;
    case '*':
        if (arg == Py_None) {
            v->p = NULL;
            return CONV_OK;
        }
        if (is_instance_of(arg, slot->pointee)) {
            v->p = cdata_address(arg, NULL);   /* passed by reference, as ctypes does */
            return v->p == NULL ? CONV_ERROR : CONV_OK;
        }
        if (is_sequence_of(arg, slot->pointee, 0))
            return convert_cdata_pointer(arg, 0, &v->p);
        return CONV_FALLBACK;
    default:
        return CONV_FALLBACK;
    }
}

/* If fn is a ctypes function pointer whose signature and arguments libffi can take without
 * ctypes, prepare job for a GIL-free call. 0 either way (job->site stays NULL for a Python call),
 * -1 with an exception on a real error. */
static int
prepare_native_call(thread_job *job, PyObject *fn, PyObject *args, PyObject *kwargs)
{
    if (!is_instance_of(fn, ctypes_cfuncptr) || (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0))
        return 0;
    int rc = -1;
    PyObject *argtypes = NULL, *restype = NULL, *errcheck = NULL, *flags = NULL, *seq = NULL;

    if (lookup_attr(fn, str_errcheck, &errcheck) < 0 || lookup_attr(fn, str_argtypes, &argtypes) < 0
        || lookup_attr(fn, str_restype, &restype) < 0
        || lookup_attr((PyObject *)Py_TYPE(fn), str_flags, &flags) < 0)
        goto done;
    rc = 0;
    if ((errcheck != NULL && errcheck != Py_None) || argtypes == NULL || argtypes == Py_None
        || restype == NULL || flags == NULL || !PyLong_Check(flags))
        goto done;
    long f = PyLong_AsLong(flags);
    if (f == -1 && PyErr_Occurred()) {
        rc = -1;
        goto done;
    }
    if (f & (CTYPES_FUNCFLAG_PYTHONAPI | CTYPES_FUNCFLAG_USE_ERRNO | CTYPES_FUNCFLAG_USE_LASTERROR))
        goto done;
    seq = PySequence_Fast(argtypes, "argtypes must be a sequence");
    if (seq == NULL) {
        PyErr_Clear();
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(seq) != PyTuple_GET_SIZE(args))
        goto done;   /* too few: ctypes raises; too many: variadic, converted by ctypes */

    void *fnaddr;
    if (cdata_pointer_value(fn, &fnaddr) < 0 || fnaddr == NULL) {
        PyErr_Clear();
        goto done;
    }
    rc = -1;
    native_site *site = site_lookup(fnaddr, restype, seq);
    if (site == NULL)
        goto done;
    rc = 0;
    if (!site->fast)
        goto done;

    Py_ssize_t n = site->nargs;
    for (Py_ssize_t i = 0; i < n; i++) {
        int conv = convert_argument(job, &site->args[i], PyTuple_GET_ITEM(args, i), &job->values[i]);
        if (conv == CONV_ERROR) {
            rc = -1;
            goto done;
        }
        if (conv == CONV_FALLBACK) {
            Py_CLEAR(job->keepalive);
            goto done;
        }
        job->avalues[i] = &job->values[i];
    }
    job->site = site;
    job->fnaddr = fnaddr;

done:
    Py_XDECREF(argtypes);
    Py_XDECREF(restype);
    Py_XDECREF(errcheck);
    Py_XDECREF(flags);
    Py_XDECREF(seq);
    return rc;
}

/* The Python value of a native call's result, as ctypes returns it; new reference. */
static PyObject *
native_result(const native_slot *slot, const native_value *r)
{
    switch (slot->code) {
    case 'v': Py_RETURN_NONE;
    case 'b': return PyLong_FromLong((signed char)r->s);
    case 'B': return PyLong_FromLong((unsigned char)r->u);
    case 'h': return PyLong_FromLong((short)r->s);
    case 'H': return PyLong_FromLong((unsigned short)r->u);
    case 'i': return PyLong_FromLong((int)r->s);
    case 'I': return PyLong_FromUnsignedLong((unsigned int)r->u);
    case 'l': return PyLong_FromLong(r->l);
    case 'L': return PyLong_FromUnsignedLong(r->L);
    case 'q': return PyLong_FromLongLong(r->q);
    case 'Q': return PyLong_FromUnsignedLongLong(r->Q);
    case '?': return PyBool_FromLong((unsigned char)r->u != 0);
    case 'c': {
        char c = (char)r->s;
        return PyBytes_FromStringAndSize(&c, 1);
    }
    case 'f': return PyFloat_FromDouble(r->f);
    case 'd': return PyFloat_FromDouble(r->d);
    case 'g': return PyFloat_FromDouble((double)r->g);
    case 'P':
        if (r->p == NULL)
            Py_RETURN_NONE;
        return PyLong_FromVoidPtr(r->p);
    case 'z':
        if (r->p == NULL)
            Py_RETURN_NONE;
        return PyBytes_FromString((const char *)r->p);
    case '*': {
        PyObject *ptr = PyObject_CallNoArgs(slot->type);
        if (ptr == NULL)
            return NULL;
        Py_buffer view;
        if (PyObject_GetBuffer(ptr, &view, PyBUF_WRITABLE) < 0) {
            Py_DECREF(ptr);
            return NULL;
        }
        memcpy(view.buf, &r->p, sizeof(void *));
        PyBuffer_Release(&view);
        return ptr;
    }
    default:
        PyErr_Format(PyExc_SystemError, "pydron threads: no conversion for restype code %c", slot->code);
        return NULL;
    }
}

/* ---------------------------------------------------------------- jobs and workers */

static thread_job *
job_new(uint64_t task_id, Py_ssize_t nargs)
{
    size_t size = sizeof(thread_job) + (size_t)nargs * (sizeof(native_value) + sizeof(void *));
    thread_job *job = PyMem_RawCalloc(1, size);
    if (job == NULL)
        return NULL;
    job->task_id = task_id;
    job->values = (native_value *)(job + 1);
    job->avalues = (void **)(job->values + nargs);
    return job;
}

/* Drop everything a job holds; GIL held. */
static void
job_free(thread_job *job)
{
    Py_XDECREF(job->fn);
    Py_XDECREF(job->args);
    Py_XDECREF(job->kwargs);
    Py_XDECREF(job->keepalive);
    Py_XDECREF(job->object);
    PyMem_RawFree(job);
}

static void
job_free_list(thread_job *job)
{
    while (job != NULL) {
        thread_job *next = job->next;
        job_free(job);
        job = next;
    }
}

static void
run_python_call(thread_job *job)
{
    PyGILState_STATE g = PyGILState_Ensure();
    job->object = PyObject_Call(job->fn, job->args, job->kwargs);
    if (job->object == NULL) {
        job->failed = 1;
        job->object = fetch_exception();
        if (job->object == NULL) {
            job->object = PyObject_CallFunction(PyExc_SystemError, "s",
                                                "pydron threads: call failed without an exception");
        }
    }
    /* Dropped here, with the GIL at hand, so the master's drain does less. */
    Py_CLEAR(job->fn);
    Py_CLEAR(job->args);
    Py_CLEAR(job->kwargs);
    PyGILState_Release(g);
}

static void *
worker_main(void *unused)
{
    /* A thread state of our own for the worker's whole life, so each Python call only swaps the
     * GIL (threading.local values persist between a worker's tasks). */
    in_pool_thread = 1;
    PyGILState_STATE outer = PyGILState_Ensure();
    PyThreadState *ts = PyEval_SaveThread();

    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.queue_head == NULL && !pool.stopping) {
            pool.idle++;
            pthread_cond_wait(&pool.work_cv, &pool.mu);
            pool.idle--;
        }
        if (pool.stopping)
            break;
        thread_job *job = pool.queue_head;
        pool.queue_head = job->next;
        if (pool.queue_head == NULL)
            pool.queue_tail = NULL;
        pool.queued--;
        job->next = NULL;
        pthread_mutex_unlock(&pool.mu);

        if (job->site != NULL)
            ffi_call(&job->site->cif, FFI_FN(job->fnaddr), &job->ret, job->avalues);
        else
            run_python_call(job);

        pthread_mutex_lock(&pool.mu);
        /* The master takes the whole list at once, so only the first completion after a drain
         * needs to wake anyone: later ones are picked up with it. */
        int first = pool.done_head == NULL;
        if (pool.done_tail != NULL)
            pool.done_tail->next = job;
        else
            pool.done_head = job;
        pool.done_tail = job;
        if (first) {
            pthread_cond_broadcast(&pool.done_cv);
            pthread_mutex_unlock(&pool.mu);
            exec__notify_master();
            pthread_mutex_lock(&pool.mu);
        }
    }
    pthread_mutex_unlock(&pool.mu);

    PyEval_RestoreThread(ts);
    PyGILState_Release(outer);
    return NULL;
}

/* ---------------------------------------------------------------- fork and sizing */

static void
atfork_prepare(void)
{
    pthread_mutex_lock(&pool.mu);
}

static void
atfork_parent(void)
{
    pthread_mutex_unlock(&pool.mu);
}

/* The child has none of the parent's threads: forget them and their jobs (leaked, never run or
 * reported here: the task ids belong to the parent). */
static void
atfork_child(void)
{
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work_cv, NULL);
    pthread_cond_init(&pool.done_cv, NULL);
    pool.queue_head = pool.queue_tail = NULL;
    pool.done_head = pool.done_tail = NULL;
    pool.queued = 0;
    pool.threads = NULL;
    pool.nthreads = pool.idle = pool.stopping = 0;
    pool.outstanding = 0;
    pool.pid = getpid();
}

static void
register_atfork(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Also catches a fork that bypassed pthread_atfork (a raw clone); a system call, so only on the
 * cold paths (cancel, shutdown, stats): submit and drain rely on the atfork handler. */
static void
check_forked(void)
{
    if (pool.pid != 0 && pool.pid != getpid())
        atfork_child();
}

static int
default_pool_size(void)
{
    if (pydron_opt_thread_workers > 0 && pydron_opt_thread_workers <= 1024)
        return pydron_opt_thread_workers;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores > 0 ? (int)cores : 1;
}

/* Start another worker if queued work outnumbers idle workers; called with pool.mu held.
 * 0, or -1 (errno-style code in *err) if no worker could be started and none exists. */
static int
maybe_spawn_worker(int *err)
{
    if (pool.max_threads == 0)
        pool.max_threads = default_pool_size();
    if (pool.threads == NULL) {
        pool.threads = calloc((size_t)pool.max_threads, sizeof(pthread_t));
        if (pool.threads == NULL) {
            *err = ENOMEM;
            return -1;
        }
    }
    if (pool.queued <= pool.idle || pool.nthreads >= pool.max_threads)
        return 0;
    /* Workers take no signals: they belong to the main thread (and the master's poll). */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&pool.threads[pool.nthreads], NULL, worker_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        *err = rc;
        return pool.nthreads > 0 ? 0 : -1;
    }
    pool.nthreads++;
    return 0;
}

/* ---------------------------------------------------------------- public entry points */

int
exec_submit_thread(uint64_t task_id, PyObject *fn, PyObject *args, PyObject *kwargs)
{
    if (!PyTuple_Check(args)) {
        PyErr_SetString(PyExc_TypeError, "exec_submit_thread: args must be a tuple");
        return -1;
    }
    if (kwargs != NULL && !PyDict_Check(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "exec_submit_thread: kwargs must be a dict");
        return -1;
    }
    if (pool.closed) {
        PyErr_SetString(PyExc_RuntimeError,
                        "pydron: cannot run thread tasks after interpreter shutdown began");
        return -1;
    }
    if (load_ctypes() < 0)
        return -1;
    pthread_once(&atfork_once, register_atfork);

    thread_job *job = job_new(task_id, PyTuple_GET_SIZE(args));
    if (job == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (prepare_native_call(job, fn, args, kwargs) < 0) {
        job_free(job);
        return -1;
    }
    job->generation = pool.generation;
    job->fn = Py_NewRef(fn);
    job->args = Py_NewRef(args);
    job->kwargs = (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) ? Py_NewRef(kwargs) : NULL;

    int err = 0;
    pthread_mutex_lock(&pool.mu);
    if (pool.stopping) {
        /* Another thread is joining the pool (it released the GIL to do so). */
        pthread_mutex_unlock(&pool.mu);
        job_free(job);
        PyErr_SetString(PyExc_RuntimeError, "pydron: the thread pool is shutting down");
        return -1;
    }
    if (pool.pid == 0)
        pool.pid = getpid();
    if (pool.queue_tail != NULL)
        pool.queue_tail->next = job;
    else
        pool.queue_head = job;
    pool.queue_tail = job;
    pool.queued++;
    int rc = maybe_spawn_worker(&err);
    if (rc < 0) {
        /* Nothing will ever run it: take it back out (it is the tail, and no worker exists). */
        thread_job **p = &pool.queue_head;
        while (*p != job)
            p = &(*p)->next;
        *p = NULL;
        pool.queue_tail = NULL;
        for (thread_job *j = pool.queue_head; j != NULL; j = j->next)
            pool.queue_tail = j;
        pool.queued--;
    }
    else if (pool.idle > 0) {
        pthread_cond_signal(&pool.work_cv);   /* busy workers look at the queue before waiting */
    }
    pthread_mutex_unlock(&pool.mu);
    if (rc < 0) {
        job_free(job);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pool.outstanding++;
    if (job->site != NULL)
        pool.ffi_calls++;
    else
        pool.python_calls++;
    return 0;
}

/* Turn a finished job into an exec_result (ownership of the object moves to r); GIL held. */
static void
job_result(thread_job *job, exec_result *r)
{
    r->task_id = job->task_id;
    r->blob = NULL;
    if (job->site == NULL) {
        r->failed = job->failed;
        r->object = job->object;
        job->object = NULL;
        return;
    }
    r->object = native_result(&job->site->result, &job->ret);
    r->failed = 0;
    if (r->object == NULL) {
        r->failed = 1;
        r->object = fetch_exception();
    }
}

int
exec__threads_drain(exec_result_fn on_result, void *ctx)
{
    pthread_mutex_lock(&pool.mu);
    thread_job *list = pool.done_head;
    pool.done_head = pool.done_tail = NULL;
    pthread_mutex_unlock(&pool.mu);

    int handed = 0;
    pool.draining++;
    while (list != NULL) {
        thread_job *job = list;
        list = job->next;
        if (job->generation != pool.generation) {
            job_free(job);   /* cancelled while it ran: never reported */
            continue;
        }
        exec_result r;
        job_result(job, &r);
        job_free(job);
        pool.outstanding--;
        if (on_result(ctx, &r) < 0) {
            if (list != NULL) {
                /* Keep the rest for the next drain, ahead of anything finished since. */
                thread_job *last = list;
                while (last->next != NULL)
                    last = last->next;
                pthread_mutex_lock(&pool.mu);
                last->next = pool.done_head;
                pool.done_head = list;
                if (pool.done_tail == NULL)
                    pool.done_tail = last;
                pthread_mutex_unlock(&pool.mu);
            }
            pool.draining--;
            return -1;
        }
        handed++;
    }
    pool.draining--;
    return handed;
}

Py_ssize_t
exec__threads_outstanding(void)
{
    return pool.outstanding;
}

/* Forget every queued and running task (Ctrl-C): queued ones are dropped now, running ones run
 * to the end (a thread cannot be stopped safely) and are dropped when they finish. GIL held. */
void
exec__threads_cancel_all(void)
{
    check_forked();
    pthread_mutex_lock(&pool.mu);
    thread_job *queued = pool.queue_head, *done = pool.done_head;
    pool.queue_head = pool.queue_tail = pool.done_head = pool.done_tail = NULL;
    pool.queued = 0;
    pool.generation++;
    pthread_mutex_unlock(&pool.mu);
    pool.outstanding = 0;
    job_free_list(queued);
    job_free_list(done);
}

void
exec__threads_shutdown(void)
{
    if (in_pool_thread)
        return;   /* a task cannot wait for its own thread; the master's shutdown will */
    check_forked();
    pthread_mutex_lock(&pool.mu);
    if (pool.stopping) {
        /* Another thread is joining (it released the GIL to do so): it finishes the job. */
        pthread_mutex_unlock(&pool.mu);
        return;
    }
    pool.stopping = 1;
    pthread_cond_broadcast(&pool.work_cv);
    pthread_t *threads = pool.threads;
    int n = pool.nthreads;
    pthread_mutex_unlock(&pool.mu);

    /* A worker may be waiting for the GIL to finish its Python call. */
    int have_gil = Py_IsInitialized() && PyGILState_Check();
    PyThreadState *ts = (have_gil && n > 0) ? PyEval_SaveThread() : NULL;
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    if (ts != NULL)
        PyEval_RestoreThread(ts);

    pthread_mutex_lock(&pool.mu);
    thread_job *queued = pool.queue_head, *done = pool.done_head;
    pool.queue_head = pool.queue_tail = pool.done_head = pool.done_tail = NULL;
    pool.queued = 0;
    pool.generation++;   /* a drain in progress below us drops what it still holds */
    pool.threads = NULL;
    pool.nthreads = pool.idle = pool.stopping = 0;
    pool.max_threads = 0;
    pthread_mutex_unlock(&pool.mu);
    free(threads);

    if (!have_gil)
        return;    /* no safe way to drop Python references: leave them */
    pool.outstanding = 0;
    job_free_list(queued);
    job_free_list(done);
    if (pool.draining)
        return;   /* a drain below us still reads its jobs' sites: the next shutdown frees them */
    for (int b = 0; b < SITE_BUCKETS; b++) {
        native_site *s = pool.sites[b];
        pool.sites[b] = NULL;
        while (s != NULL) {
            native_site *next = s->next;
            site_free(s);
            s = next;
        }
    }
    pool.nsites = 0;
}

/* ---------------------------------------------------------------- private test helpers */

typedef struct {
    uint64_t base;
    Py_ssize_t n, received;
    PyObject *results;      /* list */
    char *failed;
} map_state;

static int
map_on_result(void *ctx, exec_result *r)
{
    map_state *st = ctx;
    if (r->blob != NULL)
        exec_blob_decref(r->blob);
    if (r->task_id < st->base || r->task_id >= st->base + (uint64_t)st->n) {
        Py_XDECREF(r->object);   /* not ours (a task of an earlier, interrupted map) */
        return 0;
    }
    Py_ssize_t i = (Py_ssize_t)(r->task_id - st->base);
    PyObject *obj = r->object != NULL ? r->object : Py_NewRef(Py_None);
    PyList_SetItem(st->results, i, obj);   /* steals obj */
    st->failed[i] = (char)r->failed;
    st->received++;
    return 0;
}

/* Sleep with the GIL released until a job finishes, at most 50 ms (signals are then checked). */
static void
wait_for_completion(void)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&pool.mu);
    if (pool.done_head == NULL) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_nsec += 50 * 1000 * 1000;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&pool.done_cv, &pool.mu, &deadline);
    }
    pthread_mutex_unlock(&pool.mu);
    Py_END_ALLOW_THREADS
}

/* _threads_map(fn, arglist, kwargs=None, return_exceptions=False): submit fn(*args, **kwargs)
 * for every args in arglist (a tuple, or one non-tuple argument), then wait for all of them.
 * Results in order; a failure raises the first failed task's exception, or with
 * return_exceptions is returned in its place. Swallows other thread tasks' results: for tests. */
static PyObject *
threads_map(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fn", "arglist", "kwargs", "return_exceptions", NULL};
    PyObject *fn, *arglist, *kwargs = Py_None;
    int return_exceptions = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Op:_threads_map", kwlist, &fn, &arglist,
                                     &kwargs, &return_exceptions))
        return NULL;
    if (kwargs == Py_None)
        kwargs = NULL;
    else if (!PyDict_Check(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "kwargs must be a dict or None");
        return NULL;
    }

    PyObject *result = NULL;
    map_state st = {0};
    PyObject *items = PySequence_Fast(arglist, "arglist must be a sequence");
    if (items == NULL)
        return NULL;
    st.n = PySequence_Fast_GET_SIZE(items);
    st.results = PyList_New(st.n);
    st.failed = PyMem_Calloc((size_t)st.n + 1, 1);
    if (st.results == NULL || st.failed == NULL) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < st.n; i++)
        PyList_SET_ITEM(st.results, i, Py_NewRef(Py_None));
    st.base = (UINT64_C(1) << 62) + pool.helper_ids;
    pool.helper_ids += (uint64_t)st.n;

    Py_ssize_t submitted = 0;
    PyObject *submit_error = NULL;
    for (; submitted < st.n; submitted++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, submitted);
        PyObject *call_args = PyTuple_Check(item) ? Py_NewRef(item) : PyTuple_Pack(1, item);
        int rc = call_args == NULL ? -1
                                   : exec_submit_thread(st.base + (uint64_t)submitted, fn,
                                                        call_args, kwargs);
        Py_XDECREF(call_args);
        if (rc < 0) {
            submit_error = fetch_exception();
            break;
        }
    }
    st.n = submitted;   /* wait for what went out, even after a submit error */
    while (st.received < st.n) {
        if (exec__threads_drain(map_on_result, &st) < 0)
            goto done;
        if (st.received < st.n) {
            wait_for_completion();
            if (PyErr_CheckSignals() < 0)
                goto done;
        }
    }
    if (submit_error != NULL) {
        restore_exception(submit_error);
        Py_DECREF(submit_error);
        goto done;
    }
    if (!return_exceptions) {
        for (Py_ssize_t i = 0; i < st.n; i++) {
            if (st.failed[i]) {
                restore_exception(PyList_GET_ITEM(st.results, i));
                goto done;
            }
        }
    }
    result = Py_NewRef(st.results);

done:
    Py_XDECREF(st.results);
    PyMem_Free(st.failed);
    Py_DECREF(items);
    return result;
}

/* _threads_submit(task_id, fn, args=(), kwargs=None): exec_submit_thread, for tests. */
static PyObject *
threads_submit(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"task_id", "fn", "args", "kwargs", NULL};
    unsigned long long task_id;
    PyObject *fn, *call_args = NULL, *kwargs = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KO|O!O:_threads_submit", kwlist, &task_id, &fn,
                                     &PyTuple_Type, &call_args, &kwargs))
        return NULL;
    if (kwargs != Py_None && !PyDict_Check(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "kwargs must be a dict or None");
        return NULL;
    }
    PyObject *empty = NULL;
    if (call_args == NULL) {
        empty = PyTuple_New(0);
        if (empty == NULL)
            return NULL;
        call_args = empty;
    }
    int rc = exec_submit_thread(task_id, fn, call_args, kwargs == Py_None ? NULL : kwargs);
    Py_XDECREF(empty);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

typedef struct {
    PyObject *list;       /* results collected */
    PyObject *callback;   /* or handed to callback(task_id, failed, object), borrowed */
} drain_ctx;

static int
drain_to_python(void *ctx, exec_result *r)
{
    drain_ctx *d = ctx;
    PyObject *obj = r->object != NULL ? r->object : Py_NewRef(Py_None);
    if (r->blob != NULL)
        exec_blob_decref(r->blob);
    PyObject *item = Py_BuildValue("(KON)", (unsigned long long)r->task_id,
                                   r->failed ? Py_True : Py_False, obj);
    if (item == NULL)
        return -1;
    int rc;
    if (d->callback != NULL) {
        PyObject *res = PyObject_Call(d->callback, item, NULL);
        rc = res == NULL ? -1 : 0;
        Py_XDECREF(res);
    }
    else {
        rc = PyList_Append(d->list, item);
    }
    Py_DECREF(item);
    return rc;
}

/* _threads_drain(callback=None) -> [(task_id, failed, result or exception)]: one
 * exec__threads_drain, no wait. With callback, each result goes to callback(task_id, failed,
 * object) from inside the drain instead (as exec_poll's on_result, which may re-enter). */
static PyObject *
threads_drain(PyObject *self, PyObject *args)
{
    drain_ctx d = {NULL, NULL};
    if (!PyArg_ParseTuple(args, "|O:_threads_drain", &d.callback))
        return NULL;
    if (d.callback == Py_None)
        d.callback = NULL;
    d.list = PyList_New(0);
    if (d.list == NULL)
        return NULL;
    if (exec__threads_drain(drain_to_python, &d) < 0) {
        Py_DECREF(d.list);
        return NULL;
    }
    return d.list;
}

static PyObject *
threads_cancel_all(PyObject *self, PyObject *unused)
{
    exec__threads_cancel_all();
    Py_RETURN_NONE;
}

static PyObject *
threads_stats(PyObject *self, PyObject *unused)
{
    check_forked();
    pthread_mutex_lock(&pool.mu);
    int nthreads = pool.nthreads, max_threads = pool.max_threads, idle = pool.idle;
    Py_ssize_t queued = pool.queued, finished = 0;
    for (thread_job *j = pool.done_head; j != NULL; j = j->next)
        finished++;
    pthread_mutex_unlock(&pool.mu);
    return Py_BuildValue("{s:i,s:i,s:i,s:n,s:n,s:n,s:K,s:K,s:n}", "threads", nthreads,
                         "max_threads", max_threads == 0 ? default_pool_size() : max_threads,
                         "idle", idle, "queued", queued, "finished", finished,
                         "outstanding", pool.outstanding,
                         "ffi_calls", (unsigned long long)pool.ffi_calls,
                         "python_calls", (unsigned long long)pool.python_calls,
                         "cif_cache", pool.nsites);
}

static PyObject *
threads_shutdown(PyObject *self, PyObject *unused)
{
    exec__threads_shutdown();
    Py_RETURN_NONE;
}

/* Registered with atexit: join the workers while the interpreter is whole, and refuse work from
 * then on (a daemon thread may still submit; its task would start during finalization). */
static PyObject *
threads_atexit(PyObject *self, PyObject *unused)
{
    pool.closed = 1;
    exec__threads_shutdown();
    Py_RETURN_NONE;
}

static PyObject *
threads_ffi_version(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(exec_ffi_version());
}

static PyMethodDef threads_methods[] = {
    {"_threads_map", (PyCFunction)(void (*)(void))threads_map, METH_VARARGS | METH_KEYWORDS,
     "_threads_map(fn, arglist, kwargs=None, return_exceptions=False) -> list (tests only)"},
    {"_threads_submit", (PyCFunction)(void (*)(void))threads_submit, METH_VARARGS | METH_KEYWORDS,
     "_threads_submit(task_id, fn, args=(), kwargs=None) (tests only)"},
    {"_threads_drain", threads_drain, METH_VARARGS,
     "_threads_drain(callback=None) -> [(task_id, failed, object)] (tests only)"},
    {"_threads_cancel_all", threads_cancel_all, METH_NOARGS, "Forget queued and running tasks."},
    {"_threads_stats", threads_stats, METH_NOARGS, "Thread pool counters (tests only)."},
    {"_threads_shutdown", threads_shutdown, METH_NOARGS, "Join the pool's threads."},
    {"_threads_ffi_version", threads_ffi_version, METH_NOARGS, "libffi version string."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef threads_atexit_def = {
    "_threads_atexit", threads_atexit, METH_NOARGS, "Join the pool and close it for good."};

int
exec__threads_module_init(PyObject *m)
{
    if (PyModule_AddFunctions(m, threads_methods) < 0)
        return -1;
    /* Join the workers before the interpreter goes away (exec_shutdown may do it first). */
    PyObject *shutdown = PyCFunction_New(&threads_atexit_def, NULL);
    if (shutdown == NULL)
        return -1;
    PyObject *atexit = PyImport_ImportModule("atexit");
    PyObject *r = atexit == NULL ? NULL : PyObject_CallMethod(atexit, "register", "O", shutdown);
    Py_XDECREF(atexit);
    Py_DECREF(shutdown);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}
