/* st_aten.h: the ATen binding: libtorch's stable C ABI found at import time with
 * dlopen/dlsym. Its headers are C++-only, so the prototypes we use are declared here. */
#ifndef ST_ATEN_H
#define ST_ATEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "st_engine.h"

typedef struct AtenTensorOpaque *st_tensor;
typedef int32_t st_aten_err; /* 0 is success */

/* ---- the functions we use, all optional: presence is detected ---- */

typedef struct {
    /* tensor creation */
    st_aten_err (*from_blob)(void *data, int64_t ndim, const int64_t *sizes,
                             const int64_t *strides, int64_t storage_offset, int32_t dtype,
                             int32_t device_type, int32_t device_index, st_tensor *ret,
                             int32_t layout, const uint8_t *opaque_metadata,
                             int64_t opaque_metadata_size,
                             void (*deleter)(void *data, void *ctx), void *deleter_ctx);
    st_aten_err (*empty_strided)(int64_t ndim, const int64_t *sizes, const int64_t *strides,
                                 int32_t dtype, int32_t device_type, int32_t device_index,
                                 st_tensor *ret);
    st_aten_err (*delete_tensor)(st_tensor t);
    st_aten_err (*copy_)(st_tensor self, st_tensor src, int32_t non_blocking);
    /* a view of self; offset_increment adds to self's own storage offset */
    st_aten_err (*reinterpret)(st_tensor self, int64_t ndim, const int64_t *sizes,
                               const int64_t *strides, int64_t offset_increment, st_tensor *ret);
    /* introspection */
    st_aten_err (*get_data_ptr)(st_tensor t, void **ret);
    st_aten_err (*get_dim)(st_tensor t, int64_t *ret);
    st_aten_err (*get_sizes)(st_tensor t, int64_t **ret);
    st_aten_err (*get_strides)(st_tensor t, int64_t **ret);
    st_aten_err (*get_dtype)(st_tensor t, int32_t *ret);
    st_aten_err (*get_device_type)(st_tensor t, int32_t *ret);
    st_aten_err (*get_device_index)(st_tensor t, int32_t *ret);
    st_aten_err (*get_layout)(st_tensor t, int32_t *ret);
    st_aten_err (*is_contiguous)(st_tensor t, bool *ret);
    st_aten_err (*get_numel)(st_tensor t, int64_t *ret);
    size_t (*dtype_element_size)(int32_t dtype);
    const char *(*last_error)(void); /* 2.13+: the calling thread's last torch error */
    /* Python conversion, torch 2.14+ (libtorch_python) */
    st_aten_err (*to_pyobject)(st_tensor t, void *py_type, void **ret);
    st_aten_err (*from_pyobject)(void *py_obj, st_tensor *ret);

    /* codes read from the getters at init; -1 when torch lacks the dtype */
    int32_t dtype[ST_DTYPE_COUNT];
    int32_t device_cpu, device_meta;
    int32_t layout_strided;
    int ready;         /* the core functions above were found */
} st_aten_api;

extern st_aten_api st_aten;

/* Loads symbols from the already-loaded libtorch_cpu (and libtorch_python when
 * given). Returns 0, or -1 with a message in msg. */
int st_aten_init(const char *libtorch_cpu, const char *libtorch_python, char *msg, size_t n);

/* The code an ATen getter returns (e.g. aoti_torch_dtype_complex128), or -1. */
int32_t st_aten_code(const char *getter);

/* The st_dtype of a torch dtype code, or -1 if the format has none. */
int st_aten_dtype_to_st(int32_t code);

#endif
