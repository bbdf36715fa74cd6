/* fuzz_engine.c: libFuzzer target for the format engine (csrc/st_engine.c).
 * Parses the input as a whole file, checks every invariant of the table, round-trips it
 * through st_plan_write, and checks st_sniff against st_read_prefix. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_model.h"
#include "st_engine.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* ---- checks ---- */

#define CHECK(cond) ((cond) ? (void)0 : fail(#cond, __LINE__))

static void fail(const char *what, int line)
{
    fprintf(stderr, "fuzz_engine.c:%d: invariant violated: %s\n", line, what);
    abort();
}

/* The reference writer's dtype order (DESIGN.md), kept apart from the engine's table so
 * that the two are checked against each other. */
static const char *const WRITE_ORDER[] = {
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8",
    "F6_E3M2", "F6_E2M3", "F4", "BOOL",
};

static size_t write_rank(st_dtype d)
{
    const char *name = st_dtype_name(d);
    for (size_t i = 0; i < sizeof(WRITE_ORDER) / sizeof(WRITE_ORDER[0]); i++)
        if (strcmp(WRITE_ORDER[i], name) == 0)
            return i;
    fail("dtype missing from the reference write order", __LINE__);
    return 0;
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}


static void check_error(st_code rc, const st_error *err, int64_t max_pos)
{
    CHECK(err->code == rc);
    CHECK(memchr(err->message, '\0', sizeof(err->message)) != NULL);
    CHECK(rc == ST_OK || err->message[0] != '\0');
    CHECK(err->tensor_len <= ST_NAME_IN_ERROR);
    CHECK(err->tensor[err->tensor_len] == '\0');
    CHECK(utf8_ok((const uint8_t *)err->tensor, err->tensor_len));
    CHECK(err->pos >= -1 && err->pos <= max_pos);
}

/* ---- the parsed table ---- */

static const char *entry_name(const st_table *t, const st_entry *e)
{
    return t->strings + e->name_off;
}

static void check_string(const st_table *t, size_t off, size_t len)
{
    CHECK(off <= t->strings_len && len < t->strings_len - off);
    CHECK(t->strings[off + len] == '\0');
    CHECK(utf8_ok((const uint8_t *)t->strings + off, len));
}

static void check_table(const st_table *t, const uint8_t *data, size_t size)
{
    uint64_t end = 0;

    CHECK(t->header_len == le64(data));
    CHECK(t->data_start == ST_PREFIX_LEN + t->header_len);
    CHECK(t->data_start <= size);
    CHECK(t->data_start + t->data_len == size);
    CHECK(t->count <= t->cap);
    CHECK(t->strings_len <= t->strings_cap);
    CHECK(t->dims_len <= t->dims_cap);
    CHECK(t->meta_count <= t->meta_cap);
    CHECK(t->has_metadata == 0 || t->has_metadata == 1);
    CHECK(t->has_metadata || t->meta_count == 0);

    for (size_t i = 0; i < t->count; i++) {
        const st_entry *e = &t->entries[i];
        uint64_t numel = 1, bits;
        CHECK((unsigned)e->dtype < ST_DTYPE_COUNT);
        /* sorted by offsets and contiguous from 0 */
        CHECK(e->begin == end);
        CHECK(e->end >= e->begin);
        CHECK(e->nbytes == e->end - e->begin);
        if (i)
            CHECK(t->entries[i - 1].end <= e->begin);
        check_string(t, e->name_off, e->name_len);
        CHECK(!(e->name_len == 12 && memcmp(entry_name(t, e), "__metadata__", 12) == 0));
        CHECK(e->dims_off <= t->dims_len && e->ndim <= t->dims_len - e->dims_off);
        for (size_t d = 0; d < e->ndim; d++)
            CHECK(!__builtin_mul_overflow(numel, t->dims[e->dims_off + d], &numel));
        CHECK(e->numel == numel);
        CHECK(!__builtin_mul_overflow(numel, (uint64_t)st_dtype_bits(e->dtype), &bits));
        CHECK(bits % 8 == 0 && bits / 8 == e->nbytes);
        /* hpos is where the entry's key starts: its opening quote */
        CHECK(e->hpos < t->header_len);
        CHECK(data[ST_PREFIX_LEN + e->hpos] == '"');
        CHECK(st_find(t, entry_name(t, e), e->name_len) == (long)i);
        end = e->end;
    }
    CHECK(end == t->data_len);

    /* by_name: a permutation, strictly increasing names (so names are unique) */
    if (t->count) {
        unsigned char *seen = calloc(t->count, 1);
        CHECK(t->by_name != NULL && seen != NULL);
        for (size_t i = 0; i < t->count; i++) {
            size_t k = t->by_name[i];
            CHECK(k < t->count && !seen[k]);
            seen[k] = 1;
            if (i) {
                const st_entry *a = &t->entries[t->by_name[i - 1]], *b = &t->entries[k];
                CHECK(bytes_cmp(entry_name(t, a), a->name_len, entry_name(t, b),
                                b->name_len) < 0);
            }
        }
        free(seen);
    }
    /* 0xFF never occurs in UTF-8, so no name holds it */
    CHECK(st_find(t, "\xff", 1) == -1);
    if (t->count) {
        const st_entry *e = &t->entries[0];
        char *probe = malloc(e->name_len + 1);
        CHECK(probe != NULL);
        memcpy(probe, entry_name(t, e), e->name_len);
        probe[e->name_len] = '\xff';
        CHECK(st_find(t, probe, e->name_len + 1) == -1);
        free(probe);
    }

    /* metadata: strictly increasing keys */
    for (size_t i = 0; i < t->meta_count; i++) {
        const st_meta *m = &t->meta[i];
        check_string(t, m->key_off, m->key_len);
        check_string(t, m->val_off, m->val_len);
        if (i) {
            const st_meta *p = &t->meta[i - 1];
            CHECK(bytes_cmp(t->strings + p->key_off, p->key_len, t->strings + m->key_off,
                            m->key_len) < 0);
        }
    }
}

/* ---- round trip through the writer ---- */

static void check_plan(const st_plan *plan, const st_write_item *items, size_t n)
{
    uint64_t off = 0;
    unsigned char *seen = calloc(n ? n : 1, 1);
    size_t last;

    CHECK(seen != NULL);
    CHECK(plan->header != NULL);
    CHECK(plan->header_len % 8 == 0 && plan->header_len >= 16);
    CHECK(le64(plan->header) == plan->header_len - ST_PREFIX_LEN);
    CHECK(plan->header[ST_PREFIX_LEN] == '{');
    /* compact JSON then space padding (fewer than 8 spaces) */
    last = plan->header_len - 1;
    while (plan->header[last] == ' ')
        last--;
    CHECK(plan->header[last] == '}');
    CHECK(plan->header_len - 1 - last < 8);
    for (size_t k = 0; k < n; k++) {
        size_t i = plan->order[k];
        CHECK(i < n && !seen[i]);
        seen[i] = 1;
        CHECK(plan->offsets[i] == off);
        off += items[i].nbytes;
        if (k) {
            const st_write_item *a = &items[plan->order[k - 1]], *b = &items[i];
            size_t ra = write_rank(a->dtype), rb = write_rank(b->dtype);
            CHECK(ra < rb ||
                  (ra == rb && bytes_cmp(a->name, a->name_len, b->name, b->name_len) < 0));
        }
    }
    CHECK(plan->data_len == off);
    free(seen);
}

/* Feeds a valid table back into the writer. */
static st_code plan_from_table(const st_table *t, st_plan *plan)
{
    st_write_item *items = calloc(t->count ? t->count : 1, sizeof(*items));
    st_meta_item *meta = calloc(t->meta_count ? t->meta_count : 1, sizeof(*meta));
    st_error err;
    st_code rc;

    CHECK(items != NULL && meta != NULL);
    for (size_t i = 0; i < t->count; i++) {
        const st_entry *e = &t->entries[i];
        items[i].name = entry_name(t, e);
        items[i].name_len = e->name_len;
        items[i].shape = e->ndim ? t->dims + e->dims_off : NULL; /* dims is NULL if no dims */
        items[i].ndim = e->ndim;
        items[i].nbytes = e->nbytes;
        items[i].dtype = e->dtype;
    }
    for (size_t i = 0; i < t->meta_count; i++) {
        meta[i].key = t->strings + t->meta[i].key_off;
        meta[i].key_len = t->meta[i].key_len;
        meta[i].value = t->strings + t->meta[i].val_off;
        meta[i].value_len = t->meta[i].val_len;
    }
    rc = st_plan_write(items, t->count, meta, t->meta_count, t->has_metadata, plan, &err);
    check_error(rc, &err, -1);
    if (rc == ST_OK)
        check_plan(plan, items, t->count);
    else
        CHECK(plan->header == NULL && plan->order == NULL && plan->offsets == NULL);
    free(items);
    free(meta);
    return rc;
}

/* Parses a plan's header followed by a zero-filled data area. */
static uint8_t *file_from_plan(const st_plan *plan, size_t *len)
{
    uint8_t *buf;
    *len = plan->header_len + (size_t)plan->data_len;
    buf = malloc(*len);
    CHECK(buf != NULL);
    memcpy(buf, plan->header, plan->header_len);
    memset(buf + plan->header_len, 0, (size_t)plan->data_len);
    return buf;
}

static void same_table(const st_table *a, const st_table *b, const st_plan *plan)
{
    CHECK(a->count == b->count);
    CHECK(a->has_metadata == b->has_metadata);
    CHECK(a->meta_count == b->meta_count);
    CHECK(a->data_len == b->data_len);
    for (size_t i = 0; i < a->count; i++) {
        const st_entry *x = &a->entries[i];
        long j = st_find(b, entry_name(a, x), x->name_len);
        const st_entry *y;
        CHECK(j >= 0 && (size_t)j < b->count);
        y = &b->entries[j];
        CHECK(y->name_len == x->name_len);
        CHECK(memcmp(entry_name(a, x), entry_name(b, y), x->name_len) == 0);
        CHECK(y->dtype == x->dtype);
        CHECK(y->ndim == x->ndim);
        CHECK(x->ndim == 0 ||
              memcmp(a->dims + x->dims_off, b->dims + y->dims_off, x->ndim * 8) == 0);
        CHECK(y->nbytes == x->nbytes && y->numel == x->numel);
        CHECK(y->begin == plan->offsets[i]);
    }
    for (size_t i = 0; i < a->meta_count; i++) {
        const st_meta *x = &a->meta[i], *y = &b->meta[i];
        CHECK(bytes_cmp(a->strings + x->key_off, x->key_len, b->strings + y->key_off,
                        y->key_len) == 0);
        CHECK(bytes_cmp(a->strings + x->val_off, x->val_len, b->strings + y->val_off,
                        y->val_len) == 0);
    }
}

static void round_trip(const st_table *t)
{
    st_plan plan, plan2;
    st_table t2, t3;
    st_error err;
    st_code rc;
    uint8_t *buf;
    size_t len;

    rc = plan_from_table(t, &plan);
    /* a fuzz input is far below the header limit, so the writer must accept the table */
    CHECK(rc == ST_OK);
    buf = file_from_plan(&plan, &len);

    st_table_init(&t2);
    rc = st_parse(buf, len, &t2, &err);
    check_error(rc, &err, (int64_t)len);
    CHECK(rc == ST_OK);
    check_table(&t2, buf, len);
    same_table(t, &t2, &plan);

    /* the writer's output is canonical: writing it again gives the same bytes */
    rc = plan_from_table(&t2, &plan2);
    CHECK(rc == ST_OK);
    CHECK(plan2.header_len == plan.header_len);
    CHECK(memcmp(plan2.header, plan.header, plan.header_len) == 0);
    CHECK(plan2.data_len == plan.data_len);

    /* the same header with a data area one byte off is refused */
    st_table_init(&t3);
    rc = st_parse_header(buf + ST_PREFIX_LEN, plan.header_len - ST_PREFIX_LEN, len + 1, &t3,
                         &err);
    CHECK(rc == ST_ERR_FILE_LENGTH);
    st_table_free(&t3);
    if (plan.data_len) {
        st_table_init(&t3);
        rc = st_parse_header(buf + ST_PREFIX_LEN, plan.header_len - ST_PREFIX_LEN, len - 1,
                             &t3, &err);
        CHECK(rc == ST_ERR_FILE_LENGTH);
        st_table_free(&t3);
    }

    st_plan_free(&plan2);
    st_table_free(&t2);
    st_plan_free(&plan);
    free(buf);
}

/* ---- sniffing ---- */

static int is_prefix_error(st_code rc)
{
    return rc == ST_ERR_TOO_SMALL || rc == ST_ERR_HEADER_TOO_LARGE ||
           rc == ST_ERR_HEADER_PAST_END;
}

static void check_sniff(const uint8_t *data, size_t size, st_code parse_rc)
{
    static const size_t AVAIL[] = {0, 7, 8, 9, 10, 11, 16, 64, 4096};
    static const uint64_t EXTRA[] = {0, 1, 100000000, UINT64_MAX - 1};
    st_error err;
    uint64_t n = 0;
    st_code prc = st_read_prefix(data, size, size, &n, &err);
    int whole = st_sniff(data, size, size);

    check_error(prc, &err, (int64_t)size);
    /* st_parse fails on the prefix exactly when st_read_prefix does */
    CHECK(prc == ST_OK ? !is_prefix_error(parse_rc) : parse_rc == prc);
    CHECK(whole == 0 || whole == 1);
    /* a file that st_read_prefix refuses is never claimed */
    if (whole)
        CHECK(prc == ST_OK);
    /* a valid file is always claimed */
    if (parse_rc == ST_OK)
        CHECK(whole == 1);
    /* seeing less of the file never makes a claim that the whole file does not */
    for (size_t i = 0; i < sizeof(AVAIL) / sizeof(AVAIL[0]); i++) {
        if (AVAIL[i] >= size)
            continue;
        if (st_sniff(data, AVAIL[i], size)) {
            CHECK(whole);
            CHECK(st_read_prefix(data, AVAIL[i], size, &n, &err) == ST_OK);
        }
    }
    /* a file longer than the input: the same rule on file_len */
    for (size_t i = 0; i < sizeof(EXTRA) / sizeof(EXTRA[0]); i++) {
        uint64_t file_len = EXTRA[i] > UINT64_MAX - size ? UINT64_MAX : size + EXTRA[i];
        prc = st_read_prefix(data, size, file_len, &n, &err);
        check_error(prc, &err, (int64_t)size);
        if (st_sniff(data, size, file_len))
            CHECK(prc == ST_OK);
        if (prc == ST_OK)
            CHECK(n <= ST_MAX_HEADER_LEN && n <= file_len - ST_PREFIX_LEN);
    }
}

/* ---- entry point ---- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_table t;
    st_error err;
    st_code rc;

    st_table_init(&t);
    rc = st_parse(data, size, &t, &err);
    check_error(rc, &err, (int64_t)size);
    check_sniff(data, size, rc);
    if (rc == ST_OK) {
        check_table(&t, data, size);
        round_trip(&t);
    }
    st_table_free(&t);
    return 0;
}
