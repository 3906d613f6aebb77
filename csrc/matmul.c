/* matmul.c: out[t, n] (+)= bias[n] + sum_k x[t, k] * w[n, k]
 *
 * x is fp32 [T, K]; w is [N, K] (nn.Linear layout) in fp32 or bf16, widened to fp32 on load;
 * every sum is accumulated in fp32. Threads split the output columns n with a static
 * schedule and each output is summed by one thread in a fixed order, so the result does not
 * depend on the thread count. Two paths: a scalar reference and an AVX2+FMA path. */
#include <string.h>
#include "neocore.h"
#include "internal.h"

/* Adds the bias and either stores or adds to what out holds (a fused residual add). */
static inline void store_output(float *out, float sum, const float *bias, int n, int accumulate)
{
    float value = bias ? sum + bias[n] : sum;
    *out = accumulate ? *out + value : value;
}

static void matmul_generic(float *out, const float *x, const void *w, NeoDType dtype,
                           const float *bias, int T, int K, int N, int accumulate, int n_threads)
{
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        for (int t = 0; t < T; t++) {
            float sum = 0.0f;
            for (int k = 0; k < K; k++)
                sum += x[(size_t)t * K + k] * matrix_element(w, dtype, (size_t)n * K + k);
            store_output(&out[(size_t)t * N + n], sum, bias, n, accumulate);
        }
    }
}

/* ---- AVX2 + FMA ------------------------------------------------------------------------ */
#if defined(__x86_64__)
#include <immintrin.h>

#define TILE_ROWS 4    /* weight rows (outputs) in one register tile */
#define TILE_TOKENS 3  /* input rows in one register tile: 3 x 4 accumulators + 4 weights fit 16 ymm */
#define ROW_BLOCK 32   /* weight rows that stay in cache while every input row passes over them */

#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))

INLINE_AVX2 __m256 widen8(const void *w, NeoDType dtype, size_t i)
{
    if (dtype == NEO_BF16) {
        /* bf16 is the top half of an fp32: zero-extend to 32 bits and shift into place. */
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)w + i);
}

INLINE_AVX2 float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One register tile: n_tokens input rows from t0 against TILE_ROWS weight rows from n0.
 * Rows past N are read as row N-1 and not stored, so edges need no second kernel.
 * n_tokens and dtype are constants at each call site, so the compiler specialises them. */
INLINE_AVX2 void tile_avx2(const int n_tokens, const NeoDType dtype, float *out, const float *x,
                           const void *w, const float *bias, int t0, int n0, int K, int N,
                           int accumulate)
{
    const float *xr[TILE_TOKENS];
    size_t wr[TILE_ROWS];
    __m256 acc[TILE_TOKENS][TILE_ROWS];
    for (int i = 0; i < n_tokens; i++) {
        xr[i] = x + (size_t)(t0 + i) * K;
        for (int r = 0; r < TILE_ROWS; r++) acc[i][r] = _mm256_setzero_ps();
    }
    for (int r = 0; r < TILE_ROWS; r++) wr[r] = (size_t)(n0 + r < N ? n0 + r : N - 1) * K;

    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[TILE_ROWS];
        for (int r = 0; r < TILE_ROWS; r++) wv[r] = widen8(w, dtype, wr[r] + k);
        for (int i = 0; i < n_tokens; i++) {
            __m256 xv = _mm256_loadu_ps(xr[i] + k);
            for (int r = 0; r < TILE_ROWS; r++) acc[i][r] = _mm256_fmadd_ps(wv[r], xv, acc[i][r]);
        }
    }
    for (int i = 0; i < n_tokens; i++) {
        for (int r = 0; r < TILE_ROWS && n0 + r < N; r++) {
            float sum = hsum8(acc[i][r]);
            for (int kk = k; kk < K; kk++) sum += xr[i][kk] * matrix_element(w, dtype, wr[r] + kk);
            store_output(&out[(size_t)(t0 + i) * N + n0 + r], sum, bias, n0 + r, accumulate);
        }
    }
}

INLINE_AVX2 void row_block_avx2(const NeoDType dtype, float *out, const float *x, const void *w,
                                const float *bias, int T, int K, int N, int n_begin, int n_end,
                                int accumulate)
{
    int t = 0;
    for (; t + TILE_TOKENS <= T; t += TILE_TOKENS)
        for (int n = n_begin; n < n_end; n += TILE_ROWS)
            tile_avx2(TILE_TOKENS, dtype, out, x, w, bias, t, n, K, N, accumulate);
    for (; t < T; t++)
        for (int n = n_begin; n < n_end; n += TILE_ROWS)
            tile_avx2(1, dtype, out, x, w, bias, t, n, K, N, accumulate);
}

TARGET_AVX2 static void matmul_avx2(float *out, const float *x, const void *w, NeoDType dtype,
                                    const float *bias, int T, int K, int N, int accumulate,
                                    int n_threads)
{
    int n_blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int b = 0; b < n_blocks; b++) {
        int n_begin = b * ROW_BLOCK;
        int n_end = n_begin + ROW_BLOCK < N ? n_begin + ROW_BLOCK : N;
        if (dtype == NEO_BF16)
            row_block_avx2(NEO_BF16, out, x, w, bias, T, K, N, n_begin, n_end, accumulate);
        else
            row_block_avx2(NEO_F32, out, x, w, bias, T, K, N, n_begin, n_end, accumulate);
    }
}

#endif

void matmul_forward(float *out, const float *x, const void *w, NeoDType dtype, const float *bias,
                    int T, int K, int N, int accumulate, int n_threads, NeoIsa isa)
{
#if defined(__x86_64__)
    if (isa == NEO_ISA_AVX2) {
        matmul_avx2(out, x, w, dtype, bias, T, K, N, accumulate, n_threads);
        return;
    }
#endif
    matmul_generic(out, x, w, dtype, bias, T, K, N, accumulate, n_threads);
}
