/* jit/jit.h — LLVM (ORC LLJIT through the C API): native code for the replay glue of hot graphs.
 *
 * A graph (trace/replay_tier.c) hands its program over as the number of the operation each
 * instruction calls and the size of an instruction. jit/ turns that into one native function per
 * graph: a loop over a table of operation numbers, a constant of the compiled code, calling the
 * step at the program counter until an operation says stop. The code holds no address of this
 * process: it is given the instruction array and the operations table when it is called, so its
 * object file serves any process with the same LLVM, CPU, Python and pydron. Compiling it costs
 * about the same whatever the graph's size (~1 ms; a block per step cost ~60 µs a step). It knows
 * nothing of what the operations do, so it cannot disagree with the interpreter, which calls the
 * same functions.
 *
 * Objects: every compile emits the graph's object file; the owner takes its bytes
 * (jit_graph_take_object) to keep them on disk under jit_graph_key, and a later process hands
 * them back at jit_graph_start, which loads them instead of compiling (a file that does not load
 * is compiled instead).
 *
 * Thread model: jit_graph_new / _start / _ready / _status / _take_object / _release are called
 * with the GIL held (from any thread). Compiling and linking happen on one compile thread of
 * jit/'s own, which never touches a Python object and never takes the GIL; it only reads its
 * own copies of the step table and of the object it was handed (the disk is the caller's). A
 * forked child compiles nothing (its graphs already compiled stay usable). */
#ifndef PYDRON_JIT_H
#define PYDRON_JIT_H

#include <Python.h>
#include <stdint.h>

/* An operation: executes the instruction ins at *pc with state, moves *pc on. 0: go on; any
 * other value ends the compiled function with that value. */
typedef int (*jit_op_fn)(void *state, int *pc, const void *ins, int guessing);
/* A compiled graph: runs from *pc until an operation returns non-zero, and returns that (*pc is
 * where the operation left it); JIT_UNKNOWN_PC when *pc is no instruction of the graph.
 * ins is the graph's instruction array (step k's operation is given ins + k * the instruction
 * size) and ops the operations given to jit_set_ops. */
typedef int (*jit_graph_fn)(void *state, int *pc, const void *ins, const jit_op_fn *ops);
#define JIT_UNKNOWN_PC 2

enum jit_status { JIT_QUEUED, JIT_READY, JIT_FAILED };
typedef struct jit_graph jit_graph;

/* The operations, by number (the array is kept), and their names (which go into the environment,
 * so that code made by a build that numbers its operations otherwise is not used). Once, before
 * any graph. 0, or -1 + exception. */
int jit_set_ops(const jit_op_fn *fns, const char *const *names, int n);
/* The operations given to jit_set_ops (what a compiled function is called with). */
const jit_op_fn *jit_operations(void);
/* What compiled code depends on besides its graph: LLVM version, target triple, host CPU name and
 * features, Python version, code generation level, the operations' names (their XXH3) (a string
 * owned by jit/; the same for the whole process). */
const char *jit_environment(void);
/* A graph of n steps: ops[k] is step k's operation (copied), ins_size the size of one instruction.
 * Its key (jit_graph_key) is known at once; nothing is compiled until jit_graph_start. The caller
 * owns the handle (jit_graph_release). NULL + exception: out of memory. */
jit_graph *jit_graph_new(const int *ops, int n, size_t ins_size);
/* The key of g's code: 16 hex digits of XXH3 over the environment, the instruction size, the
 * number of operations and the steps' operations. */
const char *jit_graph_key(jit_graph *g);
/* Queue g on the compile thread: it loads object (an object file of g's key, size bytes, copied;
 * NULL: none) or, without one or when it does not load, compiles. wait: block until it is done
 * (tests). Once per handle. */
void jit_graph_start(jit_graph *g, const void *object, size_t size, int wait);
/* The object file a compile of g emitted, once (the caller frees it with free()); NULL when g is
 * not ready, was loaded from an object, or it was taken already. */
void *jit_graph_take_object(jit_graph *g, size_t *size);
/* 1 when g's code came from an object file handed to jit_graph_start (not compiled). */
int jit_graph_loaded(jit_graph *g);
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
