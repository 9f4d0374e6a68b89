/* jit/jit.c — the compiled tier of graph replay: a graph's step table (jit/jit.h) becomes LLVM IR,
 * one function per graph, compiled by an ORC LLJIT on a compile thread of its own. Also
 * `_jit_add`, the self-test that the linked libLLVM compiles and runs code on this machine.
 *
 * Thread and GIL model: the compile thread owns the graphs' LLJIT (it makes it, adds modules,
 * looks functions up, removes their code); callers hold the GIL and only queue work and read a
 * graph's status, an atomic published after the function pointer. One mutex guards the queue and
 * who frees a handle. Nothing here touches a Python object off the calling thread. At exit
 * (Py_AtExit) the compile thread is stopped and joined, so that no compile runs while LLVM's
 * globals are destroyed; a forked child has no compile thread and compiles nothing. */
#include "jit/jit.h"

#include <llvm-c/Analysis.h>
#include <llvm-c/Core.h>
#include <llvm-c/Error.h>
#include <llvm-c/LLJIT.h>
#include <llvm-c/Orc.h>
#include <llvm-c/Target.h>
#include <llvm-c/TargetMachine.h>
#include <llvm/Config/llvm-config.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Code generation level for graphs: the code is a loop making one call per step, which optimising
 * does not speed up (measured on the 1,383-instruction graph of bench/replay_figures.py: Less and
 * Default compiled in 2.8-3.8 ms against 1.6, and ran within the noise of None). */
#define GRAPH_CODEGEN_LEVEL LLVMCodeGenLevelNone

struct jit_graph {
    jit_step *steps;
    int n;
    unsigned id;
    _Atomic int status;          /* enum jit_status; READY is stored after fn */
    jit_graph_fn fn;
    double compile_ms;
    char error[256];
    int released;                /* the owner is done with it (under J.lock) */
    int remove;                  /* queued to have its code removed (under J.lock) */
    LLVMOrcResourceTrackerRef rt;   /* its code in the LLJIT: compile thread only */
    jit_graph *next;             /* in the queue */
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work, done;
    pthread_t thread;
    int started;                 /* the compile thread runs in this process */
    int stopping, paused, forked;
    long thread_id;              /* the compile thread's native id (0: none yet) */
    jit_graph *head, *tail;
    unsigned next_id;
    uint64_t compiled, failed;
    const jit_op_fn *op_fns;
    int nops;
    LLVMOrcLLJITRef lljit;       /* compile thread only, as lljit_error */
    char lljit_error[256];
    double setup_ms;             /* making lljit (wall time; written before the first publish) */
} J = {.lock = PTHREAD_MUTEX_INITIALIZER, .work = PTHREAD_COND_INITIALIZER,
       .done = PTHREAD_COND_INITIALIZER};

static LLVMOrcLLJITRef selftest_jit;      /* _jit_add's, on the calling thread */
typedef int64_t (*add_fn)(int64_t, int64_t);
static add_fn jitted_add;

const char *
jit_llvm_version(void)
{
    return LLVM_VERSION_STRING;
}

/* ---- the compile thread ------------------------------------------------------------------------ */

/* "what: LLVM's message" into buf; consumes err. */
static void
describe_llvm_error(char *buf, size_t size, const char *what, LLVMErrorRef err)
{
    char *msg = LLVMGetErrorMessage(err);
    snprintf(buf, size, "%s: %s", what, msg);
    LLVMDisposeErrorMessage(msg);
}

/* The graphs' LLJIT, for the host, at GRAPH_CODEGEN_LEVEL. 0, or -1 with J.lljit_error. */
static int
lljit_create(void)
{
    LLVMInitializeNativeTarget();
    LLVMInitializeNativeAsmPrinter();
    char *triple = LLVMGetDefaultTargetTriple(), *msg = NULL;
    char *cpu = LLVMGetHostCPUName(), *features = LLVMGetHostCPUFeatures();
    LLVMTargetRef target;
    int rc = -1;
    if (LLVMGetTargetFromTriple(triple, &target, &msg)) {
        snprintf(J.lljit_error, sizeof(J.lljit_error), "no target for %s: %s", triple, msg);
        LLVMDisposeMessage(msg);
        goto done;
    }
    LLVMTargetMachineRef tm = LLVMCreateTargetMachine(target, triple, cpu, features,
                                                      GRAPH_CODEGEN_LEVEL, LLVMRelocDefault,
                                                      LLVMCodeModelJITDefault);
    if (tm == NULL) {
        snprintf(J.lljit_error, sizeof(J.lljit_error), "no target machine for %s", triple);
        goto done;
    }
    /* The builders take ownership: tm by the target machine builder, that by the LLJIT's. */
    LLVMOrcLLJITBuilderRef builder = LLVMOrcCreateLLJITBuilder();
    LLVMOrcLLJITBuilderSetJITTargetMachineBuilder(
        builder, LLVMOrcJITTargetMachineBuilderCreateFromTargetMachine(tm));
    LLVMErrorRef err = LLVMOrcCreateLLJIT(&J.lljit, builder);
    if (err) {
        J.lljit = NULL;
        describe_llvm_error(J.lljit_error, sizeof(J.lljit_error), "creating the LLJIT", err);
        goto done;
    }
    rc = 0;
done:
    LLVMDisposeMessage(triple);
    LLVMDisposeMessage(cpu);
    LLVMDisposeMessage(features);
    return rc;
}

/* A step in the compiled function's table: the addresses of its operation and instruction. */
typedef struct {
    uint64_t op, ins;
} table_entry;

/* The IR of graph g as function fname: a loop over the graph's step table, a constant of the module
 * (per step the operation's address and the instruction's, as plain integers), calling the step
 * at *pc until an operation returns non-zero or *pc leaves the graph. The code is the same few
 * blocks whatever the graph's size, so compiling costs about the same for every graph; a block
 * per step (each with its own call, the expected successor as a direct branch and a switch over
 * every step for re-entry) cost LLVM's code generator ~60 µs per step, 80-130 ms for a graph of
 * 1,383 instructions. The table is integers, not pointer constants, so that it is emitted as raw
 * bytes (a constant expression per entry tripled the compile time). NULL: out of memory or
 * a table too large (g->error). */
static LLVMModuleRef
graph_module(jit_graph *g, LLVMContextRef ctx, const char *fname)
{
    LLVMTypeRef i32 = LLVMInt32TypeInContext(ctx), i64 = LLVMInt64TypeInContext(ctx);
    size_t nbytes = (size_t)g->n * sizeof(table_entry);
    if (nbytes > UINT_MAX) {
        snprintf(g->error, sizeof(g->error), "%d steps: too many for one table", g->n);
        return NULL;
    }
    table_entry *entries = malloc(nbytes + 1);
    if (entries == NULL) {
        snprintf(g->error, sizeof(g->error), "out of memory");
        return NULL;
    }
    for (int k = 0; k < g->n; k++) {
        entries[k].op = (uint64_t)(uintptr_t)J.op_fns[g->steps[k].op];
        entries[k].ins = (uint64_t)(uintptr_t)g->steps[k].ins;
    }
    LLVMModuleRef mod = LLVMModuleCreateWithNameInContext(fname, ctx);
    LLVMSetTarget(mod, LLVMOrcLLJITGetTripleString(J.lljit));
    LLVMSetDataLayout(mod, LLVMOrcLLJITGetDataLayoutStr(J.lljit));
    LLVMValueRef init = LLVMConstStringInContext(ctx, (const char *)entries, (unsigned)nbytes, 1);
    free(entries);
    LLVMTypeRef table_type = LLVMTypeOf(init);
    LLVMValueRef table = LLVMAddGlobal(mod, table_type, "steps");
    LLVMSetInitializer(table, init);
    LLVMSetGlobalConstant(table, 1);
    LLVMSetLinkage(table, LLVMPrivateLinkage);
    LLVMSetUnnamedAddress(table, LLVMGlobalUnnamedAddr);
    LLVMSetAlignment(table, _Alignof(table_entry));

    LLVMTypeRef i8p = LLVMPointerType(LLVMInt8TypeInContext(ctx), 0);
    LLVMTypeRef i32p = LLVMPointerType(i32, 0);
    LLVMTypeRef op_params[4] = {i8p, i32p, i8p, i32}, graph_params[2] = {i8p, i32p};
    LLVMTypeRef op_type = LLVMFunctionType(i32, op_params, 4, 0);
    LLVMValueRef fn = LLVMAddFunction(mod, fname, LLVMFunctionType(i32, graph_params, 2, 0));
    LLVMValueRef state = LLVMGetParam(fn, 0), pc = LLVMGetParam(fn, 1);
    LLVMBasicBlockRef entry = LLVMAppendBasicBlockInContext(ctx, fn, "entry");
    LLVMBasicBlockRef loop = LLVMAppendBasicBlockInContext(ctx, fn, "loop");
    LLVMBasicBlockRef step = LLVMAppendBasicBlockInContext(ctx, fn, "step");
    LLVMBasicBlockRef unknown = LLVMAppendBasicBlockInContext(ctx, fn, "unknown");
    LLVMBasicBlockRef leave = LLVMAppendBasicBlockInContext(ctx, fn, "leave");
    LLVMBuilderRef b = LLVMCreateBuilderInContext(ctx);

    LLVMPositionBuilderAtEnd(b, entry);
    LLVMBuildBr(b, loop);
    /* loop: k = *pc; a k outside the graph goes back to the interpreter */
    LLVMPositionBuilderAtEnd(b, loop);
    LLVMValueRef k = LLVMBuildLoad2(b, i32, pc, "k");
    LLVMValueRef inside = LLVMBuildICmp(b, LLVMIntULT, k, LLVMConstInt(i32, (unsigned)g->n, 0), "");
    LLVMBuildCondBr(b, inside, step, unknown);
    LLVMPositionBuilderAtEnd(b, unknown);
    LLVMBuildRet(b, LLVMConstInt(i32, JIT_UNKNOWN_PC, 0));

    /* step: rc = table[k].op(state, pc, table[k].ins, 1); on while rc == 0 */
    LLVMPositionBuilderAtEnd(b, step);
    LLVMTypeRef i64p = LLVMPointerType(i64, 0);
    LLVMValueRef at = LLVMBuildMul(b, LLVMBuildZExt(b, k, i64, ""),
                                   LLVMConstInt(i64, sizeof(table_entry), 0), "");
    LLVMValueRef idx[2] = {LLVMConstInt(i64, 0, 0), at};
    LLVMValueRef op_at = LLVMBuildInBoundsGEP2(b, table_type, table, idx, 2, "");
    idx[1] = LLVMBuildAdd(b, at, LLVMConstInt(i64, offsetof(table_entry, ins), 0), "");
    LLVMValueRef ins_at = LLVMBuildInBoundsGEP2(b, table_type, table, idx, 2, "");
    LLVMValueRef op_word = LLVMBuildLoad2(b, i64, LLVMBuildBitCast(b, op_at, i64p, ""), "op");
    LLVMValueRef ins_word = LLVMBuildLoad2(b, i64, LLVMBuildBitCast(b, ins_at, i64p, ""), "ins");
    LLVMSetAlignment(op_word, _Alignof(table_entry));
    LLVMSetAlignment(ins_word, _Alignof(uint64_t));
    LLVMValueRef args[4] = {state, pc, LLVMBuildIntToPtr(b, ins_word, i8p, ""),
                            LLVMConstInt(i32, 1, 0)};
    LLVMValueRef rc = LLVMBuildCall2(
        b, op_type, LLVMBuildIntToPtr(b, op_word, LLVMPointerType(op_type, 0), ""), args, 4, "rc");
    LLVMBuildCondBr(b, LLVMBuildICmp(b, LLVMIntEQ, rc, LLVMConstInt(i32, 0, 0), ""), loop,
                    leave);
    LLVMPositionBuilderAtEnd(b, leave);
    LLVMBuildRet(b, rc);
    LLVMDisposeBuilder(b);
    return mod;
}

static double
ms_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) * 1e3 + (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

/* Compile g: on success g->fn and g->rt are set. Returns the status to publish (JIT_READY, or
 * JIT_FAILED with g->error). Compile thread, without the lock. */
static int
graph_compile(jit_graph *g)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (J.lljit == NULL && J.lljit_error[0] == '\0') {
        lljit_create();           /* once: a failure is kept in lljit_error */
        J.setup_ms = ms_since(&t0);
        clock_gettime(CLOCK_MONOTONIC, &t0);
    }
    if (J.lljit == NULL) {
        snprintf(g->error, sizeof(g->error), "%s", J.lljit_error);
        return JIT_FAILED;
    }
    char fname[48], *verify_msg = NULL;
    snprintf(fname, sizeof(fname), "pydron_graph_%u", g->id);
    LLVMOrcThreadSafeContextRef tsctx = LLVMOrcCreateNewThreadSafeContext();
    LLVMModuleRef mod = graph_module(g, LLVMOrcThreadSafeContextGetContext(tsctx), fname);
    if (mod == NULL) {
        LLVMOrcDisposeThreadSafeContext(tsctx);
        return JIT_FAILED;
    }
    /* Verified every time: it costs 0.03 ms, and an invalid module must fail, not crash. */
    if (LLVMVerifyModule(mod, LLVMReturnStatusAction, &verify_msg)) {
        snprintf(g->error, sizeof(g->error), "invalid IR: %s", verify_msg);
        LLVMDisposeMessage(verify_msg);
        LLVMDisposeModule(mod);
        LLVMOrcDisposeThreadSafeContext(tsctx);
        return JIT_FAILED;
    }
    LLVMDisposeMessage(verify_msg);
    /* The module now belongs to tsm, and the context stays alive as long as tsm needs it. */
    LLVMOrcThreadSafeModuleRef tsm = LLVMOrcCreateNewThreadSafeModule(mod, tsctx);
    LLVMOrcDisposeThreadSafeContext(tsctx);
    g->rt = LLVMOrcJITDylibCreateResourceTracker(LLVMOrcLLJITGetMainJITDylib(J.lljit));
    LLVMErrorRef err = LLVMOrcLLJITAddLLVMIRModuleWithRT(J.lljit, g->rt, tsm);
    if (err) {
        LLVMOrcDisposeThreadSafeModule(tsm);
        describe_llvm_error(g->error, sizeof(g->error), "adding the module", err);
        goto fail;
    }
    LLVMOrcExecutorAddress addr = 0;
    if ((err = LLVMOrcLLJITLookup(J.lljit, &addr, fname))) {
        describe_llvm_error(g->error, sizeof(g->error), "compiling", err);
        goto fail;
    }
    g->fn = (jit_graph_fn)(uintptr_t)addr;
    g->compile_ms = ms_since(&t0);
    return JIT_READY;
fail:
    if ((err = LLVMOrcResourceTrackerRemove(g->rt)))
        LLVMConsumeError(err);
    LLVMOrcReleaseResourceTracker(g->rt);
    g->rt = NULL;
    return JIT_FAILED;
}

/* Free g's code (compile thread, without the lock): no call can be running it. */
static void
graph_remove_code(jit_graph *g)
{
    if (g->rt == NULL)
        return;
    LLVMErrorRef err = LLVMOrcResourceTrackerRemove(g->rt);
    if (err)
        LLVMConsumeError(err);      /* the code stays mapped: only memory is lost */
    LLVMOrcReleaseResourceTracker(g->rt);
    g->rt = NULL;
}

static void
graph_free(jit_graph *g)
{
    free(g->steps);
    free(g);
}

static void *
compile_thread(void *arg)
{
    pthread_mutex_lock(&J.lock);
    J.thread_id = (long)syscall(SYS_gettid);
    for (;;) {
        while (!J.stopping && (J.head == NULL || J.paused))
            pthread_cond_wait(&J.work, &J.lock);
        if (J.stopping)
            break;
        jit_graph *g = J.head;
        J.head = g->next;
        if (J.head == NULL)
            J.tail = NULL;
        g->next = NULL;
        if (g->remove) {
            pthread_mutex_unlock(&J.lock);
            graph_remove_code(g);
            pthread_mutex_lock(&J.lock);
            graph_free(g);
            continue;
        }
        if (g->released) {            /* dropped while it waited */
            graph_free(g);
            continue;
        }
        pthread_mutex_unlock(&J.lock);
        int status = graph_compile(g);
        pthread_mutex_lock(&J.lock);
        if (status == JIT_READY)
            J.compiled++;
        else
            J.failed++;
        /* Published under the lock, so that jit_graph_release sees either QUEUED (and leaves
         * the handle to this thread) or the final status (and frees it itself). */
        atomic_store_explicit(&g->status, status, memory_order_release);
        if (g->released) {
            pthread_mutex_unlock(&J.lock);
            graph_remove_code(g);
            pthread_mutex_lock(&J.lock);
            graph_free(g);
        }
        pthread_cond_broadcast(&J.done);
    }
    pthread_mutex_unlock(&J.lock);
    return NULL;
}

/* Start the compile thread with every signal blocked (signals are the main thread's). Under
 * J.lock. 0, or -1. */
static int
start_thread(void)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&J.thread, NULL, compile_thread, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        return -1;
    J.started = 1;
    return 0;
}

/* ---- the interface (GIL held) -------------------------------------------------------------- */

int
jit_set_ops(const jit_op_fn *fns, int n)
{
    if (J.nops != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pydron.jit: the operations are set already");
        return -1;
    }
    J.op_fns = fns;
    J.nops = n;
    return 0;
}

static void
enqueue(jit_graph *g)
{
    if (J.tail != NULL)
        J.tail->next = g;
    else
        J.head = g;
    J.tail = g;
    pthread_cond_signal(&J.work);
}

jit_graph *
jit_graph_submit(const jit_step *steps, int n, int wait)
{
    jit_graph *g = calloc(1, sizeof(*g));
    if (g == NULL || (g->steps = malloc((size_t)n * sizeof(jit_step))) == NULL) {
        free(g);
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(g->steps, steps, (size_t)n * sizeof(jit_step));
    g->n = n;
    for (int k = 0; k < n; k++)
        if (steps[k].op < 0 || steps[k].op >= J.nops) {
            snprintf(g->error, sizeof(g->error), "step %d: no operation %d", k, steps[k].op);
            atomic_store(&g->status, JIT_FAILED);
            return g;
        }
    pthread_mutex_lock(&J.lock);
    g->id = ++J.next_id;
    const char *why = J.forked ? "not in a forked process" : J.stopping ? "shut down"
                      : J.nops == 0 ? "no operations" : NULL;
    if (why == NULL && !J.started && start_thread() < 0)
        why = "the compile thread could not start";
    if (why != NULL) {
        snprintf(g->error, sizeof(g->error), "%s", why);
        atomic_store(&g->status, JIT_FAILED);
    }
    else {
        atomic_store(&g->status, JIT_QUEUED);
        enqueue(g);
        while (wait && !J.paused && atomic_load(&g->status) == JIT_QUEUED)
            pthread_cond_wait(&J.done, &J.lock);
    }
    pthread_mutex_unlock(&J.lock);
    return g;
}

jit_graph_fn
jit_graph_ready(jit_graph *g)
{
    return atomic_load_explicit(&g->status, memory_order_acquire) == JIT_READY ? g->fn : NULL;
}

int
jit_graph_status(jit_graph *g, double *compile_ms, const char **error)
{
    int s = atomic_load_explicit(&g->status, memory_order_acquire);
    if (compile_ms)
        *compile_ms = s == JIT_READY ? g->compile_ms : 0.0;
    if (error)
        *error = s == JIT_FAILED ? g->error : NULL;
    return s;
}

void
jit_graph_release(jit_graph *g)
{
    if (g == NULL)
        return;
    pthread_mutex_lock(&J.lock);
    g->released = 1;
    int s = atomic_load(&g->status);
    int thread = J.started && !J.stopping;
    if (s == JIT_QUEUED && thread) {
        /* waiting or being compiled: the compile thread frees it */
    }
    else if (s == JIT_READY && thread) {
        g->remove = 1;
        enqueue(g);
    }
    else if (s != JIT_QUEUED || !J.started) {
        /* failed; or no compile thread any more (forked child, exit): its code, if any, stays
         * mapped until the process ends */
        graph_free(g);
    }
    /* else: queued when the thread stopped; it is lost with the queue at exit */
    pthread_mutex_unlock(&J.lock);
}

/* ---- fork and exit ----------------------------------------------------------------------------- */

static void
atfork_prepare(void)
{
    pthread_mutex_lock(&J.lock);
}

static void
atfork_parent(void)
{
    pthread_mutex_unlock(&J.lock);
}

/* The child has no compile thread: it compiles nothing; what is queued stays queued (so those
 * graphs are interpreted) and is freed by its owner. */
static void
atfork_child(void)
{
    J.started = 0;
    J.forked = 1;
    J.head = J.tail = NULL;
    pthread_mutex_unlock(&J.lock);
}

static void
jit_shutdown(void)
{
    pthread_mutex_lock(&J.lock);
    int join = J.started && !J.stopping;
    J.stopping = 1;
    pthread_cond_broadcast(&J.work);
    pthread_mutex_unlock(&J.lock);
    if (join)
        pthread_join(J.thread, NULL);
}

/* ---- the module's functions ---------------------------------------------------------------- */

/* Set an exception from an LLVM error (consumed). Returns -1. */
static int
raise_llvm_error(const char *what, LLVMErrorRef err)
{
    char *msg = LLVMGetErrorMessage(err);
    PyErr_Format(PyExc_RuntimeError, "pydron.jit: %s: %s", what, msg);
    LLVMDisposeErrorMessage(msg);
    return -1;
}

static int
jit_build_add(void)
{
    LLVMErrorRef err;
    LLVMInitializeNativeTarget();
    LLVMInitializeNativeAsmPrinter();
    if ((err = LLVMOrcCreateLLJIT(&selftest_jit, NULL)))
        return raise_llvm_error("creating the LLJIT", err);

    LLVMOrcThreadSafeContextRef tsctx = LLVMOrcCreateNewThreadSafeContext();
    LLVMContextRef ctx = LLVMOrcThreadSafeContextGetContext(tsctx);
    LLVMModuleRef mod = LLVMModuleCreateWithNameInContext("pydron_selftest", ctx);
    LLVMTypeRef i64 = LLVMInt64TypeInContext(ctx);
    LLVMTypeRef params[2] = {i64, i64};
    LLVMValueRef fn = LLVMAddFunction(mod, "pydron_add", LLVMFunctionType(i64, params, 2, 0));
    LLVMBuilderRef b = LLVMCreateBuilderInContext(ctx);
    LLVMPositionBuilderAtEnd(b, LLVMAppendBasicBlockInContext(ctx, fn, "entry"));
    LLVMBuildRet(b, LLVMBuildAdd(b, LLVMGetParam(fn, 0), LLVMGetParam(fn, 1), "sum"));
    LLVMDisposeBuilder(b);

    LLVMOrcThreadSafeModuleRef tsm = LLVMOrcCreateNewThreadSafeModule(mod, tsctx);
    LLVMOrcDisposeThreadSafeContext(tsctx);
    LLVMOrcJITDylibRef dylib = LLVMOrcLLJITGetMainJITDylib(selftest_jit);
    if ((err = LLVMOrcLLJITAddLLVMIRModule(selftest_jit, dylib, tsm))) {
        LLVMOrcDisposeThreadSafeModule(tsm);
        return raise_llvm_error("adding the module", err);
    }
    LLVMOrcExecutorAddress addr;
    if ((err = LLVMOrcLLJITLookup(selftest_jit, &addr, "pydron_add")))
        return raise_llvm_error("looking up pydron_add", err);
    jitted_add = (add_fn)(uintptr_t)addr;
    return 0;
}

static PyObject *
jit_add(PyObject *module, PyObject *args)
{
    long long a, b;
    if (!PyArg_ParseTuple(args, "LL", &a, &b))
        return NULL;
    if (jitted_add == NULL && jit_build_add() < 0)
        return NULL;
    return PyLong_FromLongLong(jitted_add(a, b));
}

/* _jit_info() -> dict: the compile thread and its counts, and what making the LLJIT took at the
 * first compile (setup_ms; a graph's compile_ms leaves it out) (tests, pydron info). */
static PyObject *
jit_info(PyObject *module, PyObject *noargs)
{
    pthread_mutex_lock(&J.lock);
    long tid = J.started ? J.thread_id : 0;
    unsigned long long compiled = J.compiled, failed = J.failed;
    int forked = J.forked, paused = J.paused;
    double setup_ms = compiled + failed > 0 ? J.setup_ms : 0.0;
    pthread_mutex_unlock(&J.lock);
    return Py_BuildValue("{sssNsKsKsOsOsd}", "llvm", LLVM_VERSION_STRING, "thread_id",
                         tid ? PyLong_FromLong(tid) : Py_NewRef(Py_None), "compiled", compiled,
                         "failed", failed, "forked", forked ? Py_True : Py_False, "paused",
                         paused ? Py_True : Py_False, "setup_ms", setup_ms);
}

/* _jit_pause(flag): hold the compile thread before its next compile (tests: a call that makes a
 * graph hot returns while its compile has not even begun). */
static PyObject *
jit_pause(PyObject *module, PyObject *flag)
{
    int paused = PyObject_IsTrue(flag);
    if (paused < 0)
        return NULL;
    pthread_mutex_lock(&J.lock);
    J.paused = paused;
    pthread_cond_broadcast(&J.work);
    pthread_mutex_unlock(&J.lock);
    Py_RETURN_NONE;
}

static PyMethodDef jit_methods[] = {
    {"_jit_add", jit_add, METH_VARARGS, "_jit_add(a, b): a + b computed by LLVM-compiled code."},
    {"_jit_info", jit_info, METH_NOARGS, "The compile thread of the compiled tier and its counts."},
    {"_jit_pause", jit_pause, METH_O, "_jit_pause(flag): hold the compile thread (tests)."},
    {NULL},
};

int
jit_module_init(PyObject *module)
{
    static int registered;
    if (!registered) {
        if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0 ||
            Py_AtExit(jit_shutdown) < 0) {
            PyErr_SetString(PyExc_OSError, "pydron.jit: cannot register the fork and exit hooks");
            return -1;
        }
        registered = 1;
    }
    return PyModule_AddFunctions(module, jit_methods);
}
