"""neocore bench --serve: N concurrent streaming clients against a real `neocore serve` process,
for N = 1, 2, 4, ...: aggregate generated tokens/s, time to first token and inter-token latency
(p50/p95), and the server's peak RSS; beside them, in the same run, transformers' `generate` on
the same prompts as one left-padded batch of N (what a Python user would otherwise write), and
neocore's single-sequence prefill speed as the compute ceiling. Loopback only."""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from .bench import compute_modes, counts, weight_formats
from .errors import NeocoreError

WORDS = ("the river city market winter light station engine garden paper music window harbor "
         "signal forest letter morning bridge voice number story").split()


def make_prompts(n: int, words: int = 24, seed: int = 0) -> list[str]:
    """n different plain-text prompts of about `words` words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)).capitalize() for _ in range(n)]


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(base: str, process: subprocess.Popen, timeout: float, output) -> None:
    """Polls base/health until the server process answers 200; raises RuntimeError with
    output() (what the process printed) if it exits or the timeout passes first."""
    import httpx
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {output()}")
        time.sleep(0.3)


def _quantiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


async def _client(http, base: str, prompt: str, new_tokens: int) -> tuple[float, list[float]]:
    """One streaming completion: (time to first token, gaps between the following chunks)."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    arrivals = []
    async with http.stream("POST", base + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())
    return arrivals[0] - start, list(np.diff(arrivals))


def _metric(base: str, name: str) -> float:
    import httpx
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _round(base: str, prompts: list[str], new_tokens: int) -> dict:
    import httpx
    names = ("neocore_generated_tokens_total", "neocore_engine_forward_seconds_total",
             "neocore_engine_python_seconds_total", "neocore_engine_steps_total")
    before = [_metric(base, name) for name in names]
    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*[_client(http, base, p, new_tokens) for p in prompts])
        wall = time.perf_counter() - start
    generated, forward, python, steps = (_metric(base, name) - b for name, b in zip(names, before))
    ttft = _quantiles([r[0] for r in results])
    itl = _quantiles([gap for r in results for gap in r[1]])
    return {"clients": len(prompts), "tokens": int(generated), "seconds": wall,
            "tok_s": generated / wall, "ttft_p50": ttft[0], "ttft_p95": ttft[1],
            "itl_p50": itl[0], "itl_p95": itl[1],
            "engine_python_ms_per_step": 1e3 * python / max(steps, 1),
            "engine_forward_ms_per_step": 1e3 * forward / max(steps, 1)}


def _worker(kind: str, folder: str, threads: int, prompts: list[str], new_tokens: int, compute: str,
            dtype: str | None) -> dict:
    """Runs in its own process: transformers' padded batch, or neocore's prefill ceiling (in the
    server's compute mode and weight format)."""
    if kind == "transformers":
        import torch
        from transformers import AutoTokenizer, GPTNeoForCausalLM
        torch.set_num_threads(threads)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
        model = GPTNeoForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tokenizer.eos_token_id)
        with torch.no_grad():
            model.generate(**tokenizer(prompts[:1], return_tensors="pt"), max_new_tokens=2, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)  # warm-up
            start = time.perf_counter()
            model.generate(**batch, **kwargs)
            wall = time.perf_counter() - start
        return {"tok_s": len(prompts) * new_tokens / wall, "seconds": wall}
    from .bench import NeocoreRunner
    runner = NeocoreRunner(folder, threads, dtype, compute)
    ids = np.random.default_rng(0).integers(0, runner.model.config.vocab_size, 128).tolist()
    times = []
    for _ in range(4):  # timed as neocore bench times prefill: the prompt's last row of logits only
        start = time.perf_counter()
        runner.prefill(ids)
        times.append(time.perf_counter() - start)
    return {"tok_s": 128 / float(np.median(times[1:])), "dtype": runner.model.dtype,
            "compute": runner.model.compute}


def _spawn(kind: str, folder: str, threads: int, prompts: list[str], new_tokens: int,
           compute: str = "exact", dtype: str | None = None) -> dict:
    payload = json.dumps([kind, folder, threads, prompts, new_tokens, compute, dtype])
    done = subprocess.run([sys.executable, "-m", "neocore.bench_serve", "--worker", payload],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _serve_run(folder: str, threads: int, dtype: str | None, compute: str, counts: list[int], new_tokens: int,
               peers: list[dict] | None) -> dict:
    """One server (threads, weight format, compute mode) under each client count in turn; with
    peers a list, also transformers' padded batch for each count, appended to it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "neocore", "serve", "-m", folder, "--port", str(port),
                               "--threads", str(threads), "--compute", compute, "--max-batch", str(max(counts)),
                               "--max-queue", str(max(counts)), *(["--dtype", dtype] if dtype else [])],
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        try:
            wait_until_serving(base, server, 120, server.stderr.read)
        except RuntimeError as exc:  # e.g. a weight format that folder cannot give: the server's last line
            said = [line for line in str(exc).removeprefix("the server did not start: ").splitlines() if line.strip()]
            reason = said[-1].removeprefix("neocore: error: ") if said else "it printed nothing"
            raise NeocoreError(f"{threads} threads, {dtype or 'default'} weights, {compute}: the server did not "
                               f"start: {reason}") from None
        asyncio.run(_round(base, make_prompts(2, seed=99), 4))  # warm-up
        for n in counts:
            prompts = make_prompts(n, seed=n)
            row = asyncio.run(_round(base, prompts, new_tokens))
            row["server_peak_rss_mib"] = _peak_rss_mib(server.pid)
            rows.append(row)
            if peers is not None:
                peers.append({"clients": n, **_spawn("transformers", folder, threads, prompts, new_tokens)})
            print(f"  {threads} threads, {dtype or 'default'} weights, {compute}: {n} clients done",
                  file=sys.stderr, flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    prefill = _spawn("prefill", folder, threads, [], 0, compute, dtype)  # loads as the server did
    return {"model": folder, "threads": threads, "dtype_asked": dtype, "compute_asked": compute,
            "dtype": prefill["dtype"], "compute": prefill["compute"], "new_tokens": new_tokens,
            "prefill_tok_s": prefill["tok_s"], "neocore": rows}


def _print_run(result: dict) -> None:
    from ._core import cpu_model
    ran = f" (asked {result['compute_asked']})" if result["compute"] != result["compute_asked"] else ""
    print(f"model {result['model']}: {result['threads']} threads, {result['dtype']} weights, compute "
          f"{result['compute']}{ran}, {result['new_tokens']} new tokens per client (greedy), CPU {cpu_model()}")
    prefill, rows = result["prefill_tok_s"], result["neocore"]
    print(f"neocore prefill (one 128-token prompt): {prefill:.0f} tok/s")
    print("clients  tok/s  x1-stream  %prefill  TTFT p50/p95 s  ITL p50/p95 ms  step C/Python ms  "
          "server RSS MiB  transformers tok/s  ratio")
    one = rows[0]["tok_s"] if rows else float("nan")
    by_n = {p["clients"]: p["tok_s"] for p in result["transformers_padded_batch"]}
    for r in rows:
        hf = by_n.get(r["clients"], float("nan"))
        print(f"{r['clients']:7d} {r['tok_s']:6.1f} {r['tok_s'] / one:9.2f} {100 * r['tok_s'] / prefill:8.0f}% "
              f"{r['ttft_p50']:7.2f}/{r['ttft_p95']:.2f} {1e3 * r['itl_p50']:8.1f}/{1e3 * r['itl_p95']:.1f} "
              f"{r['engine_forward_ms_per_step']:9.1f}/{r['engine_python_ms_per_step']:.2f} "
              f"{r['server_peak_rss_mib']:14.0f} {hf:18.1f} {r['tok_s'] / hf:6.2f}")


def run(args: argparse.Namespace) -> int:
    """Called by `neocore bench --serve`: a server for each thread count, weight format and
    compute mode named, in turn; transformers (--compare) once per thread count, its batch being
    the same for every server."""
    thread_counts = counts(str(args.threads), "--threads", minimum=1)
    setups = [(dtype, compute) for dtype in weight_formats(args.dtype) or [None]
              for compute in compute_modes(args.compute)]
    clients = counts(args.clients, "--clients", minimum=1)
    if args.new_tokens < 1:
        raise NeocoreError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    peers_named = [p for p in args.compare.split(",") if p]
    if any(p != "transformers" for p in peers_named):
        raise NeocoreError(f"--serve compares with transformers only, got --compare {args.compare}")
    results: list[dict] = []
    try:
        for threads in thread_counts:
            peers: list[dict] = []
            for i, (dtype, compute) in enumerate(setups):
                result = _serve_run(str(args.model), threads, dtype, compute, clients, args.new_tokens,
                                    peers if i == 0 and peers_named else None)
                results.append(dict(result, transformers_padded_batch=peers))
                if not args.json:  # each run as it ends: a later one that fails loses none of it
                    if len(results) > 1:
                        print()
                    _print_run(results[-1])
    finally:
        if args.json and results:  # the runs that ended, also when a later one failed
            print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(*json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit("usage: neocore bench --serve -m MODEL")
