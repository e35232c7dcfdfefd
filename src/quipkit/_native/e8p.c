/* Exact nearest-codeword search for the E8P codebook (see quipkit/codebooks/e8p.py for the layout).
 *
 * Per shift coset: decode the nearest point of D8^ (round to half-integers, fix the parity with the
 * cheapest move); if its absolute-value pattern is in S, it is the answer. Otherwise compare the 256
 * patterns of S under the signs of y, charging odd-parity patterns the cheapest sign flip.
 */
#include <math.h>
#include <stdint.h>

#include "native.h"

static float search_coset(const float y[8], const float *patterns, const float *pattern_norms,
                          const float *pattern_lengths, const int8_t *twice, const int32_t *lookup,
                          int32_t *index_out, uint8_t negative[8]) {
    float r[8], worst = -1.0f, total = 0.0f;
    int worst_i = 0;
    for (int i = 0; i < 8; i++) {
        r[i] = floorf(y[i]) + 0.5f;
        float e = fabsf(y[i] - r[i]);
        if (e > worst) {
            worst = e;
            worst_i = i;
        }
        total += r[i];
    }
    if (fmodf(total, 2.0f) != 0.0f) r[worst_i] += (y[worst_i] - r[worst_i] >= 0.0f) ? 1.0f : -1.0f;

    int key = 0, representable = 1;
    float dist = 0.0f;
    for (int i = 7; i >= 0; i--) {
        int digit = (int)(fabsf(r[i]));  /* |r| = digit + 1/2 */
        if (digit > 3) representable = 0;
        key = key * 4 + (digit & 3);
        float e = y[i] - r[i];
        dist += e * e;
    }
    if (representable && lookup[key] >= 0) {
        *index_out = lookup[key];
        for (int i = 0; i < 8; i++) negative[i] = r[i] < 0.0f;
        return dist;
    }

    float ya[8], ya2 = 0.0f;
    uint8_t neg[8];
    for (int i = 0; i < 8; i++) {
        ya[i] = fabsf(y[i]);
        neg[i] = y[i] < 0.0f;
        ya2 += ya[i] * ya[i];
    }
    /* Patterns are sorted by norm: scan from the longest, and stop once ||y| - |a|| alone exceeds the
     * best distance, a lower bound that only grows for shorter patterns. Ties keep the lowest index. */
    float best = INFINITY, length = sqrtf(ya2);
    int best_j = 0, best_flip = -1;
    for (int j = 255; j >= 0; j--) {
        float gap = length - pattern_lengths[j];
        if (gap > 0.0f && gap * gap > best) break;
        const float *a = patterns + 8 * j;
        const int8_t *a2 = twice + 8 * j;
        float dot = 0.0f, min_cost = INFINITY;
        int min_i = 0, signed_twice = 0;
        for (int i = 0; i < 8; i++) {
            float c = ya[i] * a[i];
            dot += c;
            if (c < min_cost) {
                min_cost = c;
                min_i = i;
            }
            signed_twice += neg[i] ? -a2[i] : a2[i];
        }
        float d = ya2 - 2.0f * dot + pattern_norms[j];
        int flip = -1;
        if ((signed_twice & 3) != 0) { /* sum(s * a) odd: flip the cheapest sign */
            d += 4.0f * min_cost;
            flip = min_i;
        }
        if (d <= best) {
            best = d;
            best_j = j;
            best_flip = flip;
        }
    }
    *index_out = best_j;
    for (int i = 0; i < 8; i++) negative[i] = neg[i] ^ (i == best_flip);
    return best;
}

void e8p_nearest(const float *x, int64_t count, const float *patterns, const int32_t *lookup, int32_t *codes) {
    float norms[256], lengths[256];
    int8_t twice[256 * 8];
    for (int j = 0; j < 256; j++) {
        norms[j] = 0.0f;
        for (int i = 0; i < 8; i++) {
            float a = patterns[8 * j + i];
            norms[j] += a * a;
            twice[8 * j + i] = (int8_t)lrintf(2.0f * a);
        }
        lengths[j] = sqrtf(norms[j]);
    }
    for (int64_t v = 0; v < count; v++) {
        const float *xv = x + 8 * v;
        float lo[8], hi[8];
        for (int i = 0; i < 8; i++) {
            lo[i] = xv[i] + 0.25f; /* codeword s*a - 1/4, shift bit 0 */
            hi[i] = xv[i] - 0.25f; /* codeword s*a + 1/4, shift bit 1 */
        }
        int32_t index_lo, index_hi;
        uint8_t neg_lo[8], neg_hi[8];
        float d_lo = search_coset(lo, patterns, norms, lengths, twice, lookup, &index_lo, neg_lo);
        float d_hi = search_coset(hi, patterns, norms, lengths, twice, lookup, &index_hi, neg_hi);
        int use_hi = d_hi < d_lo;
        const uint8_t *neg = use_hi ? neg_hi : neg_lo;
        int32_t code = use_hi ? index_hi : index_lo;
        for (int i = 0; i < 7; i++) code |= (int32_t)neg[i] << (8 + i);
        codes[v] = code | (use_hi << 15);
    }
}
