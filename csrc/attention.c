/* attention.c: causal self-attention of one layer over the cache and the current chunk.
 *
 * As in transformers' GPTNeoSelfAttention: scores are q.k with no 1/sqrt(head_dim) scaling,
 * in fp32; the softmax runs over the keys the query may see. A global layer sees every
 * earlier position; a local one sees key j from query i iff 0 <= i - j <= window - 1.
 * Keys of the current chunk are read from k_new/v_new, older ones from the cache (slot
 * j % slots), so a local layer's ring buffer is only written after the chunk's attention. */
#include <math.h>
#include <omp.h>
#include "internal.h"

/* Eight independent lanes let the compiler vectorise without reassociating a sum. */
static inline float dot(const float *a, const float *b, int n)
{
    float lanes[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lanes[l] += a[i + l] * b[i + l];
    float sum = 0.0f;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int l = 0; l < 8; l++) sum += lanes[l];
    return sum;
}

void attention_forward(float *out, const float *q, const float *k_new, const float *v_new,
                       const float *k_cache, const float *v_cache, int slots, int pos0, int T,
                       int n_heads, int head_dim, int window, float *scores, int scores_stride,
                       int n_threads)
{
    const int C = n_heads * head_dim;
    #pragma omp parallel for collapse(2) num_threads(n_threads) schedule(static)
    for (int h = 0; h < n_heads; h++) {
        for (int t = 0; t < T; t++) {
            float *s = scores + (size_t)omp_get_thread_num() * scores_stride;
            const int p = pos0 + t;
            const int first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const int n_keys = p - first + 1;
            const float *qh = q + (size_t)t * C + (size_t)h * head_dim;
            float max_score = -INFINITY;
            for (int j = first; j <= p; j++) {
                const float *key = j >= pos0 ? k_new + (size_t)(j - pos0) * C
                                             : k_cache + (size_t)(j % slots) * C;
                float sc = dot(qh, key + (size_t)h * head_dim, head_dim);
                s[j - first] = sc;
                if (sc > max_score) max_score = sc;
            }
            float total = 0.0f;
            for (int i = 0; i < n_keys; i++) {
                s[i] = expf(s[i] - max_score);
                total += s[i];
            }
            float *oh = out + (size_t)t * C + (size_t)h * head_dim;
            for (int d = 0; d < head_dim; d++) oh[d] = 0.0f;
            for (int j = first; j <= p; j++) {
                const float *value = j >= pos0 ? v_new + (size_t)(j - pos0) * C
                                               : v_cache + (size_t)(j % slots) * C;
                const float weight = s[j - first] / total;
                for (int d = 0; d < head_dim; d++) oh[d] += weight * value[(size_t)h * head_dim + d];
            }
        }
    }
}
