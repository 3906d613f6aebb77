"""neocore.load() and the Model it returns: the C engine plus what Python keeps around it."""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Set
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import _core
from .checkpoint import Checkpoint, open_checkpoint
from .config import GPTNeoConfig, generation_eos_ids
from .errors import ConfigError, ContextError, NeocoreError, shown
from .sampling import is_integer, token_array
from .weights import WEIGHT_DTYPES, WeightLoader, holds_int8

PREFILL_CHUNK = 256  # rows one step may carry (bounds scratch memory)
SEQUENCE_SLOTS = 256  # sequences the run state can hold at once; an idle slot costs no cache memory
DIRECT_SLOT = 0       # the sequence of append/logits/score; the engine uses the others


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


ISA_NEEDS = {"amx": "AVX-512F/BW/VL, AVX512-BF16 and AMX-BF16 (with Linux granting the tile state)",
             "avx512bf16": "AVX-512F/BW/VL and AVX512-BF16", "avx512": "AVX-512F/BW/VL",
             "avx2": "AVX2+FMA"}
COMPUTE_MODES = ("exact", "bf16")


def kernel_path(requested: str | None = None) -> str:
    """'amx', 'avx512bf16', 'avx512', 'avx2' or 'generic' (or 'scalar', the tests' reference): the
    request, else $NEOCORE_ISA, else the fastest this CPU runs. amx and avx512bf16 are the
    avx512 path plus a bf16 GEMM."""
    choice = (requested or os.environ.get("NEOCORE_ISA") or "auto").lower()
    if choice == "auto":
        return _core.usable_isas()[0]
    if choice not in _core.MODEL_ISAS + ("scalar",):
        raise NeocoreError(f"unknown kernel path {choice!r} (NEOCORE_ISA takes auto, "
                           f"{', '.join(_core.MODEL_ISAS)}, or scalar: the slow reference)")
    if not _core.isa_runs_here(choice):
        raise NeocoreError(f"the {choice} kernel path was requested, but this CPU cannot run it "
                           f"(it needs {ISA_NEEDS[choice]})")
    return choice


def decode_prefetch(isa: str, dtype: str, config: GPTNeoConfig, compute: str = "exact") -> str:
    """How one sequence's decode on path isa prefetches weight rows of type dtype on this CPU,
    over the matrices of config's shape: one way, or each way with the row length it is for.
    The bf16 mode's own decode kernel (where it decodes in bf16) has one way, non-temporal,
    taken wherever the exact kernels prefetch at all (csrc/matmul_bf16.c)."""
    bf16_kernel = compute == "bf16" and _core.bf16_decodes(isa)

    def way(cols: int) -> str:
        how = _core.decode_prefetch(isa, dtype, 1, cols)
        return "nta-near" if bf16_kernel and how != "none" else how

    ways = {cols: way(cols) for cols in (config.hidden_size, config.intermediate_size)}
    if len(set(ways.values())) == 1:
        return ways[config.hidden_size]
    return ", ".join(f"{how} for {cols}-column rows" for cols, how in ways.items())


_told_bf16_runs_exact = False


def compute_mode(requested: str | None, isa: str) -> str:
    """The compute mode a model on path isa runs: 'bf16' where the path has a bf16 GEMM (AMX or
    AVX512-BF16); else 'exact', said once per process when bf16 was asked for."""
    global _told_bf16_runs_exact
    compute = "exact" if requested is None else requested
    if compute not in COMPUTE_MODES:
        raise NeocoreError(f"compute must be one of {', '.join(COMPUTE_MODES)}, got {shown(compute)}")
    if compute == "bf16" and isa not in _core.BF16_GEMMS:
        if not _told_bf16_runs_exact:
            print(f"neocore: compute=bf16 needs AMX or AVX512-BF16; the {isa} path computes exactly",
                  file=sys.stderr)
            _told_bf16_runs_exact = True
        return "exact"
    return compute


class Model:
    """A loaded GPT-Neo model. Its run state holds many sequences: generation goes through an
    engine (neocore.engine) that advances them together; append/logits/score work on one
    sequence of their own. Calls from several threads are serialised by a lock (never a
    crash); logits and score hold that sequence for their whole call, but interleaved append
    calls would mix their contexts."""

    def __init__(self, path: Path, config: GPTNeoConfig, weights: dict[str, Any], dtype: str,
                 threads: int, context: int, isa: str, compute: str, tokenizer: Any,
                 load_seconds: float):
        self.path = path
        self.config = config
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.load_seconds = load_seconds
        self._weights = weights
        shape = {
            "hidden": config.hidden_size, "n_layers": config.num_layers,
            "n_heads": config.num_heads, "ffn": config.intermediate_size,
            "vocab": config.vocab_size, "max_positions": config.max_position_embeddings,
            "window": config.window_size, "ln_eps": config.layer_norm_epsilon,
            "layer_is_local": np.array(config.layer_is_local, dtype=np.uint8),
        }
        self._core = _core.Core(shape, weights, SEQUENCE_SLOTS, context, PREFILL_CHUNK, threads, isa,
                                compute)
        self._last_logits = np.empty((1, config.vocab_size), dtype=np.float32)
        self._lock = threading.Lock()  # the run state, one call to the core at a time
        # the sequence of append/logits/score, held for a whole call of theirs; apart from
        # _lock so that the engine's steps go on meanwhile
        self._direct = threading.RLock()
        self._engine: Any = None

    # ---- facts ------------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        return self._core.threads

    @property
    def isa(self) -> str:
        return self._core.isa

    @property
    def compute(self) -> str:
        """'exact' (fp32 activations) or 'bf16' (matmul inputs, keys and values rounded to bf16)."""
        return self._core.compute

    @property
    def cache_dtype(self) -> str:
        """What the key/value cache holds: 'bfloat16' in the bf16 compute mode, else 'float32'."""
        return self._core.cache_dtype

    def cache_bytes(self, positions: int) -> int:
        """Bytes of keys and values that a sequence of this many positions holds (a local layer
        keeps its window at most). A sequence's cache takes memory only as it is written, a 4 KiB
        page of each head's keys and values at a time (so a short one takes more than this)."""
        c = self.config
        value_bytes = 2 if self.cache_dtype == "bfloat16" else 4
        kept = [min(positions, c.window_size) if kind == "local" else positions for kind in c.attention_layers]
        return 2 * sum(kept) * c.hidden_size * value_bytes

    @property
    def context_length(self) -> int:
        return self._core.n_ctx

    def weight_bytes(self) -> int:
        """Bytes of weights the engine reads (matrices, biases and norms)."""
        arrays = [self._weights["wte"], self._weights["wpe"], self._weights["lnf_w"], self._weights["lnf_b"]]
        arrays += [a for layer in self._weights["layers"] for a in layer.values()]
        return sum(a.nbytes for a in arrays)

    # ---- the engine -------------------------------------------------------------------------
    def _check_room(self, needed: int) -> None:
        if self.position + needed > self.context_length:
            raise ContextError(f"{self.position + needed} tokens do not fit in the context of "
                               f"{self.context_length} positions")

    def reset(self) -> None:
        """Forgets the cached tokens."""
        with self._direct, self._lock:
            self._core.clear(DIRECT_SLOT)

    @property
    def position(self) -> int:
        """Tokens in the cache: the position the next token will take."""
        return self._core.length(DIRECT_SLOT)

    def append(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feeds tokens after those already cached. Returns the logits after the last one (a
        buffer reused by the next call: copy it to keep it), or with all_logits a new
        [len(ids), vocab] array of the logits after each."""
        tokens = token_array(ids, self.config.vocab_size)
        if tokens.size == 0:
            raise NeocoreError("no tokens to feed")
        out = np.empty((tokens.size, self.config.vocab_size), np.float32) if all_logits else self._last_logits
        chunk = self._core.max_rows
        with self._direct, self._lock:
            self._check_room(tokens.size)
            for start in range(0, tokens.size, chunk):
                part = tokens[start:start + chunk]
                want = np.zeros(part.size, np.uint8)
                want[:] = all_logits
                want[-1] |= start + chunk >= tokens.size
                self._core.step(part, np.full(part.size, DIRECT_SLOT, np.int32), want,
                                out[start:] if all_logits else out)
        return out if all_logits else out[0]

    def step(self, tokens: np.ndarray, seqs: np.ndarray, want_logits: np.ndarray,
             logits: np.ndarray) -> None:
        """One forward step over rows of (sequence slot, token) from any sequences (see
        neocore.engine); slot DIRECT_SLOT belongs to append."""
        with self._lock:
            self._core.step(tokens, seqs, want_logits, logits)

    def clear_sequence(self, seq: int) -> None:
        with self._lock:
            self._core.clear(seq)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: logits at every position, from a fresh state."""
        tokens = token_array(ids, self.config.vocab_size)
        with self._direct:  # no other call's tokens between the reset and the append
            self.reset()
            if not tokens.size:
                return np.empty((0, self.config.vocab_size), np.float32)
            return self.append(tokens, all_logits=True)

    @property
    def engine(self) -> Any:
        """The engine that generates for this model (neocore.engine.Engine), made on first use
        with its defaults unless start_engine made it first."""
        with self._lock:
            if self._engine is None:
                from .engine import Engine
                Engine(self)  # which makes itself self._engine
            return self._engine

    def start_engine(self, max_batch: int = 16, max_queue: int | None = None) -> Any:
        """Makes this model's engine with these limits (a model has one engine). An engine with
        no requests (made by an earlier generate) is closed and replaced; a busy one is not."""
        from .engine import Engine
        Engine.check_limits(max_batch, max_queue)  # limits refused leave the current engine as it is
        with self._lock:  # one step: a generate meanwhile finds the old engine or the new one
            current = self._engine
            if current is not None:
                current.close_if_idle()  # if busy, it stays, and Engine refuses to make a second
            return Engine(self, max_batch, max_queue)

    def generate_ids(self, ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                     stop_at_eos: bool = True) -> list[int] | list[list[int]]:
        """Greedy continuation: the new tokens only (ending with EOS if the model chose it).
        A list of id lists gives a list of continuations, decoded together. A prompt whose
        max_new_tokens would not fit the context is a ContextError (generate, for text, stops
        at a full context instead)."""
        from .engine import Request
        from .sampling import SamplingParams
        if not is_integer(max_new_tokens) or max_new_tokens < 0:
            raise NeocoreError(f"max_new_tokens must be an integer >= 0, got {shown(max_new_tokens)}")
        max_new_tokens = int(max_new_tokens)  # numpy's narrow integers would wrap in the sum below
        try:
            many = len(ids) > 0 and isinstance(ids[0], Iterable) and not isinstance(ids[0], (str, bytes))
            prompts = [list(p) for p in ids] if many else [list(ids)]
        except (TypeError, KeyError):  # not a sequence: None, a number, a dict
            raise NeocoreError("ids must be a list of token ids, or a list of such lists") from None
        for prompt in prompts:
            if not prompt:
                raise NeocoreError("the prompt is empty: give at least one token")
            token_array(prompt, self.config.vocab_size)  # checked here too when nothing is generated
            needed = len(prompt) + max(max_new_tokens - 1, 0)  # the last token chosen is never fed
            if needed > self.context_length:
                raise ContextError(f"{needed} tokens do not fit in the context of {self.context_length} positions")
        if max_new_tokens == 0:
            results: list[list[int]] = [[] for _ in prompts]
        else:
            greedy = SamplingParams(temperature=0)
            requests = [Request(p, greedy, max_new_tokens, stop_at_eos=stop_at_eos, text=False) for p in prompts]
            results = [completion.tokens for completion in self.engine.results(requests)]
        return results if many else results[0]

    # ---- text -------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> str | list[str]:
        """The continuation of prompt (without it); for a list of prompts, a list of
        continuations decoded together, none depending on the others: greedy, each is what its
        prompt gives alone; with a seed, prompt i samples from a generator derived from seed
        and i (so the first is what generate(prompt, seed=seed) gives). temperature=0 is
        greedy; top_k=0 and top_p=1 switch those filters off. Ends at EOS, max_new_tokens, a
        full context, or just before the first stop string."""
        from .generate import generate_many
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p,
                                       repetition_penalty, seed, stop))
        # a mapping's or a set's order is no list's (a dict would give its keys)
        prompts = list(prompt) if isinstance(prompt, Iterable) and not isinstance(prompt, (Mapping, Set)) else None
        if prompts is None or not all(isinstance(p, str) for p in prompts):
            raise NeocoreError(f"prompt must be a string or a list of strings, got {shown(prompt)}")
        return generate_many(self, prompts, max_new_tokens, temperature, top_k, top_p,
                             repetition_penalty, seed, stop)

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8,
               top_k: int = 40, top_p: float = 0.95, repetition_penalty: float = 1.0,
               seed: int | None = None, stop: Sequence[str] = ()) -> Iterator[str]:
        """Like generate, as an iterator of text chunks while they are produced (whole
        characters only). Arguments are checked before the first chunk is asked for; the
        request runs from this call, and is cancelled when the iterator is closed or dropped."""
        from .generate import stream
        return stream(self, prompt, max_new_tokens, temperature, top_k, top_p,
                      repetition_penalty, seed, stop)

    def score(self, text: str, stride: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> Any:
        """Per-token log-probabilities and perplexity of text (see neocore.generate.score)."""
        from .generate import score
        return score(self, text, stride, progress)


def _find_tokenizer(folder: Path, vocab_size: int) -> Any:
    """The folder's own tokenizer files, else the bundled GPT-2 one when the model's
    vocabulary holds all its ids (every GPT-Neo model's does), else None."""
    from .tokenizer import GPT2_VOCAB_SIZE, Tokenizer
    if Tokenizer.files_present(folder):
        return Tokenizer.from_dir(folder)
    return Tokenizer.gpt2() if vocab_size >= GPT2_VOCAB_SIZE else None


def resolve_config(folder: Path, checkpoint: Checkpoint, config: str | os.PathLike | None,
                   overrides: dict[str, Any]) -> GPTNeoConfig:
    """config= if given, else the folder's config.json, else the shape the format implies; the
    end-of-text ids of the folder's generation_config.json, as transformers' generate takes
    them, unless overrides name eos_token_id."""
    if config is None and checkpoint.config is not None and not (folder / "config.json").is_file():
        cfg = GPTNeoConfig.from_dict(checkpoint.config, f"{folder} (shape inferred from its files)", overrides)
    else:
        cfg = GPTNeoConfig.from_file(Path(config) if config else folder / "config.json", overrides)
    eos = None if "eos_token_id" in overrides else generation_eos_ids(folder)
    return cfg if eos is None else replace(cfg, eos_token_ids=eos)


MAX_THREADS = 1024  # OpenMP threads one model may use (the C side takes an int)


def default_dtype(checkpoint: Checkpoint) -> str:
    """The weight format a folder loads in unless told: int8 where it holds int8, else bf16."""
    return "int8" if holds_int8(checkpoint) else "bfloat16"


def load(path: str | os.PathLike, dtype: str | None = None, threads: int | None = None,
         context: int | None = None, isa: str | None = None, config: str | os.PathLike | None = None,
         progress: Callable[[int, int], None] | None = None, compute: str | None = None,
         huge_pages: bool | None = None, **overrides: Any) -> Model:
    """Loads a GPT-Neo model folder (config.json plus weights).

    dtype: 'bfloat16' (lossless for the published checkpoints), 'float32', or 'int8' (one
    scale per block of a row; about half bfloat16's memory, the only dtype a `neocore convert
    --dtype int8` folder loads in). Default: 'int8' for such a folder, else 'bfloat16'.
    threads: OpenMP threads (default: every usable core). context: positions to allocate the
    key/value cache for (default: max_position_embeddings). isa: 'amx', 'avx512bf16', 'avx512',
    'avx2' or 'generic' (default: $NEOCORE_ISA, else the fastest this CPU runs). config: a
    config.json to use instead of the folder's. progress(done, total) is called while weights
    load. compute: 'exact' (default; fp32 activations, logits as transformers fp32 gives them)
    or 'bf16' (prompt matmuls take their activations rounded to bf16, on AMX or AVX512-BF16,
    and so do decoded tokens' where that is faster (AMD Zen 4); keys and values are rounded
    to bf16 too, and the cache holds them in half the memory; LayerNorm, softmax, gelu,
    residuals and queries stay fp32; on CPUs with neither it computes exactly and says so
    once). huge_pages: where the kernel offers transparent huge pages (Linux), decode
    streams weights in 2 MiB pages faster than in 4 KiB ones (125M on AMD Zen 4: up to 1.4x).
    None (default) maps the file asking for them, and copies the matrices that the file holds
    in the load's dtype (a converted folder's) into them at load if the page cache holds the
    file in small pages and those matrices are at most 512 MiB (125M; larger ones gain less
    and their copy costs seconds); True copies whatever the size (unless the file is found in
    huge pages already); False uses the mapped file as it is (the fastest load, one copy
    shared by every process that maps it). Other keywords override config fields (e.g.
    window_size=24)."""
    start = time.perf_counter()
    if huge_pages is not None and not isinstance(huge_pages, (bool, np.bool_)):
        raise NeocoreError(f"huge_pages must be None, True or False, got {shown(huge_pages)}")
    from .resolve import resolve_model
    folder = resolve_model(path)
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise NeocoreError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {shown(dtype)}")
    checkpoint = open_checkpoint(folder)
    if dtype is None:
        dtype = default_dtype(checkpoint)
    cfg = resolve_config(folder, checkpoint, config, overrides)
    context = cfg.max_position_embeddings if context is None else context
    if not is_integer(context) or not 1 <= context <= cfg.max_position_embeddings:
        raise ConfigError(f"context must be an integer between 1 and {cfg.max_position_embeddings}, got {shown(context)}")
    threads = usable_cores() if threads is None else threads
    if not is_integer(threads) or not 1 <= threads <= MAX_THREADS:
        raise NeocoreError(f"threads must be an integer between 1 and {MAX_THREADS}, got {shown(threads)}")
    context, threads = int(context), int(threads)  # numpy integers too
    if not _core.built_with_openmp():
        threads = 1
    chosen_isa = kernel_path(isa)
    chosen_compute = compute_mode(compute, chosen_isa)
    loader = WeightLoader(checkpoint, cfg, dtype, threads, None if huge_pages is None else bool(huge_pages))
    weights = loader.load_all(progress)
    tokenizer = _find_tokenizer(folder, cfg.vocab_size)
    model = Model(folder, cfg, weights, dtype, threads, context, chosen_isa, chosen_compute,
                  tokenizer, time.perf_counter() - start)
    model.matrices_in_place = loader.in_place
    model.weight_pages = loader.pages
    return model
