/* legacy_module.c: the Python binding of the legacy checkpoint engine: reads a torch zip
 * checkpoint's records, runs st_pickle.c on data.pkl and builds the objects it plans. */
#include "legacy_module.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "st_binding.h"
#include "st_file.h"
#include "st_pickle.h"

/* ---- state set once by legacy_init (objects from the loading process, not the file) ---- */

static PyObject *odict_type, *size_type, *device_type, *param_type, *dtype_objs;
static PyObject *str_requires_grad, *str_backward_hooks;
static int32_t aten_dtype[SP_DTYPE_COUNT];

static PyObject *legacy_init(PyObject *self, PyObject *args)
{
    PyObject *od, *sz, *dev, *par, *dts;
    char name[64];
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOO!:legacy_init", &od, &sz, &dev, &par, &PyTuple_Type, &dts))
        return NULL;
    if (PyTuple_GET_SIZE(dts) != SP_DTYPE_COUNT) {
        PyErr_SetString(PyExc_ValueError, "legacy_init: one dtype per legacy_dtype_names()");
        return NULL;
    }
    Py_XSETREF(odict_type, Py_NewRef(od));
    Py_XSETREF(size_type, Py_NewRef(sz));
    Py_XSETREF(device_type, Py_NewRef(dev));
    Py_XSETREF(param_type, Py_NewRef(par));
    Py_XSETREF(dtype_objs, Py_NewRef(dts));
    for (int d = 0; d < SP_DTYPE_COUNT; d++) {
        snprintf(name, sizeof(name), "aoti_torch_dtype_%s", sp_dtype_name(d));
        aten_dtype[d] = st_aten_code(name);
    }
    Py_RETURN_NONE;
}

static PyObject *legacy_dtype_names(PyObject *self, PyObject *unused)
{
    PyObject *t = PyTuple_New(SP_DTYPE_COUNT);
    (void)self;
    (void)unused;
    if (!t)
        return NULL;
    for (int d = 0; d < SP_DTYPE_COUNT; d++) {
        PyObject *s = PyUnicode_FromString(sp_dtype_name(d));
        if (!s) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, d, s);
    }
    return t;
}

/* ---- a forward read window over the file (local headers and small records) ---- */

#define WINDOW (1u << 20)

typedef struct {
    int fd;
    PyObject *fobj;       /* a seekable file object instead of fd (borrowed), or NULL */
    int readinto;         /* fobj has readinto: bytes go straight into their memory */
    uint64_t size;
    uint8_t *buf;
    uint64_t start;
    size_t len;
} window;

/* errno of a read whose Python exception is already set (a file object raised) */
#define EPYERR ECANCELED

/* n bytes at off from a file object: seek, then readinto (or read) until done. With the
 * GIL. Returns 0, or -1 with errno (ENODATA: it ended first; EPYERR: it raised). */
static int fobj_pread(const window *w, void *buf, size_t n, uint64_t off)
{
    PyObject *r = PyObject_CallMethod(w->fobj, "seek", "K", (unsigned long long)off);
    size_t got = 0;
    if (!r)
        goto pyerr;
    Py_DECREF(r);
    while (got < n) {
        size_t want = n - got < ((size_t)1 << 30) ? n - got : ((size_t)1 << 30);
        Py_ssize_t k;
        if (w->readinto) {
            PyObject *mv = PyMemoryView_FromMemory((char *)buf + got, (Py_ssize_t)want, PyBUF_WRITE);
            if (!mv)
                goto pyerr;
            r = PyObject_CallMethod(w->fobj, "readinto", "O", mv);
            /* the file object must not keep writing into our memory after the call */
            Py_XDECREF(PyObject_CallMethod(mv, "release", NULL));
            Py_DECREF(mv);
            if (!r)
                goto pyerr;
            k = r == Py_None ? -1 : PyLong_AsSsize_t(r);
        } else {
            char *data;
            r = PyObject_CallMethod(w->fobj, "read", "n", (Py_ssize_t)want);
            if (!r)
                goto pyerr;
            if (PyBytes_AsStringAndSize(r, &data, &k) < 0) {
                Py_DECREF(r);
                goto pyerr;
            }
            if ((size_t)k <= want)
                memcpy((char *)buf + got, data, (size_t)k);
        }
        Py_DECREF(r);
        if (k == -1 && PyErr_Occurred())
            goto pyerr;
        if (k < 0 || (size_t)k > want) {
            PyErr_SetString(PyExc_OSError, "the file object's read returned more than asked for, "
                                           "or no bytes of a blocking read");
            goto pyerr;
        }
        if (k == 0) {
            errno = ENODATA;
            return -1;
        }
        got += (size_t)k;
    }
    return 0;
pyerr:
    errno = EPYERR;
    return -1;
}

/* n bytes at off from the source: fd (the caller decides about the GIL) or file object
 * (with the GIL). 0, or -1 with errno. */
static int src_pread(const window *w, void *buf, size_t n, uint64_t off)
{
    return w->fobj ? fobj_pread(w, buf, n, off) : st_pread_all(w->fd, buf, n, off);
}

/* src_pread from code holding the GIL: released around a descriptor's read */
static int src_read_gil(const window *w, void *buf, size_t n, uint64_t off)
{
    int rc;
    if (w->fobj)
        return fobj_pread(w, buf, n, off);
    Py_BEGIN_ALLOW_THREADS
    rc = st_pread_all(w->fd, buf, n, off);
    Py_END_ALLOW_THREADS
    return rc;
}

/* Points *out at n bytes at off. A miss refills the window from off: all of it when more
 * small reads follow nearby (readahead), else just the n bytes (a header before a large
 * record, which is read on its own). Returns 0, or -1 with errno (ENODATA: past the end). */
static int win_read(window *w, uint64_t off, size_t n, int readahead, const uint8_t **out)
{
    size_t want;
    if (off <= w->size && n <= w->size - off && off >= w->start && w->len >= n &&
        off - w->start <= w->len - n) {
        *out = w->buf + (off - w->start);
        return 0;
    }
    if (n > WINDOW || off > w->size || n > w->size - off) {
        errno = ENODATA;
        return -1;
    }
    want = readahead ? (size_t)(w->size - off < WINDOW ? w->size - off : WINDOW) : n;
    if (src_pread(w, w->buf, want, off) != 0)
        return -1;
    w->start = off;
    w->len = want;
    *out = w->buf;
    return 0;
}

static int win_get(window *w, uint64_t off, size_t n, const uint8_t **out)
{
    return win_read(w, off, n, 1, out);
}

/* ---- the zip directory: names sorted case-insensitively, as miniz looks them up ---- */

typedef struct {
    const uint8_t *name;
    size_t len;
    uint32_t idx;
} name_ref;

static int ci_cmp(const uint8_t *a, size_t al, const uint8_t *b, size_t bl)
{
    size_t n = al < bl ? al : bl, i = 0;
    for (;;) {
        /* equal bytes are equal without regard to case too: skip runs of them, eight
         * at a time (names share long prefixes), and fold only where they differ */
        while (i + 8 <= n) {
            uint64_t x, y;
            memcpy(&x, a + i, 8);
            memcpy(&y, b + i, 8);
            if (x != y)
                break;
            i += 8;
        }
        while (i < n && a[i] == b[i])
            i++;
        if (i == n)
            return al < bl ? -1 : al > bl;
        {
            int x = a[i] >= 'A' && a[i] <= 'Z' ? a[i] + 32 : a[i];
            int y = b[i] >= 'A' && b[i] <= 'Z' ? b[i] + 32 : b[i];
            if (x != y)
                return x - y;
        }
        i++;
    }
}

static int ref_cmp_exact(const void *pa, const void *pb)
{
    const name_ref *a = pa, *b = pb;
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(a->name, b->name, n);
    return c ? c : (a->len < b->len ? -1 : a->len > b->len);
}

static int ref_cmp_exact_then_idx(const void *pa, const void *pb)
{
    const name_ref *a = pa, *b = pb;
    int c = ref_cmp_exact(pa, pb);
    return c ? c : (a->idx < b->idx ? -1 : a->idx > b->idx);
}

/* the first of refs (sorted by ref_cmp_exact_then_idx) with key's name, or NULL */
static name_ref *first_match(name_ref *refs, size_t n, const name_ref *key)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ref_cmp_exact(&refs[mid], key) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && ref_cmp_exact(&refs[lo], key) == 0 ? &refs[lo] : NULL;
}

/* ---- torch's zip lookup (miniz): names heap-sorted without regard to ASCII case,
 * then a binary search; with names equal but for case, this picks the one torch reads ---- */

static int mz_less(const name_ref *a, const name_ref *b)
{
    return ci_cmp(a->name, a->len, b->name, b->len) < 0;
}

static void mz_sift(name_ref *r, size_t root, size_t end)
{
    for (;;) {
        size_t child = 2 * root + 1;
        name_ref t;
        if (child >= end)
            return;
        if (child + 1 < end && mz_less(&r[child], &r[child + 1]))
            child++;
        if (!mz_less(&r[root], &r[child]))
            return;
        t = r[root];
        r[root] = r[child];
        r[child] = t;
        root = child;
    }
}

/* refs in directory order -> the order miniz sorts them in (an unstable heap sort) */
static void mz_sort(name_ref *r, size_t n)
{
    if (n <= 1)
        return;
    for (size_t start = (n - 2) / 2 + 1; start-- > 0;)
        mz_sift(r, start, n);
    for (size_t end = n - 1; end > 0; end--) {
        name_ref t = r[end];
        r[end] = r[0];
        r[0] = t;
        mz_sift(r, 0, end);
    }
}

/* The n records' names in the order miniz sorts them (malloc'd), or NULL: no memory. */
static name_ref *mz_sorted(const sp_zip_entry *es, size_t n)
{
    name_ref *r = malloc((n ? n : 1) * sizeof(name_ref));
    if (!r)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        r[i].name = es[i].name;
        r[i].len = es[i].name_len;
        r[i].idx = (uint32_t)i;
    }
    mz_sort(r, n);
    return r;
}

static name_ref *mz_search(name_ref *r, size_t n, const name_ref *key)
{
    long long lo = 0, hi = (long long)n - 1;
    while (lo <= hi) {
        long long mid = lo + ((hi - lo) >> 1);
        int c = ci_cmp(r[mid].name, r[mid].len, key->name, key->len);
        if (!c)
            return &r[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}

/* ---- the records' names, for torch's lookups ----
 * With no two names equal but for case, the record miniz's search finds for a name is
 * the only one equal to it without regard to case: a hash of the case-folded names finds
 * it in O(1), and no sort is needed. Otherwise (or if names collide in the hash more than
 * MAX_PROBE times: crafted names cost O(n log n), never O(n^2)) miniz's sort and search
 * run as torch runs them. */

#define MAX_PROBE 64

typedef struct {
    const sp_zip_entry *es;
    size_t n;
    uint32_t *slot; /* entry index + 1 per slot (0: empty); NULL when refs is used */
    size_t mask;
    unsigned max_probe;
    name_ref *refs; /* miniz's order, when the hash cannot stand in for it */
} name_table;

static size_t ci_hash(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a over the case-folded bytes */
    for (size_t i = 0; i < n; i++) {
        h ^= (uint64_t)(p[i] >= 'A' && p[i] <= 'Z' ? p[i] + 32 : p[i]);
        h *= 1099511628211ull;
    }
    return (size_t)(h ^ (h >> 29));
}

static int hash_names(name_table *t)
{
    size_t cap = 16;
    if (t->n > SIZE_MAX / 8)
        return 0; /* no table that large: miniz's way */
    while (cap < 2 * t->n)
        cap <<= 1;
    if (!(t->slot = calloc(cap, sizeof(uint32_t))))
        return -1;
    t->mask = cap - 1;
    for (size_t i = 0; i < t->n; i++) {
        const sp_zip_entry *e = &t->es[i];
        size_t h = ci_hash(e->name, e->name_len) & t->mask;
        unsigned probe = 0;
        for (; t->slot[h]; h = (h + 1) & t->mask) {
            const sp_zip_entry *o = &t->es[t->slot[h] - 1];
            if (++probe > MAX_PROBE || ci_cmp(o->name, o->name_len, e->name, e->name_len) == 0) {
                free(t->slot); /* equal but for case, or crafted collisions: miniz's way */
                t->slot = NULL;
                return 0;
            }
        }
        t->slot[h] = (uint32_t)i + 1;
        if (probe > t->max_probe)
            t->max_probe = probe;
    }
    return 0;
}

/* Indexes the n records' names (each entry's index must fit in 32 bits). 0, or -1 when
 * out of memory. */
static int names_build(name_table *t, const sp_zip_entry *es, size_t n)
{
    memset(t, 0, sizeof(*t));
    t->es = es;
    t->n = n;
    if (hash_names(t) != 0)
        return -1;
    if (t->slot)
        return 0;
    return (t->refs = mz_sorted(es, n)) ? 0 : -1;
}

static void names_free(name_table *t)
{
    free(t->slot);
    free(t->refs);
    t->slot = NULL;
    t->refs = NULL;
}

/* Index of the entry torch's zip reader finds for prefix + rest, or -1 (-2: no memory).
 * It looks names up as C strings: the name ends at its first NUL byte. */
static long find_entry(const name_table *t, const uint8_t *prefix, size_t plen,
                       const char *rest, size_t rlen)
{
    uint8_t small[512], *key = small;
    const char *nul = memchr(rest, 0, rlen);
    long found = -1;
    if (nul)
        rlen = (size_t)(nul - rest);
    if (plen + rlen > sizeof(small) && !(key = malloc(plen + rlen)))
        return -2;
    memcpy(key, prefix, plen);
    memcpy(key + plen, rest, rlen);
    if (t->slot) {
        size_t h = ci_hash(key, plen + rlen) & t->mask;
        /* an inserted name lies within max_probe slots of its own */
        for (unsigned probe = 0; probe <= t->max_probe && t->slot[h]; probe++, h = (h + 1) & t->mask) {
            const sp_zip_entry *o = &t->es[t->slot[h] - 1];
            if (ci_cmp(o->name, o->name_len, key, plen + rlen) == 0) {
                found = (long)t->slot[h] - 1;
                break;
            }
        }
    } else {
        name_ref k = {key, plen + rlen, 0}, *hit = mz_search(t->refs, t->n, &k);
        found = hit ? (long)hit->idx : -1;
    }
    if (key != small)
        free(key);
    return found;
}

/* Whether a record's name, as torch lists it (a C string in a 512-byte buffer), is
 * prefix + rest. */
static int listed_as(const sp_zip_entry *e, const uint8_t *prefix, size_t plen, const char *rest)
{
    const uint8_t *nul = memchr(e->name, 0, e->name_len);
    size_t len = nul ? (size_t)(nul - e->name) : e->name_len, rlen = strlen(rest);
    if (len > 511)
        len = 511;
    return len == plen + rlen && memcmp(e->name, prefix, plen) == 0 &&
           memcmp(e->name + plen, rest, rlen) == 0;
}

/* ---- one load ---- */

struct lrec {
    uint64_t data_off, size;
};

typedef struct {
    long entry;        /* zip entry of the record */
    uint64_t nbytes;   /* what the pickle claims */
    uint64_t data_off; /* where the record's bytes begin */
    int dtype;         /* of the tensors built over it; -1 until the first */
    st_tensor base;
    int given;         /* base handed to a tensor as is */
    int bad;           /* mmap: 1 a compressed record, 2 a short one (refused if used) */
} slot;

typedef struct {
    int fd, use_mmap;
    int unaligned;        /* convert: mapped storages need no element alignment */
    uint64_t size;
    window win;
    sp_zip_entry *entries;
    size_t n_entries;
    name_table names;
    uint8_t *tail, *cd, *owned;
    const uint8_t *pkl;   /* data.pkl (zip) or the main pickle (pre-1.6), inside owned */
    size_t pkl_len;
    sp_plan plan;
    slot *slots;
    size_t n_slots;
    uint32_t *slot_of;    /* per node: slot index + 1 for STORAGE nodes */
    st_blob *blob;
    st_tensor *handles;   /* per tensor node, in node order */
    PyObject **objs;      /* per node, while building */
    int legacy;           /* the pre-1.6 format: records are the keys after the pickles */
    name_ref *lkeys;      /* pre-1.6: storage keys sorted; idx into lrecs */
    struct lrec *lrecs;   /* pre-1.6: each key's bytes, in file order */
    size_t n_lkeys;
    sp_plan keys_plan;    /* pre-1.6: the pickled list of keys */
    const char *reason;   /* why torch's loader decides, when set */
    int records_checked;
    int depth;
    char refusal[768];    /* set: refuse the file unless torch refuses it first */
} load_state;

static void blob_release(void *data, void *ctx)
{
    (void)data;
    st_blob_decref((st_blob *)ctx);
}

static PyObject *raise_errno_fd(int e)
{
    if (e == EPYERR && PyErr_Occurred())
        return NULL; /* a file object raised: its exception stands */
    if (e == ENODATA) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the checkpoint is shorter than its zip directory says: it was "
                        "truncated or is being written");
        return NULL;
    }
    errno = e;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* A file torch.load(mmap=True) would fill with other bytes: the message for the caller,
 * which raises it only if torch's own loader accepts the file (else torch's error wins).
 * Returns 1, as FALLBACK does. */
static int refuse(load_state *st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st->refusal, sizeof(st->refusal), fmt, ap);
    va_end(ap);
    st->reason = "refused";
    return 1;
}

#define FALLBACK(why)                                                                          \
    do {                                                                                       \
        st->reason = (why);                                                                    \
        return 1;                                                                              \
    } while (0)

/* Reads the directory and data.pkl, runs the engine. 0: go on; 1: torch decides; -1: raised */
static int read_archive(load_state *st, int default_little)
{
    sp_error err;
    sp_zip_dir dir;
    size_t tail_len = (size_t)(st->size < SP_ZIP_TAIL ? st->size : SP_ZIP_TAIL);
    const uint8_t *lh, *prefix, *slash;
    size_t plen;
    long ipkl, iv, ibo;
    uint64_t off;
    int rc;

    if (st->size < 30)
        FALLBACK("too short for a zip");
    st->tail = malloc(tail_len);
    if (!st->tail) {
        PyErr_NoMemory();
        return -1;
    }
    rc = src_read_gil(&st->win, st->tail, tail_len, st->size - tail_len);
    if (rc != 0) {
        raise_errno_fd(errno);
        return -1;
    }
    if (sp_zip_find_dir(st->tail, tail_len, st->size, &dir, &err) != SP_OK)
        FALLBACK("no zip directory the reader understands");
    st->cd = malloc(dir.cd_size ? (size_t)dir.cd_size : 1);
    if (!st->cd) {
        PyErr_NoMemory();
        return -1;
    }
    rc = src_read_gil(&st->win, st->cd, (size_t)dir.cd_size, dir.cd_offset);
    if (rc != 0) {
        raise_errno_fd(errno);
        return -1;
    }
    if (sp_zip_parse_dir(st->cd, (size_t)dir.cd_size, &dir, st->size, &st->entries, &err) !=
        SP_OK) {
        if (err.code == SP_NOMEM) {
            PyErr_NoMemory();
            return -1;
        }
        FALLBACK("a zip directory the reader does not understand");
    }
    st->n_entries = (size_t)dir.count;
    /* torch names the archive after its first record's folder */
    if (st->n_entries == 0)
        FALLBACK("an empty zip");
    if (names_build(&st->names, st->entries, st->n_entries) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    prefix = st->entries[0].name;
    slash = memchr(prefix, '/', st->entries[0].name_len);
    if (!slash)
        FALLBACK("the first record is not in a folder");
    plen = (size_t)(slash - prefix) + 1;
    /* the folder as torch's lookups see it: a C string, listed in a 512-byte buffer */
    if (memchr(prefix, 0, plen) || plen > 256)
        FALLBACK("an archive folder name with a NUL byte or too long");
    for (size_t i = 0; i < st->n_entries; i++)
        if (st->entries[i].name_len < plen || memcmp(st->entries[i].name, prefix, plen) != 0)
            FALLBACK("a record outside the archive's folder"); /* torch refuses */
    /* names equal but for case: every lookup picks the record torch's reader picks */
    /* torch's test: "constants.pkl" among the names it lists (cut at a NUL byte) */
    for (size_t i = 0; i < st->n_entries; i++)
        if (listed_as(&st->entries[i], prefix, plen, "constants.pkl"))
            FALLBACK("a TorchScript archive");
    /* torch reads .data/version when there is one, else version */
    iv = find_entry(&st->names, prefix, plen, ".data/version", 13);
    if (iv < 0)
        iv = find_entry(&st->names, prefix, plen, "version", 7);
    ipkl = find_entry(&st->names, prefix, plen, "data.pkl", 8);
    ibo = find_entry(&st->names, prefix, plen, "byteorder", 9);
    if (iv < 0 || ipkl < 0)
        FALLBACK("no version or data.pkl record");
    {
        /* the small records torch reads besides: readable, and .storage_alignment a number */
        /* digits: 1 a decimal number (int()), 2 UTF-8 text (returned as str) */
        static const struct {
            const char *name;
            int digits;
        } small[] = {{".format_version", 0}, {".storage_alignment", 1}, {".data/serialization_id", 2}};
        for (size_t k = 0; k < sizeof(small) / sizeof(small[0]); k++) {
            long ix = find_entry(&st->names, prefix, plen, small[k].name,
                                 strlen(small[k].name));
            const sp_zip_entry *e;
            uint64_t doff;
            if (ix < 0)
                continue;
            e = &st->entries[ix];
            if (e->method != 0 || e->size > 4096)
                FALLBACK("a small record the reader does not understand");
            if (win_get(&st->win, e->local_offset, 30, &lh) != 0) {
                raise_errno_fd(errno);
                return -1;
            }
            if (sp_zip_data_offset(lh, 30, e, st->size, &doff, &err) != SP_OK)
                FALLBACK("a small record the reader does not understand");
            if (small[k].digits == 2) {
                if (win_get(&st->win, doff, (size_t)e->size, &lh) != 0 ||
                    !sp_utf8_ok(lh, (size_t)e->size, 0))
                    FALLBACK("a serialization id that is not UTF-8");
            } else if (small[k].digits) {
                if (e->size == 0 || win_get(&st->win, doff, (size_t)e->size, &lh) != 0)
                    FALLBACK("a storage alignment that is not a number");
                for (size_t c = 0; c < e->size; c++)
                    if (lh[c] < '0' || lh[c] > '9')
                        FALLBACK("a storage alignment that is not a number");
            }
        }
    }
    {
        /* the version torch 2.13 reads: 1 to 10, as ASCII digits with an optional newline */
        const sp_zip_entry *e = &st->entries[iv];
        uint64_t voff;
        long v = 0;
        size_t n;
        if (e->method != 0 || e->size > 3 || e->size == 0)
            FALLBACK("a version record the reader does not understand");
        if (win_get(&st->win, e->local_offset, 30, &lh) != 0) {
            raise_errno_fd(errno);
            return -1;
        }
        if (sp_zip_data_offset(lh, 30, e, st->size, &voff, &err) != SP_OK ||
            win_get(&st->win, voff, (size_t)e->size, &lh) != 0)
            FALLBACK("a version record the reader does not understand");
        n = (size_t)e->size;
        if (lh[n - 1] == '\n')
            n--;
        for (size_t i = 0; i < n; i++) {
            if (lh[i] < '0' || lh[i] > '9')
                FALLBACK("a version record the reader does not understand");
            v = v * 10 + (lh[i] - '0');
        }
        if (n == 0 || v < 1 || v > 10)
            FALLBACK("a version torch would refuse");
    }
    if (ibo >= 0) {
        const sp_zip_entry *e = &st->entries[ibo];
        uint64_t boff;
        if (e->method != 0 || e->size != 6)
            FALLBACK("a byte order other than little");
        if (win_get(&st->win, e->local_offset, 30, &lh) != 0) {
            raise_errno_fd(errno);
            return -1;
        }
        if (sp_zip_data_offset(lh, 30, e, st->size, &boff, &err) != SP_OK ||
            win_get(&st->win, boff, 6, &lh) != 0 || memcmp(lh, "little", 6) != 0)
            FALLBACK("a byte order other than little");
    } else if (!default_little) {
        FALLBACK("no byte order record, and torch's default load endianness is not little");
    }
    {
        const sp_zip_entry *e = &st->entries[ipkl];
        if (e->method != 0)
            FALLBACK("a compressed data.pkl");
        if (win_get(&st->win, e->local_offset, 30, &lh) != 0) {
            raise_errno_fd(errno);
            return -1;
        }
        if (sp_zip_data_offset(lh, 30, e, st->size, &off, &err) != SP_OK)
            FALLBACK("a data.pkl record the reader does not understand");
        if (e->size > SP_MAX_PICKLE)
            FALLBACK("a data.pkl too large for the reader");
        st->pkl_len = (size_t)e->size;
        st->owned = malloc(st->pkl_len ? st->pkl_len : 1);
        if (!st->owned) {
            PyErr_NoMemory();
            return -1;
        }
        st->pkl = st->owned;
        rc = src_read_gil(&st->win, st->owned, st->pkl_len, off);
        if (rc != 0) {
            raise_errno_fd(errno);
            return -1;
        }
    }
    if (sp_pickle_run(st->pkl, st->pkl_len, &st->plan, &err) != SP_OK) {
        if (err.code == SP_NOMEM) {
            PyErr_NoMemory();
            return -1;
        }
        FALLBACK("data.pkl is outside the reader's subset");
    }
    (void)plen;
    return 0;
}

/* ---- the pre-1.6 format: magic, protocol, sys_info, the object, keys, raw storages ---- */

/* the first two pickles exactly as torch writes them: the magic number and 1001 */
static const uint8_t LEGACY_HEAD[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20,
                                      0x6a, 0xa8, 0x50, 0x19, 0x2e, 0x80, 0x02, 0x4d, 0xe9, 0x03,
                                      0x2e};

/* Reads the pickles and lays out the storages that follow. 0, 1 (torch decides), -1. */
static int read_legacy(load_state *st)
{
    size_t n = (size_t)(st->size < (1u << 20) ? st->size : (1u << 20));
    sp_error err;
    sp_plan info;
    size_t pos, main_at = 0, keys_at = 0;
    uint64_t off;
    int rc;
    memset(&info, 0, sizeof(info));
    for (;;) {
        sp_code c;
        uint8_t *buf = realloc(st->owned, n ? n : 1);
        if (!buf) {
            PyErr_NoMemory();
            return -1;
        }
        st->owned = buf;
        rc = src_read_gil(&st->win, buf, n, 0);
        if (rc != 0) {
            raise_errno_fd(errno);
            return -1;
        }
        if (n < sizeof(LEGACY_HEAD) || memcmp(buf, LEGACY_HEAD, sizeof(LEGACY_HEAD)) != 0)
            FALLBACK("not the pre-1.6 magic number and protocol");
        pos = sizeof(LEGACY_HEAD);
        sp_plan_free(&info);
        sp_plan_free(&st->plan);
        sp_plan_free(&st->keys_plan);
        /* sys_info: read and ignored, as torch does, but it must be in the subset */
        c = sp_pickle_run_ex(buf + pos, n - pos, 0, &info, &err);
        if (c == SP_OK) {
            pos += (size_t)info.stop;
            main_at = pos;
            c = sp_pickle_run_ex(buf + pos, n - pos, SP_RUN_LEGACY_IDS, &st->plan, &err);
        }
        if (c == SP_OK) {
            pos += (size_t)st->plan.stop;
            keys_at = pos;
            c = sp_pickle_run_ex(buf + pos, n - pos, 0, &st->keys_plan, &err);
        }
        if (c == SP_OK) {
            pos += (size_t)st->keys_plan.stop;
            break;
        }
        sp_plan_free(&info);
        if (c == SP_NOMEM) {
            PyErr_NoMemory();
            return -1;
        }
        if (c != SP_TRUNCATED || n == st->size)
            FALLBACK("a pre-1.6 pickle outside the reader's subset");
        /* the pickles run past what was read: read more */
        n = (size_t)(st->size - n < n * 3 ? st->size : n * 4);
    }
    sp_plan_free(&info);
    st->pkl = st->owned + main_at;
    st->pkl_len = keys_at - main_at;
    {
        /* the keys: a list of strings, each naming a storage of the object's pickle */
        const sp_plan *kp = &st->keys_plan;
        const sp_node *list = &kp->nodes[kp->root];
        const uint8_t *kbase = st->owned + keys_at;
        size_t i = 0;
        if (list->kind != SP_K_LIST)
            FALLBACK("pre-1.6 storage keys that are not a list");
        st->n_lkeys = list->n;
        st->lkeys = malloc((st->n_lkeys ? st->n_lkeys : 1) * sizeof(name_ref));
        st->lrecs = malloc((st->n_lkeys ? st->n_lkeys : 1) * sizeof(struct lrec));
        if (!st->lkeys || !st->lrecs) {
            PyErr_NoMemory();
            return -1;
        }
        for (uint32_t e = list->first; e; e = kp->edges[e].next, i++) {
            const sp_node *k = &kp->nodes[kp->edges[e].child];
            if (k->kind != SP_K_STR)
                FALLBACK("a pre-1.6 storage key that is not a string");
            st->lkeys[i].name = kbase + k->off;
            st->lkeys[i].len = k->len;
            st->lkeys[i].idx = (uint32_t)i;
        }
    }
    {
        /* the element size of each key: from the first storage that names it */
        name_ref *by_key = malloc((st->plan.n_storages ? st->plan.n_storages : 1) * sizeof(name_ref));
        size_t ns = 0;
        if (!by_key) {
            PyErr_NoMemory();
            return -1;
        }
        for (uint32_t id = 1; id < st->plan.n_nodes; id++) {
            const sp_node *nd = &st->plan.nodes[id];
            if (nd->kind != SP_K_STORAGE)
                continue;
            by_key[ns].name = st->pkl + st->plan.nodes[nd->a].off;
            by_key[ns].len = st->plan.nodes[nd->a].len;
            by_key[ns].idx = id;
            ns++;
        }
        qsort(by_key, ns, sizeof(name_ref), ref_cmp_exact_then_idx);
        off = pos;
        for (size_t i = 0; i < st->n_lkeys; i++) {
            name_ref *hit = first_match(by_key, ns, &st->lkeys[i]);
            const uint8_t *h;
            uint64_t numel, nbytes;
            unsigned esz;
            if (!hit) {
                free(by_key);
                FALLBACK("a pre-1.6 key that no storage names"); /* torch asserts */
            }
            esz = sp_dtype_size(st->plan.nodes[hit->idx].dtype);
            /* the previous storage's size predicts whether small ones follow */
            if (win_read(&st->win, off, 8, i == 0 || st->lrecs[i - 1].size <= WINDOW / 4, &h) != 0) {
                free(by_key);
                FALLBACK("pre-1.6 storages past the end of the file");
            }
            numel = (uint64_t)h[0] | ((uint64_t)h[1] << 8) | ((uint64_t)h[2] << 16) |
                    ((uint64_t)h[3] << 24) | ((uint64_t)h[4] << 32) | ((uint64_t)h[5] << 40) |
                    ((uint64_t)h[6] << 48) | ((uint64_t)h[7] << 56);
            if (numel > UINT64_MAX / esz || (nbytes = numel * esz) > st->size - off - 8) {
                free(by_key);
                FALLBACK("pre-1.6 storages past the end of the file");
            }
            st->lrecs[i].data_off = off + 8;
            st->lrecs[i].size = nbytes;
            off += 8 + nbytes;
        }
        free(by_key);
    }
    qsort(st->lkeys, st->n_lkeys, sizeof(name_ref), ref_cmp_exact);
    for (size_t i = 1; i < st->n_lkeys; i++)
        if (ref_cmp_exact(&st->lkeys[i - 1], &st->lkeys[i]) == 0)
            FALLBACK("a pre-1.6 key listed twice");
    return 0;
}

/* Matches every storage to its record and checks the record. 0, 1 (torch decides), -1. */
static int check_records(load_state *st, PyObject *cpu_ok)
{
    sp_plan *p = &st->plan;
    const uint8_t *prefix = NULL, *lh;
    size_t plen = 0;
    sp_error err;
    /* locations seen so far and torch's verdict on each (a file holds few) */
    struct {
        const uint8_t *s;
        uint32_t len;
        int ok;
    } locs[16];
    size_t n_locs = 0;

    st->slots = calloc(p->n_storages ? p->n_storages : 1, sizeof(slot));
    st->slot_of = calloc(p->n_nodes, sizeof(uint32_t));
    if (!st->slots || !st->slot_of) {
        PyErr_NoMemory();
        return -1;
    }
    if (!st->legacy) {
        prefix = st->entries[0].name;
        plen = (size_t)((const uint8_t *)memchr(prefix, '/', st->entries[0].name_len) - prefix) + 1;
    }
    for (uint32_t id = 1; id < p->n_nodes; id++) {
        const sp_node *n = &p->nodes[id];
        const sp_node *key, *loc;
        long ei;
        uint64_t nbytes;
        slot *s;
        size_t j;
        if (n->kind != SP_K_STORAGE)
            continue;
        key = &p->nodes[n->a];
        loc = &p->nodes[n->b];
        /* where torch would put it: only the CPU is built here */
        for (j = 0; j < n_locs; j++)
            if (locs[j].len == loc->len && memcmp(locs[j].s, st->pkl + loc->off, loc->len) == 0)
                break;
        if (j == n_locs) {
            PyObject *ls, *r;
            int ok;
            if (n_locs == sizeof(locs) / sizeof(locs[0]))
                FALLBACK("too many storage locations");
            ls = PyUnicode_DecodeUTF8((const char *)st->pkl + loc->off, loc->len, "surrogatepass");
            if (!ls)
                return -1;
            r = PyObject_CallOneArg(cpu_ok, ls);
            Py_DECREF(ls);
            if (!r)
                return -1;
            ok = PyObject_IsTrue(r);
            Py_DECREF(r);
            if (ok < 0)
                return -1;
            locs[n_locs].s = st->pkl + loc->off;
            locs[n_locs].len = loc->len;
            locs[n_locs].ok = ok;
            n_locs++;
        }
        if (!locs[j].ok)
            FALLBACK("a storage torch would place on another device");
        if (st->legacy) {
            name_ref k = {st->pkl + key->off, key->len, 0}, *hit;
            hit = bsearch(&k, st->lkeys, st->n_lkeys, sizeof(name_ref), ref_cmp_exact);
            ei = hit ? (long)hit->idx : -1;
            if (ei < 0) /* torch would leave it uninitialized */
                FALLBACK("a storage missing from the key list");
        } else {
            /* "data/" + key, looked up as torch does (cut at a NUL byte); the engine
             * gave each key one STORAGE node, so keys cut to one name get one each */
            char small[512], *rest = small;
            if (key->len + 5 > sizeof(small) && !(rest = malloc((size_t)key->len + 5))) {
                PyErr_NoMemory();
                return -1;
            }
            memcpy(rest, "data/", 5);
            memcpy(rest + 5, st->pkl + key->off, key->len);
            ei = find_entry(&st->names, prefix, plen, rest, (size_t)key->len + 5);
            if (rest != small)
                free(rest);
            if (ei == -2) {
                PyErr_NoMemory();
                return -1;
            }
        }
        if (ei < 0) {
            /* torch's lookup fails in every mode (the lookup above is its own), so
             * nothing short can come back */
            st->records_checked = 1;
            FALLBACK("a storage whose record is missing");
        }
        nbytes = (uint64_t)n->v.i;
        if (!(n->flags & SP_F_UNTYPED) &&
            nbytes > UINT64_MAX / sp_dtype_size(n->dtype))
            FALLBACK("a storage size that overflows");
        if (!(n->flags & SP_F_UNTYPED))
            nbytes *= sp_dtype_size(n->dtype);
        s = &st->slots[st->n_slots];
        s->entry = ei;
        s->nbytes = nbytes;
        s->dtype = -1;
        if (st->legacy) {
            if (st->lrecs[ei].size != nbytes)
                FALLBACK("a storage whose bytes differ from its claim"); /* torch says so */
            s->data_off = st->lrecs[ei].data_off;
        } else {
            const sp_zip_entry *e = &st->entries[ei];
            /* with mmap, torch would map other bytes: refused if a tensor uses it */
            if (e->method != 0 && st->use_mmap && nbytes) {
                s->bad = 1;
            } else if (e->method != 0) {
                FALLBACK("a compressed storage record");
            } else if (e->size < nbytes && st->use_mmap) {
                s->bad = 2;
            }
            if (e->size != nbytes && !st->use_mmap)
                FALLBACK("a record whose size differs from its claim"); /* torch says so */
            if (win_read(&st->win, e->local_offset, 30, e->size <= WINDOW / 4, &lh) != 0) {
                raise_errno_fd(errno);
                return -1;
            }
            if (sp_zip_data_offset(lh, 30, e, st->size, &s->data_off, &err) != SP_OK)
                FALLBACK("a storage record the reader does not understand");
        }
        st->slot_of[id] = (uint32_t)++st->n_slots;
    }
    /* a bad record under no tensor of the plan: if torch decides after all, it is
     * checked again against what torch's result uses */
    st->records_checked = 1;
    for (size_t i = 0; i < st->n_slots; i++)
        if (st->slots[i].bad)
            st->records_checked = 0;
    return 0;
}

/* Copies each slot's record into dst[i] (from the mapping, the window or the source).
 * Returns 0 or an errno. */
static int fill_storages(load_state *st, void **dst)
{
    for (size_t i = 0; i < st->n_slots; i++) {
        slot *s = &st->slots[i];
        const uint8_t *src;
        if (!dst[i])
            continue;
        if (st->blob) {
            memcpy(dst[i], st->blob->base + s->data_off, (size_t)s->nbytes);
        } else if (s->nbytes <= WINDOW / 4) {
            if (win_get(&st->win, s->data_off, (size_t)s->nbytes, &src) != 0)
                return errno;
            memcpy(dst[i], src, (size_t)s->nbytes);
        } else if (src_pread(&st->win, dst[i], (size_t)s->nbytes, s->data_off) != 0) {
            return errno;
        }
    }
    return 0;
}

/* Creates one base tensor per storage and one handle per tensor node. 0, 1, -1. */
static int build_tensors(load_state *st)
{
    sp_plan *p = &st->plan;
    uint32_t t = 0;
    int rc = 0, sys_errno = 0;
    void **dst = NULL;

    /* a record torch would map wrongly, under a tensor: refused before anything else */
    for (uint32_t id = 1; id < p->n_nodes; id++) {
        const slot *s;
        const sp_zip_entry *e;
        if (p->nodes[id].kind != SP_K_TENSOR)
            continue;
        s = &st->slots[st->slot_of[p->nodes[id].a] - 1];
        if (!s->bad)
            continue;
        e = &st->entries[s->entry];
        if (s->bad == 1)
            return refuse(st, "invalid checkpoint: record %.*s is compressed; refusing to map it "
                          "(torch.load(mmap=True) would map the compressed bytes as the "
                          "tensor's data). Load it with mmap=False.",
                          (int)(e->name_len > 200 ? 200 : e->name_len), (const char *)e->name);
        return refuse(st,
                      "invalid checkpoint: record size %llu of '%.*s' is shorter than the %llu "
                      "bytes its pickle claims; refusing to map it (the tensor would read the "
                      "bytes that follow the record)",
                      (unsigned long long)e->size, (int)(e->name_len > 200 ? 200 : e->name_len),
                      (const char *)e->name, (unsigned long long)s->nbytes);
    }
    /* the dtype of each storage: from the tensors over it (all must agree) */
    for (uint32_t id = 1; id < p->n_nodes; id++) {
        const sp_node *n = &p->nodes[id];
        slot *s;
        if (n->kind != SP_K_TENSOR)
            continue;
        s = &st->slots[st->slot_of[n->a] - 1];
        if (s->dtype >= 0 && s->dtype != n->dtype)
            FALLBACK("one storage viewed with two dtypes");
        if (aten_dtype[n->dtype] < 0)
            FALLBACK("a dtype this torch has no C code for");
        s->dtype = n->dtype;
    }
    if (st->use_mmap && st->size > 0) {
        st->blob = st_blob_map(st->fd, (size_t)st->size);
        if (!st->blob) {
            raise_errno_fd(errno);
            return -1;
        }
    }
    dst = calloc(st->n_slots ? st->n_slots : 1, sizeof(void *));
    if (!dst) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < st->n_slots; i++) {
        slot *s = &st->slots[i];
        int64_t numel, one = 1;
        unsigned esz;
        int32_t code;
        st_aten_err e;
        if (s->dtype < 0)
            continue; /* no tensor over it */
        esz = sp_dtype_size(s->dtype);
        numel = (int64_t)(s->nbytes / esz);
        code = aten_dtype[s->dtype];
        if (s->nbytes % esz)
            FALLBACK("a storage that is not whole elements");
        /* a misaligned pointer crashes some kernels: copied, unless only the writer of
         * convert reads the bytes (it copies them out byte-wise) */
        if (st->blob && s->nbytes && ((s->data_off % esz) == 0 || st->unaligned) &&
            st_aten.from_blob) {
            st_blob_incref(st->blob);
            e = st_aten.from_blob(st->blob->base + s->data_off, 1, &numel, &one, 0, code,
                                  st_aten.device_cpu, -1, &s->base, st_aten.layout_strided,
                                  NULL, 0, blob_release, st->blob);
            if (e != 0)
                st_blob_decref(st->blob);
        } else {
            e = st_aten.empty_strided(1, &numel, &one, code, st_aten.device_cpu, -1, &s->base);
            if (e == 0 && s->nbytes && st_aten.get_data_ptr(s->base, &dst[i]) != 0)
                e = 1;
        }
        if (e != 0) {
            s->base = NULL;
            FALLBACK("torch could not create a storage");
        }
    }
    /* fill the owned storages: without the GIL from a descriptor; a file object's
     * reads need it (each record is read into its tensor's own memory) */
    if (st->win.fobj) {
        sys_errno = fill_storages(st, dst);
    } else {
        Py_BEGIN_ALLOW_THREADS
        sys_errno = fill_storages(st, dst);
        Py_END_ALLOW_THREADS
    }
    free(dst);
    if (sys_errno) {
        raise_errno_fd(sys_errno);
        return -1;
    }
    st->handles = calloc(p->n_tensors ? p->n_tensors : 1, sizeof(st_tensor));
    if (!st->handles) {
        PyErr_NoMemory();
        return -1;
    }
    for (uint32_t id = 1; id < p->n_nodes; id++) {
        const sp_node *n = &p->nodes[id];
        slot *s;
        const int64_t *sizes, *strides;
        int64_t numel;
        if (n->kind != SP_K_TENSOR)
            continue;
        s = &st->slots[st->slot_of[n->a] - 1];
        sizes = p->ints + n->dims;
        strides = sizes + n->ndim;
        numel = (int64_t)(s->nbytes / sp_dtype_size(s->dtype));
        if (!s->given && n->ndim == 1 && sizes[0] == numel && strides[0] == 1 && n->v.i == 0) {
            st->handles[t] = s->base;
            s->given = 1;
        } else if (st_aten.reinterpret(s->base, n->ndim, sizes, strides, n->v.i,
                                       &st->handles[t]) != 0) {
            st->handles[t] = NULL;
            FALLBACK("torch could not view a storage");
        }
        t++;
    }
    (void)rc;
    return 0;
}

/* ---- Python objects from the plan ---- */

#define MAX_DEPTH 200

static PyObject *build(load_state *st, uint32_t id);

static PyObject *build_children_into(load_state *st, const sp_node *n, PyObject *target,
                                     int kind)
{
    const sp_plan *p = &st->plan;
    for (uint32_t e = n->first; e; e = p->edges[e].next) {
        PyObject *k = build(st, p->edges[e].child), *v = NULL;
        int r;
        if (!k)
            return NULL;
        if (kind == SP_K_LIST) {
            r = PyList_Append(target, k);
            Py_DECREF(k);
        } else {
            e = p->edges[e].next; /* the engine checked items come in pairs */
            v = build(st, p->edges[e].child);
            if (!v) {
                Py_DECREF(k);
                return NULL;
            }
            r = kind == SP_K_DICT ? PyDict_SetItem(target, k, v) : PyObject_SetItem(target, k, v);
            Py_DECREF(k);
            Py_DECREF(v);
        }
        if (r < 0)
            return NULL;
    }
    return target;
}

static PyObject *build(load_state *st, uint32_t id)
{
    const sp_plan *p = &st->plan;
    const sp_node *n = &p->nodes[id];
    const char *s = (const char *)st->pkl + n->off;
    PyObject *o = NULL;
    if (st->objs[id])
        return Py_NewRef(st->objs[id]);
    if (++st->depth > MAX_DEPTH) {
        st->reason = "nesting deeper than the reader builds";
        goto done;
    }
    switch (n->kind) {
    case SP_K_NONE:
        o = Py_NewRef(Py_None);
        break;
    case SP_K_BOOL:
        o = PyBool_FromLong(n->flags & SP_F_TRUE);
        break;
    case SP_K_INT:
        o = PyLong_FromLongLong(n->v.i);
        break;
    case SP_K_LONG:
        o = _PyLong_FromByteArray((const unsigned char *)s, n->len, 1, 1);
        break;
    case SP_K_FLOAT:
        o = PyFloat_FromDouble(n->v.f);
        break;
    case SP_K_STR:
        o = PyUnicode_DecodeUTF8(s, n->len, "surrogatepass");
        break;
    case SP_K_BSTR:
        o = PyUnicode_DecodeUTF8(s, n->len, "strict");
        break;
    case SP_K_BYTES: {
        PyObject *u = build(st, n->a);
        o = u ? PyUnicode_AsLatin1String(u) : NULL;
        Py_XDECREF(u);
        break;
    }
    case SP_K_TUPLE:
    case SP_K_SIZE: {
        const sp_node *tn = n->kind == SP_K_SIZE ? &p->nodes[n->a] : n;
        PyObject *tup = PyTuple_New(tn->n);
        Py_ssize_t i = 0;
        if (!tup)
            break;
        for (uint32_t e = tn->first; e; e = p->edges[e].next) {
            PyObject *c = build(st, p->edges[e].child);
            if (!c) {
                Py_DECREF(tup);
                tup = NULL;
                break;
            }
            PyTuple_SET_ITEM(tup, i++, c);
        }
        if (tup && n->kind == SP_K_SIZE) {
            o = PyObject_CallOneArg(size_type, tup);
            Py_DECREF(tup);
        } else {
            o = tup;
        }
        if (o && st->objs[id]) { /* a cycle through a tuple: torch decides */
            Py_DECREF(o);
            o = NULL;
            st->reason = "a cycle through a tuple";
        }
        break;
    }
    case SP_K_LIST:
    case SP_K_DICT:
    case SP_K_ODICT:
        o = n->kind == SP_K_LIST   ? PyList_New(0)
            : n->kind == SP_K_DICT ? PyDict_New()
                                   : PyObject_CallNoArgs(odict_type);
        if (!o)
            break;
        st->objs[id] = Py_NewRef(o); /* before the children: they may refer back */
        if (!build_children_into(st, n, o, n->kind))
            Py_CLEAR(o);
        if (o && n->kind == SP_K_ODICT && n->a) {
            /* BUILD: inst.__dict__.update(state) */
            PyObject *state = build(st, n->a), *d = NULL;
            int r = -1;
            if (state) {
                d = PyObject_GenericGetDict(o, NULL);
                r = d ? PyDict_Update(d, state) : -1;
            }
            Py_XDECREF(state);
            Py_XDECREF(d);
            if (r < 0)
                Py_CLEAR(o);
        }
        break;
    case SP_K_DTYPE:
        if (PyTuple_GET_ITEM(dtype_objs, n->dtype) == Py_None)
            st->reason = "a dtype this torch does not have"; /* torch raises */
        else
            o = Py_NewRef(PyTuple_GET_ITEM(dtype_objs, n->dtype));
        break;
    case SP_K_DEVICE: {
        PyObject *type = build(st, n->a);
        if (type)
            o = n->b ? PyObject_CallFunction(device_type, "OL", type, (long long)n->v.i)
                     : PyObject_CallOneArg(device_type, type);
        Py_XDECREF(type);
        break;
    }
    default:
        st->reason = "a value outside the reader's subset";
        break;
    }
done:
    st->depth--;
    if (o && !st->objs[id])
        st->objs[id] = Py_NewRef(o);
    return o;
}

/* Turns the tensor handles into Python tensors and Parameters, with torch's attributes. */
static int finish_tensors(load_state *st)
{
    sp_plan *p = &st->plan;
    PyObject *list;
    uint32_t t = 0;
    list = st_py_wrap_handles(st->handles, (Py_ssize_t)p->n_tensors);
    if (!list)
        return -1;
    for (uint32_t id = 1; id < p->n_nodes; id++) {
        const sp_node *n = &p->nodes[id];
        PyObject *obj, *hooks;
        if (n->kind != SP_K_TENSOR)
            continue;
        obj = PyList_GET_ITEM(list, t++);
        st->objs[id] = Py_NewRef(obj);
        if ((n->flags & SP_F_REQUIRES_GRAD) &&
            PyObject_SetAttr(obj, str_requires_grad, Py_True) < 0)
            goto error;
        hooks = build(st, n->b);
        if (!hooks || PyObject_SetAttr(obj, str_backward_hooks, hooks) < 0) {
            Py_XDECREF(hooks);
            goto error;
        }
        Py_DECREF(hooks);
    }
    Py_DECREF(list);
    for (uint32_t id = 1; id < p->n_nodes; id++) {
        const sp_node *n = &p->nodes[id];
        PyObject *obj, *hooks;
        if (n->kind != SP_K_PARAM)
            continue;
        obj = PyObject_CallFunctionObjArgs(param_type, st->objs[n->a],
                                           (n->flags & SP_F_REQUIRES_GRAD) ? Py_True : Py_False,
                                           NULL);
        if (!obj)
            return -1;
        st->objs[id] = obj;
        hooks = build(st, n->b);
        if (!hooks || PyObject_SetAttr(obj, str_backward_hooks, hooks) < 0) {
            Py_XDECREF(hooks);
            return -1;
        }
        Py_DECREF(hooks);
    }
    return 0;
error:
    Py_DECREF(list);
    return -1;
}

static void state_free(load_state *st)
{
    if (st->objs) {
        for (uint32_t i = 0; i < st->plan.n_nodes; i++)
            Py_XDECREF(st->objs[i]);
        PyMem_Free(st->objs);
    }
    /* handles own their tensors; a base handed to a tensor is owned by its handle */
    if (st->handles) {
        for (uint32_t i = 0; i < st->plan.n_tensors; i++)
            if (st->handles[i])
                st_aten.delete_tensor(st->handles[i]);
        free(st->handles);
    }
    if (st->slots) {
        for (size_t j = 0; j < st->n_slots; j++)
            if (st->slots[j].base && !st->slots[j].given)
                st_aten.delete_tensor(st->slots[j].base);
        free(st->slots);
    }
    if (st->blob)
        st_blob_decref(st->blob);
    sp_plan_free(&st->plan);
    free(st->slot_of);
    free(st->entries);
    names_free(&st->names);
    free(st->tail);
    free(st->cd);
    free(st->owned);
    free(st->win.buf);
    free(st->lkeys);
    free(st->lrecs);
    sp_plan_free(&st->keys_plan);
}

/* Reads the checkpoint st's source holds (size, window set). ("ok", obj),
 * ("fallback", reason, records_checked), ("refuse", message) or NULL. */
static PyObject *load_common(load_state *st_, PyObject *cpu_ok, int default_little)
{
    load_state st = *st_;
    int rc;
    PyObject *result = NULL;
    st.win.size = st.size;
    st.win.buf = malloc(WINDOW);
    if (!st.win.buf)
        return PyErr_NoMemory();
    {
        uint8_t head[4] = {0};
        if (st.size >= 4 && src_read_gil(&st.win, head, 4, 0) != 0) {
            raise_errno_fd(errno);
            rc = -1;
        } else {
            st.legacy = head[0] == 0x80;
            rc = st.legacy ? read_legacy(&st) : read_archive(&st, default_little);
        }
    }
    if (rc == 0)
        rc = check_records(&st, cpu_ok);
    if (rc == 0)
        rc = build_tensors(&st);
    if (rc == 0) {
        st.objs = PyMem_Calloc(st.plan.n_nodes, sizeof(PyObject *));
        if (!st.objs) {
            PyErr_NoMemory();
            rc = -1;
        }
    }
    if (rc == 0) {
        rc = finish_tensors(&st);
        /* wrapping consumed the handles, and the bases handed over with them */
        free(st.handles);
        st.handles = NULL;
    }
    if (rc == 0) {
        PyObject *root = build(&st, st.plan.root);
        if (root) {
            result = Py_BuildValue("(sN)", "ok", root);
        } else if (st.reason && !PyErr_ExceptionMatches(PyExc_MemoryError)) {
            PyErr_Clear();
            rc = 1;
        } else if (!st.reason && PyErr_Occurred() &&
                   !PyErr_ExceptionMatches(PyExc_MemoryError)) {
            /* torch raises its own error for such a value: let it */
            PyErr_Clear();
            st.reason = "torch refuses a value in the pickle";
            rc = 1;
        } else {
            rc = -1;
        }
    }
    if (rc == 1 && st.refusal[0])
        result = Py_BuildValue("(ss)", "refuse", st.refusal);
    else if (rc == 1)
        result = Py_BuildValue("(ssO)", "fallback", st.reason ? st.reason : "unknown",
                               st.records_checked ? Py_True : Py_False);
    state_free(&st);
    return result;
}

/* legacy_load(fd, mmap, cpu_ok, default_little, unaligned=False) -> ("ok", obj),
 * ("fallback", reason, records_checked) or ("refuse", message) */
static PyObject *legacy_load(PyObject *self, PyObject *args)
{
    load_state st;
    int default_little;
    PyObject *cpu_ok;
    (void)self;
    memset(&st, 0, sizeof(st));
    if (!PyArg_ParseTuple(args, "ipOp|p:legacy_load", &st.fd, &st.use_mmap, &cpu_ok,
                          &default_little, &st.unaligned))
        return NULL;
    if (!odict_type || !st_aten.ready) {
        PyErr_SetString(PyExc_RuntimeError, "legacy_init was not called or ATen is missing");
        return NULL;
    }
    if (st_fd_size(st.fd, &st.size) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    st.win.fd = st.fd;
    return load_common(&st, cpu_ok, default_little);
}

/* legacy_load_fileobj(f, size, cpu_ok, default_little): legacy_load over a seekable
 * file object whose checkpoint starts at offset 0 and holds size bytes; never mapped */
static PyObject *legacy_load_fileobj(PyObject *self, PyObject *args)
{
    load_state st;
    int default_little, has;
    unsigned long long size;
    PyObject *cpu_ok, *f;
    (void)self;
    memset(&st, 0, sizeof(st));
    if (!PyArg_ParseTuple(args, "OKOp:legacy_load_fileobj", &f, &size, &cpu_ok, &default_little))
        return NULL;
    if (!odict_type || !st_aten.ready) {
        PyErr_SetString(PyExc_RuntimeError, "legacy_init was not called or ATen is missing");
        return NULL;
    }
    {
        PyObject *m = PyObject_GetAttrString(f, "readinto");
        if (!m && !PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
        has = m != NULL;
        Py_XDECREF(m);
    }
    st.fd = -1;
    st.size = size;
    st.win.fd = -1;
    st.win.fobj = f;
    st.win.readinto = has;
    return load_common(&st, cpu_ok, default_little);
}

/* legacy_zip_records(fd) -> ([(name, method, comp_size, size, data_offset), ...] in
 * directory order, [their indices in the order torch's lookups search them]), as torch's
 * zip reader sees the file, or None when the engine cannot read the directory. data_offset is -1 when the local header is unreadable. For the record check
 * of files torch reads itself: the same view as torch, not Python's zipfile's. */
static PyObject *legacy_zip_records(PyObject *self, PyObject *args)
{
    int fd, rc;
    uint64_t size;
    size_t tail_len;
    uint8_t *tail = NULL, *cd = NULL, lh[30];
    sp_zip_dir dir;
    sp_zip_entry *es = NULL;
    sp_error err;
    name_ref *refs = NULL;
    PyObject *out = NULL, *order = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "i:legacy_zip_records", &fd))
        return NULL;
    if (st_fd_size(fd, &size) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    tail_len = (size_t)(size < SP_ZIP_TAIL ? size : SP_ZIP_TAIL);
    if (!(tail = malloc(tail_len ? tail_len : 1)))
        return PyErr_NoMemory();
    if (st_pread_all(fd, tail, tail_len, size - tail_len) != 0) {
        raise_errno_fd(errno);
        goto done;
    }
    if (sp_zip_find_dir(tail, tail_len, size, &dir, &err) != SP_OK) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    if (!(cd = malloc(dir.cd_size ? (size_t)dir.cd_size : 1))) {
        PyErr_NoMemory();
        goto done;
    }
    if (st_pread_all(fd, cd, (size_t)dir.cd_size, dir.cd_offset) != 0) {
        raise_errno_fd(errno);
        goto done;
    }
    if (sp_zip_parse_dir(cd, (size_t)dir.cd_size, &dir, size, &es, &err) != SP_OK) {
        if (err.code == SP_NOMEM)
            PyErr_NoMemory();
        else
            out = Py_NewRef(Py_None);
        goto done;
    }
    if (!(refs = mz_sorted(es, (size_t)dir.count))) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(order = PyList_New((Py_ssize_t)dir.count)))
        goto done;
    for (uint64_t i = 0; i < dir.count; i++) {
        PyObject *ix = PyLong_FromUnsignedLong(refs[i].idx);
        if (!ix)
            goto done;
        PyList_SET_ITEM(order, (Py_ssize_t)i, ix);
    }
    if (!(out = PyList_New((Py_ssize_t)dir.count)))
        goto done;
    for (uint64_t i = 0; i < dir.count; i++) {
        const sp_zip_entry *e = &es[i];
        uint64_t doff = 0;
        long long at = -1;
        PyObject *item;
        rc = st_pread_all(fd, lh, 30, e->local_offset);
        if (rc == 0 && sp_zip_data_offset(lh, 30, e, size, &doff, &err) == SP_OK)
            at = (long long)doff;
        else if (rc != 0 && errno != ENODATA) {
            raise_errno_fd(errno);
            Py_CLEAR(out);
            goto done;
        }
        item = Py_BuildValue("(y#iKKL)", (const char *)e->name, (Py_ssize_t)e->name_len,
                             (int)e->method, (unsigned long long)e->comp_size,
                             (unsigned long long)e->size, at);
        if (!item) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    out = Py_BuildValue("(NN)", out, order); /* steals both */
    order = NULL;
done:
    Py_XDECREF(order);
    free(refs);
    free(tail);
    free(cd);
    free(es);
    return out;
}

static PyMethodDef legacy_methods[] = {
    {"legacy_init", legacy_init, METH_VARARGS,
     "legacy_init(OrderedDict, Size, device, Parameter, dtypes): the loading process's types."},
    {"legacy_dtype_names", legacy_dtype_names, METH_NOARGS,
     "torch's dtype names, in the engine's order."},
    {"legacy_load", legacy_load, METH_VARARGS,
     "legacy_load(fd, mmap, cpu_ok, default_little, unaligned=False) -> ('ok', obj), "
     "('fallback', reason, records_checked) or ('refuse', message)."},
    {"legacy_load_fileobj", legacy_load_fileobj, METH_VARARGS,
     "legacy_load_fileobj(f, size, cpu_ok, default_little) -> as legacy_load, from a seekable "
     "file object (never mapped)."},
    {"legacy_zip_records", legacy_zip_records, METH_VARARGS,
     "legacy_zip_records(fd) -> ([(name, method, comp_size, size, data_offset)], lookup order) or None."},
    {NULL, NULL, 0, NULL},
};

int st_legacy_register(PyObject *module)
{
    str_requires_grad = PyUnicode_InternFromString("requires_grad");
    str_backward_hooks = PyUnicode_InternFromString("_backward_hooks");
    if (!str_requires_grad || !str_backward_hooks)
        return -1;
    return PyModule_AddFunctions(module, legacy_methods);
}
