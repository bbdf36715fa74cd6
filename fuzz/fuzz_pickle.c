/* fuzz_pickle.c: libFuzzer target for the legacy checkpoint engine (csrc/st_pickle.c).
 * Runs the input as a pickle and as a zip tail/directory, and checks the plan's invariants. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "st_pickle.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond) ((cond) ? (void)0 : fail(#cond, __LINE__))

static void fail(const char *what, int line)
{
    fprintf(stderr, "fuzz_pickle.c:%d: invariant violated: %s\n", line, what);
    abort();
}

/* every link points inside the plan, and every tensor lies inside its storage */
static void check_plan(const sp_plan *p, size_t size)
{
    uint32_t tensors = 0, storages = 0;
    CHECK(p->root > 0 && p->root < p->n_nodes);
    CHECK(p->stop <= size);
    for (uint32_t id = 1; id < p->n_nodes; id++) {
        const sp_node *n = &p->nodes[id];
        uint32_t count = 0;
        CHECK(n->kind >= SP_K_NONE && n->kind <= SP_K_STYPE);
        for (uint32_t e = n->first; e; e = p->edges[e].next) {
            CHECK(e < p->n_edges);
            CHECK(p->edges[e].child > 0 && p->edges[e].child < p->n_nodes);
            count++;
            CHECK(count <= p->n_edges);
        }
        if (n->kind != SP_K_SIZE)
            CHECK(count == n->n);
        if (n->kind == SP_K_DICT || n->kind == SP_K_ODICT)
            CHECK(count % 2 == 0);
        if (n->kind == SP_K_STR || n->kind == SP_K_BSTR || n->kind == SP_K_LONG)
            CHECK(n->off <= size && n->len <= size - n->off);
        if (n->kind == SP_K_STORAGE) {
            storages++;
            CHECK(p->nodes[n->a].kind == SP_K_STR && p->nodes[n->b].kind == SP_K_STR);
            CHECK(n->v.i >= 0);
        }
        if (n->kind == SP_K_TENSOR) {
            const sp_node *s = &p->nodes[n->a];
            const int64_t *sz = p->ints + n->dims, *str = sz + n->ndim;
            uint64_t need = (uint64_t)n->v.i + 1, have;
            int empty = 0;
            tensors++;
            CHECK(n->a < id && s->kind == SP_K_STORAGE);
            CHECK(n->dims + 2u * n->ndim <= p->n_ints);
            CHECK(p->nodes[n->b].kind == SP_K_ODICT && p->nodes[n->b].n == 0);
            for (unsigned d = 0; d < n->ndim; d++) {
                CHECK(sz[d] >= 0 && str[d] >= 0);
                empty |= sz[d] == 0;
            }
            if (!empty) {
                /* the engine promised this does not overflow */
                for (unsigned d = 0; d < n->ndim; d++)
                    need += (uint64_t)str[d] * (uint64_t)(sz[d] - 1);
                unsigned esz = (s->flags & SP_F_UNTYPED) ? 1u : sp_dtype_size(s->dtype);
                have = (uint64_t)s->v.i > UINT64_MAX / esz ? UINT64_MAX : (uint64_t)s->v.i * esz;
                CHECK(need <= UINT64_MAX / sp_dtype_size(n->dtype));
                CHECK(need * sp_dtype_size(n->dtype) <= have);
            }
        }
        if (n->kind == SP_K_PARAM)
            CHECK(p->nodes[n->a].kind == SP_K_TENSOR);
    }
    CHECK(tensors == p->n_tensors && storages == p->n_storages);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    sp_plan plan;
    sp_error err;
    sp_zip_dir dir;
    /* as a zip's data.pkl, and as the object pickle of a pre-1.6 file */
    for (unsigned flags = 0; flags <= SP_RUN_LEGACY_IDS; flags++) {
        sp_code rc = sp_pickle_run_ex(data, size, flags, &plan, &err);
        if (rc == SP_OK)
            check_plan(&plan, size);
        else
            CHECK(err.code == rc && err.position <= size &&
                  memchr(err.message, 0, sizeof(err.message)));
        sp_plan_free(&plan);
    }

    /* the same bytes as the end of a zip file, and as its central directory */
    if (sp_zip_find_dir(data, size, size, &dir, &err) == SP_OK) {
        sp_zip_entry *es = NULL;
        CHECK(dir.cd_offset <= size && dir.cd_size <= size - dir.cd_offset);
        if (sp_zip_parse_dir(data + dir.cd_offset, (size_t)dir.cd_size, &dir, size, &es, &err) ==
            SP_OK) {
            for (uint64_t i = 0; i < dir.count; i++) {
                uint64_t off;
                CHECK(es[i].name >= data && es[i].name + es[i].name_len <= data + size);
                if (es[i].local_offset < size &&
                    sp_zip_data_offset(data + es[i].local_offset, size - es[i].local_offset, &es[i],
                                       size, &off, &err) == SP_OK)
                    CHECK(off <= size && es[i].comp_size <= size - off);
            }
        }
        free(es);
    }
    return 0;
}
