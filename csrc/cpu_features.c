/* cpu_features.c: may the AVX2 + FMA path run here? CPUID says what the core has, XGETBV
 * whether the OS saves the YMM registers across context switches; both must agree. The
 * vendor picks tuning choices that help on one CPU family and hurt on another. */
#include <string.h>
#include "neocore.h"

int neo_built_with_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

int neo_cpu_has_avx2_fma(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned osxsave = 1u << 27, avx = 1u << 28, fma = 1u << 12;
    if ((c & (osxsave | avx | fma)) != (osxsave | avx | fma)) return 0;
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0x6) != 0x6) return 0; /* XMM and YMM state enabled */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b & (1u << 5)) != 0; /* AVX2 */
}

int neo_cpu_is_amd(void)
{
    static int cached = -1; /* CPUID is slow under virtualisation: ask once */
    if (cached < 0) {
        unsigned a, vendor[3];
        cached = __get_cpuid(0, &a, &vendor[0], &vendor[2], &vendor[1])
                 && memcmp(vendor, "AuthenticAMD", 12) == 0;
    }
    return cached;
}
#else
int neo_cpu_has_avx2_fma(void) { return 0; }
int neo_cpu_is_amd(void) { return 0; }
#endif
