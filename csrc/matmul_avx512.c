/* matmul_avx512.c: matmul.c's two kernels on AVX-512F/BW/VL: 16 floats a vector, 32 registers.
 *
 * The same contract as the other paths (see matmul.c): each output is summed by one thread in
 * an order fixed by the code, so results do not depend on the thread count; the decode kernel
 * sums each of T rows as it would alone, the GEMM sums each output along k whatever T is.
 * bf16 weights are widened by a zero-extension and a shift, int8 ones by a sign extension, a
 * conversion and their block's scale; K tails use masked loads. */
#include <stdlib.h>
#include "internal.h"

#if defined(__x86_64__)

/* Decode: each weight row is streamed once for all T rows. MV512_ROWS rows of x (a group) share
 * each widened weight vector: 4 x 4 accumulators + 4 weight vectors + x use 25 of the 32
 * registers. The first group of rows prefetches w as the CPU's maker wants (prefetch_stream,
 * internal.h). Many rows past L1 go in tiles instead (dot_block_avx512). */
#define MV512_ROWS 4
#define MV512_BLOCK 16  /* rows of w a thread takes at a time (static schedule) */

/* 16 weights of a row from column k on, widened to fp32; lanes outside mask read as zero.
 * int8 ones are value * scale of their block (the 16 lie in one: NEO_I8_BLOCK is a multiple
 * of 16), one rounding, as the other paths do. */
_Static_assert(NEO_I8_BLOCK % 16 == 0, "16 int8 columns share one scale");
INLINE_AVX512 __m512 widen16(const void *row, const float *scales, NeoDType dtype, size_t k, __mmask16 mask)
{
    if (dtype == NEO_BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)row + k);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (dtype == NEO_I8) {
        const __m512i q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, (const int8_t *)row + k));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(scales[k / NEO_I8_BLOCK]));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)row + k);
}

/* sums[r] = sum_k x[r * K + k] * w[row + k] for R rows of x (R a constant, 1 to MV512_ROWS).
 * Every row is summed in the same order whatever R is: four accumulators over 64-element
 * steps, the 16-element steps and a masked tail into the first, then a fixed reduction. */
INLINE_AVX512 void dot_rows_avx512(const NeoDType dtype, const int R, NeoDecodePrefetch how, float *sums,
                                   const float *x, size_t ld, const void *row, const float *scales, int K)
{
    const size_t elem = dtype_bytes(dtype);
    const char *bytes = (const char *)row;
    __m512 acc[MV512_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int a = 0; a < 4; a++) acc[r][a] = _mm512_setzero_ps();
    /* size_t: int indices (-fwrapv) cost a sign extension and a signed division by the block
     * size for every 16 weights, which bound int8 rows (EPYC Zen 4 and the Xeon: BENCHMARKS.md) */
    size_t k = 0;
    for (; k + 64 <= (size_t)K; k += 64) {
        prefetch_stream(how, bytes + k * elem, 64 * elem, prefetch_distance(how, dtype));
        for (int a = 0; a < 4; a++) {
            const __m512 wv = widen16(row, scales, dtype, k + 16 * a, 0xFFFF);
            for (int r = 0; r < R; r++)
                acc[r][a] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * ld + k + 16 * a), acc[r][a]);
        }
    }
    for (; k < (size_t)K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m512 wv = widen16(row, scales, dtype, k, mask);
        for (int r = 0; r < R; r++)
            acc[r][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + r * ld + k), acc[r][0]);
    }
    for (int r = 0; r < R; r++)
        sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                     _mm512_add_ps(acc[r][2], acc[r][3])));
}

/* Many rows of x: sums[(n - n_begin) * R + r] = the decode sum of x row r (rows ld apart) and
 * weight row n, for the weight rows n_begin..n_end (at most MV512_BLOCK) of w's N and R (3 to
 * MV512_TILE_ROWS) rows of x, in tiles of MV512_TILE_OUTS weight rows by R rows: each x vector
 * serves MV512_TILE_OUTS FMAs and each widened weight vector R, where the groups load one x
 * vector per FMA and, once x is past L1, from L2. A tile runs one lane of the sums a pass (the
 * 16 columns of each 64-column step that accumulator takes) over a span of at most MV512_SPAN
 * columns of all the block's weight rows, keeping each lane's sums between passes in lanes, so
 * that x's span (at most 18 KiB) stays in L1; the 16-column steps past the last 64-column one
 * and the fold come last, as in dot_rows_avx512, so every sum has the bits of its row alone.
 * With prefetch set, a tile's first pass fetches into L2 what comes next at its columns: the
 * next tile's rows; after the last tile, the first tile's at the next span's columns, or past
 * the last span the next block's rows (a static schedule gives a thread consecutive blocks).
 * Xeon, 125M bf16 steps of 16 rows: 1.13x faster than with no prefetch. */
#define MV512_TILE_OUTS 4  /* 4 x 6 accumulators + 4 weight vectors + x: 29 of the 32 registers */
#define MV512_TILE_ROWS 6
#define MV512_SPAN 768
#define MV512_X_L1 (24 << 10)  /* bytes of x that the groups read from L1 beside the weight rows */
_Static_assert(MV512_BLOCK % MV512_TILE_OUTS == 0, "a block is whole tiles");
_Static_assert(MV512_SPAN % 64 == 0, "spans are whole 64-column steps");
typedef __m512 TileLanes[4][MV512_TILE_ROWS];  /* a weight row's lane sums between passes, [lane][r] */
INLINE_AVX512 void dot_block_avx512(const NeoDType dtype, const int R, int prefetch, float *sums,
                                    TileLanes *lanes, const float *x, size_t ld, const NeoMatrix *w,
                                    int n_begin, int n_end, int N, int K)
{
    const int O = MV512_TILE_OUTS;
    const size_t elem = dtype_bytes(dtype), row_bytes = (size_t)K * elem;
    const size_t blocks = (K + NEO_I8_BLOCK - 1) / NEO_I8_BLOCK;
    const int steps = K / 64, spans = span_count(steps, 64, MV512_SPAN);
    const int tiles = (n_end - n_begin + O - 1) / O;
    if (!spans)
        for (int i = 0; i < tiles * O; i++)
            for (int a = 0; a < 4; a++)
                for (int r = 0; r < R; r++) lanes[i][a][r] = _mm512_setzero_ps();
    for (int s = 0; s < spans; s++) {
        const size_t k0 = span_start(s, steps, spans, 64), k1 = span_start(s + 1, steps, spans, 64);
        for (int tile = 0; tile < tiles; tile++) {
            const char *rows[MV512_TILE_OUTS];
            const float *scales[MV512_TILE_OUTS];
            for (int o = 0; o < O; o++) {
                /* past n_end the tile repeats the last weight row, its sums not used */
                const int n = n_begin + tile * O + o < n_end ? n_begin + tile * O + o : n_end - 1;
                rows[o] = (const char *)w->data + (size_t)n * row_bytes;
                scales[o] = dtype == NEO_I8 ? w->scales + n * blocks : NULL;
            }
            /* what the first pass fetches: next[o] at columns k + shift (NULL: nothing) */
            const int last = tile == tiles - 1, next_span = last && s + 1 < spans;
            const int n_next = last ? (next_span ? n_begin : n_end) : n_begin + (tile + 1) * O;
            const int n_stop = last && !next_span ? N : n_end;
            const size_t shift = next_span ? k1 - k0 : 0;
            const char *next[MV512_TILE_OUTS];
            for (int o = 0; o < O; o++)
                next[o] = prefetch && n_next + o < n_stop ? (const char *)w->data + (size_t)(n_next + o) * row_bytes
                                                          : NULL;
            TileLanes *tile_lanes = lanes + tile * O;
            for (int a = 0; a < 4; a++) {
                __m512 acc[MV512_TILE_OUTS][MV512_TILE_ROWS];  /* constant indices only: in registers */
                for (int o = 0; o < O; o++)
                    for (int r = 0; r < R; r++) acc[o][r] = k0 ? tile_lanes[o][a][r] : _mm512_setzero_ps();
                for (size_t k = k0; k < k1; k += 64) {
                    if (a == 0)
                        for (int o = 0; o < O; o++)
                            if (next[o])
                                for (size_t line = 0; line < 64 * elem; line += 64)
                                    _mm_prefetch(next[o] + (k + shift) * elem + line, _MM_HINT_T1);
                    __m512 wv[MV512_TILE_OUTS];
                    for (int o = 0; o < O; o++) wv[o] = widen16(rows[o], scales[o], dtype, k + 16 * a, 0xFFFF);
                    for (int r = 0; r < R; r++) {
                        __m512 xv = _mm512_loadu_ps(x + r * ld + k + 16 * a);
                        KEEP_IN_REGISTER(xv);  /* one load for the tile's weight rows */
                        for (int o = 0; o < O; o++) acc[o][r] = _mm512_fmadd_ps(wv[o], xv, acc[o][r]);
                    }
                }
                for (int o = 0; o < O; o++)
                    for (int r = 0; r < R; r++) tile_lanes[o][a][r] = acc[o][r];
            }
        }
    }
    for (int n = n_begin; n < n_end; n++) {
        const char *row = (const char *)w->data + (size_t)n * row_bytes;
        const float *scales = dtype == NEO_I8 ? w->scales + n * blocks : NULL;
        __m512 (*lane)[MV512_TILE_ROWS] = lanes[n - n_begin];
        for (int r = 0; r < R; r++) {
            __m512 l0 = lane[0][r];
            for (size_t k = (size_t)steps * 64; k < (size_t)K; k += 16) {
                const __mmask16 mask = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
                l0 = _mm512_fmadd_ps(widen16(row, scales, dtype, k, mask), _mm512_maskz_loadu_ps(mask, x + r * ld + k), l0);
            }
            sums[(n - n_begin) * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(l0, lane[1][r]),
                                                                             _mm512_add_ps(lane[2][r], lane[3][r])));
        }
    }
}

/* Outputs n_begin..n_end for all T rows (x's rows ld floats apart). Up to MV512_ROWS rows, or
 * while all of x fits L1 (MV512_X_L1), groups of MV512_ROWS rows each stream a weight row, the
 * first from memory, the others from L1; past that T is split evenly into tiles of 3 to
 * MV512_TILE_ROWS rows, each run over the whole block (dot_block_avx512). */
INLINE_AVX512 void matvec_block_avx512(const NeoDType dtype, NeoDecodePrefetch how, float *out,
                                       const float *x, int ld, const NeoMatrix *w, const float *bias,
                                       int T, int n_begin, int n_end, int K, int N, int accumulate)
{
    const size_t elem = dtype_bytes(dtype);
    const size_t blocks = (K + NEO_I8_BLOCK - 1) / NEO_I8_BLOCK;
    if (T > MV512_ROWS && (size_t)T * ld * sizeof(float) > MV512_X_L1) {
        float sums[MV512_BLOCK * MV512_TILE_ROWS];
        TileLanes lanes[MV512_BLOCK];  /* one array for every inlined case: 24 KiB of stack */
        const int tiles = (T + MV512_TILE_ROWS - 1) / MV512_TILE_ROWS;
        for (int i = 0, t = 0; i < tiles; i++) {
            const int R = (T - t) / (tiles - i);  /* the remaining rows over the remaining tiles */
            const float *xt = x + (size_t)t * ld;
            /* the first tile of x streams w from memory: it prefetches, where the CPU's kind does */
            const int prefetch = i == 0 && how != NEO_PREFETCH_NONE;
            _Static_assert(MV512_ROWS == 4 && MV512_TILE_ROWS == 6, "the cases below are the tile heights");
            switch (R) {  /* T > 4 split evenly into tiles of at most 6 rows gives 3 to 6 */
            case 6: dot_block_avx512(dtype, 6, prefetch, sums, lanes, xt, ld, w, n_begin, n_end, N, K); break;
            case 5: dot_block_avx512(dtype, 5, prefetch, sums, lanes, xt, ld, w, n_begin, n_end, N, K); break;
            case 4: dot_block_avx512(dtype, 4, prefetch, sums, lanes, xt, ld, w, n_begin, n_end, N, K); break;
            default: dot_block_avx512(dtype, 3, prefetch, sums, lanes, xt, ld, w, n_begin, n_end, N, K);
            }
            for (int n = n_begin; n < n_end; n++)
                for (int r = 0; r < R; r++)
                    store_output(&out[(size_t)(t + r) * N + n], sums[(n - n_begin) * R + r], bias, n, accumulate);
            t += R;
        }
        return;
    }
    float sums[MV512_ROWS];
    for (int n = n_begin; n < n_end; n++) {
        const void *row = (const char *)w->data + (size_t)n * K * elem;
        const float *scales = dtype == NEO_I8 ? w->scales + n * blocks : NULL;
        for (int t = 0; t < T; t += MV512_ROWS) {
            const int R = T - t < MV512_ROWS ? T - t : MV512_ROWS;
            const NeoDecodePrefetch prefetch = t == 0 ? how : NEO_PREFETCH_NONE;
            const float *xt = x + (size_t)t * ld;
            switch (R) {  /* constant R: each compiles to its own loop with acc in registers */
            case 4: dot_rows_avx512(dtype, 4, prefetch, sums, xt, ld, row, scales, K); break;
            case 3: dot_rows_avx512(dtype, 3, prefetch, sums, xt, ld, row, scales, K); break;
            case 2: dot_rows_avx512(dtype, 2, prefetch, sums, xt, ld, row, scales, K); break;
            default: dot_rows_avx512(dtype, 1, prefetch, sums, xt, ld, row, scales, K);
            }
            for (int r = 0; r < R; r++)
                store_output(&out[(size_t)(t + r) * N + n], sums[r], bias, n, accumulate);
        }
    }
}

TARGET_AVX512 void matvec_avx512(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                                 int accumulate, int n_threads)
{
    MATVEC_DRIVER(matvec_block_avx512, MV512_BLOCK, NEO_ISA_AVX512)
}

/* Prefill (matmul.c's gemm_panels drives it): W widened once into fp32 panels of PANEL512
 * columns, and a register tile of R <= GEMM512_ROWS rows x PANEL512 over K: 12 rows x 2 zmm =
 * 24 accumulators + 2 panel vectors + the broadcast x, 27 of the 32 registers (both sizes in
 * internal.h). R is a constant where inlined, so that the tile stays in registers. */
INLINE_AVX512 void gemm_rows_avx512(const int R, float *out, const float *x, const float *panel,
                                    const float *bias, int t0, int n0, int T, int K, int N, int accumulate)
{
    const float *xr[GEMM512_ROWS];
    __m512 acc[GEMM512_ROWS][2];
    for (int i = 0; i < R; i++) {
        xr[i] = x + (size_t)(t0 + i) * K;
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    }
    for (int k = 0; k < K; k++) {
        const __m512 w0 = _mm512_load_ps(panel + (size_t)k * PANEL512);
        const __m512 w1 = _mm512_load_ps(panel + (size_t)k * PANEL512 + 16);
        for (int i = 0; i < R; i++) {
            const __m512 xv = _mm512_set1_ps(xr[i][k]);
            acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
        }
    }
    /* Spill with constant indices only: a variable index would keep acc in memory all along. */
    float tile[GEMM512_ROWS][PANEL512];
    for (int i = 0; i < R; i++) {
        _mm512_storeu_ps(tile[i], acc[i][0]);
        _mm512_storeu_ps(tile[i] + 16, acc[i][1]);
    }
    store_tile(out, &tile[0][0], R, PANEL512, bias, t0, n0, T, N, accumulate);
}

/* The GEMM tile: GEMM512_ROWS rows of x, or the rows left at the end of x (an 8-token prompt
 * is one tile of 8, not of 12 with 4 thrown away). Each output is summed along k in order
 * whatever the tile, so its size never changes a bit. */
_Static_assert(GEMM512_ROWS == 12, "gemm_tile_avx512 has a case for every tile size");
TARGET_AVX512 void gemm_tile_avx512(float *out, const float *x, const float *panel, const float *bias,
                                    int t0, int n0, int T, int K, int N, int accumulate)
{
    switch (T - t0 < GEMM512_ROWS ? T - t0 : GEMM512_ROWS) {
    case 12: gemm_rows_avx512(12, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 11: gemm_rows_avx512(11, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 10: gemm_rows_avx512(10, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 9: gemm_rows_avx512(9, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 8: gemm_rows_avx512(8, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 7: gemm_rows_avx512(7, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 6: gemm_rows_avx512(6, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 5: gemm_rows_avx512(5, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 4: gemm_rows_avx512(4, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 3: gemm_rows_avx512(3, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    case 2: gemm_rows_avx512(2, out, x, panel, bias, t0, n0, T, K, N, accumulate); break;
    default: gemm_rows_avx512(1, out, x, panel, bias, t0, n0, T, K, N, accumulate);
    }
}

#endif
