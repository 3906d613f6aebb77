"""Decode and prefill speed of bf16 against int8 weights in CPU time, one thread.

`neocore bench` times the wall clock, which on a shared, overloaded machine measures the other
jobs more than neocore. With one thread, `time.process_time` leaves out the time the process
spends descheduled, so the two formats can still be compared (memory bandwidth taken by the
other jobs still counts). Rounds alternate between the two models; medians are printed.

    python scripts/int8_decode_cpu_time.py BF16_FOLDER INT8_FOLDER [--rounds 3] [--new-tokens 32]

(e.g. folders written by `neocore convert SRC DST` and `neocore convert SRC DST --dtype int8`)."""
from __future__ import annotations

import argparse
import time

import numpy as np

import neocore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bf16_folder")
    p.add_argument("int8_folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=128)
    args = p.parse_args()
    models = {"bfloat16": neocore.load(args.bf16_folder, threads=1),
              "int8": neocore.load(args.int8_folder, dtype="int8", threads=1)}
    prompt = np.random.default_rng(0).integers(0, 50000, args.prompt_tokens).tolist()
    speed = {k: {"prefill": [], "decode": []} for k in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            model.reset()
            start = time.process_time()
            token = int(np.argmax(model.append(prompt)))
            speed[name]["prefill"].append(len(prompt) / (time.process_time() - start))
            start = time.process_time()
            for _ in range(args.new_tokens):
                token = int(np.argmax(model.append([token])))
            speed[name]["decode"].append(args.new_tokens / (time.process_time() - start))
    median = {k: {phase: float(np.median(v)) for phase, v in s.items()} for k, s in speed.items()}
    for name, s in speed.items():
        print(f"{name:9} decode tok/CPU-s {[round(v, 2) for v in s['decode']]} median "
              f"{median[name]['decode']:.2f}; prefill median {median[name]['prefill']:.1f}")
    print(f"int8 / bf16: decode {median['int8']['decode'] / median['bfloat16']['decode']:.2f}x, "
          f"prefill {median['int8']['prefill'] / median['bfloat16']['prefill']:.2f}x")


if __name__ == "__main__":
    main()
