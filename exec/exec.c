/* placeholder: being written */
#include "exec/exec.h"
int exec_module_init(PyObject *module) { return 0; }
