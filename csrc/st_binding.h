/* st_binding.h: the binding helpers that every Python-facing C file shares: the module's
 * exception types, the torch objects handed over by init(), errors as exceptions. */
#ifndef ST_BINDING_H
#define ST_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "st_aten.h"
#include "st_engine.h"

/* ---- state: exception types and torch objects ---- */

/* Creates SafetensorError and SharedMemoryError and adds them to the module.
 * Returns 0, or -1 with an exception set. */
int st_py_errors_register(PyObject *module);

/* Keeps the torch objects that init() receives (steal and make may be Py_None). */
void st_py_set_torch(PyObject *steal_handles, PyObject *make_handles, PyObject *tensor_type);

/* torch.Tensor once init() ran, else NULL (borrowed). */
PyObject *st_py_tensor_type(void);
/* torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors, or NULL (borrowed). */
PyObject *st_py_make_handles_fn(void);
/* torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs, or NULL (borrowed). */
PyObject *st_py_steal_handles_fn(void);
/* SharedMemoryError (borrowed). */
PyObject *st_py_shared_memory_error(void);

/* ---- errors: the one place C errors become exceptions ---- */

/* Raises SafetensorError with attributes code, tensor (or None) and position (or None
 * when pos < 0). Steals msg; returns NULL. */
PyObject *st_py_raise_safetensor(PyObject *msg, const char *code, PyObject *tensor,
                                 int64_t pos);
/* Raises SafetensorError about one tensor, with a printf-style message; returns NULL. */
PyObject *st_py_raise_tensor_error(const char *code, PyObject *name, const char *fmt, ...);
/* Raises SafetensorError (or MemoryError) from an engine error; returns NULL. */
PyObject *st_py_raise_st(const st_error *err, const char *context);
/* Raises OSError from an errno (with path when not NULL); returns NULL. */
PyObject *st_py_raise_errno(int saved_errno, PyObject *path);
/* Raises type with torch's last message; returns NULL. */
PyObject *st_py_raise_aten(PyObject *type, const char *what, PyObject *name);

/* ---- handles ---- */

/* Turns n handles into a list of tensors. The handles are consumed (set to NULL)
 * whatever the outcome; returns NULL with an exception on failure. */
PyObject *st_py_wrap_handles(st_tensor *h, Py_ssize_t n);

#endif
