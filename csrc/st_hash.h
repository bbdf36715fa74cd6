/* st_hash.h: CRC32C (Castagnoli) over bytes, for per-tensor checksums.
 * Pure: no Python, torch or I/O. */
#ifndef ST_HASH_H
#define ST_HASH_H

#include <stddef.h>
#include <stdint.h>

/* Fills the lookup tables; call once before any other function (not thread-safe). */
void st_crc32c_init(void);

/* CRC32C of n bytes, continuing from value (0 to start): crc(a + b) == crc(b, crc(a)).
 * Uses the SSE4.2 instruction when the processor has it. */
uint32_t st_crc32c(uint32_t value, const uint8_t *p, size_t n);

/* The same, always with the portable table-driven code (for tests and other CPUs). */
uint32_t st_crc32c_portable(uint32_t value, const uint8_t *p, size_t n);

#endif
