/* The Python module quipkit._native: thin wrappers that take buffer addresses (tensor.data_ptr())
 * and sizes, release the GIL, and call the C routines. Callers pass contiguous tensors of the
 * documented dtypes; quipkit/native.py does that checking. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#include "kernels.h"
#include "native.h"

static PyObject *py_e8p_nearest(PyObject *self, PyObject *args) {
    unsigned long long x, patterns, lookup, codes;
    long long count;
    if (!PyArg_ParseTuple(args, "KLKKK", &x, &count, &patterns, &lookup, &codes)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    e8p_nearest((const float *)x, count, (const float *)patterns, (const int32_t *)lookup, (int32_t *)codes);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_e8p_two_nearest(PyObject *self, PyObject *args) {
    unsigned long long x, patterns, codes;
    long long count;
    if (!PyArg_ParseTuple(args, "KLKK", &x, &count, &patterns, &codes)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    e8p_two_nearest((const float *)x, count, (const float *)patterns, (int32_t *)codes);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_trellis_encode(PyObject *self, PyObject *args) {
    unsigned long long x, table, states, costs;
    long long count;
    int T, L, k, V, status;
    if (!PyArg_ParseTuple(args, "KLiiiiKKK", &x, &count, &T, &L, &k, &V, &table, &states, &costs)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = trellis_encode((const float *)x, count, T, L, k, V, (const float *)table, (int32_t *)states,
                            (float *)costs);
    Py_END_ALLOW_THREADS
    if (status == -1) return PyErr_NoMemory();
    if (status != 0) {
        PyErr_SetString(PyExc_ValueError, "trellis_encode needs L - k * V >= 3 and V in {1, 2}");
        return NULL;
    }
    Py_RETURN_NONE;
}


/* ---------------------------------------------------------------------------------------------
 * Decode kernels: each call fills an io_t and the codebook's struct from the arguments, then
 * splits the output rows over the thread pool. Pointers are tensor.data_ptr() values. */

typedef enum { GRID, LATTICE, TRELLIS, OUTLIER, BF16, HADAMARD } family_t;

typedef struct {
    const kernel_set_t *ks;
    family_t family;
    int decode; /* rows of W instead of x W^T */
    io_t io;
    grid_t grid;
    lattice_t lattice;
    trellis_layer_t trellis;
    outlier_split_t outlier;
    bf16_t bf16;
    hadamard_t hadamard;
} call_t;

static void run_task(void *ctx, int64_t lo, int64_t hi) {
    const call_t *c = ctx;
    const kernel_set_t *k = c->ks;
    if (c->decode) {
        lo += c->io.row0, hi += c->io.row0;
        if (c->family == GRID) k->grid_decode(&c->io, &c->grid, lo, hi);
        else if (c->family == LATTICE) k->lattice_decode(&c->io, &c->lattice, lo, hi);
        else if (c->family == OUTLIER) {
            if (c->outlier.table.levels) k->table_decode(&c->io, &c->outlier.table, lo, hi);
            else k->grid_decode(&c->io, &c->outlier.grid, lo, hi);
            k->outlier_decode(&c->io, &c->outlier, lo, hi);
        }
        else k->trellis_decode(&c->io, &c->trellis, lo, hi);
        return;
    }
    switch (c->family) {
    case GRID:
        if (c->io.q8.q) k->grid_matvec_q8(&c->io, &c->grid, lo, hi);
        else k->grid_matvec(&c->io, &c->grid, lo, hi);
        break;
    case LATTICE:
        if (c->io.q8.q) k->lattice_matvec_q8(&c->io, &c->lattice, lo, hi);
        else k->lattice_matvec(&c->io, &c->lattice, lo, hi);
        break;
    case TRELLIS:
        if (c->io.q8.q) k->trellis_matvec_q8(&c->io, &c->trellis, lo, hi);
        else k->trellis_matvec(&c->io, &c->trellis, lo, hi);
        break;
    case OUTLIER: /* the inliers' kernel over whole rows, then the outliers' corrections, 64 rows at a
                   * time: the corrections read the codes again, while they are still in cache */
        for (int64_t start = lo; start < hi; start += 64) {
            const int64_t end = start + 64 < hi ? start + 64 : hi;
            if (c->outlier.table.levels) k->table_matvec(&c->io, &c->outlier.table, start, end);
            else k->grid_matvec(&c->io, &c->outlier.grid, start, end);
            k->outlier_matvec(&c->io, &c->outlier, start, end);
        }
        break;
    case BF16: k->bf16_matvec(&c->io, &c->bf16, lo, hi); break;
    case HADAMARD: k->hadamard(&c->io, &c->hadamard, lo, hi); break;
    }
}

/* A whole linear layer in one call (the eager fast path of QuantizedLinear): the input transform
 * (Hadamard with factor in_K and signs before it; in_K = 0: none), the matvec, the output transform
 * (factor out_K, scales after it), then the bias. */
typedef struct {
    long long in_K, out_K;
    unsigned long long in_hk, in_pre, out_hk, out_post, bias;
} epilogue_t;

/* Common leading arguments of every kernel call:
 *   decode (0: y = x W^T for all rows; 1: rows [lo, hi) of W into y), lo, hi, threads,
 *   x, batch, rows, cols, y, and the layer's transforms and bias (epilogue_t; all 0 for none) */
#define IO_FORMAT "iLLiKLLLKLKKLKKK"
#define IO_ARGS &decode, &lo, &hi, &threads, &x, &c.io.batch, &c.io.rows, &c.io.cols, &y, &ep.in_K, &ep.in_hk, \
                &ep.in_pre, &ep.out_K, &ep.out_hk, &ep.out_post, &ep.bias

static void transform_rows(const kernel_set_t *ks, const float *x, float *y, int64_t batch, int64_t n, long long K,
                           unsigned long long hk, unsigned long long pre, unsigned long long post,
                           atomic_int *out_of_memory) {
    const io_t io = {.x = x, .y = y, .batch = batch, .rows = 0, .cols = n, .row0 = 0, .out_of_memory = out_of_memory};
    const hadamard_t h = {.n = n, .K = K, .hk = (const float *)hk, .pre = (const uint16_t *)pre,
                          .post = (const uint16_t *)post};
    ks->hadamard(&io, &h, 0, batch);
}

/* The process's activations setting: 8 rounds a matvec's activations to int8 wherever an integer
 * kernel serves the layer (q8_applies; quipkit/kernels/activations.py is its oracle), 32 keeps them. */
static int activation_bits = 32;

static int q8_applies(const call_t *c) {
    if (c->io.cols % Q8_BLOCK != 0) return 0;
    if (c->family == LATTICE) return c->lattice.second == 0;
    if (c->family == TRELLIS) return c->trellis.V == 1 && c->trellis.code == CODE_1MAD;
    if (c->family == GRID)
        return (c->grid.bits == 4 || c->grid.bits == 8) && (c->grid.scales == NULL || c->grid.group_size % Q8_BLOCK == 0);
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* rounding runs on every prefill's rows: compiled for AVX-512 and AVX2 too, picked at load time */
#define Q8_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define Q8_CLONES
#endif

/* One row x [cols] (cols a multiple of Q8_BLOCK) rounded to int8 as kernels.h's q8_t says, into q
 * [cols], scales and block_sums [cols / Q8_BLOCK]. Adding and subtracting 1.5 x 2^23 rounds a float
 * below 2^22 in magnitude half to even, as torch.round does, so the Python oracle gets the same
 * integers (in plain arithmetic the compiler vectorises; nearbyintf was a library call per value). A
 * block holding a NaN or an infinity gets q = 0 and scale NaN, so the outputs it reaches are NaN. */
Q8_CLONES __attribute__((optimize("fp-contract=off"))) /* x * inv is rounded before the add, as in torch: no FMA */
static void quantize_q8(const float *x, int64_t cols, int8_t *q, float *scales, int32_t *block_sums) {
    for (int64_t k = 0; k < cols / Q8_BLOCK; k++) {
        const float *v = x + k * Q8_BLOCK;
        int32_t top = 0; /* the largest |v| as bits: ordered like the floats, infinity and NaN above all */
        for (int i = 0; i < Q8_BLOCK; i++) {
            int32_t bits;
            memcpy(&bits, v + i, 4);
            bits &= 0x7FFFFFFF;
            top = bits > top ? bits : top;
        }
        const int finite = top < 0x7F800000;
        float amax;
        memcpy(&amax, &top, 4);
        const float inv = amax > 0.0f && finite ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (int i = 0; i < Q8_BLOCK; i++) {
            const float scaled = v[i] * inv;
            float r = (scaled + 12582912.0f) - 12582912.0f;
            r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
            q[k * Q8_BLOCK + i] = (int8_t)r;
            total += (int32_t)r;
        }
        scales[k] = finite ? amax / 127.0f : NAN;
        block_sums[k] = total;
    }
}

/* q x scale for `count` values (whole blocks) into out. */
Q8_CLONES static void dequantize_q8(const int8_t *q, const float *scales, int64_t count, float *out) {
    for (int64_t k = 0; k < count / Q8_BLOCK; k++)
        for (int i = 0; i < Q8_BLOCK; i++) out[k * Q8_BLOCK + i] = (float)q[k * Q8_BLOCK + i] * scales[k];
}

/* x [batch, cols] rounded into one allocation (freed by the caller; NULL when out of memory) that
 * io->q8 points into when the tier has the integer kernel (`integer`); without one, io->x points to
 * the rounded values q x scale in float32, for the float kernel. */
static void *round_activations(io_t *io, int integer) {
    const int64_t batch = io->batch, cols = io->cols, blocks = cols / Q8_BLOCK;
    char *memory = malloc((size_t)(batch * (cols + 8 * blocks + (integer ? 0 : 4 * cols))));
    if (memory == NULL) return NULL;
    int8_t *q = (int8_t *)memory;
    float *scales = (float *)(memory + batch * cols);
    int32_t *block_sums = (int32_t *)(scales + batch * blocks);
    for (int64_t b = 0; b < batch; b++)
        quantize_q8(io->x + b * cols, cols, q + b * cols, scales + b * blocks, block_sums + b * blocks);
    if (integer) {
        io->q8 = (q8_t){.q = q, .scales = scales, .block_sums = block_sums};
        return memory;
    }
    float *rounded = (float *)(block_sums + batch * blocks);
    dequantize_q8(q, scales, batch * cols, rounded);
    io->x = rounded;
    return memory;
}

/* What a kernel call raises when its scratch memory could not be had. */
static PyObject *scratch_error(void) {
    PyErr_SetString(PyExc_MemoryError,
                    "out of memory for a decode kernel's scratch buffers: free some memory (a smaller batch, "
                    "fewer threads) and run again");
    return NULL;
}

static PyObject *launch(call_t *c, const epilogue_t *ep, int decode, int64_t lo, int64_t hi, int threads,
                        unsigned long long x, unsigned long long y, int64_t grain) {
    if ((decode || c->family == HADAMARD) && (ep->in_K || ep->out_K || ep->bias)) {
        PyErr_SetString(PyExc_ValueError, "transforms and bias apply to a matvec only");
        return NULL;
    }
    c->ks = active_kernels();
    c->decode = decode;
    c->io.x = (const float *)x;
    c->io.y = (float *)y;
    c->io.row0 = decode ? lo : 0;
    const int64_t batch = c->io.batch, rows = c->io.rows, cols = c->io.cols;
    int64_t count = decode ? hi - lo : (c->family == HADAMARD ? batch : rows);
    float *rotated = NULL;
    if (ep->in_K) {
        rotated = malloc(sizeof(float) * (size_t)(batch * cols));
        if (rotated == NULL) return scratch_error();
    }
    const int rounding = !decode && activation_bits == 8 && q8_applies(c);
    void *rounded = NULL;
    atomic_int out_of_memory = 0;
    c->io.out_of_memory = &out_of_memory;
    Py_BEGIN_ALLOW_THREADS
    if (rotated) {
        transform_rows(c->ks, c->io.x, rotated, batch, cols, ep->in_K, ep->in_hk, ep->in_pre, 0, &out_of_memory);
        c->io.x = rotated;
    }
    if (rounding) {
        const int integer = c->family == GRID      ? c->ks->grid_matvec_q8 != NULL
                            : c->family == LATTICE ? c->ks->lattice_matvec_q8 != NULL
                                                   : c->ks->trellis_matvec_q8 != NULL;
        rounded = round_activations(&c->io, integer);
        if (rounded == NULL) out_of_memory = 1;
    }
    if (!out_of_memory) parallel_for(threads, count, grain, run_task, c);
    if (ep->out_K && !out_of_memory)
        transform_rows(c->ks, c->io.y, c->io.y, batch, rows, ep->out_K, ep->out_hk, 0, ep->out_post, &out_of_memory);
    if (ep->bias) {
        const float *bias = (const float *)ep->bias;
        for (int64_t b = 0; b < batch; b++)
            for (int64_t r = 0; r < rows; r++) c->io.y[b * rows + r] += bias[r];
    }
    Py_END_ALLOW_THREADS
    free(rotated);
    free(rounded);
    if (out_of_memory) return scratch_error();
    Py_RETURN_NONE;
}

/* After the common arguments come the layer's tensors (pointers, in the codebook's storage order,
 * 0 for absent ones), then its static spec. */
static PyObject *py_grid(PyObject *self, PyObject *args) {
    call_t c = {.family = GRID};
    epilogue_t ep;
    int decode, threads;
    long long lo, hi;
    unsigned long long x, y, codes, scales, zeros;
    if (!PyArg_ParseTuple(args, IO_FORMAT "KKKLiLLff", IO_ARGS, &codes, &scales, &zeros, &c.grid.row_bytes,
                          &c.grid.bits, &c.grid.group_size, &c.grid.groups, &c.grid.scale, &c.grid.zero))
        return NULL;
    c.grid.codes = (const uint8_t *)codes;
    c.grid.scales = (const uint16_t *)scales;
    c.grid.zeros = (const uint8_t *)zeros;
    return launch(&c, &ep, decode, lo, hi, threads, x, y, 16);
}

static PyObject *py_lattice(PyObject *self, PyObject *args) {
    call_t c = {.family = LATTICE};
    epilogue_t ep;
    int decode, threads;
    long long lo, hi;
    unsigned long long x, y, codes, codes2, patterns, parity, signed_patterns, second_table, pattern_words;
    if (!PyArg_ParseTuple(args, IO_FORMAT "KKiKKKKKf", IO_ARGS, &codes, &codes2, &c.lattice.second, &patterns, &parity,
                          &signed_patterns, &second_table, &pattern_words, &c.lattice.inv_residual))
        return NULL;
    c.lattice.pattern_words = (const uint16_t *)pattern_words;
    c.lattice.signed_patterns = (const float *)signed_patterns;
    c.lattice.codes = (const int16_t *)codes;
    c.lattice.codes2 = (const void *)codes2;
    c.lattice.patterns = (const float *)patterns;
    c.lattice.parity = (const uint8_t *)parity;
    c.lattice.second_table = (const float *)second_table;
    return launch(&c, &ep, decode, lo, hi, threads, x, y, 16);
}

static PyObject *py_trellis(PyObject *self, PyObject *args) {
    call_t c = {.family = TRELLIS};
    epilogue_t ep;
    int decode, threads;
    long long lo, hi;
    unsigned long long x, y, codes, table;
    if (!PyArg_ParseTuple(args, IO_FORMAT "KKiiiiI", IO_ARGS, &codes, &table, &c.trellis.L, &c.trellis.k, &c.trellis.V,
                          &c.trellis.code, &c.trellis.increment))
        return NULL;
    c.trellis.codes = (const uint8_t *)codes;
    c.trellis.table = (const float *)table;
    return launch(&c, &ep, decode, lo, hi, threads, x, y, 16);
}

static PyObject *py_outlier(PyObject *self, PyObject *args) {
    call_t c = {.family = OUTLIER};
    epilogue_t ep;
    int decode, threads;
    long long lo, hi;
    unsigned long long x, y, codes, scales, zeros, levels, low, step, positions, offsets;
    grid_t *g = &c.outlier.grid;
    if (!PyArg_ParseTuple(args, IO_FORMAT "KKKKKKKKLiLLL", IO_ARGS, &codes, &scales, &zeros, &levels, &low, &step,
                          &positions, &offsets, &g->row_bytes, &g->bits, &g->group_size, &g->groups,
                          &c.outlier.per_row))
        return NULL;
    g->codes = (const uint8_t *)codes;
    g->scales = (const uint16_t *)scales;
    g->zeros = (const uint8_t *)zeros;
    c.outlier.table = (table_t){.codes = g->codes, .row_bytes = g->row_bytes, .bits = g->bits,
                                .levels = (const uint16_t *)levels};
    c.outlier.low = (const uint16_t *)low;
    c.outlier.step = (const uint16_t *)step;
    c.outlier.positions = (const uint8_t *)positions;
    c.outlier.offsets = (const int64_t *)offsets;
    c.outlier.symbols = c.outlier.offsets[c.io.rows];
    return launch(&c, &ep, decode, lo, hi, threads, x, y, 16);
}

static PyObject *py_bf16(PyObject *self, PyObject *args) {
    call_t c = {.family = BF16};
    epilogue_t ep;
    int decode, threads;
    long long lo, hi;
    unsigned long long x, y, weight;
    if (!PyArg_ParseTuple(args, IO_FORMAT "K", IO_ARGS, &weight)) return NULL;
    c.bf16.weight = (const uint16_t *)weight;
    if (decode) {
        PyErr_SetString(PyExc_ValueError, "bf16 weights are decoded by a dtype conversion, not by this kernel");
        return NULL;
    }
    return launch(&c, &ep, 0, lo, hi, threads, x, y, 16);
}

static PyObject *py_hadamard(PyObject *self, PyObject *args) {
    call_t c = {.family = HADAMARD};
    epilogue_t ep;
    int decode, threads;
    long long lo, hi;
    unsigned long long x, y, hk, pre, post;
    if (!PyArg_ParseTuple(args, IO_FORMAT "LKKK", IO_ARGS, &c.hadamard.K, &hk, &pre, &post))
        return NULL;
    if (decode) {
        PyErr_SetString(PyExc_ValueError, "the Hadamard kernel has no decode mode");
        return NULL;
    }
    c.hadamard.n = c.io.cols;
    c.hadamard.hk = (const float *)hk;
    c.hadamard.pre = (const uint16_t *)pre;
    c.hadamard.post = (const uint16_t *)post;
    return launch(&c, &ep, 0, lo, hi, threads, x, y, 1);
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long x, weight, out;
    long long rows, n;
    float eps;
    if (!PyArg_ParseTuple(args, "KLLKfK", &x, &rows, &n, &weight, &eps, &out)) return NULL;
    rms_norm((const float *)x, rows, n, (const float *)weight, eps, (float *)out);
    Py_RETURN_NONE;
}

static PyObject *py_attention_step(PyObject *self, PyObject *args) {
    unsigned long long q, k, v, cos, sin, keys, values, out;
    float scale;
    long long position, length, heads, kv_heads, dim;
    if (!PyArg_ParseTuple(args, "KKKKKfKKLLLLLK", &q, &k, &v, &cos, &sin, &scale, &keys, &values, &position, &length,
                          &heads, &kv_heads, &dim, &out))
        return NULL;
    if (attention_step((const float *)q, (const float *)k, (const float *)v, (const float *)cos, (const float *)sin,
                       scale, (float *)keys, (float *)values, position, length, heads, kv_heads, dim, (float *)out))
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|z", &name)) return NULL;
    if (name != NULL && use_kernels(name) != 0) {
        PyErr_Format(PyExc_ValueError, "kernel tier '%s' is unknown or not supported by this CPU", name);
        return NULL;
    }
    return PyUnicode_FromString(active_kernels()->name);
}

static PyObject *py_activations(PyObject *self, PyObject *args) {
    int bits = 0;
    if (!PyArg_ParseTuple(args, "|i", &bits)) return NULL;
    if (bits != 0 && bits != 8 && bits != 32) {
        PyErr_Format(PyExc_ValueError, "activation bits must be 8 or 32, not %d", bits);
        return NULL;
    }
    if (bits) activation_bits = bits;
    return PyLong_FromLong(activation_bits);
}

/* rows x [batch, cols] -> y: each value replaced by q x scale, what every path of an int8-activation
 * layer multiplies (the prefill GEMM's input; quipkit/kernels/activations.py holds the oracle). Rows
 * are split over the thread pool, as the GEMM that follows uses every thread. */
typedef struct {
    const float *x;
    float *y;
    int64_t cols;
    atomic_int out_of_memory;
} round_rows_t;

static void round_rows_task(void *ctx, int64_t lo, int64_t hi) {
    round_rows_t *r = ctx;
    const int64_t cols = r->cols, blocks = cols / Q8_BLOCK;
    char *scratch = malloc((size_t)(cols + 8 * blocks));
    if (scratch == NULL) {
        atomic_store(&r->out_of_memory, 1);
        return;
    }
    int8_t *q = (int8_t *)scratch;
    float *scales = (float *)(scratch + cols);
    for (int64_t b = lo; b < hi; b++) {
        float *out = r->y + b * cols;
        quantize_q8(r->x + b * cols, cols, q, scales, (int32_t *)(scales + blocks));
        dequantize_q8(q, scales, cols, out);
    }
    free(scratch);
}

static PyObject *py_round_rows(PyObject *self, PyObject *args) {
    unsigned long long x, y;
    long long batch, cols;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLKi", &x, &batch, &cols, &y, &threads)) return NULL;
    if (cols % Q8_BLOCK != 0) {
        PyErr_Format(PyExc_ValueError, "rows of %lld columns are not whole blocks of %d", cols, Q8_BLOCK);
        return NULL;
    }
    round_rows_t r = {.x = (const float *)x, .y = (float *)y, .cols = cols, .out_of_memory = 0};
    Py_BEGIN_ALLOW_THREADS
    parallel_for(threads, batch, 1, round_rows_task, &r);
    Py_END_ALLOW_THREADS
    if (r.out_of_memory) return scratch_error();
    Py_RETURN_NONE;
}

static PyObject *py_integer_kernels(PyObject *self, PyObject *args) {
    const kernel_set_t *k = active_kernels();
    return PyBool_FromLong(k->grid_matvec_q8 != NULL && k->lattice_matvec_q8 != NULL && k->trellis_matvec_q8 != NULL);
}

static PyMethodDef methods[] = {
    {"e8p_nearest", py_e8p_nearest, METH_VARARGS,
     "e8p_nearest(x, count, patterns, lookup, codes): x float32[count, 8] -> codes int32[count]"},
    {"e8p_two_nearest", py_e8p_two_nearest, METH_VARARGS,
     "e8p_two_nearest(x, count, patterns, codes): x float32[count, 8] -> codes int32[count, 2], nearest first"},
    {"trellis_encode", py_trellis_encode, METH_VARARGS,
     "trellis_encode(x, count, T, L, k, V, table, states, costs): tail-biting Viterbi of float32[count, T] "
     "-> states int32[count, T / V], costs float32[count]"},
    {"grid", py_grid, METH_VARARGS, "integer-grid kernel (kernels.h: grid_t)"},
    {"lattice", py_lattice, METH_VARARGS, "E8P / residual lattice kernel (kernels.h: lattice_t)"},
    {"trellis", py_trellis, METH_VARARGS, "bitshift trellis kernel (kernels.h: trellis_layer_t)"},
    {"outlier", py_outlier, METH_VARARGS, "ICQuant kernel (kernels.h: outlier_split_t)"},
    {"bf16", py_bf16, METH_VARARGS, "dense bf16 matvec (kernels.h: bf16_t)"},
    {"hadamard", py_hadamard, METH_VARARGS, "orthonormal Hadamard transform of rows (kernels.h: hadamard_t)"},
    {"rms_norm", py_rms_norm, METH_VARARGS,
     "rms_norm(x, rows, n, weight, eps, out): float32 [rows, n] (decoder_step.c)"},
    {"attention_step", py_attention_step, METH_VARARGS,
     "attention_step(q, k, v, cos, sin, scale, keys, values, position, length, heads, kv_heads, dim, out): "
     "one position's rotary embedding, KV cache write and attention, float32 (decoder_step.c)"},
    {"activations", py_activations, METH_VARARGS,
     "activations(bits=0): 8 rounds matvec activations to int8 where an integer kernel applies, 32 does not; "
     "returns the setting"},
    {"round_rows", py_round_rows, METH_VARARGS,
     "round_rows(x, batch, cols, y, threads): float32 rows rounded to int8 in blocks of 64, written back as q x scale"},
    {"integer_kernels", py_integer_kernels, METH_NOARGS,
     "whether the tier in use multiplies int8 activations as integers (else it rounds them for its float kernels)"},
    {"isa", py_isa, METH_VARARGS, "isa(name=None): the kernel tier in use, after switching to `name` if given"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "quipkit's compiled helpers", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
