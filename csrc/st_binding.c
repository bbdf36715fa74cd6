/* st_binding.c: the binding helpers shared by module.c, st_write.c and legacy_module.c:
 * exception types, the torch objects from init(), engine/errno/ATen errors as exceptions. */
#include "st_binding.h"

#include <errno.h>
#include <stdarg.h>

/* ---- state ---- */

static PyObject *SafetensorError;   /* subclass of ValueError */
static PyObject *SharedMemoryError; /* subclass of RuntimeError: tensors to save overlap */
static PyObject *steal_handles_fn;  /* torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs */
static PyObject *make_handles_fn;   /* torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors */
static PyObject *tensor_type;       /* torch.Tensor */

/* Creates the module's exception types and adds them to the module (PyInit__C). */
int st_py_errors_register(PyObject *m)
{
    PyObject *code = NULL;
    int bad;
    SafetensorError = PyErr_NewExceptionWithDoc(
        "torch_safetensors.SafetensorError",
        "A safetensors file or buffer is malformed; the message says which rule failed.",
        PyExc_ValueError, NULL);
    if (!SafetensorError || PyModule_AddObjectRef(m, "SafetensorError", SafetensorError) < 0)
        return -1;
    SharedMemoryError = PyErr_NewExceptionWithDoc(
        "torch_safetensors.SharedMemoryError",
        "Tensors given to save_file share memory; they would load back as separate copies.",
        PyExc_RuntimeError, NULL);
    if (!SharedMemoryError ||
        PyModule_AddObjectRef(m, "SharedMemoryError", SharedMemoryError) < 0)
        return -1;
    /* defaults, so every SafetensorError has code, tensor and position */
    code = PyUnicode_FromString("error");
    bad = !code || PyObject_SetAttrString(SafetensorError, "code", code) < 0 ||
          PyObject_SetAttrString(SafetensorError, "tensor", Py_None) < 0 ||
          PyObject_SetAttrString(SafetensorError, "position", Py_None) < 0;
    Py_XDECREF(code);
    return bad ? -1 : 0;
}

/* Keeps the torch objects that init() received; a later init() replaces them. */
void st_py_set_torch(PyObject *steal, PyObject *make, PyObject *ttype)
{
    Py_XSETREF(steal_handles_fn, steal == Py_None ? NULL : Py_NewRef(steal));
    Py_XSETREF(make_handles_fn, make == Py_None ? NULL : Py_NewRef(make));
    Py_XSETREF(tensor_type, Py_NewRef(ttype));
}

/* torch.Tensor, or NULL before init() (borrowed). */
PyObject *st_py_tensor_type(void)
{
    return tensor_type;
}

/* The tensors -> handles function of torch 2.11-2.13, or NULL (borrowed). */
PyObject *st_py_make_handles_fn(void)
{
    return make_handles_fn;
}

/* The handles -> tensors function of torch 2.11-2.13, or NULL (borrowed). */
PyObject *st_py_steal_handles_fn(void)
{
    return steal_handles_fn;
}

/* SharedMemoryError (borrowed). */
PyObject *st_py_shared_memory_error(void)
{
    return SharedMemoryError;
}

/* ---- errors ---- */

static const char *code_name(st_code code)
{
    switch (code) {
    case ST_ERR_TOO_SMALL: return "too_small";
    case ST_ERR_HEADER_TOO_LARGE: return "header_too_large";
    case ST_ERR_HEADER_PAST_END: return "header_past_end";
    case ST_ERR_UTF8: return "utf8";
    case ST_ERR_JSON: return "json";
    case ST_ERR_SCHEMA: return "schema";
    case ST_ERR_DUPLICATE: return "duplicate";
    case ST_ERR_DEPTH: return "depth";
    case ST_ERR_DTYPE: return "dtype";
    case ST_ERR_OFFSETS: return "offsets";
    case ST_ERR_OVERFLOW: return "overflow";
    case ST_ERR_MISALIGNED: return "misaligned";
    case ST_ERR_SIZE_MISMATCH: return "size_mismatch";
    case ST_ERR_FILE_LENGTH: return "file_length";
    case ST_ERR_INVALID_ARGUMENT: return "invalid_argument";
    default: return "error";
    }
}

/* Raises SafetensorError with its attributes: code (a short rule name), tensor
 * (the name, or None) and position (a byte offset, or None). Steals msg. */
PyObject *st_py_raise_safetensor(PyObject *msg, const char *code, PyObject *tensor,
                                 int64_t pos)
{
    PyObject *exc = NULL, *tmp = NULL;
    if (!msg)
        return NULL;
    exc = PyObject_CallOneArg(SafetensorError, msg);
    if (!exc)
        goto done;
    tmp = PyUnicode_FromString(code);
    if (!tmp || PyObject_SetAttrString(exc, "code", tmp) < 0)
        goto done;
    Py_CLEAR(tmp);
    if (PyObject_SetAttrString(exc, "tensor", tensor ? tensor : Py_None) < 0)
        goto done;
    tmp = pos >= 0 ? PyLong_FromLongLong(pos) : Py_NewRef(Py_None);
    if (!tmp || PyObject_SetAttrString(exc, "position", tmp) < 0)
        goto done;
    PyErr_SetObject(SafetensorError, exc);
done:
    Py_XDECREF(tmp);
    Py_XDECREF(exc);
    Py_DECREF(msg);
    return NULL;
}

/* Raises SafetensorError about one tensor, with a printf-style message. */
PyObject *st_py_raise_tensor_error(const char *code, PyObject *name, const char *fmt, ...)
{
    va_list ap;
    PyObject *detail, *msg;
    if (!name)
        return NULL;
    va_start(ap, fmt);
    detail = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (!detail)
        return NULL;
    msg = PyUnicode_FromFormat("tensor %R: %U", name, detail);
    Py_DECREF(detail);
    return st_py_raise_safetensor(msg, code, name, -1);
}

/* Raises SafetensorError (or MemoryError) from an engine error. The message
 * names the tensor and the byte position when they are known. */
PyObject *st_py_raise_st(const st_error *err, const char *context)
{
    PyObject *msg, *name = NULL;
    if (err->code == ST_ERR_NOMEM)
        return PyErr_NoMemory();
    if (err->tensor_len || err->tensor[0]) {
        name = PyUnicode_DecodeUTF8(err->tensor, (Py_ssize_t)err->tensor_len, "replace");
        if (!name)
            return NULL;
    }
    if (name && err->pos >= 0)
        msg = PyUnicode_FromFormat("%s: tensor %R: %s (at byte %lld)", context, name,
                                   err->message, (long long)err->pos);
    else if (name)
        msg = PyUnicode_FromFormat("%s: tensor %R: %s", context, name, err->message);
    else if (err->pos >= 0)
        msg = PyUnicode_FromFormat("%s: %s (at byte %lld)", context, err->message,
                                   (long long)err->pos);
    else
        msg = PyUnicode_FromFormat("%s: %s", context, err->message);
    st_py_raise_safetensor(msg, code_name(err->code), name, err->pos);
    Py_XDECREF(name);
    return NULL;
}

/* Raises OSError from an errno, naming the path when given. */
PyObject *st_py_raise_errno(int saved_errno, PyObject *path)
{
    errno = saved_errno;
    if (path)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* A failed ATen call: torch's own message when the ABI offers it. */
PyObject *st_py_raise_aten(PyObject *type, const char *what, PyObject *name)
{
    const char *detail = st_aten.last_error ? st_aten.last_error() : NULL;
    if (name)
        PyErr_Format(type, "%s for tensor %R%s%s", what, name, detail ? ": " : "",
                     detail ? detail : "");
    else
        PyErr_Format(type, "%s%s%s", what, detail ? ": " : "", detail ? detail : "");
    return NULL;
}

/* ---- handles to Python tensors ---- */

/* Converts n handles into a list of tensors. The handles are consumed (set to
 * NULL) whatever the outcome, except when torch fails after taking ownership. */
PyObject *st_py_wrap_handles(st_tensor *h, Py_ssize_t n)
{
    PyObject *list = NULL, *caps = NULL;
    if (st_aten.to_pyobject) {
        list = PyList_New(n);
        if (!list)
            goto error;
        for (Py_ssize_t i = 0; i < n; i++) {
            void *obj = NULL;
            if (st_aten.to_pyobject(h[i], NULL, &obj) != 0 || !obj) {
                if (!PyErr_Occurred())
                    st_py_raise_aten(PyExc_RuntimeError, "could not wrap a tensor", NULL);
                goto error;
            }
            PyList_SET_ITEM(list, i, (PyObject *)obj);
            st_aten.delete_tensor(h[i]);
            h[i] = NULL;
        }
        return list;
    }
    if (!steal_handles_fn) {
        PyErr_SetString(PyExc_RuntimeError, "torch offers no way to wrap tensor handles");
        goto error;
    }
    caps = PyList_New(n);
    if (!caps)
        goto error;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cap = PyCapsule_New(h[i], NULL, NULL);
        if (!cap)
            goto error;
        PyList_SET_ITEM(caps, i, cap);
    }
    list = PyObject_CallOneArg(steal_handles_fn, caps);
    Py_DECREF(caps);
    caps = NULL;
    /* torch owns the handles from here; on failure some may leak, never double-free */
    for (Py_ssize_t i = 0; i < n; i++)
        h[i] = NULL;
    if (list && (!PyList_Check(list) || PyList_GET_SIZE(list) != n)) {
        Py_DECREF(list);
        PyErr_SetString(PyExc_RuntimeError, "torch returned an unexpected tensor list");
        return NULL;
    }
    return list;
error:
    Py_XDECREF(list);
    Py_XDECREF(caps);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (h[i])
            st_aten.delete_tensor(h[i]);
        h[i] = NULL;
    }
    return NULL;
}
