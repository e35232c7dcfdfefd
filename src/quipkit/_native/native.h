/* Compiled helpers of quipkit. Plain C on raw buffers; Python passes pointers (see module.c). */
#ifndef QUIPKIT_NATIVE_H
#define QUIPKIT_NATIVE_H
#include <stdint.h>

void e8p_nearest(const float *x, int64_t count, const float *patterns, const int32_t *lookup, int32_t *codes);

void e8p_two_nearest(const float *x, int64_t count, const float *patterns, int32_t *codes);

int trellis_encode(const float *x, int64_t count, int T, int L, int k, int V, const float *table, int32_t *states,
                   float *costs);

/* Run fn(ctx, lo, hi) over [0, count) on up to `threads` threads (the caller included), in parts
 * whose bounds are multiples of `grain` (threads.c). */
typedef void (*task_fn)(void *ctx, int64_t lo, int64_t hi);
void parallel_for(int threads, int64_t count, int64_t grain, task_fn fn, void *ctx);

#endif
