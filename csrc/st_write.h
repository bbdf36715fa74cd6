/* st_write.h: the write pipeline (plan, stage, vectored writes, the save binding) and
 * the buffers that streams and snapshots read and fill: tensor memory as Python buffers. */
#ifndef ST_WRITE_H
#define ST_WRITE_H

#include <Python.h>

#include "st_engine.h"

/* Adds save, snapshot, tensor_memory, parse_header and the Span type to the module.
 * Returns 0, or -1 with an exception set. */
int st_write_register(PyObject *module);

/* ---- provided by module.c, the one place errors become exceptions ---- */

/* torch.Tensor once init() ran, else NULL (borrowed). */
PyObject *st_py_tensor_type(void);
/* torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors, or NULL (borrowed). */
PyObject *st_py_make_handles_fn(void);
/* SharedMemoryError (borrowed). */
PyObject *st_py_shared_memory_error(void);
/* Raises type with torch's last message; returns NULL. */
PyObject *st_py_raise_aten(PyObject *type, const char *what, PyObject *name);
/* Raises OSError from an errno (with path when not NULL); returns NULL. */
PyObject *st_py_raise_errno(int saved_errno, PyObject *path);
/* Raises SafetensorError (or MemoryError) from an engine error; returns NULL. */
PyObject *st_py_raise_st(const st_error *err, const char *context);

#endif
