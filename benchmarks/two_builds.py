"""Two builds of neocore in one process, stepped alternately, so that a noisy host's swings hit
both alike: this checkout's `neocore` (A) and another build (B) copied as a package named
`neocore_b`, e.g. before a change:

    rm -rf /tmp/nb && mkdir /tmp/nb && cp -r neocore /tmp/nb/neocore_b   # built in place
    python benchmarks/two_builds.py /tmp/nb MODEL THREADS [PROMPT_LENGTHS] [ROUNDS]

For each prompt length: the median time of a prefill wanting the last row's logits, and of a
decode step after it; A and B alternate within every round."""
import sys
import time

import numpy as np

sys.path.insert(1, sys.argv[1])
import neocore  # noqa: E402
import neocore_b  # noqa: E402

model_path, threads = sys.argv[2], int(sys.argv[3])
lengths = [int(n) for n in (sys.argv[4] if len(sys.argv) > 4 else "8,32,128").split(",")]
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 15
builds = {"A": neocore.load(model_path, threads=threads), "B": neocore_b.load(model_path, threads=threads)}
vocab = builds["A"].config.vocab_size
rng = np.random.default_rng(0)
logits = np.empty((1, vocab), np.float32)
one, seq0, want1 = np.array([5], np.int32), np.zeros(1, np.int32), np.ones(1, np.uint8)


def timed(model, ids: np.ndarray) -> tuple[float, float]:
    want = np.zeros(len(ids), np.uint8)
    want[-1] = 1
    model.clear_sequence(0)
    start = time.perf_counter()
    model.step(ids, np.zeros(len(ids), np.int32), want, logits)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.step(one, seq0, want1, logits)
    return prefill, time.perf_counter() - start


for n in lengths:
    ids = rng.integers(0, vocab, n).astype(np.int32)
    spent = {name: ([], []) for name in builds}
    for _ in range(rounds):
        for name, model in builds.items():
            prefill, decode = timed(model, ids)
            spent[name][0].append(prefill)
            spent[name][1].append(decode)
    (pa, da), (pb, db) = ((np.median(p), np.median(d)) for p, d in spent.values())
    print(f"prompt {n:4d}: prefill A {pa * 1e3:7.2f} ms  B {pb * 1e3:7.2f} ms  (A/B {pa / pb:.3f}) | "
          f"decode A {da * 1e3:6.2f} ms  B {db * 1e3:6.2f} ms  (A/B {da / db:.3f})", flush=True)
