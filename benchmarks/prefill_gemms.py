"""The prefill GEMMs alone on the 125M and 1.3B shapes: GFLOP/s of the exact AVX-512 GEMM and the
bf16 ones (AMX, AVX512-BF16), T = 128 rows, bf16 weights, median of 15 calls."""
import sys, time
import numpy as np
from neocore import _core
from neocore.weights import f32_to_bf16

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
shapes = {"125M": [(768, 768), (3072, 768), (768, 3072)], "1.3B": [(2048, 2048), (8192, 2048), (2048, 8192)]}
rng = np.random.default_rng(0)
for model, pairs in shapes.items():
    for N, K in pairs:
        x = rng.standard_normal((128, K)).astype(np.float32)
        w = f32_to_bf16(rng.standard_normal((N, K)).astype(np.float32))[0]
        out = np.zeros((128, N), np.float32)
        row = [f"{model} N={N} K={K}:"]
        for isa, kernel in (("avx512", "gemm"), ("avx512bf16", "bf16"), ("amx", "bf16")):
            times = []
            for _ in range(15):
                t = time.perf_counter()
                _core.matmul(out, x, w, None, False, threads, isa, kernel)
                times.append(time.perf_counter() - t)
            row.append(f"{isa}/{kernel} {2 * 128 * N * K / np.median(times) / 1e9:7.1f}")
        print("  ".join(row), "GFLOP/s")
