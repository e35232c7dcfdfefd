/* The decode kernels in portable C, written once and compiled by kernels_generic.c for the baseline
 * instruction set and (on x86) again for AVX2 + FMA: KERNEL_TARGET is the target attribute and
 * KERNEL_SET the name of the resulting kernel_set_t. Loops are shaped for the compiler's
 * auto-vectoriser (fixed trip counts, no aliasing); the AVX-512 versions in kernels_avx512.c are the
 * hand-written fast path. No kernel ever holds more decoded weights than one row or one 16 x 16 tile.
 */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, KERNEL_SUFFIX)

/* `whole` bytes of `bits`-bit values (bits 2, 4 or 8) into out [whole * 8 / bits]. Always inlined with
 * a constant `bits`, so the inner loop unrolls and the outer one vectorises. */
KERNEL_TARGET static inline __attribute__((always_inline)) void FN(unpack_bytes)(const uint8_t *p, int64_t whole,
                                                                                 const int bits, int32_t *out) {
    for (int64_t i = 0; i < whole; i++)
        for (int k = 0; k < 8 / bits; k++) out[i * (8 / bits) + k] = (int32_t)((p[i] >> (k * bits)) & ((1u << bits) - 1));
}

/* Unpack `count` b-bit values of a little-endian bit stream starting at value `first`. */
KERNEL_TARGET static void FN(unpack)(const uint8_t *stream, int bits, int64_t first, int64_t count, int32_t *out) {
    const uint32_t mask = (1u << bits) - 1;
    int64_t bit = first * bits;
    if ((bits == 2 || bits == 4 || bits == 8) && (bit & 7) == 0) { /* whole bytes: no bit reader, vectorisable */
        const int per_byte = 8 / bits;
        const uint8_t *p = stream + (bit >> 3);
        const int64_t whole = count / per_byte;
        if (bits == 2) FN(unpack_bytes)(p, whole, 2, out);
        else if (bits == 4) FN(unpack_bytes)(p, whole, 4, out);
        else FN(unpack_bytes)(p, whole, 8, out);
        for (int64_t i = whole * per_byte; i < count; i++)
            out[i] = (int32_t)((p[i / per_byte] >> ((i % per_byte) * bits)) & mask);
        return;
    }
    const uint8_t *p = stream + (bit >> 3);
    uint64_t acc = 0;
    int have = 0, skip = (int)(bit & 7);
    for (int64_t i = 0; i < count; i++) {
        while (have < bits + skip) {
            acc |= (uint64_t)(*p++) << have;
            have += 8;
        }
        acc >>= skip;
        have -= skip;
        skip = 0;
        out[i] = (int32_t)(acc & mask);
        acc >>= bits;
        have -= bits;
    }
}

/* ----------------------------------------------------------------------------------------------
 * Integer grids */

/* a . b over n floats, in 16 independent sums: a single sum is one long chain of dependent adds,
 * which the compiler may not reorder (no -ffast-math) and so cannot vectorise (the AVX2 grid
 * kernel ran 13x slower than the AVX-512 one at 4096x4096). */
KERNEL_TARGET static inline float FN(dot)(const float *a, const float *b, int64_t n) {
    float sums[16] = {0.0f};
    int64_t c = 0;
    for (; c + 16 <= n; c += 16)
        for (int k = 0; k < 16; k++) sums[k] += a[c + k] * b[c + k];
    for (; c < n; c++) sums[0] += a[c] * b[c];
    for (int k = 1; k < 16; k++) sums[0] += sums[k];
    return sums[0];
}

KERNEL_TARGET static void FN(grid_row)(const grid_t *g, int64_t r, int64_t cols, int32_t *q, float *scale,
                                       float *zero) {
    FN(unpack)(g->codes + r * g->row_bytes, g->bits, 0, cols, q);
    if (g->scales == NULL) {
        scale[0] = g->scale;
        zero[0] = g->zero;
        return;
    }
    int32_t z[g->groups];
    FN(unpack)(g->zeros, g->bits, r * g->groups, g->groups, z);
    for (int64_t j = 0; j < g->groups; j++) {
        scale[j] = half_to_float(g->scales[r * g->groups + j]);
        zero[j] = (float)z[j];
    }
}

KERNEL_TARGET static void FN(grid_matvec)(const io_t *io, const grid_t *g, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols, gs = g->scales ? g->group_size : cols, groups = g->scales ? g->groups : 1;
    int32_t *q = malloc(sizeof(int32_t) * cols);
    float *xq = malloc(sizeof(float) * cols), *xsum = malloc(sizeof(float) * io->batch * groups);
    if (SCRATCH_FAILED(io, q, xq, xsum)) return;
    float scale[groups], zero[groups];
    for (int64_t b = 0; b < io->batch; b++)
        for (int64_t j = 0; j < groups; j++) {
            float s = 0.0f;
            for (int64_t c = j * gs; c < cols && c < (j + 1) * gs; c++) s += io->x[b * cols + c];
            xsum[b * groups + j] = s;
        }
    for (int64_t r = lo; r < hi; r++) {
        FN(grid_row)(g, r, cols, q, scale, zero);
        for (int64_t c = 0; c < cols; c++) xq[c] = (float)q[c];
        for (int64_t b = 0; b < io->batch; b++) {
            const float *x = io->x + b * cols;
            float total = 0.0f;
            for (int64_t j = 0; j < groups; j++) {
                const int64_t start = j * gs, end = start + gs < cols ? start + gs : cols;
                total += scale[j] * (FN(dot)(xq + start, x + start, end - start) - zero[j] * xsum[b * groups + j]);
            }
            io->y[b * io->rows + r] = total;
        }
    }
    free(q), free(xq), free(xsum);
}

KERNEL_TARGET static void FN(grid_decode)(const io_t *io, const grid_t *g, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols, gs = g->scales ? g->group_size : cols, groups = g->scales ? g->groups : 1;
    int32_t *q = malloc(sizeof(int32_t) * cols);
    if (SCRATCH_FAILED(io, q)) return;
    float scale[groups], zero[groups];
    for (int64_t r = lo; r < hi; r++) {
        FN(grid_row)(g, r, cols, q, scale, zero);
        float *w = io->y + (r - io->row0) * cols;
        for (int64_t c = 0; c < cols; c++) w[c] = scale[c / gs] * ((float)q[c] - zero[c / gs]);
    }
    free(q);
}

/* ----------------------------------------------------------------------------------------------
 * E8P and residual lattice codes */

KERNEL_TARGET static inline void FN(e8p_point)(const lattice_t *l, uint32_t code, float *w) {
    const uint32_t index = code & 0xFF, signs7 = (code >> 8) & 0x7F;
    const uint32_t last = ((uint32_t)__builtin_popcount(signs7) ^ l->parity[index]) & 1;
    const uint32_t signs = signs7 | (last << 7);
    const float shift = (code >> 15) & 1 ? 0.25f : -0.25f;
    const float *a = l->patterns + index * 8;
    for (int i = 0; i < 8; i++) w[i] = ((signs >> i) & 1 ? -a[i] : a[i]) + shift;
}

/* Decoded weights of one row, 8 per code: w [cols]. */
KERNEL_TARGET static void FN(lattice_row)(const lattice_t *l, int64_t r, int64_t cols, float *w) {
    const int64_t groups = cols / 8;
    const uint16_t *codes = (const uint16_t *)l->codes + r * groups;
    for (int64_t j = 0; j < groups; j++) FN(e8p_point)(l, codes[j], w + 8 * j);
    if (l->second == 0) return;
    float second[8];
    for (int64_t j = 0; j < groups; j++) {
        if (l->second == 1) {
            const float *p = l->second_table + 8 * ((const uint8_t *)l->codes2)[r * groups + j];
            for (int i = 0; i < 8; i++) second[i] = p[i];
        } else {
            FN(e8p_point)(l, ((const uint16_t *)l->codes2)[r * groups + j], second);
        }
        for (int i = 0; i < 8; i++) w[8 * j + i] += second[i] * l->inv_residual;
    }
}

/* y[b, r] = w . x[b] for every activation row: w [cols] is row r of W, decoded. */
KERNEL_TARGET static void FN(row_dots)(const io_t *io, const float *w, int64_t r) {
    for (int64_t b = 0; b < io->batch; b++) io->y[b * io->rows + r] = FN(dot)(w, io->x + b * io->cols, io->cols);
}

KERNEL_TARGET static void FN(lattice_matvec)(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi) {
    float *w = malloc(sizeof(float) * io->cols);
    if (SCRATCH_FAILED(io, w)) return;
    for (int64_t r = lo; r < hi; r++) {
        FN(lattice_row)(l, r, io->cols, w);
        FN(row_dots)(io, w, r);
    }
    free(w);
}

KERNEL_TARGET static void FN(lattice_decode)(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) FN(lattice_row)(l, r, io->cols, io->y + (r - io->row0) * io->cols);
}

/* ----------------------------------------------------------------------------------------------
 * Bitshift trellis */

/* The 256 weights of one tile, row by row: tile [256]. */
KERNEL_TARGET static void FN(trellis_tile)(const trellis_layer_t *t, const uint8_t *codes, float *tile) {
    const int kv = t->k * t->V, steps = 256 / t->V, bytes = 32 * t->k;
    const uint32_t mask = (1u << t->L) - 1;
    uint8_t ring[128 + 8];
    memcpy(ring, codes, bytes);
    memcpy(ring + bytes, codes, 8); /* the stream is circular */
    for (int step = 0; step < steps; step++) {
        const int pos = (steps - 1 - step) * kv;
        uint32_t word;
        memcpy(&word, ring + (pos >> 3), 4);
        const uint32_t s = (word >> (pos & 7)) & mask;
        if (t->code == CODE_1MAD) {
            const uint32_t x = s * ONE_MAD_MULTIPLIER + t->increment;
            const int sum = (int)(x & 0xFF) + (int)((x >> 8) & 0xFF) + (int)((x >> 16) & 0xFF) + (int)(x >> 24);
            tile[step] = (float)(sum - 510) * ONE_MAD_SCALE;
        } else if (t->code == CODE_3INST) {
            uint32_t x = s * 89226354u + 64248484u;
            x = (x & 0x8FFF8FFFu) ^ 0x3B603B60u;
            tile[step] = (half_to_float((uint16_t)(x >> 16)) + half_to_float((uint16_t)(x & 0xFFFF))) * THREE_INST_SCALE;
        } else if (t->code == CODE_HYB) {
            const uint32_t h = ((s + 1) * s) & 0xFFFF;
            const float *v = t->table + 2 * ((h >> 6) & 511);
            tile[2 * step] = (h >> 15) & 1 ? -v[0] : v[0];
            tile[2 * step + 1] = v[1];
        } else {
            for (int v = 0; v < t->V; v++) tile[t->V * step + v] = t->table[(int64_t)s * t->V + v];
        }
    }
}

KERNEL_TARGET static void FN(trellis_matvec)(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols, tiles_n = cols / 16, tile_bytes = 32 * t->k;
    float tile[256];
    float *acc = malloc(sizeof(float) * io->batch * 256);
    if (SCRATCH_FAILED(io, acc)) return;
    for (int64_t i = lo / 16; i < hi / 16; i++) {
        memset(acc, 0, sizeof(float) * io->batch * 256);
        for (int64_t j = 0; j < tiles_n; j++) {
            FN(trellis_tile)(t, t->codes + (i * tiles_n + j) * tile_bytes, tile);
            for (int64_t b = 0; b < io->batch; b++) {
                const float *x = io->x + b * cols + 16 * j;
                float *a = acc + b * 256;
                for (int rr = 0; rr < 16; rr++)
                    for (int c = 0; c < 16; c++) a[16 * rr + c] += tile[16 * rr + c] * x[c];
            }
        }
        for (int64_t b = 0; b < io->batch; b++)
            for (int rr = 0; rr < 16; rr++) {
                float s = 0.0f;
                for (int c = 0; c < 16; c++) s += acc[b * 256 + 16 * rr + c];
                io->y[b * io->rows + 16 * i + rr] = s;
            }
    }
    free(acc);
}

KERNEL_TARGET static void FN(trellis_decode)(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols, tiles_n = cols / 16, tile_bytes = 32 * t->k;
    float tile[256];
    for (int64_t i = lo / 16; i < hi / 16; i++)
        for (int64_t j = 0; j < tiles_n; j++) {
            FN(trellis_tile)(t, t->codes + (i * tiles_n + j) * tile_bytes, tile);
            for (int rr = 0; rr < 16; rr++)
                memcpy(io->y + (16 * i + rr - io->row0) * cols + 16 * j, tile + 16 * rr, sizeof(float) * 16);
        }
}

/* ----------------------------------------------------------------------------------------------
 * Per-row tables, and ICQuant's outlier corrections */

KERNEL_TARGET static void FN(table_row)(const table_t *t, int64_t r, int64_t cols, int32_t *q, float *w) {
    const int count = 1 << t->bits;
    float levels[count];
    for (int i = 0; i < count; i++) levels[i] = half_to_float(t->levels[r * count + i]);
    FN(unpack)(t->codes + r * t->row_bytes, t->bits, 0, cols, q);
    for (int64_t c = 0; c < cols; c++) w[c] = levels[q[c]];
}

KERNEL_TARGET static void FN(table_matvec)(const io_t *io, const table_t *t, int64_t lo, int64_t hi) {
    int32_t *q = malloc(sizeof(int32_t) * io->cols);
    float *w = malloc(sizeof(float) * io->cols);
    if (SCRATCH_FAILED(io, q, w)) return;
    for (int64_t r = lo; r < hi; r++) {
        FN(table_row)(t, r, io->cols, q, w);
        FN(row_dots)(io, w, r);
    }
    free(q), free(w);
}

KERNEL_TARGET static void FN(table_decode)(const io_t *io, const table_t *t, int64_t lo, int64_t hi) {
    int32_t *q = malloc(sizeof(int32_t) * io->cols);
    if (SCRATCH_FAILED(io, q)) return;
    for (int64_t r = lo; r < hi; r++) FN(table_row)(t, r, io->cols, q, io->y + (r - io->row0) * io->cols);
    free(q);
}

/* The `bits`-bit value (bits <= 16) at bit `bit` of a little-endian stream, reading no byte past it. */
KERNEL_TARGET static inline uint32_t FN(bits_at)(const uint8_t *stream, int64_t bit, int bits) {
    const uint8_t *p = stream + (bit >> 3);
    const int shift = (int)(bit & 7);
    uint32_t word = p[0];
    if (shift + bits > 8) word |= (uint32_t)p[1] << 8;
    if (shift + bits > 16) word |= (uint32_t)p[2] << 16;
    return (word >> shift) & ((1u << bits) - 1);
}

/* Row r's outliers: their columns `at` and codes `code` [per_row] -> how many (fewer only for a
 * damaged index, which never reaches outside the row or the stream). Symbol j sits at bit j * width
 * of the stream, so each is one unaligned 8-byte load, independent of the one before: only the
 * column's running sum chains them (a bit reader refilled byte by byte cost ~10 ns per outlier,
 * 4x the inliers' whole kernel at 5% outliers). */
KERNEL_TARGET static int64_t FN(row_outliers)(const outlier_split_t *o, int64_t r, int64_t cols, int64_t *at,
                                              int32_t *code) {
    if (o->per_row == 0) return 0; /* the stream may hold no symbol at all */
    const int width = o->positions[0], bits = o->grid.bits;
    const uint32_t escape = (1u << width) - 1;
    const uint8_t *stream = o->positions + 1;
    const int64_t loadable = ((o->symbols * width) >> 3) - 8; /* a load from a byte up to here stays inside */
    const int64_t per_row = o->per_row, symbols = o->symbols; /* locals: the stores to `at` may alias `o` */
    const uint8_t *row = o->grid.codes + r * o->grid.row_bytes;
    int64_t column = -1, found = 0;
    for (int64_t j = o->offsets[r]; found < per_row && j < symbols; j++) {
        const int64_t bit = j * width;
        uint32_t s;
        if ((bit >> 3) <= loadable) {
            uint64_t word;
            memcpy(&word, stream + (bit >> 3), 8);
            s = (uint32_t)(word >> (bit & 7)) & escape;
        } else {
            s = FN(bits_at)(stream, bit, width);
        }
        column += s == escape ? (int64_t)escape : (int64_t)s + 1;
        if (column >= cols) break;
        at[found] = column; /* written always, kept only for an outlier: no branch on the symbol */
        code[found] = (int32_t)FN(bits_at)(row, bits * column, bits); /* its load overlaps the walk */
        found += s != escape;
    }
    return found;
}

/* Row r's outlier value and (the inliers' kernel's) inlier value, unless `inlier` is NULL, of each of
 * its `found` outliers. */
KERNEL_TARGET static void FN(outlier_values)(const outlier_split_t *o, int64_t r, int64_t found, const int64_t *at,
                                             const int32_t *code, float *outlier, float *inlier) {
    const int bits = o->grid.bits;
    const int32_t half = 1 << (bits - 1);
    const float low = half_to_float(o->low[r]), step = half_to_float(o->step[r]);
    const grid_t *g = &o->grid;
    int64_t group_end = 0; /* columns ascend: a group's scale and zero are read when its first outlier comes */
    float scale = 0.0f, zero = 0.0f, levels[16];
    if (o->table.levels != NULL)
        for (int i = 0; i < (1 << bits); i++) levels[i] = half_to_float(o->table.levels[(r << bits) + i]);
    for (int64_t i = 0; i < found; i++) {
        const float magnitude = low + step * (float)(code[i] & (half - 1));
        outlier[i] = magnitude * (float)(1 - 2 * (code[i] >> (bits - 1))); /* the sign: random, so no branch */
        if (inlier == NULL) continue;
        if (o->table.levels != NULL) {
            inlier[i] = levels[code[i]];
            continue;
        }
        if (at[i] >= group_end) {
            const int64_t group = at[i] / g->group_size;
            group_end = (group + 1) * g->group_size;
            scale = half_to_float(g->scales[r * g->groups + group]);
            zero = (float)FN(bits_at)(g->zeros, bits * (r * g->groups + group), bits);
        }
        inlier[i] = scale * ((float)code[i] - zero);
    }
}

KERNEL_TARGET void FN(outlier_matvec)(const io_t *io, const outlier_split_t *o, int64_t lo, int64_t hi) {
    int64_t *at = calloc(o->per_row + 1, sizeof(int64_t));
    int32_t *code = calloc(o->per_row + 1, sizeof(int32_t));
    float *outlier = malloc(sizeof(float) * (o->per_row + 1)), *inlier = malloc(sizeof(float) * (o->per_row + 1));
    if (SCRATCH_FAILED(io, at, code, outlier, inlier)) return;
    for (int64_t r = lo; r < hi; r++) {
        const int64_t found = FN(row_outliers)(o, r, io->cols, at, code);
        FN(outlier_values)(o, r, found, at, code, outlier, inlier);
        for (int64_t i = 0; i < found; i++) outlier[i] -= inlier[i];
        for (int64_t b = 0; b < io->batch; b++) {
            const float *x = io->x + b * io->cols;
            float delta[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* four chains: one would wait on each add */
            int64_t i = 0;
            for (; i + 4 <= found; i += 4)
                for (int k = 0; k < 4; k++) delta[k] += outlier[i + k] * x[at[i + k]];
            for (; i < found; i++) delta[0] += outlier[i] * x[at[i]];
            io->y[b * io->rows + r] += (delta[0] + delta[1]) + (delta[2] + delta[3]);
        }
    }
    free(at), free(code), free(outlier), free(inlier);
}

KERNEL_TARGET void FN(outlier_decode)(const io_t *io, const outlier_split_t *o, int64_t lo, int64_t hi) {
    int64_t *at = calloc(o->per_row + 1, sizeof(int64_t));
    int32_t *code = calloc(o->per_row + 1, sizeof(int32_t));
    float *outlier = malloc(sizeof(float) * (o->per_row + 1));
    if (SCRATCH_FAILED(io, at, code, outlier)) return;
    for (int64_t r = lo; r < hi; r++) {
        float *w = io->y + (r - io->row0) * io->cols;
        const int64_t found = FN(row_outliers)(o, r, io->cols, at, code);
        FN(outlier_values)(o, r, found, at, code, outlier, NULL); /* the decoded row needs no inlier values */
        for (int64_t i = 0; i < found; i++) w[at[i]] = outlier[i];
    }
    free(at), free(code), free(outlier);
}

/* ----------------------------------------------------------------------------------------------
 * Dense bf16 */

KERNEL_TARGET static void FN(bf16_matvec)(const io_t *io, const bf16_t *d, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols;
    float *w = malloc(sizeof(float) * cols);
    if (SCRATCH_FAILED(io, w)) return;
    for (int64_t r = lo; r < hi; r++) {
        const uint16_t *row = d->weight + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            const uint32_t bits = (uint32_t)row[c] << 16;
            memcpy(w + c, &bits, 4);
        }
        FN(row_dots)(io, w, r);
    }
    free(w);
}

/* ----------------------------------------------------------------------------------------------
 * Hadamard transform */

/* Unnormalised Walsh-Hadamard transform (Sylvester order) of v [n], n a power of two, in place. */
KERNEL_TARGET static void FN(fwht)(float *v, int64_t n) {
    for (int64_t h = 1; h < n; h *= 2)
        for (int64_t start = 0; start < n; start += 2 * h)
            for (int64_t i = start; i < start + h; i++) {
                const float a = v[i], b = v[i + h];
                v[i] = a + b;
                v[i + h] = a - b;
            }
}

KERNEL_TARGET static void FN(hadamard)(const io_t *io, const hadamard_t *h, int64_t lo, int64_t hi) {
    const int64_t n = h->n, K = h->K, p = n / K;
    const float norm = 1.0f / sqrtf((float)n);
    float *mixed = K > 1 ? malloc(sizeof(float) * n) : NULL;
    if (K > 1 && SCRATCH_FAILED(io, mixed)) return;
    for (int64_t r = lo; r < hi; r++) {
        float *y = io->y + r * n;
        const float *x = io->x + r * n;
        for (int64_t c = 0; c < n; c++) y[c] = h->pre ? x[c] * half_to_float(h->pre[c]) : x[c];
        for (int64_t j = 0; j < K; j++) FN(fwht)(y + j * p, p);
        if (K > 1) {
            memset(mixed, 0, sizeof(float) * n);
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < K; j++) {
                    const float s = h->hk[i * K + j];
                    float *out = mixed + i * p;
                    const float *in = y + j * p;
                    for (int64_t c = 0; c < p; c++) out[c] += s * in[c];
                }
            memcpy(y, mixed, sizeof(float) * n);
        }
        for (int64_t c = 0; c < n; c++) y[c] *= h->post ? norm * half_to_float(h->post[c]) : norm;
    }
    free(mixed);
}

const kernel_set_t KERNEL_SET = {
    .name = KERNEL_NAME,
    .grid_matvec = FN(grid_matvec),
    .grid_decode = FN(grid_decode),
    .lattice_matvec = FN(lattice_matvec),
    .lattice_decode = FN(lattice_decode),
    .trellis_matvec = FN(trellis_matvec),
    .trellis_decode = FN(trellis_decode),
    .table_matvec = FN(table_matvec),
    .table_decode = FN(table_decode),
    .outlier_matvec = FN(outlier_matvec),
    .outlier_decode = FN(outlier_decode),
    .bf16_matvec = FN(bf16_matvec),
    .hadamard = FN(hadamard),
};

#undef FN
