/* One Viterbi step over 2^L states, written once and compiled twice by viterbi.c: for the baseline
 * instruction set and (on x86) for AVX2 + FMA, picked at run time. STEP_NAME and STEP_TARGET name
 * the function and its target attribute. Eight "low" groups (8 * P states) per iteration:
 *   best[low] = min over h < P of cost[h * R + low]   (the predecessor's dropped high bits)
 *   next[low * P + b] = dist(x, c(low * P + b)) + best[low]
 * The minimum is expanded to P lanes each by shuffles (P = 2, 4) or broadcasts (P >= 8). */

STEP_TARGET static void STEP_NAME(const float *cost, float *next, uint8_t *back, const float *plane0,
                                  const float *plane1, int V, int64_t P, int64_t R, float x0, float x1) {
    const v8f X0 = {x0, x0, x0, x0, x0, x0, x0, x0};
    const v8f X1 = {x1, x1, x1, x1, x1, x1, x1, x1};
    for (int64_t low = 0; low < R; low += 8) {
        v8f best;
        memcpy(&best, cost + low, sizeof best);
        v8i arg = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t h = 1; h < P; h++) {
            v8f row;
            memcpy(&row, cost + h * R + low, sizeof row);
            v8i lt = row < best;
            best = (v8f)(((v8i)row & lt) | ((v8i)best & ~lt));
            v8i hv = {(int)h, (int)h, (int)h, (int)h, (int)h, (int)h, (int)h, (int)h};
            arg = (hv & lt) | (arg & ~lt);
        }
        for (int i = 0; i < 8; i++) back[low + i] = (uint8_t)arg[i];
        const int64_t base = low * P;
        const int64_t vectors = P; /* 8 * P states = P vectors of 8 */
        for (int64_t j = 0; j < vectors; j++) {
            v8f m;
            if (P == 2) {
                m = j == 0 ? SHUFFLE(best, 0, 0, 1, 1, 2, 2, 3, 3) : SHUFFLE(best, 4, 4, 5, 5, 6, 6, 7, 7);
            } else if (P == 4) {
                switch (j) {
                    case 0: m = SHUFFLE(best, 0, 0, 0, 0, 1, 1, 1, 1); break;
                    case 1: m = SHUFFLE(best, 2, 2, 2, 2, 3, 3, 3, 3); break;
                    case 2: m = SHUFFLE(best, 4, 4, 4, 4, 5, 5, 5, 5); break;
                    default: m = SHUFFLE(best, 6, 6, 6, 6, 7, 7, 7, 7); break;
                }
            } else {
                float v = best[(j * 8) / P];
                m = (v8f){v, v, v, v, v, v, v, v};
            }
            v8f c0, d;
            memcpy(&c0, plane0 + base + 8 * j, sizeof c0);
            d = X0 - c0;
            v8f acc = d * d + m;
            if (V == 2) {
                v8f c1;
                memcpy(&c1, plane1 + base + 8 * j, sizeof c1);
                d = X1 - c1;
                acc += d * d;
            }
            memcpy(next + base + 8 * j, &acc, sizeof acc);
        }
    }
}
