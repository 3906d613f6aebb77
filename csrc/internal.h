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

/* Element i of a weight matrix stored as dtype, widened to fp32. */
static inline float matrix_element(const void *m, NeoDType dtype, size_t i)
{
    return dtype == NEO_BF16 ? bf16_to_f32(((const uint16_t *)m)[i]) : ((const float *)m)[i];
}

void layernorm_forward(float *out, const float *x, const float *weight, const float *bias,
                       int T, int C, float eps, int n_threads);
void embedding_forward(float *x, const int32_t *tokens, int T, int pos0, const void *wte,
                       const void *wpe, NeoDType dtype, int C);
void attention_forward(float *out, const float *q, const float *k_new, const float *v_new,
                       const float *k_cache, const float *v_cache, int slots, int pos0, int T,
                       int n_heads, int head_dim, int window, float *scores, int scores_stride,
                       int n_threads, NeoIsa isa);

#endif
