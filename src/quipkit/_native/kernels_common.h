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
#define THREE_INST_SCALE (1.0f / 1.244f)

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
