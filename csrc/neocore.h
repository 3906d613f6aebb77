/* neocore.h: the whole C surface of neocore, and the only header the Cython module sees.
 *
 * Three structs, as in llama2.c: the model's shape (NeoConfig), pointers to its weights
 * (NeoWeights, owned by Python: mapped or converted arrays), and the run state (NeoState:
 * scratch buffers and the key/value caches of its sequence slots). neo_step() runs a whole
 * forward step over a batch of rows from any number of sequences. */
#ifndef NEOCORE_H
#define NEOCORE_H

#include <stddef.h>
#include <stdint.h>

/* Storage type of a weight matrix; biases and LayerNorm parameters are always fp32. */
typedef enum { NEO_F32 = 0, NEO_BF16 = 1, NEO_I8 = 2 } NeoDType;

/* int8 matrices carry one fp32 scale per block of this many consecutive elements of a row
 * (a multiple of 32: the AVX2 decode kernel takes one scale per 32 columns). */
#define NEO_I8_BLOCK 32

/* A weight matrix [rows, cols] in nn.Linear layout [out, in]. For NEO_I8, data holds int8
 * values and scales[rows][ceil(cols / NEO_I8_BLOCK)] the step of each block: an element is
 * value * scale. scales is NULL for the other types. */
typedef struct {
    NeoDType dtype;
    const void *data;
    const float *scales;
} NeoMatrix;

/* Kernel path. NEO_ISA_GENERIC is plain C that the compiler vectorises for whatever it targets
 * (SSE2 on any x86-64, NEON on aarch64); NEO_ISA_AVX2 needs AVX2 + FMA and NEO_ISA_AVX512
 * AVX-512F/BW/VL, both checked at run time. NEO_ISA_SCALAR is the scalar reference, one
 * product at a time in index order: the oracle the tests compare the other paths with. */
typedef enum { NEO_ISA_GENERIC = 0, NEO_ISA_AVX2 = 1, NEO_ISA_AVX512 = 2, NEO_ISA_SCALAR = 3 } NeoIsa;

/* The multiplier of the prefill GEMM in the bf16 compute mode: x rounded to bf16, products of
 * bf16 values (exact in fp32), sums in fp32. Keys and values are rounded to bf16 too, so that
 * the cache holds half the bytes (what many sequences' decode steps read most); LayerNorm,
 * softmax, gelu, residuals and queries stay fp32. NEO_BF16_OFF is the exact mode.
 * NEO_BF16_AMX runs AMX tiles (TDPBF16PS), NEO_BF16_AVX512 VDPBF16PS, NEO_BF16_REFERENCE the
 * scalar oracle. */
typedef enum { NEO_BF16_OFF = 0, NEO_BF16_REFERENCE = 1, NEO_BF16_AVX512 = 2, NEO_BF16_AMX = 3 } NeoBf16Gemm;

enum {
    NEO_OK = 0,
    NEO_ERR_CONTEXT_FULL = 1, /* a sequence would run past the state's context */
    NEO_ERR_BAD_TOKEN = 2,    /* a token id outside [0, vocab) */
    NEO_ERR_NO_MEMORY = 3,
    NEO_ERR_BAD_BATCH = 4,    /* too many rows, a bad sequence id, or a sequence's rows apart */
};

typedef struct {
    int hidden;
    int n_layers;
    int n_heads;
    int head_dim;
    int ffn;            /* inner size of the MLP */
    int vocab;
    int max_positions;  /* rows of the position embedding */
    int window;         /* keys a local layer sees, the query's own included */
    float ln_eps;
    const uint8_t *layer_is_local; /* n_layers flags: 1 local, 0 global */
} NeoConfig;

typedef struct {
    const float *ln1_w, *ln1_b;
    NeoMatrix q, k, v;                /* [hidden, hidden] */
    NeoMatrix out;                    /* [hidden, hidden] */
    const float *out_b;
    const float *ln2_w, *ln2_b;
    NeoMatrix fc;                     /* [ffn, hidden] */
    const float *fc_b;
    NeoMatrix proj;                   /* [hidden, ffn] */
    const float *proj_b;
} NeoLayerWeights;

typedef struct {
    NeoMatrix wte;           /* [vocab, hidden]; also the (tied) output projection */
    NeoMatrix wpe;           /* [max_positions, hidden] */
    const NeoLayerWeights *layers;
    const float *lnf_w, *lnf_b;
} NeoWeights;

/* One step's work, as llama.cpp's batch: rows of (sequence, token). A sequence's rows are
 * consecutive and take the positions after what its cache holds. The model never knows why
 * a row is there: a decode token, a prompt chunk, a scored text. */
typedef struct {
    int n_rows;
    const int32_t *tokens;       /* [n_rows] */
    const int32_t *seqs;         /* [n_rows] sequence slot of each row */
    const uint8_t *want_logits;  /* [n_rows] 1 where the row's logits are wanted */
} NeoBatch;

/* A sequence slot: its length and, once it holds a token, its key/value cache (per layer
 * [n_heads][slots][head_dim] of the state's cache_dtype; slots = window for local layers,
 * n_ctx for global ones). The cache is mapped on first use and handed back when the sequence
 * is cleared: pages are backed only where positions were written, so idle slots cost nothing. */
typedef struct {
    int len;
    void **key_cache, **value_cache;
} NeoSequence;

typedef struct {
    int n_seqs;     /* sequence slots */
    int n_ctx;      /* positions each sequence may hold */
    int max_rows;   /* rows one step may carry */
    int n_threads;
    NeoIsa isa;
    NeoBf16Gemm bf16_gemm;
    NeoDType cache_dtype;  /* NEO_F32, or NEO_BF16 in the bf16 compute mode */
    int n_layers, hidden;
    int *cache_slots;    /* per layer */
    NeoSequence *seq;    /* [n_seqs] */
    /* scratch for one step: [max_rows, hidden] each, h is [max_rows, ffn] */
    float *x, *xn, *q, *k, *v, *att, *h;
    float *scores;       /* [n_threads, attention_scratch_floats]: one attention row per thread */
    void *plan;          /* the step's row order and segments (forward.c) */
} NeoState;

/* Run-time CPU checks: 1 when AVX2 and FMA are usable (CPUID and the OS saving YMM state), and
 * when AVX-512F/BW/VL are (CPUID and the OS saving the opmask and ZMM state). */
int neo_cpu_has_avx2_fma(void);
int neo_cpu_has_avx512(void);
/* 1 when AVX-512 is usable and so is VDPBF16PS (AVX512-BF16); and when, beside those, AMX-BF16
 * tiles are, for which the first call asks Linux for the tile data state (arch_prctl): 0 where
 * that is refused. */
int neo_cpu_has_avx512_bf16(void);
int neo_cpu_has_amx_bf16(void);
/* The kind of CPU some kernel choices were measured on (CPUID): a choice that won on one kind
 * lost on another, so each is made by kind at run time. AMD CPUs without AVX-512 are measured
 * as Zen 3, AMD ones with it (AMD's first was Zen 4) as Zen 4; Intel ones as the Sapphire
 * Rapids class Xeon. */
typedef enum { NEO_CPU_OTHER, NEO_CPU_AMD_ZEN3, NEO_CPU_AMD_ZEN4, NEO_CPU_INTEL } NeoCpuKind;
NeoCpuKind neo_cpu_kind(void);
/* 1 when compiled with OpenMP; without it every step runs on one thread. */
int neo_built_with_openmp(void);
/* How the decode kernel of path isa prefetches weight rows of type dtype, cols columns long,
 * for rows rows of x, on this CPU: not at all, non-temporally a little ahead, or into L2 far
 * ahead, by CPU kind; see internal.h. */
typedef enum { NEO_PREFETCH_NONE, NEO_PREFETCH_NTA_NEAR, NEO_PREFETCH_L2_FAR } NeoDecodePrefetch;
NeoDecodePrefetch neo_decode_prefetch(NeoIsa isa, NeoDType dtype, int rows, int cols);
/* The path whose decode kernel a model on path isa steps weights of type dtype with, on this
 * CPU: isa itself, except on AMD Zen 4, where the AVX-512 path decodes bf16 and fp32 weights
 * with the AVX2 kernel (see matmul.c). */
NeoIsa neo_decode_isa(NeoIsa isa, NeoDType dtype);
/* How attention fetches a decode row's key and value rows on the AVX2 and AVX-512 paths, on
 * this CPU (by kind; see attention.c): not at all, each a few rows ahead of its use, or that
 * and each value row into L2 with the key row at its position. */
typedef enum { NEO_ATTENTION_FETCH_NONE, NEO_ATTENTION_FETCH_AHEAD, NEO_ATTENTION_FETCH_VALUES_WITH_KEYS } NeoAttentionFetch;
NeoAttentionFetch neo_attention_fetch(void);
/* The XOR of the bytes / 8 64-bit words at data (8-byte aligned), read by n_threads threads
 * (bandwidth.c). */
uint64_t neo_read_stream(const void *data, size_t bytes, int n_threads, NeoDecodePrefetch how);

NeoState *neo_state_new(const NeoConfig *cfg, int n_seqs, int n_ctx, int max_rows,
                        int n_threads, NeoIsa isa, NeoBf16Gemm bf16_gemm);
void neo_state_free(NeoState *s);

/* Forgets what sequence seq holds and hands its cache memory back. */
void neo_seq_clear(NeoState *s, int seq);

/* One forward step over a batch: appends each row's token to its sequence and writes the
 * logits of the rows that want them, in batch order, to logits ([wanted rows, vocab]).
 * A row's result does not depend on the other rows: a sequence with one row in the step is
 * computed by the decode kernels (matvec order), one with several by the prefill kernels,
 * whatever else the batch holds. Returns NEO_OK or a NEO_ERR_* code (state unchanged then). */
int neo_step(const NeoConfig *cfg, const NeoWeights *w, NeoState *s, const NeoBatch *batch,
             float *logits);

/* float32 -> bfloat16 bits, rounding to nearest even; returns 1 if any value changed. */
int neo_f32_to_bf16(uint16_t *dst, const float *src, size_t n, int n_threads);

/* float32 [rows, cols] -> NEO_I8 values [rows, cols] and scales [rows, ceil(cols / NEO_I8_BLOCK)]
 * (symmetric, round to nearest, one scale per block of a row); returns 0 if src holds a NaN or
 * an infinity (the output is then meaningless), else 1. */
int neo_quantize_i8(int8_t *values, float *scales, const float *src, size_t rows, size_t cols,
                    int n_threads);

/* Kernels, exposed so tests can compare the SIMD paths with the scalar reference.
 * out[t, n] (+)= bias[n] + sum_k x[t, k] * w[n, k]. matmul_forward is the prefill GEMM;
 * matvec_forward streams each weight row once for all T rows (decode), each row summed in
 * the same order as when it is alone. */
void matmul_forward(float *out, const float *x, const NeoMatrix *w, const float *bias,
                    int T, int K, int N, int accumulate, int n_threads, NeoIsa isa);
void matvec_forward(float *out, const float *x, const NeoMatrix *w, const float *bias,
                    int T, int K, int N, int accumulate, int n_threads, NeoIsa isa);
/* One weight matrix of a decode pass: out[t, n] (+)= bias[n] + sum_k x[t, k] * w[n, k], N outputs. */
typedef struct {
    float *out;
    const NeoMatrix *w;
    const float *bias;
    int N;
} NeoProjection;
#define NEO_MAX_PROJECTIONS 3  /* q, k and v, which share their x: one parallel region for all */
/* matvec_forward for n_proj matrices of K columns over one x, NEO_MAX_PROJECTIONS at a time. */
void matvec_projections(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                        int accumulate, int n_threads, NeoIsa isa);
/* What a state on path decodes with (the projections share a weight type): matvec_projections
 * on the decode kernel neo_decode_isa chooses; where that is the AVX2 kernel on the AVX-512
 * path (Zen 4), its tiles run in zmm registers, with the same bits. */
void neo_decode_projections(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                            int accumulate, int n_threads, NeoIsa path);
/* matmul_forward with x rounded to bf16 and the products summed in fp32 (weights of any
 * dtype are rounded to bf16 too: bf16 ones are unchanged), on the given multiplier. */
void matmul_bf16_forward(float *out, const float *x, const NeoMatrix *w, const float *bias,
                         int T, int K, int N, int accumulate, int n_threads, NeoBf16Gemm gemm);
/* The decode rows of the bf16 compute mode: matvec_projections with x rounded to bf16 and the
 * products summed in fp32, each row as it would be alone (see matmul_bf16.c). A state in that
 * mode decodes so where neo_bf16_decodes(gemm) says; elsewhere its decode stays exact. */
int neo_bf16_decodes(NeoBf16Gemm gemm);
void matvec_bf16_projections(const NeoProjection *proj, int n_proj, const float *x, int T, int K,
                             int accumulate, int n_threads, NeoBf16Gemm gemm);
void gelu_new_forward(float *x, size_t n, int n_threads, NeoIsa isa);

#endif
