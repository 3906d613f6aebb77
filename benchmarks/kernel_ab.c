/* kernel_ab.c: two builds of the matrix kernels, A and B, timed on a model's matrices from
 * memory, alternating A and B every pass (the order swapped every other pass) so that a
 * shared host's slow spells fall on both. Weights of random values (bf16, or int8 blocks);
 * per pass every layer's qkv, out, fc and proj matrix, and for decode the tied head as well.
 *
 *   gcc -O3 -fopenmp -fno-math-errno -fPIC -shared -Icsrc csrc/matmul.c csrc/matmul_avx512.c \
 *       csrc/cpu_features.c -o /tmp/libB.so -lm          (and libA.so from the other checkout)
 *   gcc -O2 -Icsrc benchmarks/kernel_ab.c -o /tmp/kernel_ab -ldl
 *   /tmp/kernel_ab /tmp/libA.so /tmp/libB.so decode|prefill ROWS THREADS PASSES [HIDDEN LAYERS]
 *
 * decode runs matvec_forward (the decode kernel), prefill matmul_forward (the packed GEMM);
 * HIDDEN and LAYERS default to 125M's 768 and 12; NEOCORE_ISA=avx512 times the AVX-512 path
 * (the AVX2 one otherwise), NEOCORE_AB_DTYPE=int8 int8 weights (bf16 otherwise). Prints the
 * median, quartiles and minimum of each build's pass times. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "neocore.h"

typedef void Kernel(float *out, const float *x, const NeoMatrix *w, const float *bias, int T, int K,
                    int N, int accumulate, int n_threads, NeoIsa isa);

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static NeoMatrix random_weights(NeoDType dtype, size_t rows, size_t cols)
{
    if (dtype == NEO_I8) {
        const size_t blocks = (cols + NEO_I8_BLOCK - 1) / NEO_I8_BLOCK;
        int8_t *w = malloc(rows * cols);
        float *scales = malloc(sizeof(float) * rows * blocks);
        for (size_t i = 0; i < rows * cols; i++) w[i] = (int8_t)(rand() % 255 - 127);
        for (size_t i = 0; i < rows * blocks; i++) scales[i] = 1e-4f * (1 + rand() % 100);
        return (NeoMatrix){NEO_I8, w, scales};
    }
    uint16_t *w = malloc(sizeof(uint16_t) * rows * cols);
    for (size_t i = 0; i < rows * cols; i++) w[i] = 0x3c00 + (rand() & 0xff);  /* about 0.008 .. 0.016 */
    return (NeoMatrix){NEO_BF16, w, NULL};
}

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr, "usage: %s libA.so libB.so decode|prefill ROWS THREADS PASSES [HIDDEN LAYERS]\n", argv[0]);
        return 2;
    }
    const int decode = strcmp(argv[3], "decode") == 0, T = atoi(argv[4]), threads = atoi(argv[5]);
    const int passes = atoi(argv[6]), H = argc > 7 ? atoi(argv[7]) : 768, layers = argc > 8 ? atoi(argv[8]) : 12;
    const char *isa_name = getenv("NEOCORE_ISA") ? getenv("NEOCORE_ISA") : "avx2";
    if (strcmp(isa_name, "avx2") != 0 && strcmp(isa_name, "avx512") != 0) {
        fprintf(stderr, "NEOCORE_ISA: avx2 or avx512, not %s\n", isa_name);
        return 2;
    }
    const NeoIsa isa = strcmp(isa_name, "avx512") == 0 ? NEO_ISA_AVX512 : NEO_ISA_AVX2;
    const char *dtype_name = getenv("NEOCORE_AB_DTYPE") ? getenv("NEOCORE_AB_DTYPE") : "bf16";
    if (strcmp(dtype_name, "bf16") != 0 && strcmp(dtype_name, "int8") != 0) {
        fprintf(stderr, "NEOCORE_AB_DTYPE: bf16 or int8, not %s\n", dtype_name);
        return 2;
    }
    const NeoDType dtype = strcmp(dtype_name, "int8") == 0 ? NEO_I8 : NEO_BF16;
    Kernel *kernel[2];
    for (int v = 0; v < 2; v++) {
        void *lib = dlopen(argv[1 + v], RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            fprintf(stderr, "%s\n", dlerror());
            return 1;
        }
        kernel[v] = (Kernel *)dlsym(lib, decode ? "matvec_forward" : "matmul_forward");
        int (*runs)(void) = (int (*)(void))dlsym(lib, isa == NEO_ISA_AVX512 ? "neo_cpu_has_avx512" : "neo_cpu_has_avx2_fma");
        if (!kernel[v] || !runs || !runs()) {
            fprintf(stderr, "%s: no kernel, or this CPU lacks %s\n", argv[1 + v], isa_name);
            return 1;
        }
    }
    const int shape[4][2] = {{3 * H, H}, {H, H}, {4 * H, H}, {H, 4 * H}};  /* [N, K]: qkv, out, fc, proj */
    NeoMatrix *w = malloc(sizeof(NeoMatrix) * layers * 4);
    for (int i = 0; i < layers * 4; i++) w[i] = random_weights(dtype, shape[i % 4][0], shape[i % 4][1]);
    const int vocab = 50257;
    const NeoMatrix head = decode ? random_weights(dtype, vocab, H) : (NeoMatrix){dtype, NULL, NULL};
    float *x = malloc(sizeof(float) * T * 4 * H), *out = malloc(sizeof(float) * T * (vocab > 4 * H ? vocab : 4 * H));
    for (int i = 0; i < T * 4 * H; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    double *seconds = malloc(sizeof(double) * 2 * passes);
    for (int p = 0; p < passes; p++)
        for (int i = 0; i < 2; i++) {
            const int v = p % 2 ? 1 - i : i;
            const double start = now();
            for (int m = 0; m < layers * 4; m++)
                kernel[v](out, x, &w[m], NULL, T, shape[m % 4][1], shape[m % 4][0], 0, threads, isa);
            if (decode) kernel[v](out, x, &head, NULL, T, H, vocab, 0, threads, isa);
            seconds[v * passes + p] = now() - start;
        }
    for (int v = 0; v < 2; v++) {
        double *s = seconds + v * passes;
        qsort(s, passes, sizeof(double), by_value);
        printf("%s: median %.2f ms (quartiles %.2f-%.2f, min %.2f)\n", v ? "B" : "A", s[passes / 2] * 1e3,
               s[passes / 4] * 1e3, s[3 * passes / 4] * 1e3, s[0] * 1e3);
    }
    return 0;
}
