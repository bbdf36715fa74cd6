/* legacy_module.h: the Python binding of the legacy checkpoint engine (st_pickle.c),
 * registered on torch_safetensors._C by module.c. */
#ifndef LEGACY_MODULE_H
#define LEGACY_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "st_aten.h"

/* Adds legacy_init and legacy_load to the module. Returns 0, or -1 with an exception. */
int st_legacy_register(PyObject *module);

#endif
