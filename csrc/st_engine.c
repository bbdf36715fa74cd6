/* st_engine.c: the safetensors format engine: header parsing and validation,
 * write planning and header serialization. Pure C: no Python, no torch, no I/O. */
#include "st_engine.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- dtypes ---- */

static const struct {
    const char *name;
    unsigned bits;
    unsigned write_rank; /* the reference writer's order: lower first */
} DTYPES[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 8, 21},
    [ST_U8] = {"U8", 8, 17},
    [ST_I8] = {"I8", 8, 16},
    [ST_I16] = {"I16", 16, 10},
    [ST_U16] = {"U16", 16, 9},
    [ST_F16] = {"F16", 16, 8},
    [ST_BF16] = {"BF16", 16, 7},
    [ST_I32] = {"I32", 32, 6},
    [ST_U32] = {"U32", 32, 5},
    [ST_F32] = {"F32", 32, 4},
    [ST_F64] = {"F64", 64, 2},
    [ST_I64] = {"I64", 64, 1},
    [ST_U64] = {"U64", 64, 0},
    [ST_C64] = {"C64", 64, 3},
    [ST_F8_E4M3] = {"F8_E4M3", 8, 14},
    [ST_F8_E5M2] = {"F8_E5M2", 8, 15},
    [ST_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8, 12},
    [ST_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8, 11},
    [ST_F8_E8M0] = {"F8_E8M0", 8, 13},
    [ST_F4] = {"F4", 4, 20},
    [ST_F6_E2M3] = {"F6_E2M3", 6, 19},
    [ST_F6_E3M2] = {"F6_E3M2", 6, 18},
};

const char *st_dtype_name(st_dtype dtype)
{
    return (unsigned)dtype < ST_DTYPE_COUNT ? DTYPES[dtype].name : "?";
}

unsigned st_dtype_bits(st_dtype dtype)
{
    return (unsigned)dtype < ST_DTYPE_COUNT ? DTYPES[dtype].bits : 0;
}

static int dtype_from_name(const char *s, size_t n, st_dtype *out)
{
    for (int i = 0; i < ST_DTYPE_COUNT; i++) {
        const char *name = DTYPES[i].name;
        if (strlen(name) == n && memcmp(name, s, n) == 0) {
            *out = (st_dtype)i;
            return 1;
        }
    }
    return 0;
}

/* ---- errors ---- */

void st_error_clear(st_error *err)
{
    err->code = ST_OK;
    err->pos = -1;
    err->message[0] = '\0';
    err->tensor[0] = '\0';
    err->tensor_len = 0;
}

static st_code st_fail(st_error *err, st_code code, int64_t pos, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static st_code st_fail(st_error *err, st_code code, int64_t pos, const char *fmt, ...)
{
    va_list ap;
    err->code = code;
    err->pos = pos;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    return code;
}

static void set_tensor(st_error *err, const char *name, size_t len)
{
    size_t keep = len < ST_NAME_IN_ERROR ? len : ST_NAME_IN_ERROR;
    /* never cut a UTF-8 sequence in half: back up to a lead byte */
    if (keep < len)
        while (keep > 0 && ((unsigned char)name[keep] & 0xC0) == 0x80)
            keep--;
    memcpy(err->tensor, name, keep);
    err->tensor[keep] = '\0';
    err->tensor_len = keep;
}

/* Copies untrusted bytes into a message-safe form: printable ASCII kept, the rest
 * as \xNN, at most max input bytes. */
static void printable(char *out, size_t out_size, const char *s, size_t n, size_t max)
{
    size_t o = 0;
    for (size_t i = 0; i < n && i < max; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch < 0x7F && ch != '\\') {
            if (o + 2 > out_size)
                break;
            out[o++] = (char)ch;
        } else {
            if (o + 5 > out_size)
                break;
            snprintf(out + o, out_size - o, "\\x%02x", ch);
            o += 4;
        }
    }
    if (n > max && o + 4 <= out_size) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o < out_size ? o : out_size - 1] = '\0';
}

/* ---- checked arithmetic ---- */

static int add_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    if (b > UINT64_MAX - a)
        return 0;
    *out = a + b;
    return 1;
}

static int mul_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    if (a != 0 && b > UINT64_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

/* ---- growable arrays ---- */

/* Ensures room for `need` more elements of size elem; capacity doubles. */
static int reserve(void **ptr, size_t *cap, size_t len, size_t need, size_t elem)
{
    size_t want, new_cap;
    void *p;
    if (need > SIZE_MAX / elem - len)
        return 0;
    want = len + need;
    if (want <= *cap)
        return 1;
    new_cap = *cap ? *cap : 16;
    while (new_cap < want)
        new_cap = new_cap > SIZE_MAX / 2 / elem ? want : new_cap * 2;
    p = realloc(*ptr, new_cap * elem);
    if (!p)
        return 0;
    *ptr = p;
    *cap = new_cap;
    return 1;
}

typedef struct {
    char *p;
    size_t len, cap;
} st_buf;

static int buf_put(st_buf *b, const void *data, size_t n)
{
    if (!reserve((void **)&b->p, &b->cap, b->len, n, 1))
        return 0;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 1;
}

static int buf_putc(st_buf *b, char ch)
{
    return buf_put(b, &ch, 1);
}

static int buf_puts(st_buf *b, const char *s)
{
    return buf_put(b, s, strlen(s));
}

static int buf_put_u64(st_buf *b, uint64_t v)
{
    char tmp[24];
    int n = snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)v);
    return buf_put(b, tmp, (size_t)n);
}

/* ---- sorting ---- */

typedef int (*idx_cmp)(size_t a, size_t b, const void *ctx);

/* Stable bottom-up merge sort of an index array; tmp holds n elements. */
static void sort_indices(size_t *idx, size_t n, size_t *tmp, idx_cmp cmp, const void *ctx)
{
    size_t *src = idx, *dst = tmp;
    for (size_t width = 1; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n;
            size_t hi = mid + width < n ? mid + width : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi)
                dst[k++] = cmp(src[j], src[i], ctx) < 0 ? src[j++] : src[i++];
            while (i < mid)
                dst[k++] = src[i++];
            while (j < hi)
                dst[k++] = src[j++];
        }
        size_t *swap = src;
        src = dst;
        dst = swap;
    }
    if (src != idx)
        memcpy(idx, src, n * sizeof(*idx));
}

static int bytes_cmp(const char *a, size_t an, const char *b, size_t bn)
{
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c)
        return c;
    return an < bn ? -1 : an > bn;
}

/* ---- UTF-8 ---- */

/* Returns the length of the valid prefix; equals n when all of s is valid UTF-8
 * (no overlong forms, no surrogates, nothing above U+10FFFF). */
static size_t utf8_valid_prefix(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t len;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
        } else {
            return i;
        }
        if (len > n - i)
            return i;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return i;
        i += len;
    }
    return n;
}

/* ---- the cursor: the one door to header bytes ---- */

typedef struct {
    const uint8_t *p; /* header bytes; p[0] is file byte 8 */
    size_t n, pos;
} st_cur;

#define AT(c) ((int64_t)ST_PREFIX_LEN + (int64_t)(c)->pos)

static int cur_peek(const st_cur *c)
{
    return c->pos < c->n ? c->p[c->pos] : -1;
}

static int cur_next(st_cur *c)
{
    return c->pos < c->n ? c->p[c->pos++] : -1;
}

static int cur_literal(st_cur *c, const char *lit)
{
    size_t len = strlen(lit);
    if (len > c->n - c->pos || memcmp(c->p + c->pos, lit, len) != 0)
        return 0;
    c->pos += len;
    return 1;
}

static void cur_ws(st_cur *c)
{
    int ch;
    while ((ch = cur_peek(c)) == ' ' || ch == '\t' || ch == '\n' || ch == '\r')
        c->pos++;
}

static int is_digit(int ch)
{
    return ch >= '0' && ch <= '9';
}

/* ---- JSON scalars ---- */

static st_code json_unexpected(st_cur *c, st_error *err, const char *expected)
{
    int ch = cur_peek(c);
    if (ch < 0)
        return st_fail(err, ST_ERR_JSON, AT(c), "invalid JSON: header ends where %s was expected",
                       expected);
    if (ch >= 0x20 && ch < 0x7F)
        return st_fail(err, ST_ERR_JSON, AT(c), "invalid JSON: expected %s, found '%c'", expected,
                       ch);
    return st_fail(err, ST_ERR_JSON, AT(c), "invalid JSON: expected %s, found byte 0x%02x",
                   expected, ch);
}

static int hex4(st_cur *c, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int ch = cur_next(c);
        v <<= 4;
        if (ch >= '0' && ch <= '9')
            v |= (unsigned)(ch - '0');
        else if (ch >= 'a' && ch <= 'f')
            v |= (unsigned)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F')
            v |= (unsigned)(ch - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

static int put_utf8(st_buf *out, unsigned cp)
{
    char b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        b[0] = (char)(0xC0 | (cp >> 6));
        b[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | (cp >> 12));
        b[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        b[0] = (char)(0xF0 | (cp >> 18));
        b[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return out ? buf_put(out, b, n) : 1;
}

/* Reads a JSON string at the cursor (which must be at '"'). Decoded bytes are
 * appended to out, followed by a NUL, unless out is NULL (validate only).
 * The header was checked to be UTF-8 before parsing starts. */
static st_code json_string(st_cur *c, st_buf *out, st_error *err)
{
    int64_t start = AT(c);
    c->pos++; /* the opening quote, checked by the caller */
    for (;;) {
        size_t run = c->pos;
        int ch;
        /* copy runs of plain bytes at once */
        while (c->pos < c->n && c->p[c->pos] != '"' && c->p[c->pos] != '\\' &&
               c->p[c->pos] >= 0x20)
            c->pos++;
        if (out && c->pos > run && !buf_put(out, c->p + run, c->pos - run))
            return st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
        ch = cur_next(c);
        if (ch == '"')
            break;
        if (ch < 0)
            return st_fail(err, ST_ERR_JSON, start, "invalid JSON: unterminated string");
        if (ch < 0x20)
            return st_fail(err, ST_ERR_JSON, AT(c) - 1,
                           "invalid JSON: control character 0x%02x in a string", ch);
        /* ch == '\\' */
        ch = cur_next(c);
        char simple = 0;
        switch (ch) {
        case '"': simple = '"'; break;
        case '\\': simple = '\\'; break;
        case '/': simple = '/'; break;
        case 'b': simple = '\b'; break;
        case 'f': simple = '\f'; break;
        case 'n': simple = '\n'; break;
        case 'r': simple = '\r'; break;
        case 't': simple = '\t'; break;
        case 'u': break;
        default:
            return st_fail(err, ST_ERR_JSON, AT(c) - 1, "invalid JSON: invalid escape in a string");
        }
        if (simple) {
            if (out && !buf_putc(out, simple))
                return st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
            continue;
        }
        unsigned cp, lo;
        if (!hex4(c, &cp))
            return st_fail(err, ST_ERR_JSON, AT(c), "invalid JSON: invalid \\u escape");
        if (cp >= 0xDC00 && cp <= 0xDFFF)
            return st_fail(err, ST_ERR_JSON, AT(c), "invalid JSON: lone surrogate in \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!cur_literal(c, "\\u") || !hex4(c, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                return st_fail(err, ST_ERR_JSON, AT(c),
                               "invalid JSON: lone surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (!put_utf8(out, cp))
            return st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
    }
    if (out && !buf_putc(out, '\0'))
        return st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
    return ST_OK;
}

/* Validates a JSON number at the cursor (RFC 8259 grammar). */
static st_code json_number(st_cur *c, st_error *err)
{
    if (cur_peek(c) == '-')
        c->pos++;
    if (cur_peek(c) == '0') {
        c->pos++;
    } else if (is_digit(cur_peek(c))) {
        while (is_digit(cur_peek(c)))
            c->pos++;
    } else {
        return json_unexpected(c, err, "a digit");
    }
    if (cur_peek(c) == '.') {
        c->pos++;
        if (!is_digit(cur_peek(c)))
            return json_unexpected(c, err, "a digit");
        while (is_digit(cur_peek(c)))
            c->pos++;
    }
    if (cur_peek(c) == 'e' || cur_peek(c) == 'E') {
        c->pos++;
        if (cur_peek(c) == '+' || cur_peek(c) == '-')
            c->pos++;
        if (!is_digit(cur_peek(c)))
            return json_unexpected(c, err, "a digit");
        while (is_digit(cur_peek(c)))
            c->pos++;
    }
    return ST_OK;
}

/* Reads a non-negative integer that fits in 64 bits; `what` names it in errors. */
static st_code json_u64(st_cur *c, uint64_t *out, const char *what, st_error *err)
{
    int64_t start = AT(c);
    int ch = cur_peek(c);
    uint64_t v = 0;
    if (ch == '-') {
        st_code rc = json_number(c, err);
        if (rc)
            return rc;
        return st_fail(err, ST_ERR_SCHEMA, start, "%s must be a non-negative integer", what);
    }
    if (!is_digit(ch)) {
        if (ch == '"' || ch == '{' || ch == '[' || ch == 't' || ch == 'f' || ch == 'n')
            return st_fail(err, ST_ERR_SCHEMA, start, "%s must be a non-negative integer", what);
        return json_unexpected(c, err, "a number");
    }
    if (ch == '0') {
        c->pos++;
        if (is_digit(cur_peek(c)))
            return st_fail(err, ST_ERR_JSON, AT(c), "invalid JSON: number with a leading zero");
    } else {
        while (is_digit(ch = cur_peek(c))) {
            if (!mul_u64(v, 10, &v) || !add_u64(v, (uint64_t)(ch - '0'), &v))
                return st_fail(err, ST_ERR_SCHEMA, start, "%s is too large (over 2^64 - 1)",
                               what);
            c->pos++;
        }
    }
    ch = cur_peek(c);
    if (ch == '.' || ch == 'e' || ch == 'E') {
        c->pos = (size_t)(start - (int64_t)ST_PREFIX_LEN);
        st_code rc = json_number(c, err);
        if (rc)
            return rc;
        return st_fail(err, ST_ERR_SCHEMA, start, "%s must be an integer, not a fraction", what);
    }
    *out = v;
    return ST_OK;
}

/* After an item of an object or array: consumes ',' (returns 0) or the closing
 * byte (returns 1); anything else is an error (returns -1 with err set). */
static int json_next_item(st_cur *c, int close, st_error *err)
{
    int ch;
    cur_ws(c);
    ch = cur_peek(c);
    if (ch == close || ch == ',') {
        c->pos++;
        return ch == close;
    }
    json_unexpected(c, err, close == '}' ? "',' or '}'" : "',' or ']'");
    return -1;
}

/* Validates and skips any JSON value, iteratively, nesting at most ST_MAX_DEPTH. */
static st_code json_skip(st_cur *c, st_error *err)
{
    unsigned char stack[ST_MAX_DEPTH]; /* 1 = object, 0 = array */
    size_t depth = 0;
    st_code rc;
    int ch;

value:
    cur_ws(c);
    ch = cur_peek(c);
    if (ch == '{' || ch == '[') {
        if (depth == ST_MAX_DEPTH)
            return st_fail(err, ST_ERR_DEPTH, AT(c), "JSON nested deeper than %d levels",
                           ST_MAX_DEPTH);
        stack[depth++] = ch == '{';
        c->pos++;
        cur_ws(c);
        if (cur_peek(c) == (ch == '{' ? '}' : ']')) {
            c->pos++;
            depth--;
            goto after;
        }
        if (ch == '{')
            goto key;
        goto value;
    }
    if (ch == '"')
        rc = json_string(c, NULL, err);
    else if (ch == '-' || is_digit(ch))
        rc = json_number(c, err);
    else if (cur_literal(c, "true") || cur_literal(c, "false") || cur_literal(c, "null"))
        rc = ST_OK;
    else
        return json_unexpected(c, err, "a JSON value");
    if (rc)
        return rc;
after:
    if (depth == 0)
        return ST_OK;
    cur_ws(c);
    ch = cur_peek(c);
    if (ch == ',') {
        c->pos++;
        if (stack[depth - 1])
            goto key;
        goto value;
    }
    if (ch == (stack[depth - 1] ? '}' : ']')) {
        c->pos++;
        depth--;
        goto after;
    }
    return json_unexpected(c, err, stack[depth - 1] ? "',' or '}'" : "',' or ']'");
key:
    cur_ws(c);
    if (cur_peek(c) != '"')
        return json_unexpected(c, err, "a string key");
    if ((rc = json_string(c, NULL, err)))
        return rc;
    cur_ws(c);
    if (cur_peek(c) != ':')
        return json_unexpected(c, err, "':'");
    c->pos++;
    goto value;
}

/* ---- header parsing ---- */

typedef struct {
    st_cur c;
    st_table *t;
    st_buf scratch;
    st_error *err;
} st_parser;

/* The tensor an error is about, set from the table's strings. */
static st_code fail_entry(st_parser *ps, size_t name_off, size_t name_len, st_code code)
{
    set_tensor(ps->err, ps->t->strings + name_off, name_len);
    return code;
}

/* Appends a decoded string to the table's strings; returns its offset and length. */
static st_code table_string(st_parser *ps, size_t *off, size_t *len)
{
    st_buf b = {ps->t->strings, ps->t->strings_len, ps->t->strings_cap};
    st_code rc = json_string(&ps->c, &b, ps->err);
    ps->t->strings = b.p;
    ps->t->strings_cap = b.cap;
    if (rc)
        return rc;
    *off = ps->t->strings_len;
    *len = b.len - ps->t->strings_len - 1; /* without the NUL */
    ps->t->strings_len = b.len;
    return ST_OK;
}

static st_code expect(st_parser *ps, int ch, const char *what)
{
    cur_ws(&ps->c);
    if (cur_peek(&ps->c) != ch)
        return json_unexpected(&ps->c, ps->err, what);
    ps->c.pos++;
    return ST_OK;
}

static st_code parse_metadata(st_parser *ps)
{
    st_table *t = ps->t;
    st_cur *c = &ps->c;
    st_code rc;
    cur_ws(c);
    if (cur_peek(c) != '{') {
        if (cur_peek(c) < 0)
            return json_unexpected(c, ps->err, "the metadata object");
        if ((rc = json_skip(c, ps->err)))
            return rc;
        return st_fail(ps->err, ST_ERR_SCHEMA, AT(c), "__metadata__ must be an object of strings");
    }
    c->pos++;
    cur_ws(c);
    if (cur_peek(c) == '}') {
        c->pos++;
        return ST_OK;
    }
    for (;;) {
        st_meta m;
        int64_t at;
        cur_ws(c);
        if (cur_peek(c) != '"')
            return json_unexpected(c, ps->err, "a string key");
        if ((rc = table_string(ps, &m.key_off, &m.key_len)))
            return rc;
        if ((rc = expect(ps, ':', "':'")))
            return rc;
        cur_ws(c);
        at = AT(c);
        if (cur_peek(c) != '"') {
            char key[80];
            if (cur_peek(c) < 0)
                return json_unexpected(c, ps->err, "a metadata value");
            if ((rc = json_skip(c, ps->err)))
                return rc;
            printable(key, sizeof(key), t->strings + m.key_off, m.key_len, 40);
            return st_fail(ps->err, ST_ERR_SCHEMA, at,
                           "__metadata__ value for key '%s' must be a string", key);
        }
        if ((rc = table_string(ps, &m.val_off, &m.val_len)))
            return rc;
        if (!reserve((void **)&t->meta, &t->meta_cap, t->meta_count, 1, sizeof(st_meta)))
            return st_fail(ps->err, ST_ERR_NOMEM, -1, "out of memory");
        t->meta[t->meta_count++] = m;
        int next = json_next_item(c, '}', ps->err);
        if (next)
            return next > 0 ? ST_OK : ps->err->code;
    }
}

enum { F_DTYPE = 1, F_SHAPE = 2, F_OFFSETS = 4 };

static st_code parse_entry(st_parser *ps, st_entry *e)
{
    st_table *t = ps->t;
    st_cur *c = &ps->c;
    st_code rc;
    unsigned seen = 0;
    int next;

    cur_ws(c);
    if (cur_peek(c) != '{') {
        int64_t at = AT(c);
        if (cur_peek(c) < 0)
            return json_unexpected(c, ps->err, "a tensor entry");
        if ((rc = json_skip(c, ps->err)))
            return fail_entry(ps, e->name_off, e->name_len, rc);
        st_fail(ps->err, ST_ERR_SCHEMA, at, "entry must be an object with dtype, shape and "
                                            "data_offsets");
        return fail_entry(ps, e->name_off, e->name_len, ST_ERR_SCHEMA);
    }
    c->pos++;
    cur_ws(c);
    if (cur_peek(c) == '}') {
        c->pos++;
        goto done;
    }
    for (;;) {
        unsigned field = 0;
        int64_t at;
        cur_ws(c);
        if (cur_peek(c) != '"')
            return fail_entry(ps, e->name_off, e->name_len,
                              json_unexpected(c, ps->err, "a string key"));
        ps->scratch.len = 0;
        at = AT(c);
        if ((rc = json_string(c, &ps->scratch, ps->err)))
            return fail_entry(ps, e->name_off, e->name_len, rc);
        if (strcmp(ps->scratch.p, "dtype") == 0 && ps->scratch.len == 6)
            field = F_DTYPE;
        else if (strcmp(ps->scratch.p, "shape") == 0 && ps->scratch.len == 6)
            field = F_SHAPE;
        else if (strcmp(ps->scratch.p, "data_offsets") == 0 && ps->scratch.len == 13)
            field = F_OFFSETS;
        if (field & seen) {
            st_fail(ps->err, ST_ERR_DUPLICATE, at, "field '%s' appears twice in the entry",
                    ps->scratch.p);
            return fail_entry(ps, e->name_off, e->name_len, ST_ERR_DUPLICATE);
        }
        seen |= field;
        if ((rc = expect(ps, ':', "':'")))
            return fail_entry(ps, e->name_off, e->name_len, rc);
        cur_ws(c);
        at = AT(c);
        if (field == F_DTYPE) {
            char shown[64];
            if (cur_peek(c) != '"') {
                if (cur_peek(c) >= 0 && (rc = json_skip(c, ps->err)))
                    return fail_entry(ps, e->name_off, e->name_len, rc);
                st_fail(ps->err, ST_ERR_SCHEMA, at, "dtype must be a string");
                return fail_entry(ps, e->name_off, e->name_len, ST_ERR_SCHEMA);
            }
            ps->scratch.len = 0;
            if ((rc = json_string(c, &ps->scratch, ps->err)))
                return fail_entry(ps, e->name_off, e->name_len, rc);
            if (!dtype_from_name(ps->scratch.p, ps->scratch.len - 1, &e->dtype)) {
                printable(shown, sizeof(shown), ps->scratch.p, ps->scratch.len - 1, 24);
                st_fail(ps->err, ST_ERR_DTYPE, at, "unknown dtype '%s'", shown);
                return fail_entry(ps, e->name_off, e->name_len, ST_ERR_DTYPE);
            }
        } else if (field == F_SHAPE || field == F_OFFSETS) {
            const char *what = field == F_SHAPE ? "shape" : "data_offsets";
            const char *item = field == F_SHAPE ? "a shape dimension" : "a data offset";
            size_t count = 0;
            uint64_t offs[2] = {0, 0};
            if (cur_peek(c) != '[') {
                if (cur_peek(c) >= 0 && (rc = json_skip(c, ps->err)))
                    return fail_entry(ps, e->name_off, e->name_len, rc);
                st_fail(ps->err, ST_ERR_SCHEMA, at, "%s must be an array of integers", what);
                return fail_entry(ps, e->name_off, e->name_len, ST_ERR_SCHEMA);
            }
            c->pos++;
            if (field == F_SHAPE)
                e->dims_off = t->dims_len;
            cur_ws(c);
            if (cur_peek(c) == ']') {
                c->pos++;
            } else {
                for (;;) {
                    uint64_t v = 0;
                    int64_t vat;
                    cur_ws(c);
                    vat = AT(c);
                    if ((rc = json_u64(c, &v, item, ps->err)))
                        return fail_entry(ps, e->name_off, e->name_len, rc);
                    if (field == F_SHAPE) {
                        if (!reserve((void **)&t->dims, &t->dims_cap, t->dims_len, 1,
                                     sizeof(uint64_t)))
                            return st_fail(ps->err, ST_ERR_NOMEM, -1, "out of memory");
                        t->dims[t->dims_len++] = v;
                    } else if (count < 2) {
                        offs[count] = v;
                    } else {
                        st_fail(ps->err, ST_ERR_SCHEMA, vat,
                                "data_offsets must hold exactly 2 integers");
                        return fail_entry(ps, e->name_off, e->name_len, ST_ERR_SCHEMA);
                    }
                    count++;
                    next = json_next_item(c, ']', ps->err);
                    if (next < 0)
                        return fail_entry(ps, e->name_off, e->name_len, ps->err->code);
                    if (next)
                        break;
                }
            }
            if (field == F_SHAPE) {
                e->ndim = count;
            } else {
                if (count != 2) {
                    st_fail(ps->err, ST_ERR_SCHEMA, at,
                            "data_offsets must hold exactly 2 integers");
                    return fail_entry(ps, e->name_off, e->name_len, ST_ERR_SCHEMA);
                }
                e->begin = offs[0];
                e->end = offs[1];
            }
        } else {
            /* unknown fields are ignored, as the reference reader does, once
             * validated as JSON with bounded nesting */
            if ((rc = json_skip(c, ps->err)))
                return fail_entry(ps, e->name_off, e->name_len, rc);
        }
        next = json_next_item(c, '}', ps->err);
        if (next < 0)
            return fail_entry(ps, e->name_off, e->name_len, ps->err->code);
        if (next)
            break;
    }
done:
    if (seen != (F_DTYPE | F_SHAPE | F_OFFSETS)) {
        const char *missing = !(seen & F_DTYPE) ? "dtype" : !(seen & F_SHAPE) ? "shape"
                                                                              : "data_offsets";
        st_fail(ps->err, ST_ERR_SCHEMA, (int64_t)(ST_PREFIX_LEN + e->hpos),
                "entry is missing the field '%s'", missing);
        return fail_entry(ps, e->name_off, e->name_len, ST_ERR_SCHEMA);
    }
    return ST_OK;
}

static st_code parse_object(st_parser *ps)
{
    st_table *t = ps->t;
    st_cur *c = &ps->c;
    st_code rc;
    int ch;

    cur_ws(c);
    if (cur_peek(c) != '{') {
        if (cur_peek(c) < 0)
            return st_fail(ps->err, ST_ERR_JSON, AT(c), "invalid JSON: the header is empty");
        if (cur_peek(c) == '[' || cur_peek(c) == '"' || cur_peek(c) == '-' ||
            is_digit(cur_peek(c)) || cur_peek(c) == 't' || cur_peek(c) == 'f' ||
            cur_peek(c) == 'n')
            return st_fail(ps->err, ST_ERR_SCHEMA, AT(c), "the header must be a JSON object");
        return json_unexpected(c, ps->err, "'{'");
    }
    c->pos++;
    cur_ws(c);
    if (cur_peek(c) == '}') {
        c->pos++;
        goto end;
    }
    for (;;) {
        st_entry e;
        memset(&e, 0, sizeof(e));
        cur_ws(c);
        if (cur_peek(c) != '"')
            return json_unexpected(c, ps->err, "a string key");
        e.hpos = c->pos;
        if ((rc = table_string(ps, &e.name_off, &e.name_len)))
            return rc;
        if ((rc = expect(ps, ':', "':'")))
            return fail_entry(ps, e.name_off, e.name_len, rc);
        if (e.name_len == 12 && memcmp(t->strings + e.name_off, "__metadata__", 12) == 0) {
            t->strings_len = e.name_off; /* the key itself is not kept */
            if (t->has_metadata)
                return st_fail(ps->err, ST_ERR_DUPLICATE, (int64_t)(ST_PREFIX_LEN + e.hpos),
                               "duplicate key '__metadata__'");
            t->has_metadata = 1;
            if ((rc = parse_metadata(ps)))
                return rc;
        } else {
            if ((rc = parse_entry(ps, &e)))
                return rc;
            if (!reserve((void **)&t->entries, &t->cap, t->count, 1, sizeof(st_entry)))
                return st_fail(ps->err, ST_ERR_NOMEM, -1, "out of memory");
            t->entries[t->count++] = e;
        }
        int next = json_next_item(c, '}', ps->err);
        if (next < 0)
            return ps->err->code;
        if (next)
            break;
    }
end:
    cur_ws(c);
    if (c->pos != c->n) {
        ch = cur_peek(c);
        return st_fail(ps->err, ST_ERR_JSON, AT(c),
                       "invalid JSON: trailing byte 0x%02x after the header object", ch);
    }
    return ST_OK;
}

/* ---- validation ---- */

static int cmp_entry_name(size_t a, size_t b, const void *ctx)
{
    const st_table *t = ctx;
    const st_entry *x = &t->entries[a], *y = &t->entries[b];
    return bytes_cmp(t->strings + x->name_off, x->name_len, t->strings + y->name_off,
                     y->name_len);
}

static int cmp_entry_offsets(size_t a, size_t b, const void *ctx)
{
    const st_table *t = ctx;
    const st_entry *x = &t->entries[a], *y = &t->entries[b];
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return cmp_entry_name(a, b, ctx);
}

static int cmp_meta_key(size_t a, size_t b, const void *ctx)
{
    const st_table *t = ctx;
    return bytes_cmp(t->strings + t->meta[a].key_off, t->meta[a].key_len,
                     t->strings + t->meta[b].key_off, t->meta[b].key_len);
}

static st_code validate(st_table *t, uint64_t file_len, st_error *err)
{
    size_t n = t->count, m = t->meta_count;
    size_t big = n > m ? n : m;
    size_t *idx = NULL, *tmp = NULL;
    st_entry *sorted = NULL;
    st_code rc = ST_OK;
    uint64_t end = 0, total;

    if (big) {
        idx = malloc(big * sizeof(size_t));
        tmp = malloc(big * sizeof(size_t));
        if (!idx || !tmp) {
            rc = st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
            goto done;
        }
    }
    /* metadata keys, sorted and unique */
    if (m) {
        st_meta *meta_sorted = malloc(m * sizeof(st_meta));
        if (!meta_sorted) {
            rc = st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
            goto done;
        }
        for (size_t i = 0; i < m; i++)
            idx[i] = i;
        sort_indices(idx, m, tmp, cmp_meta_key, t);
        for (size_t i = 0; i < m; i++)
            meta_sorted[i] = t->meta[idx[i]];
        free(t->meta);
        t->meta = meta_sorted;
        t->meta_cap = m;
        for (size_t i = 1; i < m; i++) {
            if (cmp_meta_key(i - 1, i, t) == 0) {
                char key[80];
                printable(key, sizeof(key), t->strings + t->meta[i].key_off, t->meta[i].key_len,
                          40);
                rc = st_fail(err, ST_ERR_DUPLICATE, -1, "duplicate __metadata__ key '%s'", key);
                goto done;
            }
        }
    }
    if (!n)
        goto length;
    /* names unique */
    for (size_t i = 0; i < n; i++)
        idx[i] = i;
    sort_indices(idx, n, tmp, cmp_entry_name, t);
    for (size_t i = 1; i < n; i++) {
        if (cmp_entry_name(idx[i - 1], idx[i], t) == 0) {
            const st_entry *e = &t->entries[idx[i]];
            size_t later = t->entries[idx[i - 1]].hpos > e->hpos ? idx[i - 1] : idx[i];
            e = &t->entries[later];
            rc = st_fail(err, ST_ERR_DUPLICATE, (int64_t)(ST_PREFIX_LEN + e->hpos),
                         "duplicate tensor name");
            set_tensor(err, t->strings + e->name_off, e->name_len);
            goto done;
        }
    }
    /* file order: by data_offsets */
    for (size_t i = 0; i < n; i++)
        idx[i] = i;
    sort_indices(idx, n, tmp, cmp_entry_offsets, t);
    sorted = malloc(n * sizeof(st_entry));
    if (!sorted) {
        rc = st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++)
        sorted[i] = t->entries[idx[i]];
    free(t->entries);
    t->entries = sorted;
    t->cap = n;
    sorted = NULL;

    for (size_t i = 0; i < n; i++) {
        st_entry *e = &t->entries[i];
        int64_t at = (int64_t)(ST_PREFIX_LEN + e->hpos);
        uint64_t numel = 1, bits;
        if (e->begin != end || e->end < e->begin) {
            if (e->end < e->begin)
                rc = st_fail(err, ST_ERR_OFFSETS, at,
                             "data_offsets [%llu, %llu] end before they begin",
                             (unsigned long long)e->begin, (unsigned long long)e->end);
            else if (e->begin < end)
                rc = st_fail(err, ST_ERR_OFFSETS, at,
                             "data_offsets [%llu, %llu] overlap the previous tensor, which ends "
                             "at %llu",
                             (unsigned long long)e->begin, (unsigned long long)e->end,
                             (unsigned long long)end);
            else
                rc = st_fail(err, ST_ERR_OFFSETS, at,
                             "data_offsets [%llu, %llu] leave a hole after the previous tensor, "
                             "which ends at %llu",
                             (unsigned long long)e->begin, (unsigned long long)e->end,
                             (unsigned long long)end);
            set_tensor(err, t->strings + e->name_off, e->name_len);
            goto done;
        }
        end = e->end;
        for (size_t d = 0; d < e->ndim; d++) {
            /* in range: dims_off + ndim were appended by parse_entry */
            if (!mul_u64(numel, t->dims[e->dims_off + d], &numel)) {
                rc = st_fail(err, ST_ERR_OVERFLOW, at, "the number of elements overflows");
                set_tensor(err, t->strings + e->name_off, e->name_len);
                goto done;
            }
        }
        if (!mul_u64(numel, st_dtype_bits(e->dtype), &bits)) {
            rc = st_fail(err, ST_ERR_OVERFLOW, at, "the size in bits overflows");
            set_tensor(err, t->strings + e->name_off, e->name_len);
            goto done;
        }
        if (bits % 8) {
            rc = st_fail(err, ST_ERR_MISALIGNED, at,
                         "%llu elements of %s do not fill a whole number of bytes",
                         (unsigned long long)numel, st_dtype_name(e->dtype));
            set_tensor(err, t->strings + e->name_off, e->name_len);
            goto done;
        }
        e->numel = numel;
        e->nbytes = bits / 8;
        if (e->end - e->begin != e->nbytes) {
            rc = st_fail(err, ST_ERR_SIZE_MISMATCH, at,
                         "data_offsets span %llu bytes but dtype %s and the shape need %llu",
                         (unsigned long long)(e->end - e->begin), st_dtype_name(e->dtype),
                         (unsigned long long)e->nbytes);
            set_tensor(err, t->strings + e->name_off, e->name_len);
            goto done;
        }
    }
    /* lookup index, by name */
    t->by_name = malloc(n * sizeof(size_t));
    if (!t->by_name) {
        rc = st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++)
        t->by_name[i] = i;
    sort_indices(t->by_name, n, tmp, cmp_entry_name, t);

length:
    t->data_len = end;
    if (!add_u64(t->data_start, end, &total) || total != file_len) {
        if (add_u64(t->data_start, end, &total) && total < file_len)
            rc = st_fail(err, ST_ERR_FILE_LENGTH, (int64_t)total,
                         "%llu trailing bytes after the last tensor (the data ends at byte "
                         "%llu of %llu)",
                         (unsigned long long)(file_len - total), (unsigned long long)total,
                         (unsigned long long)file_len);
        else
            rc = st_fail(err, ST_ERR_FILE_LENGTH, -1,
                         "the tensors need %llu data bytes but the file holds only %llu after "
                         "the header",
                         (unsigned long long)end,
                         (unsigned long long)(file_len - t->data_start));
    }
done:
    free(idx);
    free(tmp);
    free(sorted);
    return rc;
}

/* ---- public parsing entry points ---- */

void st_table_init(st_table *t)
{
    memset(t, 0, sizeof(*t));
}

void st_table_free(st_table *t)
{
    free(t->entries);
    free(t->by_name);
    free(t->strings);
    free(t->dims);
    free(t->meta);
    memset(t, 0, sizeof(*t));
}

st_code st_read_prefix(const uint8_t *buf, size_t avail, uint64_t file_len,
                       uint64_t *header_len, st_error *err)
{
    uint64_t n = 0;
    st_error_clear(err);
    if (file_len < ST_PREFIX_LEN || avail < ST_PREFIX_LEN)
        return st_fail(err, ST_ERR_TOO_SMALL, 0,
                       "file too small: %llu bytes, a safetensors file starts with an 8-byte "
                       "header length",
                       (unsigned long long)(file_len < ST_PREFIX_LEN ? file_len : avail));
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | buf[i];
    if (n > ST_MAX_HEADER_LEN)
        return st_fail(err, ST_ERR_HEADER_TOO_LARGE, 0,
                       "header length %llu is over the limit of %llu bytes",
                       (unsigned long long)n, (unsigned long long)ST_MAX_HEADER_LEN);
    if (n > file_len - ST_PREFIX_LEN)
        return st_fail(err, ST_ERR_HEADER_PAST_END, 0,
                       "header length %llu runs past the end of the %llu-byte file",
                       (unsigned long long)n, (unsigned long long)file_len);
    *header_len = n;
    return ST_OK;
}

st_code st_parse_header(const uint8_t *hdr, size_t n, uint64_t file_len, st_table *t,
                        st_error *err)
{
    st_parser ps;
    st_code rc;
    size_t valid;

    st_error_clear(err);
    t->header_len = n;
    t->data_start = ST_PREFIX_LEN + (uint64_t)n;
    if (file_len < t->data_start)
        return st_fail(err, ST_ERR_HEADER_PAST_END, 0,
                       "header length %llu runs past the end of the %llu-byte file",
                       (unsigned long long)n, (unsigned long long)file_len);
    valid = utf8_valid_prefix(hdr, n);
    if (valid != n)
        return st_fail(err, ST_ERR_UTF8, (int64_t)(ST_PREFIX_LEN + valid),
                       "the header is not valid UTF-8");
    memset(&ps, 0, sizeof(ps));
    ps.c.p = hdr;
    ps.c.n = n;
    ps.t = t;
    ps.err = err;
    rc = parse_object(&ps);
    free(ps.scratch.p);
    if (rc)
        return rc;
    return validate(t, file_len, err);
}

st_code st_parse(const uint8_t *buf, size_t len, st_table *t, st_error *err)
{
    uint64_t n;
    st_code rc = st_read_prefix(buf, len, len, &n, err);
    if (rc)
        return rc;
    /* in range: st_read_prefix checked 8 + n <= len */
    return st_parse_header(buf + ST_PREFIX_LEN, (size_t)n, len, t, err);
}

long st_find(const st_table *t, const char *name, size_t len)
{
    size_t lo = 0, hi = t->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const st_entry *e = &t->entries[t->by_name[mid]];
        int c = bytes_cmp(t->strings + e->name_off, e->name_len, name, len);
        if (c == 0)
            return (long)t->by_name[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

int st_sniff(const uint8_t *buf, size_t avail, uint64_t file_len)
{
    uint64_t n = 0;
    if (avail < ST_PREFIX_LEN + 2 || file_len < ST_PREFIX_LEN + 2)
        return 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | buf[i];
    if (n < 2 || n > ST_MAX_HEADER_LEN || n > file_len - ST_PREFIX_LEN)
        return 0;
    for (size_t i = ST_PREFIX_LEN; i < avail && i - ST_PREFIX_LEN < n; i++) {
        uint8_t ch = buf[i];
        if (ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r')
            continue;
        return ch == '{';
    }
    return 0;
}

/* ---- writing ---- */

static int json_put_string(st_buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0;
    if (!buf_putc(b, '"'))
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        char esc[7];
        size_t elen = 2;
        if (ch >= 0x20 && ch != '"' && ch != '\\')
            continue;
        if (!buf_put(b, s + run, i - run))
            return 0;
        esc[0] = '\\';
        switch (ch) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[ch >> 4];
            esc[5] = hex[ch & 15];
            elen = 6;
        }
        if (!buf_put(b, esc, elen))
            return 0;
        run = i + 1;
    }
    return buf_put(b, s + run, n - run) && buf_putc(b, '"');
}

typedef struct {
    const st_write_item *items;
    const st_meta_item *meta;
} write_ctx;

static int cmp_write_order(size_t a, size_t b, const void *ctx)
{
    const st_write_item *x = &((const write_ctx *)ctx)->items[a];
    const st_write_item *y = &((const write_ctx *)ctx)->items[b];
    unsigned rx = DTYPES[x->dtype].write_rank, ry = DTYPES[y->dtype].write_rank;
    if (rx != ry)
        return rx < ry ? -1 : 1;
    return bytes_cmp(x->name, x->name_len, y->name, y->name_len);
}

static int cmp_write_name(size_t a, size_t b, const void *ctx)
{
    const st_write_item *x = &((const write_ctx *)ctx)->items[a];
    const st_write_item *y = &((const write_ctx *)ctx)->items[b];
    return bytes_cmp(x->name, x->name_len, y->name, y->name_len);
}

static int cmp_write_meta(size_t a, size_t b, const void *ctx)
{
    const st_meta_item *x = &((const write_ctx *)ctx)->meta[a];
    const st_meta_item *y = &((const write_ctx *)ctx)->meta[b];
    return bytes_cmp(x->key, x->key_len, y->key, y->key_len);
}

void st_plan_free(st_plan *plan)
{
    free(plan->header);
    free(plan->order);
    free(plan->offsets);
    memset(plan, 0, sizeof(*plan));
}

st_code st_plan_write(const st_write_item *items, size_t n, const st_meta_item *meta,
                      size_t nmeta, int has_metadata, st_plan *plan, st_error *err)
{
    write_ctx ctx = {items, meta};
    size_t big = n > nmeta ? n : nmeta;
    size_t *tmp = NULL, *midx = NULL;
    st_buf b = {NULL, 0, 0};
    st_code rc = ST_OK;
    uint64_t off = 0;

    st_error_clear(err);
    memset(plan, 0, sizeof(*plan));
    if (big) {
        tmp = malloc(big * sizeof(size_t));
        if (!tmp)
            goto nomem;
    }
    if (n) {
        plan->order = malloc(n * sizeof(size_t));
        plan->offsets = malloc(n * sizeof(uint64_t));
        if (!plan->order || !plan->offsets)
            goto nomem;
    }
    for (size_t i = 0; i < n; i++) {
        const st_write_item *it = &items[i];
        uint64_t numel = 1, bits;
        if (utf8_valid_prefix((const uint8_t *)it->name, it->name_len) != it->name_len) {
            rc = st_fail(err, ST_ERR_INVALID_ARGUMENT, -1, "tensor name is not valid UTF-8");
            goto error;
        }
        if ((unsigned)it->dtype >= ST_DTYPE_COUNT) {
            rc = st_fail(err, ST_ERR_INVALID_ARGUMENT, -1, "unknown dtype");
            set_tensor(err, it->name, it->name_len);
            goto error;
        }
        if (it->name_len == 12 && memcmp(it->name, "__metadata__", 12) == 0) {
            rc = st_fail(err, ST_ERR_INVALID_ARGUMENT, -1,
                         "'__metadata__' is reserved and cannot name a tensor");
            set_tensor(err, it->name, it->name_len);
            goto error;
        }
        /* the reader's rule: any overflow of the running product is an error */
        size_t d = 0;
        while (d < it->ndim && mul_u64(numel, it->shape[d], &numel))
            d++;
        if (d < it->ndim || !mul_u64(numel, st_dtype_bits(it->dtype), &bits)) {
            rc = st_fail(err, ST_ERR_OVERFLOW, -1, "the number of elements overflows");
            set_tensor(err, it->name, it->name_len);
            goto error;
        }
        if (bits % 8 || bits / 8 != it->nbytes) {
            rc = st_fail(err, ST_ERR_INVALID_ARGUMENT, -1,
                         "the shape and dtype %s do not describe %llu bytes",
                         st_dtype_name(it->dtype), (unsigned long long)it->nbytes);
            set_tensor(err, it->name, it->name_len);
            goto error;
        }
        plan->order[i] = i;
    }
    /* names unique */
    sort_indices(plan->order, n, tmp, cmp_write_name, &ctx);
    for (size_t i = 1; i < n; i++) {
        if (cmp_write_name(plan->order[i - 1], plan->order[i], &ctx) == 0) {
            const st_write_item *it = &items[plan->order[i]];
            rc = st_fail(err, ST_ERR_DUPLICATE, -1, "duplicate tensor name");
            set_tensor(err, it->name, it->name_len);
            goto error;
        }
    }
    for (size_t i = 0; i < n; i++)
        plan->order[i] = i;
    sort_indices(plan->order, n, tmp, cmp_write_order, &ctx);

    if (!buf_put(&b, "\0\0\0\0\0\0\0\0{", 9))
        goto nomem;
    if (has_metadata || nmeta) {
        if (nmeta) {
            midx = malloc(nmeta * sizeof(size_t));
            if (!midx)
                goto nomem;
        }
        for (size_t i = 0; i < nmeta; i++) {
            if (utf8_valid_prefix((const uint8_t *)meta[i].key, meta[i].key_len) !=
                    meta[i].key_len ||
                utf8_valid_prefix((const uint8_t *)meta[i].value, meta[i].value_len) !=
                    meta[i].value_len) {
                rc = st_fail(err, ST_ERR_INVALID_ARGUMENT, -1, "metadata is not valid UTF-8");
                goto error;
            }
            midx[i] = i;
        }
        sort_indices(midx, nmeta, tmp, cmp_write_meta, &ctx);
        if (!buf_puts(&b, "\"__metadata__\":{"))
            goto nomem;
        for (size_t i = 0; i < nmeta; i++) {
            const st_meta_item *m = &meta[midx[i]];
            if (i && cmp_write_meta(midx[i - 1], midx[i], &ctx) == 0) {
                rc = st_fail(err, ST_ERR_DUPLICATE, -1, "duplicate metadata key");
                goto error;
            }
            if ((i && !buf_putc(&b, ',')) || !json_put_string(&b, m->key, m->key_len) ||
                !buf_putc(&b, ':') || !json_put_string(&b, m->value, m->value_len))
                goto nomem;
        }
        if (!buf_putc(&b, '}') || (n && !buf_putc(&b, ',')))
            goto nomem;
    }
    for (size_t k = 0; k < n; k++) {
        size_t i = plan->order[k];
        const st_write_item *it = &items[i];
        uint64_t end;
        if (!add_u64(off, it->nbytes, &end)) {
            rc = st_fail(err, ST_ERR_OVERFLOW, -1, "total size overflows");
            goto error;
        }
        plan->offsets[i] = off;
        if ((k && !buf_putc(&b, ',')) || !json_put_string(&b, it->name, it->name_len) ||
            !buf_puts(&b, ":{\"dtype\":\"") || !buf_puts(&b, DTYPES[it->dtype].name) ||
            !buf_puts(&b, "\",\"shape\":["))
            goto nomem;
        for (size_t d = 0; d < it->ndim; d++)
            if ((d && !buf_putc(&b, ',')) || !buf_put_u64(&b, it->shape[d]))
                goto nomem;
        if (!buf_puts(&b, "],\"data_offsets\":[") || !buf_put_u64(&b, off) ||
            !buf_putc(&b, ',') || !buf_put_u64(&b, end) || !buf_puts(&b, "]}"))
            goto nomem;
        off = end;
    }
    if (!buf_putc(&b, '}'))
        goto nomem;
    while (b.len % 8)
        if (!buf_putc(&b, ' '))
            goto nomem;
    {
        uint64_t hlen = b.len - ST_PREFIX_LEN;
        if (hlen > ST_MAX_HEADER_LEN) {
            rc = st_fail(err, ST_ERR_HEADER_TOO_LARGE, -1,
                         "the header would be %llu bytes, over the limit of %llu",
                         (unsigned long long)hlen, (unsigned long long)ST_MAX_HEADER_LEN);
            goto error;
        }
        for (int i = 0; i < 8; i++)
            b.p[i] = (char)((hlen >> (8 * i)) & 0xFF);
    }
    plan->header = (uint8_t *)b.p;
    plan->header_len = b.len;
    plan->data_len = off;
    free(tmp);
    free(midx);
    return ST_OK;

nomem:
    rc = st_fail(err, ST_ERR_NOMEM, -1, "out of memory");
error:
    free(tmp);
    free(midx);
    free(b.p);
    b.p = NULL;
    st_plan_free(plan);
    return rc;
}
