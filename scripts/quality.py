"""What a lossy mode costs in quality on a trained model: perplexity of a held-out text (as
`neocore score` computes it) and greedy continuations of prompts taken from that text, for
bfloat16 weights computed exactly and for the mode (int8 weights, or the bf16 compute mode),
side by side. Prints a markdown table (BENCHMARKS.md) or JSON.

    python scripts/quality.py ../shared/models/neo-tiny-py ../shared/models/neo-tiny-py-eval.txt --mode int8
    python scripts/quality.py ../shared/models/neo-tiny-py ../shared/models/neo-tiny-py-eval.txt --mode bf16

Prompts: PROMPTS lines spread evenly over the text (lines with at least 30 visible
characters), each prompt being up to CONTEXT_CHARS characters before that line plus its
first half; both models continue each greedily for NEW_TOKENS tokens."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import neocore

PROMPTS, NEW_TOKENS, CONTEXT_CHARS, AGREE_TOKENS = 20, 32, 400, 16
BASELINE = "exact"
MODES = {BASELINE: {"dtype": "bfloat16", "compute": "exact"},
         "int8": {"dtype": "int8", "compute": "exact"},
         "bf16": {"dtype": "bfloat16", "compute": "bf16"}}
LABELS = {BASELINE: "bfloat16 weights, exact", "int8": f"int8 weights (blocks of {neocore._core.I8_BLOCK})",
          "bf16": "bfloat16 weights, bf16 compute"}


def prompts_from(text: str, count: int = PROMPTS) -> list[str]:
    starts, at = [], 0
    for line in text.splitlines(keepends=True):
        if len(line.strip()) >= 30 and at > 0:
            starts.append((at, line))
        at += len(line)
    picked = [starts[i] for i in np.linspace(0, len(starts) - 1, count).astype(int)]
    return [text[max(0, at - CONTEXT_CHARS):at] + line[:len(line.rstrip()) // 2] for at, line in picked]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def measure(model_path: str, text_path: str, mode: str, threads: int | None) -> dict:
    text = Path(text_path).read_text(encoding="utf-8")
    prompts = prompts_from(text)
    results: dict = {"model": model_path, "text": text_path, "mode": mode}
    continuations = {}
    for run in (BASELINE, mode):
        model = neocore.load(model_path, threads=threads, **MODES[run])
        if model.compute != MODES[run]["compute"]:
            raise SystemExit(f"this CPU cannot run compute={MODES[run]['compute']} (no AMX or AVX512-BF16)")
        start = time.perf_counter()
        scored = model.score(text)
        results[run] = {"perplexity": scored.perplexity, "tokens": len(scored.tokens),
                        "weight_mib": model.weight_bytes() / 2 ** 20, "path": model.isa,
                        "score_s": time.perf_counter() - start}
        continuations[run] = [model.generate_ids(model.tokenizer.encode(p), NEW_TOKENS, stop_at_eos=False)
                              for p in prompts]
    agree = [common_prefix(a, b) for a, b in zip(continuations[BASELINE], continuations[mode])]
    results["agreeing_tokens"] = agree
    results["prompts_agreeing_16"] = sum(n >= AGREE_TOKENS for n in agree)
    results["perplexity_change"] = results[mode]["perplexity"] / results[BASELINE]["perplexity"] - 1
    return results


def table(r: dict) -> str:
    b, q = r[BASELINE], r[r["mode"]]
    agree = r["agreeing_tokens"]
    return "\n".join([
        "| mode | weight MiB | perplexity | change | greedy continuations equal for >= 16 of 32 tokens |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| {LABELS[BASELINE]} | {b['weight_mib']:.1f} | {b['perplexity']:.4f} | | |",
        f"| {LABELS[r['mode']]} | {q['weight_mib']:.1f} | {q['perplexity']:.4f} | "
        f"{100 * r['perplexity_change']:+.2f}% | {r['prompts_agreeing_16']} of {len(agree)} "
        f"(identical for all 32: {sum(n == NEW_TOKENS for n in agree)}; shortest agreement {min(agree)}) |",
        "",
        f"{b['tokens']} tokens scored; tokens agreeing per prompt: {agree}",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("text")
    p.add_argument("--mode", choices=[m for m in MODES if m != BASELINE], required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = measure(args.model, args.text, args.mode, args.threads)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
