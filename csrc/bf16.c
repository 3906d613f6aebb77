/* bf16.c: float32 -> bfloat16, round to nearest with ties to even, as torch's .to(bfloat16).
 * Used once per weight at load time; threads split the array. */
#include <string.h>
#include "neocore.h"

int neo_f32_to_bf16(uint16_t *dst, const float *src, size_t n, int n_threads)
{
    int rounded = 0;
    #pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : rounded) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &src[i], sizeof bits);
        rounded |= (bits & 0xFFFF) != 0;
        if ((bits & 0x7FFFFFFF) > 0x7F800000)
            dst[i] = (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN (quiet), never rounds to inf */
        else
            dst[i] = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
    return rounded;
}
