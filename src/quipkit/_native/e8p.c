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
                          const float *pattern_lengths, const uint8_t *mask15, const int32_t *lookup,
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
    unsigned neg = 0;
    for (int i = 0; i < 8; i++) {
        ya[i] = fabsf(y[i]);
        neg |= (unsigned)(y[i] < 0.0f) << i;
        ya2 += ya[i] * ya[i];
    }
    /* Patterns are sorted by norm: scan from the longest, and stop once ||y| - |a|| alone exceeds the
     * best distance, a lower bound that only grows for shorter patterns. Ties keep the lowest index.
     * sum(sign(y) * a) is even iff an even number of coordinates contribute 3 (mod 4) in halves,
     * i.e. iff popcount(neg ^ mask15) is even, where mask15 marks the entries equal to 3/2 (and 7/2). */
    float best = INFINITY, length = sqrtf(ya2);
    int best_j = 0, best_odd = 0;
    for (int j = 255; j >= 0; j--) {
        float gap = length - pattern_lengths[j];
        if (gap > 0.0f && gap * gap > best) break;
        const float *a = patterns + 8 * j;
        float dot = 0.0f;
        for (int i = 0; i < 8; i++) dot += ya[i] * a[i];
        float d = ya2 - 2.0f * dot + pattern_norms[j];
        if (d > best) continue;
        int odd = __builtin_popcount(neg ^ mask15[j]) & 1;
        if (odd) { /* flip the cheapest sign: +4 min_i |y_i| a_i */
            float min_cost = ya[0] * a[0];
            for (int i = 1; i < 8; i++) min_cost = fminf(min_cost, ya[i] * a[i]);
            d += 4.0f * min_cost;
            if (d > best) continue;
        }
        best = d;
        best_j = j;
        best_odd = odd;
    }
    int flip = -1;
    if (best_odd) {
        const float *a = patterns + 8 * best_j;
        float min_cost = INFINITY;
        for (int i = 0; i < 8; i++) {
            if (ya[i] * a[i] < min_cost) {
                min_cost = ya[i] * a[i];
                flip = i;
            }
        }
    }
    *index_out = best_j;
    for (int i = 0; i < 8; i++) negative[i] = ((neg >> i) & 1) ^ (i == flip);
    return best;
}

/* Per pattern: squared norm, norm, and the coordinates whose value is 1.5 mod 2 (as a bit mask). */
static void pattern_tables(const float *patterns, float *norms, float *lengths, uint8_t *mask15) {
    for (int j = 0; j < 256; j++) {
        norms[j] = 0.0f;
        mask15[j] = 0;
        for (int i = 0; i < 8; i++) {
            float a = patterns[8 * j + i];
            norms[j] += a * a;
            if (lrintf(2.0f * a) % 4 == 3) mask15[j] |= (uint8_t)(1u << i);
        }
        lengths[j] = sqrtf(norms[j]);
    }
}

void e8p_nearest(const float *x, int64_t count, const float *patterns, const int32_t *lookup, int32_t *codes) {
    float norms[256], lengths[256];
    uint8_t mask15[256];
    pattern_tables(patterns, norms, lengths, mask15);
    for (int64_t v = 0; v < count; v++) {
        const float *xv = x + 8 * v;
        float lo[8], hi[8];
        for (int i = 0; i < 8; i++) {
            lo[i] = xv[i] + 0.25f; /* codeword s*a - 1/4, shift bit 0 */
            hi[i] = xv[i] - 0.25f; /* codeword s*a + 1/4, shift bit 1 */
        }
        int32_t index_lo, index_hi;
        uint8_t neg_lo[8], neg_hi[8];
        float d_lo = search_coset(lo, patterns, norms, lengths, mask15, lookup, &index_lo, neg_lo);
        float d_hi = search_coset(hi, patterns, norms, lengths, mask15, lookup, &index_hi, neg_hi);
        int use_hi = d_hi < d_lo;
        const uint8_t *neg = use_hi ? neg_hi : neg_lo;
        int32_t code = use_hi ? index_hi : index_lo;
        for (int i = 0; i < 7; i++) code |= (int32_t)neg[i] << (8 + i);
        codes[v] = code | (use_hi << 15);
    }
}

/* The two nearest codewords (for RVQ, whose best first stage is often the second nearest). */
typedef struct {
    float dist;
    int32_t code;
} candidate_t;

static void offer(candidate_t top[2], float dist, int32_t code) {
    if (dist < top[0].dist || (dist == top[0].dist && code < top[0].code)) {
        top[1] = top[0];
        top[0].dist = dist;
        top[0].code = code;
    } else if (dist < top[1].dist || (dist == top[1].dist && code < top[1].code)) {
        top[1].dist = dist;
        top[1].code = code;
    }
}

static int32_t code_of(int j, unsigned negative, int shift_bit) {
    return (int32_t)j | (int32_t)((negative & 0x7Fu) << 8) | (shift_bit << 15);
}

/* Every pattern's best and second-best sign choice: with even parity at sign(y), the runner-up flips
 * the two cheapest signs; with odd parity the best flips the cheapest and the runner-up the second. */
static void scan_two(const float y[8], int shift_bit, const float *patterns, const float *pattern_norms,
                     const float *pattern_lengths, const uint8_t *mask15, candidate_t top[2]) {
    float ya[8], ya2 = 0.0f;
    unsigned neg = 0;
    for (int i = 0; i < 8; i++) {
        ya[i] = fabsf(y[i]);
        neg |= (unsigned)(y[i] < 0.0f) << i;
        ya2 += ya[i] * ya[i];
    }
    float length = sqrtf(ya2);
    for (int j = 255; j >= 0; j--) {
        float gap = length - pattern_lengths[j];
        if (gap > 0.0f && gap * gap > top[1].dist) break;
        const float *a = patterns + 8 * j;
        float dot = 0.0f;
        for (int i = 0; i < 8; i++) dot += ya[i] * a[i];
        float base = ya2 - 2.0f * dot + pattern_norms[j];
        if (base > top[1].dist) continue;
        float c1 = INFINITY, c2 = INFINITY;
        int i1 = 0, i2 = 1;
        for (int i = 0; i < 8; i++) {
            float c = ya[i] * a[i];
            if (c < c1) {
                c2 = c1;
                i2 = i1;
                c1 = c;
                i1 = i;
            } else if (c < c2) {
                c2 = c;
                i2 = i;
            }
        }
        if (__builtin_popcount(neg ^ mask15[j]) & 1) {
            offer(top, base + 4.0f * c1, code_of(j, neg ^ (1u << i1), shift_bit));
            offer(top, base + 4.0f * c2, code_of(j, neg ^ (1u << i2), shift_bit));
        } else {
            offer(top, base, code_of(j, neg, shift_bit));
            offer(top, base + 4.0f * (c1 + c2), code_of(j, neg ^ (1u << i1) ^ (1u << i2), shift_bit));
        }
    }
}

void e8p_two_nearest(const float *x, int64_t count, const float *patterns, int32_t *codes) {
    float norms[256], lengths[256];
    uint8_t mask15[256];
    pattern_tables(patterns, norms, lengths, mask15);
    for (int64_t v = 0; v < count; v++) {
        const float *xv = x + 8 * v;
        float lo[8], hi[8];
        for (int i = 0; i < 8; i++) {
            lo[i] = xv[i] + 0.25f;
            hi[i] = xv[i] - 0.25f;
        }
        candidate_t top[2] = {{INFINITY, 0}, {INFINITY, 0}};
        scan_two(lo, 0, patterns, norms, lengths, mask15, top);
        scan_two(hi, 1, patterns, norms, lengths, mask15, top);
        codes[2 * v] = top[0].code;
        codes[2 * v + 1] = top[1].code;
    }
}
