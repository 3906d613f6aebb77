/* neocore.h: the whole C surface of neocore, and the only header the Cython module sees.
 *
 * Three structs, as in llama2.c: the model's shape (NeoConfig), pointers to its weights
 * (NeoWeights, owned by Python: mapped or converted arrays), and the run state (NeoState:
 * scratch buffers and the key/value cache). neo_forward() runs a whole forward step. */
#ifndef NEOCORE_H
#define NEOCORE_H

#include <stddef.h>
#include <stdint.h>

/* Storage type of every weight matrix; biases and LayerNorm parameters are always fp32. */
typedef enum { NEO_F32 = 0, NEO_BF16 = 1 } NeoDType;

/* Kernel path. NEO_ISA_AVX2 needs AVX2 + FMA, checked at run time. */
typedef enum { NEO_ISA_GENERIC = 0, NEO_ISA_AVX2 = 1 } NeoIsa;

enum {
    NEO_OK = 0,
    NEO_ERR_CONTEXT_FULL = 1, /* the step would run past the state's context */
    NEO_ERR_BAD_TOKEN = 2,    /* a token id outside [0, vocab) */
    NEO_ERR_NO_MEMORY = 3,
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
    const void *q_w, *k_w, *v_w;      /* [hidden, hidden], nn.Linear layout [out, in] */
    const void *out_w;                /* [hidden, hidden] */
    const float *out_b;
    const float *ln2_w, *ln2_b;
    const void *fc_w;                 /* [ffn, hidden] */
    const float *fc_b;
    const void *proj_w;               /* [hidden, ffn] */
    const float *proj_b;
} NeoLayerWeights;

typedef struct {
    NeoDType dtype;          /* of every matrix below */
    const void *wte;         /* [vocab, hidden]; also the (tied) output projection */
    const void *wpe;         /* [max_positions, hidden] */
    const NeoLayerWeights *layers;
    const float *lnf_w, *lnf_b;
} NeoWeights;

typedef struct {
    int n_ctx;      /* positions the cache holds; a step may not go past it */
    int chunk;      /* tokens processed together in one batched pass */
    int n_threads;
    NeoIsa isa;
    int n_layers;
    int pos;        /* tokens already in the cache */
    /* scratch for one chunk: [chunk, hidden] each, h is [chunk, ffn] */
    float *x, *xn, *q, *k, *v, *att, *h;
    float *scores;  /* [n_threads, n_ctx]: one attention row per thread */
    float **key_cache, **value_cache; /* per layer: [n_heads][slots][head_dim]; slots = window (local) or n_ctx */
    int *cache_slots;
} NeoState;

/* Run-time CPU check: 1 when AVX2 and FMA are usable (CPUID and the OS saving YMM state). */
int neo_cpu_has_avx2_fma(void);
/* 1 on AMD processors (CPUID vendor string), where the decode kernel prefetches. */
int neo_cpu_is_amd(void);

NeoState *neo_state_new(const NeoConfig *cfg, int n_ctx, int chunk, int n_threads, NeoIsa isa);
void neo_state_free(NeoState *s);

/* Append n tokens at position s->pos and advance it. Writes logits for every token
 * ([n, vocab]) when all_logits is set, else for the last one only ([vocab]).
 * Returns NEO_OK or a NEO_ERR_* code (the state is left unchanged on error). */
int neo_forward(const NeoConfig *cfg, const NeoWeights *w, NeoState *s,
                const int32_t *tokens, int n, float *logits, int all_logits);

/* float32 -> bfloat16 bits, rounding to nearest even; returns 1 if any value changed. */
int neo_f32_to_bf16(uint16_t *dst, const float *src, size_t n, int n_threads);

/* Kernels, exposed so tests can compare the SIMD paths with the scalar reference. */
void matmul_forward(float *out, const float *x, const void *w, NeoDType dtype, const float *bias,
                    int T, int K, int N, int accumulate, int n_threads, NeoIsa isa);
void gelu_new_forward(float *x, size_t n, int n_threads, NeoIsa isa);

#endif
