/* The parts of one decode step of a Llama-layout model that are not matmuls, for one position in
 * float32: the RMS norm and the attention of the new position (rotary embedding, KV cache write,
 * softmax over the cached positions). In torch each is a handful of ops whose dispatch costs ~50 us
 * per layer for a few microseconds of arithmetic. lean_decoder.py holds the torch reference that
 * the tests hold these to. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

void rms_norm(const float *x, int64_t rows, int64_t n, const float *weight, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = out + r * n;
        double squares = 0.0;
        for (int64_t c = 0; c < n; c++) squares += (double)xr[c] * xr[c];
        const float inverse = 1.0f / sqrtf((float)(squares / (double)n) + eps);
        for (int64_t c = 0; c < n; c++) yr[c] = weight[c] * (xr[c] * inverse);
    }
}

/* dst = (src cos + rotate_half(src) sin) * scale, rotate_half(v) = (-v[D/2:], v[:D/2]). */
static void rotate(const float *src, const float *cos, const float *sin, int64_t dim, float scale, float *dst) {
    const int64_t half = dim / 2;
    for (int64_t j = 0; j < half; j++) dst[j] = (src[j] * cos[j] - src[j + half] * sin[j]) * scale;
    for (int64_t j = half; j < dim; j++) dst[j] = (src[j] * cos[j] + src[j - half] * sin[j]) * scale;
}

/* Eight partial sums, which the compiler vectorises (one sum in order would stay scalar). */
static float dot(const float *a, const float *b, int64_t n) {
    float part[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int u = 0; u < 8; u++) part[u] += a[j + u] * b[j + u];
    float s = 0.0f;
    for (; j < n; j++) s += a[j] * b[j];
    for (int u = 0; u < 8; u++) s += part[u];
    return s;
}

int attention_step(const float *q, const float *k, const float *v, const float *cos, const float *sin, float scale,
                   float *keys, float *values, int64_t position, int64_t length, int64_t heads, int64_t kv_heads,
                   int64_t dim, float *out) {
    const int64_t count = position + 1, group = heads / kv_heads;
    float *scratch = malloc(sizeof(float) * (size_t)(count + dim));
    if (!scratch) return -1;
    float *scores = scratch, *query = scratch + count;
    for (int64_t g = 0; g < kv_heads; g++) {
        rotate(k + g * dim, cos, sin, dim, 1.0f, keys + (g * length + position) * dim);
        memcpy(values + (g * length + position) * dim, v + g * dim, sizeof(float) * (size_t)dim);
    }
    for (int64_t h = 0; h < heads; h++) {
        const float *head_keys = keys + h / group * length * dim, *head_values = values + h / group * length * dim;
        rotate(q + h * dim, cos, sin, dim, scale, query);
        float top = -INFINITY;
        for (int64_t t = 0; t < count; t++) {
            const float s = dot(query, head_keys + t * dim, dim);
            scores[t] = s;
            top = s > top ? s : top;
        }
        float total = 0.0f;
        for (int64_t t = 0; t < count; t++) total += scores[t] = expf(scores[t] - top);
        float *o = out + h * dim;
        memset(o, 0, sizeof(float) * (size_t)dim);
        for (int64_t t = 0; t < count; t++) {
            const float p = scores[t] / total;
            for (int64_t j = 0; j < dim; j++) o[j] += p * head_values[t * dim + j];
        }
    }
    free(scratch);
    return 0;
}
