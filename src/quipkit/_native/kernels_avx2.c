/* The AVX2 + FMA decode kernels (Haswell / Zen 1 and newer: most laptops, and every x86 CPU without
 * AVX-512).
 *
 * The same scheme as the AVX-512 kernels, eight lanes wide and without k-masks or byte permutes
 * across 128-bit halves: each weight is decoded in registers and multiplied at once against up to
 * MAX_BATCH activation rows.
 *   grid     8 codes of b bits: one broadcast load, (b = 5-7: one in-lane byte shuffle,) one variable
 *            shift, one mask
 *   E8P      one code: its 8-float pattern row and its 7 sign bits' row of a 128 x 8 table of sign
 *            masks (coordinate 7's sign, which the parities decide, split between them), one xor;
 *            the +-1/4 shifts of 8 codes at a time enter as sums of x over each code's columns
 *   trellis  8 states of a tile row: one broadcast load of the row's 16 bytes, one in-lane shuffle,
 *            one variable shift, then the code (1MAD: multiply-add and two multiply-adds against
 *            ones for the byte sum; 3INST: multiply-add, mask and two fp16 halves)
 *   table    8 codes unpacked as for the grid, one permute into the row's 2^b levels (two and a
 *            blend for 16 levels)
 *   Hadamard butterflies of span 1, 2 and 4 inside a register, wider ones across registers (the
 *            AVX-512 tier's for blocks that are not whole 16-lane registers)
 * Everything else (HYB and LUT trellis codes, rows or groups not in 8-column chunks, ICQuant's
 * outlier corrections) runs the portable source compiled for AVX2 (kernels_avx2_auto).
 */
#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels_common.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE AVX2 static inline __attribute__((always_inline))

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Independent sums per activation row: one sum would be a chain of dependent FMAs (4 cycles each on
 * Zen 3 and most cores) that stalls a single-row kernel; a batch of rows has chains enough. */
#define CHAINS(NB) ((NB) == 1 ? 4 : (NB) == 2 ? 2 : 1) /* at most 4: arrays of chains are [.][4] */

INLINE __m256 sum_chains(const __m256 *chains, int count) {
    __m256 s = chains[0];
    for (int u = 1; u < count; u++) s = _mm256_add_ps(s, chains[u]);
    return s;
}

/* ----------------------------------------------------------------------------------------------
 * Integer grids */

/* Lane l of an 8-code chunk of b-bit values starts at bit l * b. For b <= 4 the chunk is one 32-bit
 * word broadcast to every lane; for b = 5-7 an in-lane shuffle gathers bytes [l b / 8, l b / 8 + 1]
 * of the 8-byte chunk into lane l; then the variable shift drops the bits below and the mask those
 * above. */
typedef struct {
    __m256i gather, shift, mask;
    int bits;
} unpacker_t;

INLINE unpacker_t unpacker(int bits) {
    uint8_t g[32];
    uint32_t s[8];
    for (int l = 0; l < 8; l++) {
        const int bit = l * bits, in_half = (l & 3) * 4;
        g[in_half + 16 * (l >> 2)] = (uint8_t)(bit >> 3);
        g[in_half + 16 * (l >> 2) + 1] = (uint8_t)((bit >> 3) + 1);
        g[in_half + 16 * (l >> 2) + 2] = g[in_half + 16 * (l >> 2) + 3] = 0x80; /* zero */
        s[l] = (uint32_t)(bits <= 4 ? bit : bit & 7);
    }
    return (unpacker_t){.gather = _mm256_loadu_si256((const __m256i *)g), .shift = _mm256_loadu_si256((const __m256i *)s),
                        .mask = _mm256_set1_epi32((1 << bits) - 1), .bits = bits};
}

/* The 8 codes of a chunk, given its (up to) 8 bytes as a little-endian word. */
INLINE __m256i unpack8_int(const unpacker_t *u, uint64_t word) {
    if (u->bits == 8) return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)word));
    const __m256i v = u->bits <= 4 ? _mm256_set1_epi32((int)(uint32_t)word)
                                   : _mm256_shuffle_epi8(_mm256_set1_epi64x((long long)word), u->gather);
    return _mm256_and_si256(_mm256_srlv_epi32(v, u->shift), u->mask);
}

/* The (up to) 8 bytes of a `length`-byte stream from `byte` on as a little-endian word; past the end
 * reads zeros. (No library call in here: one in the loop made the compiler keep every sum on the stack.) */
INLINE uint64_t stream_word(const uint8_t *stream, int64_t length, int64_t byte) {
    uint64_t word = 0;
    if (byte + 8 <= length) {
        memcpy(&word, stream + byte, 8);
        return word;
    }
    for (int64_t i = byte; i < length; i++) word |= (uint64_t)stream[i] << (8 * (i - byte));
    return word;
}

/* The bytes of the chunk at column `col` (a multiple of 8) of a packed row of `row_bytes` bytes. */
INLINE uint64_t chunk_word(const uint8_t *row, int64_t row_bytes, int64_t col, int bits) {
    return stream_word(row, row_bytes, (col * bits) >> 3);
}

/* x summed over each group of columns (gs of them, the last group shorter): sums [groups]. */
INLINE void group_sums(const float *x, int64_t cols, int64_t gs, int64_t groups, float *sums) {
    for (int64_t j = 0; j < groups; j++) {
        __m256 s = _mm256_setzero_ps();
        const int64_t end = (j + 1) * gs < cols ? (j + 1) * gs : cols;
        for (int64_t c = j * gs; c < end; c += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + c));
        sums[j] = hsum8(s);
    }
}

/* The 8 codes of a chunk of BITS <= 4 bits at p, its 4 bytes from p readable: one broadcast load. */
INLINE __m256i unpack8_at(const unpacker_t *u, const uint8_t *p) {
    int32_t word;
    memcpy(&word, p, 4);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), u->shift), u->mask);
}

/* The 8 zero points from global group index `index` on, of a b-bit stream of `length` bytes. */
INLINE __m256i zero_points8(const unpacker_t *u, const uint8_t *zeros, int64_t length, int64_t index) {
    const int64_t bit = index * u->bits;
    return unpack8_int(u, stream_word(zeros, length, bit >> 3) >> (bit & 7));
}

/* Row r's group scales as floats into scales [groups]; returns the row's zero-point term
 * sum_j scale_j zero_j xsum_j, eight groups per step (per group, the scalar fp16 conversion and
 * bit-stream read cost as much as decoding 32 weights). */
INLINE float row_scales(const grid_t *g, const unpacker_t *u, int64_t rows, int64_t r, int64_t groups,
                        const float *xsum, float *scales) {
    const int64_t first = r * groups, length = (rows * groups * u->bits + 7) / 8;
    __m256 offset = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= groups; j += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g->scales + first + j)));
        const __m256 z = _mm256_cvtepi32_ps(zero_points8(u, g->zeros, length, first + j));
        _mm256_storeu_ps(scales + j, s);
        offset = _mm256_fmadd_ps(_mm256_mul_ps(s, z), _mm256_loadu_ps(xsum + j), offset);
    }
    float tail = 0.0f;
    for (; j < groups; j++) {
        scales[j] = _cvtsh_ss(g->scales[first + j]);
        tail += scales[j] * (float)grid_zero_point(g, first + j) * xsum[j];
    }
    return hsum8(offset) + tail;
}

/* One activation row (decoding), BITS a constant (0: any other width): four sums in named variables,
 * which the compiler keeps in registers (as an array indexed in loops they lived on the stack, loaded
 * and stored on every FMA). Chunks that start below `safe` columns are read in place. */
INLINE void grid_rows_single(const io_t *io, const grid_t *g, int64_t lo, int64_t hi, int64_t b0, const int BITS) {
    const int64_t cols = io->cols, gs = g->scales ? g->group_size : cols;
    const int64_t groups = (cols + gs - 1) / gs;
    const int bits = BITS ? BITS : g->bits;
    const unpacker_t u = unpacker(bits);
    const int64_t safe = g->row_bytes >= 8 ? (g->row_bytes - 8) * 8 / bits + 1 : 0;
    const float *x = io->x + b0 * cols;
    float xsum[groups], scales[groups], uniform_offset = 0.0f;
    group_sums(x, cols, gs, groups, xsum);
    if (!g->scales) { /* one scale and zero for the whole matrix */
        for (int64_t j = 0; j < groups; j++) scales[j] = g->scale, uniform_offset += g->scale * g->zero * xsum[j];
    }
#define GRID_FAST(c) _mm256_cvtepi32_ps(                                                              \
        BITS == 8 ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + (c))))                   \
        : BITS && BITS <= 4 ? unpack8_at(&u, row + (((c) * BITS) >> 3))                                  \
                            : unpack8_int(&u, chunk_word(row, g->row_bytes, (c), bits)))
#define GRID_CHUNK(c) _mm256_cvtepi32_ps(unpack8_int(&u, chunk_word(row, g->row_bytes, (c), bits)))
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = g->codes + r * g->row_bytes;
        __m256 acc = _mm256_setzero_ps();
        const float offset = g->scales ? row_scales(g, &u, io->rows, r, groups, xsum, scales) : uniform_offset;
        for (int64_t j = 0; j < groups; j++) {
            __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
            const int64_t end = (j + 1) * gs < cols ? (j + 1) * gs : cols;
            int64_t col = j * gs;
            for (; col + 32 <= end && col + 24 < safe; col += 32) {
                p0 = _mm256_fmadd_ps(GRID_FAST(col), _mm256_loadu_ps(x + col), p0);
                p1 = _mm256_fmadd_ps(GRID_FAST(col + 8), _mm256_loadu_ps(x + col + 8), p1);
                p2 = _mm256_fmadd_ps(GRID_FAST(col + 16), _mm256_loadu_ps(x + col + 16), p2);
                p3 = _mm256_fmadd_ps(GRID_FAST(col + 24), _mm256_loadu_ps(x + col + 24), p3);
            }
            for (; col < end; col += 8) p0 = _mm256_fmadd_ps(GRID_CHUNK(col), _mm256_loadu_ps(x + col), p0);
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(scales + j), _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3)),
                                  acc);
        }
        io->y[b0 * io->rows + r] = hsum8(acc) - offset;
    }
#undef GRID_FAST
#undef GRID_CHUNK
}

/* A batch of activation rows: each decoded chunk feeds every row's sum. */
INLINE void grid_rows(const io_t *io, const grid_t *g, int64_t lo, int64_t hi, int64_t b0, const int NB) {
    if (NB == 1) {
        switch (g->bits) {
        case 2: grid_rows_single(io, g, lo, hi, b0, 2); break;
        case 3: grid_rows_single(io, g, lo, hi, b0, 3); break;
        case 4: grid_rows_single(io, g, lo, hi, b0, 4); break;
        case 8: grid_rows_single(io, g, lo, hi, b0, 8); break;
        default: grid_rows_single(io, g, lo, hi, b0, 0); break;
        }
        return;
    }
    const int64_t cols = io->cols, gs = g->scales ? g->group_size : cols;
    const int64_t groups = (cols + gs - 1) / gs;
    const unpacker_t u = unpacker(g->bits);
    const float *x[MAX_BATCH];
    #pragma GCC unroll 8
    for (int b = 0; b < NB; b++) x[b] = io->x + (b0 + b) * cols;
    float xsum[MAX_BATCH * groups];
    for (int b = 0; b < NB; b++) group_sums(x[b], cols, gs, groups, xsum + b * groups);
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = g->codes + r * g->row_bytes;
        __m256 acc[MAX_BATCH];
        float offset[MAX_BATCH];
        #pragma GCC unroll 8
        for (int b = 0; b < NB; b++) acc[b] = _mm256_setzero_ps(), offset[b] = 0.0f;
        for (int64_t j = 0; j < groups; j++) {
            __m256 part[MAX_BATCH];
            #pragma GCC unroll 8
            for (int b = 0; b < NB; b++) part[b] = _mm256_setzero_ps();
            const int64_t end = (j + 1) * gs < cols ? (j + 1) * gs : cols;
            for (int64_t col = j * gs; col < end; col += 8) {
                const __m256 q = _mm256_cvtepi32_ps(unpack8_int(&u, chunk_word(row, g->row_bytes, col, g->bits)));
                #pragma GCC unroll 8
                for (int b = 0; b < NB; b++) part[b] = _mm256_fmadd_ps(q, _mm256_loadu_ps(x[b] + col), part[b]);
            }
            const float scale = g->scales ? _cvtsh_ss(g->scales[r * groups + j]) : g->scale;
            const float zero = g->scales ? (float)grid_zero_point(g, r * groups + j) : g->zero;
            #pragma GCC unroll 8
            for (int b = 0; b < NB; b++) {
                acc[b] = _mm256_fmadd_ps(_mm256_set1_ps(scale), part[b], acc[b]);
                offset[b] += scale * zero * xsum[b * groups + j];
            }
        }
        #pragma GCC unroll 8
        for (int b = 0; b < NB; b++) io->y[(b0 + b) * io->rows + r] = hsum8(acc[b]) - offset[b];
    }
}

/* Rows and groups must come in whole 8-column chunks (the last group may be shorter). */
static int grid_fits(const grid_t *g, int64_t cols) {
    return cols % 8 == 0 && (g->scales == NULL || g->group_size % 8 == 0);
}

AVX2 static void grid_matvec(const io_t *io, const grid_t *g, int64_t lo, int64_t hi) {
    if (!grid_fits(g, io->cols)) {
        kernels_avx2_auto.grid_matvec(io, g, lo, hi);
        return;
    }
    BATCH_CHUNKS(grid_rows, g)
}

AVX2 static void grid_decode(const io_t *io, const grid_t *g, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols;
    if (!grid_fits(g, cols)) {
        kernels_avx2_auto.grid_decode(io, g, lo, hi);
        return;
    }
    const int64_t gs = g->scales ? g->group_size : cols, groups = (cols + gs - 1) / gs;
    const unpacker_t u = unpacker(g->bits);
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = g->codes + r * g->row_bytes;
        float *w = io->y + (r - io->row0) * cols;
        for (int64_t j = 0; j < groups; j++) {
            const float scale = g->scales ? _cvtsh_ss(g->scales[r * groups + j]) : g->scale;
            const float zero = g->scales ? (float)grid_zero_point(g, r * groups + j) : g->zero;
            const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
            const int64_t end = (j + 1) * gs < cols ? (j + 1) * gs : cols;
            for (int64_t col = j * gs; col < end; col += 8) {
                const __m256 q = _mm256_cvtepi32_ps(unpack8_int(&u, chunk_word(row, g->row_bytes, col, g->bits)));
                _mm256_storeu_ps(w + col, _mm256_mul_ps(s, _mm256_sub_ps(q, z)));
            }
        }
    }
}

/* ----------------------------------------------------------------------------------------------
 * Per-row tables: 8 levels sit in one register, 16 in two */

typedef struct {
    __m256 low, high;
} levels_t;

INLINE levels_t table_levels(const table_t *t, int64_t r) {
    uint16_t h[16] = {0};
    memcpy(h, t->levels + (r << t->bits), sizeof(uint16_t) << t->bits);
    return (levels_t){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)),
                      _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8)))};
}

INLINE __m256 table_lookup(const levels_t *lv, __m256i q, int bits) {
    const __m256 low = _mm256_permutevar8x32_ps(lv->low, q);
    if (bits < 4) return low;
    const __m256 high = _mm256_permutevar8x32_ps(lv->high, q); /* uses q mod 8 */
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28))); /* q >= 8 */
}

INLINE void table_rows(const io_t *io, const table_t *t, int64_t lo, int64_t hi, int64_t b0, const int NB) {
    const int64_t cols = io->cols;
    const unpacker_t u = unpacker(t->bits);
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = t->codes + r * t->row_bytes;
        const levels_t lv = table_levels(t, r);
        __m256 acc[MAX_BATCH][4];
        #pragma GCC unroll 8
        for (int b = 0; b < NB; b++)
            for (int v = 0; v < CHAINS(NB); v++) acc[b][v] = _mm256_setzero_ps();
        for (int64_t col0 = 0; col0 < cols; col0 += 8 * CHAINS(NB))
            for (int v = 0; v < CHAINS(NB); v++) {
                const int64_t col = col0 + 8 * v;
                if (col >= cols) break;
                const __m256 w = table_lookup(&lv, unpack8_int(&u, chunk_word(row, t->row_bytes, col, t->bits)), t->bits);
                #pragma GCC unroll 8
                for (int b = 0; b < NB; b++)
                    acc[b][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(io->x + (b0 + b) * cols + col), acc[b][v]);
            }
        #pragma GCC unroll 8
        for (int b = 0; b < NB; b++) io->y[(b0 + b) * io->rows + r] = hsum8(sum_chains(acc[b], CHAINS(NB)));
    }
}

AVX2 static void table_matvec(const io_t *io, const table_t *t, int64_t lo, int64_t hi) {
    if (io->cols % 8 != 0) {
        kernels_avx2_auto.table_matvec(io, t, lo, hi);
        return;
    }
    BATCH_CHUNKS(table_rows, t)
}

AVX2 static void table_decode(const io_t *io, const table_t *t, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols;
    if (cols % 8 != 0) {
        kernels_avx2_auto.table_decode(io, t, lo, hi);
        return;
    }
    const unpacker_t u = unpacker(t->bits);
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = t->codes + r * t->row_bytes;
        const levels_t lv = table_levels(t, r);
        float *w = io->y + (r - io->row0) * cols;
        for (int64_t col = 0; col < cols; col += 8)
            _mm256_storeu_ps(w + col, table_lookup(&lv, unpack8_int(&u, chunk_word(row, t->row_bytes, col, t->bits)), t->bits));
    }
}

/* ----------------------------------------------------------------------------------------------
 * E8P and residual lattice codes */

/* Row s of sign_masks (s: a code's 7 sign bits) flips coordinate i < 7 of a pattern iff bit i of s is set,
 * and coordinate 7 iff s has odd parity (-0.0f's bits). */
#define SIGN_(s, i) ((((s) >> (i)) & 1u) << 31)
#define PARITY_(s) ((((s) ^ ((s) >> 1) ^ ((s) >> 2) ^ ((s) >> 3) ^ ((s) >> 4) ^ ((s) >> 5) ^ ((s) >> 6)) & 1u) << 31)
#define SIGNS_1(s) {SIGN_(s, 0), SIGN_(s, 1), SIGN_(s, 2), SIGN_(s, 3), SIGN_(s, 4), SIGN_(s, 5), SIGN_(s, 6), PARITY_(s)}
#define SIGNS_4(s) SIGNS_1(s), SIGNS_1(s + 1), SIGNS_1(s + 2), SIGNS_1(s + 3)
#define SIGNS_16(s) SIGNS_4(s), SIGNS_4(s + 4), SIGNS_4(s + 8), SIGNS_4(s + 12)
#define SIGNS_64(s) SIGNS_16(s), SIGNS_16(s + 16), SIGNS_16(s + 32), SIGNS_16(s + 48)
static const uint32_t sign_masks[128][8] __attribute__((aligned(32))) = {SIGNS_64(0u), SIGNS_64(64u)};

/* One code's 8 weights without its +-1/4 shift. Coordinate 7's sign makes the sum even: it is the
 * pattern's parity xor that of the 7 sign bits. Rows 0-255 of the signed table have coordinate 7
 * negated iff the pattern's parity is odd, and the sign mask flips it iff the signs' parity is odd. */
INLINE __m256 e8p_point(const float *table, uint32_t code) {
    const float *row = table + 8 * (code & 0xFF);
    return _mm256_xor_ps(_mm256_loadu_ps(row), _mm256_load_ps((const float *)sign_masks[(code >> 8) & 0x7F]));
}

/* up += the group sums of those of 8 codes (from codes[0]) that carry the +1/4 shift (bit 15). */
INLINE __m256 e8p_shifts(__m256 up, const uint16_t *codes, const float *group_sums) {
    const __m256i shifted = _mm256_srai_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)codes)), 31);
    return _mm256_add_ps(up, _mm256_and_ps(_mm256_castsi256_ps(shifted), _mm256_loadu_ps(group_sums)));
}

INLINE float e8p_shift_tail(const uint16_t *codes, const float *group_sums, int64_t from, int64_t to) {
    float s = 0.0f;
    for (int64_t g = from; g < to; g++) s += (codes[g] >> 15) ? group_sums[g] : 0.0f;
    return s;
}

/* lattice_rows' step: code g into chain `chain` of each activation row's sums */
#define LATTICE_CODE(g, chain)                                                                        \
    do {                                                                                              \
        const __m256 w = e8p_point(table, codes[g]);                                                  \
        __m256 w2 = _mm256_setzero_ps();                                                              \
        if (second == 2) w2 = e8p_point(table, codes2[g]);                                            \
        if (second == 1) w2 = _mm256_loadu_ps(l->second_table + 8 * bytes2[g]);                       \
        _Pragma("GCC unroll 8") for (int b = 0; b < NB; b++) {                                        \
            const __m256 xv = _mm256_loadu_ps(x[b] + 8 * (g));                                        \
            acc[b][chain] = _mm256_fmadd_ps(w, xv, acc[b][chain]);                                    \
            if (second) acc2[b] = _mm256_fmadd_ps(w2, xv, acc2[b]);                                   \
        }                                                                                             \
    } while (0)

INLINE void lattice_rows(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi, int64_t b0, const int NB,
                         const int second) {
    const int64_t cols = io->cols, groups = cols / 8, whole = groups - groups % 8;
    const float *x[MAX_BATCH];
    float *group_sums = malloc(sizeof(float) * (size_t)(NB * groups));
    if (SCRATCH_FAILED(io, group_sums)) return;
    float xsum[MAX_BATCH];
    #pragma GCC unroll 8
    for (int b = 0; b < NB; b++) {
        x[b] = io->x + (b0 + b) * cols;
        xsum[b] = e8p_group_sums(x[b], groups, group_sums + b * groups);
    }
    const float *table = l->signed_patterns;
    for (int64_t r = lo; r < hi; r++) {
        const uint16_t *codes = (const uint16_t *)l->codes + r * groups;
        const uint16_t *codes2 = second == 2 ? (const uint16_t *)l->codes2 + r * groups : NULL;
        const uint8_t *bytes2 = second == 1 ? (const uint8_t *)l->codes2 + r * groups : NULL;
        __m256 acc[MAX_BATCH][4], acc2[MAX_BATCH], up[MAX_BATCH], up2[MAX_BATCH];
        #pragma GCC unroll 8
        for (int b = 0; b < NB; b++) {
            for (int v = 0; v < CHAINS(NB); v++) acc[b][v] = _mm256_setzero_ps();
            acc2[b] = up[b] = up2[b] = _mm256_setzero_ps();
        }
        /* whole blocks of 8 codes without a bound check per code, then the last few */
        for (int64_t g0 = 0; g0 < whole; g0 += 8) {
            #pragma GCC unroll 8
            for (int b = 0; b < NB; b++) {
                up[b] = e8p_shifts(up[b], codes + g0, group_sums + b * groups + g0);
                if (second == 2) up2[b] = e8p_shifts(up2[b], codes2 + g0, group_sums + b * groups + g0);
            }
            #pragma GCC unroll 8
            for (int v = 0; v < 8; v++) LATTICE_CODE(g0 + v, v % CHAINS(NB));
        }
        for (int64_t g = whole; g < groups; g++) LATTICE_CODE(g, 0);
        #pragma GCC unroll 8
        for (int b = 0; b < NB; b++) {
            const float *sums = group_sums + b * groups;
            const float shifts = hsum8(up[b]) + e8p_shift_tail(codes, sums, whole, groups);
            float y = hsum8(sum_chains(acc[b], CHAINS(NB))) + 0.5f * shifts - 0.25f * xsum[b];
            if (second == 1) y += l->inv_residual * hsum8(acc2[b]);
            if (second == 2) {
                const float shifts2 = hsum8(up2[b]) + e8p_shift_tail(codes2, sums, whole, groups);
                y += l->inv_residual * (hsum8(acc2[b]) + 0.5f * shifts2 - 0.25f * xsum[b]);
            }
            io->y[(b0 + b) * io->rows + r] = y;
        }
    }
    free(group_sums);
}

#undef LATTICE_CODE

AVX2 static void lattice_matvec(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi) {
    if (l->second == 0) {
        BATCH_CHUNKS(lattice_rows, l, 0)
    } else if (l->second == 1) {
        BATCH_CHUNKS(lattice_rows, l, 1)
    } else {
        BATCH_CHUNKS(lattice_rows, l, 2)
    }
}

/* One code's 8 weights as stored (with its shift). */
INLINE __m256 e8p_point_shifted(const float *table, uint32_t code) {
    return _mm256_add_ps(e8p_point(table, code), _mm256_set1_ps((code >> 15) & 1 ? 0.25f : -0.25f));
}

AVX2 static void lattice_decode(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols, groups = cols / 8;
    const __m256 inv = _mm256_set1_ps(l->inv_residual);
    for (int64_t r = lo; r < hi; r++) {
        float *w = io->y + (r - io->row0) * cols;
        const uint16_t *codes = (const uint16_t *)l->codes + r * groups;
        const uint16_t *codes2 = l->second == 2 ? (const uint16_t *)l->codes2 + r * groups : NULL;
        const uint8_t *bytes2 = l->second == 1 ? (const uint8_t *)l->codes2 + r * groups : NULL;
        for (int64_t g = 0; g < groups; g++) {
            __m256 v = e8p_point_shifted(l->signed_patterns, codes[g]);
            if (l->second == 2)
                v = _mm256_fmadd_ps(e8p_point_shifted(l->signed_patterns, codes2[g]), inv, v);
            else if (l->second == 1)
                v = _mm256_fmadd_ps(_mm256_loadu_ps(l->second_table + 8 * bytes2[g]), inv, v);
            _mm256_storeu_ps(w + 8 * g, v);
        }
    }
}

/* ----------------------------------------------------------------------------------------------
 * Bitshift trellis (V = 1, computed codes) */

/* Step t of tile row rr (t = 16 rr + l) reads the L-bit window at bit (255 - t) k of the tile, which
 * is (15 - l) k bits above the row's base (240 - 16 rr) k, a whole byte: the row's 16 states lie in
 * the 16 bytes from there (15 k + L <= 76 bits for k <= 4, L <= 16). Lanes 0-7 and 8-15 each gather
 * their 4 bytes with an in-lane shuffle of those 16 bytes broadcast to both halves. */
typedef struct {
    __m256i gather[2], shift[2], mask;
} window_t;

INLINE window_t window_constants(int k, int L) {
    window_t w;
    for (int half = 0; half < 2; half++) {
        uint8_t g[32];
        uint32_t s[8];
        for (int i = 0; i < 8; i++) {
            const int bit = (15 - (8 * half + i)) * k;
            for (int j = 0; j < 4; j++) g[16 * (i >> 2) + 4 * (i & 3) + j] = (uint8_t)((bit >> 3) + j);
            s[i] = (uint32_t)(bit & 7);
        }
        w.gather[half] = _mm256_loadu_si256((const __m256i *)g);
        w.shift[half] = _mm256_loadu_si256((const __m256i *)s);
    }
    w.mask = _mm256_set1_epi32((1 << L) - 1);
    return w;
}

/* Code values of 8 states (half 0: columns 0-7 of the tile row, 1: 8-15) before their scale:
 * value = (raw - offset) * scale. `bytes`: the row's 16 bytes in both halves. */
INLINE __m256 trellis_row8(__m256i bytes, int half, int code, uint32_t increment, const window_t *win) {
    const __m256i s = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, win->gather[half]), win->shift[half]),
                                       win->mask);
    if (code == CODE_1MAD) { /* the byte sum of s * a + increment */
        const __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(ONE_MAD_MULTIPLIER)),
                                           _mm256_set1_epi32((int)increment));
        const __m256i pairs = _mm256_maddubs_epi16(x, _mm256_set1_epi8(1));
        return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    }
    __m256i x = _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(89226354)), _mm256_set1_epi32(64248484));
    x = _mm256_xor_si256(_mm256_and_si256(x, _mm256_set1_epi32((int)0x8FFF8FFFu)), _mm256_set1_epi32(0x3B603B60));
    /* low halves to bytes 0-7 and high halves to bytes 8-15 of each 128-bit lane, then lanes joined */
    const __m256i split = _mm256_shuffle_epi8(x, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                                                 0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
    const __m256i joined = _mm256_permute4x64_epi64(split, 0xD8); /* [low 0-3, low 4-7, high 0-3, high 4-7] */
    return _mm256_add_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(joined)), _mm256_cvtph_ps(_mm256_extracti128_si256(joined, 1)));
}

/* Where each tile row's 16 window bytes come from. The first rows' windows run past the tile's end
 * and wrap around to its start: those take bytes from the tile's last 16 (`from_tail`) and first 16
 * (`from_head`) with two shuffles (building them in memory stalled on store forwarding). */
typedef struct {
    int wraps[16];
    __m128i from_tail[16], from_head[16];
} windows_t;

INLINE void window_sources(int k, windows_t *w) {
    const int bytes = 32 * k;
    for (int rr = 0; rr < 16; rr++) {
        const int base = (30 - 2 * rr) * k;
        w->wraps[rr] = base + 16 > bytes;
        uint8_t tail[16], head[16];
        for (int i = 0; i < 16; i++) {
            const int at = base + i;
            tail[i] = at < bytes ? (uint8_t)(at - (bytes - 16)) : 0x80;
            head[i] = at < bytes ? 0x80 : (uint8_t)(at - bytes);
        }
        w->from_tail[rr] = _mm_loadu_si128((const __m128i *)tail);
        w->from_head[rr] = _mm_loadu_si128((const __m128i *)head);
    }
}

/* The 16 bytes of tile row rr's window, in both 128-bit halves. */
INLINE __m256i trellis_row_bytes(const uint8_t *tile, int rr, int k, const windows_t *w) {
    const int base = (30 - 2 * rr) * k, bytes = 32 * k;
    __m128i v;
    if (!w->wraps[rr])
        v = _mm_loadu_si128((const __m128i *)(tile + base));
    else
        v = _mm_or_si128(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(tile + bytes - 16)), w->from_tail[rr]),
                         _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)tile), w->from_head[rr]));
    return _mm256_broadcastsi128_si256(v);
}

/* One tile row at a time across the whole strip of tiles: two sums per activation row (four for a
 * single row: even and odd tiles) stay in registers, and the strip's codes (32 k bytes per tile)
 * stay in cache for the 16 passes. */
INLINE void trellis_rows(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi, int64_t b0, const int NB,
                         const int code) {
    const int64_t cols = io->cols, tiles_n = cols / 16;
    const int k = t->k, bytes = 32 * k;
    const window_t win = window_constants(k, t->L);
    windows_t sources;
    window_sources(k, &sources);
    const float scale = code_scale(code), offset = code_offset(code);
    float xsum[MAX_BATCH];
    #pragma GCC unroll 8
    for (int b = 0; b < NB; b++) {
        __m256 s = _mm256_setzero_ps();
        for (int64_t c = 0; c < cols; c += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(io->x + (b0 + b) * cols + c));
        xsum[b] = hsum8(s);
    }
    for (int64_t i = lo / 16; i < hi / 16; i++) {
        const uint8_t *strip = t->codes + i * tiles_n * bytes;
        for (int rr = 0; rr < 16; rr++) {
            const int sets = NB == 1 ? 2 : 1;
            __m256 acc[MAX_BATCH][4];
            #pragma GCC unroll 8
            for (int b = 0; b < NB; b++)
                #pragma GCC unroll 8
                for (int v = 0; v < 4; v++) acc[b][v] = _mm256_setzero_ps();
            for (int64_t j0 = 0; j0 < tiles_n; j0 += sets)
                #pragma GCC unroll 8
                for (int v = 0; v < sets; v++) {
                    const int64_t j = j0 + v;
                    if (j >= tiles_n) break;
                    const __m256i row = trellis_row_bytes(strip + j * bytes, rr, k, &sources);
                    const __m256 w0 = trellis_row8(row, 0, code, t->increment, &win),
                                 w1 = trellis_row8(row, 1, code, t->increment, &win);
                    #pragma GCC unroll 8
                    for (int b = 0; b < NB; b++) {
                        const float *x = io->x + (b0 + b) * cols + 16 * j;
                        acc[b][2 * v] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[b][2 * v]);
                        acc[b][2 * v + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), acc[b][2 * v + 1]);
                    }
                }
            #pragma GCC unroll 8
            for (int b = 0; b < NB; b++)
                io->y[(b0 + b) * io->rows + 16 * i + rr] = scale * (hsum8(sum_chains(acc[b], 4)) - offset * xsum[b]);
        }
    }
}

/* Computed codes with one value per state, k <= 4 and L <= 16 (the 16-byte window above). */
static int trellis_fits(const trellis_layer_t *t) {
    return t->V == 1 && (t->code == CODE_1MAD || t->code == CODE_3INST) && t->k <= 4 && t->L <= 16;
}

AVX2 static void trellis_matvec(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi) {
    if (!trellis_fits(t)) {
        kernels_avx2_auto.trellis_matvec(io, t, lo, hi);
        return;
    }
    for (int64_t b0 = 0; b0 < io->batch; b0 += 4) {
        if (t->code == CODE_1MAD) {
            TRELLIS_CASES(trellis_rows, CODE_1MAD)
        } else {
            TRELLIS_CASES(trellis_rows, CODE_3INST)
        }
    }
}

AVX2 static void trellis_decode(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi) {
    if (!trellis_fits(t)) {
        kernels_avx2_auto.trellis_decode(io, t, lo, hi);
        return;
    }
    const int64_t cols = io->cols, tiles_n = cols / 16;
    const int k = t->k, bytes = 32 * k;
    const window_t win = window_constants(k, t->L);
    windows_t sources;
    window_sources(k, &sources);
    const __m256 scale = _mm256_set1_ps(code_scale(t->code)), offset = _mm256_set1_ps(code_offset(t->code));
    for (int64_t i = lo / 16; i < hi / 16; i++)
        for (int64_t j = 0; j < tiles_n; j++) {
            const uint8_t *tile = t->codes + (i * tiles_n + j) * bytes;
            for (int rr = 0; rr < 16; rr++) {
                float *out = io->y + (16 * i + rr - io->row0) * cols + 16 * j;
                const __m256i row = trellis_row_bytes(tile, rr, k, &sources);
                for (int half = 0; half < 2; half++) {
                    const __m256 raw = t->code == CODE_1MAD ? trellis_row8(row, half, CODE_1MAD, t->increment, &win)
                                                            : trellis_row8(row, half, CODE_3INST, 0, &win);
                    _mm256_storeu_ps(out + 8 * half, _mm256_mul_ps(_mm256_sub_ps(raw, offset), scale));
                }
            }
        }
}

/* ----------------------------------------------------------------------------------------------
 * Dense bf16: four rows at a time share each load of x */

INLINE __m256 bf16_load(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

INLINE float bf16_tail(const uint16_t *w, const float *x, int64_t from, int64_t to) {
    float s = 0.0f;
    for (int64_t c = from; c < to; c++) {
        const uint32_t bits = (uint32_t)w[c] << 16;
        float f;
        memcpy(&f, &bits, 4);
        s += f * x[c];
    }
    return s;
}

AVX2 static void bf16_matvec(const io_t *io, const bf16_t *d, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols, whole = cols - cols % 8;
    for (int64_t b = 0; b < io->batch; b++) {
        const float *x = io->x + b * cols;
        int64_t r = lo;
        for (; r + 4 <= hi; r += 4) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t c = 0; c < whole; c += 8) {
                const __m256 xv = _mm256_loadu_ps(x + c);
                for (int i = 0; i < 4; i++) acc[i] = _mm256_fmadd_ps(bf16_load(d->weight + (r + i) * cols + c), xv, acc[i]);
            }
            for (int i = 0; i < 4; i++)
                io->y[b * io->rows + r + i] = hsum8(acc[i]) + bf16_tail(d->weight + (r + i) * cols, x, whole, cols);
        }
        for (; r < hi; r++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t c = 0; c < whole; c += 8) acc = _mm256_fmadd_ps(bf16_load(d->weight + r * cols + c), _mm256_loadu_ps(x + c), acc);
            io->y[b * io->rows + r] = hsum8(acc) + bf16_tail(d->weight + r * cols, x, whole, cols);
        }
    }
}

/* ----------------------------------------------------------------------------------------------
 * Hadamard transform: butterflies of span 1, 2 and 4 inside an 8-lane register, wider ones across */

INLINE __m256 butterfly_in_register(__m256 v, __m256 other, int upper_lanes) {
    return _mm256_blend_ps(_mm256_add_ps(v, other), _mm256_sub_ps(other, v), upper_lanes);
}

AVX2 static void fwht8(float *v, int64_t n) {
    for (int64_t c = 0; c < n; c += 8) {
        __m256 x = _mm256_loadu_ps(v + c);
        x = butterfly_in_register(x, _mm256_permute_ps(x, 0xB1), 0xAA);                 /* span 1 */
        x = butterfly_in_register(x, _mm256_permute_ps(x, 0x4E), 0xCC);                 /* span 2 */
        x = butterfly_in_register(x, _mm256_permute2f128_ps(x, x, 0x01), 0xF0);          /* span 4 */
        _mm256_storeu_ps(v + c, x);
    }
    for (int64_t h = 8; h < n; h *= 2)
        for (int64_t start = 0; start < n; start += 2 * h)
            for (int64_t i = start; i < start + h; i += 8) {
                const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + i + h);
                _mm256_storeu_ps(v + i, _mm256_add_ps(a, b));
                _mm256_storeu_ps(v + i + h, _mm256_sub_ps(a, b));
            }
}

INLINE __m256 half8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* mixed [K, p] = M [K, K] @ y [K, p] (K a multiple of 4: every Hadamard order above 2; p a multiple
 * of 8). Four rows of M times 16 columns at a time: eight independent sums, as many as two FMA units
 * with a 4-cycle latency keep busy (four left half of them idle: the 344 x 344 mix of an 11008-wide
 * row took 1.8x longer). */
AVX2 static void mix_blocks(const float *y, float *mixed, const float *m, int64_t K, int64_t p) {
    int64_t c = 0;
    for (; c + 16 <= p; c += 16)
        for (int64_t i = 0; i < K; i += 4) {
            __m256 acc[4][2];
            for (int q = 0; q < 4; q++) acc[q][0] = acc[q][1] = _mm256_setzero_ps();
            for (int64_t j = 0; j < K; j++) {
                const __m256 v0 = _mm256_loadu_ps(y + j * p + c), v1 = _mm256_loadu_ps(y + j * p + c + 8);
                for (int q = 0; q < 4; q++) {
                    const __m256 e = _mm256_set1_ps(m[(i + q) * K + j]);
                    acc[q][0] = _mm256_fmadd_ps(e, v0, acc[q][0]);
                    acc[q][1] = _mm256_fmadd_ps(e, v1, acc[q][1]);
                }
            }
            for (int q = 0; q < 4; q++) {
                _mm256_storeu_ps(mixed + (i + q) * p + c, acc[q][0]);
                _mm256_storeu_ps(mixed + (i + q) * p + c + 8, acc[q][1]);
            }
        }
    for (; c < p; c += 8) /* the last 8 columns when p is an odd multiple of 8 */
        for (int64_t i = 0; i < K; i++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t j = 0; j < K; j++) acc = _mm256_fmadd_ps(_mm256_set1_ps(m[i * K + j]), _mm256_loadu_ps(y + j * p + c), acc);
            _mm256_storeu_ps(mixed + i * p + c, acc);
        }
}

AVX2 void hadamard_avx2(const io_t *io, const hadamard_t *h, int64_t lo, int64_t hi) {
    const int64_t n = h->n, K = h->K, p = n / K;
    if (p % 8 || (K > 1 && K % 4)) {
        kernels_avx2_auto.hadamard(io, h, lo, hi);
        return;
    }
    const __m256 norm = _mm256_set1_ps(1.0f / sqrtf((float)n));
    float *mixed = K > 1 ? malloc(sizeof(float) * n) : NULL;
    if (K > 1 && SCRATCH_FAILED(io, mixed)) return;
    for (int64_t r = lo; r < hi; r++) {
        float *y = io->y + r * n;
        const float *x = io->x + r * n;
        for (int64_t c = 0; c < n; c += 8) {
            __m256 v = _mm256_loadu_ps(x + c);
            if (h->pre) v = _mm256_mul_ps(v, half8(h->pre + c));
            _mm256_storeu_ps(y + c, v);
        }
        for (int64_t j = 0; j < K; j++) fwht8(y + j * p, p);
        const float *src = y;
        if (K > 1) {
            mix_blocks(y, mixed, h->hk, K, p);
            src = mixed;
        }
        for (int64_t c = 0; c < n; c += 8) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + c), norm);
            if (h->post) v = _mm256_mul_ps(v, half8(h->post + c));
            _mm256_storeu_ps(y + c, v);
        }
    }
    free(mixed);
}

const kernel_set_t kernels_avx2 = {
    .name = "avx2",
    .grid_matvec = grid_matvec,
    .grid_decode = grid_decode,
    .lattice_matvec = lattice_matvec,
    .lattice_decode = lattice_decode,
    .trellis_matvec = trellis_matvec,
    .trellis_decode = trellis_decode,
    .table_matvec = table_matvec,
    .table_decode = table_decode,
    .outlier_matvec = outlier_matvec_avx2_auto,
    .outlier_decode = outlier_decode_avx2_auto,
    .bf16_matvec = bf16_matvec,
    .hadamard = hadamard_avx2,
};
#endif
