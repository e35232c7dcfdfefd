/* Compiled helpers of quipkit. Plain C on raw buffers; Python passes pointers (see module.c). */
#ifndef QUIPKIT_NATIVE_H
#define QUIPKIT_NATIVE_H
#include <stdint.h>

void e8p_nearest(const float *x, int64_t count, const float *patterns, const int32_t *lookup, int32_t *codes);

void e8p_two_nearest(const float *x, int64_t count, const float *patterns, int32_t *codes);

int trellis_encode(const float *x, int64_t count, int T, int L, int k, int V, const float *table, int32_t *states,
                   float *costs);

#endif
