/* jit/jit.c — the compiled tier of graph replay: a graph's step table (jit/jit.h) becomes LLVM IR,
 * one function per graph, emitted as an object file and linked into an ORC LLJIT on a compile
 * thread of its own; or an object file a process before this one emitted is linked instead. Also
 * `_jit_add`, the self-test that the linked libLLVM compiles and runs code on this machine.
 *
 * Thread and GIL model: the compile thread owns the graphs' LLJIT and target machine (it makes
 * them, emits and adds objects, looks functions up, removes their code) and the list of code in
 * the LLJIT; callers hold the GIL and only queue work and read a graph's status, an atomic
 * published after the function pointer and the emitted object. One mutex guards the queue and
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
#include <xxhash.h>

/* Code generation level for graphs: the code is a loop making one call per step, which optimising
 * does not speed up (measured on the 1,383-instruction graph of bench/replay_figures.py: Less and
 * Default compiled in 2.8-3.8 ms against 1.6, and ran within the noise of None). */
#define GRAPH_CODEGEN_LEVEL LLVMCodeGenLevelNone

/* Code in the LLJIT, one per key (compile thread only): graphs of the same key share it, since
 * its function's name is made of the key. */
typedef struct jit_code {
    char key[17];
    jit_graph_fn fn;
    LLVMOrcResourceTrackerRef rt;
    int refs;                    /* graphs using it */
    struct jit_code *next;
} jit_code;

struct jit_graph {
    int32_t *ops;                /* per step, its operation */
    int n;
    size_t ins_size;
    char key[17];
    void *object;                /* handed to jit_graph_start to load (the compile thread frees) */
    size_t object_size;
    void *emitted;               /* the object the compile emitted, until taken (after status) */
    size_t emitted_size;
    int loaded;                  /* the code came from object (after status) */
    int rejected;                /* object did not link: compiled instead (compile thread) */
    int shared;                  /* the code of another graph of the same key (compile thread) */
    int started;                 /* jit_graph_start was called (under J.lock) */
    unsigned id;
    _Atomic int status;          /* enum jit_status; READY is stored after fn */
    jit_graph_fn fn;
    double compile_ms;
    char error[256];
    int released;                /* the owner is done with it (under J.lock) */
    int remove;                  /* queued to have its code removed (under J.lock) */
    jit_code *code;              /* its code in the LLJIT: compile thread only */
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
    uint64_t compiled, failed, loaded, rejected, shared;
    const jit_op_fn *op_fns;
    int nops;
    char *environment;           /* jit_environment (set with the operations) */
    LLVMOrcLLJITRef lljit;       /* compile thread only, as lljit_error, tm and codes */
    LLVMTargetMachineRef tm;     /* emits graphs' objects, made as the LLJIT's */
    jit_code *codes;
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

/* A target machine for the host at GRAPH_CODEGEN_LEVEL (what jit_environment names), or NULL
 * with J.lljit_error. */
static LLVMTargetMachineRef
host_target_machine(void)
{
    char *triple = LLVMGetDefaultTargetTriple(), *msg = NULL;
    char *cpu = LLVMGetHostCPUName(), *features = LLVMGetHostCPUFeatures();
    LLVMTargetRef target;
    LLVMTargetMachineRef tm = NULL;
    if (LLVMGetTargetFromTriple(triple, &target, &msg)) {
        snprintf(J.lljit_error, sizeof(J.lljit_error), "no target for %s: %s", triple, msg);
        LLVMDisposeMessage(msg);
    }
    else if ((tm = LLVMCreateTargetMachine(target, triple, cpu, features, GRAPH_CODEGEN_LEVEL,
                                           LLVMRelocDefault, LLVMCodeModelJITDefault)) == NULL)
        snprintf(J.lljit_error, sizeof(J.lljit_error), "no target machine for %s", triple);
    LLVMDisposeMessage(triple);
    LLVMDisposeMessage(cpu);
    LLVMDisposeMessage(features);
    return tm;
}

/* The graphs' LLJIT, and the target machine that emits their objects (both for the host, at
 * GRAPH_CODEGEN_LEVEL). 0, or -1 with J.lljit_error. */
static int
lljit_create(void)
{
    LLVMInitializeNativeTarget();
    LLVMInitializeNativeAsmPrinter();
    LLVMTargetMachineRef tm = host_target_machine();
    if (tm == NULL)
        return -1;
    if ((J.tm = host_target_machine()) == NULL) {
        LLVMDisposeTargetMachine(tm);
        return -1;
    }
    /* The builders take ownership: tm by the target machine builder, that by the LLJIT's. */
    LLVMOrcLLJITBuilderRef builder = LLVMOrcCreateLLJITBuilder();
    LLVMOrcLLJITBuilderSetJITTargetMachineBuilder(
        builder, LLVMOrcJITTargetMachineBuilderCreateFromTargetMachine(tm));
    LLVMErrorRef err = LLVMOrcCreateLLJIT(&J.lljit, builder);
    if (err) {
        J.lljit = NULL;
        describe_llvm_error(J.lljit_error, sizeof(J.lljit_error), "creating the LLJIT", err);
        LLVMDisposeTargetMachine(J.tm);
        J.tm = NULL;
        return -1;
    }
    return 0;
}

/* The IR of graph g as function fname(state, pc, ins, ops): a loop over the graph's table of
 * operation numbers, a constant of the module, calling ops[table[*pc]](state, pc, ins + *pc *
 * ins_size, 1) until an operation returns non-zero or *pc leaves the graph. No address of this
 * process is in it (the instructions and operations are arguments), so its object serves another
 * process. The code is the same few blocks whatever the graph's size, so compiling costs about
 * the same for every graph; a block per step (each with its own call, the expected successor as a
 * direct branch and a switch over every step for re-entry) cost LLVM's code generator ~60 µs per
 * step, 80-130 ms for a graph of 1,383 instructions. The table is a byte string, emitted as raw
 * bytes (a constant expression per entry tripled the compile time). NULL: a table too large
 * (g->error). */
static LLVMModuleRef
graph_module(jit_graph *g, LLVMContextRef ctx, const char *fname)
{
    LLVMTypeRef i32 = LLVMInt32TypeInContext(ctx), i64 = LLVMInt64TypeInContext(ctx);
    LLVMTypeRef i8 = LLVMInt8TypeInContext(ctx);
    size_t nbytes = (size_t)g->n * sizeof(int32_t);
    if (nbytes > UINT_MAX) {
        snprintf(g->error, sizeof(g->error), "%d steps: too many for one table", g->n);
        return NULL;
    }
    LLVMModuleRef mod = LLVMModuleCreateWithNameInContext(fname, ctx);
    LLVMSetTarget(mod, LLVMOrcLLJITGetTripleString(J.lljit));
    LLVMSetDataLayout(mod, LLVMOrcLLJITGetDataLayoutStr(J.lljit));
    LLVMValueRef init = LLVMConstStringInContext(ctx, (const char *)g->ops, (unsigned)nbytes, 1);
    LLVMTypeRef table_type = LLVMTypeOf(init);
    LLVMValueRef table = LLVMAddGlobal(mod, table_type, "steps");
    LLVMSetInitializer(table, init);
    LLVMSetGlobalConstant(table, 1);
    LLVMSetLinkage(table, LLVMPrivateLinkage);
    LLVMSetUnnamedAddress(table, LLVMGlobalUnnamedAddr);
    LLVMSetAlignment(table, _Alignof(int32_t));

    LLVMTypeRef i8p = LLVMPointerType(i8, 0), i32p = LLVMPointerType(i32, 0);
    LLVMTypeRef op_params[4] = {i8p, i32p, i8p, i32};
    LLVMTypeRef op_type = LLVMFunctionType(i32, op_params, 4, 0);
    LLVMTypeRef op_ptr = LLVMPointerType(op_type, 0);
    LLVMTypeRef graph_params[4] = {i8p, i32p, i8p, LLVMPointerType(op_ptr, 0)};
    LLVMValueRef fn = LLVMAddFunction(mod, fname, LLVMFunctionType(i32, graph_params, 4, 0));
    LLVMValueRef state = LLVMGetParam(fn, 0), pc = LLVMGetParam(fn, 1);
    LLVMValueRef ins = LLVMGetParam(fn, 2), ops = LLVMGetParam(fn, 3);
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

    /* step: rc = ops[table[k]](state, pc, ins + k * ins_size, 1); on while rc == 0 */
    LLVMPositionBuilderAtEnd(b, step);
    LLVMValueRef k64 = LLVMBuildZExt(b, k, i64, "");
    LLVMValueRef idx[2] = {LLVMConstInt(i64, 0, 0),
                           LLVMBuildMul(b, k64, LLVMConstInt(i64, sizeof(int32_t), 0), "")};
    LLVMValueRef op_at = LLVMBuildInBoundsGEP2(b, table_type, table, idx, 2, "");
    LLVMValueRef op_no = LLVMBuildLoad2(b, i32, LLVMBuildBitCast(b, op_at, i32p, ""), "opno");
    LLVMSetAlignment(op_no, _Alignof(int32_t));
    LLVMValueRef op_idx = LLVMBuildZExt(b, op_no, i64, "");
    LLVMValueRef op_slot = LLVMBuildInBoundsGEP2(b, op_ptr, ops, &op_idx, 1, "");
    LLVMValueRef op = LLVMBuildLoad2(b, op_ptr, op_slot, "op");
    LLVMValueRef ins_off = LLVMBuildMul(b, k64, LLVMConstInt(i64, g->ins_size, 0), "");
    LLVMValueRef args[4] = {state, pc, LLVMBuildInBoundsGEP2(b, i8, ins, &ins_off, 1, "ins"),
                            LLVMConstInt(i32, 1, 0)};
    LLVMValueRef rc = LLVMBuildCall2(b, op_type, op, args, 4, "rc");
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

/* The code of key in the LLJIT, or NULL. */
static jit_code *
code_find(const char *key)
{
    for (jit_code *c = J.codes; c != NULL; c = c->next)
        if (strcmp(c->key, key) == 0)
            return c;
    return NULL;
}

/* Link the object in buf (consumed) into the LLJIT under a resource tracker of its own and look
 * fname up in it: c->rt and c->fn are set. 0, or -1 with error[size] (nothing is left in the
 * LLJIT). */
static int
code_add_object(jit_code *c, const char *fname, LLVMMemoryBufferRef buf, char *error,
                size_t size)
{
    c->rt = LLVMOrcJITDylibCreateResourceTracker(LLVMOrcLLJITGetMainJITDylib(J.lljit));
    LLVMErrorRef err = LLVMOrcLLJITAddObjectFileWithRT(J.lljit, c->rt, buf);
    if (err) {
        describe_llvm_error(error, size, "adding the object", err);
        goto fail;
    }
    LLVMOrcExecutorAddress addr = 0;
    if ((err = LLVMOrcLLJITLookup(J.lljit, &addr, fname))) {
        describe_llvm_error(error, size, "linking", err);
        goto fail;
    }
    c->fn = (jit_graph_fn)(uintptr_t)addr;
    return 0;
fail:
    if ((err = LLVMOrcResourceTrackerRemove(c->rt)))
        LLVMConsumeError(err);
    LLVMOrcReleaseResourceTracker(c->rt);
    c->rt = NULL;
    return -1;
}

/* Emit g's code as an object file (a copy kept in g->emitted for its owner) and link it as c.
 * 0, or -1 with g->error. */
static int
code_compile(jit_graph *g, jit_code *c, const char *fname)
{
    char *msg = NULL;
    LLVMContextRef ctx = LLVMContextCreate();
    LLVMModuleRef mod = graph_module(g, ctx, fname);
    LLVMMemoryBufferRef buf = NULL;
    int rc = -1;
    if (mod == NULL)
        goto done;
    /* Verified every time: it costs 0.03 ms, and an invalid module must fail, not crash. */
    if (LLVMVerifyModule(mod, LLVMReturnStatusAction, &msg)) {
        snprintf(g->error, sizeof(g->error), "invalid IR: %s", msg);
        goto done;
    }
    LLVMDisposeMessage(msg);
    msg = NULL;
    if (LLVMTargetMachineEmitToMemoryBuffer(J.tm, mod, LLVMObjectFile, &msg, &buf)) {
        snprintf(g->error, sizeof(g->error), "emitting the object: %s", msg);
        buf = NULL;
        goto done;
    }
    size_t size = LLVMGetBufferSize(buf);
    if ((g->emitted = malloc(size ? size : 1)) == NULL) {
        snprintf(g->error, sizeof(g->error), "out of memory");
        goto done;
    }
    memcpy(g->emitted, LLVMGetBufferStart(buf), size);
    g->emitted_size = size;
    rc = code_add_object(c, fname, buf, g->error, sizeof(g->error));
    buf = NULL;                      /* the LLJIT's now, added or not */
    if (rc < 0) {
        free(g->emitted);
        g->emitted = NULL;
    }
done:
    if (buf != NULL)
        LLVMDisposeMemoryBuffer(buf);
    LLVMDisposeMessage(msg);
    if (mod != NULL)
        LLVMDisposeModule(mod);
    LLVMContextDispose(ctx);
    return rc;
}

/* Load g's object if it was given one and it links, else compile g: on success g->fn and g->code
 * are set (shared with a graph of the same key whose code is in the LLJIT already). Returns the
 * status to publish (JIT_READY, or JIT_FAILED with g->error). Compile thread, without the lock. */
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
    void *object = g->object;
    g->object = NULL;
    int status = JIT_FAILED;
    if (J.lljit == NULL) {
        snprintf(g->error, sizeof(g->error), "%s", J.lljit_error);
        goto done;
    }
    jit_code *c = code_find(g->key);
    if (c == NULL) {
        char fname[48];
        snprintf(fname, sizeof(fname), "pydron_graph_%s", g->key);
        if ((c = calloc(1, sizeof(*c))) == NULL) {
            snprintf(g->error, sizeof(g->error), "out of memory");
            goto done;
        }
        snprintf(c->key, sizeof(c->key), "%s", g->key);
        if (object != NULL) {
            LLVMMemoryBufferRef buf = LLVMCreateMemoryBufferWithMemoryRangeCopy(
                object, g->object_size, fname);
            if (code_add_object(c, fname, buf, g->error, sizeof(g->error)) == 0)
                g->loaded = 1;
            else
                g->rejected = 1;      /* compiled instead */
        }
        if (!g->loaded && code_compile(g, c, fname) < 0) {
            free(c);
            goto done;
        }
        c->next = J.codes;
        J.codes = c;
    }
    else
        g->shared = 1;
    c->refs++;
    g->code = c;
    g->fn = c->fn;
    g->compile_ms = ms_since(&t0);
    status = JIT_READY;
done:
    free(object);
    return status;
}

/* g no longer uses its code, which is freed (compile thread, without the lock) once no graph
 * does: no call can be running it. */
static void
graph_remove_code(jit_graph *g)
{
    jit_code *c = g->code;
    g->code = NULL;
    if (c == NULL || --c->refs > 0)
        return;
    for (jit_code **at = &J.codes; *at != NULL; at = &(*at)->next)
        if (*at == c) {
            *at = c->next;
            break;
        }
    LLVMErrorRef err = LLVMOrcResourceTrackerRemove(c->rt);
    if (err)
        LLVMConsumeError(err);      /* the code stays mapped: only memory is lost */
    LLVMOrcReleaseResourceTracker(c->rt);
    free(c);
}

static void
graph_free(jit_graph *g)
{
    free(g->ops);
    free(g->object);
    free(g->emitted);
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
        J.rejected += g->rejected;
        if (status == JIT_READY && g->loaded)
            J.loaded++;
        else if (status == JIT_READY && g->shared)
            J.shared++;
        else if (status == JIT_READY)
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

static char *make_environment(uint64_t ops_hash);

int
jit_set_ops(const jit_op_fn *fns, const char *const *names, int n)
{
    if (J.nops != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pydron.jit: the operations are set already");
        return -1;
    }
    uint64_t h = 0;
    for (int k = 0; k < n; k++)
        h = XXH3_64bits_withSeed(names[k], strlen(names[k]) + 1, h);
    if ((J.environment = make_environment(h)) == NULL) {
        PyErr_NoMemory();
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

const jit_op_fn *
jit_operations(void)
{
    return J.op_fns;
}

const char *
jit_environment(void)
{
    return J.environment;
}

/* When this file was compiled: what graph_module emits may change from one build to the next
 * without pydron's version changing (a developer's tree), and an object made by another build
 * must not be linked. */
#define JIT_BUILD __DATE__ " " __TIME__

/* "llvm …; triple …; cpu …; features …; python …; codegen …; ops …; build …" (malloc'd), or
 * NULL. */
static char *
make_environment(uint64_t ops_hash)
{
    char *triple = LLVMGetDefaultTargetTriple();
    char *cpu = LLVMGetHostCPUName(), *features = LLVMGetHostCPUFeatures();
    const char *fmt = "llvm %s; triple %s; cpu %s; features %s; python %s; codegen %d; "
                      "ops %016llx; build %s";
    int len = snprintf(NULL, 0, fmt, LLVM_VERSION_STRING, triple, cpu, features, PY_VERSION,
                       (int)GRAPH_CODEGEN_LEVEL, (unsigned long long)ops_hash, JIT_BUILD);
    char *env = len < 0 ? NULL : malloc((size_t)len + 1);
    if (env != NULL)
        snprintf(env, (size_t)len + 1, fmt, LLVM_VERSION_STRING, triple, cpu, features,
                 PY_VERSION, (int)GRAPH_CODEGEN_LEVEL, (unsigned long long)ops_hash, JIT_BUILD);
    LLVMDisposeMessage(triple);
    LLVMDisposeMessage(cpu);
    LLVMDisposeMessage(features);
    return env;
}

jit_graph *
jit_graph_new(const int *ops, int n, size_t ins_size)
{
    jit_graph *g = calloc(1, sizeof(*g));
    if (g == NULL || (g->ops = malloc((size_t)n * sizeof(int32_t) + 1)) == NULL) {
        free(g);
        PyErr_NoMemory();
        return NULL;
    }
    for (int k = 0; k < n; k++)
        g->ops[k] = ops[k];
    g->n = n;
    g->ins_size = ins_size;
    atomic_store(&g->status, JIT_QUEUED);
    /* what the code depends on: the environment, then its shape, then the steps */
    const char *env = J.environment ? J.environment : "";
    uint64_t shape[3] = {ins_size, (uint64_t)J.nops, (uint64_t)n};
    uint64_t h = XXH3_64bits_withSeed(env, strlen(env), 0);
    h = XXH3_64bits_withSeed(shape, sizeof(shape), h);
    h = XXH3_64bits_withSeed(g->ops, (size_t)n * sizeof(int32_t), h);
    snprintf(g->key, sizeof(g->key), "%016llx", (unsigned long long)h);
    return g;
}

const char *
jit_graph_key(jit_graph *g)
{
    return g->key;
}

/* Fail g with why (not queued). */
static void
graph_fail(jit_graph *g, const char *why)
{
    snprintf(g->error, sizeof(g->error), "%s", why);
    atomic_store(&g->status, JIT_FAILED);
}

void
jit_graph_start(jit_graph *g, const void *object, size_t size, int wait)
{
    for (int k = 0; k < g->n; k++)
        if (g->ops[k] < 0 || g->ops[k] >= J.nops) {
            char why[64];
            snprintf(why, sizeof(why), "step %d: no operation %d", k, g->ops[k]);
            graph_fail(g, why);
            return;
        }
    if (object != NULL && (g->object = malloc(size ? size : 1)) != NULL) {
        memcpy(g->object, object, size);      /* (out of memory: compiled instead) */
        g->object_size = size;
    }
    pthread_mutex_lock(&J.lock);
    g->started = 1;
    g->id = ++J.next_id;
    const char *why = J.forked ? "not in a forked process" : J.stopping ? "shut down"
                      : J.nops == 0 ? "no operations" : NULL;
    if (why == NULL && !J.started && start_thread() < 0)
        why = "the compile thread could not start";
    if (why != NULL)
        graph_fail(g, why);
    else {
        enqueue(g);
        while (wait && !J.paused && atomic_load(&g->status) == JIT_QUEUED)
            pthread_cond_wait(&J.done, &J.lock);
    }
    pthread_mutex_unlock(&J.lock);
}

void *
jit_graph_take_object(jit_graph *g, size_t *size)
{
    if (atomic_load_explicit(&g->status, memory_order_acquire) != JIT_READY)
        return NULL;
    void *object = g->emitted;
    *size = g->emitted_size;
    g->emitted = NULL;
    return object;
}

int
jit_graph_loaded(jit_graph *g)
{
    return atomic_load_explicit(&g->status, memory_order_acquire) == JIT_READY && g->loaded;
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
    if (!g->started && s == JIT_QUEUED) {
        graph_free(g);                /* never queued */
    }
    else if (s == JIT_QUEUED && thread) {
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

/* _jit_info() -> dict: the compile thread and its counts (compiled; object_hits: loaded from an
 * object file instead; object_rejected: an object file that did not link, compiled instead;
 * shared: the code of a graph of the same key already in this process), what making the LLJIT
 * took at the first compile (setup_ms; a graph's compile_ms leaves it out) and what compiled code
 * depends on (environment) (tests, pydron info). */
static PyObject *
jit_info(PyObject *module, PyObject *noargs)
{
    pthread_mutex_lock(&J.lock);
    long tid = J.started ? J.thread_id : 0;
    unsigned long long compiled = J.compiled, failed = J.failed, loaded = J.loaded;
    unsigned long long rejected = J.rejected, shared = J.shared;
    int forked = J.forked, paused = J.paused;
    double setup_ms = compiled + failed + loaded + shared > 0 ? J.setup_ms : 0.0;
    pthread_mutex_unlock(&J.lock);
    return Py_BuildValue("{sssNsKsKsKsKsKsOsOsdss}", "llvm", LLVM_VERSION_STRING, "thread_id",
                         tid ? PyLong_FromLong(tid) : Py_NewRef(Py_None), "compiled", compiled,
                         "failed", failed, "object_hits", loaded, "object_rejected", rejected,
                         "shared", shared, "forked", forked ? Py_True : Py_False, "paused",
                         paused ? Py_True : Py_False, "setup_ms", setup_ms, "environment",
                         J.environment ? J.environment : "");
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
