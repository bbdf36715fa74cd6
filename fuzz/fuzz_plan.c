/* fuzz_plan.c: libFuzzer target for the writer half of the format engine (st_plan_write).
 * Decodes the input into write items and metadata, and checks that the writer accepts
 * exactly what the reader can read back, and that what it writes reads back the same. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_model.h"
#include "st_engine.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) ((cond) ? (void)0 : fail(#cond, __LINE__))
#define MAX_ITEMS 8
#define MAX_DIMS 4
#define MAX_META 4

static void fail(const char *what, int line)
{
    fprintf(stderr, "fuzz_plan.c:%d: invariant violated: %s\n", line, what);
    abort();
}

/* ---- input decoding ---- */

typedef struct {
    const uint8_t *p;
    size_t n, pos;
} reader;

static uint8_t byte(reader *r)
{
    return r->pos < r->n ? r->p[r->pos++] : 0;
}

/* A number biased towards the edges: 0, small, 16-bit, or any 64-bit value. */
static uint64_t number(reader *r)
{
    uint64_t v = 0;
    switch (byte(r) & 3) {
    case 0:
        return 0;
    case 1:
        return byte(r);
    case 2:
        return (uint64_t)byte(r) | (uint64_t)byte(r) << 8;
    default:
        for (int i = 0; i < 8; i++)
            v |= (uint64_t)byte(r) << (8 * i);
        return v;
    }
}

/* Bytes taken from the input in place (fewer at its end). */
static const char *bytes(reader *r, size_t *len)
{
    size_t want = byte(r) % 16;
    const char *s = (const char *)r->p + r->pos;
    if (want > r->n - r->pos)
        want = r->n - r->pos;
    r->pos += want;
    *len = want;
    return s;
}

/* ---- the rules, written independently of the engine (with fuzz_model.h) ---- */

/* numel x bits / 8 with the reader's rule: any overflow of the running product fails. */
static int item_bytes(const st_write_item *it, uint64_t *out)
{
    uint64_t numel = 1, bits;
    for (size_t d = 0; d < it->ndim; d++)
        if (__builtin_mul_overflow(numel, it->shape[d], &numel))
            return 0;
    if (__builtin_mul_overflow(numel, (uint64_t)st_dtype_bits(it->dtype), &bits) || bits % 8)
        return 0;
    *out = bits / 8;
    return 1;
}

static int writable(const st_write_item *items, size_t n, const st_meta_item *meta,
                    size_t nmeta, int has_metadata)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const st_write_item *it = &items[i];
        uint64_t nb;
        if ((unsigned)it->dtype >= ST_DTYPE_COUNT)
            return 0;
        if (!utf8_ok((const uint8_t *)it->name, it->name_len))
            return 0;
        if (it->name_len == 12 && memcmp(it->name, "__metadata__", 12) == 0)
            return 0;
        if (!item_bytes(it, &nb) || nb != it->nbytes)
            return 0;
        if (__builtin_add_overflow(total, nb, &total))
            return 0;
        for (size_t j = 0; j < i; j++)
            if (bytes_cmp(items[j].name, items[j].name_len, it->name, it->name_len) == 0)
                return 0;
    }
    if (has_metadata || nmeta) { /* metadata items are written even without the flag */
        for (size_t i = 0; i < nmeta; i++) {
            if (!utf8_ok((const uint8_t *)meta[i].key, meta[i].key_len) ||
                !utf8_ok((const uint8_t *)meta[i].value, meta[i].value_len))
                return 0;
            for (size_t j = 0; j < i; j++)
                if (bytes_cmp(meta[j].key, meta[j].key_len, meta[i].key, meta[i].key_len) == 0)
                    return 0;
        }
    }
    return 1;
}

/* Prints the decoded input, for the report of a finding. */
static void dump(const st_write_item *items, size_t n, const st_meta_item *meta, size_t nmeta,
                 int has_metadata, st_code rc, const st_error *err)
{
    fprintf(stderr, "st_plan_write returned %d (%s) for %zu items:\n", (int)rc, err->message, n);
    for (size_t i = 0; i < n; i++) {
        const st_write_item *it = &items[i];
        fprintf(stderr, "  item %zu: dtype %d (%s), name [", i, (int)it->dtype,
                st_dtype_name(it->dtype));
        for (size_t k = 0; k < it->name_len; k++)
            fprintf(stderr, k ? " %02x" : "%02x", (unsigned char)it->name[k]);
        fprintf(stderr, "], shape [");
        for (size_t d = 0; d < it->ndim; d++)
            fprintf(stderr, d ? ", %llu" : "%llu", (unsigned long long)it->shape[d]);
        fprintf(stderr, "], nbytes %llu\n", (unsigned long long)it->nbytes);
    }
    fprintf(stderr, "  %zu metadata items, has_metadata %d\n", nmeta, has_metadata);
    (void)meta;
}

/* ---- entry point ---- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    reader r = {data, size, 0};
    st_write_item items[MAX_ITEMS];
    uint64_t shapes[MAX_ITEMS][MAX_DIMS];
    st_meta_item meta[MAX_META];
    size_t n, nmeta;
    int has_metadata, expect_ok;
    st_plan plan;
    st_error err;
    st_code rc;

    memset(items, 0, sizeof(items));
    memset(meta, 0, sizeof(meta));
    n = byte(&r) % (MAX_ITEMS + 1);
    for (size_t i = 0; i < n; i++) {
        st_write_item *it = &items[i];
        uint8_t mode;
        it->dtype = (st_dtype)(byte(&r) % (ST_DTYPE_COUNT + 1)); /* COUNT: invalid */
        it->name = bytes(&r, &it->name_len);
        it->ndim = byte(&r) % (MAX_DIMS + 1);
        for (size_t d = 0; d < it->ndim; d++)
            shapes[i][d] = number(&r);
        it->shape = shapes[i];
        mode = byte(&r);
        if ((mode & 1) || (unsigned)it->dtype >= ST_DTYPE_COUNT || !item_bytes(it, &it->nbytes))
            it->nbytes = number(&r);
    }
    nmeta = byte(&r) % (MAX_META + 1);
    has_metadata = byte(&r) & 1;
    for (size_t i = 0; i < nmeta; i++) {
        meta[i].key = bytes(&r, &meta[i].key_len);
        meta[i].value = bytes(&r, &meta[i].value_len);
    }

    expect_ok = writable(items, n, meta, nmeta, has_metadata);
    rc = st_plan_write(items, n, meta, nmeta, has_metadata, &plan, &err);
    CHECK(err.code == rc);
    CHECK(memchr(err.message, '\0', sizeof(err.message)) != NULL);
    CHECK(err.tensor_len <= ST_NAME_IN_ERROR && err.tensor[err.tensor_len] == '\0');
    /* the writer accepts exactly the items that the reader can read back */
    if ((rc == ST_OK) != expect_ok)
        dump(items, n, meta, nmeta, has_metadata, rc, &err);
    CHECK((rc == ST_OK) == expect_ok);
    if (rc != ST_OK) {
        CHECK(plan.header == NULL && plan.order == NULL && plan.offsets == NULL);
        return 0;
    }

    /* read the header back with a data area of the planned length (never touched) */
    {
        st_table t;
        uint64_t file_len;
        CHECK(plan.header_len % 8 == 0);
        CHECK(!__builtin_add_overflow((uint64_t)plan.header_len, plan.data_len, &file_len));
        st_table_init(&t);
        rc = st_parse_header(plan.header + ST_PREFIX_LEN, plan.header_len - ST_PREFIX_LEN,
                             file_len, &t, &err);
        if (rc != ST_OK)
            fprintf(stderr, "re-parse failed: %s\n", err.message);
        CHECK(rc == ST_OK);
        CHECK(t.count == n && t.data_len == plan.data_len);
        CHECK(t.has_metadata == (has_metadata || nmeta > 0));
        CHECK(t.meta_count == nmeta);
        for (size_t i = 0; i < n; i++) {
            long j = st_find(&t, items[i].name, items[i].name_len);
            const st_entry *e;
            CHECK(j >= 0);
            e = &t.entries[j];
            CHECK(e->dtype == items[i].dtype && e->ndim == items[i].ndim);
            CHECK(e->ndim == 0 || memcmp(t.dims + e->dims_off, items[i].shape, e->ndim * 8) == 0);
            CHECK(e->nbytes == items[i].nbytes && e->begin == plan.offsets[i]);
        }
        for (size_t i = 0; i < t.meta_count; i++) {
            const st_meta *m = &t.meta[i];
            size_t j = 0;
            while (j < nmeta && bytes_cmp(t.strings + m->key_off, m->key_len, meta[j].key,
                                          meta[j].key_len) != 0)
                j++;
            CHECK(j < nmeta);
            CHECK(bytes_cmp(t.strings + m->val_off, m->val_len, meta[j].value,
                            meta[j].value_len) == 0);
        }
        st_table_free(&t);
    }
    st_plan_free(&plan);
    return 0;
}
