/* st_aten.c: finds libtorch's stable C ABI in the running process and reads its
 * dtype and device codes from the getters (never hard-coded). */
#define _GNU_SOURCE
#include "st_aten.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

st_aten_api st_aten;
static void *cpu_lib; /* libtorch_cpu, once found */

/* ---- symbol lookup ---- */

static void *sym(void *lib, const char *name)
{
    return lib ? dlsym(lib, name) : NULL;
}

/* dlsym returns void *; copying the bytes keeps ISO C's function pointer rules */
#define LOAD(lib, field, name)                                                                 \
    do {                                                                                       \
        void *s_ = sym(lib, name);                                                             \
        memcpy(&st_aten.field, &s_, sizeof(s_));                                               \
    } while (0)

typedef int32_t (*code_getter)(void);

static int32_t code(void *lib, const char *name, const char *alt)
{
    void *s = sym(lib, name);
    code_getter g;
    if (!s && alt)
        s = sym(lib, alt);
    if (!s)
        return -1;
    memcpy(&g, &s, sizeof(s));
    return g();
}

int st_aten_init(const char *libtorch_cpu, const char *libtorch_python, char *msg, size_t n)
{
    void *cpu, *py = NULL;
    static const struct {
        st_dtype dtype;
        const char *name, *alt;
    } dtypes[] = {
        {ST_BOOL, "aoti_torch_dtype_bool", NULL},
        {ST_U8, "aoti_torch_dtype_uint8", NULL},
        {ST_I8, "aoti_torch_dtype_int8", NULL},
        {ST_I16, "aoti_torch_dtype_int16", NULL},
        {ST_U16, "aoti_torch_dtype_uint16", NULL},
        {ST_F16, "aoti_torch_dtype_float16", NULL},
        {ST_BF16, "aoti_torch_dtype_bfloat16", NULL},
        {ST_I32, "aoti_torch_dtype_int32", NULL},
        {ST_U32, "aoti_torch_dtype_uint32", NULL},
        {ST_F32, "aoti_torch_dtype_float32", NULL},
        {ST_F64, "aoti_torch_dtype_float64", NULL},
        {ST_I64, "aoti_torch_dtype_int64", NULL},
        {ST_U64, "aoti_torch_dtype_uint64", NULL},
        {ST_C64, "aoti_torch_dtype_complex64", NULL},
        {ST_F8_E4M3, "aoti_torch_dtype_float8_e4m3fn", NULL},
        {ST_F8_E5M2, "aoti_torch_dtype_float8_e5m2", NULL},
        {ST_F8_E4M3FNUZ, "aoti_torch_dtype_float8_e4m3fnuz", NULL},
        {ST_F8_E5M2FNUZ, "aoti_torch_dtype_float8_e5m2fnuz", NULL},
        {ST_F8_E8M0, "aoti_torch_dtype_float8_e8m0fnu", "torch_dtype_float8_e8m0fnu"},
        {ST_F4, "aoti_torch_dtype_float4_e2m1fn_x2", "torch_dtype_float4_e2m1fn_x2"},
    };

    memset(&st_aten, 0, sizeof(st_aten));
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        st_aten.dtype[i] = -1;
    /* torch._C loads libtorch RTLD_LOCAL, so RTLD_DEFAULT cannot see it: ask for
     * the already-loaded library by path */
    cpu = dlopen(libtorch_cpu, RTLD_NOW | RTLD_NOLOAD);
    if (!cpu) {
        snprintf(msg, n, "libtorch is not loaded from %s: %s", libtorch_cpu, dlerror());
        return -1;
    }
    cpu_lib = cpu;
    if (libtorch_python)
        py = dlopen(libtorch_python, RTLD_NOW | RTLD_NOLOAD);

    LOAD(cpu, from_blob, "torch_from_blob");
    LOAD(cpu, empty_strided, "aoti_torch_empty_strided");
    LOAD(cpu, delete_tensor, "aoti_torch_delete_tensor_object");
    LOAD(cpu, copy_, "aoti_torch_copy_");
    LOAD(cpu, reinterpret, "aoti_torch__reinterpret_tensor");
    LOAD(cpu, get_data_ptr, "aoti_torch_get_data_ptr");
    LOAD(cpu, get_dim, "aoti_torch_get_dim");
    LOAD(cpu, get_sizes, "aoti_torch_get_sizes");
    LOAD(cpu, get_strides, "aoti_torch_get_strides");
    LOAD(cpu, get_dtype, "aoti_torch_get_dtype");
    LOAD(cpu, get_device_type, "aoti_torch_get_device_type");
    LOAD(cpu, get_device_index, "aoti_torch_get_device_index");
    LOAD(cpu, get_layout, "aoti_torch_get_layout");
    LOAD(cpu, is_contiguous, "aoti_torch_is_contiguous");
    LOAD(cpu, get_numel, "aoti_torch_get_numel");
    LOAD(cpu, dtype_element_size, "aoti_torch_dtype_element_size");
    LOAD(cpu, last_error, "torch_exception_get_what_without_backtrace");
    /* 2.14+: direct handle <-> Python conversion; look in both libraries */
    LOAD(py, to_pyobject, "torch_tensor_to_pyobject");
    if (!st_aten.to_pyobject)
        LOAD(cpu, to_pyobject, "torch_tensor_to_pyobject");
    LOAD(py, from_pyobject, "torch_tensor_from_pyobject");
    if (!st_aten.from_pyobject)
        LOAD(cpu, from_pyobject, "torch_tensor_from_pyobject");

    for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++)
        st_aten.dtype[dtypes[i].dtype] = code(cpu, dtypes[i].name, dtypes[i].alt);
    st_aten.device_cpu = code(cpu, "aoti_torch_device_type_cpu", NULL);
    st_aten.device_meta = code(cpu, "aoti_torch_device_type_meta", NULL);
    st_aten.layout_strided = code(cpu, "aoti_torch_layout_strided", NULL);

    st_aten.ready = st_aten.empty_strided && st_aten.delete_tensor && st_aten.copy_ &&
                    st_aten.reinterpret &&
                    st_aten.get_data_ptr && st_aten.get_dim && st_aten.get_sizes &&
                    st_aten.get_strides && st_aten.get_dtype && st_aten.get_device_type &&
                    st_aten.get_device_index && st_aten.get_layout && st_aten.is_contiguous &&
                    st_aten.get_numel && st_aten.dtype_element_size &&
                    st_aten.device_cpu >= 0 && st_aten.device_meta >= 0 &&
                    st_aten.layout_strided >= 0;
    /* the handles stay open: libtorch lives as long as the process */
    return 0;
}

int st_aten_dtype_to_st(int32_t c)
{
    if (c < 0)
        return -1;
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (st_aten.dtype[i] == c)
            return i;
    return -1;
}

int32_t st_aten_code(const char *getter)
{
    return code(cpu_lib, getter, NULL);
}
