"""One engine step of R decode rows, one per sequence, without the server: R sequences are
prefilled with 40 random tokens each, then `model.step` advances all of them by one token.
Prints the median of 10 steps (after 2 warm-up steps) for each R.

    python benchmarks/decode_steps.py MODEL [THREADS] [R,R,...]"""
import statistics
import sys
import time

import numpy as np

import neocore

model = neocore.load(sys.argv[1], threads=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
vocab = model.config.vocab_size
rng = np.random.default_rng(0)
for rows in [int(r) for r in (sys.argv[3] if len(sys.argv) > 3 else "1,8,32").split(",")]:
    for seq in range(rows):
        model.clear_sequence(seq)
        prompt = rng.integers(0, vocab, 40).astype(np.int32)
        want = np.zeros(40, np.uint8)
        want[-1] = 1
        model.step(prompt, np.full(40, seq, np.int32), want, np.empty((1, vocab), np.float32))
    tokens = rng.integers(0, vocab, rows).astype(np.int32)
    seqs = np.arange(rows, dtype=np.int32)
    want, logits = np.ones(rows, np.uint8), np.empty((rows, vocab), np.float32)
    times = []
    for _ in range(12):
        start = time.perf_counter()
        model.step(tokens, seqs, want, logits)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[2:])
    print(f"{rows:3d} rows: step {step * 1e3:7.2f} ms, {rows / step:7.1f} tok/s", flush=True)
