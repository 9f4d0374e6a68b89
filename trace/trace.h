/* trace/trace.h — trace/ is the top of the C core: it defines the extension module
 * pydron._core (PyInit__core in trace/module.c), the entry into scheduled code (vectorcall or
 * the PEP 523 hook) and the helpers rewritten bytecode calls. No other folder calls into it, so
 * it exports nothing to C; its internals are in trace/internal.h. */
#ifndef PYDRON_TRACE_H
#define PYDRON_TRACE_H

#include <Python.h>

PyMODINIT_FUNC PyInit__core(void);

#endif
