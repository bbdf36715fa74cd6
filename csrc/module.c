/* module.c: the Python face of the C core: the Reader and Mapping types and the module's
 * functions; it registers st_write.c and legacy_module.c. Errors go through st_binding.c. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "st_aten.h"
#include "st_binding.h"
#include "st_engine.h"
#include "st_file.h"
#include "legacy_module.h"
#include "st_hash.h"
#include "st_write.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "torch_safetensors supports little-endian hosts only: the format stores little-endian data"
#endif

/* ---- module state ---- */

static int zero_copy_enabled = 1;   /* cleared to force the frombuffer fallback */

/* ---- Mapping: a buffer-exporting view of a blob (the frombuffer fallback) ---- */

typedef struct {
    PyObject_HEAD
    st_blob *blob; /* a reference: the mapping outlives every export of this object */
} Mapping;

static PyTypeObject Mapping_Type;

static PyObject *Mapping_new(st_blob *blob)
{
    Mapping *m = PyObject_New(Mapping, &Mapping_Type);
    if (!m)
        return NULL;
    st_blob_incref(blob);
    m->blob = blob;
    return (PyObject *)m;
}

static void Mapping_dealloc(Mapping *m)
{
    if (m->blob)
        st_blob_decref(m->blob);
    PyObject_Free(m);
}

static int Mapping_getbuffer(Mapping *m, Py_buffer *view, int flags)
{
    /* private mapping: writes stay in this process */
    return PyBuffer_FillInfo(view, (PyObject *)m, m->blob->base, (Py_ssize_t)m->blob->len, 0,
                             flags);
}

static Py_ssize_t Mapping_len(Mapping *m)
{
    return (Py_ssize_t)m->blob->len;
}

static PyBufferProcs Mapping_as_buffer = {
    (getbufferproc)Mapping_getbuffer,
    NULL,
};

static PySequenceMethods Mapping_as_sequence = {
    .sq_length = (lenfunc)Mapping_len,
};

static PyTypeObject Mapping_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "torch_safetensors._C.Mapping",
    .tp_basicsize = sizeof(Mapping),
    .tp_dealloc = (destructor)Mapping_dealloc,
    .tp_as_buffer = &Mapping_as_buffer,
    .tp_as_sequence = &Mapping_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A private, writable mapping of a validated safetensors file.",
};

/* ---- Reader: a validated file and its table ---- */

typedef struct {
    PyObject_HEAD
    st_table table;
    st_blob *blob;          /* the private mapping, or NULL */
    int fd;                 /* kept for positioned reads when not mapped, else -1 */
    Py_buffer view;         /* bytes being read, when view.obj is set */
    const uint8_t *data;    /* the data buffer in memory, or NULL when read from fd */
    uint64_t file_size;
    PyObject *path;
    int ready;
    int busy;               /* reads running without the GIL */
    int closing;            /* close() came while busy: the last read releases */
} Reader;

static PyTypeObject Reader_Type;

enum { DEV_CPU, DEV_META };

static int Reader_check_open(Reader *r)
{
    if (!r->ready) {
        PyErr_SetString(PyExc_ValueError, "the file is closed");
        return -1;
    }
    return 0;
}

static void Reader_release(Reader *r)
{
    r->ready = 0;
    if (r->busy) {
        /* another thread reads from the table, fd or mapping without the GIL */
        r->closing = 1;
        return;
    }
    r->closing = 0;
    st_table_free(&r->table);
    if (r->blob) {
        st_blob_decref(r->blob);
        r->blob = NULL;
    }
    if (r->fd >= 0) {
        close(r->fd);
        r->fd = -1;
    }
    if (r->view.obj)
        PyBuffer_Release(&r->view);
    r->data = NULL;
}

static void Reader_dealloc(Reader *r)
{
    Reader_release(r);
    Py_XDECREF(r->path);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Reader_alloc(PyTypeObject *type)
{
    Reader *r = (Reader *)type->tp_alloc(type, 0);
    if (!r)
        return NULL;
    st_table_init(&r->table);
    r->blob = NULL;
    r->fd = -1;
    r->view.obj = NULL;
    r->data = NULL;
    r->path = NULL;
    r->ready = 0;
    r->busy = 0;
    r->closing = 0;
    return (PyObject *)r;
}

#define ST_MAP_HINT                                                                  \
    ": the process is out of address space or has reached its limit of mappings "   \
    "(vm.max_map_count, see /proc/sys/vm/max_map_count); load with mmap=False to "   \
    "read the data into memory instead"

/* Maps (or reads the header of) and validates an open file. fd is the Reader's
 * from here on when owned; a borrowed fd is never closed (dup'ed when kept). */
static int Reader_open_fd(Reader *r, int fd, int owned, int use_mmap)
{
    st_error err;
    st_code rc = ST_OK;
    int sys_errno = 0, map_failed = 0;
    uint64_t size = 0, n = 0;
    uint8_t prefix[8];
    uint8_t *hdr = NULL;

    st_error_clear(&err);
    Py_BEGIN_ALLOW_THREADS
    if (st_fd_size(fd, &size) != 0) {
        sys_errno = errno;
    } else if (size < ST_PREFIX_LEN) {
        rc = st_read_prefix(prefix, 0, size, &n, &err);
    } else if (use_mmap && size > SIZE_MAX) {
        sys_errno = EFBIG;
    } else {
        if (!owned && !use_mmap) {
            fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
            owned = fd >= 0;
            if (fd < 0)
                sys_errno = errno;
        }
        /* the header is copied out with pread and parsed there, also when mapping:
         * a file truncated while we parse gives ENODATA, never SIGBUS */
        if (sys_errno) {
            /* nothing to read from */
        } else if (st_pread_all(fd, prefix, sizeof(prefix), 0) != 0) {
            sys_errno = errno;
        } else if ((rc = st_read_prefix(prefix, sizeof(prefix), size, &n, &err)) == ST_OK) {
            /* n was checked against the file size: the allocation is backed by bytes */
            hdr = malloc(n ? (size_t)n : 1);
            if (!hdr)
                sys_errno = ENOMEM;
            else if (st_pread_all(fd, hdr, (size_t)n, ST_PREFIX_LEN) != 0)
                sys_errno = errno;
            else
                rc = st_parse_header(hdr, (size_t)n, size, &r->table, &err);
            free(hdr);
        }
        if (use_mmap) {
            if (!sys_errno && rc == ST_OK) {
                r->blob = st_blob_map(fd, (size_t)size);
                if (!r->blob) {
                    sys_errno = errno;
                    map_failed = 1;
                }
            }
            /* tensors are served from this mapping; the file is never reopened */
            if (owned)
                close(fd);
            owned = 0;
            fd = -1;
        }
    }
    Py_END_ALLOW_THREADS

    r->file_size = size;
    if (sys_errno || rc != ST_OK) {
        if (owned && fd >= 0)
            close(fd);
        if (sys_errno == ENOMEM && map_failed && r->path)
            /* mmap's ENOMEM is most often the per-process map count, not memory */
            PyErr_Format(PyExc_MemoryError, "cannot map %S (%llu bytes)" ST_MAP_HINT, r->path,
                         (unsigned long long)size);
        else if (sys_errno == ENOMEM && map_failed)
            PyErr_Format(PyExc_MemoryError, "cannot map the file (%llu bytes)" ST_MAP_HINT,
                         (unsigned long long)size);
        else if (sys_errno == ENOMEM)
            PyErr_NoMemory();
        else if (sys_errno == ENODATA)
            st_py_raise_safetensor(PyUnicode_FromString(
                                 "invalid safetensors file: the file shrank while being read"),
                             "truncated", NULL, -1);
        else if (sys_errno)
            st_py_raise_errno(sys_errno, r->path);
        else
            st_py_raise_st(&err, "invalid safetensors file");
        return -1;
    }
    r->fd = owned ? fd : -1;
    r->data = r->blob ? r->blob->base + r->table.data_start : NULL;
    r->ready = 1;
    return 0;
}

static int Reader_open_path(Reader *r, PyObject *path, int use_mmap)
{
    const char *cpath = PyBytes_AS_STRING(path);
    uint64_t size;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = st_open_read(cpath, &size);
    Py_END_ALLOW_THREADS
    if (fd < 0 && errno == EINVAL) {
        /* st_open_read's refusal of a FIFO, a socket or a device */
        PyObject *args = Py_BuildValue("(isO)", EINVAL,
                                       "not a regular file (a FIFO, a socket or a device); "
                                       "refusing to read it",
                                       r->path ? r->path : Py_None);
        if (args) {
            PyErr_SetObject(PyExc_OSError, args);
            Py_DECREF(args);
        }
        return -1;
    }
    if (fd < 0) {
        st_py_raise_errno(errno, r->path);
        return -1;
    }
    return Reader_open_fd(r, fd, 1, use_mmap);
}

static int Reader_open_buffer(Reader *r, PyObject *data)
{
    st_error err;
    st_code rc;
    if (PyObject_GetBuffer(data, &r->view, PyBUF_SIMPLE) < 0)
        return -1;
    Py_BEGIN_ALLOW_THREADS
    rc = st_parse(r->view.buf, (size_t)r->view.len, &r->table, &err);
    Py_END_ALLOW_THREADS
    if (rc != ST_OK) {
        st_py_raise_st(&err, "invalid safetensors data");
        return -1;
    }
    r->file_size = (uint64_t)r->view.len;
    r->data = (const uint8_t *)r->view.buf + r->table.data_start;
    r->ready = 1;
    return 0;
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"path", "data", "fd", "mmap", NULL};
    PyObject *path = Py_None, *data = Py_None, *encoded = NULL;
    int use_mmap = 1, fd = -1;
    Reader *r;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO$ip:Reader", kwlist, &path, &data, &fd,
                                     &use_mmap))
        return NULL;
    if ((path != Py_None) + (data != Py_None) + (fd >= 0) != 1) {
        PyErr_SetString(PyExc_TypeError, "Reader() takes one of path, data or fd");
        return NULL;
    }
    r = (Reader *)Reader_alloc(type);
    if (!r)
        return NULL;
    if (path != Py_None) {
        if (!PyUnicode_FSConverter(path, &encoded))
            goto error;
        r->path = PyOS_FSPath(path);
        if (!r->path)
            goto error;
        if (Reader_open_path(r, encoded, use_mmap) < 0)
            goto error;
        Py_DECREF(encoded);
    } else if (fd >= 0) {
        if (Reader_open_fd(r, fd, 0, use_mmap) < 0)
            goto error;
    } else if (Reader_open_buffer(r, data) < 0) {
        goto error;
    }
    return (PyObject *)r;
error:
    Py_XDECREF(encoded);
    Py_DECREF(r);
    return NULL;
}

static PyObject *entry_name(const Reader *r, const st_entry *e)
{
    return PyUnicode_DecodeUTF8(r->table.strings + e->name_off, (Py_ssize_t)e->name_len,
                                "strict");
}

/* Tensor names, sorted by name or in file order. */
static PyObject *Reader_names(Reader *r, int sorted)
{
    PyObject *list;
    if (Reader_check_open(r) < 0)
        return NULL;
    list = PyList_New((Py_ssize_t)r->table.count);
    if (!list)
        return NULL;
    for (size_t i = 0; i < r->table.count; i++) {
        size_t k = sorted ? r->table.by_name[i] : i;
        PyObject *name = entry_name(r, &r->table.entries[k]);
        if (!name) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, name);
    }
    return list;
}

static PyObject *Reader_keys(Reader *r, PyObject *unused)
{
    (void)unused;
    return Reader_names(r, 1);
}

static PyObject *Reader_offset_keys(Reader *r, PyObject *unused)
{
    (void)unused;
    return Reader_names(r, 0);
}

static PyObject *Reader_metadata(Reader *r, PyObject *unused)
{
    PyObject *d;
    (void)unused;
    if (Reader_check_open(r) < 0)
        return NULL;
    if (!r->table.has_metadata)
        Py_RETURN_NONE;
    d = PyDict_New();
    if (!d)
        return NULL;
    for (size_t i = 0; i < r->table.meta_count; i++) {
        const st_meta *m = &r->table.meta[i];
        PyObject *k = PyUnicode_DecodeUTF8(r->table.strings + m->key_off,
                                           (Py_ssize_t)m->key_len, "strict");
        PyObject *v = PyUnicode_DecodeUTF8(r->table.strings + m->val_off,
                                           (Py_ssize_t)m->val_len, "strict");
        if (!k || !v || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

/* Finds an entry by a str name; raises SafetensorError naming it when absent. */
static const st_entry *Reader_lookup(Reader *r, PyObject *name)
{
    Py_ssize_t len;
    const char *s;
    long i;
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "tensor names are str, not %.100s", Py_TYPE(name)->tp_name);
        return NULL;
    }
    s = PyUnicode_AsUTF8AndSize(name, &len);
    if (!s)
        return NULL;
    i = st_find(&r->table, s, (size_t)len);
    if (i < 0) {
        st_py_raise_safetensor(PyUnicode_FromFormat("no tensor named %R", name), "missing", name, -1);
        return NULL;
    }
    return &r->table.entries[i];
}

static PyObject *shape_tuple(const Reader *r, const st_entry *e)
{
    PyObject *t = PyTuple_New((Py_ssize_t)e->ndim);
    if (!t)
        return NULL;
    for (size_t d = 0; d < e->ndim; d++) {
        PyObject *v = PyLong_FromUnsignedLongLong(r->table.dims[e->dims_off + d]);
        if (!v) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)d, v);
    }
    return t;
}

/* info(name) -> (dtype, shape, begin, end): offsets count from the file's start. */
static PyObject *Reader_info(Reader *r, PyObject *name)
{
    const st_entry *e;
    PyObject *shape;
    if (Reader_check_open(r) < 0 || !(e = Reader_lookup(r, name)))
        return NULL;
    shape = shape_tuple(r, e);
    if (!shape)
        return NULL;
    return Py_BuildValue("sNKK", st_dtype_name(e->dtype), shape,
                         (unsigned long long)(r->table.data_start + e->begin),
                         (unsigned long long)(r->table.data_start + e->end));
}

/* The torch sizes and contiguous strides of an entry. F4 holds two values per
 * byte: torch's float4_e2m1fn_x2 has the last dimension halved. */
static int torch_shape(const Reader *r, const st_entry *e, int64_t *sizes, int64_t *strides,
                       PyObject *name)
{
    uint64_t stride = 1;
    for (size_t d = 0; d < e->ndim; d++) {
        uint64_t v = r->table.dims[e->dims_off + d];
        if (v > INT64_MAX) {
            st_py_raise_tensor_error("shape", name, "dimension %llu is too large for torch",
                               (unsigned long long)v);
            return -1;
        }
        sizes[d] = (int64_t)v;
    }
    if (e->dtype == ST_F4) {
        if (e->ndim == 0 || sizes[e->ndim - 1] % 2) {
            st_py_raise_tensor_error("shape", name,
                               "F4 needs an even last dimension to become torch's "
                               "float4_e2m1fn_x2 (two values per byte)");
            return -1;
        }
        sizes[e->ndim - 1] /= 2;
    }
    for (size_t d = e->ndim; d-- > 0;) {
        uint64_t next;
        strides[d] = (int64_t)stride;
        if (sizes[d] > 1) {
            next = stride * (uint64_t)sizes[d];
            /* the strides of an empty tensor can overflow even though it has no bytes */
            if ((uint64_t)sizes[d] != 0 && (next / (uint64_t)sizes[d] != stride ||
                                             next > INT64_MAX)) {
                st_py_raise_tensor_error("shape", name, "the shape is too large for torch");
                return -1;
            }
            stride = next;
        }
    }
    return 0;
}

static void blob_deleter(void *data, void *ctx)
{
    (void)data;
    st_blob_decref((st_blob *)ctx);
}

/* Builds handles for the given entries; fills from memory or the fd when owned.
 * want_zero_copy: tensors point into the mapping when alignment allows. */
static PyObject *Reader_build(Reader *r, const st_entry **es, Py_ssize_t n, int device)
{
    st_tensor *h = NULL;
    size_t max_ndim = 1;
    int64_t *sizes = NULL, *strides = NULL;
    void **fill_dst = NULL;
    PyObject *list = NULL, *name = NULL;
    int zero_copy = r->blob && st_aten.from_blob && zero_copy_enabled && device == DEV_CPU;
    int sys_errno = 0, release_after = 0;
    Py_ssize_t failed_at = -1;

    if (!st_aten.ready) {
        PyErr_SetString(PyExc_RuntimeError, "libtorch's C ABI is not available");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (es[i]->ndim > max_ndim)
            max_ndim = es[i]->ndim;
    h = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(st_tensor));
    fill_dst = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(void *));
    sizes = PyMem_Malloc(max_ndim * sizeof(int64_t));
    strides = PyMem_Malloc(max_ndim * sizeof(int64_t));
    if (!h || !fill_dst || !sizes || !strides) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const st_entry *e = es[i];
        int32_t dtype = st_aten.dtype[e->dtype];
        st_aten_err rc;
        name = entry_name(r, e);
        if (!name)
            goto error;
        if (dtype < 0) {
            st_py_raise_tensor_error("dtype", name,
                               "dtype %s has no torch equivalent in this version of torch",
                               st_dtype_name(e->dtype));
            goto error;
        }
        if (torch_shape(r, e, sizes, strides, name) < 0)
            goto error;
        if (device == DEV_META) {
            rc = st_aten.empty_strided((int64_t)e->ndim, sizes, strides, dtype,
                                       st_aten.device_meta, -1, &h[i]);
        } else {
            /* in range: validate() checked data_start + end == file size */
            uint8_t *src = r->data ? (uint8_t *)r->data + e->begin : NULL;
            size_t align = st_aten.dtype_element_size(dtype);
            int aligned = src && align && ((uintptr_t)src % align) == 0;
            if (zero_copy && aligned && e->nbytes > 0) {
                st_blob_incref(r->blob);
                rc = st_aten.from_blob(src, (int64_t)e->ndim, sizes, strides, 0, dtype,
                                       st_aten.device_cpu, -1, &h[i], st_aten.layout_strided,
                                       NULL, 0, blob_deleter, r->blob);
                if (rc != 0)
                    st_blob_decref(r->blob);
            } else {
                /* owned memory: misaligned data, mmap=False, bytes input, empty tensors */
                rc = st_aten.empty_strided((int64_t)e->ndim, sizes, strides, dtype,
                                           st_aten.device_cpu, -1, &h[i]);
                if (rc == 0 && e->nbytes > 0 && st_aten.get_data_ptr(h[i], &fill_dst[i]) != 0)
                    rc = 1;
            }
        }
        if (rc != 0) {
            h[i] = NULL;
            st_py_raise_aten(PyExc_RuntimeError, "torch could not create the tensor", name);
            goto error;
        }
        Py_CLEAR(name);
    }
    /* fill owned tensors without the GIL; close() meanwhile only marks the reader */
    r->busy++;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const st_entry *e = es[i];
        if (!fill_dst[i])
            continue;
        if (r->data) {
            memcpy(fill_dst[i], r->data + e->begin, (size_t)e->nbytes);
        } else if (st_pread_all(r->fd, fill_dst[i], (size_t)e->nbytes,
                                r->table.data_start + e->begin) != 0) {
            sys_errno = errno;
            failed_at = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    release_after = --r->busy == 0 && r->closing;
    if (sys_errno) {
        if (sys_errno == ENODATA) {
            name = entry_name(r, es[failed_at]);
            st_py_raise_tensor_error("truncated", name,
                               "the file is shorter than its header says: it was truncated "
                               "while being read");
        } else {
            st_py_raise_errno(sys_errno, r->path);
        }
        goto error;
    }
    list = st_py_wrap_handles(h, n);
    PyMem_Free(h);
    h = NULL;
    goto done;
error:
    if (h)
        for (Py_ssize_t i = 0; i < n; i++)
            if (h[i])
                st_aten.delete_tensor(h[i]);
    PyMem_Free(h);
    list = NULL;
done:
    Py_XDECREF(name);
    PyMem_Free(fill_dst);
    PyMem_Free(sizes);
    PyMem_Free(strides);
    if (release_after)
        Reader_release(r); /* a close() that came while this read ran */
    return list;
}

static int parse_device(PyObject *device, int *out)
{
    if (!device || device == Py_None) {
        *out = DEV_CPU;
        return 0;
    }
    if (PyUnicode_Check(device)) {
        if (PyUnicode_CompareWithASCIIString(device, "cpu") == 0) {
            *out = DEV_CPU;
            return 0;
        }
        if (PyUnicode_CompareWithASCIIString(device, "meta") == 0) {
            *out = DEV_META;
            return 0;
        }
    }
    PyErr_Format(PyExc_ValueError, "the C reader builds tensors on 'cpu' or 'meta', not %R",
                 device);
    return -1;
}

/* tensors(names=None, device="cpu") -> dict in file order (or the order of names) */
static PyObject *Reader_tensors(Reader *r, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"names", "device", NULL};
    PyObject *names = Py_None, *device = NULL, *list = NULL, *dict = NULL, *seq = NULL;
    const st_entry **es = NULL;
    Py_ssize_t n;
    int dev;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|OO:tensors", kwlist, &names, &device))
        return NULL;
    if (Reader_check_open(r) < 0 || parse_device(device, &dev) < 0)
        return NULL;
    if (names == Py_None) {
        seq = Reader_offset_keys(r, NULL);
    } else {
        /* a private tuple: hashing a str subclass below runs Python, which may change
         * the caller's list */
        seq = PySequence_Fast(names, "names must be a sequence of str");
        if (seq && PyList_Check(seq))
            Py_SETREF(seq, PyList_AsTuple(seq));
    }
    if (!seq)
        return NULL;
    n = PySequence_Fast_GET_SIZE(seq);
    es = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(*es));
    if (!es) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!(es[i] = Reader_lookup(r, PySequence_Fast_GET_ITEM(seq, i))))
            goto done;
    list = Reader_build(r, es, n, dev);
    if (!list)
        goto done;
    dict = PyDict_New();
    if (!dict)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyDict_SetItem(dict, PySequence_Fast_GET_ITEM(seq, i), PyList_GET_ITEM(list, i)) <
            0) {
            Py_CLEAR(dict);
            goto done;
        }
    }
done:
    PyMem_Free(es);
    Py_XDECREF(seq);
    Py_XDECREF(list);
    return dict;
}

static PyObject *Reader_tensor(Reader *r, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "device", NULL};
    PyObject *name, *device = NULL, *list, *t;
    const st_entry *e;
    int dev;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:tensor", kwlist, &name, &device))
        return NULL;
    if (Reader_check_open(r) < 0 || parse_device(device, &dev) < 0 ||
        !(e = Reader_lookup(r, name)))
        return NULL;
    list = Reader_build(r, &e, 1, dev);
    if (!list)
        return NULL;
    t = Py_NewRef(PyList_GET_ITEM(list, 0));
    Py_DECREF(list);
    return t;
}

static PyObject *Reader_buffer(Reader *r, PyObject *unused)
{
    (void)unused;
    if (Reader_check_open(r) < 0)
        return NULL;
    if (r->blob)
        return Mapping_new(r->blob);
    if (r->view.obj)
        return Py_NewRef(r->view.obj);
    Py_RETURN_NONE;
}

static PyObject *Reader_close(Reader *r, PyObject *unused)
{
    (void)unused;
    Reader_release(r);
    Py_RETURN_NONE;
}

static PyObject *Reader_get_data_start(Reader *r, void *c)
{
    (void)c;
    if (Reader_check_open(r) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(r->table.data_start);
}

static PyObject *Reader_get_file_size(Reader *r, void *c)
{
    (void)c;
    return PyLong_FromUnsignedLongLong(r->file_size);
}

static PyObject *Reader_get_mapped(Reader *r, void *c)
{
    (void)c;
    return PyBool_FromLong(r->blob != NULL);
}

static PyObject *Reader_get_closed(Reader *r, void *c)
{
    (void)c;
    return PyBool_FromLong(!r->ready);
}

static PyObject *Reader_get_fd(Reader *r, void *c)
{
    (void)c;
    return PyLong_FromLong(r->fd);
}

static Py_ssize_t Reader_len(Reader *r)
{
    return r->ready ? (Py_ssize_t)r->table.count : 0;
}

static PyMethodDef Reader_methods[] = {
    {"keys", (PyCFunction)Reader_keys, METH_NOARGS, "Tensor names, sorted."},
    {"offset_keys", (PyCFunction)Reader_offset_keys, METH_NOARGS,
     "Tensor names in file order."},
    {"metadata", (PyCFunction)Reader_metadata, METH_NOARGS,
     "The __metadata__ dict, or None."},
    {"info", (PyCFunction)Reader_info, METH_O,
     "info(name) -> (dtype, shape, begin, end), offsets from the file's start."},
    {"tensors", (PyCFunction)(void (*)(void))Reader_tensors, METH_VARARGS | METH_KEYWORDS,
     "tensors(names=None, device='cpu') -> dict of tensors."},
    {"tensor", (PyCFunction)(void (*)(void))Reader_tensor, METH_VARARGS | METH_KEYWORDS,
     "tensor(name, device='cpu') -> Tensor."},
    {"buffer", (PyCFunction)Reader_buffer, METH_NOARGS,
     "The mapping as a buffer object (or the bytes read), or None."},
    {"close", (PyCFunction)Reader_close, METH_NOARGS,
     "Releases the file; tensors already built keep the mapping alive."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Reader_getset[] = {
    {"data_start", (getter)Reader_get_data_start, NULL, "Offset of the data buffer.", NULL},
    {"file_size", (getter)Reader_get_file_size, NULL, "Size of the file.", NULL},
    {"mapped", (getter)Reader_get_mapped, NULL, "Whether the file is mapped.", NULL},
    {"closed", (getter)Reader_get_closed, NULL, "Whether close() was called.", NULL},
    {"fd", (getter)Reader_get_fd, NULL, "The descriptor kept for reads, or -1.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Reader_as_sequence = {
    .sq_length = (lenfunc)Reader_len,
};

static PyTypeObject Reader_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "torch_safetensors._C.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_as_sequence = &Reader_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reader(path=None, data=None, *, fd=-1, mmap=True): a validated safetensors file.",
    .tp_methods = Reader_methods,
    .tp_getset = Reader_getset,
    .tp_new = Reader_new,
};

/* ---- module functions ---- */

static PyObject *mod_init(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"libtorch_cpu", "libtorch_python", "steal_handles",
                             "make_handles", "tensor_type", NULL};
    const char *cpu, *py = NULL;
    PyObject *steal = Py_None, *make = Py_None, *ttype;
    char msg[512];
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "szOOO:init", kwlist, &cpu, &py, &steal, &make,
                                     &ttype))
        return NULL;
    if (!PyType_Check(ttype)) {
        PyErr_SetString(PyExc_TypeError, "tensor_type must be torch.Tensor");
        return NULL;
    }
    if (st_aten_init(cpu, py, msg, sizeof(msg)) != 0) {
        PyErr_SetString(PyExc_ImportError, msg);
        return NULL;
    }
    st_py_set_torch(steal, make, ttype);
    return Py_BuildValue("{s:O,s:O,s:O,s:O}", "aten", st_aten.ready ? Py_True : Py_False,
                         "from_blob", st_aten.from_blob ? Py_True : Py_False, "to_pyobject",
                         st_aten.to_pyobject ? Py_True : Py_False, "from_pyobject",
                         st_aten.from_pyobject ? Py_True : Py_False);
}

static PyObject *str_requires_grad;
static PyObject *ordered_dict_type; /* collections.OrderedDict */

/* plain_flat(obj): whether obj is a dict or OrderedDict of str keys to plain
 * torch.Tensor values (not subclasses) that do not require grad: a checkpoint
 * that needs no structure beyond the tensors themselves. */
static PyObject *mod_plain_flat(PyObject *self, PyObject *obj)
{
    PyObject *snap, *result = Py_False;
    Py_ssize_t n;
    (void)self;
    if (!PyDict_Check(obj) || !st_py_tensor_type())
        Py_RETURN_FALSE;
    if (!PyDict_CheckExact(obj) && (PyObject *)Py_TYPE(obj) != ordered_dict_type)
        Py_RETURN_FALSE;
    /* requires_grad may run Python (a torch function mode) that changes obj: walk a
     * snapshot holding strong references */
    snap = PyDict_Items(obj);
    if (!snap)
        return NULL;
    n = PyList_GET_SIZE(snap);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(snap, i);
        PyObject *k = PyTuple_GET_ITEM(kv, 0), *v = PyTuple_GET_ITEM(kv, 1), *grad;
        int set;
        if (!PyUnicode_CheckExact(k) || (PyObject *)Py_TYPE(v) != st_py_tensor_type())
            goto done;
        grad = PyObject_GetAttr(v, str_requires_grad);
        if (!grad) {
            result = NULL;
            goto done;
        }
        set = grad == Py_True;
        Py_DECREF(grad);
        if (set)
            goto done;
    }
    if (PyDict_GET_SIZE(obj) != n) {
        PyErr_SetString(PyExc_RuntimeError, "the dict changed size while it was read");
        result = NULL;
        goto done;
    }
    result = Py_True;
done:
    Py_DECREF(snap);
    return Py_XNewRef(result);
}

/* write_atomic(path, data, *, durable=False): writes bytes with the same atomic writer
 * as save (a temporary file beside path, renamed over it). */
static PyObject *mod_write_atomic(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"path", "data", "durable", NULL};
    PyObject *path, *encoded = NULL, *fspath = NULL;
    Py_buffer data;
    int durable = 0, sys_errno = 0;
    st_writer w;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oy*|$p:write_atomic", kwlist, &path, &data,
                                     &durable))
        return NULL;
    if (!PyUnicode_FSConverter(path, &encoded) || !(fspath = PyOS_FSPath(path))) {
        Py_XDECREF(encoded);
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (st_writer_open(&w, PyBytes_AS_STRING(encoded)) != 0) {
        sys_errno = errno;
    } else {
        struct iovec one = {data.buf, (size_t)data.len};
        if (st_writer_writev(&w, &one, 1) != 0) {
            sys_errno = errno;
            st_writer_abort(&w);
        } else if (st_writer_commit(&w, durable) != 0) {
            sys_errno = errno;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    Py_DECREF(encoded);
    if (sys_errno) {
        st_py_raise_errno(sys_errno, fspath);
        Py_DECREF(fspath);
        return NULL;
    }
    Py_DECREF(fspath);
    Py_RETURN_NONE;
}

static PyObject *mod_set_zero_copy(PyObject *self, PyObject *arg)
{
    int v = PyObject_IsTrue(arg);
    (void)self;
    if (v < 0)
        return NULL;
    zero_copy_enabled = v;
    Py_RETURN_NONE;
}

static PyObject *mod_zero_copy(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(zero_copy_enabled && st_aten.ready && st_aten.from_blob &&
                           (st_aten.to_pyobject || st_py_steal_handles_fn()));
}

static PyObject *mod_sniff(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long size;
    int r;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*K:sniff", &buf, &size))
        return NULL;
    r = st_sniff(buf.buf, (size_t)buf.len, size);
    PyBuffer_Release(&buf);
    return PyBool_FromLong(r);
}

static PyObject *mod_live_mappings(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLong(st_blob_live());
}

/* ---- checksums ---- */

/* crc32c(data, value=0, *, portable=False) -> int: CRC32C of a buffer, continuing from
 * value; the GIL is released while it runs. */
static PyObject *mod_crc32c(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "value", "portable", NULL};
    Py_buffer view;
    unsigned long value = 0;
    int portable = 0;
    uint32_t crc;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|k$p:crc32c", kwlist, &view, &value,
                                     &portable))
        return NULL;
    if (value > 0xFFFFFFFFul) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "crc32c: value is a 32-bit checksum");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    crc = portable ? st_crc32c_portable((uint32_t)value, view.buf, (size_t)view.len)
                   : st_crc32c((uint32_t)value, view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef module_methods[] = {
    {"crc32c", (PyCFunction)(void (*)(void))mod_crc32c, METH_VARARGS | METH_KEYWORDS,
     "crc32c(data, value=0, *, portable=False) -> int: CRC32C of a buffer."},
    {"init", (PyCFunction)(void (*)(void))mod_init, METH_VARARGS | METH_KEYWORDS,
     "Finds libtorch's C ABI; returns the features found."},
    {"write_atomic", (PyCFunction)(void (*)(void))mod_write_atomic, METH_VARARGS | METH_KEYWORDS,
     "write_atomic(path, data, *, durable=False): bytes to a file, atomically."},
    {"plain_flat", mod_plain_flat, METH_O,
     "Whether obj is a dict of str to plain tensors that do not require grad."},
    {"set_zero_copy", mod_set_zero_copy, METH_O,
     "Enables or disables tensors built over the mapping (tests force the fallback)."},
    {"zero_copy", mod_zero_copy, METH_NOARGS, "Whether the C zero-copy path is in use."},
    {"sniff", mod_sniff, METH_VARARGS,
     "sniff(prefix, file_size): whether the bytes look like a safetensors file."},
    {"live_mappings", mod_live_mappings, METH_NOARGS, "Mappings alive in this process."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "torch_safetensors._C",
    "The C core of torch_safetensors: format engine, file layer, ATen binding.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void);

PyMODINIT_FUNC PyInit__C(void)
{
    st_crc32c_init();
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    if (PyType_Ready(&Mapping_Type) < 0 || PyType_Ready(&Reader_Type) < 0)
        goto error;
    if (st_py_errors_register(m) < 0)
        goto error;
    str_requires_grad = PyUnicode_InternFromString("requires_grad");
    if (!str_requires_grad)
        goto error;
    {
        PyObject *collections = PyImport_ImportModule("collections");
        ordered_dict_type = collections ? PyObject_GetAttrString(collections, "OrderedDict") : NULL;
        Py_XDECREF(collections);
        if (!ordered_dict_type)
            goto error;
    }
    if (st_write_register(m) < 0)
        goto error;
    if (PyModule_AddObjectRef(m, "Reader", (PyObject *)&Reader_Type) < 0 ||
        PyModule_AddObjectRef(m, "Mapping", (PyObject *)&Mapping_Type) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEADER_LEN", (long)ST_MAX_HEADER_LEN) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DEPTH", ST_MAX_DEPTH) < 0)
        goto error;
    if (st_legacy_register(m) < 0)
        goto error;
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
