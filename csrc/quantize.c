/* quantize.c: fp32 weights to int8 blocks (NEO_I8), as the kernels read them.
 *
 * Each block of NEO_I8_BLOCK consecutive elements of a row gets the scale max|x| / 127 and the
 * values round(x / scale) in [-127, 127] (symmetric, round to nearest, ties to even): every
 * element comes back as value * scale within half a step. Rows are independent, so threads
 * split them and the result does not depend on the thread count. */
#include <float.h>
#include <math.h>
#include "internal.h"

#define ROUNDER 12582912.0f  /* 1.5 * 2^23: adding it leaves no fraction bits */

int neo_quantize_i8(int8_t *values, float *scales, const float *src, size_t rows, size_t cols,
                    int n_threads)
{
    const size_t blocks = (cols + NEO_I8_BLOCK - 1) / NEO_I8_BLOCK;
    int finite = 1;
    /* The loops are written so that the compiler vectorises them without -ffast-math (which
     * neocore never uses): compares and selects, no libm calls. */
    #pragma omp parallel for num_threads(n_threads) schedule(static) reduction(&& : finite)
    for (size_t r = 0; r < rows; r++) {
        for (size_t b = 0; b < blocks; b++) {
            const size_t begin = r * cols + b * NEO_I8_BLOCK;
            const size_t n = cols - b * NEO_I8_BLOCK < NEO_I8_BLOCK ? cols - b * NEO_I8_BLOCK : NEO_I8_BLOCK;
            const float *x = src + begin;
            float amax = 0.0f;
            int bad = 0;
            for (size_t i = 0; i < n; i++) {
                const float a = fabsf(x[i]);
                bad |= !(a <= FLT_MAX);  /* NaN or infinity: it would make the scale meaningless */
                amax = a > amax ? a : amax;
            }
            finite = finite && !bad;
            const float scale = amax / 127.0f;
            scales[r * blocks + b] = scale;
            for (size_t i = 0; i < n; i++) {
                float v = scale > 0.0f ? x[i] / scale : 0.0f;
                /* round to nearest even: exact for |v| < 2^22 in the default rounding mode */
                v = (v + ROUNDER) - ROUNDER;
                /* |v| <= 127 unless the scale is subnormal and lost precision; NaN (a block the
                 * caller refuses) 0, since converting it to an int is undefined */
                v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v == v ? v : 0.0f;
                values[begin + i] = (int8_t)(int)v;
            }
        }
    }
    return finite;
}
