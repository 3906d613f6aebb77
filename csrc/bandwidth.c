/* bandwidth.c: how fast this machine reads memory, the numerator of the decode roofline that
 * `neocore bench` reports: n_threads threads each read their share of a buffer once, as
 * decode streams the weights. */
#include "internal.h"

/* The XOR of the buffer's 64-bit words (bytes / 8 of them), so that nothing is skipped; the
 * loop vectorises to the widest loads the build targets. */
uint64_t neo_read_stream(const void *data, size_t bytes, int n_threads)
{
    const uint64_t *words = data;
    const size_t n = bytes / sizeof(uint64_t);
    uint64_t folded = 0;
    #pragma omp parallel for simd num_threads(n_threads) schedule(static) reduction(^ : folded)
    for (size_t i = 0; i < n; i++) folded ^= words[i];
    return folded;
}
