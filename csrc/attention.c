/* attention.c: causal self-attention of one layer for a step's rows, each over its own
 * sequence's cache and the rows its sequence brings to this step.
 *
 * As in transformers' GPTNeoSelfAttention: scores are q.k with no 1/sqrt(head_dim) scaling,
 * in fp32; the softmax runs over the keys the query may see. A global layer sees every
 * earlier position; a local one sees key j from query i iff 0 <= i - j <= window - 1.
 * Keys of the current step are read from k_new/v_new, older ones from the cache (slot
 * j % slots), so a local layer's ring buffer is only written after the step's attention.
 * The cache is head-major, so one head's keys stream from memory in order. In the bf16
 * compute mode it holds bf16 (half the bytes a many-sequence decode step reads), widened to
 * fp32 a row at a time as the kernels read it; this step's keys and values come rounded to bf16
 * already, so every key has one value whether it is read fresh or from the cache. */
#include <math.h>
#include "internal.h"
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; } /* built without OpenMP: one thread */
#endif

/* count rows of head_dim values, stride values apart, of type dtype (NEO_F32 or NEO_BF16) */
typedef struct {
    const void *rows;
    int count;
    int stride;
    NeoDType dtype;
} RowRun;

/* n values of row c of a run from column d on, as fp32: in place, or widened into widened. */
static inline __attribute__((always_inline)) const float *run_row(const RowRun *run, int c, int d, int n,
                                                                  float *restrict widened)
{
    const size_t at = (size_t)c * run->stride + d;
    if (run->dtype == NEO_F32) return (const float *)run->rows + at;
    const uint16_t *restrict row = (const uint16_t *)run->rows + at;
    for (int i = 0; i < n; i++) widened[i] = bf16_to_f32(row[i]);
    return widened;
}

/* Head h's key (or value) rows first..last in order, as at most three runs: the cached ones
 * (head-major [n_heads][slots][head_dim], a ring buffer wrapping at most once) and then this
 * chunk's ([T][C], the head's slice of each row). */
static int row_runs(RowRun runs[3], const float *fresh, const void *cache, NeoDType cache_dtype,
                    int slots, int pos0, int first, int last, int C, int h, int head_dim)
{
    int n = 0;
    const size_t elem = dtype_bytes(cache_dtype);
    const char *head_cache = (const char *)cache + (size_t)h * slots * head_dim * elem;
    const int last_cached = pos0 - 1 < last ? pos0 - 1 : last;
    if (first <= last_cached) {
        const int count = last_cached - first + 1, slot = first % slots;
        const int before_wrap = count < slots - slot ? count : slots - slot;
        runs[n++] = (RowRun){head_cache + (size_t)slot * head_dim * elem, before_wrap, head_dim, cache_dtype};
        if (count > before_wrap) runs[n++] = (RowRun){head_cache, count - before_wrap, head_dim, cache_dtype};
    }
    const int first_fresh = first > pos0 ? first : pos0;
    if (first_fresh <= last)
        runs[n++] = (RowRun){fresh + (size_t)(first_fresh - pos0) * C + (size_t)h * head_dim,
                             last - first_fresh + 1, C, NEO_F32};
    return n;
}

/* Each decode (row, head) streams a few tens of KiB of cache, too short for the hardware
 * prefetcher to get going, so the AVX2 and AVX-512 paths fetch it themselves where that
 * measured faster (a prompt's rows re-read keys from cache: none for them).
 * AHEAD, each row 8 rows before its use. Zen 4, 125M, 2 threads, builds alternating: decode
 * steps of 8 rows at position 250 2-15% faster, 1 row at position 1000 4-13% (the AVX2 path
 * 11-14%). The Intel Xeon (AVX-512 path, the same steps): 8 rows at 250 0-7% faster (three
 * runs: 1.07, 1.00, 1.07x), 1 row at 1000 1.04x and 0.99x.
 * VALUES_WITH_KEYS, also each value row into L2 with the key row at its position, 8 rows
 * ahead of the keys' reading, so that the values' misses overlap the keys' instead of
 * following them. Zen 4, 125M exact, position 250, medians of 8-12 alternations, two runs:
 * 1 row 1.08-1.10x faster at 1 thread (the AVX2 path 1.05x), level-1.03x at 2; 8 and 32 rows
 * 1.03-1.04x (value rows into L1 instead: 1.06x at 1 thread, level at 32 rows). Not measured
 * on the Xeon, which keeps AHEAD; Zen 3 not measured either, so it keeps the hardware's. */
NeoAttentionFetch neo_attention_fetch(void)
{
    switch (neo_cpu_kind()) {
    case NEO_CPU_AMD_ZEN4: return NEO_ATTENTION_FETCH_VALUES_WITH_KEYS;
    case NEO_CPU_INTEL: return NEO_ATTENTION_FETCH_AHEAD;
    default: return NEO_ATTENTION_FETCH_NONE;
    }
}

/* ---- the two inner loops: scalar reference, portable, AVX2, AVX-512 ---------------------------------- */

static float dot_scalar(const float *a, const float *b, int n)
{
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* out[d] = sum_j weights[j] * rows[j][offset + d] over the runs. Each out[d] is summed over j
 * in order; the loop over d is contiguous and vectorises without changing any sum, so this
 * one loop is both the scalar reference and the portable path. widened: n floats of scratch. */
static void weighted_rows_generic(float *restrict out, const float *restrict weights,
                                  const RowRun *runs, int n_runs, int offset, int n, float *widened)
{
    for (int d = 0; d < n; d++) out[d] = 0.0f;
    for (int r = 0, j = 0; r < n_runs; r++)
        for (int c = 0; c < runs[r].count; c++, j++) {
            const float *restrict row = run_row(&runs[r], c, offset, n, widened);
            const float wj = weights[j];
            #pragma omp simd
            for (int d = 0; d < n; d++) out[d] += wj * row[d];
        }
}

#if defined(__x86_64__)
/* 4 or 16 rows ahead: 1.08-1.14x slower on Zen 4; bf16 rows 16 ahead (the same bytes): level */
#define PREFETCH_ROWS_AHEAD 8

/* Row c + PREFETCH_ROWS_AHEAD of a run fetched ahead of its use (head_dim values; nothing past
 * the run), into L1, or into L2 alone when into_l2 (rows wanted only after others). */
static inline __attribute__((always_inline)) void prefetch_row_ahead(NeoAttentionFetch fetch, const RowRun *run,
                                                                     int c, int head_dim, int into_l2)
{
    if (fetch == NEO_ATTENTION_FETCH_NONE || c + PREFETCH_ROWS_AHEAD >= run->count) return;
    const size_t elem = dtype_bytes(run->dtype);
    const char *row = (const char *)run->rows + (size_t)(c + PREFETCH_ROWS_AHEAD) * run->stride * elem;
    for (size_t b = 0; b < head_dim * elem; b += 64)
        if (into_l2) _mm_prefetch(row + b, _MM_HINT_T1);
        else _mm_prefetch(row + b, _MM_HINT_T0);
}

TARGET_AVX2 static inline float dot_avx2(const float *a, const float *b, int n)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    __m256 v = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float sum = _mm_cvtss_f32(s);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* Columns in blocks of 32 held in four registers across all rows, so out is written once. */
TARGET_AVX2 static void weighted_rows_avx2(float *out, const float *weights, const RowRun *runs,
                                           int n_runs, int n, NeoAttentionFetch fetch)
{
    float widened[32];
    int d = 0;
    for (; d + 32 <= n; d += 32) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int r = 0, j = 0; r < n_runs; r++)
            for (int c = 0; c < runs[r].count; c++, j++) {
                const float *row = run_row(&runs[r], c, d, 32, widened);
                if (d == 0) prefetch_row_ahead(fetch, &runs[r], c, n, 0);
                const __m256 w = _mm256_set1_ps(weights[j]);
                for (int a = 0; a < 4; a++) acc[a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * a), acc[a]);
            }
        for (int a = 0; a < 4; a++) _mm256_storeu_ps(out + d + 8 * a, acc[a]);
    }
    if (d < n) weighted_rows_generic(out + d, weights, runs, n_runs, d, n - d, widened);
}

/* The same two loops on 16-float vectors: the dot with two accumulators and a masked tail,
 * the weighted sum over columns in blocks of 64 held in four registers. */
TARGET_AVX512 static inline float dot_avx512(const float *a, const float *b, int n)
{
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i < n; i += 16) {
        const __mmask16 mask = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + i), _mm512_maskz_loadu_ps(mask, b + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

TARGET_AVX512 static void weighted_rows_avx512(float *out, const float *weights, const RowRun *runs,
                                               int n_runs, int n, NeoAttentionFetch fetch)
{
    float widened[64];
    int d = 0;
    for (; d + 64 <= n; d += 64) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int r = 0, j = 0; r < n_runs; r++)
            for (int c = 0; c < runs[r].count; c++, j++) {
                const float *row = run_row(&runs[r], c, d, 64, widened);
                if (d == 0) prefetch_row_ahead(fetch, &runs[r], c, n, 0);
                const __m512 w = _mm512_set1_ps(weights[j]);
                for (int a = 0; a < 4; a++) acc[a] = _mm512_fmadd_ps(w, _mm512_loadu_ps(row + 16 * a), acc[a]);
            }
        for (int a = 0; a < 4; a++) _mm512_storeu_ps(out + d + 16 * a, acc[a]);
    }
    if (d < n) weighted_rows_generic(out + d, weights, runs, n_runs, d, n - d, widened);
}
#endif

/* ---- scores of 8 keys at once (AVX2, AVX-512) ------------------------------------------------
 * A prompt's queries see tens to thousands of keys each: one dot at a time paid a horizontal
 * sum per key. Here 8 keys run side by side, one accumulator each (q stays in registers), and
 * one transposing fold sums all 8. Every key is summed in the same order whichever slot of the
 * 8 it takes (a short group repeats its last key), so a score never depends on its neighbours. */
#if defined(__x86_64__)
/* (sum of the lanes of v[0]), ..., (sum of the lanes of v[7]): pairs of lanes, then pairs of
 * pairs, then the two 128-bit halves. */
INLINE_AVX2 __m256 fold8_avx2(const __m256 v[8])
{
    const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);
    /* q0 = [k0 k1 k2 k3 (low halves) | k0 k1 k2 k3 (high halves)], q1 likewise for k4..k7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

TARGET_AVX2 static void scores8_avx2(float *s, const float *q, const float *const key[8], int head_dim)
{
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < head_dim; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[j] + d), acc[j]);
    }
    _mm256_storeu_ps(s, fold8_avx2(acc));
}

TARGET_AVX512 static void scores8_avx512(float *s, const float *q, const float *const key[8], int head_dim)
{
    __m512 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
    for (int d = 0; d < head_dim; d += 16) {
        const __m512 qv = _mm512_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(key[j] + d), acc[j]);
    }
    __m256 halves[8];
    for (int j = 0; j < 8; j++)
        halves[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1)));
    _mm256_storeu_ps(s, fold8_avx2(halves));
}
#endif

/* ---- one query of one head ------------------------------------------------------------------ */

static inline __attribute__((always_inline)) float attention_dot(const NeoIsa isa, const float *a,
                                                                 const float *b, int n)
{
#if defined(__x86_64__)
    if (isa == NEO_ISA_AVX2) return dot_avx2(a, b, n);
    if (isa == NEO_ISA_AVX512) return dot_avx512(a, b, n);
#endif
    return isa == NEO_ISA_SCALAR ? dot_scalar(a, b, n) : dot_lanes(NEO_F32, a, b, n);
}

/* out = softmax(q . keys) . values over the keys position pos0 + t may see. isa is a constant
 * at each call site, so each instantiation keeps only its own inner loops; fetch: see
 * neo_attention_fetch. s: a row of scores; widened: 8 rows of head_dim floats. */
static inline __attribute__((always_inline)) void
attend(const NeoIsa isa, float *out, const float *q, const float *k_new, const float *v_new,
       const void *k_cache, const void *v_cache, NeoDType cache_dtype, int slots, int pos0, int t,
       int h, int C, int head_dim, int window, float *s, float *widened, NeoAttentionFetch fetch)
{
    const int p = pos0 + t;
    const int first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int offset = h * head_dim;
    const float *qh = q + (size_t)t * C + offset;
    RowRun runs[3], value_runs[3];
    int n_runs = row_runs(runs, k_new, k_cache, cache_dtype, slots, pos0, first, p, C, h, head_dim);
    row_runs(value_runs, v_new, v_cache, cache_dtype, slots, pos0, first, p, C, h, head_dim);
    int n_keys = 0;
    for (int r = 0; r < n_runs; r++) n_keys += runs[r].count;
    const int step = isa == NEO_ISA_AVX2 ? 8 : 16;  /* scores8's d step */
    if ((isa == NEO_ISA_AVX2 || isa == NEO_ISA_AVX512) && head_dim % step == 0) {
#if defined(__x86_64__)
        const float *key[8];
        float group[8];
        for (int r = 0, i = 0; r < n_runs; r++)
            for (int c = 0; c < runs[r].count; c++, i++) {
                key[i % 8] = run_row(&runs[r], c, 0, head_dim, widened + i % 8 * head_dim);
                prefetch_row_ahead(fetch, &runs[r], c, head_dim, 0);
                if (fetch == NEO_ATTENTION_FETCH_VALUES_WITH_KEYS)
                    prefetch_row_ahead(fetch, &value_runs[r], c, head_dim, 1);
                if (i % 8 != 7 && i != n_keys - 1) continue;
                const int filled = i % 8 + 1;
                for (int j = filled; j < 8; j++) key[j] = key[filled - 1];
                (isa == NEO_ISA_AVX2 ? scores8_avx2 : scores8_avx512)(group, qh, key, head_dim);
                memcpy(s + i / 8 * 8, group, sizeof(float) * filled);
            }
#endif
    } else {
        for (int r = 0, i = 0; r < n_runs; r++)
            for (int c = 0; c < runs[r].count; c++, i++)
                s[i] = attention_dot(isa, qh, run_row(&runs[r], c, 0, head_dim, widened), head_dim);
    }
    float max_score = -INFINITY;
    for (int i = 0; i < n_keys; i++) max_score = s[i] > max_score ? s[i] : max_score;
    if (isa == NEO_ISA_SCALAR) {
        for (int i = 0; i < n_keys; i++) s[i] = expf(s[i] - max_score);
    } else {
        #pragma omp simd
        for (int i = 0; i < n_keys; i++) s[i] = exp_portable(s[i] - max_score);
    }
    float total = 0.0f;
    for (int i = 0; i < n_keys; i++) total += s[i];
    for (int i = 0; i < n_keys; i++) s[i] /= total;
    float *oh = out + (size_t)t * C + offset;
#if defined(__x86_64__)
    if (isa == NEO_ISA_AVX2) {
        weighted_rows_avx2(oh, s, value_runs, n_runs, head_dim, fetch);
        return;
    }
    if (isa == NEO_ISA_AVX512) {
        weighted_rows_avx512(oh, s, value_runs, n_runs, head_dim, fetch);
        return;
    }
#endif
    weighted_rows_generic(oh, s, value_runs, n_runs, 0, head_dim, widened);
}

#define ATTENTION_PARAMS                                                                        \
    float *out, const float *q, const float *k_new, const float *v_new,                        \
    const NeoSequence *sequences, NeoDType cache_dtype, int layer, int slots,                  \
    const Segment *segments, const int32_t *row_segment, int n_rows, int n_single, int n_heads, \
    int head_dim, int window, float *scores, int n_ctx, int n_threads

/* Row r, head h: the row reads its own sequence's cache and the fresh rows of its segment. */
#define ATTEND_ROW_HEAD(isa, r, h, fetch)                                                    \
    do {                                                                                        \
        const Segment *sg = &segments[row_segment[r]];                                          \
        const size_t first_row = (size_t)sg->row0 * C;                                          \
        const NeoSequence *seq = &sequences[sg->seq];                                           \
        attend(isa, out + first_row, q + first_row, k_new + first_row, v_new + first_row,       \
               seq->key_cache[layer], seq->value_cache[layer], cache_dtype, slots, sg->pos0,    \
               (r) - sg->row0, h, C, head_dim, window, scratch, scratch + n_ctx, fetch);     \
    } while (0)

/* Every (row, head) pair is independent. The decode rows (the first n_single) each stream
 * their sequence's cache: threads take them in contiguous runs. A prompt row's cost grows
 * with its position, so contiguous runs would give the last thread the most (3x the first's
 * at 2 threads): threads take a prompt's pairs in turn. */
#define ATTENTION_LOOP(isa)                                                                     \
    const int C = n_heads * head_dim;                                                           \
    const NeoAttentionFetch fetch = neo_attention_fetch();                                            \
    _Pragma("omp parallel num_threads(n_threads)")                                              \
    {                                                                                           \
        float *scratch = scores + omp_get_thread_num() * attention_scratch_floats(n_ctx, head_dim); \
        _Pragma("omp for collapse(2) schedule(static) nowait")                                  \
        for (int r = 0; r < n_single; r++)                                                      \
            for (int h = 0; h < n_heads; h++) ATTEND_ROW_HEAD(isa, r, h, fetch);             \
        _Pragma("omp for collapse(2) schedule(static, 1)")                                      \
        for (int r = n_single; r < n_rows; r++)                                                 \
            for (int h = 0; h < n_heads; h++) ATTEND_ROW_HEAD(isa, r, h, NEO_ATTENTION_FETCH_NONE);                    \
    }

static void attention_generic(ATTENTION_PARAMS) { ATTENTION_LOOP(NEO_ISA_GENERIC) }
static void attention_scalar(ATTENTION_PARAMS) { ATTENTION_LOOP(NEO_ISA_SCALAR) }

#if defined(__x86_64__)
TARGET_AVX2 static void attention_avx2(ATTENTION_PARAMS) { ATTENTION_LOOP(NEO_ISA_AVX2) }
TARGET_AVX512 static void attention_avx512(ATTENTION_PARAMS) { ATTENTION_LOOP(NEO_ISA_AVX512) }
#endif

void attention_forward(ATTENTION_PARAMS, NeoIsa isa)
{
#if defined(__x86_64__)
    if (isa == NEO_ISA_AVX2 || isa == NEO_ISA_AVX512) {
        (isa == NEO_ISA_AVX2 ? attention_avx2 : attention_avx512)(
            out, q, k_new, v_new, sequences, cache_dtype, layer, slots, segments, row_segment,
            n_rows, n_single, n_heads, head_dim, window, scores, n_ctx, n_threads);
        return;
    }
#endif
    (isa == NEO_ISA_SCALAR ? attention_scalar : attention_generic)(
        out, q, k_new, v_new, sequences, cache_dtype, layer, slots, segments, row_segment, n_rows,
        n_single, n_heads, head_dim, window, scores, n_ctx, n_threads);
}
