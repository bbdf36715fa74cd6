/* st_engine.h: the safetensors format engine, a pure function over bytes.
 * Parses and validates headers into tables, plans write layouts, serializes headers. */
#ifndef ST_ENGINE_H
#define ST_ENGINE_H

#include <stddef.h>
#include <stdint.h>

/* ---- limits ---- */

#define ST_PREFIX_LEN 8u
#define ST_MAX_HEADER_LEN 100000000ull /* the reference reader's limit */
#define ST_MAX_DEPTH 64                 /* JSON nesting inside unknown entry fields */
#define ST_NAME_IN_ERROR 200            /* bytes of a tensor name kept in an error */

/* ---- dtypes ---- */

typedef enum {
    ST_BOOL,
    ST_U8,
    ST_I8,
    ST_I16,
    ST_U16,
    ST_F16,
    ST_BF16,
    ST_I32,
    ST_U32,
    ST_F32,
    ST_F64,
    ST_I64,
    ST_U64,
    ST_C64,
    ST_F8_E4M3,
    ST_F8_E5M2,
    ST_F8_E4M3FNUZ,
    ST_F8_E5M2FNUZ,
    ST_F8_E8M0,
    ST_F4,
    ST_F6_E2M3,
    ST_F6_E3M2,
    ST_DTYPE_COUNT
} st_dtype;

/* Name of a dtype as written in headers ("F32"). */
const char *st_dtype_name(st_dtype dtype);
/* Bits per element (4 for F4, 6 for F6 types). */
unsigned st_dtype_bits(st_dtype dtype);

/* ---- errors ---- */

typedef enum {
    ST_OK = 0,
    ST_ERR_TOO_SMALL,        /* fewer than 8 bytes */
    ST_ERR_HEADER_TOO_LARGE, /* N over 100,000,000 */
    ST_ERR_HEADER_PAST_END,  /* 8 + N past the end of the file */
    ST_ERR_UTF8,             /* header is not UTF-8 */
    ST_ERR_JSON,             /* header is not JSON */
    ST_ERR_SCHEMA,           /* JSON of the wrong shape */
    ST_ERR_DUPLICATE,        /* a key appears twice */
    ST_ERR_DEPTH,            /* nesting too deep */
    ST_ERR_DTYPE,            /* unknown dtype */
    ST_ERR_OFFSETS,          /* data_offsets out of order, overlapping or with holes */
    ST_ERR_OVERFLOW,         /* numel x bits overflows */
    ST_ERR_MISALIGNED,       /* numel x bits is not a whole number of bytes */
    ST_ERR_SIZE_MISMATCH,    /* data_offsets span differs from dtype x shape */
    ST_ERR_FILE_LENGTH,      /* data buffer does not end exactly at the file's end */
    ST_ERR_NOMEM,
    ST_ERR_INVALID_ARGUMENT  /* writer input the format cannot hold */
} st_code;

typedef struct {
    st_code code;
    int64_t pos;                        /* byte offset in the file, or -1 */
    char message[320];
    char tensor[ST_NAME_IN_ERROR + 4];  /* NUL-terminated, may be truncated; "" if none */
    size_t tensor_len;                  /* bytes kept in tensor[] */
} st_error;

/* Clears an error to ST_OK. */
void st_error_clear(st_error *err);

/* ---- parsed header ---- */

typedef struct {
    uint64_t begin, end;    /* data_offsets, from the start of the data buffer */
    uint64_t nbytes;        /* end - begin, checked against dtype x shape */
    uint64_t numel;
    size_t name_off;        /* into table->strings, NUL-terminated */
    size_t name_len;
    size_t dims_off;        /* into table->dims */
    size_t ndim;
    size_t hpos;            /* header byte position of the entry's key */
    st_dtype dtype;
} st_entry;

typedef struct {
    size_t key_off, key_len; /* into table->strings */
    size_t val_off, val_len;
} st_meta;

typedef struct {
    st_entry *entries;      /* sorted by data_offsets (file order) once parsed */
    size_t count, cap;
    size_t *by_name;        /* entry indices sorted by name bytes */
    char *strings;          /* decoded names, metadata keys and values */
    size_t strings_len, strings_cap;
    uint64_t *dims;
    size_t dims_len, dims_cap;
    st_meta *meta;          /* sorted by key bytes */
    size_t meta_count, meta_cap;
    int has_metadata;
    uint64_t header_len;    /* N */
    uint64_t data_start;    /* 8 + N */
    uint64_t data_len;      /* bytes of the data buffer */
} st_table;

/* Initializes an empty table. */
void st_table_init(st_table *t);
/* Releases a table's memory; the table may be reused after st_table_init. */
void st_table_free(st_table *t);

/* Reads the 8-byte prefix of a file of file_len bytes; checks N against the limit
 * and the file size. avail is how many bytes of buf are readable. */
st_code st_read_prefix(const uint8_t *buf, size_t avail, uint64_t file_len,
                       uint64_t *header_len, st_error *err);

/* Parses and validates header bytes hdr[0..n) of a file of file_len bytes
 * into t (which must be freshly initialized). */
st_code st_parse_header(const uint8_t *hdr, size_t n, uint64_t file_len, st_table *t,
                        st_error *err);

/* Parses a whole file held in buf[0..len). */
st_code st_parse(const uint8_t *buf, size_t len, st_table *t, st_error *err);

/* Finds an entry by name; returns its index or -1. */
long st_find(const st_table *t, const char *name, size_t len);

/* Whether the first avail bytes of a file_len-byte file look like safetensors:
 * a plausible N and a header whose first non-blank byte is '{'. */
int st_sniff(const uint8_t *buf, size_t avail, uint64_t file_len);

/* ---- writing ---- */

typedef struct {
    const char *name;       /* UTF-8 */
    size_t name_len;
    const uint64_t *shape;  /* logical shape, as the header holds it */
    size_t ndim;
    uint64_t nbytes;        /* must equal numel x bits / 8 */
    st_dtype dtype;
} st_write_item;

typedef struct {
    const char *key, *value; /* UTF-8 */
    size_t key_len, value_len;
} st_meta_item;

typedef struct {
    uint8_t *header;        /* 8-byte prefix + padded JSON */
    size_t header_len;      /* a multiple of 8 */
    size_t *order;          /* item indices in file order */
    uint64_t *offsets;      /* begin offset of item i (indexed by item, not order) */
    uint64_t data_len;
} st_plan;

/* Plans a file: the reference writer's order (dtype, then name), offsets packed
 * from 0, and a header byte-identical to the reference writer's (metadata keys sorted).
 * "__metadata__" is written when has_metadata is set (even with nmeta 0) or nmeta > 0.
 * Every header it writes is one st_parse accepts. */
st_code st_plan_write(const st_write_item *items, size_t n, const st_meta_item *meta,
                      size_t nmeta, int has_metadata, st_plan *plan, st_error *err);

/* Releases a plan's memory. */
void st_plan_free(st_plan *plan);

#endif
