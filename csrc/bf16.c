/* bf16.c: float32 -> bfloat16, round to nearest with ties to even, as torch's .to(bfloat16).
 * Used once per weight at load time, and for the bf16 mode's keys and values; threads split
 * large arrays. */
#include "internal.h"

int neo_f32_to_bf16(uint16_t *dst, const float *src, size_t n, int n_threads)
{
    int rounded = 0;
    #pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : rounded) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &src[i], sizeof bits);
        rounded |= (bits & 0xFFFF) != 0;
        dst[i] = f32_to_bf16_bits(src[i]);
    }
    return rounded;
}

/* x[i] = its nearest bf16 value (as f32_to_bf16_bits rounds), in place: the bf16 compute
 * mode's keys and values, before attention reads them and the cache keeps them. */
void round_to_bf16(float *x, size_t n, int n_threads)
{
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16_bits(x[i]));
}
