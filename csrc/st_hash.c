/* st_hash.c: CRC32C (Castagnoli polynomial, reflected 0x82F63B78), the checksum that
 * verify --data compares per tensor: a portable slicing-by-8 version and, on x86-64,
 * the SSE4.2 crc32 instruction chosen at run time. Pure: no Python, torch or I/O. */
#include "st_hash.h"

#include <string.h>

/* ---- portable: slicing-by-8 ---- */

#define ST_CRC32C_POLY 0x82F63B78u

static uint32_t crc_table[8][256];

void st_crc32c_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1u) ? (c >> 1) ^ ST_CRC32C_POLY : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            uint32_t prev = crc_table[t - 1][i];
            crc_table[t][i] = (prev >> 8) ^ crc_table[0][prev & 0xFFu];
        }
    }
}

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v); /* unaligned input is fine; the host is little-endian */
    return v;
}

uint32_t st_crc32c_portable(uint32_t value, const uint8_t *p, size_t n)
{
    uint32_t c = ~value;
    while (n > 0 && ((uintptr_t)p & 7u) != 0) {
        c = (c >> 8) ^ crc_table[0][(c ^ *p) & 0xFFu];
        p++;
        n--;
    }
    while (n >= 8) {
        uint64_t w = load_le64(p) ^ (uint64_t)c;
        c = crc_table[7][w & 0xFFu] ^ crc_table[6][(w >> 8) & 0xFFu] ^
            crc_table[5][(w >> 16) & 0xFFu] ^ crc_table[4][(w >> 24) & 0xFFu] ^
            crc_table[3][(w >> 32) & 0xFFu] ^ crc_table[2][(w >> 40) & 0xFFu] ^
            crc_table[1][(w >> 48) & 0xFFu] ^ crc_table[0][(w >> 56) & 0xFFu];
        p += 8;
        n -= 8;
    }
    while (n > 0) {
        c = (c >> 8) ^ crc_table[0][(c ^ *p) & 0xFFu];
        p++;
        n--;
    }
    return ~c;
}

/* ---- x86-64: the SSE4.2 crc32 instruction ---- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ST_HAVE_SSE42 1

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t value, const uint8_t *p,
                                                               size_t n)
{
    uint64_t c = (uint64_t)~value;
    while (n > 0 && ((uintptr_t)p & 7u) != 0) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p);
        p++;
        n--;
    }
    while (n >= 8) {
        c = __builtin_ia32_crc32di(c, load_le64(p));
        p += 8;
        n -= 8;
    }
    while (n > 0) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p);
        p++;
        n--;
    }
    return ~(uint32_t)c;
}
#endif

uint32_t st_crc32c(uint32_t value, const uint8_t *p, size_t n)
{
#ifdef ST_HAVE_SSE42
    if (__builtin_cpu_supports("sse4.2"))
        return crc32c_sse42(value, p, n);
#endif
    return st_crc32c_portable(value, p, n);
}
