/* jit/jit.h — LLVM (ORC LLJIT through the C API): native code for the replay glue of hot graphs.
 *
 * A graph (trace/replay_tier.c) hands its program over as a table of steps: which operation function
 * each instruction calls and the instruction's address (passed to that function as is).
 * jit/ turns the table into one native function per graph: a loop over the table, which is a
 * constant of the compiled code, calling the step at the program counter until an operation says
 * stop. Compiling it costs about the same whatever the graph's size (~1 ms; a block per step cost
 * ~60 µs a step). It knows nothing of what the operations do, so it cannot disagree with the
 * interpreter, which calls the same functions.
 *
 * Thread model: jit_graph_submit / _ready / _status / _release are called with the GIL held (from
 * any thread). Compiling happens on one compile thread of jit/'s own, which never touches a
 * Python object and never takes the GIL; it only reads its own copy of the step table. A forked
 * child compiles nothing (its graphs already compiled stay usable). */
#ifndef PYDRON_JIT_H
#define PYDRON_JIT_H

#include <Python.h>
#include <stdint.h>

/* An operation: executes the instruction ins at *pc with state, moves *pc on. 0: go on; any
 * other value ends the compiled function with that value. */
typedef int (*jit_op_fn)(void *state, int *pc, const void *ins, int guessing);
/* A compiled graph: runs from *pc until an operation returns non-zero, and returns that (*pc is
 * where the operation left it); JIT_UNKNOWN_PC when *pc is no instruction of the graph. */
typedef int (*jit_graph_fn)(void *state, int *pc);
#define JIT_UNKNOWN_PC 2

typedef struct {
    int op;                 /* index into the operations given to jit_set_ops */
    const void *ins;        /* handed to the operation as is (never read by jit/) */
} jit_step;

enum jit_status { JIT_QUEUED, JIT_READY, JIT_FAILED };
typedef struct jit_graph jit_graph;

/* The operations, by number (the array is kept). Once, before any submit. 0, or -1 + exception. */
int jit_set_ops(const jit_op_fn *fns, int n);
/* Queue the compilation of a graph of n steps (copied). wait: block until it is done (tests).
 * The caller owns the handle (jit_graph_release). NULL + exception: out of memory. */
jit_graph *jit_graph_submit(const jit_step *steps, int n, int wait);
/* The compiled function once it is ready, else NULL. Never blocks. */
jit_graph_fn jit_graph_ready(jit_graph *g);
/* JIT_QUEUED (also while compiling), JIT_READY or JIT_FAILED; compile_ms (wall time on the
 * compile thread, leaving out the making of the LLJIT at the process's first compile) and error
 * (why it failed, a string owned by g) when not NULL. */
int jit_graph_status(jit_graph *g, double *compile_ms, const char **error);
/* The owner is done with g: its code is freed (on the compile thread) when no call can use it
 * any more; the caller guarantees that no call is running g's function. NULL is fine. */
void jit_graph_release(jit_graph *g);

const char *jit_llvm_version(void);
int jit_module_init(PyObject *module);

#endif
