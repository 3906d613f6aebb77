"""Throughput of a Ray Data generation job (neocore.ray.Generate) against the same prompts
through one in-process batched model.generate, greedy, on one machine (see BENCHMARKS.md).

    python benchmarks/ray_data.py -m /tmp/125M-bf16 --prompts 2000 --new-tokens 16 --layouts 2x1,1x2

A layout AxT is A actors of T threads each; Ray is started with as many CPUs as the largest
layout uses. The job's time includes starting its actors and loading the model in each (what a
user waits for); Ray's own start is reported apart."""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np

import neocore

WORDS = ("the of and to in is was for on that with as by at from his her an were which are this be "
         "had not but have one all their they new after first who been its has also more than two "
         "city river music people school world history water village station language").split()


def prompts(count: int, seed: int = 0) -> list[str]:
    """count different short prompts (3 to 8 words)."""
    rng = np.random.default_rng(seed)
    out: set[str] = set()
    while len(out) < count:
        out.add(" ".join(rng.choice(WORDS, rng.integers(3, 9))).capitalize())
    return sorted(out)


def in_process(folder: str, texts: list[str], new_tokens: int, threads: int, max_batch: int) -> tuple[float, int]:
    start = time.perf_counter()
    model = neocore.load(folder, threads=threads)
    model.start_engine(max_batch)
    model.generate(texts, max_new_tokens=new_tokens, temperature=0)
    return time.perf_counter() - start, model.engine.stats.tokens_generated


def ray_job(folder: str, texts: list[str], new_tokens: int, actors: int, threads: int, max_batch: int,
            batch_size: int) -> tuple[float, int]:
    import ray
    import neocore.ray
    data = ray.data.from_items([{"prompt": t} for t in texts]).materialize()
    start = time.perf_counter()
    job = data.map_batches(neocore.ray.Generate, batch_size=batch_size, num_cpus=threads,
                           compute=ray.data.ActorPoolStrategy(size=actors),
                           fn_constructor_kwargs=dict(model=folder, threads=threads, max_batch=max_batch,
                                                      max_new_tokens=new_tokens, temperature=0))
    rows = job.take_all()
    seconds = time.perf_counter() - start
    assert len(rows) == len(texts) and not any(r["error"] for r in rows)
    return seconds, sum(r["generated_tokens"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--layouts", default="2x1,1x2", help="actors x threads, comma-separated")
    p.add_argument("--max-batch", type=int, default=64, help="sequences one engine decodes at once")
    p.add_argument("--batch-size", type=int, default=64, help="rows one actor call gets")
    p.add_argument("--baseline-last", action="store_true",
                   help="run the in-process baseline after the Ray jobs (on a shared machine, run both orders)")
    args = p.parse_args()
    layouts = [tuple(int(n) for n in item.split("x")) for item in args.layouts.split(",")]
    cpus = max(a * t for a, t in layouts)
    texts = prompts(args.prompts)
    print(f"{platform.processor() or platform.machine()}; {len(texts)} prompts, {args.new_tokens} new tokens, "
          f"max_batch {args.max_batch}, batch_size {args.batch_size}")
    def baseline() -> tuple:
        return (f"in-process model.generate, {cpus} threads",
                *in_process(args.model, texts, args.new_tokens, cpus, args.max_batch))

    rows = [] if args.baseline_last else [baseline()]
    import ray
    started = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray.init: {time.perf_counter() - started:.1f} s (not counted)")
    try:
        for actors, threads in layouts:
            seconds, tokens = ray_job(args.model, texts, args.new_tokens, actors, threads, args.max_batch,
                                      args.batch_size)
            rows.append((f"Ray Data, {actors} actor(s) x {threads} thread(s)", seconds, tokens))
    finally:
        ray.shutdown()
    if args.baseline_last:
        rows.insert(0, baseline())
    base = rows[0][1]
    print("| run | wall s | prompts/s | generated tokens/s | vs in-process |\n| --- | ---: | ---: | ---: | ---: |")
    for name, seconds, tokens in rows:
        print(f"| {name} | {seconds:.1f} | {len(texts) / seconds:.1f} | {tokens / seconds:.1f} | "
              f"{base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
