"""`neocore serve`: the OpenAI HTTP API (completions, chat completions, models) over the engine,
with health and Prometheus metrics. As in vLLM's split, this layer only validates, queues and
streams; the engine's loop owns the model. Every error a client can cause is answered with
OpenAI's error object and a 4xx status, and the server keeps serving.

build_app(served) makes the FastAPI app; its routes find the model through app.state.served, so
the same app serves one process (serve()) and each Ray Serve replica (neocore.ray)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from . import chat
from .engine import Chunk, Engine, Request, Stream, TokenLogprob
from .errors import ContextError, EngineClosedError, NeocoreError, QueueFullError, TokenizerError, shown
from .generate import prompt_ids
from .sampling import SCALE_LIMIT, SamplingParams, token_array
from .tokenizer import StreamDecoder, Tokenizer

try:
    import uvicorn
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise NeocoreError('the server needs FastAPI and uvicorn: pip install "neocore[server]"') from exc

MAX_N = 16          # completions one request may ask for per prompt
MAX_STOPS = 4       # as OpenAI
MAX_STOP_CHARS = 1024  # per stop string: as much text may be held back, and is searched at each token
MAX_BODY_BYTES = 4 * 2 ** 20  # a request body past this is refused (413) rather than held in memory
DISCONNECT_POLL_SECONDS = 0.1
# fields of OpenAI's API and vLLM's extensions to it that neocore does not do, each with the
# value that asks for nothing (refused otherwise: _refuse_unsupported)
UNSUPPORTED_SAMPLING = {
    "logit_bias": {}, "min_p": 0.0, "min_tokens": 0.0, "ignore_eos": False, "stop_token_ids": [],
    "include_stop_str_in_output": False, "bad_words": [], "logits_processors": [],
    "use_beam_search": False, "length_penalty": 1.0,
    # constraints (or a changed prompt) whatever their value: only null asks for nothing
    "allowed_token_ids": None, "guided_json": None, "guided_regex": None, "guided_choice": None,
    "guided_grammar": None, "structured_outputs": None, "truncate_prompt_tokens": None, "prompt_logprobs": None,
}
# how long past --shutdown-timeout uvicorn waits: time for the requests the engine then
# cancels to send their 503 or error event, before uvicorn cancels their tasks outright
SHUTDOWN_GRACE_SECONDS = 5.0


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def check_api_key(key: str | None) -> None:
    """A key clients can send: HTTP header values are ASCII (Starlette reads them as Latin-1, so
    a non-ASCII key could match no client's UTF-8 header), and an empty key would let in any
    client that sends 'Bearer' alone."""
    if key is None:
        return
    if not key or not key.isascii() or not key.isprintable() or key != key.strip():
        raise NeocoreError("the API key (--api-key, $NEOCORE_API_KEY) must be printable ASCII, not empty, "
                           "without leading or trailing spaces: it travels in an HTTP header")


def served_name(spec: str | os.PathLike) -> str:
    """The name a server gives the model named spec: its folder's as named (a link's, not its
    target's), the last part of a hub id (whose folder is a snapshot named by a commit hash),
    the current folder's for '.'."""
    path = Path(spec)
    with contextlib.suppress(RuntimeError):  # ~user of no user: the load says so
        path = path.expanduser()
    return Path(os.path.abspath(path)).name


def check_can_listen(host: str, port: int) -> None:
    """A NeocoreError unless this machine can listen on host:port now, bound as uvicorn (and
    Ray Serve's proxy) binds it; another process may still take the port before they do."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise NeocoreError(f"--host {host!r} is not an address this machine can listen on ({exc})") from None
    try:
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise NeocoreError(f"cannot listen on {host} port {port} ({exc.strerror or exc})") from None


_ORIGIN = re.compile(r"https?://[^/\s]+")


def check_origins(origins: Sequence[str]) -> tuple[str, ...]:
    """Origins whose web pages may call the API (CORS): '*' for any, else each as a browser
    sends it, scheme://host[:port] with no path (a trailing slash would match no request)."""
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise NeocoreError(f"--allow-origin {origin!r}: give '*' or scheme://host[:port], "
                               f"as a browser sends it, e.g. http://localhost:3000")
    return tuple(origins)


@dataclass
class Served:
    """What the routes serve: a model, its engine, the name clients use, and who may ask
    (with a key; from web pages of allow_origins)."""
    model: Any
    engine: Engine
    name: str
    api_key: str | None = None
    replica: str | None = None   # named in an x-neocore-replica header when set
    allow_origins: tuple[str, ...] = ()
    rejected: int = 0            # sequences refused because the queue was full (as the engine counts them)
    max_body_bytes: int = MAX_BODY_BYTES  # a larger request body is refused with a 413

    def __post_init__(self) -> None:
        check_api_key(self.api_key)
        self.allow_origins = check_origins(self.allow_origins)


# ---- reading a request ------------------------------------------------------------------------
_KIND_NAMES = {(bool,): "true or false", (int,): "an integer", (int, float): "a number", (str,): "a string"}


def _field(body: dict, name: str, kinds: tuple, default: Any, check=None, rule: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if kinds == (int,) and isinstance(value, float) and value.is_integer():
        value = int(value)  # 2.0 for 2, as vLLM's lax schema takes it (a client's computed max_tokens)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {rule or _KIND_NAMES[kinds]}", name)
    if float in kinds:
        try:
            value = float(value)  # one type to check and use
        except OverflowError:  # an integer past float's range
            raise ApiError(400, f"'{name}' must be {rule or _KIND_NAMES[kinds]}", name) from None
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {rule}", name)
    return value


def _sampling(body: dict) -> tuple[SamplingParams, int, int | None, list[str]]:
    """Sampling parameters, n, seed and stop strings, checked."""
    number = (int, float)
    # the comparisons refuse NaN and infinity too (Python's json reads NaN and Infinity)
    temperature = _field(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "a number between 0 and 2")
    top_p = _field(body, "top_p", number, 1.0, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    # -1 is vLLM's "no top-k" (long its default), as 0 is neocore's
    top_k = max(_field(body, "top_k", (int,), 0, lambda v: v >= -1, "an integer >= -1 (-1 or 0: no top-k)"), 0)
    penalty = _field(body, "repetition_penalty", number, 1.0, lambda v: 1 / SCALE_LIMIT <= v <= SCALE_LIMIT,
                     f"a number from {1 / SCALE_LIMIT:g} to {SCALE_LIMIT:g}")
    n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= MAX_N, f"an integer between 1 and {MAX_N}")
    # any 64-bit signed integer, as vLLM takes; numpy's generators take [0, 2**63)
    seed = _field(body, "seed", (int,), None, lambda v: -2 ** 63 <= v < 2 ** 63, "an integer in [-2**63, 2**63)")
    seed = None if seed is None else seed % 2 ** 63
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS \
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings, each of at most "
                            f"{MAX_STOP_CHARS} characters", "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, number, 0, None) != 0:
            raise ApiError(400, f"'{name}' is not supported; use 'repetition_penalty'", name)
    _refuse_unsupported(body, UNSUPPORTED_SAMPLING)
    response_format = body.get("response_format")  # vLLM takes it for completions too
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported", "response_format")
    return SamplingParams(temperature, top_k, top_p, penalty), n, seed, stops


def _refuse_unsupported(body: dict, fields: dict[str, Any]) -> None:
    """A 400 for a field this server does not do, unless it is null or at the value that asks
    for nothing: what would constrain or steer the output is refused, never ignored."""
    for name, nothing in fields.items():
        value = body.get(name)
        number = isinstance(nothing, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not ((number or type(value) is type(nothing)) and value == nothing):
            raise ApiError(400, f"'{name}' is not supported by this server", name)


def _check_room(served: Served, prompts: list[list[int]], max_tokens: int, param: str) -> None:
    """A 400 where a max_tokens the client gave cannot follow its longest prompt in the context
    (as OpenAI and vLLM refuse it) rather than a completion cut short; a full context still
    yields one token, which is never fed."""
    context, longest = served.model.context_length, max(len(ids) for ids in prompts)
    room = context - longest + 1
    if max_tokens > room:
        raise ApiError(400, f"'{param}' is too large: {shown(max_tokens)}; the context holds {context} tokens and "
                            f"the prompt takes {longest}, which leaves room for {room} new ones",
                       param, "context_length_exceeded")


def _streaming(body: dict) -> tuple[bool, bool]:
    """Whether to stream, and whether a stream ends with a usage chunk (stream_options)."""
    stream = _field(body, "stream", (bool,), False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    return stream, bool(include_usage)


def _encode(served: Served, text: str, param: str, allow_special: bool = True, what: str = "") -> list[int]:
    """The token ids of text (prompt_ids: more tokens than the context holds refused, text too
    long refused before it is tokenized), its errors as the client's, naming param (and the
    text as what)."""
    try:
        return prompt_ids(served.model, text, what or param, allow_special)
    except ContextError as exc:
        raise ApiError(400, str(exc), param, "context_length_exceeded") from None
    except TokenizerError as exc:
        raise ApiError(400, str(exc), param) from None


def _prompts(served: Served, prompt: Any, n: int) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists; refused
    before any is encoded when the engine could never take n completions of each."""
    vocab = served.model.config.vocab_size

    def ids_of(item: Any) -> list[int]:
        if isinstance(item, str):
            return _encode(served, item, "prompt")
        if isinstance(item, list) and item:
            try:
                return token_array(item, vocab).tolist()
            except NeocoreError as exc:
                raise ApiError(400, f"'prompt': {exc}", "prompt") from None
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token id lists", "prompt")

    items = prompt if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt) else [prompt]
    _check_could_fit(served, len(items) * n, "n" if n > 1 else "prompt")
    return [ids_of(p) for p in items]


def _check_could_fit(served: Served, count: int, param: str) -> None:
    """A 400 for a request of more sequences than the engine runs and queues at once, which
    could never be served: found before any prompt is tokenized."""
    try:
        served.engine.check_count(count)
    except NeocoreError as exc:
        raise ApiError(400, str(exc), param) from None


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    """The request body, refused when its Content-Length says it is larger than limit bytes,
    or once more than limit bytes of it have come (whatever Content-Length said)."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # (uvicorn refuses a length past 64 bits itself)
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # gone before its body came: an answer nobody reads, not a traceback
        raise ApiError(400, "the client disconnected while sending its request") from None
    return b"".join(chunks)


async def _body(request: HttpRequest, served: Served) -> dict:
    try:
        body = json.loads(await _read_body(request, served.max_body_bytes))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except ValueError:  # the other ValueError json.loads raises: Python's limit on an int's digits
        raise ApiError(400, "the request body holds an integer with too many digits") from None
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    # any model name is taken (clients written for other servers send theirs), but only a name
    if not isinstance(body.get("model", ""), str):
        raise ApiError(400, "'model' must be a string", "model")
    return body


def _submit_all(served: Served, requests: list[Request]) -> list[Stream]:
    """Queues every request or none (the queue's limit applies to the whole set)."""
    try:
        return served.engine.submit_all(requests)
    except QueueFullError as exc:
        served.rejected += len(requests)
        raise ApiError(429, f"the server is busy ({exc}); try again shortly", code="queue_full",
                       kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    except EngineClosedError:
        raise ApiError(503, "the server is shutting down", kind="server_error") from None
    except ContextError as exc:
        raise ApiError(400, str(exc), "prompt", "context_length_exceeded") from None
    except NeocoreError as exc:
        raise ApiError(400, str(exc)) from None


async def _cancel_on_disconnect(http: HttpRequest, streams: list[Stream]) -> None:
    """Cancels the streams once the client has gone (a non-streamed answer nobody will read)."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)
    for stream in streams:
        stream.cancel()


async def _merged(streams: list[Stream]) -> AsyncIterator[tuple[int, Chunk]]:
    """Chunks of several streams as they come, each with its stream's index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        async for chunk in stream:
            await queue.put((index, chunk))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                index, chunk = await queue.get()
                yield index, chunk
                if chunk.finish_reason:
                    break
    finally:
        for stream in streams:
            stream.cancel()
        for task in tasks:
            task.cancel()


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


def _failure(chunk: Chunk) -> ApiError | None:
    """The error a chunk ends its request with, if any: a failed step, or a cancelled sequence,
    which a client still reading only meets when the server stops (the engine cancels what
    runs past the shutdown timeout; a client that left cancels its own, unread)."""
    if chunk.finish_reason == "error":
        return ApiError(500, f"generation failed: {chunk.error}", kind="server_error")
    if chunk.finish_reason == "cancelled":
        return ApiError(503, "the server shut down before this request finished", kind="server_error")
    return None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token's name in logprobs: its text, or, for a token that is part of a character (the
    first bytes of an emoji), its bytes as OpenAI writes them, "bytes:\\xf0\\x9f", so that no
    two tokens share a name (U+FFFD would stand for all of them)."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _top_with_chosen(tokenizer: Tokenizer, entry: TokenLogprob) -> dict[str, float]:
    """A legacy top_logprobs entry: the most likely tokens and, where it is not among them, the
    token chosen, so up to logprobs + 1 of them, as OpenAI's reference describes."""
    top = {_token_text(tokenizer, t): lp for t, lp in entry.top}
    top.setdefault(_token_text(tokenizer, entry.token), entry.logprob)
    return top


# ---- the two generation routes' shapes --------------------------------------------------------
class _Completions:
    """/v1/completions: choice i*n + j is the j-th completion of prompt i."""
    kind, chunk_kind, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, served: Served, body: dict):
        self.served = served
        self.params, self.n, self.seed, self.stops = _sampling(body)
        # 0 with echo and logprobs scores the prompt, as OpenAI's legacy completions did
        self.max_tokens = _field(body, "max_tokens", (int,), 16, lambda v: v >= 0, "an integer >= 0")
        if _field(body, "best_of", (int,), self.n) != self.n:
            raise ApiError(400, "'best_of' other than n is not supported", "best_of")
        self.echo = _field(body, "echo", (bool,), False)
        self.logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 5,
                               "an integer between 0 and 5")
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", "prompt")
        _refuse_unsupported(body, {"suffix": ""})
        self.prompts = _prompts(served, body["prompt"], self.n)
        if body.get("max_tokens") is not None:  # the default stops where the context does
            _check_room(served, self.prompts, self.max_tokens, "max_tokens")
        text_vocab = served.model.tokenizer.vocab_size
        if self.echo and any(t >= text_vocab for ids in self.prompts for t in ids):  # a padded vocabulary's
            raise ApiError(400, f"'echo' needs token ids the tokenizer has, in [0, {text_vocab})", "prompt")
        # per choice, across a stream's chunks: the text of its logprobs' tokens, and its length
        self.decoders: dict[int, StreamDecoder] = {}
        self.text_ends: dict[int, int] = {}

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)  # once each, whatever n

    def requests(self) -> list[Request]:
        return [Request(ids, self.params, self.max_tokens, self.seed, i * self.n + j, self.stops,
                        logprobs=self.logprobs, prompt_logprobs=self.echo and self.logprobs is not None)
                for i, ids in enumerate(self.prompts) for j in range(self.n)]

    def _prompt_text(self, index: int) -> str:
        return self.served.model.tokenizer.decode(self.prompts[index // self.n]) if self.echo else ""

    def _logprobs(self, index: int, prompt_entries: list[TokenLogprob], entries: list[TokenLogprob]) -> dict | None:
        """The legacy logprobs object; text_offset is where each token's text begins in the
        choice's text, in characters, across every chunk of a stream (a token that ends inside
        a character adds nothing until a later one completes it). The echoed prompt's text is
        decoded on its own, as the generated text is, so each gets a decoder of its own."""
        if self.logprobs is None:
            return None
        tokenizer = self.served.model.tokenizer
        offsets, at = [], self.text_ends.get(index, 0)

        def measure(decoder: StreamDecoder, some: list[TokenLogprob]) -> None:
            nonlocal at
            for e in some:
                offsets.append(at)
                at += len(decoder.add(e.token))

        if prompt_entries:
            prompt_decoder = tokenizer.stream_decoder()
            measure(prompt_decoder, prompt_entries)
            at += len(prompt_decoder.flush())  # a character the prompt leaves unfinished
        measure(self.decoders.setdefault(index, tokenizer.stream_decoder()), entries)
        self.text_ends[index] = at
        entries = prompt_entries + entries
        return {"tokens": [_token_text(tokenizer, e.token) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [_top_with_chosen(tokenizer, e) if e.logprob is not None else None for e in entries],
                "text_offset": offsets}

    def choice(self, index: int, text: str, entries: list[TokenLogprob], prompt_entries: list[TokenLogprob],
               finish: str | None, first: bool = True) -> dict:
        prefix = self._prompt_text(index) if first else ""
        logprobs = self._logprobs(index, prompt_entries if first else [], entries)
        return {"index": index, "text": prefix + text, "logprobs": logprobs, "finish_reason": finish}

    def stream_choice(self, index: int, chunk: Chunk, prompt_entries: list[TokenLogprob], first: bool) -> dict:
        return self.choice(index, chunk.text, chunk.logprobs, prompt_entries, chunk.finish_reason, first)


def _message_text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's list of parts ({"type": "text", "text": ...},
    joined); None for anything else (images and audio included)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


class _ChatCompletions:
    """/v1/chat/completions over the transcript format of `neocore chat`."""
    kind, chunk_kind, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, served: Served, body: dict):
        self.served = served
        self.params, self.n, self.seed, stops = _sampling(body)
        _check_could_fit(served, self.n, "n")
        self.stops = chat.STOPS + stops
        # both are checked; the newer name wins where both are given
        tokens = _field(body, "max_tokens", (int,), 128, lambda v: v >= 1, "an integer >= 1")
        self.max_tokens = _field(body, "max_completion_tokens", (int,), tokens, lambda v: v >= 1, "an integer >= 1")
        want = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "an integer between 0 and 20")
        if top and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        self.logprobs = top if want else None
        # what a client asks for that a plain text model cannot promise: refused, not ignored;
        # tools the client forbids the model to call ("none", as agent frameworks send them) are
        # no such promise
        for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
            if body.get(choice) not in (None, "none"):
                raise ApiError(400, f"'{choice}' other than 'none' is not supported", choice)
            if body.get(tools) and body.get(choice) != "none":
                raise ApiError(400, f"'{tools}' is not supported unless '{choice}' is 'none': this model "
                                    f"answers in plain text", tools)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        texts = []
        for i, m in enumerate(messages):
            assistant = isinstance(m, dict) and m.get("role") == "assistant"
            if assistant and m.get("tool_calls"):
                raise ApiError(400, f"messages[{i}] holds tool calls: tools are not supported", f"messages[{i}]")
            # OpenAI lets an assistant's content be null or absent (a message that held only tool calls)
            content = "" if assistant and m.get("content") is None else \
                _message_text(m.get("content")) if isinstance(m, dict) else None
            if content is None or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, f"messages[{i}] must have a role (system, developer, user or assistant) "
                                    f"and content: a string or a list of text parts", f"messages[{i}]")
            texts.append({"role": m["role"], "content": content})
        # the transcript's tokens as `neocore chat` feeds them (chat.encode): no special tokens
        self.prompt = _encode(served, chat.transcript(texts), "messages", allow_special=False, what="conversation")
        given = next((name for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None), None)
        if given:  # the default stops where the context does
            _check_room(served, [self.prompt], self.max_tokens, given)
        self.answers = [chat.Answer() for _ in range(self.n)]  # each streamed choice's, as it comes

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)  # once, whatever n

    def requests(self) -> list[Request]:
        return [Request(self.prompt, self.params, self.max_tokens, self.seed, j, self.stops, logprobs=self.logprobs)
                for j in range(self.n)]

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if self.logprobs is None:
            return None
        tokenizer = self.served.model.tokenizer

        def item(token: int, logprob: float) -> dict:
            # the token's own bytes: those of a token that is part of a character are no text's
            return {"token": _token_text(tokenizer, token), "logprob": logprob,
                    "bytes": list(tokenizer.token_bytes(token))}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def choice(self, index: int, text: str, entries: list[TokenLogprob], prompt_entries: list[TokenLogprob],
               finish: str | None) -> dict:
        message = {"role": "assistant", "content": text.strip()}  # as chat.Answer streams it
        return {"index": index, "message": message, "logprobs": self._logprobs(entries), "finish_reason": finish}

    def stream_choice(self, index: int, chunk: Chunk, prompt_entries: list[TokenLogprob], first: bool) -> dict:
        """A chunk's delta: its text as chat.Answer shows it (whitespace at either end of the
        answer left out, as in choice()); the first delta names the role."""
        text = self.answers[index].add(chunk.text)
        if first:
            delta = {"role": "assistant", "content": text}
        elif text or not chunk.finish_reason:
            delta = {"content": text}
        else:
            delta = {}  # a last chunk with nothing but its finish_reason
        return {"index": index, "delta": delta, "logprobs": self._logprobs(chunk.logprobs),
                "finish_reason": chunk.finish_reason}


async def _generate(http: HttpRequest, served: Served, shape: Any, stream: bool, include_usage: bool) -> Any:
    streams = _submit_all(served, shape.requests())
    meta = {"id": f"{shape.prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": served.name}
    if stream:
        return StreamingResponse(_events(shape, streams, meta, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _answer(http, shape, streams, meta)


async def _answer(http: HttpRequest, shape: Any, streams: list[Stream], meta: dict) -> JSONResponse:
    """The whole answer, once every stream has finished."""
    texts = [""] * len(streams)
    entries: list[list[TokenLogprob]] = [[] for _ in streams]
    finish: list[str | None] = [None] * len(streams)
    completion_tokens = 0
    watcher = asyncio.create_task(_cancel_on_disconnect(http, streams))
    try:
        async for index, chunk in _merged(streams):
            error = _failure(chunk)
            if error is not None:
                raise error
            texts[index] += chunk.text
            entries[index] += chunk.logprobs
            finish[index] = chunk.finish_reason
            completion_tokens += len(chunk.tokens)
    finally:
        watcher.cancel()
    choices = [shape.choice(i, texts[i], entries[i], streams[i].prompt_logprobs, finish[i])
               for i in range(len(streams))]
    return JSONResponse({**meta, "object": shape.kind, "choices": choices,
                         "usage": _usage(shape.prompt_tokens, completion_tokens)})


async def _events(shape: Any, streams: list[Stream], meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """The answer as server-sent events; with include_usage, as OpenAI's: every chunk has
    "usage": null, and a last one, with no choices, has the usage."""
    usage: dict[str, Any] = {"usage": None} if include_usage else {}
    first = [True] * len(streams)
    completion_tokens = 0
    async for index, chunk in _merged(streams):
        error = _failure(chunk)
        if error is not None:
            yield _sse(error.body())
            break
        completion_tokens += len(chunk.tokens)
        if not (chunk.text or chunk.finish_reason or chunk.logprobs):
            continue
        choice = shape.stream_choice(index, chunk, streams[index].prompt_logprobs, first[index])
        first[index] = False
        yield _sse({**meta, "object": shape.chunk_kind, "choices": [choice], **usage})
    else:
        if include_usage:
            yield _sse({**meta, "object": shape.chunk_kind, "choices": [],
                        "usage": _usage(shape.prompt_tokens, completion_tokens)})
    yield _sse("[DONE]")


# ---- the app ------------------------------------------------------------------------------------
def _metrics(served: Served) -> str:
    stats, engine = served.engine.stats, served.engine
    ttft = sorted(stats.first_token_seconds)  # the latest: quantiles describe recent traffic

    def quantile(q: float) -> float:
        return ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    lines = [
        ("neocore_requests_total", "counter", "Sequences accepted for generation (a request for n completions "
         "of each of its prompts counts n per prompt).", stats.requests),
        ("neocore_requests_finished_total", "counter", "Sequences finished (done, stopped, cancelled or failed).",
         stats.finished),
        ("neocore_requests_rejected_total", "counter", "Sequences refused because the queue was full (counted as "
         "neocore_requests_total counts them).", served.rejected),
        ("neocore_generated_tokens_total", "counter", "Tokens generated.", stats.tokens_generated),
        ("neocore_prompt_tokens_total", "counter", "Prompt tokens read.", stats.prompt_tokens),
        ("neocore_queue_depth", "gauge", "Sequences waiting for a place in the batch.", engine.queue_depth),
        ("neocore_active_sequences", "gauge", "Sequences in the running batch.", engine.active),
        ("neocore_generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.",
         stats.tokens_per_second()),
        ("neocore_engine_steps_total", "counter", "Engine steps run.", stats.steps),
        ("neocore_engine_forward_seconds_total", "counter", "Time in the C forward step.", stats.step_seconds),
        ("neocore_engine_python_seconds_total", "counter", "Time in the engine's own work (batching, "
         "sampling, text).", stats.python_seconds),
    ]
    out = []
    for name, kind, help_text, value in lines:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    out += ["# HELP neocore_time_to_first_token_seconds Time from a sequence's arrival to its first token "
            f"(quantiles over the latest {stats.first_token_seconds.maxlen}).",
            "# TYPE neocore_time_to_first_token_seconds summary"]
    out += [f'neocore_time_to_first_token_seconds{{quantile="{q}"}} {quantile(q)}' for q in (0.5, 0.95)]
    out += [f"neocore_time_to_first_token_seconds_sum {stats.first_token_seconds_total}",
            f"neocore_time_to_first_token_seconds_count {stats.first_tokens}"]
    return "\n".join(out) + "\n"


def _model_object(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "neocore"}


REPLICA_HEADER = "x-neocore-replica"


class _ReplicaHeader:
    """Names the serving replica (Ray Serve) in an x-neocore-replica header. Plain ASGI: a
    BaseHTTPMiddleware (@app.middleware) would hide a client's disconnect from the routes."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        served = getattr(scope["app"].state, "served", None) if scope["type"] == "http" else None
        if served is None or not served.replica:
            return await self.app(scope, receive, send)
        header = (REPLICA_HEADER.encode(), served.replica.encode())

        async def send_naming_the_replica(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)
        await self.app(scope, receive, send_naming_the_replica)


def build_app(served: Served) -> FastAPI:
    """The OpenAI-compatible app serving served."""
    # redirect_slashes off: a path with a trailing slash is an unknown route (404), not a redirect
    app = FastAPI(title="neocore", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.served = served

    def served_of(request: HttpRequest) -> Served:
        served: Served = request.app.state.served
        if served.api_key is not None and request.url.path.startswith("/v1/"):
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.encode(), served.api_key.encode()):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
        return served

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(NeocoreError)
    async def neocore_error(request: HttpRequest, exc: NeocoreError) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
        # as OpenAI names an unknown route: what was asked, in the message; no code
        return ApiError(exc.status_code, f"{exc.detail} ({request.method} {request.url.path})",
                        headers=exc.headers).response()  # a 405's Allow header among them

    app.add_middleware(_ReplicaHeader)
    if served.allow_origins:  # added last, so outermost: errors (401, 429) carry its headers too
        # a bearer key, not cookies: no credentials; any request header, as OpenAI's
        # clients send their own (x-stainless-*)
        app.add_middleware(CORSMiddleware, allow_origins=list(served.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After", REPLICA_HEADER])

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what many health checkers send
    async def health(request: HttpRequest) -> dict:
        served: Served = request.app.state.served
        return {"status": "ok", "model": served.name, "active": served.engine.active,
                "queued": served.engine.queue_depth}

    @app.get("/metrics")
    async def metrics(request: HttpRequest) -> PlainTextResponse:
        return PlainTextResponse(_metrics(request.app.state.served), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> dict:
        return {"object": "list", "data": [_model_object(served_of(request))]}

    @app.get("/v1/models/{model_id:path}")  # :path, as a --name may hold a slash
    async def model(request: HttpRequest, model_id: str) -> dict:
        served = served_of(request)
        if model_id != served.name:
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves '{served.name}'",
                           "model", "model_not_found")
        return _model_object(served)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        served = served_of(request)
        body = await _body(request, served)
        stream, include_usage = _streaming(body)
        # tokenizing a long prompt takes a while: off the event loop, which serves everyone
        shape = await asyncio.to_thread(_Completions, served, body)
        return await _generate(request, served, shape, stream, include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        served = served_of(request)
        body = await _body(request, served)
        stream, include_usage = _streaming(body)
        shape = await asyncio.to_thread(_ChatCompletions, served, body)
        return await _generate(request, served, shape, stream, include_usage)

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, which on shutdown also closes the engine: past the shutdown timeout
    the engine cancels what still runs, so each such request still ends with an error the
    client can read, before uvicorn's own, later deadline cancels the request's task."""

    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float,
                 banner: Callable[[str], str]):
        super().__init__(config)
        self.engine, self.shutdown_timeout, self.banner = engine, shutdown_timeout, banner

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:  # said once the port is bound: uvicorn exits itself when it cannot bind
            # the address bound, not the one asked for: port 0 is some free port
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
            print(self.banner(url), file=sys.stderr, flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        closing = asyncio.create_task(asyncio.to_thread(self.engine.close, self.shutdown_timeout))
        await super().shutdown(sockets)
        await closing


def serve(model: Any, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          max_queue: int | None = 64, api_key: str | None = None, name: str | None = None,
          shutdown_timeout: float = 30.0, allow_origins: Sequence[str] = ()) -> None:
    """Runs the server until SIGINT/SIGTERM: then it stops accepting, lets running requests
    finish (for at most shutdown_timeout seconds; those still running then get a 503, or an
    error event) and returns. allow_origins: web pages that may call it (check_origins)."""
    if model.tokenizer is None:
        raise NeocoreError(f"{model.path}: no tokenizer files: the server needs one")
    allow_origins = check_origins(allow_origins)  # before the engine starts
    engine = model.start_engine(max_batch, max_queue)
    app = build_app(Served(model, engine, name or model.path.name, api_key, allow_origins=allow_origins))
    def banner(url: str) -> str:
        return (f"neocore: serving {app.state.served.name} on {url} ({model.threads} threads, "
                f"up to {max_batch} sequences at once)")

    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_GRACE_SECONDS)
    server = _Server(config, engine, shutdown_timeout, banner)
    # uvicorn hands a caught SIGTERM back to the previous handler once it has shut down: make
    # that one a no-op, so a requested stop ends the process with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        engine.close(shutdown_timeout)
