/* matmul_bf16.c: the prefill GEMM of the bf16 compute mode (NeoBf16Gemm): x rounded to bf16,
 * each product of two bf16 values (exact in fp32), the sums in fp32.
 *
 * Both hardware paths compute out^T = w x^T. A weight matrix [N, K] is then the left operand
 * as it lies in memory (an AMX A tile is 16 rows of w by 32 k; VDPBF16PS broadcasts a pair of
 * one row), so bf16 weights are read in place, never packed. Only x is packed, once per call,
 * into the pair layout of the right operand (XPairs), which is small. Each output is one
 * accumulator summed over k in a fixed order, so results do not depend on the thread count
 * or on the other rows. */
#include <stdlib.h>
#include "internal.h"
#if defined(NEOCORE_SIMDE)
#include "bf16_emulated.h"  /* tests/native: what SIMDe lacks, in plain C, for the logic check */
#endif

/* The oracle: every product in index order, one at a time. */
static void matmul_bf16_reference(float *out, const float *x, const NeoMatrix *w, const float *bias,
                                  int T, int K, int N, int accumulate, int n_threads)
{
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n = 0; n < N; n++)
        for (int t = 0; t < T; t++) {
            float sum = 0.0f;
            for (int k = 0; k < K; k++)
                sum += bf16_to_f32(f32_to_bf16_bits(x[(size_t)t * K + k]))
                       * bf16_to_f32(f32_to_bf16_bits(matrix_element(w, n, k, K)));
            store_output(&out[(size_t)t * N + n], sum, bias, n, accumulate);
        }
}

#if defined(__x86_64__)
#define TILE 16    /* rows of a tile; fp32 columns of an accumulator tile; t per zmm */
#define KBLOCK 32  /* bf16 columns of a 64-byte tile line */

static int round_up(int n, int m) { return (n + m - 1) / m * m; }

/* Lanes 0 .. n - 1 (n at most 16, at least 0). */
static inline __mmask16 first_lanes(int n)
{
    return n >= TILE ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

/* Column c of a 16 x 16 block of 32-bit values (rows stride elements apart; rows outside
 * lanes not read, zero), as one vector: the transposes of this file, gathers from L1. */
INLINE_AVX512_BF16 __m512i block_column(const void *block, int c, int stride, __mmask16 lanes)
{
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(stride));
    return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, rows, (const int32_t *)block + c, 4);
}

/* x in bf16 pairs: blocks of TILE rows (t) by KBLOCK columns (k); line r of block (tb, kb)
 * holds (x[t][k], x[t][k + 1]) for k = KBLOCK kb + 2 r and the block's TILE rows t in turn,
 * zero past T and K. A line is one zmm for VDPBF16PS, a block one AMX B tile. */
typedef struct {
    uint16_t *data;
    int t_blocks, k_blocks;
} XPairs;

static const uint16_t *xpairs_block(const XPairs *xp, int tb, int kb)
{
    return xp->data + ((size_t)tb * xp->k_blocks + kb) * TILE * KBLOCK;
}

/* The fp32 values row[0 .. 31], those from left on read as zero, rounded to 16 bf16 pairs by
 * VCVTNE2PS2BF16 (to nearest even; it reads denormals as zero, as TDPBF16PS and VDPBF16PS do). */
INLINE_AVX512_BF16 __m512i rounded_pairs(const float *row, int left)
{
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(first_lanes(left - TILE), row + TILE),
                                        _mm512_maskz_loadu_ps(first_lanes(left), row));
}

/* Block (tb, kb): each row's 32 columns rounded to 16 pairs, then the 16 x 16 pairs
 * transposed. (The kernels' OpenMP bodies call such functions: clang does not give an
 * outlined parallel region its function's target.) */
TARGET_AVX512_BF16 static void xpairs_pack_block(const XPairs *xp, const float *x, int T, int K,
                                                 int tb, int kb)
{
    const int k0 = kb * KBLOCK;
    uint32_t rows[TILE][TILE] __attribute__((aligned(64)));
    for (int i = 0; i < TILE; i++) {
        const int t = tb * TILE + i;
        if (t >= T) {
            _mm512_store_si512(rows[i], _mm512_setzero_si512());
            continue;
        }
        _mm512_store_si512(rows[i], rounded_pairs(x + (size_t)t * K + k0, K - k0));
    }
    uint16_t *lines = (uint16_t *)xpairs_block(xp, tb, kb);
    for (int r = 0; r < KBLOCK / 2; r++)
        _mm512_store_si512(lines + r * 2 * TILE, block_column(rows, r, TILE, 0xFFFF));
}

static int xpairs_pack(XPairs *xp, const float *x, int T, int K, int n_threads)
{
    xp->t_blocks = (T + TILE - 1) / TILE;
    xp->k_blocks = (K + KBLOCK - 1) / KBLOCK;
    const int n_blocks = xp->t_blocks * xp->k_blocks;
    xp->data = alloc_lines(sizeof(uint16_t) * TILE * KBLOCK * (size_t)n_blocks);
    if (!xp->data) return 0;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int b = 0; b < n_blocks; b++)
        xpairs_pack_block(xp, x, T, K, b / xp->k_blocks, b % xp->k_blocks);
    return 1;
}

/* 16 weights of row n from column k on, as fp32, those outside lanes zero: int8 ones value *
 * scale of their block, as matrix_element gives them (the 16 lie in one block). dtype is w's,
 * a constant where the kernels inline this, so that each weight type compiles to its own loop. */
_Static_assert(NEO_I8_BLOCK % 16 == 0, "16 int8 columns share one scale");
INLINE_AVX512_BF16 __m512 strip_lanes(const NeoDType dtype, const NeoMatrix *w, int n, size_t k, int K,
                                      __mmask16 lanes)
{
    const size_t at = (size_t)n * K + k;
    if (dtype == NEO_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, (const uint16_t *)w->data + at)), 16));
    if (dtype == NEO_I8) {
        const size_t blocks = (K + NEO_I8_BLOCK - 1) / NEO_I8_BLOCK;
        const __m512i q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lanes, (const int8_t *)w->data + at));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(w->scales[n * blocks + k / NEO_I8_BLOCK]));
    }
    return _mm512_maskz_loadu_ps(lanes, (const float *)w->data + at);
}

/* Columns k .. k + 31 of row n of w (of type dtype) in bf16 pairs, zero past K; inside is a
 * constant 1 where all 32 lie inside K (no masks then, and bf16 ones are loaded as they lie). */
INLINE_AVX512_BF16 __m512bh weight_pairs(const NeoDType dtype, const int inside, const NeoMatrix *w, int n,
                                         size_t k, int K)
{
    if (dtype == NEO_BF16 && inside)
        return (__m512bh)_mm512_loadu_si512((const uint16_t *)w->data + (size_t)n * K + k);
    const int left = K - (int)k;
    return _mm512_cvtne2ps_pbh(strip_lanes(dtype, w, n, k + TILE, K, inside ? 0xFFFF : first_lanes(left - TILE)),
                               strip_lanes(dtype, w, n, k, K, inside ? 0xFFFF : first_lanes(left)));
}

/* Rows n0 .. n0 + rows - 1 of w in bf16, row i at strip + i * stride, columns K .. stride
 * reading zero: w itself where it is bf16, K a multiple of KBLOCK and the strip inside N;
 * else a copy in scratch ([rows][round_up(K, KBLOCK)], rows past N zero), each weight
 * rounded to bf16 as f32_to_bf16_bits does (VCVTNE2PS2BF16 flushes denormals, which
 * VDPBF16PS and TDPBF16PS read as zero anyway). */
TARGET_AVX512_BF16 static const uint16_t *weight_strip(const NeoMatrix *w, int n0, int rows, int K, int N,
                                                       uint16_t *scratch, size_t *stride)
{
    if (w->dtype == NEO_BF16 && K % KBLOCK == 0 && n0 + rows <= N) {
        *stride = (size_t)K;
        return (const uint16_t *)w->data + (size_t)n0 * K;
    }
    *stride = (size_t)round_up(K, KBLOCK);
    for (int i = 0; i < rows; i++) {
        uint16_t *line = scratch + i * *stride;
        for (int k = 0; k < (int)*stride; k += KBLOCK) {
            const __m512i pairs = n0 + i < N ? (__m512i)weight_pairs(w->dtype, 0, w, n0 + i, k, K)
                                             : _mm512_setzero_si512();
            _mm512_store_si512(line + k, pairs);
        }
    }
    return scratch;
}

/* The scratch weight_strip may need, allocated by each thread on first use. */
static uint16_t *strip_scratch(uint16_t **scratch, int rows, int K)
{
    if (!*scratch) *scratch = alloc_lines(sizeof(uint16_t) * rows * (size_t)round_up(K, KBLOCK));
    return *scratch;
}

/* A strip of n_rows rows of w (row i at rows + i * stride) laid out k block by k block:
 * [kb][n_rows][KBLOCK], the strip's 64-byte pieces of one k block side by side. Both kernels
 * then read a k block from a few consecutive lines, where rows a power-of-two number of KiB
 * apart would all fall in one L1 set (an AMX A tile of 16 rows is 1 KiB in one piece). */
TARGET_AVX512_BF16 static void retile_strip(uint16_t *tiles, const uint16_t *rows, size_t stride, int n_rows,
                                            int k_blocks)
{
    for (int i = 0; i < n_rows; i++)
        for (int kb = 0; kb < k_blocks; kb++)
            _mm512_store_si512(tiles + ((size_t)kb * n_rows + i) * KBLOCK,
                               _mm512_loadu_si512(rows + i * stride + (size_t)kb * KBLOCK));
}

/* A block of out^T, acc[n][t] for n_rows rows of w (a line of stride floats each) and up to
 * 16 rows of x, into out[t0 + t][n0 ..] within T and N: per t, one transposed column, the
 * bias added, then what out holds if accumulating (store_output's order). */
INLINE_AVX512_BF16 void store_block_transposed(float *out, const float *acc, int stride, int n_rows,
                                               const float *bias, int t0, int n0, int T, int N,
                                               int accumulate)
{
    const __mmask16 lanes = first_lanes(N - n0 < n_rows ? N - n0 : n_rows);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias + n0) : _mm512_setzero_ps();
    for (int t = 0; t < TILE && t0 + t < T; t++) {
        float *row = out + (size_t)(t0 + t) * N + n0;
        __m512 value = _mm512_castsi512_ps(block_column(acc, t, stride, lanes));
        if (bias) value = _mm512_add_ps(value, b);
        if (accumulate) value = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, row), value);
        _mm512_mask_storeu_ps(row, lanes, value);
    }
}

/* Work items: a strip of rows of w by a pair of TILE-row blocks of x, strip-major, so that a
 * static schedule gives each thread whole strips where there are enough of them and still
 * spreads the rows of x where there are not (16 threads, 24 strips of a 768-row matrix). */
static int work_items(const XPairs *xp, int N, int strip_rows)
{
    return (N + strip_rows - 1) / strip_rows * ((xp->t_blocks + 1) / 2);
}

/* ---- AVX512-BF16 -------------------------------------------------------------------------
 * A register tile of BF16_ROWS rows of w by 2 zmm of TILE t: per pair of k, two loads of x
 * and BF16_ROWS broadcast pairs of w feed 2 BF16_ROWS VDPBF16PS (24 of the 32 zmm). */
#define BF16_ROWS 12

/* out for rows n0 .. n0 + BF16_ROWS - 1 of w (tiles: that strip, retile_strip'd) and the blocks
 * tb, tb + 1 of x. */
TARGET_AVX512_BF16 static void gemm_bf16_avx512_item(float *out, const XPairs *xp, const uint16_t *tiles,
                                                     const float *bias, int tb, int n0, int T, int N,
                                                     int accumulate)
{
    const int pair = tb + 1 < xp->t_blocks;
    __m512 acc[BF16_ROWS][2];
    for (int i = 0; i < BF16_ROWS; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int kb = 0; kb < xp->k_blocks; kb++) {
        const uint16_t *x0 = xpairs_block(xp, tb, kb);
        const uint16_t *x1 = pair ? xpairs_block(xp, tb + 1, kb) : x0;
        const uint16_t *a = tiles + (size_t)kb * BF16_ROWS * KBLOCK;
        for (int r = 0; r < KBLOCK / 2; r++) {
            const __m512i xv0 = _mm512_load_si512(x0 + r * 2 * TILE);
            const __m512i xv1 = _mm512_load_si512(x1 + r * 2 * TILE);
            for (int i = 0; i < BF16_ROWS; i++) {
                int32_t w_pair;
                memcpy(&w_pair, a + i * KBLOCK + 2 * r, sizeof w_pair);
                const __m512i wv = _mm512_set1_epi32(w_pair);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)wv, (__m512bh)xv0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)wv, (__m512bh)xv1);
            }
        }
    }
    /* constant indices only: a variable one would keep acc in memory all along */
    float tile[2][TILE][TILE] __attribute__((aligned(64)));
    for (int i = 0; i < BF16_ROWS; i++) {
        _mm512_store_ps(tile[0][i], acc[i][0]);
        _mm512_store_ps(tile[1][i], acc[i][1]);
    }
    for (int j = 0; j < 1 + pair; j++)
        store_block_transposed(out, &tile[j][0][0], TILE, BF16_ROWS, bias, (tb + j) * TILE, n0, T, N,
                               accumulate);
}

static void gemm_bf16_avx512(float *out, const XPairs *xp, const NeoMatrix *w, const float *bias,
                             int T, int K, int N, int accumulate, int n_threads)
{
    const int t_pairs = (xp->t_blocks + 1) / 2;
    #pragma omp parallel num_threads(n_threads)
    {
        uint16_t *scratch = NULL;  /* a converted strip, then the strip's tiles */
        int strip = -1;
        #pragma omp for schedule(static)
        for (int item = 0; item < work_items(xp, N, BF16_ROWS); item++) {
            const int s = item / t_pairs, n0 = s * BF16_ROWS;
            if (!strip_scratch(&scratch, 2 * BF16_ROWS, K)) continue;  /* out of memory: leave out */
            uint16_t *tiles = scratch + (size_t)BF16_ROWS * xp->k_blocks * KBLOCK;
            if (s != strip) {
                size_t stride;
                const uint16_t *rows = weight_strip(w, n0, BF16_ROWS, K, N, scratch, &stride);
                retile_strip(tiles, rows, stride, BF16_ROWS, xp->k_blocks);
                strip = s;
            }
            gemm_bf16_avx512_item(out, xp, tiles, bias, item % t_pairs * 2, n0, T, N, accumulate);
        }
        free(scratch);
    }
}

/* ---- Decode rows (AVX512-BF16, on both hardware paths) -----------------------------------
 * The rows of a step's single-row sequences: each row of x rounded to bf16 once (zero past K),
 * then each weight row's 32-column pieces (bf16 as they lie, other types rounded as in
 * weight_strip) feed one VDPBF16PS per row of x. Each output is summed in one order whatever T
 * is, so a row's result does not depend on the other rows: bf16 weights into one accumulator,
 * in tiles of several rows of w (matvec_bf16_tile; single rows below MVB_TILES_FROM rows of x
 * and at a block's end, in the same order); the others, whose pieces take longer to
 * make, a row of w at a time into four accumulators (dot_rows_bf16), since one made their
 * one-row steps latency bound (125M int8 weights 1.18x slower) and tiles of them lost in cache.
 * Against the exact decode kernel: half the multiply instructions per weight and no widening,
 * which is what a step of many rows, bound by arithmetic, needs. */
#define MVB_ROWS 6        /* rows of x in a tile of bf16 weights */
#define MVB_ROWS_4ACC 4   /* rows of x sharing a row of other weights: 4 x 4 accumulators */
#define MVB_WROWS 4       /* rows of bf16 w in a tile once T >= MVB_TILES_FROM (else one) */
#define MVB_TILES_FROM 4  /* rows of x from which bf16 w goes in tiles (tiles at 1 row: 0.84x, 2: 0.93x) */
#define MVB_BLOCK 16      /* rows of w a thread takes at a time (static schedule) */
#define MVB_X_L1 (12 << 10)  /* bytes of bf16 x read once per row or tile of w (matvec_bf16_block) */

/* Rows of x a group takes: a tile's for bf16 weights, four accumulators' for the others. */
static inline int group_rows(NeoDType dtype) { return dtype == NEO_BF16 ? MVB_ROWS : MVB_ROWS_4ACC; }

/* Each 64-byte line of the 32 weights at byte at of row (elem bytes each, a constant where
 * inlined: no loop, so that the caller's accumulators stay in registers) prefetched
 * non-temporally ahead bytes ahead; nothing when ahead is 0. */
INLINE_AVX512_BF16 void prefetch_pairs(const size_t elem, size_t ahead, const char *row, size_t at)
{
    if (!ahead) return;
    if (at % 64 == 0) _mm_prefetch(row + at + ahead, _MM_HINT_NTA);  /* int8: every other call */
    if (elem == 4) _mm_prefetch(row + at + 64 + ahead, _MM_HINT_NTA);  /* fp32: 128 bytes */
}

/* sums[r] = row n of w . row r of xb (rows ld bf16 apart, zero from K to ld), r < R; with ahead
 * set, each 64-byte line of the row is prefetched non-temporally ahead bytes ahead. */
INLINE_AVX512_BF16 void dot_rows_bf16(const NeoDType dtype, const int R, size_t ahead, float *sums,
                                      const uint16_t *xb, size_t ld, const NeoMatrix *w, int n, int K)
{
    const size_t elem = dtype_bytes(dtype);
    const char *row = (const char *)w->data + (size_t)n * K * elem;
    __m512 acc[MVB_ROWS_4ACC][4];
    for (int r = 0; r < R; r++)
        for (int a = 0; a < 4; a++) acc[r][a] = _mm512_setzero_ps();
    size_t k = 0;  /* size_t, as in dot_rows_avx512: no sign extensions nor signed divisions */
    for (; k + 8 * TILE <= (size_t)K; k += 8 * TILE)
        for (int a = 0; a < 4; a++) {
            prefetch_pairs(elem, ahead, row, (k + 2 * TILE * a) * elem);
            const __m512bh wv = weight_pairs(dtype, 1, w, n, k + 2 * TILE * a, K);
            for (int r = 0; r < R; r++)
                acc[r][a] = _mm512_dpbf16_ps(acc[r][a], wv, (__m512bh)_mm512_load_si512(xb + r * ld + k + 2 * TILE * a));
        }
    for (; k < (size_t)K; k += 2 * TILE) {
        const __m512bh wv = weight_pairs(dtype, 0, w, n, k, K);
        for (int r = 0; r < R; r++)
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], wv, (__m512bh)_mm512_load_si512(xb + r * ld + k));
    }
    for (int r = 0; r < R; r++)
        sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                     _mm512_add_ps(acc[r][2], acc[r][3])));
}

/* Rows t .. t + MVB_ROWS_4ACC - 1 of x (those below T) against row n of w, into the outputs. ahead:
 * the first group's prefetch distance (0: none); the groups after it read the row from cache. */
INLINE_AVX512_BF16 void matvec_bf16_group(const NeoDType dtype, const NeoProjection *p, const uint16_t *xb,
                                          size_t ld, int T, int t, int n, int K, int accumulate, size_t ahead)
{
    float sums[MVB_ROWS_4ACC];
    const int R = T - t < MVB_ROWS_4ACC ? T - t : MVB_ROWS_4ACC;
    const uint16_t *xt = xb + (size_t)t * ld;
    ahead = t == 0 ? ahead : 0;
    switch (R) {  /* constant R: each compiles to its own loop with acc in registers */
    case 4: dot_rows_bf16(dtype, 4, ahead, sums, xt, ld, p->w, n, K); break;
    case 3: dot_rows_bf16(dtype, 3, ahead, sums, xt, ld, p->w, n, K); break;
    case 2: dot_rows_bf16(dtype, 2, ahead, sums, xt, ld, p->w, n, K); break;
    default: dot_rows_bf16(dtype, 1, ahead, sums, xt, ld, p->w, n, K);
    }
    for (int r = 0; r < R; r++)
        store_output(&p->out[(size_t)(t + r) * p->N + n], sums[r], p->bias, n, accumulate);
}

/* Rows n .. n + WR - 1 of bf16 w against rows t .. t + R - 1 of xb (rows ld bf16 apart, zero
 * from K to ld), into the outputs: WR x R outputs share each load, each one accumulator over the
 * 32-column steps in order. A single row of w (WR = 1) is prefetched non-temporally ahead bytes
 * ahead if ahead is set; a tile fetches the next tile (next, if set) into L2, an equal share of
 * its lines in address order each step. On Zen 4 (24 matrices of 3072 x 768 from memory, the
 * kernel alone, 1 thread) 4 rows of w read side by side ran at half the speed of one row read
 * through (9.0 GFLOP/s against 17.1); with the next tile in L2 tiles beat the kernel before them
 * (a row of w at a time, four accumulators), two runs: 4 rows of x 1.15-1.23x, 8 rows 1.4-1.58x,
 * 16 1.39-1.42x, 32 1.34x (the next tile fetched into L1 or non-temporally: 1.0-1.2x). */
INLINE_AVX512_BF16 void matvec_bf16_tile(const int WR, const int R, size_t ahead, const char *next,
                                         const NeoProjection *p, const uint16_t *xb, size_t ld, int t, int n,
                                         int K, int accumulate)
{
    const size_t elem = sizeof(uint16_t);
    const char *row = (const char *)p->w->data + (size_t)n * K * elem;
    const uint16_t *xt = xb + (size_t)t * ld;
    __m512 acc[MVB_WROWS][MVB_ROWS];
    for (int i = 0; i < WR; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 2 * TILE <= K; k += 2 * TILE) {
        if (WR == 1)
            prefetch_pairs(elem, ahead, row, (size_t)k * elem);
        else if (next)
            for (int line = 0; line < WR; line++)  /* a step's 32 columns of WR rows: WR lines */
                _mm_prefetch(next + ((size_t)k / (2 * TILE) * WR + line) * 64, _MM_HINT_T1);
        __m512bh wv[MVB_WROWS];
        for (int i = 0; i < WR; i++) wv[i] = weight_pairs(NEO_BF16, 1, p->w, n + i, k, K);
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(xt + r * ld + k);
            for (int i = 0; i < WR; i++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[i], xv);
        }
    }
    if (k < K)  /* the last columns, masked */
        for (int i = 0; i < WR; i++) {
            const __m512bh wv = weight_pairs(NEO_BF16, 0, p->w, n + i, k, K);
            for (int r = 0; r < R; r++)
                acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv, (__m512bh)_mm512_load_si512(xt + r * ld + k));
        }
    for (int i = 0; i < WR; i++)
        for (int r = 0; r < R; r++)
            store_output(&p->out[(size_t)(t + r) * p->N + n + i], _mm512_reduce_add_ps(acc[i][r]), p->bias,
                         n + i, accumulate);
}

/* The tile of rows n .. n + WR - 1 of w and rows t .. min(t + MVB_ROWS, t1) - 1 of x, with R
 * and WR constants, so that each compiles to its own loop with the accumulators in registers. */
INLINE_AVX512_BF16 void matvec_bf16_tiles(const int WR, size_t ahead, const char *next, const NeoProjection *p,
                                          const uint16_t *xb, size_t ld, int t, int t1, int n, int K,
                                          int accumulate)
{
    switch (t1 - t < MVB_ROWS ? t1 - t : MVB_ROWS) {
    case 6: matvec_bf16_tile(WR, 6, ahead, next, p, xb, ld, t, n, K, accumulate); break;
    case 5: matvec_bf16_tile(WR, 5, ahead, next, p, xb, ld, t, n, K, accumulate); break;
    case 4: matvec_bf16_tile(WR, 4, ahead, next, p, xb, ld, t, n, K, accumulate); break;
    case 3: matvec_bf16_tile(WR, 3, ahead, next, p, xb, ld, t, n, K, accumulate); break;
    case 2: matvec_bf16_tile(WR, 2, ahead, next, p, xb, ld, t, n, K, accumulate); break;
    default: matvec_bf16_tile(WR, 1, ahead, next, p, xb, ld, t, n, K, accumulate);
    }
}

/* Rows n_begin .. n_end - 1 of w against rows t0 .. t1 - 1 of x (of T): bf16 weights in tiles
 * of MVB_WROWS rows of w once T >= MVB_TILES_FROM (single rows at a block's end), the others a
 * row at a time. The group of x from row 0, which streams w from memory, prefetches it (ahead:
 * a single row's distance); the others find w in cache. */
INLINE_AVX512_BF16 void matvec_bf16_span(const NeoDType dtype, const NeoProjection *p, const uint16_t *xb,
                                         size_t ld, int T, int t0, int t1, int n_begin, int n_end, int K,
                                         int accumulate, size_t ahead)
{
    const int rows = group_rows(dtype);
    for (int n = n_begin; n < n_end;) {
        const int WR = dtype == NEO_BF16 && T >= MVB_TILES_FROM && n_end - n >= MVB_WROWS ? MVB_WROWS : 1;
        for (int t = t0; t < t1; t += rows) {
            if (dtype != NEO_BF16) {
                matvec_bf16_group(dtype, p, xb, ld, t1, t, n, K, accumulate, ahead);
            } else if (WR == 1) {
                matvec_bf16_tiles(1, t == 0 ? ahead : 0, NULL, p, xb, ld, t, t1, n, K, accumulate);
            } else {
                const int fetch = t == 0 && n + 2 * WR <= p->N;
                const uint16_t *next = (const uint16_t *)p->w->data + (size_t)(n + WR) * K;
                matvec_bf16_tiles(MVB_WROWS, 0, fetch ? (const char *)next : NULL, p, xb, ld, t, t1, n, K,
                                  accumulate);
            }
        }
        n += WR;
    }
}

/* Where all rows of x are few bytes, each row or tile of w is read once for all of them (the
 * groups after the first from L1); else a group of rows stays in L1 while the block's rows of w
 * stream past it, from memory for the first group and from L2 for the others. Zen 4, bf16 mode,
 * builds alternating, before the tiles: 125M 8 rows (12 KiB of x) 1.09-1.11x faster the first
 * way, 16 rows 1.1-1.13x and 32 rows 1.29x the second; 1.3B (K = 2048) 8 rows 1.15x the second.
 * With the tiles, a bound of 48 KiB instead of 12 was within 0.94-1.03x. */
INLINE_AVX512_BF16 void matvec_bf16_block(const NeoDType dtype, const NeoProjection *p, const uint16_t *xb,
                                          size_t ld, int T, int n_begin, int n_end, int K, int accumulate,
                                          size_t ahead)
{
    const int rows = group_rows(dtype);
    if ((size_t)T * ld * sizeof(uint16_t) <= MVB_X_L1)
        matvec_bf16_span(dtype, p, xb, ld, T, 0, T, n_begin, n_end, K, accumulate, ahead);
    else
        for (int t = 0; t < T; t += rows)
            matvec_bf16_span(dtype, p, xb, ld, T, t, t + rows < T ? t + rows : T, n_begin, n_end, K, accumulate,
                             ahead);
}

/* matvec_bf16_block compiled for each weight type; ahead[dtype]: its prefetch distance. */
TARGET_AVX512_BF16 static void matvec_bf16_blocks(const NeoProjection *p, const uint16_t *xb, size_t ld, int T,
                                                  int n_begin, int n_end, int K, int accumulate,
                                                  const size_t ahead[3])
{
    const NeoDType dtype = p->w->dtype;
    if (dtype == NEO_BF16)
        matvec_bf16_block(NEO_BF16, p, xb, ld, T, n_begin, n_end, K, accumulate, ahead[dtype]);
    else if (dtype == NEO_I8)
        matvec_bf16_block(NEO_I8, p, xb, ld, T, n_begin, n_end, K, accumulate, ahead[dtype]);
    else
        matvec_bf16_block(NEO_F32, p, xb, ld, T, n_begin, n_end, K, accumulate, ahead[dtype]);
}

/* Rows of x to bf16, each padded with zeros to ld = round_up(K, KBLOCK) columns. */
TARGET_AVX512_BF16 static void round_rows(uint16_t *xb, size_t ld, const float *x, int T, int K)
{
    for (int t = 0; t < T; t++)
        for (int k = 0; k < (int)ld; k += KBLOCK)
            _mm512_store_si512(xb + t * ld + k, rounded_pairs(x + (size_t)t * K + k, K - k));
}

/* At most NEO_MAX_PROJECTIONS matrices (see matvec_bf16_projections); 0 when out of memory. */
static int matvec_bf16_avx512(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                              int accumulate, int n_threads)
{
    const size_t ld = (size_t)round_up(K, KBLOCK);
    uint16_t *xb = alloc_lines(sizeof(uint16_t) * ld * T);
    if (!xb) return 0;
    round_rows(xb, ld, x, T, K);
    /* rows of w taken one at a time stream from memory prefetched non-temporally wherever the
     * CPU kind's exact kernels prefetch at all (this kernel's user is Zen 4: where those fetch
     * into L2, int8 rows here lost 6-12% without the hint, 125M, 1-2 rows); tiles fetch
     * their own */
    size_t ahead[3];
    for (NeoDType d = NEO_F32; d <= NEO_I8; d++) {
        const NeoDecodePrefetch how = neo_decode_prefetch(NEO_ISA_AVX512, d, T, K);
        ahead[d] = how != NEO_PREFETCH_NONE ? prefetch_distance(NEO_PREFETCH_NTA_NEAR, d) : 0;
    }
    int first_block[NEO_MAX_PROJECTIONS + 1];
    const int blocks = projection_blocks(proj, n_proj, MVB_BLOCK, first_block);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int b = 0; b < blocks; b++) {
        int n_begin, n_end;
        const NeoProjection *p = projection_block(proj, first_block, b, MVB_BLOCK, &n_begin, &n_end);
        matvec_bf16_blocks(p, xb, ld, T, n_begin, n_end, K, accumulate, ahead);
    }
    free(xb);
    return 1;
}

/* ---- AMX ---------------------------------------------------------------------------------
 * Eight tile registers: 0-3 accumulate a 2 x 2 block of 16 x 16 fp32 (rows of w by rows of x),
 * 4-5 hold 16 rows of w by 32 k each, 6-7 16 x 32 of x in pairs. Each A and B tile feeds two
 * TDPBF16PS, so a strip of AMX_ROWS rows of w is read once per 32 rows of x, from L2. */
#define AMX_ROWS 32

/* LDTILECFG's operand, palette 1: the rows and bytes per row of each tile register. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Tile state belongs to the thread: each one configures its tiles, and releases them. */
TARGET_AMX static void amx_configure(void)
{
    TileConfig config = {.palette = 1};
    for (int i = 0; i < 8; i++) {
        config.rows[i] = TILE;
        config.colsb[i] = 64;
    }
    _tile_loadconfig(&config);
}

TARGET_AMX static void amx_release(void) { _tile_release(); }

/* out for rows n0 .. n0 + AMX_ROWS - 1 of w (tiles: that strip, retile_strip'd) and the blocks
 * tb, tb + 1 of x. */
TARGET_AMX static void gemm_bf16_amx_item(float *out, const XPairs *xp, const uint16_t *tiles,
                                          const float *bias, int tb, int n0, int T, int N,
                                          int accumulate)
{
    const int pair = tb + 1 < xp->t_blocks;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kb = 0; kb < xp->k_blocks; kb++) {
        _tile_loadd(4, tiles + (size_t)kb * AMX_ROWS * KBLOCK, 64);
        _tile_loadd(5, tiles + ((size_t)kb * AMX_ROWS + TILE) * KBLOCK, 64);
        _tile_loadd(6, xpairs_block(xp, tb, kb), 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (pair) {
            _tile_loadd(7, xpairs_block(xp, tb + 1, kb), 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    float acc[4][TILE * TILE] __attribute__((aligned(64)));
    _tile_stored(0, acc[0], 64);
    _tile_stored(1, acc[1], 64);
    _tile_stored(2, acc[2], 64);
    _tile_stored(3, acc[3], 64);
    for (int j = 0; j < 2 + 2 * pair; j++)
        store_block_transposed(out, acc[j], TILE, TILE, bias, (tb + j / 2) * TILE, n0 + j % 2 * TILE,
                               T, N, accumulate);
}

static void gemm_bf16_amx(float *out, const XPairs *xp, const NeoMatrix *w, const float *bias, int T,
                          int K, int N, int accumulate, int n_threads)
{
    const int t_pairs = (xp->t_blocks + 1) / 2;
    #pragma omp parallel num_threads(n_threads)
    {
        amx_configure();
        uint16_t *scratch = NULL;  /* a converted strip, then the strip's tiles */
        int strip = -1;
        #pragma omp for schedule(static)
        for (int item = 0; item < work_items(xp, N, AMX_ROWS); item++) {
            const int s = item / t_pairs, n0 = s * AMX_ROWS;
            if (!strip_scratch(&scratch, 2 * AMX_ROWS, K)) continue;  /* out of memory: leave out */
            uint16_t *tiles = scratch + (size_t)AMX_ROWS * xp->k_blocks * KBLOCK;
            if (s != strip) {
                size_t stride;
                const uint16_t *rows = weight_strip(w, n0, AMX_ROWS, K, N, scratch, &stride);
                retile_strip(tiles, rows, stride, AMX_ROWS, xp->k_blocks);
                strip = s;
            }
            gemm_bf16_amx_item(out, xp, tiles, bias, item % t_pairs * 2, n0, T, N, accumulate);
        }
        amx_release();
        free(scratch);
    }
}
#endif

/* VDPBF16PS does twice the multiplies of a 512-bit FMA but issues half as often on the Xeon
 * (Sapphire Rapids class), where the exact AVX-512 decode kernel, prefetching into L2, won:
 * bf16 decode steps of 125M, 2 threads, 1 row 0.72x, 4 rows 0.67x, 8 rows 0.76x, 16 rows 0.93x,
 * 32 rows 1.17x the exact ones' speed (1.3B: 1 row 0.78x, 8 rows 0.94x). With the tiles of
 * bf16 weights (same steps, builds alternating): 1 row 0.63x, 4 rows 1.03x, 8-16 rows 1.17-1.19x,
 * 32 rows 1.44x; one row, the single user's case, keeps it off there (the choice cannot follow
 * the row count: a sequence's tokens would then depend on its batch). On AMD Zen 4, where a
 * 512-bit FMA takes both 256-bit units, it won: with the tiles 8 rows 1.77x, 2 rows 1.12x, 1 row
 * 0.97x. The scalar
 * reference path follows the same rule, so that on every CPU it is the oracle of the others. */
int neo_bf16_decodes(NeoBf16Gemm gemm)
{
    return gemm != NEO_BF16_OFF && neo_cpu_kind() == NEO_CPU_AMD_ZEN4;
}

void matvec_bf16_projections(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                             int accumulate, int n_threads, NeoBf16Gemm gemm)
{
    for (int j = 0; j < n_proj; j += NEO_MAX_PROJECTIONS) {
        const int n = n_proj - j < NEO_MAX_PROJECTIONS ? n_proj - j : NEO_MAX_PROJECTIONS;
#if defined(__x86_64__)
        if ((gemm == NEO_BF16_AMX || gemm == NEO_BF16_AVX512)
            && matvec_bf16_avx512(proj + j, n, x, T, K, accumulate, n_threads))
            continue;
#endif
        /* the oracle, and where the kernel found no memory for its rounded x */
        for (const NeoProjection *p = proj + j; p < proj + j + n; p++)
            matmul_bf16_reference(p->out, x, p->w, p->bias, T, K, p->N, accumulate, n_threads);
    }
}

void matmul_bf16_forward(float *out, const float *x, const NeoMatrix *w, const float *bias, int T,
                         int K, int N, int accumulate, int n_threads, NeoBf16Gemm gemm)
{
#if defined(__x86_64__)
    if (gemm == NEO_BF16_AMX || gemm == NEO_BF16_AVX512) {
        XPairs xp;
        if (!xpairs_pack(&xp, x, T, K, n_threads)) return;  /* out of memory: leave the outputs */
        (gemm == NEO_BF16_AMX ? gemm_bf16_amx : gemm_bf16_avx512)(out, &xp, w, bias, T, K, N,
                                                                  accumulate, n_threads);
        free(xp.data);
        return;
    }
#endif
    matmul_bf16_reference(out, x, w, bias, T, K, N, accumulate, n_threads);
}
