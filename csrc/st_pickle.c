/* st_pickle.c: the legacy checkpoint engine: torch's zip directory and the subset of
 * pickle that weights_only accepts for state dicts, interpreted into a plan of nodes. */
#include "st_pickle.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- dtypes ---- */

static const struct {
    const char *name;
    unsigned size;
} dtypes[SP_DTYPE_COUNT] = {
    [SP_F64] = {"float64", 8}, [SP_F32] = {"float32", 4}, [SP_F16] = {"float16", 2},
    [SP_BF16] = {"bfloat16", 2}, [SP_I64] = {"int64", 8}, [SP_I32] = {"int32", 4},
    [SP_I16] = {"int16", 2}, [SP_I8] = {"int8", 1}, [SP_U8] = {"uint8", 1},
    [SP_BOOL] = {"bool", 1}, [SP_C128] = {"complex128", 16}, [SP_C64] = {"complex64", 8},
    [SP_C32] = {"complex32", 4}, [SP_U16] = {"uint16", 2}, [SP_U32] = {"uint32", 4},
    [SP_U64] = {"uint64", 8}, [SP_F8E4M3FN] = {"float8_e4m3fn", 1},
    [SP_F8E5M2] = {"float8_e5m2", 1}, [SP_F8E4M3FNUZ] = {"float8_e4m3fnuz", 1},
    [SP_F8E5M2FNUZ] = {"float8_e5m2fnuz", 1}, [SP_F8E8M0FNU] = {"float8_e8m0fnu", 1},
    [SP_F4X2] = {"float4_e2m1fn_x2", 1},
};

const char *sp_dtype_name(int dtype)
{
    return dtype >= 0 && dtype < SP_DTYPE_COUNT ? dtypes[dtype].name : "?";
}

unsigned sp_dtype_size(int dtype)
{
    return dtype >= 0 && dtype < SP_DTYPE_COUNT ? dtypes[dtype].size : 0;
}

/* the legacy typed storages torch's weights_only table names ("torch.FloatStorage") */
static const struct {
    const char *name;
    int dtype;
} storage_types[] = {
    {"DoubleStorage", SP_F64}, {"FloatStorage", SP_F32}, {"HalfStorage", SP_F16},
    {"BFloat16Storage", SP_BF16}, {"LongStorage", SP_I64}, {"IntStorage", SP_I32},
    {"ShortStorage", SP_I16}, {"CharStorage", SP_I8}, {"ByteStorage", SP_U8},
    {"BoolStorage", SP_BOOL}, {"ComplexDoubleStorage", SP_C128},
    {"ComplexFloatStorage", SP_C64},
};

/* requires_grad=True is accepted by torch only for these; others go to torch */
static int grad_dtype(int d)
{
    return d == SP_F64 || d == SP_F32 || d == SP_F16 || d == SP_BF16 || d == SP_C128 ||
           d == SP_C64 || d == SP_C32 || d == SP_F8E4M3FN || d == SP_F8E5M2 ||
           d == SP_F8E4M3FNUZ || d == SP_F8E5M2FNUZ || d == SP_F8E8M0FNU || d == SP_F4X2;
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
    if (a && b > UINT64_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

/* ---- errors ---- */

static sp_code fail(sp_error *err, sp_code code, uint64_t pos, const char *fmt, ...)
{
    va_list ap;
    err->code = code;
    err->position = pos;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    return code;
}

/* ---- little-endian reads from checked spans ---- */

static uint16_t le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

/* ---- UTF-8: Python's "utf-8" codec, with or without surrogatepass ---- */

static int utf8_ok(const uint8_t *s, size_t n, int surrogates)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xC2 && c <= 0xDF) {
            k = 1;
            cp = c & 0x1Fu;
        } else if (c >= 0xE0 && c <= 0xEF) {
            k = 2;
            cp = c & 0x0Fu;
        } else if (c >= 0xF0 && c <= 0xF4) {
            k = 3;
            cp = c & 0x07u;
        } else {
            return 0;
        }
        if (k > n - i - 1)
            return 0;
        for (size_t j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3Fu);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        if (!surrogates && cp >= 0xD800 && cp <= 0xDFFF)
            return 0;
        i += k + 1;
    }
    return 1;
}

int sp_utf8_ok(const uint8_t *s, size_t n, int surrogates)
{
    return utf8_ok(s, n, surrogates);
}

/* whether every code point of valid UTF-8 is below 256 (it encodes as latin1) */
static int latin1_ok(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (s[i] >= 0x80) {
            if (s[i] != 0xC2 && s[i] != 0xC3)
                return 0;
            i++; /* the continuation byte: utf8_ok checked it */
        }
    }
    return 1;
}

/* ---- the plan's arrays ---- */

static int grow(void **p, uint32_t *cap, uint32_t need, size_t item)
{
    uint32_t c = *cap ? *cap : 64;
    void *q;
    if (need <= *cap)
        return 1;
    while (c < need) {
        if (c > UINT32_MAX / 2)
            return 0;
        c *= 2;
    }
    q = realloc(*p, (size_t)c * item);
    if (!q)
        return 0;
    *p = q;
    *cap = c;
    return 1;
}

void sp_plan_free(sp_plan *plan)
{
    free(plan->nodes);
    free(plan->edges);
    free(plan->ints);
    memset(plan, 0, sizeof(*plan));
}

/* ---- the machine ---- */

enum { G_ODICT, G_V2, G_V3, G_PARAM, G_PARAM_STATE, G_SIZE, G_DEVICE, G_ENCODE };

typedef struct {
    const uint8_t *data;
    size_t len, pos;       /* the cursor: the one door to input bytes */
    sp_plan *plan;
    sp_error *err;
    uint32_t *stack;
    size_t sp, stack_cap;
    size_t *marks;
    size_t n_marks, marks_cap;
    uint32_t *memo;
    size_t memo_cap;
    uint64_t op_pos;       /* where the current opcode began */
    unsigned flags;        /* SP_RUN_* */
    uint32_t *keys;        /* open-addressed: STORAGE nodes by key, as torch caches them */
    size_t keys_cap, n_keys;
    uint32_t consts[3];    /* shared nodes of None, False, True (immutable) */
    uint32_t empty_tuple;  /* shared node of () (immutable; a singleton in Python too) */
    uint32_t small[256];   /* shared nodes of the ints 0..255 (immutable) */
} machine;

#define UNSUP(...) fail(m->err, SP_UNSUPPORTED, m->op_pos, __VA_ARGS__)

static sp_code take(machine *m, size_t n, const uint8_t **out)
{
    if (n > m->len - m->pos)
        return fail(m->err, SP_TRUNCATED, m->op_pos, "truncated pickle: %zu bytes needed at byte %zu",
                    n, m->pos);
    *out = m->data + m->pos;
    m->pos += n;
    return SP_OK;
}

static sp_code new_node(machine *m, uint8_t kind, uint32_t *id)
{
    sp_plan *p = m->plan;
    if (p->n_nodes == UINT32_MAX || !grow((void **)&p->nodes, &p->cap_nodes, p->n_nodes + 1,
                                          sizeof(sp_node)))
        return fail(m->err, SP_NOMEM, m->op_pos, "out of memory");
    *id = p->n_nodes++;
    memset(&p->nodes[*id], 0, sizeof(sp_node));
    p->nodes[*id].kind = kind;
    return SP_OK;
}

static sp_code add_child(machine *m, uint32_t parent, uint32_t child)
{
    sp_plan *p = m->plan;
    uint32_t e;
    sp_node *n;
    if (p->n_edges == UINT32_MAX ||
        !grow((void **)&p->edges, &p->cap_edges, p->n_edges + 1, sizeof(sp_edge)))
        return fail(m->err, SP_NOMEM, m->op_pos, "out of memory");
    if (p->n_edges == 0)
        p->n_edges = 1; /* edge 0 means "none" */
    if (!grow((void **)&p->edges, &p->cap_edges, p->n_edges + 1, sizeof(sp_edge)))
        return fail(m->err, SP_NOMEM, m->op_pos, "out of memory");
    e = p->n_edges++;
    p->edges[e].child = child;
    p->edges[e].next = 0;
    n = &p->nodes[parent];
    if (n->last)
        p->edges[n->last].next = e;
    else
        n->first = e;
    n->last = e;
    if (n->n == UINT32_MAX)
        return UNSUP("too many items");
    n->n++;
    return SP_OK;
}

static sp_code push(machine *m, uint32_t id)
{
    /* every push consumes at least one input byte, so the stack stays below len + 1 */
    if (m->sp == m->stack_cap) {
        size_t c = m->stack_cap ? m->stack_cap * 2 : 256;
        uint32_t *s = realloc(m->stack, c * sizeof(uint32_t));
        if (!s)
            return fail(m->err, SP_NOMEM, m->op_pos, "out of memory");
        m->stack = s;
        m->stack_cap = c;
    }
    m->stack[m->sp++] = id;
    return SP_OK;
}

static size_t base(const machine *m)
{
    return m->n_marks ? m->marks[m->n_marks - 1] : 0;
}

static sp_code pop(machine *m, uint32_t *id)
{
    if (m->sp <= base(m))
        return UNSUP("pop from an empty stack");
    *id = m->stack[--m->sp];
    return SP_OK;
}

static sp_code top(machine *m, uint32_t *id)
{
    if (m->sp <= base(m))
        return UNSUP("empty stack");
    *id = m->stack[m->sp - 1];
    return SP_OK;
}

static sp_node *node(machine *m, uint32_t id)
{
    return &m->plan->nodes[id];
}

/* the i-th child of a tuple/list node */
static uint32_t child(const sp_plan *p, uint32_t id, uint32_t i)
{
    uint32_t e = p->nodes[id].first;
    while (i-- && e)
        e = p->edges[e].next;
    return e ? p->edges[e].child : 0;
}

static sp_code leaf(machine *m, uint8_t kind, uint32_t *id)
{
    sp_code rc = new_node(m, kind, id);
    return rc ? rc : push(m, *id);
}

static sp_code string_node(machine *m, uint8_t kind, size_t n)
{
    const uint8_t *s = NULL;
    uint32_t id;
    sp_code rc = take(m, n, &s);
    if (rc)
        return rc;
    if (!utf8_ok(s, n, kind == SP_K_STR))
        return UNSUP("a string that is not UTF-8");
    if ((rc = leaf(m, kind, &id)))
        return rc;
    node(m, id)->off = (uint64_t)(s - m->data);
    node(m, id)->len = (uint32_t)n;
    return SP_OK;
}

static int str_is(const machine *m, uint32_t id, const char *lit)
{
    const sp_node *n = &m->plan->nodes[id];
    size_t l = strlen(lit);
    return (n->kind == SP_K_STR || n->kind == SP_K_BSTR) && n->len == l &&
           memcmp(m->data + n->off, lit, l) == 0;
}

/* GLOBAL "module\nname\n": matched against a fixed table, never imported */
static sp_code op_global(machine *m)
{
    const uint8_t *line[2];
    size_t l[2];
    uint32_t id;
    sp_code rc;
    for (int k = 0; k < 2; k++) {
        const uint8_t *nl = memchr(m->data + m->pos, '\n', m->len - m->pos);
        if (!nl)
            return fail(m->err, SP_TRUNCATED, m->op_pos, "truncated GLOBAL");
        line[k] = m->data + m->pos;
        l[k] = (size_t)(nl - line[k]);
        m->pos += l[k] + 1;
    }
#define IS(k, lit) (l[k] == sizeof(lit) - 1 && memcmp(line[k], lit, sizeof(lit) - 1) == 0)
    if (IS(0, "torch")) {
        for (size_t i = 0; i < sizeof(storage_types) / sizeof(storage_types[0]); i++) {
            if (l[1] == strlen(storage_types[i].name) &&
                memcmp(line[1], storage_types[i].name, l[1]) == 0) {
                if ((rc = leaf(m, SP_K_STYPE, &id)))
                    return rc;
                node(m, id)->dtype = (uint8_t)storage_types[i].dtype;
                return SP_OK;
            }
        }
        for (int d = 0; d < SP_DTYPE_COUNT; d++) {
            if (l[1] == strlen(dtypes[d].name) && memcmp(line[1], dtypes[d].name, l[1]) == 0) {
                if ((rc = leaf(m, SP_K_DTYPE, &id)))
                    return rc;
                node(m, id)->dtype = (uint8_t)d;
                return SP_OK;
            }
        }
        if (IS(1, "Size") || IS(1, "device")) {
            if ((rc = leaf(m, SP_K_GLOBAL, &id)))
                return rc;
            node(m, id)->dtype = IS(1, "Size") ? G_SIZE : G_DEVICE;
            return SP_OK;
        }
    } else if (IS(0, "torch.storage") && IS(1, "UntypedStorage")) {
        if ((rc = leaf(m, SP_K_STYPE, &id)))
            return rc;
        node(m, id)->dtype = SP_U8;
        node(m, id)->flags = SP_F_UNTYPED;
        return SP_OK;
    } else {
        int g = -1;
        if (IS(0, "collections") && IS(1, "OrderedDict"))
            g = G_ODICT;
        else if (IS(0, "torch._utils") && IS(1, "_rebuild_tensor_v2"))
            g = G_V2;
        else if (IS(0, "torch._utils") && IS(1, "_rebuild_tensor_v3"))
            g = G_V3;
        else if (IS(0, "torch._utils") && IS(1, "_rebuild_parameter"))
            g = G_PARAM;
        else if (IS(0, "torch._utils") && IS(1, "_rebuild_parameter_with_state"))
            g = G_PARAM_STATE;
        else if (IS(0, "_codecs") && IS(1, "encode"))
            g = G_ENCODE;
        if (g >= 0) {
            if ((rc = leaf(m, SP_K_GLOBAL, &id)))
                return rc;
            node(m, id)->dtype = (uint8_t)g;
            return SP_OK;
        }
    }
#undef IS
    return UNSUP("global %.*s.%.*s is outside the reader's subset", (int)(l[0] > 60 ? 60 : l[0]),
                 (const char *)line[0], (int)(l[1] > 60 ? 60 : l[1]), (const char *)line[1]);
}

/* an empty OrderedDict passed as backward_hooks; frozen so nothing fills it later */
static int empty_hooks(machine *m, uint32_t id)
{
    sp_node *n = node(m, id);
    if (n->kind != SP_K_ODICT || n->n != 0 || n->a)
        return 0;
    n->flags |= SP_F_FROZEN;
    return 1;
}

/* sizes/strides: a tuple of non-negative ints, copied (tuples cannot change later) */
static sp_code dims_of(machine *m, uint32_t tup, int64_t *out, uint32_t *ndim)
{
    sp_node *t = node(m, tup);
    uint32_t e;
    uint32_t i = 0;
    if (t->kind != SP_K_TUPLE || t->n > SP_MAX_NDIM)
        return UNSUP("tensor sizes or strides that are not a tuple of ints");
    for (e = t->first; e; e = m->plan->edges[e].next) {
        sp_node *c = node(m, m->plan->edges[e].child);
        if (c->kind != SP_K_INT || c->v.i < 0)
            return UNSUP("tensor sizes or strides that are not a tuple of ints");
        out[i++] = c->v.i;
    }
    *ndim = i;
    return SP_OK;
}

static sp_code rebuild_tensor(machine *m, int which, uint32_t args, uint32_t *out)
{
    sp_plan *p = m->plan;
    uint32_t na = node(m, args)->n, st, id, nd_size, nd_stride;
    int64_t sizes[SP_MAX_NDIM], strides[SP_MAX_NDIM];
    uint64_t extent = 0, need, have;
    int dtype;
    sp_code rc;
    sp_node *s, *t;
    uint32_t want = which == G_V3 ? 7 : 6;
    if (na != want)
        return UNSUP("a tensor rebuilt with %u arguments", na);
    st = child(p, args, 0);
    s = node(m, st);
    if (s->kind != SP_K_STORAGE || node(m, child(p, args, 1))->kind != SP_K_INT ||
        node(m, child(p, args, 4))->kind != SP_K_BOOL || !empty_hooks(m, child(p, args, 5)))
        return UNSUP("tensor rebuild arguments outside the subset");
    if ((rc = dims_of(m, child(p, args, 2), sizes, &nd_size)) ||
        (rc = dims_of(m, child(p, args, 3), strides, &nd_stride)))
        return rc;
    if (nd_size != nd_stride)
        return UNSUP("sizes and strides of different lengths");
    if (which == G_V3) {
        sp_node *d = node(m, child(p, args, 6));
        if (d->kind != SP_K_DTYPE || !(s->flags & SP_F_UNTYPED))
            return UNSUP("rebuild_tensor_v3 without an untyped storage and a dtype");
        dtype = d->dtype;
        if (s->v.i % (int64_t)sp_dtype_size(dtype))
            return UNSUP("an untyped storage that is not whole elements");
        /* torch.empty(requires_grad=True) then set_: torch refuses every such tensor */
        if (node(m, child(p, args, 4))->flags & SP_F_TRUE)
            return UNSUP("rebuild_tensor_v3 with requires_grad");
    } else {
        dtype = s->dtype; /* uint8 for an untyped storage, as torch types it */
    }
    /* the tensor must lie inside its storage: torch would resize or refuse otherwise */
    for (uint32_t d = 0; d < nd_size; d++) {
        uint64_t span;
        if (sizes[d] == 0) {
            extent = 0;
            break;
        }
        if (!mul_u64((uint64_t)strides[d], (uint64_t)sizes[d] - 1, &span) ||
            !add_u64(extent, span, &extent))
            return UNSUP("tensor strides overflow");
    }
    {
        int empty = 0;
        int64_t off = node(m, child(p, args, 1))->v.i;
        for (uint32_t d = 0; d < nd_size; d++)
            empty |= sizes[d] == 0;
        if (!mul_u64((uint64_t)s->v.i, s->flags & SP_F_UNTYPED ? 1u : sp_dtype_size(dtype), &have))
            have = UINT64_MAX; /* the record check refuses such a claim later */
        if (off < 0)
            return UNSUP("a negative storage offset");
        if (!empty && (!add_u64(extent, (uint64_t)off + 1, &need) ||
                       !mul_u64(need, sp_dtype_size(dtype), &need) || need > have))
            return UNSUP("a tensor that reaches past its storage");
    }
    if (node(m, child(p, args, 4))->flags & SP_F_TRUE && !grad_dtype(dtype))
        return UNSUP("requires_grad on a dtype that cannot require grad");
    if ((rc = new_node(m, SP_K_TENSOR, &id)))
        return rc;
    if (!grow((void **)&p->ints, &p->cap_ints, p->n_ints + 2 * nd_size + 1, sizeof(int64_t)))
        return fail(m->err, SP_NOMEM, m->op_pos, "out of memory");
    t = node(m, id);
    t->dims = p->n_ints;
    memcpy(p->ints + p->n_ints, sizes, nd_size * sizeof(int64_t));
    memcpy(p->ints + p->n_ints + nd_size, strides, nd_size * sizeof(int64_t));
    p->n_ints += 2 * nd_size;
    t->ndim = (uint8_t)nd_size;
    t->dtype = (uint8_t)dtype;
    t->a = st;
    t->b = child(p, args, 5);
    t->v.i = node(m, child(p, args, 1))->v.i;
    if (node(m, child(p, args, 4))->flags & SP_F_TRUE)
        t->flags |= SP_F_REQUIRES_GRAD;
    p->n_tensors++;
    *out = id;
    return SP_OK;
}

static sp_code op_reduce(machine *m)
{
    sp_plan *p = m->plan;
    uint32_t args, fn, id = 0;
    sp_node *a;
    sp_code rc;
    if ((rc = pop(m, &args)) || (rc = top(m, &fn)))
        return rc;
    a = node(m, args);
    if (node(m, fn)->kind != SP_K_GLOBAL || a->kind != SP_K_TUPLE)
        return UNSUP("REDUCE outside the subset");
    switch (node(m, fn)->dtype) {
    case G_ODICT:
        if (a->n != 0)
            return UNSUP("OrderedDict built from arguments");
        rc = new_node(m, SP_K_ODICT, &id);
        break;
    case G_V2:
    case G_V3:
        rc = rebuild_tensor(m, node(m, fn)->dtype, args, &id);
        break;
    case G_PARAM:
    case G_PARAM_STATE: {
        uint32_t data = child(p, args, 0), grad = child(p, args, 1), hooks = child(p, args, 2);
        uint32_t want = node(m, fn)->dtype == G_PARAM ? 3 : 4;
        if (a->n != want || node(m, data)->kind != SP_K_TENSOR ||
            node(m, grad)->kind != SP_K_BOOL || !empty_hooks(m, hooks))
            return UNSUP("Parameter rebuild arguments outside the subset");
        if (want == 4) {
            sp_node *state = node(m, child(p, args, 3));
            if (state->kind != SP_K_NONE && !(state->kind == SP_K_DICT && state->n == 0))
                return UNSUP("a Parameter with extra state");
            state->flags |= SP_F_FROZEN;
        }
        if (node(m, grad)->flags & SP_F_TRUE && !grad_dtype(node(m, data)->dtype))
            return UNSUP("requires_grad on a dtype that cannot require grad");
        if ((rc = new_node(m, SP_K_PARAM, &id)))
            return rc;
        node(m, id)->a = data;
        node(m, id)->b = hooks;
        node(m, id)->dtype = node(m, data)->dtype;
        if (node(m, grad)->flags & SP_F_TRUE)
            node(m, id)->flags |= SP_F_REQUIRES_GRAD;
        break;
    }
    case G_SIZE: {
        uint32_t tup = child(p, args, 0), e;
        if (a->n != 1 || node(m, tup)->kind != SP_K_TUPLE)
            return UNSUP("torch.Size outside the subset");
        for (e = node(m, tup)->first; e; e = p->edges[e].next)
            if (node(m, p->edges[e].child)->kind != SP_K_INT)
                return UNSUP("torch.Size of values that are not ints");
        if ((rc = new_node(m, SP_K_SIZE, &id)))
            return rc;
        node(m, id)->a = tup;
        node(m, id)->n = node(m, tup)->n;
        break;
    }
    case G_DEVICE: {
        uint32_t type = child(p, args, 0), idx = child(p, args, 1);
        static const char *const names[] = {"cpu", "cuda", "meta", "mps", "xpu"};
        int known = 0;
        if (a->n < 1 || a->n > 2 || node(m, type)->kind != SP_K_STR)
            return UNSUP("torch.device outside the subset");
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
            known |= str_is(m, type, names[i]);
        if (!known || (a->n == 2 && (node(m, idx)->kind != SP_K_INT || node(m, idx)->v.i < 0 ||
                                     node(m, idx)->v.i > 1000)))
            return UNSUP("torch.device outside the subset");
        if ((rc = new_node(m, SP_K_DEVICE, &id)))
            return rc;
        /* new_node may have moved the nodes: no pointer taken before it is used */
        node(m, id)->a = type;
        node(m, id)->b = node(m, args)->n == 2;
        node(m, id)->v.i = node(m, args)->n == 2 ? node(m, idx)->v.i : -1;
        break;
    }
    case G_ENCODE: {
        uint32_t s = child(p, args, 0);
        if (a->n != 2 || node(m, s)->kind != SP_K_STR || !str_is(m, child(p, args, 1), "latin1") ||
            node(m, child(p, args, 1))->kind != SP_K_STR ||
            !latin1_ok(m->data + node(m, s)->off, node(m, s)->len))
            return UNSUP("_codecs.encode outside the subset");
        if ((rc = new_node(m, SP_K_BYTES, &id)))
            return rc;
        node(m, id)->a = s;
        break;
    }
    default:
        return UNSUP("REDUCE outside the subset");
    }
    if (rc)
        return rc;
    m->stack[m->sp - 1] = id;
    return SP_OK;
}

/* FNV-1a over a STR node's bytes */
static uint64_t key_hash(const machine *m, const sp_node *k)
{
    uint64_t h = 1469598103934665603ull;
    for (uint32_t i = 0; i < k->len; i++)
        h = (h ^ m->data[k->off + i]) * 1099511628211ull;
    return h;
}

/* The slot of key (a STR node) in m->keys: its STORAGE node, or 0 where it would go. */
static sp_code find_key(machine *m, uint32_t key, size_t *slot)
{
    const sp_node *k = node(m, key);
    size_t i;
    if (m->n_keys + 1 > m->keys_cap / 2) {
        size_t c = m->keys_cap ? m->keys_cap * 2 : 64;
        uint32_t *t = calloc(c, sizeof(uint32_t));
        if (!t)
            return fail(m->err, SP_NOMEM, m->op_pos, "out of memory");
        for (size_t j = 0; j < m->keys_cap; j++) {
            uint32_t id = m->keys[j];
            if (!id)
                continue;
            i = (size_t)key_hash(m, node(m, node(m, id)->a)) & (c - 1);
            while (t[i])
                i = (i + 1) & (c - 1);
            t[i] = id;
        }
        free(m->keys);
        m->keys = t;
        m->keys_cap = c;
    }
    i = (size_t)key_hash(m, k) & (m->keys_cap - 1);
    while (m->keys[i]) {
        const sp_node *o = node(m, node(m, m->keys[i])->a);
        if (o->len == k->len && memcmp(m->data + o->off, m->data + k->off, k->len) == 0)
            break;
        i = (i + 1) & (m->keys_cap - 1);
    }
    *slot = i;
    return SP_OK;
}

static sp_code op_binpersid(machine *m)
{
    sp_plan *p = m->plan;
    uint32_t pid, id, stype, key, loc, numel;
    size_t slot = 0;
    sp_code rc;
    if ((rc = pop(m, &pid)))
        return rc;
    /* zip: ('storage', type, key, location, numel); pre-1.6 adds a view, None here */
    if (node(m, pid)->kind != SP_K_TUPLE ||
        node(m, pid)->n != ((m->flags & SP_RUN_LEGACY_IDS) ? 6u : 5u) ||
        !str_is(m, child(p, pid, 0), "storage"))
        return UNSUP("a persistent id outside the subset");
    if ((m->flags & SP_RUN_LEGACY_IDS) &&
        (node(m, child(p, pid, 5))->kind != SP_K_NONE || (node(m, child(p, pid, 1))->flags & SP_F_UNTYPED)))
        return UNSUP("a pre-1.6 storage view or untyped storage");
    stype = child(p, pid, 1);
    key = child(p, pid, 2);
    loc = child(p, pid, 3);
    numel = child(p, pid, 4);
    if (node(m, stype)->kind != SP_K_STYPE || node(m, key)->kind != SP_K_STR ||
        node(m, loc)->kind != SP_K_STR || node(m, numel)->kind != SP_K_INT ||
        node(m, numel)->v.i < 0)
        return UNSUP("a storage id outside the subset");
    /* torch keeps the first storage of each key (its dtype and size) and hands it out
     * for every later reference, whatever that one claims */
    if ((rc = find_key(m, key, &slot)))
        return rc;
    if (m->keys[slot]) {
        id = m->keys[slot];
        /* an empty storage is not kept (its data pointer is null) unless it is mapped */
        if (node(m, id)->v.i == 0)
            return UNSUP("an empty storage referenced again");
        return push(m, id);
    }
    if ((rc = leaf(m, SP_K_STORAGE, &id)))
        return rc;
    m->keys[slot] = id;
    m->n_keys++;
    node(m, id)->dtype = node(m, stype)->dtype;
    node(m, id)->flags = node(m, stype)->flags & SP_F_UNTYPED;
    node(m, id)->a = key;
    node(m, id)->b = loc;
    node(m, id)->v.i = node(m, numel)->v.i;
    p->n_storages++;
    return SP_OK;
}

/* whether a node can be a dict key the way Python hashes it (no tuples: torch decides) */
static int hashable(const machine *m, uint32_t id)
{
    switch (m->plan->nodes[id].kind) {
    case SP_K_NONE: case SP_K_BOOL: case SP_K_INT: case SP_K_LONG: case SP_K_FLOAT:
    case SP_K_STR: case SP_K_BSTR: case SP_K_BYTES: case SP_K_DTYPE: case SP_K_DEVICE:
        return 1;
    default:
        return 0;
    }
}

static sp_code set_items(machine *m, uint32_t target, size_t from, size_t to)
{
    sp_node *t = node(m, target);
    sp_code rc;
    if ((t->kind != SP_K_DICT && t->kind != SP_K_ODICT) || (t->flags & SP_F_FROZEN))
        return UNSUP("SETITEM on something that is not a dict");
    if ((to - from) % 2)
        return UNSUP("SETITEMS with an odd number of items");
    for (size_t i = from; i < to; i += 2) {
        if (!hashable(m, m->stack[i]))
            return UNSUP("a dict key outside the subset");
        if ((rc = add_child(m, target, m->stack[i])) ||
            (rc = add_child(m, target, m->stack[i + 1])))
            return rc;
    }
    return SP_OK;
}

static sp_code op_tuple(machine *m, size_t from)
{
    uint32_t id;
    sp_code rc = new_node(m, SP_K_TUPLE, &id);
    if (rc)
        return rc;
    for (size_t i = from; i < m->sp; i++)
        if ((rc = add_child(m, id, m->stack[i])))
            return rc;
    m->sp = from;
    return push(m, id);
}

static sp_code pop_mark(machine *m, size_t *from)
{
    if (!m->n_marks)
        return UNSUP("no MARK to pop");
    *from = m->marks[--m->n_marks];
    return SP_OK;
}

/* pops a mark and names the object just below it (APPENDS, SETITEMS) */
static sp_code pop_mark_target(machine *m, size_t *from, uint32_t *target)
{
    sp_code rc = pop_mark(m, from);
    if (rc)
        return rc;
    if (*from <= base(m))
        return UNSUP("nothing below the MARK");
    *target = m->stack[*from - 1];
    return SP_OK;
}

static sp_code step(machine *m, uint8_t op)
{
    const uint8_t *b = NULL;
    uint32_t id, t = 0;
    size_t from = 0;
    sp_code rc;
    switch (op) {
    case 0x80: /* PROTO */
        if ((rc = take(m, 1, &b)))
            return rc;
        return b[0] == 2 ? SP_OK : UNSUP("pickle protocol %u", b[0]);
    case '}':
        return leaf(m, SP_K_DICT, &id);
    case ']':
        return leaf(m, SP_K_LIST, &id);
    case ')':
        if (!m->empty_tuple && (rc = new_node(m, SP_K_TUPLE, &m->empty_tuple)))
            return rc;
        return push(m, m->empty_tuple);
    case 'N':
    case 0x88: /* NEWTRUE */
    case 0x89: /* NEWFALSE */ {
        /* immutable: one node each, so a pickle of NONEs costs a stack slot per byte */
        int k = op == 'N' ? 0 : op == 0x89 ? 1 : 2;
        if (!m->consts[k]) {
            if ((rc = new_node(m, k ? SP_K_BOOL : SP_K_NONE, &id)))
                return rc;
            node(m, id)->flags = k == 2 ? SP_F_TRUE : 0;
            m->consts[k] = id;
        }
        return push(m, m->consts[k]);
    }
    case 'J': /* BININT */
    case 'K': /* BININT1 */
    case 'M': /* BININT2 */ {
        size_t n = op == 'J' ? 4 : op == 'K' ? 1 : 2;
        int64_t v;
        if ((rc = take(m, n, &b)))
            return rc;
        v = op == 'J' ? (int64_t)(int32_t)le32(b) : op == 'K' ? b[0] : le16(b);
        if (v >= 0 && v < 256 && m->small[v]) /* a shared node: a stack slot per opcode */
            return push(m, m->small[v]);
        if ((rc = leaf(m, SP_K_INT, &id)))
            return rc;
        node(m, id)->v.i = v;
        if (v >= 0 && v < 256)
            m->small[v] = id;
        return SP_OK;
    }
    case 0x8a: /* LONG1 */ {
        size_t n;
        if ((rc = take(m, 1, &b)))
            return rc;
        n = b[0];
        if ((rc = take(m, n, &b)))
            return rc;
        if (n <= 8) {
            /* fits an int64: sign-extend the little-endian two's complement bytes */
            uint64_t u = 0;
            for (size_t i = 0; i < n; i++)
                u |= (uint64_t)b[i] << (8 * i);
            if (n && n < 8 && (b[n - 1] & 0x80))
                u |= UINT64_MAX << (8 * n);
            if ((rc = leaf(m, SP_K_INT, &id)))
                return rc;
            memcpy(&node(m, id)->v.i, &u, sizeof(u));
            return SP_OK;
        }
        if ((rc = leaf(m, SP_K_LONG, &id)))
            return rc;
        node(m, id)->off = (uint64_t)(b - m->data);
        node(m, id)->len = (uint32_t)n;
        return SP_OK;
    }
    case 'G': /* BINFLOAT, big-endian */ {
        uint64_t u = 0;
        if ((rc = take(m, 8, &b)) || (rc = leaf(m, SP_K_FLOAT, &id)))
            return rc;
        for (int i = 0; i < 8; i++)
            u = (u << 8) | b[i];
        memcpy(&node(m, id)->v.f, &u, sizeof(u));
        return SP_OK;
    }
    case 'X': /* BINUNICODE */
        if ((rc = take(m, 4, &b)))
            return rc;
        return string_node(m, SP_K_STR, le32(b));
    case 'U': /* SHORT_BINSTRING, decoded as UTF-8 like torch's default encoding */
        if ((rc = take(m, 1, &b)))
            return rc;
        return string_node(m, SP_K_BSTR, b[0]);
    case 'c':
        return op_global(m);
    case '(':
        if (m->n_marks == m->marks_cap) {
            size_t c = m->marks_cap ? m->marks_cap * 2 : 64;
            size_t *s = realloc(m->marks, c * sizeof(size_t));
            if (!s)
                return fail(m->err, SP_NOMEM, m->op_pos, "out of memory");
            m->marks = s;
            m->marks_cap = c;
        }
        m->marks[m->n_marks++] = m->sp;
        return SP_OK;
    case 't':
        if ((rc = pop_mark(m, &from)))
            return rc;
        return op_tuple(m, from);
    case 0x85: /* TUPLE1..3 */
    case 0x86:
    case 0x87: {
        size_t k = (size_t)(op - 0x84);
        if (m->sp - base(m) < k)
            return UNSUP("TUPLE%zu on a short stack", k);
        return op_tuple(m, m->sp - k);
    }
    case 'a': /* APPEND */
        if ((rc = pop(m, &id)) || (rc = top(m, &t)))
            return rc;
        if (node(m, t)->kind != SP_K_LIST)
            return UNSUP("APPEND to something that is not a list");
        return add_child(m, t, id);
    case 'e': /* APPENDS */
        if ((rc = pop_mark_target(m, &from, &t)))
            return rc;
        if (node(m, t)->kind != SP_K_LIST)
            return UNSUP("APPENDS to something that is not a list");
        for (size_t i = from; i < m->sp; i++)
            if ((rc = add_child(m, t, m->stack[i])))
                return rc;
        m->sp = from;
        return SP_OK;
    case 's': /* SETITEM */
        if (m->sp - base(m) < 3)
            return UNSUP("SETITEM on a short stack");
        if ((rc = set_items(m, m->stack[m->sp - 3], m->sp - 2, m->sp)))
            return rc;
        m->sp -= 2;
        return SP_OK;
    case 'u': /* SETITEMS */
        if ((rc = pop_mark_target(m, &from, &t)))
            return rc;
        if ((rc = set_items(m, t, from, m->sp)))
            return rc;
        m->sp = from;
        return SP_OK;
    case 'b': /* BUILD: only OrderedDict's attributes (its _metadata) */ {
        uint32_t state;
        sp_node *s;
        uint32_t e;
        if ((rc = pop(m, &state)) || (rc = top(m, &t)))
            return rc;
        s = node(m, state);
        if (node(m, t)->kind != SP_K_ODICT || node(m, t)->a || s->kind != SP_K_DICT)
            return UNSUP("BUILD outside the subset");
        /* attribute names must be strings: setattr refuses anything else */
        for (e = s->first; e; e = m->plan->edges[m->plan->edges[e].next].next) {
            if (node(m, m->plan->edges[e].child)->kind != SP_K_STR)
                return UNSUP("BUILD with attribute names that are not strings");
        }
        s->flags |= SP_F_FROZEN;
        node(m, t)->a = state;
        return SP_OK;
    }
    case 'R':
        return op_reduce(m);
    case 'Q':
        return op_binpersid(m);
    case 'q': /* BINPUT */
    case 'r': /* LONG_BINPUT */ {
        uint64_t idx;
        if ((rc = take(m, op == 'q' ? 1 : 4, &b)))
            return rc;
        idx = op == 'q' ? b[0] : le32(b);
        if ((rc = top(m, &id)))
            return rc;
        /* indices beyond the input length are not what a pickler writes: torch decides */
        if (idx >= m->len)
            return UNSUP("memo index %llu out of range", (unsigned long long)idx);
        if (idx >= m->memo_cap) {
            size_t c = m->memo_cap ? m->memo_cap : 256;
            uint32_t *s;
            while (c <= idx)
                c *= 2;
            s = realloc(m->memo, c * sizeof(uint32_t));
            if (!s)
                return fail(m->err, SP_NOMEM, m->op_pos, "out of memory");
            memset(s + m->memo_cap, 0, (c - m->memo_cap) * sizeof(uint32_t));
            m->memo = s;
            m->memo_cap = c;
        }
        m->memo[idx] = id;
        return SP_OK;
    }
    case 'h': /* BINGET */
    case 'j': /* LONG_BINGET */ {
        uint64_t idx;
        if ((rc = take(m, op == 'h' ? 1 : 4, &b)))
            return rc;
        idx = op == 'h' ? b[0] : le32(b);
        if (idx >= m->memo_cap || !m->memo[idx])
            return UNSUP("memo index %llu not set", (unsigned long long)idx);
        return push(m, m->memo[idx]);
    }
    default:
        return UNSUP("opcode 0x%02x outside the subset", op);
    }
}

sp_code sp_pickle_run(const uint8_t *data, size_t len, sp_plan *plan, sp_error *err)
{
    return sp_pickle_run_ex(data, len, 0, plan, err);
}

sp_code sp_pickle_run_ex(const uint8_t *data, size_t len, unsigned flags, sp_plan *plan,
                         sp_error *err)
{
    machine m;
    sp_code rc = SP_OK;
    uint32_t dummy;
    memset(plan, 0, sizeof(*plan));
    memset(&m, 0, sizeof(m));
    err->code = SP_OK;
    err->position = 0;
    err->message[0] = 0;
    m.data = data;
    m.len = len;
    m.plan = plan;
    m.err = err;
    m.flags = flags;
    if (len > SP_MAX_PICKLE)
        return fail(err, SP_UNSUPPORTED, 0, "pickle of %zu bytes is too large", len);
    /* node 0 is the "none" link */
    if ((rc = new_node(&m, SP_K_NONE, &dummy)))
        goto done;
    for (;;) {
        const uint8_t *op = NULL;
        m.op_pos = m.pos;
        if ((rc = take(&m, 1, &op)))
            goto done;
        if (*op == '.') { /* STOP */
            if ((rc = pop(&m, &plan->root)))
                goto done;
            plan->stop = m.pos;
            break;
        }
        if ((rc = step(&m, *op)))
            goto done;
    }
done:
    free(m.stack);
    free(m.marks);
    free(m.memo);
    free(m.keys);
    return rc;
}

/* ---- torch's zip container ---- */

sp_code sp_zip_find_dir(const uint8_t *tail, size_t tail_len, uint64_t file_size,
                        sp_zip_dir *dir, sp_error *err)
{
    uint64_t tail_start = file_size - tail_len;
    size_t i;
    if (tail_len < 22 || tail_len > file_size)
        return fail(err, SP_UNSUPPORTED, 0, "too short for a zip");
    /* the last end-of-central-directory signature, as torch's zip library finds it;
     * its comment must then reach the end exactly, or torch decides */
    for (i = tail_len - 22 + 1; i-- > 0;) {
        const uint8_t *e = tail + i;
        if (le32(e) != 0x06054b50u)
            continue;
        if ((size_t)le16(e + 20) != tail_len - i - 22)
            return fail(err, SP_UNSUPPORTED, tail_start + i, "bytes after the zip's end record");
        {
            /* the fields as torch's zip library (miniz) reads them: from the zip64 record
             * whenever a locator with a valid record precedes the end record */
            uint64_t count = le16(e + 10), on_disk = le16(e + 8), ndisk = le16(e + 4);
            uint64_t cdisk = le16(e + 6), cd_size = le32(e + 12), cd_off = le32(e + 16);
            if (i >= 20 && le32(tail + i - 20) == 0x07064b50u) {
                const uint8_t *loc = tail + i - 20, *rec;
                uint64_t rec_off = le64(loc + 8);
                if (rec_off < tail_start || rec_off - tail_start > i - 20 ||
                    i - 20 - (rec_off - tail_start) < 56)
                    return fail(err, SP_UNSUPPORTED, tail_start + i, "zip64 record not in the tail");
                rec = tail + (rec_off - tail_start);
                if (le32(rec) == 0x06064b50u) {
                    if (le64(rec + 4) < 44 || le32(loc + 16) != 1)
                        return fail(err, SP_UNSUPPORTED, rec_off, "a zip64 record torch refuses");
                    count = le64(rec + 32);
                    on_disk = le64(rec + 24);
                    cd_size = le64(rec + 40);
                    ndisk = le32(rec + 16);
                    cdisk = le32(rec + 20);
                    cd_off = le64(rec + 48);
                    if (count > UINT32_MAX || on_disk > UINT32_MAX || cd_size > UINT32_MAX)
                        return fail(err, SP_UNSUPPORTED, rec_off, "a zip64 record torch refuses");
                }
            }
            if (count != on_disk || ndisk != 0 || cdisk != 0)
                return fail(err, SP_UNSUPPORTED, tail_start + i, "multi-disk zip");
            dir->count = count;
            dir->cd_size = cd_size;
            dir->cd_offset = cd_off;
        }
        if (dir->cd_offset > file_size || dir->cd_size > file_size - dir->cd_offset)
            return fail(err, SP_MALFORMED, tail_start + i, "central directory past the end");
        return SP_OK;
    }
    return fail(err, SP_UNSUPPORTED, tail_start, "no end of central directory");
}

sp_code sp_zip_parse_dir(const uint8_t *cd, size_t len, const sp_zip_dir *dir,
                         uint64_t file_size, sp_zip_entry **entries, sp_error *err)
{
    size_t pos = 0;
    sp_zip_entry *es;
    *entries = NULL;
    /* each entry takes at least 46 bytes: a count the bytes cannot hold fails first */
    if (dir->count > len / 46)
        return fail(err, SP_MALFORMED, 0, "central directory claims %llu entries in %zu bytes",
                    (unsigned long long)dir->count, len);
    es = calloc(dir->count ? (size_t)dir->count : 1, sizeof(*es));
    if (!es)
        return fail(err, SP_NOMEM, 0, "out of memory");
    for (uint64_t k = 0; k < dir->count; k++) {
        const uint8_t *h = cd + pos;
        size_t nlen, xlen, clen, total;
        sp_zip_entry *e = &es[k];
        if (len - pos < 46 || le32(h) != 0x02014b50u)
            goto bad;
        nlen = le16(h + 28);
        xlen = le16(h + 30);
        clen = le16(h + 32);
        total = 46 + nlen + xlen + clen;
        if (total > len - pos)
            goto bad;
        /* encrypted, masked or patch entries, methods other than stored and deflated,
         * entries on another disk, and what the zip library takes for a directory (an
         * MS-DOS directory attribute): torch decides */
        if ((le16(h + 8) & 0x2061u) || (le16(h + 10) != 0 && le16(h + 10) != 8) ||
            le16(h + 34) != 0 || (le32(h + 38) & 0x10u) ||
            (nlen && h[46 + nlen - 1] == '/')) {
            free(es);
            return fail(err, SP_UNSUPPORTED, dir->cd_offset + pos, "an encrypted, multi-disk or directory zip entry");
        }
        e->name = h + 46;
        e->name_len = (uint16_t)nlen;
        if (!utf8_ok(e->name, nlen, 0)) { /* torch lists the names as str */
            free(es);
            return fail(err, SP_UNSUPPORTED, dir->cd_offset + pos, "a record name that is not UTF-8");
        }
        e->method = le16(h + 10);
        e->comp_size = le32(h + 20);
        e->size = le32(h + 24);
        e->local_offset = le32(h + 42);
        if (e->size == 0xFFFFFFFFu || e->comp_size == 0xFFFFFFFFu ||
            e->local_offset == 0xFFFFFFFFu) {
            /* zip64 extended information: the 8-byte fields present, in this order */
            const uint8_t *x = h + 46 + nlen, *xe = x + xlen;
            int found = 0;
            while (xe - x >= 4) {
                uint16_t id = le16(x), sz = le16(x + 2);
                const uint8_t *f = x + 4;
                if ((size_t)(xe - f) < sz)
                    goto bad;
                if (id == 1) {
                    const uint8_t *fe = f + sz;
                    uint64_t *fields[3] = {&e->size, &e->comp_size, &e->local_offset};
                    for (int j = 0; j < 3; j++) {
                        if (*fields[j] != 0xFFFFFFFFu)
                            continue;
                        if (fe - f < 8)
                            goto bad;
                        *fields[j] = le64(f);
                        f += 8;
                    }
                    found = 1;
                    break;
                }
                x = f + sz;
            }
            if (!found)
                goto bad;
        }
        /* the zip library's own consistency rules */
        if ((e->method == 0 && e->comp_size != e->size) || (e->size && !e->comp_size) ||
            e->local_offset > file_size || e->comp_size > file_size ||
            e->comp_size + 30 > file_size - e->local_offset)
            goto bad;
        pos += total;
    }
    *entries = es;
    return SP_OK;
bad:
    free(es);
    return fail(err, SP_MALFORMED, dir->cd_offset + pos, "malformed central directory entry");
}

sp_code sp_zip_data_offset(const uint8_t *local, size_t len, const sp_zip_entry *e,
                           uint64_t file_size, uint64_t *data_offset, sp_error *err)
{
    uint64_t off, end;
    if (len < 30 || le32(local) != 0x04034b50u)
        return fail(err, SP_MALFORMED, e->local_offset, "bad local header for %.*s",
                    (int)(e->name_len > 80 ? 80 : e->name_len), (const char *)e->name);
    off = e->local_offset + 30u + le16(local + 26) + le16(local + 28);
    if (!add_u64(off, e->comp_size, &end) || end > file_size)
        return fail(err, SP_MALFORMED, e->local_offset, "record %.*s runs past the end of the file",
                    (int)(e->name_len > 80 ? 80 : e->name_len), (const char *)e->name);
    *data_offset = off;
    return SP_OK;
}
