/* jit/jit.h — LLVM (ORC LLJIT through the C API): native code for the replay glue of hot graphs.
 * Today it holds the LLVM plumbing the rest builds on: the version in use and a self-test that
 * compiles and runs a function, proving the linked libLLVM works on this machine. */
#ifndef PYDRON_JIT_H
#define PYDRON_JIT_H

#include <Python.h>

const char *jit_llvm_version(void);
int jit_module_init(PyObject *module);

#endif
