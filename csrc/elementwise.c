/* elementwise.c: the per-position operations of a GPT-Neo block. */
#include <math.h>
#include "internal.h"

void embedding_forward(float *x, const int32_t *tokens, int T, int pos0, const void *wte,
                       const void *wpe, NeoDType dtype, int C)
{
    for (int t = 0; t < T; t++) {
        size_t tok_row = (size_t)tokens[t] * C, pos_row = (size_t)(pos0 + t) * C;
        for (int i = 0; i < C; i++)
            x[(size_t)t * C + i] = matrix_element(wte, dtype, tok_row + i)
                                 + matrix_element(wpe, dtype, pos_row + i);
    }
}

/* Mean and variance are summed in double so the statistics are exact to fp32 whatever C is. */
void layernorm_forward(float *out, const float *x, const float *weight, const float *bias,
                       int T, int C, float eps, int n_threads)
{
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (T > 1)
    for (int t = 0; t < T; t++) {
        const float *row = x + (size_t)t * C;
        float *dst = out + (size_t)t * C;
        double sum = 0.0;
        for (int i = 0; i < C; i++) sum += row[i];
        float mean = (float)(sum / C);
        double sq = 0.0;
        for (int i = 0; i < C; i++) {
            double d = (double)row[i] - mean;
            sq += d * d;
        }
        float rstd = (float)(1.0 / sqrt(sq / C + eps));
        for (int i = 0; i < C; i++) dst[i] = (row[i] - mean) * rstd * weight[i] + bias[i];
    }
}

/* gelu_new, the tanh form exactly as transformers' NewGELUActivation writes it. */
void gelu_new_forward(float *x, size_t n, int n_threads)
{
    const float sqrt_2_over_pi = 0.7978845608028654f;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(sqrt_2_over_pi * (v + 0.044715f * v * v * v)));
    }
}
