"""python -m neocore / neocore: generate, chat, score, info (and bench, convert).

Every error reaches the user as one line on stderr and a non-zero exit status; --debug
shows the traceback instead."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence, TextIO

from .errors import NeocoreError
from .sampling import SamplingParams, check_seed

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

DEFAULT_MODEL = "EleutherAI/gpt-neo-125M"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message: str):
        self.exit(2, f"neocore: error: {message} (see --help)\n")


class Progress:
    """A bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None):
        self.label = label
        self.stream = stream or sys.stderr  # the stderr of now, not of when this module was imported
        self.enabled = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(total, 1)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\r" + " " * (len(self.label) + width + 24) + "\r")
        self.stream.flush()


HUGE_PAGES = {"auto": None, "yes": True, "no": False}  # --huge-pages: neocore.load's huge_pages


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help=f"model folder or Hugging Face repo id (default: $NEOCORE_MODEL, else {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "int8"], default=None,
                   help="weight precision (int8: blocks with a scale each, half the memory; default: int8 for a "
                        "converted int8 folder, else bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    p.add_argument("--compute", choices=["exact", "bf16"], default=None,
                   help="exact (default: fp32 activations) or bf16 (matmul activations in bf16 on AMX or "
                        "AVX512-BF16: faster prefill, 2-4x on AMX, 1.5x on Zen 4; decode too where measured faster)")
    p.add_argument("--context", type=int, default=None, help="positions to allocate (default: the model's)")
    p.add_argument("--huge-pages", choices=list(HUGE_PAGES), default="auto",
                   help="weights in 2 MiB pages, which decode streams faster: auto (default) asks the mapped file "
                        "for them and copies the matrices into them when the file is cached in small pages and "
                        "the matrices are at most 512 MiB; yes copies whatever the size (unless the file is in "
                        "huge pages already); no uses the mapped file as it is (fastest load, one copy shared by "
                        "processes)")
    _config_args(p)


def _config_args(p: argparse.ArgumentParser) -> None:
    """What every command that reads a model takes: its config, overrides, tracebacks."""
    p.add_argument("--config", default=None, help="a config.json to use instead of the model's")
    p.add_argument("--num-heads", type=int, default=None, help="override the config's num_heads")
    p.add_argument("--window-size", type=int, default=None, help="override the config's window_size")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    d = SamplingParams()
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"0 = greedy (default {d.temperature:g})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off (default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default {d.top_p:g})")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"1 = off (default {d.repetition_penalty:g})")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same text)")
    p.add_argument("--stop", action="append", default=[], help="stop before this text (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="neocore", description="Run EleutherAI GPT-Neo models on the CPU.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    _model_args(g)
    g.add_argument("prompt", nargs="?", help="the prompt (else -f, else standard input)")
    g.add_argument("-f", "--file", help="read the prompt from this file ('-' for standard input)")
    _sampling_args(g, max_tokens=128)
    g.add_argument("--stats", action="store_true", help="print load time and tokens/s to stderr")

    c = sub.add_parser("chat", help="talk with the model, line by line")
    _model_args(c)
    _sampling_args(c, max_tokens=200)

    s = sub.add_parser("score", help="perplexity of a text file")
    _model_args(s)
    s.add_argument("file", help="text file ('-' for standard input)")
    s.add_argument("--stride", type=int, default=None, help="window advance for long texts (default: context/2)")

    i = sub.add_parser("info", help="the model's config, size, and how it will run")
    _model_args(i)

    v = sub.add_parser("convert", help="write a bfloat16 (or int8) safetensors folder that loads instantly")
    v.add_argument("src", help="model folder in any supported format")
    v.add_argument("dst", help="folder to write")
    v.add_argument("--dtype", choices=["bfloat16", "int8"], default="bfloat16",
                   help="matrix storage (int8 folders load only in neocore, not in transformers)")
    v.add_argument("--tokenizer", help="folder with the tokenizer files (default: SRC's)")
    _config_args(v)

    r = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs neocore[server])")
    _model_args(r)
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    r.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    r.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default: %(default)s)")
    r.add_argument("--max-queue", type=int, default=64,
                   help="sequences that may wait (a request counts prompts x n); more get 429 (default: %(default)s)")
    r.add_argument("--api-key", default=os.environ.get("NEOCORE_API_KEY") or None,  # set but empty: none
                   help="require 'Authorization: Bearer KEY' (default: $NEOCORE_API_KEY, else none)")
    r.add_argument("--name", default=None, help="the model name clients use (default: the folder's name)")
    r.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (scheme://host[:port]) call the API, as CORS allows; "
                        "repeat for more, '*' for any (default: none)")
    r.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish on SIGTERM (default: %(default)s)")
    r.add_argument("--ray-replicas", type=int, default=0, metavar="N",
                   help="serve from N Ray Serve replicas of --threads threads each (needs neocore[ray]; "
                        "joins the Ray cluster at $RAY_ADDRESS, else the one `ray start` began here, "
                        "else starts Ray here)")

    b = sub.add_parser("bench", help="measure speed and memory (see BENCHMARKS.md)")
    from .bench import add_arguments as bench_arguments
    bench_arguments(b)
    b.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("num_heads", args.num_heads), ("window_size", args.window_size)) if v is not None}


def model_spec(args: argparse.Namespace) -> str:
    if args.model == "":  # Path("") would be the current folder
        raise NeocoreError("-m/--model is empty: give a model folder or a repo id")
    return args.model or os.environ.get("NEOCORE_MODEL") or DEFAULT_MODEL


def load_model(args: argparse.Namespace):
    from .model import load
    overrides = _overrides(args)
    spec = model_spec(args)
    return load(spec, dtype=args.dtype, threads=args.threads, context=args.context,
                config=args.config, progress=Progress("loading"), compute=args.compute,
                huge_pages=HUGE_PAGES[args.huge_pages], **overrides)


TEXT_LIMIT = 64 << 20  # characters read from a file or standard input at most (/dev/zero ends)


def _stdin():
    if sys.stdin is None:
        raise NeocoreError("standard input is closed")
    # UTF-8 whatever the locale says, as files are read; a byte that is not UTF-8 reaches the
    # tokenizer, whose error names it, as under the C.UTF-8 locale (a strict decoder would raise
    # inside readline). Possible only before the first read: later calls (or a stream already
    # read by a caller) leave it as it is.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")
    return sys.stdin


def _input_name(path: str) -> str:
    """How a message names a text input: '-' is standard input."""
    return "standard input" if path == "-" else path or "''"


def _read_text(path: str, what: str) -> str:
    name = _input_name(path)
    try:
        if path == "-":
            text = _stdin().read(TEXT_LIMIT + 1)
        else:
            # newline="": the text as the file holds it (CRLF too), as standard input gives it
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read(TEXT_LIMIT + 1)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise NeocoreError(f"{name}: cannot read the {what} ({reason})") from None
    if len(text) > TEXT_LIMIT:
        raise NeocoreError(f"{name}: the {what} is longer than {TEXT_LIMIT >> 20} Mi characters")
    return text.removeprefix("\ufeff")  # a byte-order mark (Windows editors write one) is not text


def _piped_line() -> str:
    """The next line of piped standard input, without its newline, TEXT_LIMIT characters at most:
    input() would read /dev/zero until memory ran out."""
    line = _stdin().readline(TEXT_LIMIT + 1)
    if not line:
        raise EOFError
    if len(line) > TEXT_LIMIT:
        raise NeocoreError(f"standard input: a line longer than {TEXT_LIMIT >> 20} Mi characters")
    return line.rstrip("\n").removeprefix("\ufeff")  # a byte-order mark, as _read_text drops it


def _sampling(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags and the seed, checked (before the slow load)."""
    if args.max_tokens < 0:
        raise NeocoreError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    check_seed(args.seed)
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenerationStats, stream
    params = _sampling(args)
    if args.prompt is not None and args.file is not None:
        raise NeocoreError("give the prompt as an argument or with -f, not both")
    if args.prompt is not None:
        prompt = args.prompt
    elif args.file is not None:  # -f "" is a file name that does not exist, not "no -f"
        prompt = _read_text(args.file, "prompt file")
    elif not _stdin().isatty():
        prompt = _read_text("-", "prompt")
    else:
        raise NeocoreError("no prompt: give it as an argument, with -f FILE, or on standard input")
    model = load_model(args)
    stats = GenerationStats()
    out = sys.stdout
    for chunk in stream(model, prompt, args.max_tokens, **asdict(params), seed=args.seed, stop=args.stop,
                        stats=stats):
        out.write(chunk)
        out.flush()
    out.write("\n")
    out.flush()
    if args.stats:
        print(f"load: {model.load_seconds:.2f} s; {stats.summary()}", file=sys.stderr)
    return 0


def _fitted(tokenizer: Tokenizer, messages: list[dict[str, str]], budget: int,
            max_tokens: int) -> tuple[list[dict[str, str]], list[int]]:
    """The messages whose transcript fits in budget tokens, the oldest exchanges dropped first,
    and the transcript's tokens; ContextError when the last message alone does not fit."""
    from . import chat
    from .errors import ContextError
    while True:
        ids = chat.encode(tokenizer, chat.transcript(messages))
        if len(ids) <= budget:
            return messages, ids
        if len(messages) == 1:
            raise ContextError(f"this message is {len(ids)} tokens long; the context has room for {budget} "
                               f"beside an answer of --max-tokens {max_tokens}")
        messages = messages[2:]  # a question and its answer


def cmd_chat(args: argparse.Namespace) -> int:
    """A running conversation, fed to the model as the server's chat route feeds it (chat.py);
    the cache is reused while it holds a prefix of the transcript's tokens, and the oldest
    exchanges are dropped once the context would overflow."""
    from . import chat
    from .errors import ContextError, TokenizerError
    from .generate import check_fits_as_text, stream_text, tokens_after
    from .sampling import Sampler
    params = _sampling(args)
    model = load_model(args)
    if model.tokenizer is None:
        raise NeocoreError(f"{model.path}: no tokenizer files")
    sampler = Sampler(params, args.seed, model.tokenizer.vocab_size)
    # transcript tokens that leave room for an answer: all but its last token are fed
    budget = model.context_length - max(args.max_tokens, 1) + 1
    if budget < 1:
        raise NeocoreError(f"--max-tokens {args.max_tokens} leaves no room for a message in the context of "
                           f"{model.context_length} positions")
    stops = chat.STOPS + args.stop
    interactive = _stdin().isatty()
    messages: list[dict[str, str]] = []
    cached: list[int] = []  # the tokens the model's cache holds
    if interactive:
        print("neocore chat: Ctrl-C stops an answer, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(f"{chat.USER} ") if interactive else _piped_line()
        except EOFError:
            if interactive:  # end the prompt's line
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            check_fits_as_text(model, line, "message")
            kept, ids = _fitted(model.tokenizer, [*messages, {"role": "user", "content": line}], budget,
                                args.max_tokens)
        except (ContextError, TokenizerError) as exc:  # this message is refused; the conversation goes on
            print(f"neocore: {exc}: not sent", file=sys.stderr)
            continue
        # Ctrl-C can land after a step has cached a token and before `cached` has it: the position
        # tells; and with nothing new to feed there would be no logits to answer from
        if not (model.position == len(cached) < len(ids) and cached == ids[:len(cached)]):
            model.reset()
            cached = []
        answer = []
        sys.stdout.write(f"{chat.MODEL} " if interactive else "")
        try:
            tokens = tokens_after(model, cached, ids[len(cached):], sampler, args.max_tokens)
            for chunk in chat.stripped(stream_text(model, tokens, stops)):
                answer.append(chunk)
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages = [*kept, {"role": "assistant", "content": "".join(answer)}]


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise NeocoreError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_queue < 0:
        raise NeocoreError(f"--max-queue must be >= 0, got {args.max_queue}")
    from .engine import Engine
    largest = Engine.largest_batch()
    if not 1 <= args.max_batch <= largest:  # before the slow load
        raise NeocoreError(f"--max-batch must be between 1 and {largest}, got {args.max_batch}")
    if args.ray_replicas < 0:
        raise NeocoreError(f"--ray-replicas must be >= 0, got {args.ray_replicas}")
    # before the slow load: says at once when the extra is missing
    from .server import check_api_key, check_can_listen, check_origins, serve, served_name
    check_api_key(args.api_key)
    check_origins(args.allow_origin)
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise NeocoreError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    if args.ray_replicas:  # Serve binds the port, with Ray's proxies (perhaps on other nodes): run checks it
        if args.threads is not None and args.threads < 1:  # named as the command line names it
            raise NeocoreError(f"--threads must be >= 1, got {args.threads}")
        from .ray import run  # replicas load the model themselves: this process never does
        run(model_spec(args), args.ray_replicas, args.threads, args.host, args.port, max_batch=args.max_batch,
            max_queue=args.max_queue, api_key=args.api_key, name=args.name, shutdown_timeout=args.shutdown_timeout,
            allow_origins=args.allow_origin,
            dtype=args.dtype, context=args.context, config=args.config, compute=args.compute,
            huge_pages=HUGE_PAGES[args.huge_pages], **_overrides(args))
        return 0
    check_can_listen(args.host, args.port)  # before the load: uvicorn would only find out after it
    model = load_model(args)
    serve(model, args.host, args.port, args.max_batch, args.max_queue, args.api_key,
          args.name or served_name(model_spec(args)), args.shutdown_timeout, args.allow_origin)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    text = _read_text(args.file, "text file")
    if not text:  # before the load, and naming the file
        raise NeocoreError(f"{_input_name(args.file)}: the text is empty: nothing to score")
    if args.stride is not None and args.stride < 1:  # the upper bound needs the model's context
        raise NeocoreError(f"--stride must be >= 1, got {args.stride}")
    model = load_model(args)
    result = model.score(text, stride=args.stride, progress=Progress("scoring"))
    print(f"perplexity: {result.perplexity:.4f} ({len(result.tokens)} tokens, "
          f"mean log-prob {result.logprobs.mean():.4f}, window {model.context_length}, stride {result.stride})")
    return 0


BF16_GEMM_NAMES = {"amx": "AMX tiles", "avx512bf16": "AVX512-BF16", "scalar": "the scalar reference"}


def cmd_info(args: argparse.Namespace) -> int:
    from . import _core
    from .checkpoint import open_checkpoint
    from .model import decode_prefetch
    from .weights import INT8_NOT_TRANSFORMERS, holds_int8
    model = load_model(args)
    int8_file = holds_int8(open_checkpoint(model.path))
    c = model.config
    kinds = ", ".join(f"{k} x{c.attention_layers.count(k)}" for k in ("global", "local"))
    rows = [
        ("model", str(model.path)),
        ("hidden size", c.hidden_size), ("layers", f"{c.num_layers} ({kinds})"),
        ("heads", f"{c.num_heads} x {c.head_dim}"), ("MLP size", c.intermediate_size),
        ("vocabulary", c.vocab_size), ("positions", c.max_position_embeddings),
        ("local window", c.window_size), ("layer norm eps", c.layer_norm_epsilon),
        ("parameters", f"{c.num_parameters():,}"),
        ("weight dtype", model.dtype),
        *([("weight file", INT8_NOT_TRANSFORMERS)] if int8_file else []),
        ("weight memory", f"{model.weight_bytes() / 2**20:.1f} MiB"),
        ("weight pages", model.weight_pages),
        ("context", model.context_length),
        ("key/value cache", f"{model.cache_dtype}, {model.cache_bytes(1) / 1024:g} KiB a token, "
                            f"{model.cache_bytes(model.context_length) / 2**20:.1f} MiB a full sequence "
                            "(taken as positions are written, a page of each head at a time)"),
        ("kernel path", f"{model.isa} (this CPU runs {', '.join(_core.usable_isas()[:-1])})"),
        ("decode kernel", "bf16 (the compute mode's)" if model.compute == "bf16" and _core.bf16_decodes(model.isa)
         else f"{_core.decode_kernel(model.isa, model.dtype)} (tuned for {_core.cpu_kind()})"),
        ("decode prefetch", f"{decode_prefetch(model.isa, model.dtype, c, model.compute)} (one sequence; tuned for {_core.cpu_kind()})"),
        ("attention fetch", f"{_core.attention_fetch(model.isa)} (decode rows; tuned for {_core.cpu_kind()})"),
        ("compute", "exact (fp32 activations)" if model.compute == "exact" else
         f"bf16 (matmuls in bf16: prompts on {BF16_GEMM_NAMES[model.isa]}, decode on "
         f"{'the scalar reference' if model.isa == 'scalar' else 'AVX512-BF16'})"
         if _core.bf16_decodes(model.isa) else
         f"bf16 (prompt matmuls in bf16 on {BF16_GEMM_NAMES[model.isa]}; decode's matmuls exact, "
         "faster on this CPU; keys and values in bf16)"),
        ("threads", model.threads if _core.built_with_openmp() else f"{model.threads} (built without OpenMP)"),
        ("tokenizer", "none found" if model.tokenizer is None else
         "bundled GPT-2 (the model folder has none)" if model.tokenizer.bundled else model.tokenizer.source),
        ("load time", f"{model.load_seconds:.2f} s"),
    ]
    for key, value in rows:
        print(f"{key + ':':16} {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    start = time.perf_counter()
    dst = convert(args.src, args.dst, tokenizer=args.tokenizer, config=args.config,
                  progress=Progress("converting"), dtype=args.dtype, **_overrides(args))
    from .checkpoint import NEOCORE_INT8_FILE
    weights = dst / (NEOCORE_INT8_FILE if args.dtype == "int8" else "model.safetensors")
    print(f"wrote {dst} ({weights.stat().st_size / 2**20:.1f} MiB of {args.dtype} weights) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "chat": cmd_chat, "score": cmd_score, "info": cmd_info,
            "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if sys.stdout is None:  # started with standard output closed: nowhere for a result to go
        print("neocore: error: standard output is closed", file=sys.stderr)
        return 1
    with cli_warnings(), sigterm_unwinds():
        try:
            if args.command == "bench":
                from .bench import run as bench_run
                return bench_run(args)
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:
            return 1
        except Exception as exc:  # every failure is one line unless --debug asks for more
            if args.debug:
                raise
            kind = "" if isinstance(exc, NeocoreError) else f"{type(exc).__name__}: "
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"neocore: error: {kind}{message}", file=sys.stderr)
            return 1


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While a command runs, SIGTERM ends it by unwinding, as Ctrl-C does (exit status 143), so
    that what it was writing is removed (convert's partial weights) rather than left behind;
    the previous handler is put back after. Python's signal handlers live in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def cli_warnings() -> Iterator[None]:
    """While a command runs, the library's warnings are lines like the CLI's own; the logger is
    put back after (main may run inside a larger program, or a test)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("neocore: warning: %(message)s"))
    log = logging.getLogger("neocore")
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


if __name__ == "__main__":
    sys.exit(main())
