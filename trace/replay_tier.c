/* trace/replay_tier.c — the glue between the interpreter and the compiled tier (jit/): a graph's
 * program handed to the compile thread once it is hot, the compiled function chosen for a call
 * once it is ready and not slower than the interpreter (the two are timed against each other
 * first), and the operations handed to jit/ (the same functions the interpreter calls).
 *
 * Thread and GIL model: GIL held throughout here; jit/ compiles on its own thread and never calls
 * back into this file (jit/jit.h). */
#include "trace/replay_internal.h"

/* p's program as jit/ takes it: per instruction its operation and its address. NULL +
 * exception, or the handle. */
static jit_graph *
jit_submit(struct trace_replay *p, int wait)
{
    jit_step *steps = PyMem_Malloc((size_t)p->ncode * sizeof(jit_step));
    if (steps == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (int pc = 0; pc < p->ncode; pc++) {
        steps[pc].op = p->code[pc].op;
        steps[pc].ins = &p->code[pc];
    }
    jit_graph *g = jit_graph_submit(steps, p->ncode, wait);
    PyMem_Free(steps);
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
    return jit_set_ops(jit_ops, R_NOPS);
}
