/* exec/ffi.h — shared by exec/ffi.c (ctypes signatures and argument conversion for libffi) and
 * exec/threads.c (the thread pool that runs the calls): a thread job and how its call is made.
 * Internal to exec/. */
#ifndef PYDRON_EXEC_FFI_H
#define PYDRON_EXEC_FFI_H

#include "exec/internal.h"

#include <ffi.h>

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
 * Sites are created with the GIL held and live until exec__ffi_clear_sites, so a queued call may
 * point at its site without a reference count. */
struct native_site {
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
};

/* One submitted call, from the queue through a pool thread to the completion list. */
struct thread_job {
    struct thread_job *next, *prev;  /* prev: only while running (the running list is doubly linked) */
    uint64_t task_id;
    int cancelled;                  /* dropped when it finishes (under the pool's mutex) */
    uint64_t timeout_ns;            /* 0: none */
    uint64_t started_ns;            /* when a pool thread took it (under the pool's mutex) */
    PyObject *fn, *args, *kwargs;   /* owned (kwargs may be NULL); dropped by the thread */
    native_site *site;              /* NULL: a Python call */
    void *fnaddr;
    PyObject *keepalive;            /* owned list or NULL: converted arguments C memory points into */
    native_value ret;
    void **avalues;                 /* nargs pointers into values */
    native_value *values;
    int failed;
    PyObject *object;               /* Python call: owned result or exception instance */
};

#endif
