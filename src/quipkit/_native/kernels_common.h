/* Small helpers shared by every kernel tier. */
#ifndef QUIPKIT_KERNELS_COMMON_H
#define QUIPKIT_KERNELS_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* 1MAD: (byte sum of the LCG output - 510) / 147.800537; 3INST: (two fp16 halves summed) / 1.244. */
#define ONE_MAD_SCALE (1.0f / 147.800537f)
#define ONE_MAD_MULTIPLIER 34038481u
#define ONE_MAD_INVERSE 3042850353u /* ONE_MAD_MULTIPLIER x ONE_MAD_INVERSE = 1 mod 2^32 */
#define THREE_INST_SCALE (1.0f / 1.244f)

/* The hand-written kernels multiply each decoded weight against up to MAX_BATCH activation rows. */
#define MAX_BATCH 8

/* Runs ROWS(io, S, lo, hi, b0, NB[, extra]) on each chunk of at most MAX_BATCH activation rows, NB a
 * constant in every case, so that the kernels' loops over it unroll. */
#define BATCH_CHUNKS(ROWS, S, ...)                                               \
    for (int64_t b0 = 0; b0 < io->batch; b0 += MAX_BATCH) {                      \
        switch (io->batch - b0 < MAX_BATCH ? io->batch - b0 : MAX_BATCH) {       \
        case 1: ROWS(io, S, lo, hi, b0, 1, ##__VA_ARGS__); break;                \
        case 2: ROWS(io, S, lo, hi, b0, 2, ##__VA_ARGS__); break;                \
        case 3: ROWS(io, S, lo, hi, b0, 3, ##__VA_ARGS__); break;                \
        case 4: ROWS(io, S, lo, hi, b0, 4, ##__VA_ARGS__); break;                \
        case 5: ROWS(io, S, lo, hi, b0, 5, ##__VA_ARGS__); break;                \
        case 6: ROWS(io, S, lo, hi, b0, 6, ##__VA_ARGS__); break;                \
        case 7: ROWS(io, S, lo, hi, b0, 7, ##__VA_ARGS__); break;                \
        default: ROWS(io, S, lo, hi, b0, 8, ##__VA_ARGS__); break;               \
        }                                                                        \
    }

/* Runs ROWS(io, t, lo, hi, b0, NB, ...) on the trellis kernels' chunk of at most 4 activation rows
 * from b0 (the AVX-512 kernel holds 16 sums per row), NB a constant in every case; the rest: the code,
 * or the 2-bit column kernels' state width and whether their increment needs an add. */
#define TRELLIS_CASES(ROWS, ...)                                                 \
    switch (io->batch - b0 < 4 ? io->batch - b0 : 4) {                           \
    case 1: ROWS(io, t, lo, hi, b0, 1, __VA_ARGS__); break;                      \
    case 2: ROWS(io, t, lo, hi, b0, 2, __VA_ARGS__); break;                      \
    case 3: ROWS(io, t, lo, hi, b0, 3, __VA_ARGS__); break;                      \
    default: ROWS(io, t, lo, hi, b0, 4, __VA_ARGS__); break;                     \
    }

/* True when one of a kernel's scratch allocations `blocks` failed: then all are freed and the call is
 * marked out of memory (the launcher raises MemoryError rather than return outputs never written),
 * and the kernel returns. */
#define SCRATCH_FAILED(io, ...) \
    scratch_failed(io, (void *[]){__VA_ARGS__}, sizeof((void *[]){__VA_ARGS__}) / sizeof(void *))
static inline int scratch_failed(const io_t *io, void **blocks, size_t count) {
    int failed = 0;
    for (size_t i = 0; i < count; i++) failed |= blocks[i] == NULL;
    if (!failed) return 0;
    for (size_t i = 0; i < count; i++) free(blocks[i]);
    if (io->out_of_memory) atomic_store(io->out_of_memory, 1);
    return 1;
}

/* A computed trellis code's value is (raw - code_offset) * code_scale. */
static inline float code_scale(int code) { return code == CODE_1MAD ? ONE_MAD_SCALE : THREE_INST_SCALE; }
static inline float code_offset(int code) { return code == CODE_1MAD ? 510.0f : 0.0f; }

/* Zero point `index` of a grid's b-bit zero-point stream (one stream over all rows' groups). */
static inline int32_t grid_zero_point(const grid_t *g, int64_t index) {
    const int64_t bit = index * g->bits;
    uint32_t word = g->zeros[bit >> 3];
    if (((bit & 7) + g->bits) > 8) word |= (uint32_t)g->zeros[(bit >> 3) + 1] << 8;
    return (int32_t)((word >> (bit & 7)) & ((1u << g->bits) - 1));
}

/* x [8 groups] summed over each E8P code's 8 columns into sums [groups]; returns their total. */
static inline float e8p_group_sums(const float *x, int64_t groups, float *sums) {
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float s = 0.0f;
        for (int i = 0; i < 8; i++) s += x[8 * g + i];
        sums[g] = s;
        total += s;
    }
    return total;
}

/* IEEE half -> float, exact for every input (normals, subnormals, infinities, NaN). */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#endif
