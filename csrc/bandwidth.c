/* bandwidth.c: how fast this machine reads memory, the numerator of the decode roofline that
 * `neocore bench` reports: n_threads threads each read their share of a buffer once, as
 * decode streams the weights. */
#include "internal.h"

/* The XOR of the buffer's 64-bit words (bytes / 8 of them), so that nothing is skipped, read in
 * pages whose every line is prefetched as the decode kernels can prefetch theirs (how, see
 * prefetch_stream): the probe takes the best of those ways, because a plain read is not the most
 * a CPU can read (on the Intel Xeon, 2 threads, a plain read took 18.0 GB/s where decode,
 * prefetching into L2, read 27.5). The inner loop vectorises to the widest loads the build
 * targets. */
uint64_t neo_read_stream(const void *data, size_t bytes, int n_threads, NeoDecodePrefetch how)
{
    const uint64_t *words = data;
    const size_t n = bytes / sizeof(uint64_t), span = 4096 / sizeof(uint64_t);
#if defined(__x86_64__)
    const size_t ahead = prefetch_distance(how, NEO_BF16);
#endif
    uint64_t folded = 0;
    #pragma omp parallel for num_threads(n_threads) schedule(static) reduction(^ : folded)
    for (size_t start = 0; start < n; start += span) {
        const size_t end = start + span < n ? start + span : n;
#if defined(__x86_64__)
        for (size_t line = 0; line < (end - start) * sizeof(uint64_t); line += 64)
            prefetch_stream(how, (const char *)(words + start) + line, 64, ahead);
#else
        (void)how;  /* the decode kernels prefetch on x86 only */
#endif
        #pragma omp simd reduction(^ : folded)
        for (size_t i = start; i < end; i++) folded ^= words[i];
    }
    return folded;
}
