"""neocore bench: speed and memory of neocore, side by side with transformers and OpenVINO in
one run.

Each engine runs in a fresh worker process (python -m neocore.bench --worker ...), so that
peak RSS (VmHWM) and load time belong to that engine alone; the parent prints the machine (CPU,
SIMD flags, kernel path, read bandwidth), the table, the ratios and the bandwidth roofline.
Every engine is warmed up on the exact shapes it is timed on (the whole prompt, then decode
steps), and each figure is the median of several timed runs. `neocore bench make-model`
writes random-weight models of the real GPT-Neo shapes (bf16-exact fp32 values, as the
published checkpoints hold)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .config import GPTNeoConfig
from .errors import NeocoreError

SHAPES = {  # hidden, layers, heads
    "125M": (768, 12, 12),
    "350M": (1024, 24, 16),
    "1.3B": (2048, 24, 16),
    "2.7B": (2560, 32, 20),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="model folder to measure")
    p.add_argument("--make-model", metavar="SHAPE", choices=sorted(SHAPES),
                   help="write a random-weight model of this shape to --out and exit")
    p.add_argument("--out", help="folder for --make-model")
    p.add_argument("--format", choices=["safetensors", "bin"], default="safetensors",
                   help="file --make-model writes (bin needs torch)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length timed for prefill (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed (default 128)")
    p.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 1,2 (default 2)")
    p.add_argument("--compare", default="", help=f"peers to run too: {', '.join(PEERS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is reported")
    p.add_argument("--openvino-python", default=sys.executable,
                   help="a Python with optimum-intel[openvino] for the openvino peers (its optimum-cli exports)")
    p.add_argument("--latency", action="store_true", help="also time decode steps at positions 100 and 2000")
    p.add_argument("--dtype", help="neocore weight formats to run, comma-separated: bfloat16, float32, int8 "
                                   "(e.g. bfloat16,int8; default: what neocore.load picks for the folder)")
    p.add_argument("--compute", default="exact",
                   help="neocore compute modes to run, comma-separated: exact, bf16 (e.g. exact,bf16)")
    p.add_argument("--load-only", action="store_true", help="measure load time and peak RSS only")
    p.add_argument("--tokenizer", metavar="DIR", help="measure encode throughput against Hugging Face instead")
    p.add_argument("--serve", action="store_true",
                   help="load test: concurrent streaming clients against `neocore serve` (see --clients)")
    p.add_argument("--clients", default="1,2,4,8,16,32", help="client counts for --serve")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)


def compute_modes(text: str) -> list[str]:
    """The compute modes --compute names, e.g. exact,bf16."""
    from ._core import COMPUTE_MODES
    modes = text.split(",")
    for mode in modes:
        if mode not in COMPUTE_MODES:
            raise NeocoreError(f"unknown compute mode {mode!r} ({', '.join(COMPUTE_MODES)})")
    return modes


def weight_formats(text: str | None) -> list[str]:
    """The weight formats --dtype names, e.g. bfloat16,int8; none when it is not given."""
    dtypes = text.split(",") if text is not None else []
    for dtype in dtypes:
        if dtype not in ("bfloat16", "float32", "int8"):
            raise NeocoreError(f"unknown dtype {dtype!r} (bfloat16, float32, int8)")
    return dtypes


def counts(text: str, flag: str, minimum: int) -> list[int]:
    """A comma-separated list of whole numbers >= minimum, e.g. --threads 1,2,16."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise NeocoreError(f"{flag} takes comma-separated whole numbers >= {minimum}, got {text!r}")
    if len(set(values)) < len(values):  # each count is one row of the results, found by its count
        raise NeocoreError(f"{flag} names a count twice: {text!r}")
    return values


# ---- random models ---------------------------------------------------------------------------

def write_random_model(shape: str, out: Path, fmt: str = "safetensors", seed: int = 0) -> Path:
    """A GPT-Neo folder with random weights in the real shape; fp32 values with zero low halves."""
    hidden, layers, heads = SHAPES[shape]
    if fmt == "bin":
        try:
            import torch
        except ImportError:
            raise NeocoreError("--format bin needs torch (pip install torch)") from None
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "gpt_neo", "architectures": ["GPTNeoForCausalLM"], "hidden_size": hidden,
        "num_layers": layers, "num_heads": heads, "intermediate_size": None, "vocab_size": 50257,
        "max_position_embeddings": 2048, "window_size": 256,
        "attention_types": [[["global", "local"], layers // 2]], "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)

    def tensor(*shape: int, scale: float = 0.02, offset: float = 0.0) -> np.ndarray:
        values = (rng.standard_normal(shape, dtype=np.float32) * scale + offset)
        return (values.view(np.uint32) & 0xFFFF0000).view(np.float32)

    names = {"transformer.wte.weight": (50257, hidden), "transformer.wpe.weight": (2048, hidden)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        names.update({p + "ln_1.weight": (hidden,), p + "ln_1.bias": (hidden,),
                      p + "ln_2.weight": (hidden,), p + "ln_2.bias": (hidden,)})
        for proj in ("q", "k", "v", "out"):
            names[p + f"attn.attention.{proj}_proj.weight"] = (hidden, hidden)
        names[p + "attn.attention.out_proj.bias"] = (hidden,)
        names.update({p + "mlp.c_fc.weight": (4 * hidden, hidden), p + "mlp.c_fc.bias": (4 * hidden,),
                      p + "mlp.c_proj.weight": (hidden, 4 * hidden), p + "mlp.c_proj.bias": (hidden,)})
    names.update({"transformer.ln_f.weight": (hidden,), "transformer.ln_f.bias": (hidden,)})

    def make(name: str, shape: tuple) -> np.ndarray:
        return tensor(*shape, offset=1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                      or name.endswith("ln_f.weight") else 0.0)

    if fmt == "bin":
        torch.save({n: torch.from_numpy(make(n, s)) for n, s in names.items()}, out / "pytorch_model.bin")
        return out
    from .checkpoint import write_safetensors
    write_safetensors(out / "model.safetensors",
                      [(name, "F32", shape, lambda n=name, s=shape: make(n, s)) for name, shape in names.items()])
    return out


# ---- measurements (inside a worker) ----------------------------------------------------------

def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """Read bandwidth in GB/s, the best of 3 rounds of each of the decode kernels' ways to
    prefetch: threads threads each read their share of a large array once, in C
    (_core.read_stream), as decode reads the weights."""
    from . import _core
    data = np.ones(nbytes, dtype=np.uint8)  # written once, so that its pages exist
    best = 0.0
    for _ in range(3):
        for prefetch in _core.PREFETCHES:
            start = time.perf_counter()
            _core.read_stream(data, threads, prefetch)
            best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


class NeocoreRunner:
    def __init__(self, folder: str, threads: int, dtype: str | None, compute: str = "exact"):
        import neocore
        self.model = neocore.load(folder, threads=threads, dtype=dtype, compute=compute)

    def prefill(self, ids: list[int]) -> int:
        self.model.reset()
        return int(np.argmax(self.model.append(ids)))

    def step(self, token: int) -> int:
        return int(np.argmax(self.model.append([token])))


class IncrementalRunner:
    """A peer that keeps its own key/value cache between calls: forward(ids) appends ids."""
    def prefill(self, ids: list[int]) -> int:
        self.past, self.length = None, 0
        return self.forward(ids)

    def step(self, token: int) -> int:
        return self.forward([token])


class TransformersRunner(IncrementalRunner):
    def __init__(self, folder: str, threads: int, dtype: str):
        import torch
        from transformers import GPTNeoForCausalLM
        torch.set_num_threads(threads)
        self.torch = torch
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.model = GPTNeoForCausalLM.from_pretrained(folder, dtype=torch_dtype,
                                                       attn_implementation="eager").eval()

    def forward(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())


class OpenVINORunner(IncrementalRunner):
    """optimum-intel's OVModelForCausalLM on a folder exported by optimum-cli (fp32 weights).
    dtype "default" leaves the inference precision to OpenVINO (bf16 where the CPU has it);
    "f32" sets INFERENCE_PRECISION_HINT=f32. The cache lives in the compiled model's state."""
    def __init__(self, folder: str, threads: int, dtype: str):
        import torch
        from optimum.intel import OVModelForCausalLM
        self.torch = torch
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": ""}
        if dtype == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self.model = OVModelForCausalLM.from_pretrained(folder, ov_config=config)

    def forward(self, ids: list[int]) -> int:
        self.length += len(ids)
        out = self.model(input_ids=self.torch.tensor([ids]),
                         attention_mask=self.torch.ones((1, self.length), dtype=self.torch.long),
                         past_key_values=self.past)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())


PEER_RUNNERS = {"transformers": TransformersRunner, "openvino": OpenVINORunner}  # neocore: NeocoreRunner
# peer name -> (runner, dtype)
PEERS = {"transformers": ("transformers", "float32"), "transformers-bf16": ("transformers", "bfloat16"),
         "openvino": ("openvino", "default"), "openvino-f32": ("openvino", "f32")}
WARMUP_STEPS = 8
LATENCY_POSITIONS = (100, 2000)
LATENCY_STEPS = 16


def random_prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    """Token ids every engine gets alike (below 50000, as they were before models with smaller
    vocabularies were measured, so that earlier numbers stay comparable)."""
    return np.random.default_rng(seed).integers(0, min(vocab_size, 50000), length).tolist()


def worker(engine: str, folder: str, threads: int, dtype: str, prompt_tokens: int, new_tokens: int,
           latency: bool, repeats: int, vocab_size: int, compute: str = "exact") -> dict:
    if engine != "neocore":  # library import time is not model load time
        import torch, transformers  # noqa: F401
    start = time.perf_counter()
    runner = (NeocoreRunner(folder, threads, dtype, compute) if engine == "neocore"
              else PEER_RUNNERS[engine](folder, threads, dtype))
    load = time.perf_counter() - start
    # where neocore's weights lie changes its decode speed (neocore.hugepages)
    pages = {"weight_pages": runner.model.weight_pages} if engine == "neocore" else {}
    if prompt_tokens == 0:  # --load-only
        return {"engine": engine, "dtype": dtype, "threads": threads, "load_s": load, "peak_rss": peak_rss(), **pages}
    prompt = random_prompt(prompt_tokens, vocab_size, seed=0)
    # warm up on the shapes timed below: the whole prompt, then decode steps after it
    token = runner.prefill(prompt)
    for _ in range(WARMUP_STEPS):
        token = runner.step(token)
    prefills, decodes = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        token = runner.prefill(prompt)
        prefills.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = runner.step(token)
        decodes.append(time.perf_counter() - start)
    ttft, decode = float(np.median(prefills)), float(np.median(decodes))
    result = {"engine": engine, "dtype": dtype, "threads": threads, "load_s": load,
              "prefill_tok_s": prompt_tokens / ttft, "ttft_s": ttft,
              "decode_tok_s": new_tokens / decode, "peak_rss": peak_rss(), "repeats": repeats,
              "prefill_spread": (max(prefills) - min(prefills)) / ttft,
              "decode_spread": (max(decodes) - min(decodes)) / decode, **pages}
    if engine == "neocore":
        result["isa"], result["compute"] = runner.model.isa, runner.model.compute
    if latency:
        for position in LATENCY_POSITIONS:
            token = runner.prefill(random_prompt(position, vocab_size, seed=1))
            start = time.perf_counter()
            for _ in range(LATENCY_STEPS):
                token = runner.step(token)
            result[f"step_ms_at_{position}"] = (time.perf_counter() - start) / LATENCY_STEPS * 1e3
    return result


# ---- the parent ------------------------------------------------------------------------------

def _spawn(engine: str, args: argparse.Namespace, threads: int, dtype: str, folder: str, vocab_size: int,
           python: str = sys.executable, compute: str = "exact") -> dict:
    spec = {"engine": engine, "folder": folder, "threads": threads, "dtype": dtype,
            "prompt_tokens": 0 if args.load_only else args.prompt_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats,
            "latency": args.latency and engine == "neocore", "vocab_size": vocab_size}
    spec = json.dumps(dict(spec, compute=compute) if engine == "neocore" else spec)
    # this neocore's source first, whichever Python runs the worker
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([python, "-m", "neocore.bench", "--worker", spec], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise NeocoreError(f"the {engine} worker failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def openvino_export(args: argparse.Namespace) -> str:
    """The model exported for OpenVINO beside it (MODEL-openvino), made once with optimum-cli."""
    out = Path(args.model.rstrip("/") + "-openvino")
    if not (out / "openvino_model.xml").is_file():
        cli = Path(args.openvino_python).parent / "optimum-cli"
        command = [str(cli), "export", "openvino", "--model", args.model, "--task", "text-generation-with-past",
                   "--weight-format", "fp32", str(out)]
        print("exporting for OpenVINO:", " ".join(command), file=sys.stderr)
        if not cli.is_file() or subprocess.run(command, capture_output=True).returncode != 0:
            raise NeocoreError(f"could not export {args.model} for OpenVINO: install optimum-intel[openvino] "
                               f"for --openvino-python ({args.openvino_python})")
    return str(out)


def machine(config: GPTNeoConfig) -> dict:
    """What the speed depends on: the CPU, its SIMD flags, the kernel path, the prefetch (for
    config's matrices)."""
    from . import _core
    from .model import decode_prefetch, kernel_path
    isa = kernel_path()
    return {"cpu": _core.cpu_model(), "cpu_flags": _core.cpu_flags(), "cores": os.cpu_count(),
            "usable_paths": _core.usable_isas()[:-1], "path": isa,
            "path_chosen_by": "NEOCORE_ISA" if os.environ.get("NEOCORE_ISA") else "auto",
            "cpu_kind": _core.cpu_kind(),
            "decode_kernel": {dtype: _core.decode_kernel(isa, dtype) for dtype in _core.DTYPES},
            "decode_prefetch": {dtype: decode_prefetch(isa, dtype, config) for dtype in _core.DTYPES}}


def by_dtype(choices: dict[str, str]) -> str:
    """'none' where every weight type has the same choice, else 'float32 none; ...; int8 nta-near'."""
    ways = set(choices.values())
    return ways.pop() if len(ways) == 1 else "; ".join(f"{dtype} {way}" for dtype, way in choices.items())


def warm_page_cache(folder: Path) -> None:
    """Reads every file once, so each engine loads from the page cache, not from disk."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def weights_bytes_per_token(config: GPTNeoConfig, dtype: str = "bfloat16") -> float:
    """Bytes a decode step reads: every matrix once (the tied lm_head included); int8 is one
    byte a weight plus a float32 scale per block."""
    from . import _core
    h, f = config.hidden_size, config.intermediate_size
    per_weight = {"bfloat16": 2, "float32": 4, "int8": 1 + 4 / _core.I8_BLOCK}[dtype]
    return per_weight * (config.vocab_size * h + config.num_layers * (4 * h * h + 2 * h * f))


def check_lengths(args: argparse.Namespace, positions: int) -> None:
    """Every sequence the workers will run fits the model's context: found before measuring."""
    longest = args.prompt_tokens + max(args.new_tokens, WARMUP_STEPS)
    if not args.load_only and longest > positions:
        raise NeocoreError(f"--prompt-tokens {args.prompt_tokens} and --new-tokens {args.new_tokens} (at least "
                           f"{WARMUP_STEPS} warm-up steps) need {longest} positions; the model has {positions}")
    if args.latency and not args.load_only and LATENCY_POSITIONS[-1] + LATENCY_STEPS > positions:
        raise NeocoreError(f"--latency times steps up to position {LATENCY_POSITIONS[-1] + LATENCY_STEPS}; "
                           f"the model has {positions}")


def run(args: argparse.Namespace) -> int:
    if args.serve:
        if not args.model:
            raise NeocoreError("--serve needs -m MODEL")
        from .bench_serve import run as serve_bench
        return serve_bench(args)
    if args.make_model:
        if not args.out:
            raise NeocoreError("--make-model needs --out FOLDER")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):  # a model's files are not overwritten
            raise NeocoreError(f"{out}: exists and is not an empty folder; --out takes a new or empty one")
        made = not out.exists()
        try:
            write_random_model(args.make_model, out, args.format)
        except BaseException:  # no half-made folder, which a retry would find not empty
            if made:
                shutil.rmtree(out, ignore_errors=True)
            else:  # it was empty: what it holds is ours
                for path in out.iterdir():
                    path.unlink()
            raise
        print(f"wrote a random {args.make_model} model to {args.out}")
        return 0
    if args.tokenizer:
        results = tokenizer_throughput(args.tokenizer)
        if args.json:
            print(json.dumps(results, indent=2))
            return 0
        print(f"encode, one thread, {results[0]['megabytes']:.1f} MB of mixed text in documents:")
        for r in results:
            ratio = f"  (neocore {results[0]['mb_s'] / r['mb_s']:.2f}x)" if r is not results[0] else ""
            print(f"  {r['engine']:22} {r['mb_s']:6.2f} MB/s{ratio}")
        print(f"  identical ids: {results[0]['identical_ids']}")
        return 0
    if not args.model:
        raise NeocoreError("bench needs -m MODEL (a folder; make one with --make-model 125M --out DIR)")
    if not Path(args.model).is_dir():  # before measuring anything, and without a worker's traceback
        raise NeocoreError(f"{args.model}: no such model folder (bench takes a local folder)")
    thread_counts = counts(args.threads, "--threads", minimum=1)
    for flag, value, minimum in (("--prompt-tokens", args.prompt_tokens, 1), ("--new-tokens", args.new_tokens, 1),
                                 ("--repeats", args.repeats, 1)):
        if value < minimum:
            raise NeocoreError(f"{flag} must be >= {minimum}, got {value}")
    peers = [p for p in args.compare.split(",") if p]
    for peer in peers:
        if peer not in PEERS:
            raise NeocoreError(f"unknown peer {peer!r} ({', '.join(PEERS)})")
    computes = compute_modes(args.compute)
    dtypes = weight_formats(args.dtype)
    from .checkpoint import open_checkpoint
    from .model import default_dtype, resolve_config
    checkpoint = open_checkpoint(Path(args.model))
    config = resolve_config(Path(args.model), checkpoint, None, {})  # any folder neocore loads
    check_lengths(args, config.max_position_embeddings)
    dtypes = dtypes or [default_dtype(checkpoint)]
    folders = {"neocore": args.model, "transformers": args.model}
    if any(PEERS[p][0] == "openvino" for p in peers):
        folders["openvino"] = openvino_export(args)
    warm_page_cache(Path(args.model))
    host = machine(config)
    # every weight format in every compute mode; the first is the one the others are set against
    variants = [(dtype, compute) for dtype in dtypes for compute in computes]
    rows = []
    for threads in thread_counts:
        before = memory_bandwidth(threads)
        runs = [_spawn("neocore", args, threads, dtype, args.model, config.vocab_size, compute=compute)
                for dtype, compute in variants]
        # measured on both sides of the runs, the better kept: on a shared machine one reading
        # taken in a busy moment put the roofline below what the engine then reached
        bandwidth = max(before, memory_bandwidth(threads))
        for i, ((dtype, compute), row) in enumerate(zip(variants, runs)):
            row.update(bandwidth_gb_s=bandwidth, compute_asked=compute,
                       roofline_tok_s=bandwidth * 1e9 / weights_bytes_per_token(config, dtype))
            if i == 0:
                row.update(host)
            else:
                row["engine"] = "neocore" + (f" compute={compute}" if len(computes) > 1 else "")
                row["variant_of_first"] = True
            rows.append(row)
        for peer in peers:
            runner, dtype = PEERS[peer]
            python = args.openvino_python if runner == "openvino" else sys.executable
            theirs = _spawn(runner, args, threads, dtype, folders[runner], config.vocab_size, python)
            theirs["engine"] = peer
            rows.append(theirs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"CPU: {host['cpu']} ({host['cores']} cores); SIMD flags: {' '.join(host['cpu_flags']) or 'none listed'}")
    print(f"kernel path: {host['path']} ({host['path_chosen_by']}; this CPU runs {', '.join(host['usable_paths'])}); "
          f"decode kernel: {by_dtype(host['decode_kernel'])}, prefetch {by_dtype(host['decode_prefetch'])} "
          f"(one sequence; tuned for {host['cpu_kind']})")
    for r in rows:
        if r["engine"] == "neocore" and not r.get("variant_of_first"):
            print(f"read bandwidth, {r['threads']} thread(s): {r['bandwidth_gb_s']:.1f} GB/s")
    for dtype, pages in sorted({(r["dtype"], r["weight_pages"]) for r in rows if "weight_pages" in r}):
        print(f"neocore {dtype} weight pages: {pages}")
    if args.load_only:
        print(f"model {args.model}: load only")
        print(f"{'engine':24} {'load s':>8} {'peak RSS MiB':>13}")
        for r in rows:
            print(f"{r['engine'] + ' ' + r['dtype']:24} {r['load_s']:>8.2f} {r['peak_rss'] / 2**20:>13.0f}")
        return 0
    print(f"model {args.model}: prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (greedy), "
          f"median of {args.repeats} runs after a warm-up on the same shapes")
    print(f"{'engine':28} {'thr':>3} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} "
          f"{'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['engine'] + ' ' + r['dtype']:28} {r['threads']:>3} {r['load_s']:>7.2f} "
              f"{r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.2f} {r['peak_rss'] / 2**20:>13.0f}")
    for threads in thread_counts:
        ours = next(r for r in rows if r["engine"] == "neocore" and r["threads"] == threads
                    and not r.get("variant_of_first"))
        print(f"\n{threads} thread(s): read bandwidth {ours['bandwidth_gb_s']:.1f} GB/s -> decode roofline "
              f"{ours['roofline_tok_s']:.1f} tok/s; neocore reaches "
              f"{100 * ours['decode_tok_s'] / ours['roofline_tok_s']:.0f}% of it")
        if "step_ms_at_100" in ours:
            print(f"  decode step at position 100: {ours['step_ms_at_100']:.2f} ms; at 2000: "
                  f"{ours['step_ms_at_2000']:.2f} ms ({ours['step_ms_at_2000'] / ours['step_ms_at_100']:.2f}x)")
        for r in rows:
            if r.get("variant_of_first") and r["threads"] == threads:
                ran = "" if r["compute"] == r["compute_asked"] else f" (ran {r['compute']})"
                print(f"  neocore {r['dtype']} {r['compute_asked']}{ran} against {ours['dtype']} {computes[0]}: prefill "
                      f"{r['prefill_tok_s'] / ours['prefill_tok_s']:.2f}x, decode {r['decode_tok_s'] / ours['decode_tok_s']:.2f}x "
                      f"({100 * r['decode_tok_s'] / r['roofline_tok_s']:.0f}% of its roofline, "
                      f"{r['roofline_tok_s']:.1f} tok/s), peak RSS {r['peak_rss'] / ours['peak_rss']:.2f}x")
            elif not r["engine"].startswith("neocore") and r["threads"] == threads:
                print(f"  vs {r['engine']}: prefill {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x, "
                      f"decode {ours['decode_tok_s'] / r['decode_tok_s']:.2f}x, "
                      f"peak RSS {ours['peak_rss'] / r['peak_rss']:.2f}x, load {r['load_s'] / ours['load_s']:.1f}x faster")
    return 0


def mixed_text(megabytes: float, seed: int = 0) -> list[str]:
    """Documents of prose, code, numbers and several scripts, about megabytes in all."""
    rng = np.random.default_rng(seed)
    words = ("the of and to in is that for it was on with as his they be at one have this from "
             "model tokenizer GPT-Neo naïve café Zürich résumé 3.14159 2026 1,000,000 x_1 = y[2] + 3; "
             "def return {} () [] :: -> != <= >= && || Привет мир Ελληνικά 日本語の文章 中文 한국어 "
             "مرحبا नमस्ते 😀 👍🏽 don't I'LL we've").split()
    docs, size = [], 0
    while size < megabytes * 1e6:
        n = int(rng.integers(50, 400))
        picks = rng.integers(0, len(words), n)
        seps = rng.choice([" ", " ", " ", "  ", "\n", "\t", ", ", ". "], n)
        doc = "".join(words[i] + sep for i, sep in zip(picks, seps))
        docs.append(doc)
        size += len(doc.encode())
    return docs


def tokenizer_throughput(folder: str, megabytes: float = 4.0) -> list[dict]:
    """Single-threaded encode MB/s of neocore's tokenizer and Hugging Face's, same documents."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from .tokenizer import Tokenizer
    docs = mixed_text(megabytes)
    total = sum(len(d.encode()) for d in docs) / 1e6
    results = []
    ours = Tokenizer.from_dir(folder)
    runners = {"neocore": lambda: [ours.encode(d) for d in docs]}
    try:
        from transformers import GPT2TokenizerFast
        hf = GPT2TokenizerFast(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"))
        runners["GPT2TokenizerFast"] = lambda: [hf.encode(d) for d in docs]
        backend = hf.backend_tokenizer  # the Rust tokenizer itself, without the Python wrapper
        runners["tokenizers (Rust)"] = lambda: [e.ids for e in backend.encode_batch(docs)]
    except ImportError:
        pass
    outputs = {}
    for name, run_once in runners.items():
        if name == "neocore":
            ours._cache.clear()  # a cold cache, as on a first document
        start = time.perf_counter()
        outputs[name] = run_once()
        results.append({"engine": name, "mb_s": total / (time.perf_counter() - start), "megabytes": total})
    first = next(iter(outputs.values()))
    for r in results:
        r["identical_ids"] = all(ids == first for ids in outputs.values())
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args()
    if parsed.worker:
        spec = json.loads(parsed.worker)
        try:
            print(json.dumps(worker(**spec)))
        except NeocoreError as exc:  # the parent shows the last line: the message, not a traceback
            sys.exit(str(exc))
    else:
        sys.exit(run(parsed))
