/* Compiled helpers of quipkit. Plain C on raw buffers; Python passes pointers (see module.c). */
#ifndef QUIPKIT_NATIVE_H
#define QUIPKIT_NATIVE_H
#include <stdint.h>

void e8p_nearest(const float *x, int64_t count, const float *patterns, const int32_t *lookup, int32_t *codes);

void e8p_two_nearest(const float *x, int64_t count, const float *patterns, int32_t *codes);

int trellis_encode(const float *x, int64_t count, int T, int L, int k, int V, const float *table, int32_t *states,
                   float *costs);

/* One decode step's norm and attention, float32 (decoder_step.c). keys/values [kv_heads, length, dim]
 * receive the new position's rotated key and value; out [heads, dim]. attention_step returns -1 when
 * out of memory. */
void rms_norm(const float *x, int64_t rows, int64_t n, const float *weight, float eps, float *out);
int attention_step(const float *q, const float *k, const float *v, const float *cos, const float *sin, float scale,
                   float *keys, float *values, int64_t position, int64_t length, int64_t heads, int64_t kv_heads,
                   int64_t dim, float *out);

/* Run fn(ctx, lo, hi) over [0, count) on up to `threads` threads (the caller included), in parts
 * whose bounds are multiples of `grain` (threads.c). */
typedef void (*task_fn)(void *ctx, int64_t lo, int64_t hi);
void parallel_for(int threads, int64_t count, int64_t grain, task_fn fn, void *ctx);

#endif
