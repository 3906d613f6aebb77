/* bf16_emulated.h: what csrc/matmul_bf16.c uses and SIMDe 0.7 lacks, in plain C, for the
 * SIMDe build (-DNEOCORE_SIMDE) that checks the kernels' logic on CPUs without them: the AMX
 * tile instructions (each thread has its own eight tiles, as on the hardware; TDPBF16PS as
 * Intel's pseudocode: per k pair, the even product and then the odd one added to the fp32
 * sum), VCVTNE2PS2BF16 (nearest even, denormals read as zero), the masked gather and store. */
#ifndef BF16_EMULATED_H
#define BF16_EMULATED_H
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} EmulatedTileConfig;

static _Thread_local EmulatedTileConfig emulated_config;
static _Thread_local uint8_t emulated_tiles[8][16][64];

static inline float emulated_bf16(const uint8_t *p)
{
    uint32_t bits = (uint32_t)(p[0] | p[1] << 8) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void emulated_loadconfig(const void *config)
{
    memcpy(&emulated_config, config, sizeof emulated_config);
}

static inline void emulated_loadd(int tile, const void *base, size_t stride)
{
    for (int r = 0; r < emulated_config.rows[tile]; r++)
        memcpy(emulated_tiles[tile][r], (const uint8_t *)base + r * stride, emulated_config.colsb[tile]);
}

static inline void emulated_stored(int tile, void *base, size_t stride)
{
    for (int r = 0; r < emulated_config.rows[tile]; r++)
        memcpy((uint8_t *)base + r * stride, emulated_tiles[tile][r], emulated_config.colsb[tile]);
}

static inline void emulated_dpbf16ps(int c, int a, int b)
{
    for (int m = 0; m < emulated_config.rows[c]; m++)
        for (int n = 0; n < emulated_config.colsb[c] / 4; n++) {
            float acc;
            memcpy(&acc, emulated_tiles[c][m] + 4 * n, sizeof acc);
            for (int k = 0; k < emulated_config.colsb[a] / 4; k++)
                for (int p = 0; p < 2; p++)
                    acc += emulated_bf16(emulated_tiles[a][m] + 4 * k + 2 * p)
                           * emulated_bf16(emulated_tiles[b][k] + 4 * n + 2 * p);
            memcpy(emulated_tiles[c][m] + 4 * n, &acc, sizeof acc);
        }
}

#define _tile_loadconfig(config) emulated_loadconfig(config)
#define _tile_loadd(tile, base, stride) emulated_loadd(tile, base, stride)
#define _tile_stored(tile, base, stride) emulated_stored(tile, base, stride)
#define _tile_dpbf16ps(c, a, b) emulated_dpbf16ps(c, a, b)
#define _tile_zero(tile) memset(emulated_tiles[tile], 0, sizeof emulated_tiles[tile])
#define _tile_release() memset(&emulated_config, 0, sizeof emulated_config)

/* 32 bf16: lo's 16 values, then hi's */
static inline simde__m512bh emulated_cvtne2ps_pbh(simde__m512 hi, simde__m512 lo)
{
    float f[32];
    uint16_t h[32];
    simde_mm512_storeu_ps(f, lo);
    simde_mm512_storeu_ps(f + 16, hi);
    for (int i = 0; i < 32; i++) {
        uint32_t bits;
        memcpy(&bits, &f[i], sizeof bits);
        if ((bits & 0x7F800000) == 0) bits &= 0x80000000;  /* zero or denormal: signed zero */
        h[i] = (bits & 0x7FFFFFFF) > 0x7F800000 ? (uint16_t)((bits >> 16) | 0x40)
                                                : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
    simde__m512bh r;
    memcpy(&r, h, sizeof r);
    return r;
}

static inline simde__m512i emulated_mask_i32gather_epi32(simde__m512i src, simde__mmask16 k, simde__m512i index,
                                                         const void *base, int scale)
{
    int32_t s[16], idx[16];
    simde_mm512_storeu_si512(s, src);
    simde_mm512_storeu_si512(idx, index);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) memcpy(&s[i], (const char *)base + (ptrdiff_t)idx[i] * scale, sizeof s[i]);
    return simde_mm512_loadu_si512(s);
}

static inline void emulated_mask_storeu_ps(void *p, simde__mmask16 k, simde__m512 a)
{
    float v[16];
    simde_mm512_storeu_ps(v, a);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) ((float *)p)[i] = v[i];
}

#define _mm512_cvtne2ps_pbh emulated_cvtne2ps_pbh
#define _mm512_mask_i32gather_epi32 emulated_mask_i32gather_epi32
#define _mm512_mask_storeu_ps emulated_mask_storeu_ps
#endif
