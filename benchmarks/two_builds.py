"""Two builds of neocore in one process, stepped alternately, so that a noisy host's swings hit
both alike: this checkout's `neocore` (A) and another build (B) copied as a package named
`neocore_b`, e.g. before a change:

    rm -rf /tmp/nb && mkdir /tmp/nb && cp -r neocore /tmp/nb/neocore_b   # built in place
    python benchmarks/two_builds.py /tmp/nb MODEL THREADS [PROMPT_LENGTHS] [ROUNDS] [LOAD_JSON]

For each prompt length: the median time of a prefill wanting the last row's logits, of a
decode step after it, and of a step in which the prompt joins 8 decoding sequences (a server's
step when a client arrives); A and B alternate within every round."""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), sys.argv[1]]  # this checkout's, then B
import neocore  # noqa: E402
import neocore_b  # noqa: E402

model_path, threads = sys.argv[2], int(sys.argv[3])
lengths = [int(n) for n in (sys.argv[4] if len(sys.argv) > 4 else "8,32,128").split(",")]
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 15
options = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}  # neocore.load's, e.g. {"dtype": "int8"}
builds = {"A": neocore.load(model_path, threads=threads, **options),
          "B": neocore_b.load(model_path, threads=threads, **options)}
vocab = builds["A"].config.vocab_size
rng = np.random.default_rng(0)
logits = np.empty((1, vocab), np.float32)
one, seq0, want1 = np.array([5], np.int32), np.zeros(1, np.int32), np.ones(1, np.uint8)


DECODING = 8  # sequences 1..8, each given a 40-token prompt first
for model in builds.values():
    for seq in range(1, DECODING + 1):
        model.step(rng.integers(0, vocab, 40).astype(np.int32), np.full(40, seq, np.int32),
                   np.zeros(40, np.uint8), logits)


def timed(model, ids: np.ndarray) -> tuple[float, float, float]:
    want = np.zeros(len(ids), np.uint8)
    want[-1] = 1
    model.clear_sequence(0)
    start = time.perf_counter()
    model.step(ids, np.zeros(len(ids), np.int32), want, logits)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.step(one, seq0, want1, logits)
    decode = time.perf_counter() - start
    model.clear_sequence(0)
    tokens = np.concatenate([np.full(DECODING, 5, np.int32), ids])
    seqs = np.concatenate([np.arange(1, DECODING + 1, dtype=np.int32), np.zeros(len(ids), np.int32)])
    mixed_want = np.concatenate([np.ones(DECODING, np.uint8), want])
    mixed_logits = np.empty((DECODING + 1, vocab), np.float32)
    start = time.perf_counter()
    model.step(tokens, seqs, mixed_want, mixed_logits)
    return prefill, decode, time.perf_counter() - start


for n in lengths:
    ids = rng.integers(0, vocab, n).astype(np.int32)
    spent = {name: ([], [], []) for name in builds}
    for _ in range(rounds):
        for name, model in builds.items():
            for kind, seconds in zip(spent[name], timed(model, ids)):
                kind.append(seconds)
    a, b = ([float(np.median(kind)) * 1e3 for kind in spent[name]] for name in builds)
    print(f"prompt {n:4d}: " + " | ".join(
        f"{label} A {x:7.2f} ms B {y:7.2f} ms (A/B {x / y:.3f})"
        for label, x, y in zip(("prefill", "decode", f"{DECODING} decoding + prompt"), a, b)), flush=True)
