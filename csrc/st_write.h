/* st_write.h: the write pipeline (plan, stage, vectored writes, the save binding) and
 * the buffers that streams and snapshots read and fill: tensor memory as Python buffers. */
#ifndef ST_WRITE_H
#define ST_WRITE_H

#include <Python.h>

#include "st_engine.h"

/* Adds save, snapshot, tensor_memory, parse_header and the Span type to the module.
 * Returns 0, or -1 with an exception set. */
int st_write_register(PyObject *module);

#endif
