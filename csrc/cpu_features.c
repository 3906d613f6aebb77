/* cpu_features.c: which kernel paths may run here? CPUID says what the core has, XGETBV
 * whether the OS saves the wider registers across context switches; both must agree. The
 * kind of CPU picks tuning choices that help on one CPU family and hurt on another. */
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

#include <sys/syscall.h>
#include <unistd.h>

/* XCR0 bits: 1 SSE (XMM), 2 AVX (upper YMM), 5 opmask k0-k7, 6 upper ZMM0-15, 7 ZMM16-31,
 * 17 AMX tile configuration, 18 AMX tile data. */
#define XCR0_YMM 0x06u
#define XCR0_ZMM 0xE6u
#define XCR0_TILES 0x60000u
/* Linux hands out the 8 KiB tile data state only to processes that ask (arch_prctl.h). */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 when CPUID.1:ECX has OSXSAVE and AVX and XCR0 holds every bit of state_bits. */
static int os_saves(unsigned state_bits)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned osxsave = 1u << 27, avx = 1u << 28;
    if ((c & (osxsave | avx)) != (osxsave | avx)) return 0;
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    return (xcr0_lo & state_bits) == state_bits;
}

/* CPUID leaf 7 subleaf 0, EBX: the AVX2 and AVX-512 feature bits. */
static unsigned leaf7_ebx(void)
{
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) ? b : 0;
}

/* Each answer is asked for once per process and then remembered: under virtualisation every
 * CPUID traps to the hypervisor (about 20 us each on the Zen 4 VM, 40 us for the checks before
 * one kernel call), and the ISA checks run on every call into a kernel from Python. */
static int avx2_fma(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 12))) return 0; /* FMA */
    return os_saves(XCR0_YMM) && (leaf7_ebx() & (1u << 5));             /* AVX2 */
}

int neo_cpu_has_avx2_fma(void)
{
    static int cached = -1;
    if (cached < 0) cached = avx2_fma();
    return cached;
}

int neo_cpu_has_avx512(void)
{
    static int cached = -1;
    const unsigned f = 1u << 16, bw = 1u << 30, vl = 1u << 31;
    if (cached < 0)
        cached = neo_cpu_has_avx2_fma() && os_saves(XCR0_ZMM) && (leaf7_ebx() & (f | bw | vl)) == (f | bw | vl);
    return cached;
}

int neo_cpu_has_avx512_bf16(void)
{
    static int cached = -1;
    unsigned a, b, c, d;
    if (cached < 0)
        cached = neo_cpu_has_avx512() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
    return cached;
}

int neo_cpu_has_amx_bf16(void)
{
    static int cached = -1; /* and ask Linux once: the permission is process-wide */
    if (cached < 0) {
        unsigned a, b, c, d;
        const unsigned amx_bf16 = 1u << 22, amx_tile = 1u << 24;
        /* the AMX kernels pack x with VCVTNE2PS2BF16, an AVX512-BF16 instruction */
        cached = neo_cpu_has_avx512_bf16() && __get_cpuid_count(7, 0, &a, &b, &c, &d)
                 && (d & (amx_bf16 | amx_tile)) == (amx_bf16 | amx_tile) && os_saves(XCR0_TILES)
                 && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return cached;
}

NeoCpuKind neo_cpu_kind(void)
{
    static int cached = -1;
    if (cached < 0) {
        unsigned a, vendor[3];
        cached = NEO_CPU_OTHER;
        if (__get_cpuid(0, &a, &vendor[0], &vendor[2], &vendor[1])) {
            if (memcmp(vendor, "AuthenticAMD", 12) == 0)
                cached = neo_cpu_has_avx512() ? NEO_CPU_AMD_ZEN4 : NEO_CPU_AMD_ZEN3;
            else if (memcmp(vendor, "GenuineIntel", 12) == 0)
                cached = NEO_CPU_INTEL;
        }
    }
    return (NeoCpuKind)cached;
}
#else
int neo_cpu_has_avx2_fma(void) { return 0; }
int neo_cpu_has_avx512(void) { return 0; }
int neo_cpu_has_avx512_bf16(void) { return 0; }
int neo_cpu_has_amx_bf16(void) { return 0; }
NeoCpuKind neo_cpu_kind(void) { return NEO_CPU_OTHER; }
#endif
