/* forward_check.c: the C core alone, on a tiny random GPT-Neo, for builds Python cannot load:
 * a cross-compiled aarch64 core run under qemu-user, or the AVX-512 kernels built on SIMDe.
 * Usage: forward_check ISA THREADS, ISA one of scalar, generic, avx2, avx512.
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

/* a matrix stored as bf16 (the engine's default), its values drawn as above */
static NeoMatrix bf16_matrix(size_t rows, size_t cols, float scale)
{
    uint16_t *p = malloc(sizeof(uint16_t) * rows * cols);
    for (size_t i = 0; i < rows * cols; i++) {
        float v = random_value(scale);
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        p[i] = (uint16_t)(bits >> 16);
    }
    return (NeoMatrix){NEO_BF16, p, NULL};
}

/* 1 when both kernels give each of T rows exactly what that row gives alone */
static int rows_computed_alone(NeoIsa isa, int n_threads)
{
    enum { T = 13, K = 200, N = 37 };
    static float x[T * K], bias[N], together[T * N], alone[N];
    const NeoMatrix w = bf16_matrix(N, K, 0.5f);
    for (int i = 0; i < T * K; i++) x[i] = random_value(1.0f);
    for (int i = 0; i < N; i++) bias[i] = random_value(0.5f);
    for (int decode = 0; decode < 2; decode++) {
        void (*kernel)(float *, const float *, const NeoMatrix *, const float *, int, int, int, int,
                       int, NeoIsa) = decode ? matvec_forward : matmul_forward;
        kernel(together, x, &w, bias, T, K, N, 0, n_threads, isa);
        for (int t = 0; t < T; t++) {
            kernel(alone, x + t * K, &w, bias, 1, K, N, 0, n_threads, isa);
            if (memcmp(alone, together + t * N, sizeof alone) != 0) return 0;
        }
    }
    return 1;
}

int main(int argc, char **argv)
{
    const char *names[] = {"generic", "avx2", "avx512", "scalar"};  /* NeoIsa order */
    int isa = 0;
    while (argc == 3 && isa < 4 && strcmp(argv[1], names[isa])) isa++;
    if (argc != 3 || isa == 4) {
        fprintf(stderr, "usage: forward_check generic|avx2|avx512|scalar THREADS\n");
        return 2;
    }
    if (!rows_computed_alone(isa, atoi(argv[2]))) {
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

    NeoState *s = neo_state_new(&cfg, 1, POSITIONS, PROMPT, atoi(argv[2]), isa);
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
    return 0;
}
