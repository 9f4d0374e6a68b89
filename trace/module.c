/* trace/module.c — the pydron._core extension module: gathers what each subsystem adds. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "exec/exec.h"

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "pydron._core", "pydron's C core.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL)
        return NULL;
    if (exec_module_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
