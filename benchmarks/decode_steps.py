"""One engine step of R decode rows, one per sequence, without the server: R sequences are
prefilled with 40 random tokens each (PROMPT=N in the environment: N, in chunks of 200), then
`model.step` advances all of them by one token. Prints the median and the mean of 10 steps (after
2 warm-up steps) for each R.

    python benchmarks/decode_steps.py MODEL [THREADS] [R,R,...] [OTHER_DIR | B_JSON] [LOAD_JSON]

Runs this checkout's build (in place or editable). With OTHER_DIR, a folder holding another
build copied as a package named `neocore_b` (as for two_builds.py), this build (A) and that one
(B) take turns step by step, A first, so that a noisy host's swings hit both alike, and A/B is
printed; with B_JSON instead (keyword arguments of neocore.load, e.g. '{"isa": "avx2"}'), B is
this build loaded so. LOAD_JSON: keyword arguments for every load (e.g. '{"compute": "bf16"}' to time
the bf16 mode of two builds). The weight type is the folder's: time int8 on a converted int8 folder."""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

other = sys.argv[4] if len(sys.argv) > 4 else None
sys.path[:0] = [str(Path(__file__).resolve().parents[1])] + ([other] if other and not other.startswith("{") else [])
import neocore  # noqa: E402

threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
common = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
builds = {"A": neocore.load(sys.argv[1], threads=threads, **common)}
if other and other.startswith("{"):
    builds["B"] = neocore.load(sys.argv[1], threads=threads, **{**common, **json.loads(other)})
elif other:
    import neocore_b
    builds["B"] = neocore_b.load(sys.argv[1], threads=threads, **common)
vocab = builds["A"].config.vocab_size
prompt_tokens = int(os.environ.get("PROMPT", "40"))
rng = np.random.default_rng(0)
for rows in [int(r) for r in (sys.argv[3] if len(sys.argv) > 3 else "1,8,32").split(",")]:
    prompts = rng.integers(0, vocab, (rows, prompt_tokens)).astype(np.int32)
    for model in builds.values():
        for seq in range(rows):
            model.clear_sequence(seq)
            for start in range(0, prompt_tokens, 200):  # a step takes at most 256 rows
                chunk = prompts[seq, start:start + 200]
                want = np.zeros(len(chunk), np.uint8)
                want[-1] = 1
                model.step(chunk, np.full(len(chunk), seq, np.int32), want, np.empty((1, vocab), np.float32))
    tokens = rng.integers(0, vocab, rows).astype(np.int32)
    seqs = np.arange(rows, dtype=np.int32)
    logits = np.empty((rows, vocab), np.float32)
    times = {name: [] for name in builds}
    for _ in range(12):
        for name, model in builds.items():
            start = time.perf_counter()
            model.step(tokens, seqs, np.ones(rows, np.uint8), logits)
            times[name].append(time.perf_counter() - start)
    steps = {name: statistics.median(t[2:]) for name, t in times.items()}
    means = {name: statistics.mean(t[2:]) for name, t in times.items()}  # stalls show here, not in medians
    line = " | ".join(f"{name} step {s * 1e3:7.2f} ms (mean {means[name] * 1e3:7.2f}), {rows / s:7.1f} tok/s"
                      for name, s in steps.items())
    ratio = f" (A/B {steps['A'] / steps['B']:.3f})" if "B" in steps else ""
    print(f"{rows:3d} rows: {line}{ratio}", flush=True)
