/* forward_check.c: the C core alone, on a tiny random GPT-Neo, for builds Python cannot load:
 * a cross-compiled aarch64 core run under qemu-user, or the AVX-512 kernels built on SIMDe.
 * Usage: forward_check ISA THREADS [bf16|int8], ISA one of scalar, generic, avx2, avx512; with
 * bf16 (the bf16 compute mode's GEMM) scalar (its reference), avx512bf16 or amx; with int8,
 * every matrix quantised (neo_quantize_i8) and any of the first four.
 * First it checks that the matmul kernels compute each row as if alone (bit for bit; exit 3
 * if not). Then it prefills a 13-token prompt (the GEMM), decodes 4 tokens (the matvec), and
 * prints the logits of the last prompt row and of each decoded row, one value a line; the
 * tests compare them across builds and paths. Sizes are no multiples of the SIMD widths (tails
 * everywhere); weights come from a fixed xorshift stream, so every build sees the same model. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "neocore.h"

enum { HIDDEN = 144, HEADS = 2, LAYERS = 2, FFN = 200, VOCAB = 301, POSITIONS = 64, WINDOW = 8 };
enum { PROMPT = 13, DECODED = 4 };

static uint32_t rng_state = 12345;

/* uniform in [-scale, scale), exactly representable in bf16 (low 16 bits zero) */
static float random_value(float scale)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    float v = ((float)(rng_state >> 8) / (float)(1u << 24) * 2.0f - 1.0f) * scale;
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits &= 0xFFFF0000u;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static float *floats(size_t n, float scale, float offset)
{
    float *p = malloc(sizeof(float) * n);
    for (size_t i = 0; i < n; i++) p[i] = offset + random_value(scale);
    return p;
}

static int int8_weights;  /* the int8 mode: matrices quantised */

/* a matrix stored as bf16 (the engine's default), or int8 in the int8 mode, its values drawn
 * as above */
static NeoMatrix bf16_matrix(size_t rows, size_t cols, float scale)
{
    if (int8_weights) {
        float *values = floats(rows * cols, scale, 0.0f);
        int8_t *q = malloc(rows * cols);
        float *scales = malloc(sizeof(float) * rows * ((cols + NEO_I8_BLOCK - 1) / NEO_I8_BLOCK));
        neo_quantize_i8(q, scales, values, rows, cols, 1);
        free(values);
        return (NeoMatrix){NEO_I8, q, scales};
    }
    uint16_t *p = malloc(sizeof(uint16_t) * rows * cols);
    for (size_t i = 0; i < rows * cols; i++) {
        float v = random_value(scale);
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        p[i] = (uint16_t)(bits >> 16);
    }
    return (NeoMatrix){NEO_BF16, p, NULL};
}

/* The kernels of a path: 0 the exact decode kernel, 1 the prefill GEMM (bf16 if gemm is set),
 * 2 the bf16 decode kernel (gemm set only). */
static void run_kernel(int kernel, NeoIsa isa, NeoBf16Gemm gemm, float *out, const float *x,
                       const NeoMatrix *w, const float *bias, int T, int K, int N, int n_threads)
{
    if (kernel == 0)
        matvec_forward(out, x, w, bias, T, K, N, 0, n_threads, isa);
    else if (kernel == 2)
        matvec_bf16_projections(&(NeoProjection){out, w, bias, N}, 1, x, T, K, 0, n_threads, gemm);
    else if (gemm == NEO_BF16_OFF)
        matmul_forward(out, x, w, bias, T, K, N, 0, n_threads, isa);
    else
        matmul_bf16_forward(out, x, w, bias, T, K, N, 0, n_threads, gemm);
}

/* 1 when each kernel gives each of T rows exactly what that row gives alone. K = 192 lets
 * the bf16 GEMMs read bf16 weights in place, K = 200 makes them copy (and leaves SIMD tails),
 * K = 201 gives rows and panels of no whole number of 64-byte lines. */
static int rows_computed_alone(NeoIsa isa, NeoBf16Gemm gemm, int n_threads, int K)
{
    enum { T = 37, MAX_K = 201, N = 45 };
    static float x[T * MAX_K], bias[N], together[T * N], alone[N];
    const NeoMatrix w = bf16_matrix(N, K, 0.5f);
    for (int i = 0; i < T * K; i++) x[i] = random_value(1.0f);
    for (int i = 0; i < N; i++) bias[i] = random_value(0.5f);
    for (int kernel = 0; kernel < (gemm == NEO_BF16_OFF ? 2 : 3); kernel++) {
        run_kernel(kernel, isa, gemm, together, x, &w, bias, T, K, N, n_threads);
        for (int t = 0; t < T; t++) {
            run_kernel(kernel, isa, gemm, alone, x + t * K, &w, bias, 1, K, N, n_threads);
            if (memcmp(alone, together + t * N, sizeof alone) != 0) return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv)
{
    /* name, vector path, bf16 GEMM */
    static const struct { const char *name; NeoIsa isa; NeoBf16Gemm gemm; } paths[] = {
        {"generic", NEO_ISA_GENERIC, NEO_BF16_OFF}, {"avx2", NEO_ISA_AVX2, NEO_BF16_OFF},
        {"avx512", NEO_ISA_AVX512, NEO_BF16_OFF}, {"scalar", NEO_ISA_SCALAR, NEO_BF16_REFERENCE},
        {"avx512bf16", NEO_ISA_AVX512, NEO_BF16_AVX512}, {"amx", NEO_ISA_AVX512, NEO_BF16_AMX}};
    const int n_paths = sizeof paths / sizeof paths[0];
    const int bf16 = argc == 4 && strcmp(argv[3], "bf16") == 0;
    int8_weights = argc == 4 && strcmp(argv[3], "int8") == 0;
    int p = 0;
    while ((argc == 3 || bf16 || int8_weights) && p < n_paths && strcmp(argv[1], paths[p].name)) p++;
    if (!(argc == 3 || bf16 || int8_weights) || p == n_paths || (bf16 && paths[p].gemm == NEO_BF16_OFF)
        || (int8_weights && p > 3)) {
        fprintf(stderr, "usage: forward_check generic|avx2|avx512|scalar THREADS [int8], or "
                        "scalar|avx512bf16|amx THREADS bf16\n");
        return 2;
    }
    const NeoIsa isa = paths[p].isa;
    const NeoBf16Gemm gemm = bf16 ? paths[p].gemm : NEO_BF16_OFF;
    if (!rows_computed_alone(isa, gemm, atoi(argv[2]), 200) || !rows_computed_alone(isa, gemm, atoi(argv[2]), 192)) {
        fprintf(stderr, "%s: a row's result depends on the other rows\n", argv[1]);
        return 3;
    }
    const uint8_t local[LAYERS] = {0, 1};
    const NeoConfig cfg = {HIDDEN, LAYERS, HEADS, HIDDEN / HEADS, FFN, VOCAB, POSITIONS, WINDOW,
                           1e-5f, local};
    NeoLayerWeights layers[LAYERS];
    for (int l = 0; l < LAYERS; l++)
        layers[l] = (NeoLayerWeights){
            floats(HIDDEN, 0.2f, 1.0f), floats(HIDDEN, 0.2f, 0.0f),
            bf16_matrix(HIDDEN, HIDDEN, 0.3f), bf16_matrix(HIDDEN, HIDDEN, 0.3f),
            bf16_matrix(HIDDEN, HIDDEN, 0.3f), bf16_matrix(HIDDEN, HIDDEN, 0.2f),
            floats(HIDDEN, 0.1f, 0.0f), floats(HIDDEN, 0.2f, 1.0f), floats(HIDDEN, 0.2f, 0.0f),
            bf16_matrix(FFN, HIDDEN, 0.2f), floats(FFN, 0.1f, 0.0f),
            bf16_matrix(HIDDEN, FFN, 0.1f), floats(HIDDEN, 0.1f, 0.0f)};
    const NeoWeights w = {bf16_matrix(VOCAB, HIDDEN, 0.5f), bf16_matrix(POSITIONS, HIDDEN, 0.1f),
                          layers, floats(HIDDEN, 0.2f, 1.0f), floats(HIDDEN, 0.2f, 0.0f)};

    NeoState *s = neo_state_new(&cfg, 1, POSITIONS, PROMPT, atoi(argv[2]), isa, gemm);
    if (!s) return 1;
    int32_t tokens[PROMPT], seqs[PROMPT] = {0};
    uint8_t want[PROMPT] = {0};
    for (int t = 0; t < PROMPT; t++) tokens[t] = (t * 37 + 11) % VOCAB;
    want[PROMPT - 1] = 1;
    float logits[VOCAB];
    for (int step = 0; step <= DECODED; step++) {
        const int n_rows = step == 0 ? PROMPT : 1;
        const NeoBatch batch = {n_rows, tokens, seqs, step == 0 ? want : want + PROMPT - 1};
        if (neo_step(&cfg, &w, s, &batch, logits) != NEO_OK) return 1;
        for (int v = 0; v < VOCAB; v++) printf("%.9g\n", logits[v]);
        tokens[0] = (step * 53 + 7) % VOCAB;  /* fixed, not greedy: builds may differ in the last bits */
    }
    neo_state_free(s);
    /* last, so that the model above is drawn from the stream as before it was added */
    if (!rows_computed_alone(isa, gemm, atoi(argv[2]), 201)) {
        fprintf(stderr, "%s: a row's result depends on the other rows (K = 201)\n", argv[1]);
        return 3;
    }
    return 0;
}
