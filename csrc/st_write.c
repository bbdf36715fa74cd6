/* st_write.c: the write pipeline: tensors described and planned, staged in bounded
 * blocks, written with writev to an atomic file; tensor memory exported as buffers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/uio.h>
#include <unistd.h>

#include "st_aten.h"
#include "st_binding.h"
#include "st_engine.h"
#include "st_file.h"
#include "st_write.h"

static PyObject *str_is_conj, *str_is_neg, *str_resolve_conj, *str_resolve_neg;

/* ---- describing tensors ---- */

typedef struct {
    st_tensor handle;
    void *data;          /* contiguous CPU bytes, or NULL when materialized at write time */
    int64_t ndim;
    int64_t *sizes;      /* borrowed from the handle */
    uint64_t *shape;     /* header shape */
    uint64_t nbytes;
    uintptr_t lo, hi;    /* memory range, for sharing checks */
    int32_t dtype_code;
    int32_t device_type, device_index;
    int on_cpu;
    size_t index;        /* position in the caller's order */
} save_item;

/* Handles for a list of tensors, owned by the caller. */
static int tensors_to_handles(PyObject *tensors, st_tensor *out, Py_ssize_t n)
{
    PyObject *caps;
    if (st_aten.from_pyobject) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (st_aten.from_pyobject(PyList_GET_ITEM(tensors, i), &out[i]) != 0) {
                st_py_raise_aten(PyExc_RuntimeError, "could not read a tensor", NULL);
                return -1;
            }
        }
        return 0;
    }
    PyObject *make_handles_fn = st_py_make_handles_fn();
    if (!make_handles_fn) {
        PyErr_SetString(PyExc_RuntimeError, "torch offers no way to read tensor handles");
        return -1;
    }
    caps = PyObject_CallOneArg(make_handles_fn, tensors);
    if (!caps)
        return -1;
    if (!PyList_Check(caps) || PyList_GET_SIZE(caps) != n) {
        Py_DECREF(caps);
        PyErr_SetString(PyExc_RuntimeError, "torch returned an unexpected handle list");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cap = PyList_GET_ITEM(caps, i);
        out[i] = PyCapsule_CheckExact(cap) ? PyCapsule_GetPointer(cap, NULL) : NULL;
        if (!out[i]) {
            PyErr_Clear();
            /* the remaining handles cannot be recovered; they leak rather than crash */
            Py_DECREF(caps);
            PyErr_SetString(PyExc_RuntimeError, "torch returned an unexpected handle");
            return -1;
        }
    }
    Py_DECREF(caps);
    return 0;
}

static int cmp_range(const void *a, const void *b)
{
    const save_item *x = *(save_item *const *)a, *y = *(save_item *const *)b;
    if (x->device_type != y->device_type)
        return x->device_type < y->device_type ? -1 : 1;
    if (x->device_index != y->device_index)
        return x->device_index < y->device_index ? -1 : 1;
    if (x->lo != y->lo)
        return x->lo < y->lo ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Bytes staged per copy when a tensor is not contiguous CPU memory. */
#define ST_STAGE_BYTES ((size_t)64 << 20)

typedef int (*chunk_sink)(void *ctx, const uint8_t *data, size_t len);

/* Copies a non-contiguous or non-CPU tensor to the CPU in row blocks of at most
 * ST_STAGE_BYTES (or one row, when a row is larger) and hands each block to sink.
 * Extra memory stays bounded whatever the tensor's size. Returns 0, -1 when torch
 * failed, or the sink's non-zero result. */
static int stage_tensor(const save_item *it, chunk_sink sink, void *ctx)
{
    st_tensor stage = NULL, src = NULL, dst = NULL;
    int64_t *strides = NULL, *stage_strides = NULL, *sizes = NULL;
    int64_t rows, per, row_bytes = 1;
    size_t esize = st_aten.dtype_element_size(it->dtype_code);
    int64_t nd = it->ndim ? it->ndim : 1;
    int rc = -1;
    void *base;

    sizes = malloc((size_t)nd * sizeof(int64_t));
    stage_strides = malloc((size_t)nd * sizeof(int64_t));
    if (!sizes || !stage_strides)
        goto done;
    if (it->ndim == 0) {
        sizes[0] = 1;
        rows = 1;
    } else {
        memcpy(sizes, it->sizes, (size_t)nd * sizeof(int64_t));
        rows = sizes[0];
    }
    for (int64_t d = 1; d < nd; d++)
        row_bytes *= sizes[d];
    row_bytes *= (int64_t)esize;
    per = 1;
    if (row_bytes > 0 && (size_t)row_bytes < ST_STAGE_BYTES)
        per = (int64_t)(ST_STAGE_BYTES / (size_t)row_bytes);
    if (per > rows)
        per = rows;
    if (st_aten.get_strides(it->handle, &strides) != 0)
        goto done;
    {
        int64_t stride = 1;
        for (int64_t d = nd; d-- > 0;) {
            stage_strides[d] = stride;
            stride *= sizes[d] > 1 ? sizes[d] : 1;
        }
    }
    sizes[0] = per;
    if (st_aten.empty_strided(nd, sizes, stage_strides, it->dtype_code, st_aten.device_cpu, -1,
                              &stage) != 0) {
        stage = NULL;
        goto done;
    }
    if (st_aten.get_data_ptr(stage, &base) != 0)
        goto done;
    for (int64_t r = 0; r < rows; r += per) {
        int64_t n = rows - r < per ? rows - r : per;
        /* reinterpret takes an increment on the tensor's own storage offset */
        int64_t src_offset = it->ndim ? r * strides[0] : 0;
        int sink_rc;
        sizes[0] = n;
        if (st_aten.reinterpret(it->handle, nd, sizes, it->ndim ? strides : stage_strides,
                                src_offset, &src) != 0) {
            src = NULL;
            goto done;
        }
        if (st_aten.reinterpret(stage, nd, sizes, stage_strides, 0, &dst) != 0) {
            dst = NULL;
            goto done;
        }
        if (st_aten.copy_(dst, src, 0) != 0)
            goto done;
        st_aten.delete_tensor(src);
        st_aten.delete_tensor(dst);
        src = dst = NULL;
        sink_rc = sink(ctx, base, (size_t)(n * row_bytes));
        if (sink_rc) {
            rc = sink_rc;
            goto done;
        }
    }
    rc = 0;
done:
    if (src)
        st_aten.delete_tensor(src);
    if (dst)
        st_aten.delete_tensor(dst);
    if (stage)
        st_aten.delete_tensor(stage);
    free(sizes);
    free(stage_strides);
    return rc;
}

typedef struct {
    save_item *items;
    const st_plan *plan;
    size_t n;
    st_writer *w;      /* file output, or NULL */
    uint8_t *out;      /* memory output, or NULL */
    size_t pos;        /* bytes of out filled */
    int sys_errno;
    int aten_failed;
    size_t failed_item;
} write_job;

static int flush_iov(write_job *job, struct iovec *iov, int *cnt)
{
    if (*cnt && st_writer_writev(job->w, iov, *cnt) != 0) {
        job->sys_errno = errno;
        return -1;
    }
    *cnt = 0;
    return 0;
}

/* Where staged blocks go: the output buffer, or straight to the file. */
static int sink_block(void *ctx, const uint8_t *data, size_t len)
{
    write_job *job = ctx;
    struct iovec one;
    if (job->out) {
        memcpy(job->out + job->pos, data, len);
        job->pos += len;
        return 0;
    }
    one.iov_base = (void *)data;
    one.iov_len = len;
    if (st_writer_writev(job->w, &one, 1) != 0) {
        job->sys_errno = errno;
        return 1;
    }
    return 0;
}

/* Writes header and data in file order; runs without the GIL. */
static int write_all(write_job *job)
{
    struct iovec iov[IOV_MAX < 1024 ? IOV_MAX : 1024];
    int cnt = 0;
    const size_t chunk = (size_t)1 << 30; /* a single write moves at most ~2 GiB */
    job->pos = job->plan->header_len;
    if (job->out) {
        memcpy(job->out, job->plan->header, job->plan->header_len);
    } else {
        iov[cnt].iov_base = job->plan->header;
        iov[cnt].iov_len = job->plan->header_len;
        cnt++;
    }
    for (size_t k = 0; k < job->n; k++) {
        save_item *it = &job->items[job->plan->order[k]];
        uint8_t *src = it->data;
        if (it->nbytes == 0)
            continue;
        if (!src) {
            int rc;
            if (!job->out && flush_iov(job, iov, &cnt) < 0)
                return -1;
            rc = stage_tensor(it, sink_block, job);
            if (rc < 0) {
                job->aten_failed = 1;
                job->failed_item = it->index;
            }
            if (rc)
                return -1;
            continue;
        }
        if (job->out) {
            memcpy(job->out + job->pos, src, (size_t)it->nbytes);
            job->pos += (size_t)it->nbytes;
            continue;
        }
        for (uint64_t off = 0; off < it->nbytes; off += chunk) {
            size_t len = it->nbytes - off < chunk ? (size_t)(it->nbytes - off) : chunk;
            if (cnt == (int)(sizeof(iov) / sizeof(iov[0])) && flush_iov(job, iov, &cnt) < 0)
                return -1;
            iov[cnt].iov_base = src + off;
            iov[cnt].iov_len = len;
            cnt++;
        }
    }
    if (!job->out && flush_iov(job, iov, &cnt) < 0)
        return -1;
    return 0;
}

static PyObject *dtype_repr(PyObject *tensor)
{
    PyObject *dt = PyObject_GetAttrString(tensor, "dtype");
    PyObject *s;
    if (!dt) {
        PyErr_Clear();
        return PyUnicode_FromString("?");
    }
    s = PyObject_Str(dt);
    Py_DECREF(dt);
    return s;
}


/* A tensor whose conjugate or negative bit is set, resolved into plain memory; the
 * tensor itself (a new reference) otherwise. */
static PyObject *resolve_lazy_bits(PyObject *t)
{
    PyObject *checks[2][2] = {{str_is_conj, str_resolve_conj}, {str_is_neg, str_resolve_neg}};
    PyObject *cur = Py_NewRef(t);
    for (int k = 0; k < 2; k++) {
        PyObject *flag = PyObject_CallMethodNoArgs(cur, checks[k][0]);
        int set = flag ? PyObject_IsTrue(flag) : -1;
        Py_XDECREF(flag);
        if (set > 0) {
            PyObject *resolved = PyObject_CallMethodNoArgs(cur, checks[k][1]);
            Py_SETREF(cur, resolved);
        }
        if (set < 0 || !cur) {
            Py_XDECREF(cur);
            return NULL;
        }
    }
    return cur;
}

/* Reads a tensor's layout, dtype, device, shape and data into a save_item. */
static int describe(save_item *it, PyObject *name, PyObject *tensor)
{
    int32_t layout, device, st;
    int64_t numel;
    bool contiguous;
    size_t esize;
    if (st_aten.get_layout(it->handle, &layout) != 0 || st_aten.get_dtype(it->handle,
                                                                          &it->dtype_code) != 0 ||
        st_aten.get_device_type(it->handle, &device) != 0) {
        st_py_raise_aten(PyExc_TypeError, "cannot read the layout, dtype or device", name);
        return -1;
    }
    if (layout != st_aten.layout_strided) {
        PyErr_Format(PyExc_TypeError,
                     "tensor %R is not dense (sparse or another layout): safetensors stores "
                     "dense tensors; convert it with .to_dense()",
                     name);
        return -1;
    }
    st = st_aten_dtype_to_st(it->dtype_code);
    if (st < 0) {
        PyObject *d = dtype_repr(tensor);
        PyErr_Format(PyExc_TypeError, "tensor %R has dtype %S, which safetensors cannot store",
                     name, d);
        Py_XDECREF(d);
        return -1;
    }
    if (device == st_aten.device_meta) {
        PyErr_Format(PyExc_TypeError,
                     "tensor %R is on the meta device and has no data to save; materialize it "
                     "first (for example with .to_empty(device='cpu') and an initializer)",
                     name);
        return -1;
    }
    it->on_cpu = device == st_aten.device_cpu;
    it->device_type = device;
    if (st_aten.get_device_index(it->handle, &it->device_index) != 0)
        it->device_index = -1;
    if (st_aten.get_dim(it->handle, &it->ndim) != 0 ||
        st_aten.get_sizes(it->handle, &it->sizes) != 0 ||
        st_aten.get_numel(it->handle, &numel) != 0 ||
        st_aten.is_contiguous(it->handle, &contiguous) != 0) {
        st_py_raise_aten(PyExc_TypeError, "cannot read the shape", name);
        return -1;
    }
    esize = st_aten.dtype_element_size(it->dtype_code);
    it->nbytes = (uint64_t)numel * esize;
    it->shape = PyMem_Malloc((size_t)(it->ndim ? it->ndim : 1) * sizeof(uint64_t));
    if (!it->shape) {
        PyErr_NoMemory();
        return -1;
    }
    for (int64_t d = 0; d < it->ndim; d++)
        it->shape[d] = (uint64_t)it->sizes[d];
    if (st == ST_F4) {
        if (it->ndim == 0) {
            PyErr_Format(PyExc_TypeError,
                         "tensor %R: a 0-dim float4_e2m1fn_x2 tensor has no safetensors shape "
                         "(F4 stores single values); reshape it to [1]",
                         name);
            return -1;
        }
        it->shape[it->ndim - 1] *= 2;
    }
    it->data = NULL;
    it->lo = it->hi = 0;
    if (numel > 0) {
        void *p;
        int64_t *strides;
        if (st_aten.get_data_ptr(it->handle, &p) != 0 ||
            st_aten.get_strides(it->handle, &strides) != 0) {
            st_py_raise_aten(PyExc_TypeError, "cannot read the data", name);
            return -1;
        }
        if (!p) {
            /* a functionalized tensor or a wrapper subclass: no storage of its own */
            PyErr_Format(PyExc_TypeError,
                         "tensor %R has no data of its own to save (a functionalized tensor, "
                         "or a tensor subclass without storage)",
                         name);
            return -1;
        }
        /* the memory the tensor spans, for overlap checks */
        int64_t lo = 0, hi = 0;
        for (int64_t d = 0; d < it->ndim; d++) {
            int64_t span = (it->sizes[d] - 1) * strides[d];
            if (span < 0)
                lo += span;
            else
                hi += span;
        }
        it->lo = (uintptr_t)p + (uintptr_t)(lo * (int64_t)esize);
        it->hi = (uintptr_t)p + (uintptr_t)((hi + 1) * (int64_t)esize);
        if (it->on_cpu && contiguous)
            it->data = p;
    }
    return 0;
}

/* (header, [(name, tensor, nbytes), ...] in file order) for a planned save. */
static PyObject *plan_result(const st_plan *plan, const save_item *items, PyObject *names,
                             PyObject *values, size_t n)
{
    PyObject *order = PyList_New((Py_ssize_t)n), *header = NULL, *out = NULL;
    if (!order)
        return NULL;
    for (size_t k = 0; k < n; k++) {
        size_t i = plan->order[k];
        PyObject *entry = Py_BuildValue("(OOK)", PyList_GET_ITEM(names, (Py_ssize_t)i),
                                        PyList_GET_ITEM(values, (Py_ssize_t)i),
                                        (unsigned long long)items[i].nbytes);
        if (!entry)
            goto done;
        PyList_SET_ITEM(order, (Py_ssize_t)k, entry);
    }
    header = PyBytes_FromStringAndSize((const char *)plan->header, (Py_ssize_t)plan->header_len);
    if (header)
        out = PyTuple_Pack(2, header, order);
done:
    Py_XDECREF(header);
    Py_DECREF(order);
    return out;
}

/* A snapshot of a dict's items (a list of (key, value) tuples holding strong
 * references): loops below call into Python, which may change the dict itself. */
static PyObject *snapshot_items(PyObject *dict)
{
    PyObject *items = PyDict_Items(dict);
    if (items && !PyList_CheckExact(items)) {
        Py_DECREF(items);
        PyErr_SetString(PyExc_RuntimeError, "dict items are not a list");
        return NULL;
    }
    return items;
}

/* save(tensors: dict[str, Tensor], metadata, path=None, *, durable, check_shared,
 *      plan_only) -> None, bytes when path is None, or with plan_only
 *      (header: bytes, [(name, tensor, nbytes), ...] in file order) */
static PyObject *mod_save(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tensors", "metadata", "path", "durable", "check_shared",
                             "plan_only", NULL};
    PyObject *tensors, *metadata = Py_None, *path = Py_None, *encoded = NULL;
    PyObject *names = NULL, *values = NULL, *result = NULL, *fspath = NULL;
    PyObject *tsnap = NULL, *msnap = NULL;
    int durable = 0, check_shared = 1, plan_only = 0;
    Py_ssize_t n = 0, nmeta = 0;
    st_tensor *handles = NULL;
    save_item *items = NULL;
    save_item **ranges = NULL;
    st_write_item *witems = NULL;
    st_meta_item *mitems = NULL;
    st_plan plan;
    st_error err;
    st_code rc;
    (void)self;

    memset(&plan, 0, sizeof(plan));
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO$ppp:save", kwlist, &tensors, &metadata,
                                     &path, &durable, &check_shared, &plan_only))
        return NULL;
    if (!st_aten.ready || !st_py_tensor_type()) {
        PyErr_SetString(PyExc_RuntimeError, "libtorch's C ABI is not available");
        return NULL;
    }
    if (!PyDict_Check(tensors)) {
        PyErr_Format(PyExc_TypeError, "expected a dict of str to Tensor, got %.100s",
                     Py_TYPE(tensors)->tp_name);
        return NULL;
    }
    if (metadata != Py_None && !PyDict_Check(metadata)) {
        PyErr_Format(PyExc_TypeError, "metadata must be a dict of str to str, got %.100s",
                     Py_TYPE(metadata)->tp_name);
        return NULL;
    }
    if (path != Py_None && !plan_only) {
        if (!PyUnicode_FSConverter(path, &encoded))
            return NULL;
        fspath = PyOS_FSPath(path);
        if (!fspath)
            goto done;
    }
    /* every loop below runs over these snapshots: Python code called from them (tensor
     * subclasses, torch function modes, str subclasses) may add or remove entries */
    tsnap = snapshot_items(tensors);
    if (!tsnap)
        goto done;
    if (metadata != Py_None && !(msnap = snapshot_items(metadata)))
        goto done;
    n = PyList_GET_SIZE(tsnap);
    nmeta = msnap ? PyList_GET_SIZE(msnap) : 0;
    names = PyList_New(n);
    values = PyList_New(n);
    if (!names || !values)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(tsnap, i);
        PyObject *k = PyTuple_GET_ITEM(kv, 0), *v = PyTuple_GET_ITEM(kv, 1);
        if (!PyUnicode_Check(k)) {
            PyErr_Format(PyExc_TypeError, "tensor names must be str, got %.100s key %R",
                         Py_TYPE(k)->tp_name, k);
            goto done;
        }
        if (!PyObject_TypeCheck(v, (PyTypeObject *)st_py_tensor_type())) {
            PyErr_Format(PyExc_TypeError, "%R: expected a Tensor, got %.100s", k,
                         Py_TYPE(v)->tp_name);
            goto done;
        }
        /* conjugate and negative views hold their values lazily: save the values */
        v = resolve_lazy_bits(v);
        if (!v)
            goto done;
        PyList_SET_ITEM(names, i, Py_NewRef(k));
        PyList_SET_ITEM(values, i, v);
    }
    if (msnap) {
        mitems = PyMem_Calloc((size_t)nmeta ? (size_t)nmeta : 1, sizeof(*mitems));
        if (!mitems) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < nmeta; i++) {
            PyObject *kv = PyList_GET_ITEM(msnap, i);
            PyObject *k = PyTuple_GET_ITEM(kv, 0), *v = PyTuple_GET_ITEM(kv, 1);
            Py_ssize_t kl, vl;
            if (!PyUnicode_Check(k) || !PyUnicode_Check(v)) {
                PyErr_Format(PyExc_TypeError,
                             "metadata must map str to str; key %R has a %.100s value", k,
                             Py_TYPE(v)->tp_name);
                goto done;
            }
            /* borrowed UTF-8: the snapshot keeps k and v alive until done */
            mitems[i].key = PyUnicode_AsUTF8AndSize(k, &kl);
            mitems[i].value = mitems[i].key ? PyUnicode_AsUTF8AndSize(v, &vl) : NULL;
            if (!mitems[i].value)
                goto done;
            mitems[i].key_len = (size_t)kl;
            mitems[i].value_len = (size_t)vl;
        }
    }
    handles = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(st_tensor));
    items = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(save_item));
    witems = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(st_write_item));
    ranges = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(save_item *));
    if (!handles || !items || !witems || !ranges) {
        PyErr_NoMemory();
        goto done;
    }
    if (n && tensors_to_handles(values, handles, n) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyList_GET_ITEM(names, i);
        Py_ssize_t len;
        items[i].handle = handles[i];
        items[i].index = (size_t)i;
        if (describe(&items[i], name, PyList_GET_ITEM(values, i)) < 0)
            goto done;
        witems[i].name = PyUnicode_AsUTF8AndSize(name, &len);
        if (!witems[i].name)
            goto done;
        witems[i].name_len = (size_t)len;
        witems[i].shape = items[i].shape;
        witems[i].ndim = (size_t)items[i].ndim;
        witems[i].nbytes = items[i].nbytes;
        witems[i].dtype = (st_dtype)st_aten_dtype_to_st(items[i].dtype_code);
        ranges[i] = &items[i];
    }
    if (check_shared && n > 1) {
        /* tensors whose memory overlaps would come back as separate copies */
        qsort(ranges, (size_t)n, sizeof(*ranges), cmp_range);
        save_item *reach = NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            save_item *it = ranges[i];
            if (it->hi == it->lo)
                continue;
            if (reach && (reach->device_type != it->device_type ||
                          reach->device_index != it->device_index))
                reach = NULL; /* addresses on different devices never overlap */
            if (reach && it->lo < reach->hi) {
                PyErr_Format(st_py_shared_memory_error(),
                             "tensors %R and %R share memory: saving them would store two "
                             "copies that load back as separate tensors. Save only one of them "
                             "(and re-tie after loading), or use torch.save(obj, f, "
                             "format=\"safetensors\"), which stores tied tensors once",
                             PyList_GET_ITEM(names, (Py_ssize_t)reach->index),
                             PyList_GET_ITEM(names, (Py_ssize_t)it->index));
                goto done;
            }
            if (!reach || it->hi > reach->hi)
                reach = it;
        }
    }
    if (PyDict_GET_SIZE(tensors) != n || (msnap && PyDict_GET_SIZE(metadata) != nmeta)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the dict being saved changed size during save (Python code called "
                        "while reading its tensors added or removed entries)");
        goto done;
    }
    rc = st_plan_write(witems, (size_t)n, mitems, (size_t)nmeta, metadata != Py_None, &plan,
                       &err);
    if (rc != ST_OK) {
        if (rc == ST_ERR_NOMEM) {
            PyErr_NoMemory();
        } else {
            PyObject *nm = PyUnicode_DecodeUTF8(err.tensor, (Py_ssize_t)err.tensor_len, "replace");
            if (nm && err.tensor_len)
                PyErr_Format(PyExc_ValueError, "cannot save tensor %R: %s", nm, err.message);
            else if (nm)
                PyErr_Format(PyExc_ValueError, "cannot save: %s", err.message);
            Py_XDECREF(nm);
        }
        goto done;
    }
    if (plan_only) {
        result = plan_result(&plan, items, names, values, (size_t)n);
        goto done;
    }
    {
        write_job job;
        st_writer w;
        int wrc = 0;
        memset(&job, 0, sizeof(job));
        job.items = items;
        job.plan = &plan;
        job.n = (size_t)n;
        if (path == Py_None) {
            uint64_t total = plan.header_len + plan.data_len;
            if (total > PY_SSIZE_T_MAX) {
                PyErr_SetString(PyExc_OverflowError, "the tensors are too large for bytes");
                goto done;
            }
            result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
            if (!result)
                goto done;
            job.out = (uint8_t *)PyBytes_AS_STRING(result);
        } else {
            job.w = &w;
        }
        Py_BEGIN_ALLOW_THREADS
        if (job.w) {
            if (st_writer_open(&w, PyBytes_AS_STRING(encoded)) != 0) {
                job.sys_errno = errno;
            } else {
                wrc = write_all(&job);
                if (wrc == 0 && st_writer_commit(&w, durable) != 0)
                    job.sys_errno = errno;
                else if (wrc != 0)
                    st_writer_abort(&w);
            }
        } else {
            wrc = write_all(&job);
        }
        Py_END_ALLOW_THREADS
        if (job.aten_failed) {
            Py_CLEAR(result);
            st_py_raise_aten(PyExc_RuntimeError, "torch could not copy the tensor to the CPU",
                       PyList_GET_ITEM(names, (Py_ssize_t)job.failed_item));
            goto done;
        }
        if (job.sys_errno) {
            Py_CLEAR(result);
            st_py_raise_errno(job.sys_errno, fspath);
            goto done;
        }
        if (!result)
            result = Py_NewRef(Py_None);
    }
done:
    if (handles)
        for (Py_ssize_t i = 0; i < n; i++)
            if (handles[i])
                st_aten.delete_tensor(handles[i]);
    if (items)
        for (Py_ssize_t i = 0; i < n; i++)
            PyMem_Free(items[i].shape);
    PyMem_Free(handles);
    PyMem_Free(items);
    PyMem_Free(witems);
    PyMem_Free(ranges);
    PyMem_Free(mitems);
    st_plan_free(&plan);
    Py_XDECREF(names);
    Py_XDECREF(values);
    Py_XDECREF(tsnap);
    Py_XDECREF(msnap);
    Py_XDECREF(encoded);
    Py_XDECREF(fspath);
    return result;
}


/* ---- Span: a tensor's memory as a Python buffer, for streams and snapshots ---- */

typedef struct {
    PyObject_HEAD
    PyObject *owner;     /* the tensor: keeps the memory alive while any view exists */
    void *buf;
    Py_ssize_t len;
    int readonly;
} Span;

static char span_empty[1];

static void Span_dealloc(Span *s)
{
    Py_XDECREF(s->owner);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static int Span_getbuffer(Span *s, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)s, s->buf ? s->buf : span_empty, s->len,
                             s->readonly, flags);
}

static Py_ssize_t Span_len(Span *s)
{
    return s->len;
}

static PyBufferProcs Span_as_buffer = {
    .bf_getbuffer = (getbufferproc)Span_getbuffer,
};

static PySequenceMethods Span_as_sequence = {
    .sq_length = (lenfunc)Span_len,
};

static PyTypeObject Span_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "torch_safetensors._C.Span",
    .tp_basicsize = sizeof(Span),
    .tp_dealloc = (destructor)Span_dealloc,
    .tp_as_buffer = &Span_as_buffer,
    .tp_as_sequence = &Span_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The memory of a contiguous CPU tensor as a buffer; holds the tensor.",
};

/* tensor_memory(tensor, *, writable=False) -> Span over its bytes. The tensor must be
 * dense, contiguous and on the CPU; conjugate or negative bits are the caller's. */
static PyObject *mod_tensor_memory(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tensor", "writable", NULL};
    PyObject *tensor, *list = NULL;
    int writable = 0;
    st_tensor h = NULL;
    int32_t layout, device, dtype;
    int64_t numel;
    bool contiguous;
    void *p = NULL;
    size_t esize;
    Span *s = NULL;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|$p:tensor_memory", kwlist, &tensor,
                                     &writable))
        return NULL;
    if (!st_aten.ready || !st_py_tensor_type()) {
        PyErr_SetString(PyExc_RuntimeError, "libtorch's C ABI is not available");
        return NULL;
    }
    if (!PyObject_TypeCheck(tensor, (PyTypeObject *)st_py_tensor_type())) {
        PyErr_Format(PyExc_TypeError, "expected a Tensor, got %.100s", Py_TYPE(tensor)->tp_name);
        return NULL;
    }
    list = PyList_New(1);
    if (!list)
        return NULL;
    PyList_SET_ITEM(list, 0, Py_NewRef(tensor));
    if (tensors_to_handles(list, &h, 1) < 0) {
        h = NULL;
        goto done;
    }
    if (st_aten.get_layout(h, &layout) != 0 || st_aten.get_device_type(h, &device) != 0 ||
        st_aten.get_dtype(h, &dtype) != 0 || st_aten.get_numel(h, &numel) != 0 ||
        st_aten.is_contiguous(h, &contiguous) != 0) {
        st_py_raise_aten(PyExc_RuntimeError, "cannot read the tensor", NULL);
        goto done;
    }
    if (layout != st_aten.layout_strided || device != st_aten.device_cpu || !contiguous) {
        PyErr_SetString(PyExc_ValueError, "tensor_memory needs a dense, contiguous CPU tensor");
        goto done;
    }
    esize = st_aten.dtype_element_size(dtype);
    if (numel < 0 || (esize && (uint64_t)numel > (uint64_t)PY_SSIZE_T_MAX / esize)) {
        PyErr_SetString(PyExc_OverflowError, "the tensor is too large for a buffer");
        goto done;
    }
    if (numel > 0 && st_aten.get_data_ptr(h, &p) != 0) {
        st_py_raise_aten(PyExc_RuntimeError, "cannot read the tensor's data", NULL);
        goto done;
    }
    s = PyObject_New(Span, &Span_Type);
    if (!s)
        goto done;
    s->owner = Py_NewRef(tensor);
    s->buf = numel > 0 ? p : NULL;
    s->len = (Py_ssize_t)((size_t)numel * esize);
    s->readonly = !writable;
done:
    if (h)
        st_aten.delete_tensor(h);
    Py_XDECREF(list);
    return (PyObject *)s;
}

/* ---- snapshots for async saves ---- */

/* One thread's share of a snapshot: bytes [from, to) of the concatenated segments. */
typedef struct {
    uint8_t *dst;
    const uint8_t *const *src;
    const size_t *off, *len;
    Py_ssize_t n;
    size_t from, to;
} copy_share;

static void *copy_share_run(void *arg)
{
    const copy_share *c = arg;
    size_t base = 0;
    for (Py_ssize_t i = 0; i < c->n && base < c->to; base += c->len[i], i++) {
        size_t lo, hi;
        if (!c->src[i] || base + c->len[i] <= c->from)
            continue;
        lo = c->from > base ? c->from - base : 0;
        hi = c->to - base < c->len[i] ? c->to - base : c->len[i];
        memcpy(c->dst + c->off[i] + lo, c->src[i] + lo, hi - lo);
    }
    return NULL;
}

/* Bytes below which one thread copies alone; the most threads a snapshot uses. */
#define ST_COPY_PARALLEL_MIN ((size_t)64 << 20)
#define ST_COPY_THREADS 4

/* Copies the segments, split by bytes over up to ST_COPY_THREADS threads: a snapshot is
 * bound by memory bandwidth, which one core does not saturate. Runs without the GIL. */
static void copy_segments(uint8_t *dst, const uint8_t *const *src, const size_t *off,
                          const size_t *len, Py_ssize_t n)
{
    copy_share shares[ST_COPY_THREADS];
    pthread_t tids[ST_COPY_THREADS];
    int started[ST_COPY_THREADS] = {0};
    size_t total = 0, copied = 0;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int nt = cpus > ST_COPY_THREADS ? ST_COPY_THREADS : (cpus > 1 ? (int)cpus : 1);
    /* the shares count every segment's bytes (skipped ones too); overlapping items could
     * make the sum overflow, and then one thread copies in order */
    for (Py_ssize_t i = 0; i < n && nt > 1; i++) {
        if (len[i] > SIZE_MAX - total)
            nt = 1;
        else
            total += len[i];
        copied += src[i] ? len[i] : 0;
    }
    if (nt == 1 || copied < ST_COPY_PARALLEL_MIN) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (src[i] && len[i])
                memcpy(dst + off[i], src[i], len[i]);
        return;
    }
    for (int k = 0; k < nt; k++) {
        shares[k] = (copy_share){dst, src, off, len, n, total / (size_t)nt * (size_t)k,
                                 k == nt - 1 ? total : total / (size_t)nt * (size_t)(k + 1)};
        if (k > 0)
            started[k] = pthread_create(&tids[k], NULL, copy_share_run, &shares[k]) == 0;
    }
    copy_share_run(&shares[0]);
    for (int k = 1; k < nt; k++) {
        if (started[k])
            pthread_join(tids[k], NULL);
        else
            copy_share_run(&shares[k]); /* no thread: copy it here */
    }
}

/* snapshot(items, dst) -> list of the indices it did not copy. items is a list of
 * (tensor, offset, nbytes); each contiguous CPU tensor's bytes are copied into the
 * writable buffer dst at offset, without the GIL. The others (strided, off-CPU) are
 * left to the caller. */
static PyObject *mod_snapshot(PyObject *self, PyObject *args)
{
    PyObject *items_arg, *items = NULL, *tensors = NULL, *rest = NULL, *result = NULL;
    Py_buffer dst;
    Py_ssize_t n = 0;
    st_tensor *handles = NULL;
    const uint8_t **src = NULL;
    size_t *off = NULL, *len = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "Ow*:snapshot", &items_arg, &dst))
        return NULL;
    if (!st_aten.ready || !st_py_tensor_type()) {
        PyErr_SetString(PyExc_RuntimeError, "libtorch's C ABI is not available");
        goto done;
    }
    /* a private tuple: nothing below may change it */
    items = PySequence_Tuple(items_arg);
    if (!items)
        goto done;
    n = PyTuple_GET_SIZE(items);
    tensors = PyList_New(n);
    rest = PyList_New(0);
    handles = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(*handles));
    src = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(*src));
    off = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(*off));
    len = PyMem_Calloc((size_t)n ? (size_t)n : 1, sizeof(*len));
    if (!tensors || !rest || !handles || !src || !off || !len) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyTuple_GET_ITEM(items, i), *t;
        unsigned long long o, l;
        if (!PyTuple_Check(it) || !PyArg_ParseTuple(it, "OKK", &t, &o, &l)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "items must be (tensor, offset, nbytes) tuples");
            goto done;
        }
        if (!PyObject_TypeCheck(t, (PyTypeObject *)st_py_tensor_type())) {
            PyErr_Format(PyExc_TypeError, "expected a Tensor, got %.100s", Py_TYPE(t)->tp_name);
            goto done;
        }
        if (l > (unsigned long long)dst.len || o > (unsigned long long)dst.len - l) {
            PyErr_SetString(PyExc_ValueError, "a snapshot item lies outside the buffer");
            goto done;
        }
        off[i] = (size_t)o;
        len[i] = (size_t)l;
        PyList_SET_ITEM(tensors, i, Py_NewRef(t));
    }
    if (n && tensors_to_handles(tensors, handles, n) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t layout, device, dtype;
        int64_t numel;
        bool contiguous;
        void *p = NULL;
        int copy = st_aten.get_layout(handles[i], &layout) == 0 &&
                   st_aten.get_device_type(handles[i], &device) == 0 &&
                   st_aten.get_dtype(handles[i], &dtype) == 0 &&
                   st_aten.get_numel(handles[i], &numel) == 0 &&
                   st_aten.is_contiguous(handles[i], &contiguous) == 0 &&
                   layout == st_aten.layout_strided && device == st_aten.device_cpu &&
                   contiguous && numel >= 0 &&
                   (uint64_t)numel * st_aten.dtype_element_size(dtype) == len[i] &&
                   (len[i] == 0 || st_aten.get_data_ptr(handles[i], &p) == 0);
        if (copy) {
            src[i] = p;
        } else {
            PyObject *idx = PyLong_FromSsize_t(i);
            if (!idx || PyList_Append(rest, idx) < 0) {
                Py_XDECREF(idx);
                goto done;
            }
            Py_DECREF(idx);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    copy_segments((uint8_t *)dst.buf, src, off, len, n);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(rest);
done:
    if (handles)
        for (Py_ssize_t i = 0; i < n; i++)
            if (handles[i])
                st_aten.delete_tensor(handles[i]);
    PyMem_Free(handles);
    PyMem_Free(src);
    PyMem_Free(off);
    PyMem_Free(len);
    Py_XDECREF(items);
    Py_XDECREF(tensors);
    Py_XDECREF(rest);
    PyBuffer_Release(&dst);
    return result;
}

/* ---- headers read from streams ---- */

/* Decodes table strings; NULL with an exception on failure. */
static PyObject *table_str(const st_table *t, size_t off, size_t len)
{
    return PyUnicode_DecodeUTF8(t->strings + off, (Py_ssize_t)len, "strict");
}

/* (data_len, [(name, dtype, shape, begin, end), ...] in file order, metadata or None)
 * for a validated table; begin and end count from the data buffer. */
static PyObject *table_summary(const st_table *t)
{
    PyObject *entries = PyList_New((Py_ssize_t)t->count), *meta = NULL, *out = NULL;
    if (!entries)
        return NULL;
    for (size_t i = 0; i < t->count; i++) {
        const st_entry *e = &t->entries[i];
        PyObject *name = table_str(t, e->name_off, e->name_len), *item;
        PyObject *shape = PyTuple_New((Py_ssize_t)e->ndim);
        if (!name || !shape) {
            Py_XDECREF(name);
            Py_XDECREF(shape);
            goto done;
        }
        for (size_t d = 0; d < e->ndim; d++) {
            PyObject *v = PyLong_FromUnsignedLongLong(t->dims[e->dims_off + d]);
            if (!v) {
                Py_DECREF(name);
                Py_DECREF(shape);
                goto done;
            }
            PyTuple_SET_ITEM(shape, (Py_ssize_t)d, v);
        }
        item = Py_BuildValue("NsNKK", name, st_dtype_name(e->dtype), shape,
                             (unsigned long long)e->begin, (unsigned long long)e->end);
        if (!item)
            goto done;
        PyList_SET_ITEM(entries, (Py_ssize_t)i, item);
    }
    if (t->has_metadata) {
        meta = PyDict_New();
        if (!meta)
            goto done;
        for (size_t i = 0; i < t->meta_count; i++) {
            const st_meta *m = &t->meta[i];
            PyObject *k = table_str(t, m->key_off, m->key_len);
            PyObject *v = k ? table_str(t, m->val_off, m->val_len) : NULL;
            int bad = !v || PyDict_SetItem(meta, k, v) < 0;
            Py_XDECREF(k);
            Py_XDECREF(v);
            if (bad)
                goto done;
        }
    } else {
        meta = Py_NewRef(Py_None);
    }
    out = Py_BuildValue("KOO", (unsigned long long)t->data_len, entries, meta);
done:
    Py_XDECREF(meta);
    Py_DECREF(entries);
    return out;
}

/* parse_header(head, file_len=None) -> (data_len, entries, metadata): validates head
 * (the 8-byte prefix and the whole header) as the reader does. With file_len the
 * rules are the reader's exactly; without (a stream of unknown length) the length rule
 * is left to the caller, who reads exactly data_len bytes next. */
static PyObject *mod_parse_header(PyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"head", "file_len", NULL};
    Py_buffer head;
    PyObject *file_len_obj = Py_None, *result = NULL;
    uint64_t file_len = UINT64_MAX, n = 0;
    st_table table;
    st_error err;
    st_code rc;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|O:parse_header", kwlist, &head,
                                     &file_len_obj))
        return NULL;
    st_table_init(&table);
    if (file_len_obj != Py_None) {
        file_len = PyLong_AsUnsignedLongLong(file_len_obj);
        if (PyErr_Occurred())
            goto done;
    }
    rc = st_read_prefix(head.buf, (size_t)head.len, file_len, &n, &err);
    if (rc != ST_OK) {
        st_py_raise_st(&err, "invalid safetensors data");
        goto done;
    }
    if ((uint64_t)head.len - ST_PREFIX_LEN != n) {
        PyErr_SetString(PyExc_ValueError, "head must hold the 8-byte prefix and the header");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = st_parse_header((const uint8_t *)head.buf + ST_PREFIX_LEN, (size_t)n, file_len, &table,
                         &err);
    Py_END_ALLOW_THREADS
    /* without a length every table ends in the length rule, after all the others */
    if (rc == ST_OK || (rc == ST_ERR_FILE_LENGTH && file_len_obj == Py_None))
        result = table_summary(&table);
    else
        st_py_raise_st(&err, "invalid safetensors data");
done:
    st_table_free(&table);
    PyBuffer_Release(&head);
    return result;
}

/* ---- registration ---- */

static PyMethodDef write_methods[] = {
    {"save", (PyCFunction)(void (*)(void))mod_save, METH_VARARGS | METH_KEYWORDS,
     "save(tensors, metadata=None, path=None, *, durable=False, check_shared=True, "
     "plan_only=False)"},
    {"tensor_memory", (PyCFunction)(void (*)(void))mod_tensor_memory,
     METH_VARARGS | METH_KEYWORDS,
     "tensor_memory(tensor, *, writable=False): a contiguous CPU tensor's bytes as a buffer."},
    {"snapshot", mod_snapshot, METH_VARARGS,
     "snapshot(items, dst): copies contiguous CPU tensors into dst; returns the others."},
    {"parse_header", (PyCFunction)(void (*)(void))mod_parse_header,
     METH_VARARGS | METH_KEYWORDS,
     "parse_header(head, file_len=None) -> (data_len, entries, metadata), validated."},
    {NULL, NULL, 0, NULL},
};

int st_write_register(PyObject *module)
{
    str_is_conj = PyUnicode_InternFromString("is_conj");
    str_is_neg = PyUnicode_InternFromString("is_neg");
    str_resolve_conj = PyUnicode_InternFromString("resolve_conj");
    str_resolve_neg = PyUnicode_InternFromString("resolve_neg");
    if (!str_is_conj || !str_is_neg || !str_resolve_conj || !str_resolve_neg)
        return -1;
    if (PyType_Ready(&Span_Type) < 0 ||
        PyModule_AddObjectRef(module, "Span", (PyObject *)&Span_Type) < 0)
        return -1;
    return PyModule_AddFunctions(module, write_methods);
}
