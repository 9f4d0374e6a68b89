/* pydron_compat.h — the one place where CPython 3.11, 3.12 and 3.13 differ for pydron's C code
 * outside the frame hook (whose version-specific frame handling lives in trace/hook.c). */
#ifndef PYDRON_COMPAT_H
#define PYDRON_COMPAT_H

#include <Python.h>

#if PY_VERSION_HEX < 0x030C0000
static inline PyObject *
PyErr_GetRaisedException(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL)
        return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

static inline void
PyErr_SetRaisedException(PyObject *exc)
{
    if (exc == NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *tb = PyException_GetTraceback(exc);
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, tb);
}
#endif

/* An attribute that may be missing: 1 and a new reference, 0 if absent, -1 + exception. */
static inline int
compat_lookup_attr(PyObject *obj, PyObject *name, PyObject **result)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, result);
#else
    return _PyObject_LookupAttr(obj, name, result);
#endif
}

/* Member descriptors (slots): PyMemberDef and its type codes moved out of structmember.h in 3.12. */
#if PY_VERSION_HEX >= 0x030C0000
#define COMPAT_T_OBJECT_EX Py_T_OBJECT_EX
#define COMPAT_READONLY Py_READONLY
#else
#include <structmember.h>
#define COMPAT_T_OBJECT_EX T_OBJECT_EX
#define COMPAT_READONLY READONLY
#endif

/* Per-code extra slots: underscore names on 3.11, PyUnstable_ names from 3.12. */
#if PY_VERSION_HEX >= 0x030C0000
#define compat_code_get_extra PyUnstable_Code_GetExtra
#define compat_code_set_extra PyUnstable_Code_SetExtra
#define compat_request_code_extra_index PyUnstable_Eval_RequestCodeExtraIndex
#else
#define compat_code_get_extra _PyCode_GetExtra
#define compat_code_set_extra _PyCode_SetExtra
#define compat_request_code_extra_index _PyEval_RequestCodeExtraIndex
#endif

#endif
