/* exec/np_arena.c — large numpy arrays are allocated in the shared arena (numpy's
 * PyDataMem_Handler, NumPy >= 1.22), in the workers and in the master: a worker's result array is
 * sent by reference, and so is a master's array passed to a task (guard.c keeps it as it was at
 * the call). Temporaries reuse warm arena pages instead of fresh mmaps. Small arrays and a full
 * arena (logged once) fall back to malloc. pydron.enable(arena_arrays=False) (config `arena_arrays`) turns it off.
 * Thread and GIL model: numpy calls the allocator from any thread, with or without the GIL; the
 * arena and the held table are safe for that (atomics and a process-shared lock). */
#include "exec/internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator;

typedef struct {
    char name[127];
    uint8_t version;
    np_allocator allocator;
} np_handler;

#define ARRAY_IN_ARENA_MIN ((size_t)256 << 10)
#define NP_API_SET_HANDLER 304          /* PyDataMem_SetHandler in NumPy's C-API table */
#define NP_API_FEATURE_VERSION 211      /* PyArray_GetNDArrayCFeatureVersion */
#define NP_1_22_API_VERSION 0xf

/* The arena arrays come from: kept after the pool stops, so arrays that outlive it are still
 * freed into it (live arena references keep it mapped meanwhile). */
static arena *np_arena;
static _Atomic int arena_was_full;

static void *
arena_array(size_t size)
{
    arena *a = exec__arena;
    uint64_t blk;
    if (a == NULL || size < ARRAY_IN_ARENA_MIN)
        return NULL;
    if (arena_alloc(a, size, &blk) < 0) {
        atomic_store(&arena_was_full, 1);     /* logged from a thread with the GIL */
        return NULL;
    }
    np_arena = a;
    if (exec__in_worker_flag) {
        held_add_keyed(blk);
    }
    else {
        /* The master's own array: passing it to a task lends the block (no copy); writing it
         * while a task reads it copies it first (guard.c). */
        guard_view(blk);
        atomic_fetch_add(&exec__live_arena_refs, 1);
    }
    return arena_ptr(a, blk);
}

static void
np_free(void *ctx, void *ptr, size_t size)
{
    arena *a = np_arena;
    uint64_t blk;
    size_t blen;
    if (ptr && a && arena_contains(a, ptr)) {
        /* In a child forked by the user the block is the parent's: its private copy goes with
         * the child, the shared block is left alone. */
        if (exec__user_fork_child)
            return;
        if (arena_block_of(a, ptr, &blk, &blen) == 0) {
            if (exec__in_worker_flag) {
                held_forget_keyed(blk);
            }
            else {
                guard_unview(blk);
                atomic_fetch_sub(&exec__live_arena_refs, 1);
            }
            arena_decref(a, blk);
        }
        return;
    }
    free(ptr);
}

void
exec__note_arena_full(void)
{
    if (!atomic_exchange(&arena_was_full, 0))
        return;
    static int told;
    if (told++)
        return;
    PyObject *msg = PyUnicode_FromString(
        "pydron: the shared arena is full: large arrays are allocated outside it for now, and "
        "copied when passed to tasks");
    PyObject *r = msg ? exec__call_helper("warn", &msg, 1) : NULL;
    Py_XDECREF(msg);
    Py_XDECREF(r);
    PyErr_Clear();
}

static void *
np_malloc(void *ctx, size_t size)
{
    void *p = arena_array(size);
    return p ? p : malloc(size ? size : 1);
}

static void *
np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (elsize && nelem > SIZE_MAX / elsize)
        return NULL;
    void *p = arena_array(nelem * elsize);
    if (p) {
        memset(p, 0, nelem * elsize);   /* reused pages are not zero */
        return p;
    }
    return calloc(nelem ? nelem : 1, elsize ? elsize : 1);
}

static void *
np_realloc(void *ctx, void *ptr, size_t new_size)
{
    arena *a = np_arena;
    uint64_t blk;
    size_t blen;
    if (ptr && a && arena_contains(a, ptr) && arena_block_of(a, ptr, &blk, &blen) == 0) {
        size_t avail = blen - (size_t)((char *)ptr - (char *)arena_ptr(a, blk));
        if (new_size <= avail)
            return ptr;
        void *q = np_malloc(ctx, new_size);
        if (q == NULL)
            return NULL;
        memcpy(q, ptr, avail);
        np_free(ctx, ptr, 0);
        return q;
    }
    return realloc(ptr, new_size ? new_size : 1);
}

static np_handler arena_handler = {
    "pydron_arena", 1, {NULL, np_malloc, np_calloc, np_realloc, np_free},
};

static int arrays_state;   /* 0: numpy not seen yet, 1: installed, -1: not possible or off */

/* Install the handler once numpy is imported in this worker (checked between tasks). */
void
exec__install_array_allocator(void)
{
    if (arrays_state != 0)
        return;
    /* Called per task until numpy shows up: look only when sys.modules has grown. */
    static Py_ssize_t modules_seen = -1;
    PyObject *modules = PyImport_GetModuleDict();    /* borrowed; no lookup by name */
    if (modules == NULL || !PyDict_Check(modules) || PyDict_GET_SIZE(modules) == modules_seen)
        return;
    modules_seen = PyDict_GET_SIZE(modules);
    PyObject *umath = NULL;
    if (modules) {
        umath = PyDict_GetItemString(modules, "numpy._core._multiarray_umath");
        if (umath == NULL)
            umath = PyDict_GetItemString(modules, "numpy.core._multiarray_umath");
    }
    if (umath == NULL)
        return;                         /* not imported (yet) */
    arrays_state = -1;
    if (!exec__options.arena_arrays)
        return;
    PyObject *cap = PyObject_GetAttrString(umath, "_ARRAY_API");
    void **api = cap && PyCapsule_CheckExact(cap) ? PyCapsule_GetPointer(cap, NULL) : NULL;
    Py_XDECREF(cap);
    if (api == NULL) {
        PyErr_Clear();
        return;
    }
    unsigned (*feature_version)(void) = (unsigned (*)(void))api[NP_API_FEATURE_VERSION];
    if (feature_version() < NP_1_22_API_VERSION)
        return;
    PyObject *handler = PyCapsule_New(&arena_handler, "mem_handler", NULL);
    PyObject *(*set_handler)(PyObject *) = (PyObject * (*)(PyObject *)) api[NP_API_SET_HANDLER];
    PyObject *old = handler ? set_handler(handler) : NULL;
    Py_XDECREF(handler);
    if (old == NULL) {
        PyErr_Clear();
        return;
    }
    Py_DECREF(old);
    arrays_state = 1;
}
