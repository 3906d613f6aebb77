/* amx_emulated.h: the AMX tile instructions that csrc/matmul_bf16.c uses, in plain C, for the
 * SIMDe build (-DNEOCORE_SIMDE) that checks the kernels' logic on CPUs without them. Each
 * thread has its own eight tiles, as on the hardware. TDPBF16PS follows Intel's pseudocode:
 * for each k pair, the even product and then the odd one are added to the fp32 accumulator. */
#ifndef AMX_EMULATED_H
#define AMX_EMULATED_H
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
#endif
