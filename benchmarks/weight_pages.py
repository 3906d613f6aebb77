"""Decode with the weights in huge pages against the mapped file's pages as they are, in one
process, alternating, so that a noisy host's swings hit both alike:

    python benchmarks/weight_pages.py MODEL [THREADS] [ROUNDS] [LOAD_JSON]

Loads MODEL with huge_pages=True (B: in huge pages, copied if the file is not in them), then
with huge_pages=False (A: the mapped file in place), prints each load's time and where its
weights lie, checks that both give the same logits, then times ROUNDS rounds of 20 decode
steps (after a 128-token prompt) for each. What B does depends on the page cache: a file just
written (by convert, cp, a download) is often cached in small pages, and B copies it; one read
through B's mapping from disk may be cached in 2 MiB pages, and B maps it in place. To put a
weight file in a known state first: `--evict FILE` drops it from the page cache; `--small-pages
FILE` drops it and caches it again in 4 KiB pages (reads of one page, readahead off), as an
aged page cache or an older kernel holds it."""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if sys.argv[1] in ("--evict", "--small-pages"):
    fd = os.open(sys.argv[2], os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drops the file's clean pages
    if sys.argv[1] == "--small-pages":
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset in range(0, os.fstat(fd).st_size, 4096):
            os.pread(fd, 4096, offset)
    os.close(fd)
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import neocore  # noqa: E402

threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 6
options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
models = {}
for name, huge in (("B huge pages", True), ("A mapped", False)):  # B finds the page cache as it was
    start = time.perf_counter()
    models[name] = neocore.load(sys.argv[1], threads=threads, huge_pages=huge, **options)
    print(f"{name}: load {time.perf_counter() - start:.3f} s, {models[name].weight_pages}", flush=True)
prompt = list(range(128))
logits = [m.logits(prompt) for m in models.values()]
assert np.array_equal(*logits), "the two layouts gave different logits"
times: dict[str, list[float]] = {name: [] for name in models}
for _ in range(rounds):
    for name, model in models.items():
        model.reset()
        model.append(prompt)
        start = time.perf_counter()
        for _ in range(20):
            model.append([5])
        times[name].append((time.perf_counter() - start) / 20)
for name, t in times.items():
    print(f"{name}: decode {1 / statistics.median(t):7.2f} tok/s (median of {rounds} rounds)")
ratios = [a / b for a, b in zip(times["A mapped"], times["B huge pages"])]
print(f"B/A speed: median {statistics.median(ratios):.3f}, rounds {' '.join(f'{r:.3f}' for r in ratios)}")
