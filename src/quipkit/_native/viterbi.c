/* Viterbi encoding of bitshift trellis codes (QTIP), tail-biting by two passes.
 *
 * A sequence of T weights is a walk of N = T / V steps over 2^L states; each step shifts P = 2^(kV)
 * new values into the state: s' = ((s << kV) mod 2^L) | b, and state s decodes to V values
 * table[s * V .. s * V + V). The predecessors of s are (h << (L - kV)) | (s >> kV), h < P, so one
 * step is: m[low] = min_h cost[h * R + low] (R = 2^(L - kV)), then cost'[low * P + b] = D(low * P + b)
 * + m[low]. Costs are float32; back-pointers are the winning h, one byte per (step, low).
 *
 * Tail-biting (the stream is circular): pass 1 runs on the sequence rotated by N / 2 steps and reads
 * the L - kV bits at the seam; pass 2 runs on the sequence itself with the first state's high bits
 * and the last state's low bits fixed to them, which closes the walk.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUFFLE(v, a, b, c, d, e, f, g, h) __builtin_shufflevector(v, v, a, b, c, d, e, f, g, h)
#else
#define SHUFFLE(v, a, b, c, d, e, f, g, h) __builtin_shuffle(v, (v8i){a, b, c, d, e, f, g, h})
#endif

#define STEP_NAME step_baseline
#define STEP_TARGET
#include "viterbi_step.h"
#undef STEP_NAME
#undef STEP_TARGET

#if defined(__x86_64__) || defined(__i386__)
#define STEP_NAME step_avx2
#define STEP_TARGET __attribute__((target("avx2,fma")))
#include "viterbi_step.h"
#undef STEP_NAME
#undef STEP_TARGET
#endif

typedef void (*step_fn)(const float *, float *, uint8_t *, const float *, const float *, int, int64_t, int64_t,
                        float, float);

static step_fn pick_step(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return step_avx2;
#endif
    return step_baseline;
}

typedef struct {
    int L, kv, V, N;
    int64_t S, R, P;
    float *cost, *next;    /* [S] each */
    float *plane0, *plane1; /* table split by value: [S] each */
    uint8_t *back;          /* [N * R] */
    float *xs;              /* [T] rotated copy */
    step_fn step;
} trellis_t;

static float distance(const float *x, const float *value, int V) {
    float d = x[0] - value[0], acc = d * d;
    for (int v = 1; v < V; v++) {
        d = x[v] - value[v];
        acc += d * d;
    }
    return acc;
}

/* One unconstrained or constrained pass; returns the total cost and writes the N states.
 * fixed < 0: free; else the first state's high L - kV bits and the last state's low L - kV bits
 * must both equal `fixed`. */
static float viterbi_pass(trellis_t *t, const float *x, const float *table, int64_t fixed, int32_t *states) {
    const int64_t S = t->S, R = t->R, P = t->P;
    const int V = t->V, N = t->N, kv = t->kv;
    float *cost = t->cost, *next = t->next;
    uint8_t *back = t->back;

    for (int64_t s = 0; s < S; s++) {
        int allowed = fixed < 0 || (s >> kv) == fixed;
        cost[s] = allowed ? distance(x, table + s * V, V) : INFINITY;
    }
    for (int step = 1; step < N; step++) {
        const float *xv = x + (int64_t)step * V;
        t->step(cost, next, back + (int64_t)step * R, t->plane0, t->plane1, V, P, R, xv[0], V == 2 ? xv[1] : 0.0f);
        float *swap = cost;
        cost = next;
        next = swap;
    }
    int64_t end = -1;
    float total = INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (fixed >= 0 && (s & (R - 1)) != fixed) continue;
        if (cost[s] < total) {
            total = cost[s];
            end = s;
        }
    }
    if (end < 0) end = fixed >= 0 ? fixed : 0; /* unreachable with finite inputs */
    int64_t s = end;
    for (int step = N - 1; step >= 0; step--) {
        states[step] = (int32_t)s;
        if (step > 0) {
            int64_t low = s >> kv;
            s = ((int64_t)back[(int64_t)step * R + low] << (t->L - kv)) | low;
        }
    }
    return total;
}

int trellis_encode(const float *x, int64_t count, int T, int L, int k, int V, const float *table, int32_t *states,
                   float *costs) {
    trellis_t t;
    t.L = L;
    t.kv = k * V;
    t.V = V;
    t.N = T / V;
    t.S = (int64_t)1 << L;
    t.P = (int64_t)1 << t.kv;
    t.R = t.S >> t.kv;
    if (t.R < 8 || V < 1 || V > 2) return -2; /* the step works on 8 low groups at a time */
    t.step = pick_step();
    t.cost = malloc(sizeof(float) * t.S);
    t.next = malloc(sizeof(float) * t.S);
    t.plane0 = malloc(sizeof(float) * t.S);
    t.plane1 = malloc(sizeof(float) * t.S);
    t.back = malloc((size_t)t.N * (size_t)t.R);
    t.xs = malloc(sizeof(float) * T);
    int32_t *rotated = malloc(sizeof(int32_t) * t.N);
    if (!t.cost || !t.next || !t.plane0 || !t.plane1 || !t.back || !t.xs || !rotated) {
        free(t.cost), free(t.next), free(t.plane0), free(t.plane1), free(t.back), free(t.xs), free(rotated);
        return -1;
    }
    for (int64_t s = 0; s < t.S; s++) {
        t.plane0[s] = table[s * V];
        t.plane1[s] = V == 2 ? table[s * V + 1] : 0.0f;
    }
    const int half = t.N / 2;
    for (int64_t i = 0; i < count; i++) {
        const float *xi = x + i * T;
        /* pass 1: rotated so that the seam sits in the middle */
        memcpy(t.xs, xi + (int64_t)half * V, sizeof(float) * (size_t)(T - half * V));
        memcpy(t.xs + (T - half * V), xi, sizeof(float) * (size_t)(half * V));
        viterbi_pass(&t, t.xs, table, -1, rotated);
        /* rotated step N - half - 1 is original step N - 1: its low L - kV bits continue into step 0 */
        int64_t fixed = rotated[t.N - half - 1] & (t.R - 1);
        costs[i] = viterbi_pass(&t, xi, table, fixed, states + i * t.N);
    }
    free(t.cost), free(t.next), free(t.plane0), free(t.plane1), free(t.back), free(t.xs), free(rotated);
    return 0;
}
