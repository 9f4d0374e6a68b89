/* trace/replay_tier.c — the glue between the interpreter and the compiled tier (jit/): a graph's
 * program handed to the compile thread once it is hot (with its object file from the disk cache
 * when a process before this one compiled it), the object a compile emitted handed to the disk
 * cache, the compiled function chosen for a call once it is ready and not slower than the
 * interpreter (the two are timed against each other first), and the operations handed to jit/
 * (the same functions the interpreter calls).
 *
 * Thread and GIL model: GIL held throughout here; jit/ compiles on its own thread and never calls
 * back into this file (jit/jit.h); the object files are read and written here, by
 * pydron/_graph_cache.py, never on the compile thread. */
#include "trace/replay_internal.h"

/* pydron._graph_cache's load_object and store_object (strong, once imported). */
static PyObject *load_object_fn, *store_object_fn;

/* 0, or -1 + exception. */
static int
import_object_cache(void)
{
    if (store_object_fn != NULL)
        return 0;
    PyObject *mod = PyImport_ImportModule("pydron._graph_cache");
    if (mod == NULL)
        return -1;
    load_object_fn = PyObject_GetAttrString(mod, "load_object");
    store_object_fn = load_object_fn ? PyObject_GetAttrString(mod, "store_object") : NULL;
    Py_DECREF(mod);
    if (store_object_fn == NULL) {
        Py_CLEAR(load_object_fn);
        return -1;
    }
    return 0;
}

/* The object file of g's key from the disk cache (bytes, checked there: hash, owner, mode,
 * environment), or NULL (none; the cache cannot fail a call, so its errors are dropped). */
static PyObject *
object_from_disk(jit_graph *g)
{
    if (import_object_cache() < 0) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *obj = PyObject_CallFunction(load_object_fn, "ss", jit_graph_key(g),
                                          jit_environment());
    if (obj == NULL || !PyBytes_Check(obj)) {
        PyErr_Clear();
        Py_XDECREF(obj);
        return NULL;
    }
    return obj;
}

/* The object a compile of g emitted, into the disk cache (once; nothing when g's code was loaded
 * from it). Errors are dropped, as in object_from_disk. */
static void
object_to_disk(jit_graph *g)
{
    size_t size;
    void *object = jit_graph_take_object(g, &size);
    if (object == NULL)
        return;
    PyObject *bytes = PyBytes_FromStringAndSize(object, (Py_ssize_t)size);
    free(object);
    PyObject *rc = NULL;
    if (bytes != NULL && import_object_cache() == 0)
        rc = PyObject_CallFunction(store_object_fn, "ssO", jit_graph_key(g), jit_environment(),
                                   bytes);
    if (rc == NULL)
        PyErr_Clear();
    Py_XDECREF(rc);
    Py_XDECREF(bytes);
}

/* p's program as jit/ takes it (per instruction its operation; the instruction size), started
 * with its object file when the disk cache has one. NULL + exception, or the handle. */
static jit_graph *
jit_submit(struct trace_replay *p, int wait)
{
    int *ops = PyMem_Malloc((size_t)(p->ncode ? p->ncode : 1) * sizeof(int));
    if (ops == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (int pc = 0; pc < p->ncode; pc++)
        ops[pc] = p->code[pc].op;
    jit_graph *g = jit_graph_new(ops, p->ncode, sizeof(rins));
    PyMem_Free(ops);
    if (g == NULL)
        return NULL;
    PyObject *object = object_from_disk(g);
    jit_graph_start(g, object ? PyBytes_AS_STRING(object) : NULL,
                    object ? (size_t)PyBytes_GET_SIZE(object) : 0, wait);
    Py_XDECREF(object);
    return g;
}

/* The compiled function of p's graph when it is ready and not slower than the interpreter, else
 * NULL (interpreted). A graph that has become hot is handed to the compile thread here; the call
 * does not wait for it (unless the tier is "always"). While the two tiers are compared, *timed
 * says which one this call's run is timed for (0 interpreted, 1 compiled; else -1). */
jit_graph_fn
replay__compiled_for(struct trace_replay *p, int *timed)
{
    *timed = -1;
    if (replay__jit_mode == 0)
        return NULL;
    if (p->jit == NULL) {
        if ((replay__jit_mode == 1 && p->hits < (uint64_t)replay__jit_after) ||
            p->ncode > replay__jit_max)
            return NULL;
        if ((p->jit = jit_submit(p, replay__jit_mode == 2)) == NULL) {
            PyErr_Clear();              /* out of memory: interpreted, and tried again later */
            return NULL;
        }
    }
    jit_graph_fn fn = jit_graph_ready(p->jit);
    if (fn != NULL && !p->jit_collected) {
        p->jit_collected = 1;
        object_to_disk(p->jit);
    }
    if (fn == NULL || replay__jit_mode == 2 || p->tier_verdict > 0)
        return fn;
    if (p->tier_verdict < 0)
        return NULL;
    *timed = p->ntier_cpu[0] <= p->ntier_cpu[1] ? 0 : 1;
    return *timed ? fn : NULL;
}

/* A timed run of the comparison between the tiers (see compiled_for) took ns. */
void
replay__tier_timed(struct trace_replay *p, int timed, uint64_t ns)
{
    if (p->ntier_cpu[timed] < COMPARE_CALLS)
        p->tier_cpu[timed][p->ntier_cpu[timed]++] = ns;
    if (p->ntier_cpu[0] < COMPARE_CALLS || p->ntier_cpu[1] < COMPARE_CALLS)
        return;
    p->tier_ns[0] = replay__median3(p->tier_cpu[0], COMPARE_CALLS);
    p->tier_ns[1] = replay__median3(p->tier_cpu[1], COMPARE_CALLS);
    p->tier_verdict = p->tier_ns[1] < p->tier_ns[0] ? 1 : -1;
}

/* The operations for the compiled tier, by number, as jit/ calls them (the pointer types differ
 * only in naming the state and instruction types; jit/ never calls them from C). */
static jit_op_fn jit_ops[R_NOPS];

int
replay__tier_init(void)
{
    for (int k = 0; k < R_NOPS; k++)
        jit_ops[k] = (jit_op_fn)(void (*)(void))replay__op_table[k];
    return jit_set_ops(jit_ops, replay__rop_names, R_NOPS);
}
