"""The portable path against AVX2 on one model, one thread, CPU time (time.process_time, so
time the VM spends descheduled does not count): best of 3 prefills of 128 tokens and of 3
16-step decodes, the two paths alternating three times in one process.

    python benchmarks/portable_vs_avx2.py MODEL"""
import sys
import time

import numpy as np

import neocore

prompt = np.random.default_rng(1).integers(0, 50000, 128).tolist()
speeds: dict[str, list[tuple[float, float]]] = {}
for isa in ("avx2", "generic") * 3:
    model = neocore.load(sys.argv[1], threads=1, isa=isa)
    prefill = decode = float("inf")
    for _ in range(3):
        model.reset()
        start = time.process_time()
        token = int(np.argmax(model.append(prompt)))
        prefill = min(prefill, time.process_time() - start)
        start = time.process_time()
        for _ in range(16):
            token = int(np.argmax(model.append([token])))
        decode = min(decode, (time.process_time() - start) / 16)
    speeds.setdefault(isa, []).append((len(prompt) / prefill, 1 / decode))
for isa, runs in speeds.items():
    print(f"{isa:8} prefill/decode tok/s: " + "  ".join(f"{p:.0f}/{d:.1f}" for p, d in runs))
pairs = list(zip(speeds["generic"], speeds["avx2"]))
print("generic/avx2 prefill " + " ".join(f"{g[0] / a[0]:.2f}" for g, a in pairs)
      + ", decode " + " ".join(f"{g[1] / a[1]:.2f}" for g, a in pairs))
