"""Decode kernel alone, AVX2 against AVX-512 paths: microseconds per call (median of 5) and
rows x GB/s of weights, bf16, T = 1 and 8 rows, 2 and 16 threads."""
import statistics, time
import numpy as np
from neocore import _core
from neocore.weights import f32_to_bf16

rng = np.random.default_rng(0)
for N, K in [(768, 768), (3072, 768), (50257, 768)]:
    w = f32_to_bf16((rng.standard_normal((N, K)) * 0.02).astype(np.float32))[0]
    for threads in (2, 16):
        for T in (1, 8):
            x = rng.standard_normal((T, K)).astype(np.float32)
            out = np.zeros((T, N), np.float32)
            line = []
            for isa in ("avx2", "avx512"):
                _core.matmul(out, x, w, None, False, threads, isa, "matvec")
                reps = []
                for _ in range(5):
                    n, t0 = 0, time.perf_counter()
                    while n < 3 or time.perf_counter() - t0 < 0.02:
                        _core.matmul(out, x, w, None, False, threads, isa, "matvec")
                        n += 1
                    reps.append((time.perf_counter() - t0) / n)
                m = statistics.median(reps)
                line.append(f"{isa} {m * 1e6:8.1f} us {T * w.nbytes / m / 1e9:6.1f} rGB/s")
            print(f"{N}x{K} thr={threads:2d} T={T}: " + " | ".join(line), flush=True)
