/* The AVX-512 decode kernels (Ice Lake / Zen 4 and newer: F, BW, DQ, VL, VBMI, VNNI, VPOPCNTDQ, BITALG).
 *
 * Each weight is decoded in registers, 16 at a time, and multiplied at once against up to MAX_BATCH
 * activation rows, so a weight is read and decoded once per call:
 *   grid     16 codes of b bits: one masked load, one byte permute, one variable shift
 *   E8P      a pair of codes: two 8-float pattern loads and a sign flip under a k-mask; rows,
 *            signs and shifts of 32 codes are worked out together beforehand, and the shifts
 *            enter as sums of x over each code's columns
 *   trellis  16 states of a tile row: one broadcast qword of the packed tile, one multishift, one mask,
 *            then the code (1MAD: multiply-add and a VNNI byte sum; 3INST: multiply-add, mask and two
 *            fp16 halves); 2-bit 1MAD turns the tile around instead: a register of 16 rows' states
 *            per column, from one shift by an immediate and a mask
 *   table    16 codes of b bits unpacked as for the grid, one permute into the row's 2^b levels
 *   Hadamard butterflies of span 1-8 inside a register and 16 across two as a row is loaded, wider
 *            spans two per pass, the mix by H_K in 16 lanes (a 512-token prefill transforms 512 rows
 *            per layer, and eight lanes took 1.1-1.8x longer)
 * With int8 activations (io->q8) grids, E8P and 1MAD multiply bytes instead: 64 weights per VNNI
 * instruction, one int32 sum per 64-column block, scaled once (the *_q8 kernels).
 * A grid's single activation row goes to the AVX2 kernel (its single-row path is faster on Zen 4).
 * Shapes these paths do not cover (rows not in 16-lane chunks, HYB and LUT trellis codes, Hadamard blocks
 * not of whole registers) go to the AVX2 kernels, and so do ICQuant's outlier corrections (scalar updates
 * at a few columns per row).
 */
#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels_common.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vnni,avx512vpopcntdq,avx512bitalg,fma,f16c,popcnt")))
#define INLINE AVX512 static inline __attribute__((always_inline))

/* Lane l of a 16-lane chunk of `bits`-bit values starts at bit l * bits: the byte permute gathers
 * bytes [b, b + 3] (b = l * bits / 8) into lane l, and the variable shift drops l * bits mod 8. */
typedef struct {
    __m512i perm, shift, mask;
    __mmask64 bytes; /* the chunk's 2 * bits bytes */
    int bits;
} unpacker_t;

INLINE unpacker_t unpacker(int bits) {
    uint8_t p[64];
    uint32_t s[16];
    for (int l = 0; l < 16; l++) {
        const int bit = l * bits;
        for (int i = 0; i < 4; i++) p[4 * l + i] = (uint8_t)((bit >> 3) + i);
        s[l] = (uint32_t)(bit & 7);
    }
    return (unpacker_t){.perm = _mm512_loadu_si512(p), .shift = _mm512_loadu_si512(s),
                        .mask = _mm512_set1_epi32((1 << bits) - 1), .bytes = (__mmask64)((1ull << (2 * bits)) - 1),
                        .bits = bits};
}

/* The 16 codes of a row's packed stream `row` from column `col` (a multiple of 16). */
INLINE __m512i unpack16_int(const unpacker_t *u, const uint8_t *row, int64_t col) {
    const __m512i v = _mm512_permutexvar_epi8(u->perm, _mm512_maskz_loadu_epi8(u->bytes, row + col * u->bits / 8));
    return _mm512_and_si512(_mm512_srlv_epi32(v, u->shift), u->mask);
}

INLINE __m512 unpack16(const unpacker_t *u, const uint8_t *row, int64_t col) {
    return _mm512_cvtepi32_ps(unpack16_int(u, row, col));
}

/* ----------------------------------------------------------------------------------------------
 * Integer grids */

INLINE void grid_rows(const io_t *io, const grid_t *g, int64_t lo, int64_t hi, int64_t b0, const int NB) {
    const int64_t cols = io->cols, gs = g->scales ? g->group_size : cols;
    const int64_t groups = (cols + gs - 1) / gs;
    const int bits = g->bits;
    const unpacker_t u = unpacker(bits);
    const float *x[MAX_BATCH];
    for (int b = 0; b < NB; b++) x[b] = io->x + (b0 + b) * cols;
    float xsum[MAX_BATCH * groups];
    for (int b = 0; b < NB; b++)
        for (int64_t j = 0; j < groups; j++) {
            __m512 s = _mm512_setzero_ps();
            const int64_t end = (j + 1) * gs < cols ? (j + 1) * gs : cols;
            for (int64_t c = j * gs; c < end; c += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(x[b] + c));
            xsum[b * groups + j] = _mm512_reduce_add_ps(s);
        }
    int32_t zeros[groups];
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = g->codes + r * g->row_bytes;
        if (g->scales)
            for (int64_t j = 0; j < groups; j++) zeros[j] = grid_zero_point(g, r * groups + j);
        __m512 acc[MAX_BATCH];
        float offset[MAX_BATCH];
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps(), offset[b] = 0.0f;
        for (int64_t j = 0; j < groups; j++) {
            __m512 part[MAX_BATCH];
            for (int b = 0; b < NB; b++) part[b] = _mm512_setzero_ps();
            const int64_t end = (j + 1) * gs < cols ? (j + 1) * gs : cols;
            for (int64_t col = j * gs; col < end; col += 16) {
                const __m512 q = unpack16(&u, row, col);
                for (int b = 0; b < NB; b++) part[b] = _mm512_fmadd_ps(q, _mm512_loadu_ps(x[b] + col), part[b]);
            }
            const float scale = g->scales ? half_to_float(g->scales[r * groups + j]) : g->scale;
            const float zero = g->scales ? (float)zeros[j] : g->zero;
            for (int b = 0; b < NB; b++) {
                acc[b] = _mm512_fmadd_ps(_mm512_set1_ps(scale), part[b], acc[b]);
                offset[b] += scale * zero * xsum[b * groups + j];
            }
        }
        for (int b = 0; b < NB; b++) io->y[(b0 + b) * io->rows + r] = _mm512_reduce_add_ps(acc[b]) - offset[b];
    }
}

/* Groups and rows must come in whole 16-value chunks (the last group may be shorter). */
static int grid_fits(const grid_t *g, int64_t cols) {
    return cols % 16 == 0 && (g->scales == NULL || g->group_size % 16 == 0);
}

/* One activation row goes to the AVX2 kernel, whose single-row path (a constant width, sums in named
 * registers) beat this one on Zen 4 by 1.3x (2, 3, 4 bits) to 2x (8 bits) at 4096 x 4096; batches of
 * rows stay here (1.2x faster at 4 rows, except 8 bits). */
AVX512 static void grid_matvec(const io_t *io, const grid_t *g, int64_t lo, int64_t hi) {
    if (io->batch == 1 || !grid_fits(g, io->cols)) {
        kernels_avx2.grid_matvec(io, g, lo, hi);
        return;
    }
    BATCH_CHUNKS(grid_rows, g)
}

/* ----------------------------------------------------------------------------------------------
 * Per-row tables: the row's 2^b levels sit in one register, and 16 codes pick theirs with one permute */

INLINE __m512 table_levels(const table_t *t, int64_t r) {
    const int count = 1 << t->bits;
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), t->levels + r * count));
}

INLINE void table_rows(const io_t *io, const table_t *t, int64_t lo, int64_t hi, int64_t b0, const int NB) {
    const int64_t cols = io->cols;
    const unpacker_t u = unpacker(t->bits);
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = t->codes + r * t->row_bytes;
        const __m512 levels = table_levels(t, r);
        __m512 acc[MAX_BATCH];
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t col = 0; col < cols; col += 16) {
            const __m512 w = _mm512_permutexvar_ps(unpack16_int(&u, row, col), levels);
            for (int b = 0; b < NB; b++) acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(io->x + (b0 + b) * cols + col), acc[b]);
        }
        for (int b = 0; b < NB; b++) io->y[(b0 + b) * io->rows + r] = _mm512_reduce_add_ps(acc[b]);
    }
}

AVX512 static void table_matvec(const io_t *io, const table_t *t, int64_t lo, int64_t hi) {
    if (io->cols % 16 != 0) {
        kernels_avx2.table_matvec(io, t, lo, hi);
        return;
    }
    BATCH_CHUNKS(table_rows, t)
}

AVX512 static void table_decode(const io_t *io, const table_t *t, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols;
    if (cols % 16 != 0) {
        kernels_avx2.table_decode(io, t, lo, hi);
        return;
    }
    const unpacker_t u = unpacker(t->bits);
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = t->codes + r * t->row_bytes;
        const __m512 levels = table_levels(t, r);
        float *w = io->y + (r - io->row0) * cols;
        for (int64_t col = 0; col < cols; col += 16)
            _mm512_storeu_ps(w + col, _mm512_permutexvar_ps(unpack16_int(&u, row, col), levels));
    }
}

/* ----------------------------------------------------------------------------------------------
 * E8P and residual lattice codes */

/* 32 codes at a time are turned into what each pair of codes needs: the byte offset of its row in
 * the 512-row table (pattern index, plus the parity of its 7 sign bits, which decides the sign of
 * coordinate 7), its 7 sign bits as a byte, and its shift bit. */
typedef struct {
    uint16_t offsets[32];
    uint8_t signs[32];
    uint32_t shifts;
} e8p_block_t;

INLINE void e8p_prepare(const uint16_t *codes, int count, e8p_block_t *out) {
    const __m512i c = _mm512_maskz_loadu_epi16((__mmask32)(count == 32 ? 0xFFFFFFFFu : (1u << count) - 1), codes);
    const __m512i signs7 = _mm512_and_si512(_mm512_srli_epi16(c, 8), _mm512_set1_epi16(0x7F));
    const __m512i parity = _mm512_and_si512(_mm512_popcnt_epi16(signs7), _mm512_set1_epi16(1));
    const __m512i row = _mm512_or_si512(_mm512_and_si512(c, _mm512_set1_epi16(0xFF)), _mm512_slli_epi16(parity, 8));
    _mm512_storeu_si512(out->offsets, _mm512_slli_epi16(row, 5));
    _mm256_storeu_si256((__m256i *)out->signs, _mm512_cvtepi16_epi8(signs7));
    out->shifts = (uint32_t)_mm512_test_epi16_mask(c, _mm512_set1_epi16((short)0x8000));
}

/* Codes 2p and 2p + 1 of a prepared block as 16 weights, without their +-1/4 shift. */
INLINE __m512 e8p_pair(const float *table, const e8p_block_t *blk, int p) {
    const char *base = (const char *)table;
    const __m512 a = _mm512_insertf32x8(
        _mm512_castps256_ps512(_mm256_loadu_ps((const float *)(base + blk->offsets[2 * p]))),
        _mm256_loadu_ps((const float *)(base + blk->offsets[2 * p + 1])), 1);
    uint16_t sign_mask;
    memcpy(&sign_mask, blk->signs + 2 * p, 2);
    return _mm512_mask_xor_ps(a, (__mmask16)sign_mask, a, _mm512_set1_ps(-0.0f));
}

/* The shifts of one prepared block: lanes of `group_sums` (x summed over each code's 8 columns) whose
 * code has the +1/4 shift, added into `acc` (the -1/4 of every code is taken out once per row). */
INLINE __m512 e8p_shifts(__m512 acc, const e8p_block_t *blk, const float *group_sums, int count) {
    acc = _mm512_mask_add_ps(acc, (__mmask16)blk->shifts, acc,
                             _mm512_maskz_loadu_ps((__mmask16)(count >= 16 ? 0xFFFF : (1u << count) - 1), group_sums));
    if (count > 16)
        acc = _mm512_mask_add_ps(acc, (__mmask16)(blk->shifts >> 16), acc,
                                 _mm512_maskz_loadu_ps((__mmask16)(count >= 32 ? 0xFFFF : (1u << (count - 16)) - 1),
                                                       group_sums + 16));
    return acc;
}

/* Pair p of a prepared block (codes j + 2p, j + 2p + 1) times x into acc [NB] (and the second stage's
 * into acc2 [NB]). */
INLINE void e8p_pair_step(const lattice_t *l, const e8p_block_t *blk, const e8p_block_t *blk2, const uint8_t *bytes2,
                          const float *const *x, int64_t j, int count, int p, const int NB, const int second,
                          __m512 *acc, __m512 *acc2) {
    const int64_t col = 8 * (j + 2 * p);
    const __mmask16 lanes = 2 * p + 1 < count ? 0xFFFF : 0x00FF;
    const __m512 w = e8p_pair(l->signed_patterns, blk, p);
    __m512 w2 = _mm512_setzero_ps();
    if (second == 2) {
        w2 = e8p_pair(l->signed_patterns, blk2, p);
    } else if (second == 1) {
        w2 = _mm512_zextps256_ps512(_mm256_loadu_ps(l->second_table + 8 * bytes2[j + 2 * p]));
        if (lanes == 0xFFFF)
            w2 = _mm512_insertf32x8(w2, _mm256_loadu_ps(l->second_table + 8 * bytes2[j + 2 * p + 1]), 1);
    }
    for (int b = 0; b < NB; b++) {
        const __m512 xv = lanes == 0xFFFF ? _mm512_loadu_ps(x[b] + col) : _mm512_maskz_loadu_ps(lanes, x[b] + col);
        acc[b] = _mm512_fmadd_ps(w, xv, acc[b]);
        if (second) acc2[b] = _mm512_fmadd_ps(w2, xv, acc2[b]);
    }
}

/* The chunk of row r from code j (32 codes or the row's rest), and the second stage's when it has codes. */
INLINE void e8p_prepare_chunk(const lattice_t *l, int64_t r, int64_t j, int64_t groups, const int second,
                              e8p_block_t *blk, e8p_block_t *blk2) {
    const int count = groups - j < 32 ? (int)(groups - j) : 32;
    e8p_prepare((const uint16_t *)l->codes + r * groups + j, count, blk);
    if (second == 2) e8p_prepare((const uint16_t *)l->codes2 + r * groups + j, count, blk2);
}

/* Four chains of sums per activation row, pairs taken in turn: one chain waited on each FMA's latency. */
INLINE void lattice_rows(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi, int64_t b0, const int NB,
                         const int second) {
    const int64_t cols = io->cols, groups = cols / 8;
    const float *x[MAX_BATCH];
    float *group_sums = malloc(sizeof(float) * (size_t)(NB * (groups + 32)));
    if (SCRATCH_FAILED(io, group_sums)) return;
    float xsum[MAX_BATCH];
    for (int b = 0; b < NB; b++) {
        x[b] = io->x + (b0 + b) * cols;
        xsum[b] = e8p_group_sums(x[b], groups, group_sums + b * (groups + 32));
    }
    /* Each chunk is prepared while the one before it is multiplied (a row's first during the previous
     * row's last), so that its stores have landed when its pairs read them: read back at once, they
     * waited on store forwarding (a quarter of the kernel's time on Zen 4). */
    e8p_block_t ring[2], ring2[2];
    int cur = 0;
    if (lo < hi) e8p_prepare_chunk(l, lo, 0, groups, second, &ring[0], &ring2[0]);
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *bytes2 = second == 1 ? (const uint8_t *)l->codes2 + r * groups : NULL;
        __m512 acc[4][MAX_BATCH], acc2[4][MAX_BATCH], up[MAX_BATCH], up2[MAX_BATCH];
        for (int b = 0; b < NB; b++) {
            up[b] = up2[b] = _mm512_setzero_ps();
            for (int c = 0; c < 4; c++) acc[c][b] = acc2[c][b] = _mm512_setzero_ps();
        }
        for (int64_t j = 0; j < groups; j += 32, cur ^= 1) {
            const int count = groups - j < 32 ? (int)(groups - j) : 32, pairs = (count + 1) / 2;
            if (j + 32 < groups)
                e8p_prepare_chunk(l, r, j + 32, groups, second, &ring[cur ^ 1], &ring2[cur ^ 1]);
            else if (r + 1 < hi)
                e8p_prepare_chunk(l, r + 1, 0, groups, second, &ring[cur ^ 1], &ring2[cur ^ 1]);
            const e8p_block_t *blk = &ring[cur], *blk2 = &ring2[cur];
            for (int b = 0; b < NB; b++) {
                const float *sums = group_sums + b * (groups + 32) + j;
                up[b] = e8p_shifts(up[b], blk, sums, count);
                if (second == 2) up2[b] = e8p_shifts(up2[b], blk2, sums, count);
            }
            int p = 0;
            for (; p + 4 <= pairs; p += 4)
                for (int c = 0; c < 4; c++)
                    e8p_pair_step(l, blk, blk2, bytes2, x, j, count, p + c, NB, second, acc[c], acc2[c]);
            for (; p < pairs; p++) e8p_pair_step(l, blk, blk2, bytes2, x, j, count, p, NB, second, acc[0], acc2[0]);
        }
        for (int b = 0; b < NB; b++) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][b], acc[1][b]), _mm512_add_ps(acc[2][b], acc[3][b]));
            const __m512 sum2 = _mm512_add_ps(_mm512_add_ps(acc2[0][b], acc2[1][b]), _mm512_add_ps(acc2[2][b], acc2[3][b]));
            float y = _mm512_reduce_add_ps(sum) + 0.5f * _mm512_reduce_add_ps(up[b]) - 0.25f * xsum[b];
            if (second == 1) y += l->inv_residual * _mm512_reduce_add_ps(sum2);
            if (second == 2)
                y += l->inv_residual * (_mm512_reduce_add_ps(sum2) + 0.5f * _mm512_reduce_add_ps(up2[b]) - 0.25f * xsum[b]);
            io->y[(b0 + b) * io->rows + r] = y;
        }
    }
    free(group_sums);
}

AVX512 static void lattice_matvec(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi) {
    if (l->second == 0) {
        BATCH_CHUNKS(lattice_rows, l, 0)
    } else if (l->second == 1) {
        BATCH_CHUNKS(lattice_rows, l, 1)
    } else {
        BATCH_CHUNKS(lattice_rows, l, 2)
    }
}

/* ----------------------------------------------------------------------------------------------
 * Integer activations (io->q8): VNNI byte dot products, 64 weights per instruction, one int32 sum per
 * block scaled once */

/* 64 codes of a 4- or 8-bit row from column `col`, as unsigned bytes in column order. */
INLINE __m512i grid_q8_codes(const uint8_t *row, int64_t col, const int bits) {
    if (bits == 8) return _mm512_loadu_si512(row + col);
    const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + col / 2)));
    return _mm512_or_si512(_mm512_and_si512(z, _mm512_set1_epi16(0x000F)),
                           _mm512_and_si512(_mm512_slli_epi16(z, 4), _mm512_set1_epi16(0x0F00)));
}

INLINE void grid_q8_rows(const io_t *io, const grid_t *g, int64_t lo, int64_t hi, int64_t b0, const int NB,
                         const int bits) {
    const int64_t cols = io->cols, blocks = cols / Q8_BLOCK, groups = g->scales ? g->groups : 1;
    const int64_t per_group = g->scales ? g->group_size / Q8_BLOCK : blocks;
    const int8_t *q[MAX_BATCH];
    const float *xs[MAX_BATCH];
    const int32_t *xt[MAX_BATCH];
    for (int b = 0; b < NB; b++)
        q[b] = io->q8.q + (b0 + b) * cols, xs[b] = io->q8.scales + (b0 + b) * blocks,
        xt[b] = io->q8.block_sums + (b0 + b) * blocks;
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = g->codes + r * g->row_bytes;
        __m512 acc[MAX_BATCH];
        float offset[MAX_BATCH];
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps(), offset[b] = 0.0f;
        for (int64_t j = 0; j < groups; j++) {
            const float scale = g->scales ? half_to_float(g->scales[r * groups + j]) : g->scale;
            const float zero = g->scales ? (float)grid_zero_point(g, r * groups + j) : g->zero;
            const int64_t end = (j + 1) * per_group < blocks ? (j + 1) * per_group : blocks;
            for (int64_t k = j * per_group; k < end; k++) {
                const __m512i w = grid_q8_codes(row, k * Q8_BLOCK, bits);
                for (int b = 0; b < NB; b++) {
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                            _mm512_loadu_si512(q[b] + k * Q8_BLOCK));
                    const float s = scale * xs[b][k];
                    acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(s), acc[b]);
                    offset[b] += s * zero * (float)xt[b][k];
                }
            }
        }
        for (int b = 0; b < NB; b++) io->y[(b0 + b) * io->rows + r] = _mm512_reduce_add_ps(acc[b]) - offset[b];
    }
}

AVX512 static void grid_matvec_q8(const io_t *io, const grid_t *g, int64_t lo, int64_t hi) {
    if (g->bits == 8) {
        BATCH_CHUNKS(grid_q8_rows, g, 8)
    } else {
        BATCH_CHUNKS(grid_q8_rows, g, 4)
    }
}

/* E8P with int8 activations. 4 x a point is s (.) (4a) + h (signs s, pattern a, shift h = +-1), and
 * (s (.) 4a + h) . q = 4a . (s (.) q) + h sum(q): the signs go onto the activations (q = -127..127
 * negates safely) and 4a = 2, 6, 10 stays unsigned, as VNNI's first operand must be; the shift term
 * is one 16-bit dot product per 32 codes against each code's sum of q (laid out per call). A pattern
 * is 16 bits (a_i - 1/2 = 0, 1, 2 in bits 2i, 2i + 1: `pattern_words`); eight registers hold all
 * 256, so 32 codes find theirs with four two-register permutes. */
typedef struct {
    __m512i words[4][2];
} e8p_words_t;

/* 32 codes in three registers of 16-bit lanes: each code's pattern word, its 8 signs (coordinate
 * 7's from the parity rule) and -h. Nothing goes through memory. */
typedef struct {
    __m512i words, signs, minus_shift;
} e8p_q8_block_t;

INLINE e8p_q8_block_t e8p_q8_prepare(const uint16_t *codes, int count, const e8p_words_t *t) {
    const __m512i c = _mm512_maskz_loadu_epi16((__mmask32)(count == 32 ? 0xFFFFFFFFu : (1u << count) - 1), codes);
    const __m512i index = _mm512_and_si512(c, _mm512_set1_epi16(0xFF));
    __m512i quarter[4];
    for (int i = 0; i < 4; i++) quarter[i] = _mm512_permutex2var_epi16(t->words[i][0], index, t->words[i][1]);
    const __mmask32 bit6 = _mm512_test_epi16_mask(index, _mm512_set1_epi16(64));
    const __mmask32 bit7 = _mm512_test_epi16_mask(index, _mm512_set1_epi16(128));
    const __m512i words = _mm512_mask_blend_epi16(bit7, _mm512_mask_blend_epi16(bit6, quarter[0], quarter[1]),
                                                  _mm512_mask_blend_epi16(bit6, quarter[2], quarter[3]));
    const __m512i signs7 = _mm512_and_si512(_mm512_srli_epi16(c, 8), _mm512_set1_epi16(0x7F));
    /* the pattern's sum is sum(a_i - 1/2) + 4: its parity is that of the number of odd fields, whose
     * low bits are the word's even bits; the sign bits' parity and theirs in one count */
    const __m512i odd = _mm512_and_si512(words, _mm512_set1_epi16(0x5555));
    const __m512i last = _mm512_and_si512(_mm512_popcnt_epi16(_mm512_xor_si512(signs7, odd)), _mm512_set1_epi16(1));
    const __m512i signs = _mm512_or_si512(signs7, _mm512_slli_epi16(last, 7));
    /* bit 15 set: h = +1; -h = -1 there, +1 elsewhere (and for the zeros of a short chunk's padding) */
    return (e8p_q8_block_t){words, signs, _mm512_or_si512(_mm512_srai_epi16(c, 15), _mm512_set1_epi16(1))};
}

/* 4a of each coordinate of part p (codes p, 4 + p, ..., 28 + p: code 4j + p is in qword j of the
 * words, bits 16p to 16p + 15), one code per 8 bytes: byte i takes the word's bits from 16p + 2i (a
 * multishift), and a 64-byte table maps its low two bits 0, 1, 2 to 2, 6, 10 (`bases`). */
INLINE __m512i e8p_q8_bases(__m512i words, __m512i select, __m512i bases) {
    return _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(select, words), bases);
}

/* Each 32-code chunk (256 columns) is taken in four parts of 8 codes, part p = codes 4j + p for j = 0..7,
 * so that every part reads its codes' words and signs where the chunk's registers hold them (no
 * permute). The activations are laid out per call to match (`e8p_q8_layout`): part p's 64 bytes are
 * the columns of codes p, 4 + p, ..., and dword lane l of a part's dot product sums columns of block
 * l / 4 of the chunk in every part, so the four parts add up in int32 and are scaled once by a vector
 * of the blocks' scales. The shift term's 16-bit dot product pairs codes 2l and 2l + 1 (block l / 4
 * too) in lane l: `sums` holds -sum(q) over each code's 8 columns in code order. A short last chunk is
 * padded with zero activations. */
static void e8p_q8_layout(const io_t *io, int64_t b, int64_t chunks, int8_t *q, int16_t *sums, float *scales) {
    const int64_t cols = io->cols, blocks = cols / Q8_BLOCK;
    const int8_t *src = io->q8.q + b * cols;
    const float *xs = io->q8.scales + b * blocks;
    memset(q, 0, (size_t)(256 * chunks));
    for (int64_t g = 0; g < chunks; g++)
        for (int p = 0; p < 4; p++)
            for (int j = 0; j < 8; j++) {
                const int64_t col = 256 * g + 8 * (4 * j + p);
                if (col < cols) memcpy(q + 256 * g + 64 * p + 8 * j, src + col, 8);
            }
    for (int64_t code = 0; code < 32 * chunks; code++) {
        int sum = 0;
        if (8 * code < cols)
            for (int i = 0; i < 8; i++) sum += src[8 * code + i];
        sums[code] = (int16_t)-sum;
    }
    for (int64_t g = 0; g < chunks; g++)
        for (int l = 0; l < 16; l++) {
            const int64_t block = 4 * g + l / 4;
            scales[16 * g + l] = block < blocks ? xs[block] : 0.0f;
        }
}

INLINE void lattice_q8_rows(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi, int64_t b0, const int NB) {
    const int64_t cols = io->cols, groups = cols / 8, chunks = (groups + 31) / 32;
    uint8_t base_of[64];
    for (int i = 0; i < 64; i++) base_of[i] = (uint8_t)(4 * (i & 3) + 2);
    const __m512i bases = _mm512_loadu_si512(base_of);
    e8p_words_t table;
    for (int i = 0; i < 4; i++)
        for (int h = 0; h < 2; h++) table.words[i][h] = _mm512_loadu_si512(l->pattern_words + 64 * i + 32 * h);
    __m512i select[4];
    __m512i sign_bits[4];
    for (int p = 0; p < 4; p++) {
        uint8_t sel[8], sb[8];
        for (int i = 0; i < 8; i++) sel[i] = (uint8_t)(16 * p + 2 * i), sb[i] = (uint8_t)(16 * p + i);
        long long v;
        memcpy(&v, sel, 8), select[p] = _mm512_set1_epi64(v);
        memcpy(&v, sb, 8), sign_bits[p] = _mm512_set1_epi64(v);
    }
    int8_t *q = malloc((size_t)(NB * chunks * 256));
    int16_t *sums = malloc(sizeof(int16_t) * (size_t)(NB * chunks * 32));
    float *xs = malloc(sizeof(float) * (size_t)(NB * chunks * 16));
    if (SCRATCH_FAILED(io, q, sums, xs)) return;
    for (int b = 0; b < NB; b++)
        e8p_q8_layout(io, b0 + b, chunks, q + b * chunks * 256, sums + b * chunks * 32, xs + b * chunks * 16);
    for (int64_t r = lo; r < hi; r++) {
        const uint16_t *codes = (const uint16_t *)l->codes + r * groups;
        __m512 acc[MAX_BATCH];
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t g = 0; g < chunks; g++) {
            const int count = groups - 32 * g < 32 ? (int)(groups - 32 * g) : 32;
            const e8p_q8_block_t blk = e8p_q8_prepare(codes + 32 * g, count, &table);
            __m512i dot[MAX_BATCH];
            for (int b = 0; b < NB; b++)
                dot[b] = _mm512_dpwssd_epi32(_mm512_setzero_si512(), blk.minus_shift,
                                             _mm512_loadu_si512(sums + (b * chunks + g) * 32));
            for (int p = 0; p < 4; p++) {
                const __m512i u = e8p_q8_bases(blk.words, select[p], bases);
                const __mmask64 signs = _mm512_bitshuffle_epi64_mask(blk.signs, sign_bits[p]);
                for (int b = 0; b < NB; b++) {
                    const __m512i x = _mm512_loadu_si512(q + (b * chunks + g) * 256 + 64 * p);
                    dot[b] = _mm512_dpbusd_epi32(dot[b], u, _mm512_mask_sub_epi8(x, signs, _mm512_setzero_si512(), x));
                }
            }
            for (int b = 0; b < NB; b++)
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[b]), _mm512_loadu_ps(xs + (b * chunks + g) * 16), acc[b]);
        }
        for (int b = 0; b < NB; b++) io->y[(b0 + b) * io->rows + r] = 0.25f * _mm512_reduce_add_ps(acc[b]);
    }
    free(q);
    free(sums);
    free(xs);
}

AVX512 static void lattice_matvec_q8(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi) {
    BATCH_CHUNKS(lattice_q8_rows, l)
}

/* ----------------------------------------------------------------------------------------------
 * Bitshift trellis (V = 1, computed codes) */

/* Tile row rr's 16 states straight from the packed tile (32 k bytes, a circular stream): state l is the
 * L-bit window (15 - l) k bits above the row's base, byte (30 - 2 rr) k. A multishift puts bits
 * [offset, offset + 32) of a lane's qword into the lane: with 15 k + L <= 64 one qword from the base
 * covers all 16 lanes, otherwise lanes 0-7 read the qword k bytes higher (both spans are <= 7 k + L). */
typedef struct {
    __m512i select, mask;
    int one_qword;
} window_t;

INLINE window_t window_constants(int k, int L) {
    const int one_qword = 15 * k + L <= 64;
    uint8_t sel[64];
    for (int l = 0; l < 16; l++) {
        const int bit = (one_qword || l >= 8 ? 15 - l : 7 - l) * k;
        for (int j = 0; j < 4; j++) sel[4 * l + j] = (uint8_t)((bit + 8 * j) & 63);
    }
    return (window_t){_mm512_loadu_si512(sel), _mm512_set1_epi32((1 << L) - 1), one_qword};
}

/* The 8 bytes from byte `at` of a circular stream of `bytes` bytes (at < bytes, bytes >= 8), in every
 * qword: a broadcast load unless they wrap around the end. */
INLINE __m512i circular_qword(const uint8_t *stream, int at, int bytes) {
    uint64_t head, tail;
    if (at + 8 <= bytes) {
        memcpy(&tail, stream + at, 8);
        return _mm512_set1_epi64((long long)tail);
    }
    const int n = bytes - at; /* 1..7 bytes before the end */
    memcpy(&tail, stream + bytes - 8, 8);
    memcpy(&head, stream, 8);
    return _mm512_set1_epi64((long long)((tail >> (8 * (8 - n))) | (head << (8 * n))));
}

INLINE __m512i trellis_states16(const uint8_t *tile, int rr, int k, const window_t *win) {
    const int bytes = 32 * k, at = (30 - 2 * rr) * k;
    const __m512i low = circular_qword(tile, at, bytes);
    const __m512i src = win->one_qword ? low
                                       : _mm512_inserti64x4(circular_qword(tile, at + k, bytes), _mm512_castsi512_si256(low), 1);
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(win->select, src), win->mask);
}

/* 1MAD's x = a s + increment of tile row rr's 16 states: a weight is the byte sum of x, before offset
 * and scale. */
INLINE __m512i trellis_lcg16(const uint8_t *tile, int rr, int k, uint32_t increment, const window_t *win) {
    return _mm512_add_epi32(_mm512_mullo_epi32(trellis_states16(tile, rr, k, win), _mm512_set1_epi32(ONE_MAD_MULTIPLIER)),
                            _mm512_set1_epi32((int)increment));
}

/* Code values of 16 states before their scale: value = (raw - offset) * scale (code_scale, kernels_common.h). */
INLINE __m512 trellis_row16(const uint8_t *tile, int rr, int k, int code, uint32_t increment, const window_t *win) {
    if (code == CODE_1MAD) /* the byte sum of s * a + increment */
        return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), trellis_lcg16(tile, rr, k, increment, win),
                                                      _mm512_set1_epi32(0x01010101)));
    const __m512i s = trellis_states16(tile, rr, k, win);
    __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(s, _mm512_set1_epi32(89226354)), _mm512_set1_epi32(64248484));
    x = _mm512_xor_si512(_mm512_and_si512(x, _mm512_set1_epi32((int)0x8FFF8FFFu)), _mm512_set1_epi32(0x3B603B60));
    const __m512 low = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(x));
    const __m512 high = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(x, 16)));
    return _mm512_add_ps(low, high);
}

/* The sum of x [cols] (cols a multiple of 16). */
INLINE float row_sum(const float *x, int64_t cols) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t c = 0; c < cols; c += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(x + c));
    return _mm512_reduce_add_ps(s);
}

INLINE void trellis_rows(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi, int64_t b0, const int NB,
                         const int code) {
    const int64_t cols = io->cols, tiles_n = cols / 16;
    const int k = t->k, bytes = 32 * k;
    const window_t win = window_constants(k, t->L);
    const float scale = code_scale(code), offset = code_offset(code);
    float xsum[MAX_BATCH];
    for (int b = 0; b < NB; b++) xsum[b] = row_sum(io->x + (b0 + b) * cols, cols);
    for (int64_t i = lo / 16; i < hi / 16; i++) {
        __m512 acc[MAX_BATCH][16];
        for (int b = 0; b < NB; b++)
            for (int rr = 0; rr < 16; rr++) acc[b][rr] = _mm512_setzero_ps();
        const uint8_t *tile = t->codes + i * tiles_n * bytes;
        for (int64_t j = 0; j < tiles_n; j++, tile += bytes) {
            __m512 xv[MAX_BATCH];
            for (int b = 0; b < NB; b++) xv[b] = _mm512_loadu_ps(io->x + (b0 + b) * cols + 16 * j);
            for (int rr = 0; rr < 16; rr++) {
                const __m512 w = trellis_row16(tile, rr, k, code, t->increment, &win);
                for (int b = 0; b < NB; b++) acc[b][rr] = _mm512_fmadd_ps(w, xv[b], acc[b][rr]);
            }
        }
        for (int b = 0; b < NB; b++)
            for (int rr = 0; rr < 16; rr++)
                io->y[(b0 + b) * io->rows + 16 * i + rr] = scale * (_mm512_reduce_add_ps(acc[b][rr]) - offset * xsum[b]);
    }
}

/* The 1MAD column kernels (k = 2 and L <= 16; built for QTIP's L = 12 and 16) turn a tile around:
 * lane m of a register holds row 15 - m and one step handles a column. A 2-bit tile is 64 bytes, one
 * register, and the state of (row 15 - m, column j) is the L-bit window at bit 30 - 2j of the tile's
 * dwords m, m + 1 (circularly): for 30 - 2j + L <= 32 dword m shifted right, otherwise the same from
 * `higher`, the tile's copy whose dword m starts 16 bits higher (a byte permute per tile). Shifts by
 * an immediate and a mask run beside the multiplier, where the row kernels' multishift competes with
 * it; and with the lanes being rows, a row ends with one sum per activation row, not 16 to reduce.
 * An increment whose low 16 bits are zero (quipkit's ONE_MAD_INCREMENT) equals a c for c = increment / a
 * mod 2^32, whose low 16 bits are zero too, so a s + increment = a (s | c) for s < 2^16: one
 * ternary-logic instruction masks s and adds c, one add fewer per 16 weights than any other
 * increment takes (`add`: QTIP's). */
typedef struct {
    __m512i c, increment;
} one_mad_increment_t;

INLINE one_mad_increment_t one_mad_increment(uint32_t increment) {
    return (one_mad_increment_t){_mm512_set1_epi32((int)(increment * ONE_MAD_INVERSE)), _mm512_set1_epi32((int)increment)};
}

/* x = a s + increment of column j */
INLINE __m512i column_lcg16(__m512i tile, __m512i higher, const int j, const int L, const one_mad_increment_t *inc,
                            const int add) {
    const __m512i mask = _mm512_set1_epi32((1 << L) - 1), a = _mm512_set1_epi32(ONE_MAD_MULTIPLIER);
    const __m512i window = 30 - 2 * j + L <= 32 ? _mm512_srli_epi32(tile, 30 - 2 * j) : _mm512_srli_epi32(higher, 14 - 2 * j);
    if (add) return _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(window, mask), a), inc->increment);
    return _mm512_mullo_epi32(_mm512_ternarylogic_epi32(window, mask, inc->c, 0xEA), a); /* (window & mask) | c */
}

/* A 1MAD column kernel's cases: L (12 or 16) and whether the increment needs the add, all constants. */
#define ONE_MAD_COLUMN_CASES(KERNEL)                                       \
    do {                                                                   \
        const int add = (t->increment & 0xFFFFu) != 0;                    \
        if (t->L == 16 && add) {                                           \
            TRELLIS_CASES(KERNEL, 16, 1)                                   \
        } else if (t->L == 16) {                                           \
            TRELLIS_CASES(KERNEL, 16, 0)                                   \
        } else if (add) {                                                  \
            TRELLIS_CASES(KERNEL, 12, 1)                                   \
        } else {                                                           \
            TRELLIS_CASES(KERNEL, 12, 0)                                   \
        }                                                                  \
    } while (0)

/* `higher` of a tile (see column_lcg16). */
INLINE __m512i column_higher(__m512i tile) {
    uint8_t on[64];
    for (int l = 0; l < 64; l++) on[l] = (uint8_t)((l + 2) & 63);
    return _mm512_permutexvar_epi8(_mm512_loadu_si512(on), tile);
}

/* 16 sums whose lane m belongs to row 15 - m, in row order. */
INLINE __m512 column_rows(__m512 sums) {
    return _mm512_permutexvar_ps(_mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), sums);
}

/* The float 1MAD kernel on turned-around tiles. */
INLINE void trellis_columns(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi, int64_t b0, const int NB,
                            const int L, const int add) {
    const int64_t cols = io->cols, tiles_n = cols / 16;
    const one_mad_increment_t inc = one_mad_increment(t->increment);
    float xsum[MAX_BATCH];
    for (int b = 0; b < NB; b++) xsum[b] = row_sum(io->x + (b0 + b) * cols, cols);
    const __m512i ones = _mm512_set1_epi32(0x01010101);
    for (int64_t i = lo / 16; i < hi / 16; i++) {
        __m512 acc[MAX_BATCH][4]; /* four chains per activation row */
        for (int b = 0; b < NB; b++)
            for (int c = 0; c < 4; c++) acc[b][c] = _mm512_setzero_ps();
        for (int64_t j16 = 0; j16 < tiles_n; j16++) {
            const __m512i tile = _mm512_loadu_si512(t->codes + (i * tiles_n + j16) * 64), higher = column_higher(tile);
            const float *x = io->x + b0 * cols + 16 * j16;
            #pragma GCC unroll 16
            for (int j = 0; j < 16; j++) {
                const __m512 w = _mm512_cvtepi32_ps(
                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), column_lcg16(tile, higher, j, L, &inc, add), ones));
                for (int b = 0; b < NB; b++) acc[b][j % 4] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[b * cols + j]), acc[b][j % 4]);
            }
        }
        for (int b = 0; b < NB; b++) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3]));
            _mm512_storeu_ps(io->y + (b0 + b) * io->rows + 16 * i,
                             _mm512_mul_ps(_mm512_set1_ps(ONE_MAD_SCALE), _mm512_sub_ps(column_rows(sum), _mm512_set1_ps(code_offset(CODE_1MAD) * xsum[b]))));
        }
    }
}

AVX512 static void trellis_matvec(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi) {
    if (t->V != 1 || (t->code != CODE_1MAD && t->code != CODE_3INST)) {
        kernels_avx2.trellis_matvec(io, t, lo, hi);
        return;
    }
    for (int64_t b0 = 0; b0 < io->batch; b0 += 4) {
        if (t->code == CODE_1MAD && t->k == 2 && (t->L == 16 || t->L == 12)) {
            ONE_MAD_COLUMN_CASES(trellis_columns);
        } else if (t->code == CODE_1MAD) {
            TRELLIS_CASES(trellis_rows, CODE_1MAD)
        } else {
            TRELLIS_CASES(trellis_rows, CODE_3INST)
        }
    }
}

/* What the int8 1MAD kernels read of activation rows b0 .. b0 + NB - 1: each q in all four bytes of a
 * dword (the returned [NB, cols], NULL when out of memory), the block scales, and the -510's total
 * sum(510 x q x scale) per row (the block sums times the scales). */
INLINE uint32_t *one_mad_q8_setup(const io_t *io, int64_t b0, const int NB, const float **xs, float *constant) {
    const int64_t cols = io->cols, blocks = cols / Q8_BLOCK;
    uint32_t *q4 = malloc(sizeof(uint32_t) * (size_t)(NB * cols));
    for (int b = 0; b < NB; b++) {
        const int8_t *q = io->q8.q + (b0 + b) * cols;
        if (q4 != NULL)
            for (int64_t c = 0; c < cols; c++) q4[b * cols + c] = (uint8_t)q[c] * 0x01010101u;
        xs[b] = io->q8.scales + (b0 + b) * blocks;
        constant[b] = 0.0f;
        for (int64_t m = 0; m < blocks; m++)
            constant[b] += code_offset(CODE_1MAD) * xs[b][m] * (float)io->q8.block_sums[(b0 + b) * blocks + m];
    }
    return q4;
}

/* 1MAD with int8 activations: a weight is (byte sum of x = a s + increment) - 510 (before its scale), so one
 * VNNI instruction against q broadcast to all four bytes of each lane gives 16 weights' (byte sum) x q
 * at once (the dot-product form QTIP chose 1MAD for); the -510 enters once per row through the
 * activations' block sums. Each 64-column block's 4 tiles are summed in int32, then scaled. */
INLINE void trellis_q8_rows(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi, int64_t b0, const int NB,
                            const int code) {
    const int64_t cols = io->cols, tiles_n = cols / 16, blocks = cols / Q8_BLOCK;
    const int k = t->k, bytes = 32 * k;
    const window_t win = window_constants(k, t->L);
    const float *xs[MAX_BATCH];
    float constant[MAX_BATCH];
    uint32_t *q4 = one_mad_q8_setup(io, b0, NB, xs, constant);
    if (SCRATCH_FAILED(io, q4)) return;
    for (int64_t i = lo / 16; i < hi / 16; i++) {
        __m512 acc[MAX_BATCH][16];
        for (int b = 0; b < NB; b++)
            for (int rr = 0; rr < 16; rr++) acc[b][rr] = _mm512_setzero_ps();
        for (int64_t m = 0; m < blocks; m++) {
            const uint8_t *tiles = t->codes + (i * tiles_n + 4 * m) * bytes;
            for (int rr = 0; rr < 16; rr++) {
                __m512i dot[MAX_BATCH];
                for (int b = 0; b < NB; b++) dot[b] = _mm512_setzero_si512();
                for (int j = 0; j < 4; j++) {
                    const __m512i x = trellis_lcg16(tiles + j * bytes, rr, k, t->increment, &win);
                    for (int b = 0; b < NB; b++)
                        dot[b] = _mm512_dpbusd_epi32(dot[b], x, _mm512_loadu_si512(q4 + b * cols + Q8_BLOCK * m + 16 * j));
                }
                for (int b = 0; b < NB; b++)
                    acc[b][rr] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[b]), _mm512_set1_ps(xs[b][m]), acc[b][rr]);
            }
        }
        for (int b = 0; b < NB; b++)
            for (int rr = 0; rr < 16; rr++)
                io->y[(b0 + b) * io->rows + 16 * i + rr] = code_scale(code) * (_mm512_reduce_add_ps(acc[b][rr]) - constant[b]);
    }
    free(q4);
}

/* The int8 1MAD kernel on turned-around tiles (column_lcg16): a 64-column block's int32 sums for 16
 * rows are scaled by one multiply-add. */
INLINE void trellis_q8_columns(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi, int64_t b0,
                               const int NB, const int L, const int add) {
    const int64_t cols = io->cols, tiles_n = cols / 16, blocks = cols / Q8_BLOCK;
    const one_mad_increment_t inc = one_mad_increment(t->increment);
    const float *xs[MAX_BATCH];
    float constant[MAX_BATCH];
    uint32_t *q4s = one_mad_q8_setup(io, b0, NB, xs, constant);
    if (SCRATCH_FAILED(io, q4s)) return;
    for (int64_t i = lo / 16; i < hi / 16; i++) {
        __m512 acc[MAX_BATCH];
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t m = 0; m < blocks; m++) {
            __m512i dot[MAX_BATCH][4]; /* four chains: one would wait on each VNNI instruction's latency */
            for (int b = 0; b < NB; b++)
                for (int c = 0; c < 4; c++) dot[b][c] = _mm512_setzero_si512();
            for (int j4 = 0; j4 < 4; j4++) {
                const __m512i tile = _mm512_loadu_si512(t->codes + (i * tiles_n + 4 * m + j4) * 64);
                const __m512i higher = column_higher(tile);
                const uint32_t *q4 = q4s + Q8_BLOCK * m + 16 * j4;
                #pragma GCC unroll 16
                for (int j = 0; j < 16; j++) {
                    const __m512i x = column_lcg16(tile, higher, j, L, &inc, add);
                    for (int b = 0; b < NB; b++)
                        dot[b][j % 4] = _mm512_dpbusd_epi32(dot[b][j % 4], x, _mm512_set1_epi32((int)q4[b * cols + j]));
                }
            }
            for (int b = 0; b < NB; b++) {
                const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(dot[b][0], dot[b][1]), _mm512_add_epi32(dot[b][2], dot[b][3]));
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xs[b][m]), acc[b]);
            }
        }
        for (int b = 0; b < NB; b++)
            _mm512_storeu_ps(io->y + (b0 + b) * io->rows + 16 * i,
                             _mm512_mul_ps(_mm512_set1_ps(ONE_MAD_SCALE), _mm512_sub_ps(column_rows(acc[b]), _mm512_set1_ps(constant[b]))));
    }
    free(q4s);
}

AVX512 static void trellis_matvec_q8(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi) {
    for (int64_t b0 = 0; b0 < io->batch; b0 += 4) {
        if (t->k == 2 && (t->L == 16 || t->L == 12)) {
            ONE_MAD_COLUMN_CASES(trellis_q8_columns);
        } else {
            TRELLIS_CASES(trellis_q8_rows, CODE_1MAD)
        }
    }
}

AVX512 static void trellis_decode(const io_t *io, const trellis_layer_t *t, int64_t lo, int64_t hi) {
    if (t->V != 1 || (t->code != CODE_1MAD && t->code != CODE_3INST)) {
        kernels_avx2.trellis_decode(io, t, lo, hi);
        return;
    }
    const int64_t cols = io->cols, tiles_n = cols / 16;
    const int k = t->k, bytes = 32 * k;
    const window_t win = window_constants(k, t->L);
    for (int64_t i = lo / 16; i < hi / 16; i++)
        for (int64_t j = 0; j < tiles_n; j++) {
            const uint8_t *tile = t->codes + (i * tiles_n + j) * bytes;
            const __m512 scale = _mm512_set1_ps(code_scale(t->code)), offset = _mm512_set1_ps(code_offset(t->code));
            for (int rr = 0; rr < 16; rr++) {
                float *out = io->y + (16 * i + rr - io->row0) * cols + 16 * j;
                const __m512 raw = t->code == CODE_1MAD ? trellis_row16(tile, rr, k, CODE_1MAD, t->increment, &win)
                                                        : trellis_row16(tile, rr, k, CODE_3INST, 0, &win);
                _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_sub_ps(raw, offset), scale));
            }
        }
}

/* ----------------------------------------------------------------------------------------------
 * Dense bf16: four rows at a time share each load of x */

INLINE __m512 bf16_load(const uint16_t *p, __mmask16 lanes) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p)), 16));
}

AVX512 static void bf16_matvec(const io_t *io, const bf16_t *d, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols;
    for (int64_t b = 0; b < io->batch; b++) {
        const float *x = io->x + b * cols;
        int64_t r = lo;
        for (; r + 4 <= hi; r += 4) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t c = 0; c < cols; c += 16) {
                const __mmask16 lanes = cols - c >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
                const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + c);
                for (int i = 0; i < 4; i++)
                    acc[i] = _mm512_fmadd_ps(bf16_load(d->weight + (r + i) * cols + c, lanes), xv, acc[i]);
            }
            for (int i = 0; i < 4; i++) io->y[b * io->rows + r + i] = _mm512_reduce_add_ps(acc[i]);
        }
        for (; r < hi; r++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < cols; c += 16) {
                const __mmask16 lanes = cols - c >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - c)) - 1);
                acc = _mm512_fmadd_ps(bf16_load(d->weight + r * cols + c, lanes), _mm512_maskz_loadu_ps(lanes, x + c), acc);
            }
            io->y[b * io->rows + r] = _mm512_reduce_add_ps(acc);
        }
    }
}

/* ----------------------------------------------------------------------------------------------
 * Rows of W for a prefill GEMM, decoded as the matvecs decode them */

AVX512 static void grid_decode(const io_t *io, const grid_t *g, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols;
    if (!grid_fits(g, cols)) {
        kernels_avx2.grid_decode(io, g, lo, hi);
        return;
    }
    const int64_t gs = g->scales ? g->group_size : cols, groups = (cols + gs - 1) / gs;
    const int bits = g->bits;
    const unpacker_t u = unpacker(bits);
    for (int64_t r = lo; r < hi; r++) {
        const uint8_t *row = g->codes + r * g->row_bytes;
        float *w = io->y + (r - io->row0) * cols;
        for (int64_t j = 0; j < groups; j++) {
            float scale = g->scale, zero = g->zero;
            if (g->scales) {
                scale = half_to_float(g->scales[r * groups + j]);
                zero = (float)grid_zero_point(g, r * groups + j);
            }
            const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero);
            const int64_t end = (j + 1) * gs < cols ? (j + 1) * gs : cols;
            for (int64_t col = j * gs; col < end; col += 16)
                _mm512_storeu_ps(w + col, _mm512_mul_ps(s, _mm512_sub_ps(unpack16(&u, row, col), z)));
        }
    }
}

/* Codes 2p and 2p + 1 of a prepared block with their shifts: 16 weights as stored. */
INLINE __m512 e8p_pair_shifted(const float *table, const e8p_block_t *blk, int p) {
    const __m512 w = e8p_pair(table, blk, p);
    const __mmask16 up = (__mmask16)((((blk->shifts >> (2 * p)) & 1) ? 0x00FF : 0) |
                                     (((blk->shifts >> (2 * p + 1)) & 1) ? 0xFF00 : 0));
    return _mm512_add_ps(_mm512_mask_blend_ps(up, _mm512_set1_ps(-0.25f), _mm512_set1_ps(0.25f)), w);
}

AVX512 static void lattice_decode(const io_t *io, const lattice_t *l, int64_t lo, int64_t hi) {
    const int64_t cols = io->cols, groups = cols / 8;
    e8p_block_t blk, blk2;
    for (int64_t r = lo; r < hi; r++) {
        float *w = io->y + (r - io->row0) * cols;
        const uint16_t *codes = (const uint16_t *)l->codes + r * groups;
        for (int64_t j = 0; j < groups; j += 32) {
            const int count = groups - j < 32 ? (int)(groups - j) : 32;
            e8p_prepare(codes + j, count, &blk);
            if (l->second == 2) e8p_prepare((const uint16_t *)l->codes2 + r * groups + j, count, &blk2);
            for (int p = 0; p < (count + 1) / 2; p++) {
                const __mmask16 lanes = 2 * p + 1 < count ? 0xFFFF : 0x00FF;
                __m512 v = e8p_pair_shifted(l->signed_patterns, &blk, p);
                if (l->second == 2) {
                    v = _mm512_fmadd_ps(e8p_pair_shifted(l->signed_patterns, &blk2, p), _mm512_set1_ps(l->inv_residual), v);
                } else if (l->second == 1) {
                    const uint8_t *c2 = (const uint8_t *)l->codes2 + r * groups + j + 2 * p;
                    __m512 w2 = _mm512_zextps256_ps512(_mm256_loadu_ps(l->second_table + 8 * c2[0]));
                    if (lanes == 0xFFFF) w2 = _mm512_insertf32x8(w2, _mm256_loadu_ps(l->second_table + 8 * c2[1]), 1);
                    v = _mm512_fmadd_ps(w2, _mm512_set1_ps(l->inv_residual), v);
                }
                _mm512_mask_storeu_ps(w + 8 * (j + 2 * p), lanes, v);
            }
        }
    }
}

/* ----------------------------------------------------------------------------------------------
 * Hadamard transform. Butterflies of span 1-8 inside a 16-lane register and of span 16 across two
 * as the row is loaded; wider spans two at a time (radix 4), so a 128-long block (a 1536-wide row's)
 * is two passes over memory, not five; the mix by M writes the normalised, post-signed result. */

/* lower lane i: v[i] + v[i + h]; upper lane i + h: v[i] - v[i + h], from other = v with spans swapped */
INLINE __m512 lane_butterfly(__m512 v, __m512 other, __mmask16 upper) {
    return _mm512_mask_sub_ps(_mm512_add_ps(v, other), upper, other, v);
}

INLINE __m512 fwht16(__m512 v) {
    v = lane_butterfly(v, _mm512_permute_ps(v, 0xB1), 0xAAAA);           /* span 1 */
    v = lane_butterfly(v, _mm512_permute_ps(v, 0x4E), 0xCCCC);           /* span 2 */
    v = lane_butterfly(v, _mm512_shuffle_f32x4(v, v, 0xB1), 0xF0F0);     /* span 4 */
    return lane_butterfly(v, _mm512_shuffle_f32x4(v, v, 0x4E), 0xFF00);  /* span 8 */
}

INLINE __m512 signs16(const uint16_t *signs, int64_t c) { /* fp16 +-1 */
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(signs + c)));
}

INLINE __m512 signed_load(const float *x, const uint16_t *signs, int64_t c) {
    const __m512 v = _mm512_loadu_ps(x + c);
    return signs ? _mm512_mul_ps(v, signs16(signs, c)) : v;
}

/* t [p] = H_p (pre (.) x [p]), unnormalised (Sylvester order), p a multiple of 16; t may be x */
INLINE void fwht_block(const float *x, const uint16_t *pre, float *t, int64_t p) {
    if (p == 16) {
        _mm512_storeu_ps(t, fwht16(signed_load(x, pre, 0)));
        return;
    }
    for (int64_t c = 0; c < p; c += 32) {
        const __m512 a = fwht16(signed_load(x, pre, c)), b = fwht16(signed_load(x, pre, c + 16));
        _mm512_storeu_ps(t + c, _mm512_add_ps(a, b));
        _mm512_storeu_ps(t + c + 16, _mm512_sub_ps(a, b));
    }
    int64_t h = 32;
    for (; 4 * h <= p; h *= 4) /* spans h and 2h */
        for (int64_t start = 0; start < p; start += 4 * h)
            for (int64_t i = start; i < start + h; i += 16) {
                const __m512 a = _mm512_loadu_ps(t + i), b = _mm512_loadu_ps(t + i + h);
                const __m512 c = _mm512_loadu_ps(t + i + 2 * h), d = _mm512_loadu_ps(t + i + 3 * h);
                const __m512 s0 = _mm512_add_ps(a, b), s1 = _mm512_sub_ps(a, b);
                const __m512 s2 = _mm512_add_ps(c, d), s3 = _mm512_sub_ps(c, d);
                _mm512_storeu_ps(t + i, _mm512_add_ps(s0, s2));
                _mm512_storeu_ps(t + i + h, _mm512_add_ps(s1, s3));
                _mm512_storeu_ps(t + i + 2 * h, _mm512_sub_ps(s0, s2));
                _mm512_storeu_ps(t + i + 3 * h, _mm512_sub_ps(s1, s3));
            }
    if (h < p) /* the last span */
        for (int64_t i = 0; i < h; i += 16) {
            const __m512 a = _mm512_loadu_ps(t + i), b = _mm512_loadu_ps(t + i + h);
            _mm512_storeu_ps(t + i, _mm512_add_ps(a, b));
            _mm512_storeu_ps(t + i + h, _mm512_sub_ps(a, b));
        }
}

INLINE void store_scaled(float *y, int64_t offset, __m512 v, __m512 norm, const uint16_t *post) {
    v = _mm512_mul_ps(v, norm);
    _mm512_storeu_ps(y + offset, post ? _mm512_mul_ps(v, signs16(post, offset)) : v);
}

/* y [K, p] = norm post (.) (M [K, K] @ t [K, p]), K a multiple of 4: four rows of M times 32 columns
 * (eight sums in flight), or 16 where p is an odd multiple of 16. */
INLINE void mix_rows(const float *t, float *y, const float *m, int64_t K, int64_t p, __m512 norm, const uint16_t *post) {
    int64_t c = 0;
    for (; c + 32 <= p; c += 32)
        for (int64_t i = 0; i < K; i += 4) {
            __m512 acc[4][2];
            for (int q = 0; q < 4; q++) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
            for (int64_t j = 0; j < K; j++) {
                const __m512 v0 = _mm512_loadu_ps(t + j * p + c), v1 = _mm512_loadu_ps(t + j * p + c + 16);
                for (int q = 0; q < 4; q++) {
                    const __m512 e = _mm512_set1_ps(m[(i + q) * K + j]);
                    acc[q][0] = _mm512_fmadd_ps(e, v0, acc[q][0]);
                    acc[q][1] = _mm512_fmadd_ps(e, v1, acc[q][1]);
                }
            }
            for (int q = 0; q < 4; q++) {
                store_scaled(y, (i + q) * p + c, acc[q][0], norm, post);
                store_scaled(y, (i + q) * p + c + 16, acc[q][1], norm, post);
            }
        }
    if (c < p)
        for (int64_t i = 0; i < K; i += 4) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t j = 0; j < K; j++) {
                const __m512 v = _mm512_loadu_ps(t + j * p + c);
                for (int q = 0; q < 4; q++) acc[q] = _mm512_fmadd_ps(_mm512_set1_ps(m[(i + q) * K + j]), v, acc[q]);
            }
            for (int q = 0; q < 4; q++) store_scaled(y, (i + q) * p + c, acc[q], norm, post);
        }
}

AVX512 static void hadamard(const io_t *io, const hadamard_t *h, int64_t lo, int64_t hi) {
    const int64_t n = h->n, K = h->K, p = n / K;
    if (p % 16 || (K > 1 && K % 4)) {
        hadamard_avx2(io, h, lo, hi);
        return;
    }
    const __m512 norm = _mm512_set1_ps(1.0f / sqrtf((float)n));
    float *t = K > 1 ? malloc(sizeof(float) * n) : NULL;
    if (K > 1 && SCRATCH_FAILED(io, t)) return;
    for (int64_t r = lo; r < hi; r++) {
        float *y = io->y + r * n;
        const float *x = io->x + r * n;
        if (K > 1) {
            for (int64_t j = 0; j < K; j++) fwht_block(x + j * p, h->pre ? h->pre + j * p : NULL, t + j * p, p);
            mix_rows(t, y, h->hk, K, p, norm, h->post);
        } else {
            fwht_block(x, h->pre, y, n);
            for (int64_t c = 0; c < n; c += 16) store_scaled(y, c, _mm512_loadu_ps(y + c), norm, h->post);
        }
    }
    free(t);
}

const kernel_set_t kernels_avx512 = {
    .name = "avx512",
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
    .hadamard = hadamard,
    .grid_matvec_q8 = grid_matvec_q8,
    .lattice_matvec_q8 = lattice_matvec_q8,
    .trellis_matvec_q8 = trellis_matvec_q8,
};
#endif
