/* internal.h: helpers shared by the kernel files; not part of the Python-facing surface. */
#ifndef NEOCORE_INTERNAL_H
#define NEOCORE_INTERNAL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "neocore.h"

/* 64-byte aligned memory: aligned_alloc with the size rounded up to whole 64-byte lines, as C11
 * requires (glibc takes any size; other C libraries may return NULL, and a sanitizer aborts). */
static inline void *alloc_lines(size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

/* Bytes of one weight element (int8 scales aside); a constant where dtype is. */
static inline __attribute__((always_inline)) size_t dtype_bytes(NeoDType dtype)
{
    return dtype == NEO_BF16 ? 2 : dtype == NEO_I8 ? 1 : 4;
}

#if defined(__x86_64__)
/* The AVX2+FMA and AVX-512 paths are compiled per function, so the library itself stays
 * portable. Built with -DNEOCORE_SIMDE (a test only), every intrinsic comes from SIMDe instead,
 * in portable C, so that the AVX-512 kernels can be checked on a CPU without AVX-512. */
#if defined(NEOCORE_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
/* what SIMDe 0.7 lacks, in plain C: masked loads read only the lanes asked for */
#define __mmask16 simde__mmask16
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
/* The lanes of p that k selects, size bytes each, zero elsewhere: every masked load below. */
static inline void simde_masked_lanes(void *dst, const void *p, size_t size, __mmask16 k)
{
    memset(dst, 0, 16 * size);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) memcpy((char *)dst + i * size, (const char *)p + i * size, size);
}
static inline __m512 simde_maskz_loadu_ps(__mmask16 k, const float *p)
{
    float v[16];
    simde_masked_lanes(v, p, sizeof v[0], k);
    return _mm512_loadu_ps(v);
}
static inline __m256i simde_maskz_loadu_epi16(__mmask16 k, const void *p)
{
    uint16_t v[16];
    simde_masked_lanes(v, p, sizeof v[0], k);
    return _mm256_loadu_si256((const __m256i *)v);
}
static inline __m512i simde_cvtepu16_epi32(__m256i a)
{
    uint16_t h[16];
    uint32_t w[16];
    _mm256_storeu_si256((__m256i *)h, a);
    for (int i = 0; i < 16; i++) w[i] = h[i];
    return _mm512_loadu_si512(w);
}
static inline float simde_reduce_add_ps(__m512 a)
{
    float v[16], sum = 0.0f;
    _mm512_storeu_ps(v, a);
    for (int i = 0; i < 16; i++) sum += v[i];
    return sum;
}
static inline __m128i simde_maskz_loadu_epi8(__mmask16 k, const void *p)
{
    int8_t v[16];
    simde_masked_lanes(v, p, sizeof v[0], k);
    return _mm_loadu_si128((const __m128i *)v);
}
static inline __m512i simde_cvtepi8_epi32(__m128i a)
{
    int8_t b[16];
    int32_t w[16];
    _mm_storeu_si128((__m128i *)b, a);
    for (int i = 0; i < 16; i++) w[i] = b[i];
    return _mm512_loadu_si512(w);
}
static inline __m512 simde_cvtepi32_ps(__m512i a)
{
    int32_t v[16];
    float f[16];
    _mm512_storeu_si512(v, a);
    for (int i = 0; i < 16; i++) f[i] = (float)v[i];
    return _mm512_loadu_ps(f);
}
#define _mm512_maskz_loadu_ps simde_maskz_loadu_ps
#define _mm_maskz_loadu_epi8 simde_maskz_loadu_epi8
#define _mm512_cvtepi8_epi32 simde_cvtepi8_epi32
#define _mm512_cvtepi32_ps simde_cvtepi32_ps
#define _mm256_maskz_loadu_epi16 simde_maskz_loadu_epi16
#define _mm512_cvtepu16_epi32 simde_cvtepu16_epi32
#define _mm512_reduce_add_ps simde_reduce_add_ps
#define TARGET_AVX2
#define TARGET_AVX512
#define TARGET_AVX512_BF16
#define TARGET_AMX
#define INLINE_AVX512_BF16 static inline __attribute__((always_inline))
#define INLINE_AVX2 static inline __attribute__((always_inline))
#define INLINE_AVX512 static inline __attribute__((always_inline))
#define KEEP_IN_REGISTER(v) ((void)(v))
#else
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
#define TARGET_AVX512_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
#define TARGET_AMX __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define INLINE_AVX512_BF16 static inline __attribute__((always_inline, target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
#define INLINE_AVX2 static inline __attribute__((always_inline, target("avx2,fma")))
#define INLINE_AVX512 static inline __attribute__((always_inline, target("avx2,fma,avx512f,avx512bw,avx512vl")))
/* Keeps a loaded vector in a register for all its uses: GCC may otherwise fold its load into
 * each of them, loading it again and again (clang does not, and refuses this operand at -O1). */
#if defined(__clang__)
#define KEEP_IN_REGISTER(v) ((void)(v))
#else
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))
#endif
#endif

/* The decode kernels stream each weight row once a step. How they prefetch that stream
 * (neo_decode_prefetch) is chosen by CPU kind, weight type, rows of x and row length, because
 * each way was measured on one kind of CPU and loses on another:
 * - AMD Zen 3 (EPYC, AVX2): a non-temporal hint a few lines ahead, once a step, gave 4-20% more
 *   bandwidth (256 bytes ahead, against none); into L2 PREFETCH_FAR_BYTES ahead made 1.3B's
 *   matrices 1.07-1.22x slower. The distance was then measured by weight type (125M and 1.3B
 *   matrices, 1 and 2 threads, builds alternating): bf16 1024 bytes against 256 5-8% faster;
 *   512 no better; 2048 7% and 4096 9-12% slower on 1.3B. int8 rows measured best farther:
 *   4096 bytes against 1024 7-15% faster alone, whole 125M steps 10% faster at 1 and 2
 *   threads, 1.3B steps 1.2-1.3% (within noise); 8192 no better. fp32 rows take the bf16
 *   distance (not measured).
 * - AMD Zen 4 (EPYC, AVX-512), whole decode steps, builds alternating, 1 and 2 threads: for
 *   one row of x the Zen 3 hint made bf16 weights slower (125M steps 1.33x slower on the
 *   AVX-512 kernel, 1.04-1.2x on the AVX2 one; 1.3B 1.14-1.33x), and so did it 4096 bytes
 *   ahead (1.3B 1.06-1.09x) and into L2 (125M 1.2x), so one row's bf16 and fp32 weights are
 *   not prefetched. Several rows (the AVX2 kernel's groups and tiles, 125M, 2 threads) still
 *   gain from it (4 rows 1.06x, 8 rows 1.28x, 16 1.1x, 32 1.05x), and so do int8 weights
 *   4096 bytes ahead (1.06-1.17x, 125M and 1.3B, one row). Later, with the weights in huge
 *   pages: into L2 PREFETCH_FAR_BYTES ahead made steps of 2 and 3 rows faster than the hint
 *   (bf16 125M 1.13-1.27x, 1.3B 1.44-1.52x, 2.7B 2 rows 1.60x; fp32 125M 1.18-1.24x), and
 *   one row too where x's row is 16 KiB or more, past what L1 keeps beside the stream (1.3B's
 *   and 2.7B's 8192- and 10240-column MLP rows: those matrices alone 1.4x faster, whole
 *   steps 1.07-1.17x at 1 and 2 threads; 350M's 4096 1.02-1.05x); int8 1 and 2 rows 1.02-1.19x
 *   (125M and 1.3B). Groups of 4-8 rows whose x stays within L1 (125M's 768-column
 *   matrices) fetch into L2 too (whole 125M steps: bf16 1.03-1.09x faster, one of nine
 *   alternations level; fp32 1.06-1.44x). One row of shorter bf16 rows stays unprefetched (into
 *   L2: whole 125M steps level to 1.16x slower, its matrices alone 1.1-1.25x), and the tiles
 *   (x past L1), and int8's 3 rows and more, keep the hint (into L2: level to 1.12x slower).
 * - Intel (Xeon, Sapphire Rapids class): the non-temporal hint halved decode; into L2,
 *   PREFETCH_FAR_BYTES ahead, every line, made the decode kernel 1.3-1.45x faster (125M and
 *   1.3B matrices, 1 and 2 threads, against no prefetch, builds alternating: kernel_ab.c).
 *   int8 rows too (125M steps 1.1-1.7x faster than without; 2048 or 8192 bytes ahead level).
 * Elsewhere the kernels leave it to the hardware. */
#define PREFETCH_NEAR_BYTES 1024
#define PREFETCH_NEAR_I8_BYTES 4096
#define PREFETCH_FAR_BYTES 4096

/* The prefetch for the bytes [p, p + bytes) that a decode step reads, ahead bytes ahead (a
 * step's whole span into L2, or its first line non-temporally; nothing for NEO_PREFETCH_NONE). */
static inline __attribute__((always_inline)) void
prefetch_stream(NeoDecodePrefetch how, const char *p, size_t bytes, size_t ahead)
{
    if (how == NEO_PREFETCH_L2_FAR)
        for (size_t line = 0; line < bytes; line += 64) _mm_prefetch(p + ahead + line, _MM_HINT_T1);
    else if (how == NEO_PREFETCH_NTA_NEAR)
        _mm_prefetch(p + ahead, _MM_HINT_NTA);
}

/* How far ahead a step's prefetch reaches in this way, for rows of this weight type. */
static inline size_t prefetch_distance(NeoDecodePrefetch how, NeoDType dtype)
{
    if (how == NEO_PREFETCH_L2_FAR) return PREFETCH_FAR_BYTES;
    if (how == NEO_PREFETCH_NTA_NEAR) return dtype == NEO_I8 ? PREFETCH_NEAR_I8_BYTES : PREFETCH_NEAR_BYTES;
    return 0;
}

/* The SIMD GEMMs share one driver (matmul.c): threads take panels of width columns of w
 * (static schedule), pack each once into fp32 [K][width] (pack_panel, AVX2) and run a register
 * tile over it for every rows rows of x. A tile computes out[t0.., n0..) for the rows of x below
 * T only (the last tile is as short as the rows left) and hands its sums to store_tile (below). */
typedef void GemmTile(float *out, const float *x, const float *panel, const float *bias, int t0,
                      int n0, int T, int K, int N, int accumulate);
void gemm_panels(GemmTile *tile, int width, int rows, float *out, const float *x, const NeoMatrix *w,
                 const float *bias, int T, int K, int N, int accumulate, int n_threads);
void pack_panel(float *panel, const NeoMatrix *w, int n0, int K, int N, int width);
float *aligned_rows(const float *x, int T, int K, int *ld);

/* The decode kernels' driver, one for both SIMD paths (a macro, so that each keeps its target
 * and every dtype gets its own compiled copy of block): x copied into aligned rows once, the
 * blocks of block_rows weight rows of every projection split statically over the threads in
 * one parallel region (each region costs a start and a barrier, which at 16 threads weighed on
 * a decode step), prefetching as isa does here. */
#define MATVEC_DRIVER(block, block_rows, isa)                                                  \
    const NeoDecodePrefetch how_bf16 = neo_decode_prefetch(isa, NEO_BF16, T, K);                  \
    const NeoDecodePrefetch how_i8 = neo_decode_prefetch(isa, NEO_I8, T, K);                      \
    const NeoDecodePrefetch how_f32 = neo_decode_prefetch(isa, NEO_F32, T, K);                    \
    int first_block[NEO_MAX_PROJECTIONS + 1];                                                  \
    const int blocks = projection_blocks(proj, n_proj, block_rows, first_block);               \
    int ld = K;                                                                                \
    float *aligned = aligned_rows(x, T, K, &ld);                                               \
    const float *xa = aligned ? aligned : x;                                                   \
    _Pragma("omp parallel for num_threads(n_threads) schedule(static)")                        \
    for (int b = 0; b < blocks; b++) {                                                         \
        int n_begin, n_end;                                                                    \
        const NeoProjection *p = projection_block(proj, first_block, b, block_rows, &n_begin, &n_end); \
        if (p->w->dtype == NEO_BF16)                                                           \
            block(NEO_BF16, how_bf16, p->out, xa, ld, p->w, p->bias, T, n_begin, n_end, K, p->N, accumulate); \
        else if (p->w->dtype == NEO_I8)                                                        \
            block(NEO_I8, how_i8, p->out, xa, ld, p->w, p->bias, T, n_begin, n_end, K, p->N, accumulate); \
        else                                                                                   \
            block(NEO_F32, how_f32, p->out, xa, ld, p->w, p->bias, T, n_begin, n_end, K, p->N, accumulate); \
    }                                                                                          \
    free(aligned);

/* The decode tiles run over a block's weight rows span by span, so that x's span stays in L1:
 * the fewest spans of at most span_columns columns over steps steps of step_columns columns,
 * the steps shared out evenly so that none is a short one whose passes are mostly overhead.
 * Span s covers columns span_start(s) to span_start(s + 1). */
static inline int span_count(int steps, int step_columns, int span_columns)
{
    return (steps * step_columns + span_columns - 1) / span_columns;
}

static inline size_t span_start(int s, int steps, int spans, int step_columns)
{
    return (size_t)(s * steps / spans) * step_columns;
}

/* The decode drivers split the rows of up to NEO_MAX_PROJECTIONS matrices over the threads
 * together, in blocks of block_rows rows: first[j] is matrix j's first block; returns the
 * number of blocks. */
static inline int projection_blocks(const NeoProjection *proj, int n_proj, int block_rows, int *first)
{
    first[0] = 0;
    for (int j = 0; j < n_proj; j++) first[j + 1] = first[j] + (proj[j].N + block_rows - 1) / block_rows;
    return first[n_proj];
}

/* Block b of projection_blocks: its matrix, and its rows [n_begin, n_end). */
static inline const NeoProjection *projection_block(const NeoProjection *proj, const int *first, int b,
                                                    int block_rows, int *n_begin, int *n_end)
{
    int j = 0;
    while (b >= first[j + 1]) j++;
    *n_begin = (b - first[j]) * block_rows;
    *n_end = *n_begin + block_rows < proj[j].N ? *n_begin + block_rows : proj[j].N;
    return &proj[j];
}

/* matmul_avx512.c */
#define PANEL512 32
#define MAX_PANEL PANEL512  /* the widest panel pack_panel is asked for */
#define GEMM512_ROWS 12
GemmTile gemm_tile_avx512;
void matvec_avx512(const NeoProjection *proj, int n_proj, const float *x, int T, int K, int accumulate,
                   int n_threads);
#endif

/* Adds the bias and either stores or adds to what out holds (a fused residual add). */
static inline void store_output(float *out, float sum, const float *bias, int n, int accumulate)
{
    float value = bias ? sum + bias[n] : sum;
    *out = accumulate ? *out + value : value;
}

/* A GEMM tile's sums tile[rows][width] into out rows t0.. and columns n0.., within T and N.
 * Inlined: were the tile's address to escape into a call, GCC would keep the accumulators in
 * memory through the whole k loop (measured 2.7x slower). */
static inline __attribute__((always_inline)) void
store_tile(float *out, const float *tile, int rows, int width, const float *bias, int t0, int n0,
           int T, int N, int accumulate)
{
    for (int i = 0; i < rows && t0 + i < T; i++)
        for (int j = 0; j < width && n0 + j < N; j++)
            store_output(&out[(size_t)(t0 + i) * N + n0 + j], tile[i * width + j], bias, n0 + j, accumulate);
}

/* float32 -> bfloat16 bits, round to nearest even; a NaN stays a (quiet) NaN, never an inf. */
static inline uint16_t f32_to_bf16_bits(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static inline float bf16_to_f32(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

void round_to_bf16(float *x, size_t n, int n_threads);

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

/* e^x in plain C without calls or branches, so that the compiler vectorises a loop of it for
 * whatever the caller targets (gelu, softmax): 2^n e^r with n = round(x / ln 2), the AVX2
 * path's polynomial (elementwise.c). Rounding to nearest is done by adding and subtracting
 * 1.5 * 2^23 (exact in the default rounding mode), as SSE2 has no rounding instruction; 2^n is
 * built in the exponent bits; sign and select are bit operations because GCC will not
 * if-convert a select whose arms may trap (a division) nor vectorise fabsf and copysignf
 * beside one. */
static inline uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* cond ? a : b, computed from both */
static inline float select_float(int cond, float a, float b)
{
    const uint32_t mask = -(uint32_t)cond;
    return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}

static inline float exp_portable(float x)
{
    const float round_shift = 12582912.0f;
    x = select_float(x < -87.0f, -87.0f, x);
    x = select_float(x > 88.0f, 88.0f, x);
    /* NaN passes both clamps, and converting it to an int below is formally undefined (x86
     * gives INT_MIN, and the NaN reaches the result through r). Handling it here, by a select
     * or from the mantissa's bits, measured 5-9% slower prefill (EPYC), so it stays. */
    const float n = (x * 1.44269504088896341f + round_shift) - round_shift;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * bits_float((uint32_t)((int32_t)n + 127) << 23);
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
 * (the first n_single rows to single-row segments, the others to prompts' segments)
 * and reads that sequence's key/value cache of this layer (of cache_dtype; with NEO_BF16,
 * k_new and v_new must hold bf16 values already, so that a key reads the same fresh or
 * cached). scores: attention_scratch_floats(n_ctx, head_dim) for each thread. */
void attention_forward(float *out, const float *q, const float *k_new, const float *v_new,
                       const NeoSequence *sequences, NeoDType cache_dtype, int layer, int slots,
                       const Segment *segments, const int32_t *row_segment, int n_rows,
                       int n_single, int n_heads, int head_dim, int window, float *scores,
                       int n_ctx, int n_threads, NeoIsa isa);
/* A thread's attention scratch: a row of scores, and 8 key rows widened from a bf16 cache. */
static inline size_t attention_scratch_floats(int n_ctx, int head_dim)
{
    return (size_t)n_ctx + 8 * (size_t)head_dim;
}

#endif
