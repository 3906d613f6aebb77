/* One core's clock and its peak fp32 FMA rate, the compute roofline the kernels are held to.
 *
 *     gcc -O2 -mavx2 -mfma benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * Both loops are written in asm because the compiler rewrites C versions: twelve FMA chains
 * that start equal and run the same operations were merged by GCC into one chain, whose
 * latency-bound rate then read as 1.5x the true peak (the 145-146 GFLOP/s once quoted for the
 * EPYC). Time is the thread's CPU time, so a busy host's preemption does not count (a VM's
 * steal time may; the FMAs a cycle, against the clock measured alike, are unaffected). */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double cpu_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* A chain of dependent integer adds runs at one add a cycle: adds per second is the clock. */
static double clock_ghz(void)
{
    const long n = 200000000;
    double best = 1e9;
    for (int r = 0; r < 5; r++) {
        long x = 0;
        const double start = cpu_seconds();
        for (long i = 0; i < n; i++)
            __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
        const double t = cpu_seconds() - start;
        if (t < best) best = t;
    }
    return 4.0 * n / best / 1e9;
}

/* Ten independent chains of 8-lane FMAs: more chains than latency x issue width on AVX2
 * CPUs, so the loop runs at the FMA units' throughput. */
static double fma_gflops(void)
{
    const long n = 50000000;
    double best = 1e9;
    for (int r = 0; r < 5; r++) {
        __m256 a0 = _mm256_set1_ps(1.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0;
        __m256 a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
        const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-7f);
        const double start = cpu_seconds();
        for (long i = 0; i < n; i++)
            __asm__ volatile("vfmadd231ps %[b], %[c], %[a0]\n\tvfmadd231ps %[b], %[c], %[a1]\n\t"
                             "vfmadd231ps %[b], %[c], %[a2]\n\tvfmadd231ps %[b], %[c], %[a3]\n\t"
                             "vfmadd231ps %[b], %[c], %[a4]\n\tvfmadd231ps %[b], %[c], %[a5]\n\t"
                             "vfmadd231ps %[b], %[c], %[a6]\n\tvfmadd231ps %[b], %[c], %[a7]\n\t"
                             "vfmadd231ps %[b], %[c], %[a8]\n\tvfmadd231ps %[b], %[c], %[a9]"
                             : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [a4] "+x"(a4),
                               [a5] "+x"(a5), [a6] "+x"(a6), [a7] "+x"(a7), [a8] "+x"(a8), [a9] "+x"(a9)
                             : [b] "x"(b), [c] "x"(c));
        const double t = cpu_seconds() - start;
        if (t < best) best = t;
    }
    return 10.0 * n * 16 / best / 1e9;  /* 8 lanes x (multiply + add) per FMA */
}

int main(void)
{
    const double ghz = clock_ghz(), gflops = fma_gflops();
    printf("clock %.2f GHz, fp32 FMA peak %.1f GFLOP/s (%.2f FMAs of 8 lanes a cycle)\n", ghz, gflops,
           gflops / 16 / ghz);
    return 0;
}
