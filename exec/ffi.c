/* exec/ffi.c — native functional calls: a ctypes function pointer with a declared signature of
 * plain C types is called through libffi with the GIL released. Its signature is classified once
 * per address and argument types (a cached cif), its arguments are converted exactly as ctypes'
 * ConvParam would convert them (anything not reproduced here falls back to calling through
 * ctypes in Python), and its result is turned back into the object ctypes returns.
 * Thread and GIL model: everything with the GIL held, except exec__ffi_call (GIL released). */
#include "exec/ffi.h"

#include <string.h>

#ifndef PYDRON_FFI_VERSION
#define PYDRON_FFI_VERSION "unknown"
#endif

/* ctypes _FuncPtr._flags_ bits that make a call need the GIL or ctypes' own bookkeeping. */
#define CTYPES_FUNCFLAG_PYTHONAPI 0x4
#define CTYPES_FUNCFLAG_USE_ERRNO 0x8
#define CTYPES_FUNCFLAG_USE_LASTERROR 0x10

#define SITE_BUCKETS 256
#define MAX_AS_PARAMETER_DEPTH 8

/* ctypes' base classes, looked up once (new references kept for the life of the process). */
static PyObject *ctypes_cfuncptr, *ctypes_simple, *ctypes_pointer, *ctypes_array, *ctypes_c_char;
static PyObject *ctypes_c_char_p, *ctypes_c_char_p_from_param;
/* Attribute names looked up on every ctypes call, interned once. */
static PyObject *str_errcheck, *str_argtypes, *str_restype, *str_flags, *str_as_parameter;

/* The signature cache: GIL held. */
static struct {
    native_site *buckets[SITE_BUCKETS];
    Py_ssize_t count;
} sites;

const char *
exec_ffi_version(void)
{
    return PYDRON_FFI_VERSION;
}

/* ---------------------------------------------------------------- small Python helpers */

int
exec__ffi_load_ctypes(void)
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

/* The start of a ctypes instance's memory (its buffer); NULL + exception if it has none.
 * Borrows obj; the pointer stays valid while obj lives. */
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

/* The pointer a pointer-like ctypes instance holds (first word of its memory). Borrows obj. */
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

/* Borrows both. */
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
 * 1: supported, 0: not supported (call through ctypes instead), -1 with an exception.
 * Borrows type; slot->pointee becomes a new reference owned by the slot. */
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

/* Borrows everything. */
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
    for (native_site *s = sites.buckets[bucket]; s != NULL; s = s->next)
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
    site->next = sites.buckets[bucket];
    sites.buckets[bucket] = site;
    sites.count++;
    return site;

error:
    site_free(site);
    return NULL;
}

/* ---------------------------------------------------------------- argument conversion */

/* Conversion outcomes: the value is in *out; ctypes must do it (fall back); a real error. */
enum { CONV_FALLBACK = 0, CONV_OK = 1, CONV_ERROR = -1 };

/* Borrows obj; the job takes a new reference to it. */
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

/* The simple type code of a ctypes instance's class, or 0. Borrows obj. */
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
 * its own instances, which the caller has already handled).
 * Borrows obj. */
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

/* Is obj an array or pointer instance whose item type is a subclass of `of`? Borrows both. */
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

/* What a custom from_param returned, by ConvParam's rules, for a pointer-sized argument.
 * Borrows value; what the pointer points into is kept alive by the job. */
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
        int found = compat_lookup_attr(value, str_as_parameter, &inner);
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

/* A Python int as ctypes masks it into an integer type (it accepts __index__, never float).
 * Borrows arg. */
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
 * ctypes would reject, or handle in ways not reproduced here, return CONV_FALLBACK.
 * Borrows arg; memory the value points into is kept alive by the job. */
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
int
exec__ffi_prepare(thread_job *job, PyObject *fn, PyObject *args, PyObject *kwargs)
{
    if (exec__ffi_load_ctypes() < 0)
        return -1;
    if (!is_instance_of(fn, ctypes_cfuncptr) || (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0))
        return 0;
    int rc = -1;
    PyObject *argtypes = NULL, *restype = NULL, *errcheck = NULL, *flags = NULL, *seq = NULL;

    if (compat_lookup_attr(fn, str_errcheck, &errcheck) < 0 || compat_lookup_attr(fn, str_argtypes, &argtypes) < 0
        || compat_lookup_attr(fn, str_restype, &restype) < 0
        || compat_lookup_attr((PyObject *)Py_TYPE(fn), str_flags, &flags) < 0)
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
result_object(const native_slot *slot, const native_value *r)
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


PyObject *
exec__ffi_result(thread_job *job)
{
    return result_object(&job->site->result, &job->ret);
}

void
exec__ffi_call(thread_job *job)
{
    ffi_call(&job->site->cif, FFI_FN(job->fnaddr), &job->ret, job->avalues);
}

void
exec__ffi_clear_sites(void)
{
    for (int b = 0; b < SITE_BUCKETS; b++) {
        native_site *s = sites.buckets[b];
        sites.buckets[b] = NULL;
        while (s != NULL) {
            native_site *next = s->next;
            site_free(s);
            s = next;
        }
    }
    sites.count = 0;
}

PyObject *
exec__ffi_stats(void)
{
    return PyLong_FromSsize_t(sites.count);
}
