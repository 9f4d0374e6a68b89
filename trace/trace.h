/* trace/trace.h — what the rest of pydron may call in trace/: module set-up only. The tracing
 * itself is reached from rewritten bytecode through the module's helper functions. */
#ifndef PYDRON_TRACE_H
#define PYDRON_TRACE_H

#include <Python.h>

int trace_module_init(PyObject *module);

#endif
