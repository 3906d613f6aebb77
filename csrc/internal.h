/* internal.h: helpers shared by the kernel files; not part of the Python-facing surface. */
#ifndef NEOCORE_INTERNAL_H
#define NEOCORE_INTERNAL_H

#include <stdint.h>
#include <string.h>
#include "neocore.h"

#if defined(__x86_64__)
#include <immintrin.h>
/* The AVX2+FMA paths are compiled per function, so the library itself stays portable. */
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))
#endif

static inline float bf16_to_f32(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Element i of an fp32 or bf16 array; dtype is a constant where it is inlined, so each use
 * compiles to one plain load (and for bf16 a shift that vectorises). */
static inline __attribute__((always_inline)) float fp_element(const void *data, NeoDType dtype, size_t i)
{
    return dtype == NEO_BF16 ? bf16_to_f32(((const uint16_t *)data)[i]) : ((const float *)data)[i];
}

/* sum_i a[i] * b[i] (b fp32 or bf16) for the portable path, in an order fixed by the source so
 * that the compiler may vectorise it but never reorder it (no -ffast-math): lane l sums the
 * products at i = l (mod DOT_LANES) in index order, the lanes are then folded in halves (lane
 * l + 8 into l, then + 4, + 2, + 1), and the tail is added last. 16 lanes are four 128-bit
 * vectors (SSE2, NEON), enough independent sums to hide the add latency. Constant loop bounds
 * throughout, so the fold unrolls too; size_t indices, because Python's build flags include
 * -fwrapv, under which an int index i + l may wrap and the loads are no longer contiguous. */
#define DOT_LANES 16
static inline __attribute__((always_inline)) float dot_lanes(const NeoDType dtype, const float *restrict a,
                                                             const void *restrict b, size_t n)
{
    float acc[DOT_LANES] = {0};
    size_t i = 0;
    for (; i + DOT_LANES <= n; i += DOT_LANES)
        for (size_t l = 0; l < DOT_LANES; l++) acc[l] += a[i + l] * fp_element(b, dtype, i + l);
    for (int l = 0; l < 8; l++) acc[l] += acc[l + 8];
    for (int l = 0; l < 4; l++) acc[l] += acc[l + 4];
    for (int l = 0; l < 2; l++) acc[l] += acc[l + 2];
    float sum = acc[0] + acc[1];
    for (; i < n; i++) sum += a[i] * fp_element(b, dtype, i);
    return sum;
}

/* Element (row, col) of a weight matrix with cols columns, widened to fp32. */
static inline float matrix_element(const NeoMatrix *m, size_t row, size_t col, size_t cols)
{
    const size_t i = row * cols + col;
    switch (m->dtype) {
    case NEO_BF16: return bf16_to_f32(((const uint16_t *)m->data)[i]);
    case NEO_I8: {
        const size_t blocks = (cols + NEO_I8_BLOCK - 1) / NEO_I8_BLOCK;
        return ((const int8_t *)m->data)[i] * m->scales[row * blocks + col / NEO_I8_BLOCK];
    }
    default: return ((const float *)m->data)[i];
    }
}

/* A step's rows of one sequence: rows row0 .. row0 + n_rows - 1 (in the step's order) at
 * positions pos0 ... of sequence seq. */
typedef struct {
    int seq;
    int pos0;
    int row0;
    int n_rows;
} Segment;

void layernorm_forward(float *out, const float *x, const float *weight, const float *bias,
                       int T, int C, float eps, int n_threads);
/* x[t] = wte[tokens[t]] + wpe[positions[t]] */
void embedding_forward(float *x, const int32_t *tokens, const int32_t *positions, int T,
                       const NeoMatrix *wte, const NeoMatrix *wpe, int C);
/* One layer's attention for every row of a step: row r belongs to segments[row_segment[r]]
 * and reads that sequence's key/value cache of this layer. */
void attention_forward(float *out, const float *q, const float *k_new, const float *v_new,
                       const NeoSequence *sequences, int layer, int slots,
                       const Segment *segments, const int32_t *row_segment, int n_rows,
                       int n_heads, int head_dim, int window, float *scores, int scores_stride,
                       int n_threads, NeoIsa isa);

#endif
