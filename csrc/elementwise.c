/* elementwise.c: the per-position operations of a GPT-Neo block. */
#include <math.h>
#include <string.h>
#include "internal.h"

void embedding_forward(float *x, const int32_t *tokens, const int32_t *positions, int T,
                       const NeoMatrix *wte, const NeoMatrix *wpe, int C)
{
    for (int t = 0; t < T; t++)
        for (int i = 0; i < C; i++)
            x[(size_t)t * C + i] = matrix_element(wte, tokens[t], i, C)
                                 + matrix_element(wpe, positions[t], i, C);
}

/* sum_i f(row[i]) in double over LN_LANES fixed lanes (lane l takes i = l mod LN_LANES, in
 * order), folded in order, then the tail: independent sums, so the compiler vectorises them
 * and no add waits on the one before (one chain of double adds cost 4 cycles an element). */
#define LN_LANES 8
static inline __attribute__((always_inline)) double sum_lanes(const float *row, int C, float mean,
                                                              int squares)
{
    double acc[LN_LANES] = {0};
    size_t i = 0;
    for (; i + LN_LANES <= (size_t)C; i += LN_LANES)
        for (size_t l = 0; l < LN_LANES; l++) {
            const double d = (double)row[i + l] - mean;
            acc[l] += squares ? d * d : d;
        }
    double sum = 0.0;
    for (int l = 0; l < LN_LANES; l++) sum += acc[l];
    for (; i < (size_t)C; i++) {
        const double d = (double)row[i] - mean;
        sum += squares ? d * d : d;
    }
    return sum;
}

/* Mean and variance are summed in double so the statistics are exact to fp32 whatever C is. */
void layernorm_forward(float *out, const float *x, const float *weight, const float *bias,
                       int T, int C, float eps, int n_threads)
{
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (T > 1)
    for (int t = 0; t < T; t++) {
        const float *row = x + (size_t)t * C;
        float *dst = out + (size_t)t * C;
        float mean = (float)(sum_lanes(row, C, 0.0f, 0) / C);
        double sq = sum_lanes(row, C, mean, 1);
        float rstd = (float)(1.0 / sqrt(sq / C + eps));
        for (int i = 0; i < C; i++) dst[i] = (row[i] - mean) * rstd * weight[i] + bias[i];
    }
}

/* gelu_new, the tanh form as transformers' NewGELUActivation writes it:
 * 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
#define SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f

/* The scalar reference: libm's tanhf, one value at a time. */
static void gelu_new_scalar(float *x, size_t n, int n_threads)
{
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n > 8192)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v)));
    }
}

/* The portable path: the same e^x (exp_portable, internal.h) and tanh as the AVX2 path below,
 * in plain C without calls or branches, so that the compiler vectorises the loop. */
static inline float tanh_portable(float u)
{
    const uint32_t sign = float_bits(u) & 0x80000000u;
    const float a = bits_float(float_bits(u) ^ sign), a2 = a * a;
    const float big = 1.0f - 2.0f / (exp_portable(a + a) + 1.0f);
    float p = 62.0f / 2835;
    p = p * a2 - 17.0f / 315;
    p = p * a2 + 2.0f / 15;
    p = p * a2 - 1.0f / 3;
    const float small = p * a2 * a + a;
    return bits_float(float_bits(select_float(a < 0.25f, small, big)) | sign);
}

static void gelu_new_generic(float *restrict x, size_t n, int n_threads)
{
    #pragma omp parallel for simd num_threads(n_threads) schedule(static) if (n > 8192)
    for (size_t i = 0; i < n; i++) {
        const float v = x[i], half_v = 0.5f * v;
        x[i] = half_v + half_v * tanh_portable(SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v));
    }
}

#if defined(__x86_64__)
/* e^x for x in [-87, 88]: 2^n e^r with n = round(x / ln 2), |r| <= ln(2)/2, ln 2 split in two
 * so r is exact, and e^r by its Taylor series to r^7 (error below half an fp32 ulp). */
INLINE_AVX2 __m256 exp_avx2(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* tanh: an odd Taylor polynomial below |u| = 0.25 (where 1 - 2/(e^2u + 1) would cancel),
 * that expression above it; the sign is put back at the end. Within 4 ulp of tanhf. */
INLINE_AVX2 __m256 tanh_avx2(__m256 u)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_andnot_ps(sign, u);
    __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                               _mm256_div_ps(_mm256_set1_ps(2.0f),
                                             _mm256_add_ps(exp_avx2(_mm256_add_ps(a, a)), _mm256_set1_ps(1.0f))));
    __m256 a2 = _mm256_mul_ps(a, a);
    __m256 p = _mm256_set1_ps(62.0f / 2835);
    p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(-17.0f / 315));
    p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(2.0f / 15));
    p = _mm256_fmadd_ps(p, a2, _mm256_set1_ps(-1.0f / 3));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, a2), a, a);
    __m256 t = _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.25f), _CMP_LT_OQ));
    return _mm256_or_ps(t, _mm256_and_ps(u, sign));
}

INLINE_AVX2 __m256 gelu_new8_avx2(__m256 v)
{
    __m256 cube = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI), _mm256_fmadd_ps(_mm256_set1_ps(GELU_CUBIC), cube, v));
    __m256 half_v = _mm256_mul_ps(_mm256_set1_ps(0.5f), v);
    return _mm256_fmadd_ps(half_v, tanh_avx2(u), half_v);
}

/* gelu_new on x over threads, for a SIMD path whose span function gelus n values, n a multiple
 * of its width: spans of GELU_SPAN values to each thread, then the last n % width values through
 * the same vector code, padded (a value's result must not depend on where it lies in x, which
 * holds every row of a step and so changes with the batch). The span is a function of its own,
 * called here with no vector value in sight: clang does not carry a function's target into its
 * OpenMP body, where vector values then fail to compile ("AVX vector argument ... changes the
 * ABI"). */
#define GELU_SPAN 1024
#define GELU_WIDEST 16
typedef void GeluSpan(float *x, size_t n);

static void gelu_new_spans(GeluSpan *span, size_t width, float *x, size_t n, int n_threads)
{
    const size_t whole = n / width * width;
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n > 8192)
    for (size_t i = 0; i < whole; i += GELU_SPAN) span(x + i, whole - i < GELU_SPAN ? whole - i : GELU_SPAN);
    if (whole < n) {
        float tail[GELU_WIDEST] = {0};
        memcpy(tail, x + whole, sizeof(float) * (n - whole));
        span(tail, width);
        memcpy(x + whole, tail, sizeof(float) * (n - whole));
    }
}

TARGET_AVX2 static void gelu_new_span_avx2(float *x, size_t n)
{
    for (size_t i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, gelu_new8_avx2(_mm256_loadu_ps(x + i)));
}

/* The AVX-512 path: the AVX2 path's e^x, tanh and gelu_new on 16 lanes. (The portable loop
 * cannot serve here: GCC outlines its OpenMP body once, without the caller's target, and it
 * ran as SSE2 code on AVX-512 CPUs.) Sign and magnitude through integer ops: AVX-512F has no
 * float and/or. */
INLINE_AVX512 __m512 exp_avx512(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);  /* p 2^n, rounded as the AVX2 path's product by 2^n */
}

INLINE_AVX512 __m512 tanh_avx512(__m512 u)
{
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    __m512 a = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(u)));
    __m512 big = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                               _mm512_div_ps(_mm512_set1_ps(2.0f),
                                             _mm512_add_ps(exp_avx512(_mm512_add_ps(a, a)), _mm512_set1_ps(1.0f))));
    __m512 a2 = _mm512_mul_ps(a, a);
    __m512 p = _mm512_set1_ps(62.0f / 2835);
    p = _mm512_fmadd_ps(p, a2, _mm512_set1_ps(-17.0f / 315));
    p = _mm512_fmadd_ps(p, a2, _mm512_set1_ps(2.0f / 15));
    p = _mm512_fmadd_ps(p, a2, _mm512_set1_ps(-1.0f / 3));
    __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, a2), a, a);
    __m512 t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.25f), _CMP_LT_OQ), big, small);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t),
                                               _mm512_and_si512(_mm512_castps_si512(u), sign)));
}

INLINE_AVX512 __m512 gelu_new16_avx512(__m512 v)
{
    __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(SQRT_2_OVER_PI), _mm512_fmadd_ps(_mm512_set1_ps(GELU_CUBIC), cube, v));
    __m512 half_v = _mm512_mul_ps(_mm512_set1_ps(0.5f), v);
    return _mm512_fmadd_ps(half_v, tanh_avx512(u), half_v);
}

TARGET_AVX512 static void gelu_new_span_avx512(float *x, size_t n)
{
    for (size_t i = 0; i < n; i += 16) _mm512_storeu_ps(x + i, gelu_new16_avx512(_mm512_loadu_ps(x + i)));
}

_Static_assert(GELU_SPAN % GELU_WIDEST == 0 && GELU_WIDEST == 16, "spans are whole vectors of either path");
#endif

void gelu_new_forward(float *x, size_t n, int n_threads, NeoIsa isa)
{
#if defined(__x86_64__)
    if (isa == NEO_ISA_AVX2) {
        gelu_new_spans(gelu_new_span_avx2, 8, x, n, n_threads);
        return;
    }
    if (isa == NEO_ISA_AVX512) {
        gelu_new_spans(gelu_new_span_avx512, 16, x, n, n_threads);
        return;
    }
#endif
    if (isa == NEO_ISA_SCALAR)
        gelu_new_scalar(x, n, n_threads);
    else
        gelu_new_generic(x, n, n_threads);
}
