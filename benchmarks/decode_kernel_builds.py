"""A decode kernel alone, across builds: each argument is a built `_core` extension (copy
neocore/_core*.so aside after each build), timed in turn on the same matrices, 4 rounds, best
round each; GFLOP/s per build, side by side.

    KERNEL=bf16-matvec ISA=avx512bf16 THREADS=1 DT=bf16 TS=1,8,32 \
        python benchmarks/decode_kernel_builds.py /tmp/v/base.so /tmp/v/new.so

KERNEL: "matvec" (exact decode, ISA avx2/avx512/generic) or "bf16-matvec" (the bf16 mode's,
ISA avx512bf16); DT: bf16 or int8 weights. "hot" is one 2304 x 768 matrix that stays in cache,
"cold" 24 (bf16) or 48 (int8) 3072 x 768 matrices, more than the L3, read from memory."""
import importlib.util
import os
import sys
import time
import types

import numpy as np

libs = []
for i, path in enumerate(sys.argv[1:]):
    sys.modules[f"build{i}"] = types.ModuleType(f"build{i}")  # a parent for each build's _core
    spec = importlib.util.spec_from_file_location(f"build{i}._core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    libs.append(module)
kernel, isa = os.environ.get("KERNEL", "bf16-matvec"), os.environ.get("ISA", "avx512bf16")
threads, int8 = int(os.environ.get("THREADS", "1")), os.environ.get("DT") == "int8"
rng = np.random.default_rng(0)


class Int8Matrix:
    """What the core takes as an int8 matrix: values and one scale per 32-column block."""
    def __init__(self, n: int, k: int):
        self.values = rng.integers(-127, 128, (n, k), dtype=np.int8)
        self.scales = (rng.random((n, k // 32)) * 0.01).astype(np.float32)
        self.shape, self.size = self.values.shape, self.values.size


def matrix(n: int, k: int):
    if int8:
        return Int8Matrix(n, k)
    return (rng.standard_normal((n, k)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


sets = {"hot": [matrix(2304, 768)], "cold": [matrix(3072, 768) for _ in range(48 if int8 else 24)]}
for name, mats in sets.items():
    for T in [int(t) for t in os.environ.get("TS", "1,2,4,8,16,32").split(",")]:
        x = rng.standard_normal((T, 768)).astype(np.float32)
        outs = [np.empty((T, w.shape[0]), np.float32) for w in mats]
        reps = max(1, 20 // len(mats))
        best = [float("inf")] * len(libs)
        for _ in range(4):
            for j, lib in enumerate(libs):
                start = time.perf_counter()
                for _ in range(reps):
                    for out, w in zip(outs, mats):
                        lib.matmul(out, x, w, None, False, threads, isa, kernel)
                best[j] = min(best[j], (time.perf_counter() - start) / reps)
        flops = 2 * T * sum(w.size for w in mats)
        print(f"{name:4s} T={T:2d}: " + "  ".join(f"{flops / b / 1e9:6.1f}" for b in best) + " GFLOP/s", flush=True)
