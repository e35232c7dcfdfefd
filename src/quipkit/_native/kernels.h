/* Decode kernels: y = x W^T straight from a layer's packed codes, and the same codes decoded to rows
 * of W (the tile a prefill GEMM consumes). One struct per codebook family holds the layer's stored
 * tensors (raw pointers into torch tensors, see quipkit/kernels/cpu.py) and its static spec.
 *
 * Every kernel exists once in portable C (kernels_generic.h, compiled for the baseline and, on x86,
 * again for AVX2 + FMA) and, for the hot paths, in AVX2 and AVX-512 intrinsics (kernels_avx2.c,
 * kernels_avx512.c). isa.c picks the tier at run time. Row ranges [lo, hi) let the thread pool split
 * a call over output rows.
 */
#ifndef QUIPKIT_KERNELS_H
#define QUIPKIT_KERNELS_H
#include <stdatomic.h>
#include <stdint.h>

/* Activations rounded to int8 for the integer kernels (the process's activations setting is int8):
 * each row of x in blocks of Q8_BLOCK columns, q = x * (127 / amax) rounded half to even, scale =
 * amax / 127 (q = 0 and scale = 0 for a block of zeros). q [batch, cols]; scales and block_sums (the
 * sum of q over each block, what a grid's zero points read) [batch, cols / Q8_BLOCK]. */
#define Q8_BLOCK 64
typedef struct {
    const int8_t *q;
    const float *scales;
    const int32_t *block_sums;
} q8_t;

/* Activations and outputs. matvec: x [batch, cols] -> y [batch, rows]. decode: rows [row0, ...) of
 * the weight into y [.., cols] (y holds row r at (r - row0) * cols). hadamard: x, y [batch, cols].
 * q8: x rounded to int8 for a *_matvec_q8 kernel (q8.q NULL otherwise). out_of_memory: set by a
 * kernel whose scratch memory could not be had (scratch_failed), so that the call raises. */
typedef struct {
    const float *x;
    float *y;
    int64_t batch, rows, cols, row0;
    q8_t q8;
    atomic_int *out_of_memory;
} io_t;

/* Integer grid: w[r, c] = scale[r, g] * (q[r, c] - zero[r, g]), g = c / group_size.
 * codes: uint8 [rows, row_bytes], b-bit values as a little-endian bit stream per row.
 * scales: fp16 [rows, groups] and zeros: b-bit stream [rows * groups]; or, when scales is NULL, one
 * float scale and zero for the whole matrix (QuIP's uniform grid). */
typedef struct {
    const uint8_t *codes;
    int64_t row_bytes, group_size, groups;
    int bits;
    const uint16_t *scales;
    const uint8_t *zeros;
    float scale, zero;
} grid_t;

/* E8P (QuIP#) and its residual stages. codes: int16 [rows, cols / 8]; code bits 0-7 index the 256
 * absolute patterns, 8-14 are the signs of coordinates 0-6, bit 15 the +-1/4 shift; the sign of
 * coordinate 7 makes the sum even (parity[index] is the parity of the pattern's sum).
 * second: 0 none, 1 the 1-bit E8 codebook (codes2 uint8 -> second_table [256, 8]), 2 E8P again
 * (codes2 int16). w = first + second / residual_scale. */
typedef struct {
    const int16_t *codes;
    const void *codes2;
    const float *patterns;        /* [256, 8] */
    const uint8_t *parity;        /* [256] */
    const float *signed_patterns; /* [512, 8]: row i + 256 q is pattern i with coordinate 7 negated iff
                                     q xor parity[i]; q = parity of the code's 7 sign bits */
    const float *second_table;    /* [256, 8] */
    const uint16_t *pattern_words; /* [256]: a_i - 1/2 (0, 1, 2) in bits 2i, 2i + 1, for the q8 kernels */
    int second;
    float inv_residual;
} lattice_t;

/* Bitshift trellis (QTIP), 16 x 16 tiles, k bits per weight, V values per state, L-bit states.
 * codes: uint8 [rows / 16, cols / 16, 32 k]; in each tile the N = 256 / V chunks of kV bits are
 * stored last-to-first, so the state of step t is the L-bit window at bit (N - 1 - t) kV (circular).
 * code: 0 1MAD, 1 3INST, 2 table (HYB: 512 x 2 indexed by a hash; LUT: 2^L x V). */
enum { CODE_1MAD = 0, CODE_3INST = 1, CODE_HYB = 2, CODE_LUT = 3 };
typedef struct {
    const uint8_t *codes;
    int L, k, V, code;
    uint32_t increment; /* 1MAD's x = a s + increment */
    const float *table;
} trellis_layer_t;

/* A table of 2^b fp16 levels per row [rows, 2^b] (b <= 4): w[r, c] = levels[r, q[r, c]]; codes as
 * the grid's. */
typedef struct {
    const uint8_t *codes;
    int64_t row_bytes;
    int bits;
    const uint16_t *levels;
} table_t;

/* ICQuant: every weight one b-bit code; the inliers read an integer grid (`grid`) or, when
 * table.levels is not NULL, a per-row table (codes, bits and row_bytes alike in both). Each row's
 * `per_row` outliers read a sign-and-magnitude grid instead: w = +-(low[r] + step[r] * (q mod
 * 2^(b-1))), negative when q >= 2^(b-1) (low, step fp16 [rows]). Their columns are a gap code
 * (codebooks/outlier_positions.py): positions[0] is the symbol width B, then B-bit symbols; the escape
 * 2^B - 1 skips that many inlier columns, a symbol s < escape skips s and marks the next column. Row r's
 * symbols start at symbol offsets[r] (int64 [rows + 1], found once per layer; offsets[rows] = `symbols`,
 * the whole symbols the stream holds). A call runs the inliers' kernel over the whole row, then the
 * outlier kernel corrects the few outlier columns. */
typedef struct {
    grid_t grid;
    table_t table;
    const uint16_t *low, *step;
    const uint8_t *positions;
    const int64_t *offsets;
    int64_t per_row, symbols;
} outlier_split_t;

/* Dense bf16 weight [rows, cols] (the unquantized embeddings and head), fp32 arithmetic. */
typedef struct {
    const uint16_t *weight;
} bf16_t;

/* Orthonormal Hadamard (M (x) H_{n/K}) / sqrt(n) on each row of x [batch, n], M = H_K or its
 * transpose: y = post (.) that (pre (.) x); pre/post are fp16 vectors or NULL. */
typedef struct {
    int64_t n, K;
    const float *hk; /* M [K, K], +-1 entries, row-major; NULL when K = 1 */
    const uint16_t *pre, *post;
} hadamard_t;

typedef struct {
    const char *name;
    void (*grid_matvec)(const io_t *, const grid_t *, int64_t lo, int64_t hi);
    void (*grid_decode)(const io_t *, const grid_t *, int64_t lo, int64_t hi);
    void (*lattice_matvec)(const io_t *, const lattice_t *, int64_t lo, int64_t hi);
    void (*lattice_decode)(const io_t *, const lattice_t *, int64_t lo, int64_t hi);
    void (*trellis_matvec)(const io_t *, const trellis_layer_t *, int64_t lo, int64_t hi);
    void (*trellis_decode)(const io_t *, const trellis_layer_t *, int64_t lo, int64_t hi);
    void (*table_matvec)(const io_t *, const table_t *, int64_t lo, int64_t hi);
    void (*table_decode)(const io_t *, const table_t *, int64_t lo, int64_t hi);
    /* y += (outlier value - inlier value) x at each outlier; decode: the outliers' values into the rows */
    void (*outlier_matvec)(const io_t *, const outlier_split_t *, int64_t lo, int64_t hi);
    void (*outlier_decode)(const io_t *, const outlier_split_t *, int64_t lo, int64_t hi);
    void (*bf16_matvec)(const io_t *, const bf16_t *, int64_t lo, int64_t hi);
    void (*hadamard)(const io_t *, const hadamard_t *, int64_t lo, int64_t hi); /* lo, hi: rows of x */
    /* y = x W^T from io->q8 with exact int32 sums per block: 4- and 8-bit grids whose groups are whole
     * blocks, E8P without a second stage, 1MAD trellis codes (q8_applies in module.c). NULL in a tier
     * without them (portable, AVX2): there the float kernel multiplies the rounded activations. */
    void (*grid_matvec_q8)(const io_t *, const grid_t *, int64_t lo, int64_t hi);
    void (*lattice_matvec_q8)(const io_t *, const lattice_t *, int64_t lo, int64_t hi);
    void (*trellis_matvec_q8)(const io_t *, const trellis_layer_t *, int64_t lo, int64_t hi); /* 1MAD, V = 1 */
} kernel_set_t;

extern const kernel_set_t kernels_portable;
#if defined(__x86_64__)
extern const kernel_set_t kernels_avx2_auto; /* the portable source compiled for AVX2 + FMA */
extern const kernel_set_t kernels_avx2;      /* hand-written where it pays, else kernels_avx2_auto's */
extern const kernel_set_t kernels_avx512;    /* hand-written where it pays, else kernels_avx2's */
/* The outlier corrections (a few scalar updates per row) are not hand-written: the AVX2 and AVX-512
 * tiers run their auto-vectorised AVX2 build. */
void outlier_matvec_avx2_auto(const io_t *, const outlier_split_t *, int64_t lo, int64_t hi);
void outlier_decode_avx2_auto(const io_t *, const outlier_split_t *, int64_t lo, int64_t hi);
/* The AVX-512 Hadamard transform falls back to the AVX2 one (kernels_avx2.c) where a block is not whole registers. */
void hadamard_avx2(const io_t *, const hadamard_t *, int64_t lo, int64_t hi);
#endif

/* The tier in use: the best the CPU supports, or QUIPKIT_ISA=portable|avx2|avx512 (never above it). */
const kernel_set_t *active_kernels(void);
int use_kernels(const char *name);

#endif
