/* st_pickle.h: the legacy checkpoint engine, a pure function over bytes: torch's zip
 * directory and the weights_only subset of pickle in, a plan of nodes out. No Python,
 * torch or I/O. Anything outside the subset is SP_UNSUPPORTED: torch's loader decides. */
#ifndef ST_PICKLE_H
#define ST_PICKLE_H

#include <stddef.h>
#include <stdint.h>

/* ---- limits ---- */

#define SP_MAX_NDIM 64                    /* dims of one tensor */
#define SP_MAX_PICKLE (1ull << 31)        /* bytes of one pickle */
#define SP_ZIP_TAIL (22u + 65535u + 20u + 56u) /* EOCD + comment + zip64 locator/record */

/* ---- errors: code + message + byte position ---- */

typedef enum {
    SP_OK = 0,
    SP_UNSUPPORTED, /* valid or not, outside what this engine reads: torch decides */
    SP_MALFORMED,   /* bytes that cannot be what they claim */
    SP_NOMEM,
    SP_TRUNCATED,   /* the pickle runs past the bytes given */
} sp_code;

typedef struct {
    sp_code code;
    uint64_t position; /* byte offset in the input the error refers to */
    char message[160];
} sp_error;

/* ---- dtypes (torch's names; the binding maps them to ATen codes) ---- */

typedef enum {
    SP_F64, SP_F32, SP_F16, SP_BF16, SP_I64, SP_I32, SP_I16, SP_I8, SP_U8, SP_BOOL,
    SP_C128, SP_C64, SP_C32, SP_U16, SP_U32, SP_U64, SP_F8E4M3FN, SP_F8E5M2,
    SP_F8E4M3FNUZ, SP_F8E5M2FNUZ, SP_F8E8M0FNU, SP_F4X2,
    SP_DTYPE_COUNT
} sp_dtype;

/* torch's name of a dtype without "torch." ("float32"). */
const char *sp_dtype_name(int dtype);
/* Bytes per element. */
unsigned sp_dtype_size(int dtype);

/* Whether n bytes are UTF-8 as Python decodes them (surrogates: with "surrogatepass"). */
int sp_utf8_ok(const uint8_t *s, size_t n, int surrogates);

/* ---- the plan ---- */

typedef enum {
    SP_K_NONE = 1, SP_K_BOOL, SP_K_INT, SP_K_LONG, SP_K_FLOAT, SP_K_STR, SP_K_BSTR,
    SP_K_BYTES, SP_K_TUPLE, SP_K_LIST, SP_K_DICT, SP_K_ODICT, SP_K_SIZE, SP_K_DTYPE,
    SP_K_DEVICE, SP_K_STORAGE, SP_K_TENSOR, SP_K_PARAM,
    SP_K_GLOBAL, /* a callable of the table: only valid under REDUCE */
    SP_K_STYPE,  /* a storage type: only valid inside a persistent id */
} sp_kind;

#define SP_F_FROZEN 1u        /* passed to a rebuild function: no later mutation */
#define SP_F_REQUIRES_GRAD 2u /* TENSOR, PARAM */
#define SP_F_TRUE 4u          /* BOOL */
#define SP_F_UNTYPED 8u       /* STYPE, STORAGE: torch.storage.UntypedStorage */

/* One value. Node 0 is never used: 0 means "none" in links. */
typedef struct {
    uint8_t kind;
    uint8_t flags;
    uint8_t dtype;   /* DTYPE, STYPE, STORAGE (element type), TENSOR; GLOBAL: which */
    uint8_t ndim;    /* TENSOR */
    uint32_t n;      /* children (containers), items of a SIZE */
    uint32_t first, last; /* edge list of children, in order */
    uint32_t a, b;   /* TENSOR: storage, hooks; PARAM: tensor, hooks; ODICT: state;
                        DEVICE: type string, b = 1 when an index follows in i;
                        BYTES: string; SIZE: the tuple; STORAGE: key, location */
    union {
        int64_t i;   /* INT; TENSOR: storage offset; STORAGE: numel; DEVICE: index */
        double f;    /* FLOAT */
    } v;
    uint64_t off;    /* STR, BSTR, LONG: bytes in the input */
    uint32_t len;    /* STR, BSTR, LONG: length */
    uint32_t dims;   /* TENSOR: index of ndim sizes then ndim strides in plan->ints */
} sp_node;

typedef struct {
    uint32_t child, next;
} sp_edge;

typedef struct {
    sp_node *nodes;
    uint32_t n_nodes, cap_nodes;
    sp_edge *edges;
    uint32_t n_edges, cap_edges;
    int64_t *ints;
    uint32_t n_ints, cap_ints;
    uint32_t root;
    uint32_t n_storages, n_tensors;
    uint64_t stop; /* offset just past STOP */
} sp_plan;

/* Runs the pickle in data[0..len) (protocol 2, as torch writes data.pkl). On SP_OK
 * the plan holds every value; sp_plan_free releases it whatever the outcome.
 *
 * Memory, per input byte: an opcode makes at most one 48-byte node (an edge: 8 bytes)
 * and one 4-byte stack slot, so the plan and the machine hold at most ~56 bytes per
 * byte (twice that while an array doubles). None, True, False, () and the ints 0..255
 * share one node each, so the pickles that cost torch's unpickler least cost us less
 * still: 8 MiB of NONE, EMPTY_TUPLE or BININT1 opcodes take 5x, 5x and 3x their size
 * (torch 2.13: 10x, 10x, 6x); EMPTY_LIST and EMPTY_DICT take 53x (torch: 74x).
 * Measured by benchmarks/bench_legacy.py --plan-memory. */
sp_code sp_pickle_run(const uint8_t *data, size_t len, sp_plan *plan, sp_error *err);
void sp_plan_free(sp_plan *plan);

/* Flags of sp_pickle_run_ex. */
#define SP_RUN_LEGACY_IDS 1u /* pre-1.6 persistent ids: a sixth item, the view (None) */

/* sp_pickle_run with flags. SP_TRUNCATED: the pickle runs past the bytes given (a
 * caller reading a stream retries with more). */
sp_code sp_pickle_run_ex(const uint8_t *data, size_t len, unsigned flags, sp_plan *plan,
                         sp_error *err);

/* ---- torch's zip container ---- */

typedef struct {
    const uint8_t *name; /* inside the central directory bytes given */
    uint16_t name_len;
    uint16_t method;     /* 0 stored, 8 deflated */
    uint64_t comp_size, size, local_offset;
} sp_zip_entry;

typedef struct {
    uint64_t cd_offset, cd_size, count;
} sp_zip_dir;

/* Finds the end of central directory in the last tail_len bytes of a file of
 * file_size bytes (tail ends at the file's end). */
sp_code sp_zip_find_dir(const uint8_t *tail, size_t tail_len, uint64_t file_size,
                        sp_zip_dir *dir, sp_error *err);

/* Parses dir->count entries from the central directory bytes cd[0..len). entries
 * is allocated (count is checked against len first); the caller frees it. */
sp_code sp_zip_parse_dir(const uint8_t *cd, size_t len, const sp_zip_dir *dir,
                         uint64_t file_size, sp_zip_entry **entries, sp_error *err);

/* From the 30-byte local header of e, where its data begins in the file. */
sp_code sp_zip_data_offset(const uint8_t *local, size_t len, const sp_zip_entry *e,
                           uint64_t file_size, uint64_t *data_offset, sp_error *err);

#endif
