"""The decode kernel alone on bf16 matrices in huge pages, read from memory: GB/s of weights
per shape, one row of x (T rows with T=N in the environment), median of 7 passes over ~400 MB
of copies, so that none is in cache.

    THREADS=1 python benchmarks/matvec_from_memory.py 2304x768 768x3072 2048x8192"""
import os
import statistics
import sys
import time

import numpy as np

from neocore import _core
from neocore.hugepages import HugePageArena

threads, rows = int(os.environ.get("THREADS", "1")), int(os.environ.get("T", "1"))
rng = np.random.default_rng(0)
for shape in sys.argv[1:]:
    N, K = (int(v) for v in shape.split("x"))
    copies = max(2, int(400e6 // (N * K * 2)))
    arena = HugePageArena(copies * (N * K * 2 + 4096))
    matrices = [arena.copy(rng.integers(0, 1 << 14, (N, K), dtype=np.uint16)) for _ in range(copies)]
    x = rng.standard_normal((rows, K)).astype(np.float32)
    out = np.zeros((rows, N), np.float32)
    passes = []
    for _ in range(7):
        start = time.perf_counter()
        for w in matrices:
            _core.matmul(out, x, w, None, False, threads, "avx512" if _core.isa_runs_here("avx512") else "avx2",
                         "matvec")
        passes.append(time.perf_counter() - start)
    print(f"{shape} T={rows} threads={threads}: {N * K * 2 * copies / statistics.median(passes) / 1e9:5.1f} GB/s",
          flush=True)
