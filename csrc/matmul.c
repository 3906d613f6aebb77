/* matmul.c: out[t, n] (+)= bias[n] + sum_k x[t, k] * w[n, k]
 *
 * x is fp32 [T, K]; w is [N, K] (nn.Linear layout) in fp32, bf16 or int8, widened to fp32 on
 * load (int8 times its block's scale, rounded as matrix_element does); every sum is accumulated in fp32. Threads split the output columns n with a static
 * schedule and each output is summed by one thread in a fixed order, so the result does not
 * depend on the thread count, nor on the other rows: the decode kernel (matvec_forward) sums
 * each row as it would alone, the prefill GEMM (matmul_forward) sums each output along k.
 * Paths: the scalar reference (the tests' oracle), the portable path (plain C the compiler
 * vectorises), AVX2+FMA here, and AVX-512 in matmul_avx512.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "neocore.h"
#include "internal.h"

/* ---- scalar reference: one product at a time, k in order ------------------------------- */

static void matmul_scalar(float *out, const float *x, const NeoMatrix *w, const float *bias,
                          int T, int K, int N, int accumulate, int n_threads)
{
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++) {
        for (int t = 0; t < T; t++) {
            float sum = 0.0f;
            for (int k = 0; k < K; k++)
                sum += x[(size_t)t * K + k] * matrix_element(w, n, k, K);
            store_output(&out[(size_t)t * N + n], sum, bias, n, accumulate);
        }
    }
}

/* ---- portable path: contiguous constant-length inner loops the compiler vectorises -------- */

/* Row n of w as fp32: fp32 rows are used in place, others are widened into buf (bf16 by a
 * 16-bit shift, which vectorises as zero-extend and shift). */
static const float *weight_row(float *restrict buf, const NeoMatrix *w, int n, int K)
{
    const size_t first = (size_t)n * K;
    if (w->dtype == NEO_F32) return (const float *)w->data + first;
    if (w->dtype == NEO_BF16) {
        const uint16_t *restrict src = (const uint16_t *)w->data + first;
        for (int k = 0; k < K; k++) buf[k] = bf16_to_f32(src[k]);
    } else {
        for (int k = 0; k < K; k++) buf[k] = matrix_element(w, n, k, K);
    }
    return buf;
}

/* Decode: each weight row is read from memory once and dotted with every row of x, widened on
 * the fly (dot_lanes, the same order for every row whatever T is). int8 rows are widened into
 * buf first. */
static void matvec_generic(float *out, const float *x, const NeoMatrix *w, const float *bias,
                           int T, int K, int N, int accumulate, int n_threads)
{
    #pragma omp parallel num_threads(n_threads)
    {
        float *buf = w->dtype == NEO_I8 ? malloc(sizeof(float) * (size_t)K) : NULL;
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const size_t first = (size_t)n * K;
            for (int t = 0; t < T; t++) {
                const float *xt = x + (size_t)t * K;
                float sum;
                if (w->dtype == NEO_BF16)
                    sum = dot_lanes(NEO_BF16, xt, (const uint16_t *)w->data + first, K);
                else if (w->dtype == NEO_F32)
                    sum = dot_lanes(NEO_F32, xt, (const float *)w->data + first, K);
                else if (buf)
                    sum = dot_lanes(NEO_F32, xt, weight_row(buf, w, n, K), K);
                else
                    continue;  /* out of memory: leave the output rather than crash */
                store_output(&out[(size_t)t * N + n], sum, bias, n, accumulate);
            }
        }
        free(buf);
    }
}

/* Prefill: W is widened once into fp32 panels of GEN_PANEL columns ([K][GEN_PANEL]); a tile of
 * GEN_ROWS x GEN_PANEL sums runs over k, each x[t, k] times the panel's row k, so every output
 * is summed along k in order whatever T is. The tile is written with the compiler's generic
 * vectors (GCC/Clang vector_size: SSE2 on x86-64, NEON on aarch64, scalar code elsewhere)
 * because GCC's auto-vectoriser kept the same tile written as float arrays in memory, storing
 * and reloading every sum at every k (4x slower). x is broadcast into vectors once per call,
 * GEN_BLOCK_ROWS rows at a time to bound that buffer: SSE2 has no broadcast load, and
 * shuffling inside the tile measured 15% slower. 12 accumulators of 4 floats + a product fit
 * the 16 registers of SSE2. */
#define GEN_PANEL 12
#define GEN_ROWS 4
#define GEN_BLOCK_ROWS 128
typedef float f32x4 __attribute__((vector_size(16)));

/* panel[k][j] = w[n0 + j, k] widened, zero past N. k runs outside so that the panel is
 * written in order while its GEN_PANEL rows are read as parallel streams. */
static inline __attribute__((always_inline)) void
pack_panel_rows(const NeoDType dtype, float *restrict panel, const void *data, int n0, int K, int N)
{
    const void *rows[GEN_PANEL];
    for (int j = 0; j < GEN_PANEL; j++)
        rows[j] = (const char *)data + (size_t)(n0 + j < N ? n0 + j : N - 1) * K * dtype_bytes(dtype);
    for (int k = 0; k < K; k++)
        for (int j = 0; j < GEN_PANEL; j++)
            panel[(size_t)k * GEN_PANEL + j] = n0 + j < N ? fp_element(rows[j], dtype, k) : 0.0f;
}

static void pack_panel_generic(float *restrict panel, float *restrict buf, const NeoMatrix *w,
                               int n0, int K, int N)
{
    if (w->dtype == NEO_BF16) {
        pack_panel_rows(NEO_BF16, panel, w->data, n0, K, N);
    } else if (w->dtype == NEO_F32) {
        pack_panel_rows(NEO_F32, panel, w->data, n0, K, N);
    } else {  /* int8: each row widened first */
        for (int j = 0; j < GEN_PANEL; j++) {
            const float *row = n0 + j < N ? weight_row(buf, w, n0 + j, K) : NULL;
            for (int k = 0; k < K; k++) panel[(size_t)k * GEN_PANEL + j] = row ? row[k] : 0.0f;
        }
    }
}

/* out[t0.., n0..) for GEN_ROWS of the T broadcast rows xb ([T][K] vectors). Rows past T are
 * read as row T-1 and not stored. panel is 16-byte aligned. */
static void gemm_tile_generic(float *out, const f32x4 *xb, const float *restrict panel,
                              const float *bias, int t0, int n0, int T, int K, int N, int accumulate)
{
    const f32x4 *xr[GEN_ROWS];
    f32x4 acc[GEN_ROWS][GEN_PANEL / 4] = {{{0}}};
    for (int i = 0; i < GEN_ROWS; i++) xr[i] = xb + (size_t)(t0 + i < T ? t0 + i : T - 1) * K;
    for (int k = 0; k < K; k++) {
        const f32x4 *p = (const f32x4 *)(panel + (size_t)k * GEN_PANEL);
        for (int i = 0; i < GEN_ROWS; i++)
            for (int j = 0; j < GEN_PANEL / 4; j++) acc[i][j] += xr[i][k] * p[j];
    }
    for (int i = 0; i < GEN_ROWS && t0 + i < T; i++)
        for (int j = 0; j < GEN_PANEL && n0 + j < N; j++)
            store_output(&out[(size_t)(t0 + i) * N + n0 + j], acc[i][j / 4][j % 4], bias, n0 + j, accumulate);
}

static void gemm_generic(float *out, const float *x, const NeoMatrix *w, const float *bias,
                         int T, int K, int N, int accumulate, int n_threads)
{
    const int n_panels = (N + GEN_PANEL - 1) / GEN_PANEL;
    f32x4 *xb = alloc_lines(sizeof(f32x4) * GEN_BLOCK_ROWS * (size_t)K);
    if (!xb) return;  /* out of memory: leave the outputs rather than crash */
    #pragma omp parallel num_threads(n_threads)
    {
        float *panel = alloc_lines(sizeof(float) * GEN_PANEL * (size_t)K);
        float *buf = malloc(sizeof(float) * (size_t)K);
        for (int t0 = 0; t0 < T; t0 += GEN_BLOCK_ROWS) {
            const int rows = T - t0 < GEN_BLOCK_ROWS ? T - t0 : GEN_BLOCK_ROWS;
            const float *xt = x + (size_t)t0 * K;
            #pragma omp for schedule(static)
            for (size_t i = 0; i < (size_t)rows * K; i++) xb[i] = (f32x4){xt[i], xt[i], xt[i], xt[i]};
            #pragma omp for schedule(static)
            for (int p = 0; p < n_panels; p++) {
                if (!panel || !buf) continue;
                pack_panel_generic(panel, buf, w, p * GEN_PANEL, K, N);
                for (int t = 0; t < rows; t += GEN_ROWS)
                    gemm_tile_generic(out + (size_t)t0 * N, xb, panel, bias, t, p * GEN_PANEL, rows, K, N,
                                      accumulate);
            }
        }
        free(panel);
        free(buf);
    }
    free(xb);
}

/* ---- AVX2 + FMA ------------------------------------------------------------------------ */
/* (outside the x86 block: neo_decode_prefetch's rule for Zen 4 names them too) */
#define MV_ROWS 3          /* rows of x with all four lanes in registers: 12 accumulators */
#define MV_X_L1 (24 << 10) /* bytes of x that stay in L1 beside the weight rows */
#if defined(__x86_64__)
/* Decode (T = 1) is bound by reading the weights once. One row at a time keeps a single
 * sequential stream per thread, which the hardware prefetcher follows best (several rows side
 * by side measured 30-40% slower here); four accumulators hide the FMA latency. The stream is
 * prefetched as the CPU's maker wants (prefetch_stream, internal.h). */
#define MV_BLOCK 16           /* rows a thread takes at a time (static schedule) */

/* Prefill (T > 1) is bound by arithmetic: W is widened once into packed fp32 panels of
 * PANEL columns, and a GEMM_ROWS x PANEL register tile (12 ymm accumulators) runs over K. */
#define PANEL 16
#define GEMM_ROWS 6

/* One row of a weight matrix: its elements and, for int8, its block scales. */
typedef struct {
    NeoDType dtype;
    const void *data;
    const float *scales;
} MatrixRow;

static inline MatrixRow matrix_row(const NeoMatrix *w, size_t n, size_t K)
{
    const size_t size = dtype_bytes(w->dtype);
    const size_t blocks = (K + NEO_I8_BLOCK - 1) / NEO_I8_BLOCK;
    return (MatrixRow){w->dtype, (const char *)w->data + n * K * size,
                       w->dtype == NEO_I8 ? w->scales + n * blocks : NULL};
}

/* The scale of the int8 block holding column k, in every lane. */
INLINE_AVX2 __m256 block_scale(MatrixRow row, size_t k)
{
    return _mm256_broadcast_ss(row.scales + k / NEO_I8_BLOCK);
}

/* Elements k..k+7 of a row in fp32 (k a multiple of 8, so the 8 share one int8 block, whose
 * scale is given: block_scale(row, k), once for a run of vectors of one block). */
INLINE_AVX2 __m256 widen8(MatrixRow row, size_t k, __m256 scale)
{
    if (row.dtype == NEO_BF16) {
        /* bf16 is the top half of an fp32: zero-extend to 32 bits and shift into place. */
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row.data + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (row.dtype == NEO_I8) {
        /* sign-extend 8 bytes to int32, convert (exact) and round value * scale once */
        __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)row.data + k));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale);
    }
    return _mm256_loadu_ps((const float *)row.data + k);
}

/* widen8 for a vector on its own, looking its scale up. */
INLINE_AVX2 __m256 widen8_alone(MatrixRow row, size_t k)
{
    return widen8(row, k, row.dtype == NEO_I8 ? block_scale(row, k) : _mm256_setzero_ps());
}

/* The scalar tail of a row (columns past the last multiple of 8). */
static inline float row_element(MatrixRow row, int k)
{
    const NeoMatrix m = {row.dtype, row.data, row.scales};
    return matrix_element(&m, 0, k, 0);
}

INLINE_AVX2 float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The decode sums, one order for every row whatever the batch: sum_k x[t, k] * w[n, k] is
 * summed in four lanes, lane a taking columns k + 8a .. k + 8a + 7 of every 32-column step in
 * k order (the 8-column steps past the last 32-column one go to lane 0); the lanes are folded
 * as (l0 + l1) + (l2 + l3), summed across, and the columns past the last multiple of 8 are
 * added last. The lanes are independent sums, so a kernel may run them together (dot_rows_avx2)
 * or one after the other (dot_block_avx2) and get the same bits. */
#define MV_TILE_OUTS 2     /* weight rows a tile shares each x vector with (x past L1, or int8) */
#define MV_TILE_ROWS 6     /* rows of x a tile shares each widened weight vector with */
#define MV_SPAN 768        /* columns a tile runs over before the next tile: see below */
_Static_assert(NEO_I8_BLOCK % 32 == 0, "a 32-column step takes one int8 scale");
_Static_assert(MV_BLOCK % MV_TILE_OUTS == 0, "a block is whole tiles");

/* The end of a decode sum, from the four lanes of its 32-column steps. */
INLINE_AVX2 float decode_sum_end(__m256 l0, __m256 l1, __m256 l2, __m256 l3, MatrixRow row,
                                 const float *x, int K)
{
    for (int k = K / 32 * 32; k + 8 <= K; k += 8) l0 = _mm256_fmadd_ps(widen8_alone(row, k), _mm256_loadu_ps(x + k), l0);
    float sum = hsum8(_mm256_add_ps(_mm256_add_ps(l0, l1), _mm256_add_ps(l2, l3)));
    /* fmaf, not a * b + c, which the compiler fuses in some inlined copies and not others */
    for (int j = K / 8 * 8; j < K; j++) sum = fmaf(x[j], row_element(row, j), sum);
    return sum;
}

/* sums[r] = the decode sum of x row xr[r] and one weight row, for R <= MV_ROWS rows of x: all
 * four lanes of every row in registers, the weight row read once, in order, as one stream
 * (prefetched as how says, ahead bytes ahead), four FMA chains a row in flight. */
INLINE_AVX2 void dot_rows_avx2(const NeoDType dtype, const int R, NeoDecodePrefetch how, size_t ahead,
                               float *sums, const float *const *xr, MatrixRow row, int K)
{
    const size_t size = dtype_bytes(dtype);
    row.dtype = dtype;  /* the constant, so that widen8 compiles to one path */
    __m256 acc[4][MV_ROWS];
    for (int a = 0; a < 4; a++)
        for (int r = 0; r < R; r++) acc[a][r] = _mm256_setzero_ps();
    for (size_t k = 0; k < (size_t)K / 32 * 32; k += 32) {  /* size_t: -fwrapv int indices cost extensions */
        prefetch_stream(how, (const char *)row.data + k * size, 32 * size, ahead);
        const __m256 scale = dtype == NEO_I8 ? block_scale(row, k) : _mm256_setzero_ps();
        for (int a = 0; a < 4; a++) {
            const __m256 wv = widen8(row, k + 8 * a, scale);
            for (int r = 0; r < R; r++) acc[a][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr[r] + k + 8 * a), acc[a][r]);
        }
    }
    for (int r = 0; r < R; r++) sums[r] = decode_sum_end(acc[0][r], acc[1][r], acc[2][r], acc[3][r], row, xr[r], K);
}

/* dot_rows_avx2 compiled for each way of prefetching: with how a constant, its loop tests
 * nothing but k (EPYC, one row, alternating: the kernel alone int8 5-6%, bf16 1-5% faster;
 * whole int8 steps 6-9% faster, bf16 steps unchanged within noise). */
INLINE_AVX2 void dot_rows_prefetching(const NeoDType dtype, const int R, NeoDecodePrefetch how,
                                      size_t ahead, float *sums, const float *const *xr,
                                      MatrixRow row, int K)
{
    if (how == NEO_PREFETCH_NTA_NEAR)
        dot_rows_avx2(dtype, R, NEO_PREFETCH_NTA_NEAR, ahead, sums, xr, row, K);
    else if (how == NEO_PREFETCH_L2_FAR)
        dot_rows_avx2(dtype, R, NEO_PREFETCH_L2_FAR, ahead, sums, xr, row, K);
    else
        dot_rows_avx2(dtype, R, NEO_PREFETCH_NONE, ahead, sums, xr, row, K);
}

/* sums[o] = the decode sum of one row of x and weight row rows[o], o = 0, 1: the two weight
 * rows side by side, each x vector serving both, each row summed as dot_rows_avx2 sums it. */
INLINE_AVX2 void dot_row_pair_avx2(const NeoDType dtype, NeoDecodePrefetch how, size_t ahead,
                                   float *sums, const float *x, MatrixRow r0, MatrixRow r1, int K)
{
    const size_t size = dtype_bytes(dtype);
    MatrixRow rows[2] = {r0, r1};
    __m256 acc[4][2];
    for (int o = 0; o < 2; o++) {
        rows[o].dtype = dtype;  /* the constant, so that widen8 compiles to one path */
        for (int a = 0; a < 4; a++) acc[a][o] = _mm256_setzero_ps();
    }
    for (size_t k = 0; k < (size_t)K / 32 * 32; k += 32) {
        __m256 scale[2];
        for (int o = 0; o < 2; o++) {
            prefetch_stream(how, (const char *)rows[o].data + k * size, 32 * size, ahead);
            scale[o] = dtype == NEO_I8 ? block_scale(rows[o], k) : _mm256_setzero_ps();
        }
        for (int a = 0; a < 4; a++) {
            const __m256 xv = _mm256_loadu_ps(x + k + 8 * a);
            for (int o = 0; o < 2; o++) acc[a][o] = _mm256_fmadd_ps(widen8(rows[o], k + 8 * a, scale[o]), xv, acc[a][o]);
        }
    }
    for (int o = 0; o < 2; o++) sums[o] = decode_sum_end(acc[0][o], acc[1][o], acc[2][o], acc[3][o], rows[o], x, K);
}

/* sums[(n - n_begin) * R + r] = the decode sum of x row xr[r] and weight row n, for the
 * weight rows n_begin..n_end (at most MV_BLOCK) and R (3 to MV_TILE_ROWS) rows of x, in tiles
 * of MV_TILE_OUTS weight rows by R rows, every x vector serving MV_TILE_OUTS FMAs and every
 * widened weight vector R. A tile runs as many lanes a pass as MV_ACC accumulators hold, two
 * or one, over a span of at most MV_SPAN columns of all the block's weight rows, then the next
 * span, so that x's span (R rows, at most 18 KiB) stays in L1 through every pass and weight row.
 * (Spans of 768 columns, against 512: 125M's K = 768 runs as one span, not two of 384; EPYC,
 * steps of 12-32 rows, builds alternating, 4-7% faster, bf16 and int8, 125M and 1.3B.) */
#define MV_ACC 12        /* accumulators a tile keeps in registers, beside its weight vectors and x */
INLINE_AVX2 void dot_block_avx2(const NeoDType dtype, const int R, size_t prefetch_ahead,
                                float *sums, const float *const *xr, const NeoMatrix *w,
                                int n_begin, int n_end, int K)
{
    const int O = MV_TILE_OUTS;
    const size_t size = dtype_bytes(dtype);
    const int L = 2 * O * R <= MV_ACC ? 2 : 1;
    const int tiles = (n_end - n_begin + O - 1) / O;
    const int steps = K / 32, spans = span_count(steps, 32, MV_SPAN);
    __m256 lanes[MV_BLOCK][4][MV_TILE_ROWS];  /* each lane's sums between passes, [n][lane][r] */
    if (!spans)
        for (int i = 0; i < tiles * O; i++)
            for (int a = 0; a < 4; a++)
                for (int r = 0; r < R; r++) lanes[i][a][r] = _mm256_setzero_ps();
    for (int s = 0; s < spans; s++) {
        const size_t k0 = span_start(s, steps, spans, 32), k1 = span_start(s + 1, steps, spans, 32);
        for (int tile = 0; tile < tiles; tile++) {
            MatrixRow rows[MV_TILE_OUTS];
            for (int o = 0; o < O; o++) {
                /* past n_end the tile repeats the last weight row, its sums not used */
                const int n = n_begin + tile * O + o;
                rows[o] = matrix_row(w, n < n_end ? n : n_end - 1, K);
                rows[o].dtype = dtype;  /* the constant, so that widen8 compiles to one path */
            }
            __m256 (*tile_lanes)[4][MV_TILE_ROWS] = lanes + tile * O;
            for (int a0 = 0; a0 < 4; a0 += L) {
                /* the pass's accumulators: constant indices only, so that they stay in registers */
                __m256 acc[2][MV_TILE_OUTS][MV_TILE_ROWS];
                for (int l = 0; l < L; l++)
                    for (int o = 0; o < O; o++)
                        for (int r = 0; r < R; r++) acc[l][o][r] = k0 ? tile_lanes[o][a0 + l][r] : _mm256_setzero_ps();
                for (size_t k = k0; k < k1; k += 32) {
                    /* A tile jumps from row to row span by span, which the hardware prefetcher
                     * does not follow: it fetches the next tile's rows at these columns, a
                     * whole tile of work ahead (EPYC, alternating builds: the kernel from memory
                     * 4-12% faster, 125M steps of 32 rows 147 -> 138 ms, median of 5). int8
                     * reads half a line a step: its second hint to a line is a cheap no-op. */
                    if (prefetch_ahead && a0 == 0)
                        for (int o = 0; o < O; o++)
                            _mm_prefetch((const char *)rows[o].data + k * size + prefetch_ahead, _MM_HINT_NTA);
                    __m256 scale[MV_TILE_OUTS];
                    for (int o = 0; o < O; o++)
                        scale[o] = dtype == NEO_I8 ? block_scale(rows[o], k) : _mm256_setzero_ps();
                    for (int l = 0; l < L; l++) {
                        const size_t column = k + 8 * (a0 + l);
                        __m256 wv[MV_TILE_OUTS];
                        for (int o = 0; o < O; o++) wv[o] = widen8(rows[o], column, scale[o]);
                        for (int r = 0; r < R; r++) {
                            __m256 xv = _mm256_loadu_ps(xr[r] + column);
                            KEEP_IN_REGISTER(xv);  /* one load for the tile's weight rows */
                            for (int o = 0; o < O; o++) acc[l][o][r] = _mm256_fmadd_ps(wv[o], xv, acc[l][o][r]);
                        }
                    }
                }
                for (int l = 0; l < L; l++)
                    for (int o = 0; o < O; o++)
                        for (int r = 0; r < R; r++) tile_lanes[o][a0 + l][r] = acc[l][o][r];
            }
        }
    }
    for (int n = n_begin; n < n_end; n++) {
        const MatrixRow row = matrix_row(w, n, K);
        __m256 (*lane)[MV_TILE_ROWS] = lanes[n - n_begin];
        for (int r = 0; r < R; r++)
            sums[(n - n_begin) * R + r] = decode_sum_end(lane[0][r], lane[1][r], lane[2][r], lane[3][r], row, xr[r], K);
    }
}

/* dot_block_avx2's sums with its tile in zmm registers, for an AVX-512 path that decodes with
 * the AVX2 kernel (Zen 4: neo_decode_isa). A zmm holds lanes 0 and 1 of a sum (columns k ..
 * k + 15 of a 32-column step) or lanes 2 and 3, each element summed as dot_block_avx2 sums it,
 * so the bits are the same; all four lanes run in one pass, in tiles of MV_WIDE_OUTS weight
 * rows by R rows of x (2 x 2 x 6 accumulators, 4 weight vectors and one of x: 29 registers).
 * bf16 and fp32 weights only: int8 decodes with the AVX-512 kernel wherever the AVX-512 path
 * runs. Zen 4, 2 threads, against the ymm tiles: 125M's matrices alone 1.18-1.30x faster at
 * 12-32 rows; whole 125M bf16 steps 0.85-0.88 of their time at 16-32 rows (BENCHMARKS.md). */
#define MV_WIDE_OUTS 2
_Static_assert(MV_WIDE_OUTS == MV_TILE_OUTS, "the driver's prefetch reaches one tile of MV_TILE_OUTS rows ahead");
_Static_assert(MV_BLOCK % MV_WIDE_OUTS == 0, "a block is whole tiles");

/* Two lanes of widen8: columns k .. k + 15 of a bf16 or fp32 row. */
INLINE_AVX512 __m512 widen16_lanes(MatrixRow row, size_t k)
{
    if (row.dtype == NEO_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row.data + k))), 16));
    return _mm512_loadu_ps((const float *)row.data + k);
}

INLINE_AVX512 void dot_block_wide(const NeoDType dtype, const int R, size_t prefetch_ahead, float *sums,
                                  const float *const *xr, const NeoMatrix *w, int n_begin, int n_end, int K)
{
    const int O = MV_WIDE_OUTS;
    const size_t size = dtype_bytes(dtype);
    const int tiles = (n_end - n_begin + O - 1) / O;
    const int steps = K / 32, spans = span_count(steps, 32, MV_SPAN);
    __m512 lanes[MV_BLOCK][2][MV_TILE_ROWS];  /* lanes 0-1 and 2-3 of each sum between spans */
    if (!spans)
        for (int i = 0; i < tiles * O; i++)
            for (int h = 0; h < 2; h++)
                for (int r = 0; r < R; r++) lanes[i][h][r] = _mm512_setzero_ps();
    for (int s = 0; s < spans; s++) {
        const size_t k0 = span_start(s, steps, spans, 32), k1 = span_start(s + 1, steps, spans, 32);
        for (int tile = 0; tile < tiles; tile++) {
            MatrixRow rows[MV_WIDE_OUTS];
            for (int o = 0; o < O; o++) {
                const int n = n_begin + tile * O + o;  /* past n_end: the last row again, unused */
                rows[o] = matrix_row(w, n < n_end ? n : n_end - 1, K);
                rows[o].dtype = dtype;  /* the constant, so that widen16_lanes compiles to one path */
            }
            __m512 (*tile_lanes)[2][MV_TILE_ROWS] = lanes + tile * O;
            __m512 acc[MV_WIDE_OUTS][2][MV_TILE_ROWS];
            for (int o = 0; o < O; o++)
                for (int h = 0; h < 2; h++)
                    for (int r = 0; r < R; r++) acc[o][h][r] = k0 ? tile_lanes[o][h][r] : _mm512_setzero_ps();
            for (size_t k = k0; k < k1; k += 32) {
                if (prefetch_ahead)
                    for (int o = 0; o < O; o++)
                        _mm_prefetch((const char *)rows[o].data + k * size + prefetch_ahead, _MM_HINT_NTA);
                __m512 wv[MV_WIDE_OUTS][2];
                for (int o = 0; o < O; o++)
                    for (int h = 0; h < 2; h++) wv[o][h] = widen16_lanes(rows[o], k + 16 * h);
                for (int r = 0; r < R; r++)
                    for (int h = 0; h < 2; h++) {
                        __m512 xv = _mm512_loadu_ps(xr[r] + k + 16 * h);
                        KEEP_IN_REGISTER(xv);  /* one load for the tile's weight rows */
                        for (int o = 0; o < O; o++) acc[o][h][r] = _mm512_fmadd_ps(wv[o][h], xv, acc[o][h][r]);
                    }
            }
            for (int o = 0; o < O; o++)
                for (int h = 0; h < 2; h++)
                    for (int r = 0; r < R; r++) tile_lanes[o][h][r] = acc[o][h][r];
        }
    }
    for (int n = n_begin; n < n_end; n++) {
        const MatrixRow row = matrix_row(w, n, K);
        __m512 (*lane)[MV_TILE_ROWS] = lanes[n - n_begin];
        for (int r = 0; r < R; r++)
            sums[(n - n_begin) * R + r] = decode_sum_end(
                _mm512_castps512_ps256(lane[0][r]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lane[0][r]), 1)),
                _mm512_castps512_ps256(lane[1][r]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lane[1][r]), 1)),
                row, xr[r], K);
    }
}

/* dot_block_wide for bf16 or fp32 weights and R (3 to MV_TILE_ROWS): a call, not inlined, so
 * that the AVX2 driver may make it (with constants, each case compiles to its own loops). */
TARGET_AVX512 static void dot_block_wide_any(NeoDType dtype, int R, size_t prefetch_ahead, float *sums,
                                             const float *const *xr, const NeoMatrix *w, int n_begin,
                                             int n_end, int K)
{
#define WIDE_R(dt) switch (R) { \
    case 6: dot_block_wide(dt, 6, prefetch_ahead, sums, xr, w, n_begin, n_end, K); break; \
    case 5: dot_block_wide(dt, 5, prefetch_ahead, sums, xr, w, n_begin, n_end, K); break; \
    case 4: dot_block_wide(dt, 4, prefetch_ahead, sums, xr, w, n_begin, n_end, K); break; \
    default: dot_block_wide(dt, 3, prefetch_ahead, sums, xr, w, n_begin, n_end, K); }
    if (dtype == NEO_BF16) { WIDE_R(NEO_BF16) }
    else { WIDE_R(NEO_F32) }
#undef WIDE_R
}

/* Outputs n_begin..n_end for all T rows (x's rows ld floats apart). While T fits one group of
 * MV_ROWS rows of x, or all of x fits L1 (MV_X_L1), each weight row is streamed once, read from
 * memory by the first group and from L1 by the others, one sequential stream per thread. Past
 * that a weight row's groups would each re-read x from L2 (L2-bound: 27% slower at T = 8,
 * K = 3072): T is split evenly into tiles of 3 to MV_TILE_ROWS rows (T > MV_ROWS), each run
 * over the whole block. int8 rows take the tiles past one group even where x fits L1: their
 * widening (convert, then scale) costs more than bf16's, and a tile widens each vector once for
 * all its rows (EPYC, 125M's matrices, 2 threads, alternating: 4 rows 14% and 8 rows 20%
 * faster; bf16 rows through the tiles 1.25-1.45x slower). */
INLINE_AVX2 void matvec_block_avx2(int wide, const NeoDType dtype, NeoDecodePrefetch how, float *out,
                                   const float *x, int ld, const NeoMatrix *w, const float *bias,
                                   int T, int n_begin, int n_end, int K, int N, int accumulate)
{
    const float *xr[MV_TILE_ROWS];
    float sums[MV_BLOCK * MV_TILE_ROWS];
    const size_t row_bytes = K * dtype_bytes(dtype);
    if (T == 1 && dtype == NEO_BF16 && (size_t)K * sizeof(float) > MV_X_L1) {
        /* One bf16 row of x past L1 (fc_out of 1.3B and 2.7B: K = 8192, 10240) is reloaded from
         * L2 at every step, and those loads crowd the weight stream's misses (16 GB/s against
         * 21.6 for fc_in, EPYC, 2 threads): weight rows go in pairs, halving the x loads. EPYC,
         * builds alternating: fc_out alone 7-14% faster; whole decode steps 2.7B 0.927 (2
         * threads) and 0.963 (1), 1.3B 1.011 and 0.974. Pairs measured slower where x fits
         * 16 KiB (4-8%) and in int8 (16-18%), so those keep one row at a time. */
        int n = n_begin;
        for (; n + 1 < n_end; n += 2) {
            dot_row_pair_avx2(dtype, how, prefetch_distance(how, dtype), sums, x, matrix_row(w, n, K),
                              matrix_row(w, n + 1, K), K);
            for (int o = 0; o < 2; o++) store_output(&out[n + o], sums[o], bias, n + o, accumulate);
        }
        if (n < n_end) {
            xr[0] = x;
            dot_rows_prefetching(dtype, 1, how, prefetch_distance(how, dtype), sums, xr, matrix_row(w, n, K), K);
            store_output(&out[n], sums[0], bias, n, accumulate);
        }
        return;
    }
    if (T <= MV_ROWS || (dtype != NEO_I8 && (size_t)T * ld * sizeof(float) <= MV_X_L1)) {
        for (int n = n_begin; n < n_end; n++)
            for (int t = 0; t < T; t += MV_ROWS) {
                /* The first group streams the row from memory; with the near prefetch (AMD)
                 * the second, which reads it from L1, fetches the next row meanwhile, so that
                 * memory and arithmetic overlap. */
                const int R = T - t < MV_ROWS ? T - t : MV_ROWS;
                const int next_row = t == MV_ROWS && how == NEO_PREFETCH_NTA_NEAR;
                const NeoDecodePrefetch group_how = t == 0 || next_row ? how : NEO_PREFETCH_NONE;
                const size_t ahead = next_row ? row_bytes : prefetch_distance(how, dtype);
                const MatrixRow row = matrix_row(w, n, K);
                for (int r = 0; r < R; r++) xr[r] = x + (size_t)(t + r) * ld;
                if (R == 3)
                    dot_rows_prefetching(dtype, 3, group_how, ahead, sums, xr, row, K);
                else if (R == 2)
                    dot_rows_prefetching(dtype, 2, group_how, ahead, sums, xr, row, K);
                else
                    dot_rows_prefetching(dtype, 1, group_how, ahead, sums, xr, row, K);
                for (int r = 0; r < R; r++) store_output(&out[(size_t)(t + r) * N + n], sums[r], bias, n, accumulate);
            }
        return;
    }
    const int tiles = (T + MV_TILE_ROWS - 1) / MV_TILE_ROWS;
    for (int i = 0, t = 0; i < tiles; i++) {
        const int R = (T - t) / (tiles - i);  /* the remaining rows over the remaining tiles */
        for (int r = 0; r < R; r++) xr[r] = x + (size_t)(t + r) * ld;
        /* measured on AMD only (see dot_block_avx2) */
        const size_t prefetch = how == NEO_PREFETCH_NTA_NEAR && i == 0 ? MV_TILE_OUTS * row_bytes : 0;
        /* constant R: each compiles to its own loops with the tile in registers; T > MV_ROWS
         * split evenly into tiles of at most 6 rows gives 3 to 6 */
        _Static_assert(MV_ROWS == 3 && MV_TILE_ROWS == 6, "the cases below are the tile heights");
        if (wide && dtype != NEO_I8)
            dot_block_wide_any(dtype, R, prefetch, sums, xr, w, n_begin, n_end, K);
        else switch (R) {
        case 6: dot_block_avx2(dtype, 6, prefetch, sums, xr, w, n_begin, n_end, K); break;
        case 5: dot_block_avx2(dtype, 5, prefetch, sums, xr, w, n_begin, n_end, K); break;
        case 4: dot_block_avx2(dtype, 4, prefetch, sums, xr, w, n_begin, n_end, K); break;
        default: dot_block_avx2(dtype, 3, prefetch, sums, xr, w, n_begin, n_end, K);
        }
        for (int n = n_begin; n < n_end; n++)
            for (int r = 0; r < R; r++)
                store_output(&out[(size_t)(t + r) * N + n], sums[(n - n_begin) * R + r], bias, n, accumulate);
        t += R;
    }
}

/* The AVX2 driver, its tiles in ymm registers or, with wide (a CPU with AVX-512), in zmm
 * registers with the same bits (dot_block_wide). */
#define MATVEC_BLOCK_AVX2(...) matvec_block_avx2(wide, __VA_ARGS__)
TARGET_AVX2 static void matvec_avx2(const NeoProjection *proj, int n_proj, const float *x, int T,
                                    int K, int accumulate, int n_threads, int wide)
{
    MATVEC_DRIVER(MATVEC_BLOCK_AVX2, MV_BLOCK, NEO_ISA_AVX2)
}

/* In place: row i of the 8 x 8 block becomes column i. */
INLINE_AVX2 void transpose8x8(__m256 r[8])
{
    __m256 lo[4], hi[4], q[8];
    for (int i = 0; i < 4; i++) {
        lo[i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);  /* a0 b0 a1 b1 | a4 b4 a5 b5 */
        hi[i] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);  /* a2 b2 a3 b3 | a6 b6 a7 b7 */
    }
    for (int i = 0; i < 2; i++) {
        q[4 * i + 0] = _mm256_shuffle_ps(lo[2 * i], lo[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0));
        q[4 * i + 1] = _mm256_shuffle_ps(lo[2 * i], lo[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2));
        q[4 * i + 2] = _mm256_shuffle_ps(hi[2 * i], hi[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0));
        q[4 * i + 3] = _mm256_shuffle_ps(hi[2 * i], hi[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(q[i], q[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(q[i], q[4 + i], 0x31);
    }
}

/* pack_panel for one weight type (a constant where inlined, so that widen8 compiles to one
 * path). The panel's rows are read side by side, a few bytes of each a step, which the hardware
 * prefetcher follows poorly: with prefetch set, each row is fetched PACK_PREFETCH_BYTES ahead.
 * EPYC (Zen 3), 2 threads, a 125M model's 48 GEMMs from memory, builds alternating: T = 128
 * rows 208 -> 179 ms, T = 8 57 -> 40 ms (256 bytes ahead measured a little better than 512 or
 * 1024); EPYC (Zen 4), a whole 125M prefill, builds alternating: T = 8 1.18x, T = 128 1.02x
 * faster with it. On the Xeon it changed nothing (125M and 1.3B prefills, bf16 and int8,
 * 0.97-1.06x), so on AMD only. */
#define PACK_PREFETCH_BYTES 256
INLINE_AVX2 void pack_panel_as(const NeoDType dtype, int prefetch, float *panel, const NeoMatrix *w,
                               int n0, int K, int N, int width)
{
    const size_t size = dtype_bytes(dtype);
    const int filled = N - n0 < width ? N - n0 : width;
    MatrixRow rows[MAX_PANEL];
    for (int j = 0; j < filled; j++) {
        rows[j] = matrix_row(w, n0 + j, K);
        rows[j].dtype = dtype;
    }
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        if (prefetch && k * size % 64 == 0)
            for (int j = 0; j < filled; j++)
                _mm_prefetch((const char *)rows[j].data + (size_t)k * size + PACK_PREFETCH_BYTES, _MM_HINT_T0);
        for (int j0 = 0; j0 < width; j0 += 8) {
            __m256 block[8];
            for (int i = 0; i < 8; i++)
                block[i] = j0 + i < filled ? widen8_alone(rows[j0 + i], k) : _mm256_setzero_ps();
            transpose8x8(block);
            for (int i = 0; i < 8; i++) _mm256_store_ps(panel + (size_t)(k + i) * width + j0, block[i]);
        }
    }
    for (; k < K; k++)
        for (int j = 0; j < width; j++)
            panel[(size_t)k * width + j] = j < filled ? row_element(rows[j], k) : 0.0f;
}

/* panel[k * width + j] = w[n0 + j, k] in fp32 (width a multiple of 8, at most MAX_PANEL),
 * columns past N zero: 8 x 8 blocks are widened and transposed in registers. The AVX-512 GEMM
 * packs with it too. */
TARGET_AVX2 void pack_panel(float *panel, const NeoMatrix *w, int n0, int K, int N, int width)
{
    const NeoCpuKind kind = neo_cpu_kind();
    const int prefetch = kind == NEO_CPU_AMD_ZEN3 || kind == NEO_CPU_AMD_ZEN4;
    if (w->dtype == NEO_BF16)
        pack_panel_as(NEO_BF16, prefetch, panel, w, n0, K, N, width);
    else if (w->dtype == NEO_I8)
        pack_panel_as(NEO_I8, prefetch, panel, w, n0, K, N, width);
    else
        pack_panel_as(NEO_F32, prefetch, panel, w, n0, K, N, width);
}

/* out[t0.., n0..n0+PANEL) for R <= GEMM_ROWS rows of x: broadcast x[t, k] against the packed
 * row k. R is a constant where inlined, so that the tile stays in registers. */
INLINE_AVX2 void gemm_rows_avx2(const int R, float *out, const float *x, const float *panel, const float *bias,
                                int t0, int n0, int T, int K, int N, int accumulate)
{
    const float *xr[GEMM_ROWS];
    __m256 acc[GEMM_ROWS][2];
    for (int i = 0; i < R; i++) {
        xr[i] = x + (size_t)(t0 + i) * K;
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    }
    for (int k = 0; k < K; k++) {
        __m256 w0 = _mm256_loadu_ps(panel + (size_t)k * PANEL);
        __m256 w1 = _mm256_loadu_ps(panel + (size_t)k * PANEL + 8);
        for (int i = 0; i < R; i++) {
            /* set1, not broadcast_ss(pointer): with the pointer GCC kept the sums in memory */
            __m256 xv = _mm256_set1_ps(xr[i][k]);
            acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
        }
    }
    /* Spill with constant indices only: a variable index would keep acc in memory all along. */
    float tile[GEMM_ROWS][PANEL];
    for (int i = 0; i < R; i++) {
        _mm256_storeu_ps(tile[i], acc[i][0]);
        _mm256_storeu_ps(tile[i] + 8, acc[i][1]);
    }
    store_tile(out, &tile[0][0], R, PANEL, bias, t0, n0, T, N, accumulate);
}

/* The GEMM tile: GEMM_ROWS rows of x, or the rows left at the end of x (a short prompt's 8
 * rows are a tile of 6 and one of 2, not two of 6). Every output is summed along k in order
 * whatever the tile, so the tile's size never changes a bit. */
_Static_assert(GEMM_ROWS == 6, "gemm_tile_avx2 has a case for every tile size");
TARGET_AVX2 static void gemm_tile_avx2(float *out, const float *x, const float *panel, const float *bias,
                                       int t0, int n0, int T, int K, int N, int accumulate)
{
    switch (T - t0 < GEMM_ROWS ? T - t0 : GEMM_ROWS) {
    case 6: gemm_rows_avx2(6, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 5: gemm_rows_avx2(5, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 4: gemm_rows_avx2(4, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 3: gemm_rows_avx2(3, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 2: gemm_rows_avx2(2, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    default: gemm_rows_avx2(1, out, x, panel, bias, t0, n0, T, K, N, accumulate);
    }
}

void gemm_panels(GemmTile *tile, int width, int rows, float *out, const float *x, const NeoMatrix *w,
                 const float *bias, int T, int K, int N, int accumulate, int n_threads)
{
    const int n_panels = (N + width - 1) / width;
    #pragma omp parallel num_threads(n_threads)
    {
        float *panel = alloc_lines(sizeof(float) * width * (size_t)K);
        #pragma omp for schedule(static)
        for (int p = 0; p < n_panels; p++) {
            if (!panel) continue;  /* out of memory: leave the outputs rather than crash */
            pack_panel(panel, w, p * width, K, N, width);
            for (int t = 0; t < T; t += rows)
                tile(out, x, panel, bias, t, p * width, T, K, N, accumulate);
        }
        free(panel);
    }
}

#endif

/* x's rows copied into 64-byte aligned rows of *ld floats: the decode kernels' vector loads of
 * x then never straddle two cache lines (a split load costs two; calloc'd and numpy rows are
 * 16-byte aligned, which measured 25% slower for several rows). NULL when out of memory: the
 * kernels then read x as it is, to the same results. */
float *aligned_rows(const float *x, int T, int K, int *ld)
{
    const int stride = (K + 15) / 16 * 16;
    float *rows = alloc_lines(sizeof(float) * (size_t)T * stride);
    if (!rows) return NULL;
    for (int t = 0; t < T; t++) memcpy(rows + (size_t)t * stride, x + (size_t)t * K, sizeof(float) * K);
    *ld = stride;
    return rows;
}

/* Zen 4 (internal.h): one row fetches into L2 from this many columns (x's row 16 KiB: 12 KiB
 * measured faster without); the AVX2 kernel's groups of rows (x read in one pass over each
 * weight row: at most MV_ROWS rows, or x within MV_X_L1, as matvec_block_avx2 takes them)
 * fetch into L2, its tiles their next tile with the non-temporal hint. */
#define ZEN4_LONG_ROW 4096

/* The SIMD paths' decode kernels prefetch by CPU kind (see prefetch_stream); the others leave
 * it to the hardware. */
NeoDecodePrefetch neo_decode_prefetch(NeoIsa isa, NeoDType dtype, int rows, int cols)
{
    if (isa != NEO_ISA_AVX2 && isa != NEO_ISA_AVX512) return NEO_PREFETCH_NONE;
    switch (neo_cpu_kind()) {
    case NEO_CPU_AMD_ZEN3: return NEO_PREFETCH_NTA_NEAR;
    case NEO_CPU_AMD_ZEN4:
        if (dtype == NEO_I8) return rows <= 2 ? NEO_PREFETCH_L2_FAR : NEO_PREFETCH_NTA_NEAR;
        if (rows == 1) return cols >= ZEN4_LONG_ROW ? NEO_PREFETCH_L2_FAR : NEO_PREFETCH_NONE;
        return rows <= MV_ROWS || (size_t)rows * cols * sizeof(float) <= MV_X_L1 ? NEO_PREFETCH_L2_FAR
                                                                                 : NEO_PREFETCH_NTA_NEAR;
    case NEO_CPU_INTEL: return NEO_PREFETCH_L2_FAR;
    default: return NEO_PREFETCH_NONE;
    }
}

/* On AMD Zen 4, which runs a 512-bit instruction as two 256-bit halves, the AVX2 decode kernel
 * (row tiles, spans) beat the AVX-512 one (rows in fours, each group widening the weights
 * again) on bf16 weights: whole 125M steps, 2 threads, both in one process: 1 row 1.03-1.04x,
 * 4 rows 1.04x, 8 rows 0.99x, 16 rows 1.25x, 32 rows 1.35x faster. Not on int8 weights (2-8
 * rows 1.06-1.17x slower, 16-32 rows 1.1-1.2x faster, 1 row alike), which keep the AVX-512
 * kernel. On the Intel Xeon the AVX-512 kernel was the faster (bf16: 1 row 1.1-1.2x, 8 rows
 * 1.9x). Both kernels have had tiles for many rows since; on Zen 4 the AVX2 kernel's run in zmm
 * registers (dot_block_wide: 107-145 GFLOP/s at 12-32 rows against the AVX-512 tiles' 80-103). */
NeoIsa neo_decode_isa(NeoIsa isa, NeoDType dtype)
{
    const int avx2_faster = neo_cpu_kind() == NEO_CPU_AMD_ZEN4 && dtype != NEO_I8;
    return isa == NEO_ISA_AVX512 && avx2_faster ? NEO_ISA_AVX2 : isa;
}

void matmul_forward(float *out, const float *x, const NeoMatrix *w, const float *bias, int T,
                    int K, int N, int accumulate, int n_threads, NeoIsa isa)
{
#if defined(__x86_64__)
    if (isa == NEO_ISA_AVX512) {
        gemm_panels(gemm_tile_avx512, PANEL512, GEMM512_ROWS, out, x, w, bias, T, K, N, accumulate,
                    n_threads);
        return;
    }
    if (isa == NEO_ISA_AVX2) {
        gemm_panels(gemm_tile_avx2, PANEL, GEMM_ROWS, out, x, w, bias, T, K, N, accumulate, n_threads);
        return;
    }
#endif
    if (isa == NEO_ISA_SCALAR)
        matmul_scalar(out, x, w, bias, T, K, N, accumulate, n_threads);
    else
        gemm_generic(out, x, w, bias, T, K, N, accumulate, n_threads);
}

/* matvec_projections on kernel isa; with wide, the AVX2 kernel's tiles in zmm registers. */
static void matvec_on_kernel(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                        int accumulate, int n_threads, NeoIsa isa, int wide)
{
    if (n_proj > NEO_MAX_PROJECTIONS) {  /* the drivers hold one block count per projection */
        matvec_on_kernel(proj, NEO_MAX_PROJECTIONS, x, T, K, accumulate, n_threads, isa, wide);
        matvec_on_kernel(proj + NEO_MAX_PROJECTIONS, n_proj - NEO_MAX_PROJECTIONS, x, T, K, accumulate,
                         n_threads, isa, wide);
        return;
    }
#if defined(__x86_64__)
    if (isa == NEO_ISA_AVX512) {
        matvec_avx512(proj, n_proj, x, T, K, accumulate, n_threads);
        return;
    }
    if (isa == NEO_ISA_AVX2) {
        matvec_avx2(proj, n_proj, x, T, K, accumulate, n_threads, wide);
        return;
    }
#endif
    for (const NeoProjection *p = proj; p < proj + n_proj; p++) {
        if (isa == NEO_ISA_SCALAR)
            matmul_scalar(p->out, x, p->w, p->bias, T, K, p->N, accumulate, n_threads);
        else
            matvec_generic(p->out, x, p->w, p->bias, T, K, p->N, accumulate, n_threads);
    }
}

void matvec_projections(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                        int accumulate, int n_threads, NeoIsa isa)
{
    matvec_on_kernel(proj, n_proj, x, T, K, accumulate, n_threads, isa, 0);
}

void neo_decode_projections(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                            int accumulate, int n_threads, NeoIsa path)
{
    const NeoIsa isa = neo_decode_isa(path, proj->w->dtype);
    matvec_on_kernel(proj, n_proj, x, T, K, accumulate, n_threads, isa,
                     isa == NEO_ISA_AVX2 && path == NEO_ISA_AVX512 && neo_cpu_has_avx512());
}

void matvec_forward(float *out, const float *x, const NeoMatrix *w, const float *bias, int T,
                    int K, int N, int accumulate, int n_threads, NeoIsa isa)
{
    const NeoProjection one = {out, w, bias, N};
    matvec_projections(&one, 1, x, T, K, accumulate, n_threads, isa);
}
