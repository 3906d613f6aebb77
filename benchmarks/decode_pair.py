"""Paired decode A/B in one process: two loads of one model, A and B, each given as JSON
keyword arguments of neocore.load (e.g. '{"isa": "avx2"}', '{"dtype": "int8"}'), decode steps
from position 128 in alternating blocks of 8, the median step of each. Noise on a shared host
(which moved the same build's decode by +-25% between runs a minute apart on the lent Xeon)
then hits both sides alike.

    python benchmarks/decode_pair.py MODEL THREADS BLOCKS A_JSON B_JSON"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's neocore
import neocore  # noqa: E402

path, threads, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
models = [neocore.load(path, threads=threads, **json.loads(spec)) for spec in sys.argv[4:6]]
vocab = models[0].config.vocab_size
prompt = np.random.default_rng(0).integers(0, vocab, 128).astype(np.int32)
prompt_seqs, prompt_want = np.zeros(128, np.int32), np.zeros(128, np.uint8)
prompt_want[-1] = 1
token, seq, want = np.array([5], np.int32), np.zeros(1, np.int32), np.ones(1, np.uint8)
logits = np.empty((1, vocab), np.float32)
times: list[list[float]] = [[], []]
for block in range(blocks):
    for model, spent in zip(models, times):
        if block % 10 == 0:  # back to position 128 every 80 steps
            model.clear_sequence(0)
            model.step(prompt, prompt_seqs, prompt_want, logits)
        for _ in range(8):
            start = time.perf_counter()
            model.step(token, seq, want, logits)
            spent.append(time.perf_counter() - start)
a, b = (float(np.median(t)) for t in times)
print(f"thr={threads}: A {sys.argv[4]} {1 / a:.2f} tok/s | B {sys.argv[5]} {1 / b:.2f} tok/s | B/A {a / b:.3f}")
