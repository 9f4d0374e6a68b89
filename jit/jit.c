/* jit/jit.c — LLVM ORC LLJIT plumbing: build an IR module, hand it to an LLJIT, look a symbol up
 * and call it. `_jit_add(a, b)` compiles `i64 add(i64, i64)` once and calls it: the self-test
 * that the JIT path links and runs here. */
#include "jit/jit.h"

#include <llvm-c/Core.h>
#include <llvm-c/Error.h>
#include <llvm-c/LLJIT.h>
#include <llvm-c/Orc.h>
#include <llvm-c/Target.h>
#include <llvm/Config/llvm-config.h>

typedef int64_t (*add_fn)(int64_t, int64_t);

static LLVMOrcLLJITRef jit;
static add_fn jitted_add;

const char *
jit_llvm_version(void)
{
    return LLVM_VERSION_STRING;
}

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
    if ((err = LLVMOrcCreateLLJIT(&jit, NULL)))
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
    LLVMOrcJITDylibRef dylib = LLVMOrcLLJITGetMainJITDylib(jit);
    if ((err = LLVMOrcLLJITAddLLVMIRModule(jit, dylib, tsm))) {
        LLVMOrcDisposeThreadSafeModule(tsm);
        return raise_llvm_error("adding the module", err);
    }
    LLVMOrcExecutorAddress addr;
    if ((err = LLVMOrcLLJITLookup(jit, &addr, "pydron_add")))
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

static PyMethodDef jit_methods[] = {
    {"_jit_add", jit_add, METH_VARARGS, "_jit_add(a, b): a + b computed by LLVM-compiled code."},
    {NULL},
};

int
jit_module_init(PyObject *module)
{
    return PyModule_AddFunctions(module, jit_methods);
}
