"""`neocore serve`: the OpenAI HTTP API (completions, chat completions, models) over the engine,
with health and Prometheus metrics. As in vLLM's split, this layer only validates, queues and
streams; the engine's loop owns the model. Every error a client can cause is answered with
OpenAI's error object and a 4xx status, and the server keeps serving.

build_app() makes the FastAPI app; its routes find the model through app.state.served, so the
same app serves one process (serve()) and each Ray Serve replica (neocore.ray)."""
from __future__ import annotations

import asyncio
import json
import math
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from . import chat
from .engine import Chunk, Engine, Request, Stream, TokenLogprob
from .errors import ContextError, EngineClosedError, NeocoreError, QueueFullError, TokenizerError
from .generate import check_fits_as_text
from .sampling import SamplingParams

try:
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise NeocoreError('the server needs FastAPI and uvicorn: pip install "neocore[server]"') from exc

MAX_N = 16          # completions one request may ask for per prompt
MAX_STOPS = 4       # as OpenAI
DISCONNECT_POLL_SECONDS = 0.1


class ApiError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Served:
    """What the routes serve: a model, its engine, the name clients use, and who may ask."""
    model: Any
    engine: Engine
    name: str
    api_key: str | None = None
    replica: str | None = None   # named in an x-neocore-replica header when set
    rejected: int = 0            # requests refused because the queue was full


# ---- reading a request ------------------------------------------------------------------------
_KIND_NAMES = {(bool,): "true or false", (int,): "an integer", (int, float): "a number", (str,): "a string"}


def _field(body: dict, name: str, kinds: tuple, default: Any, check=None, rule: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {rule or _KIND_NAMES[kinds]}", name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {rule}", name)
    return value


def _sampling(body: dict) -> tuple[SamplingParams, int, int | None, list[str]]:
    """Sampling parameters, n, seed and stop strings, checked."""
    number = (int, float)
    temperature = _field(body, "temperature", number, 1.0, lambda v: math.isfinite(v) and 0 <= v <= 2,
                         "a number between 0 and 2")
    top_p = _field(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _field(body, "top_k", (int,), 0, lambda v: v >= 0, "an integer >= 0")
    penalty = _field(body, "repetition_penalty", number, 1.0, lambda v: math.isfinite(v) and v > 0,
                     "a number > 0")
    n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= MAX_N, f"an integer between 1 and {MAX_N}")
    seed = _field(body, "seed", (int,), None, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, number, 0, None) != 0:
            raise ApiError(400, f"'{name}' is not supported; use 'repetition_penalty'", name)
    if body.get("logit_bias"):
        raise ApiError(400, "'logit_bias' is not supported", "logit_bias")
    return SamplingParams(float(temperature), top_k, float(top_p), float(penalty)), n, seed, stops


def _encode(served: Served, text: str, param: str) -> list[int]:
    """The token ids of text. Text longer than the context could hold whatever its tokens (each
    token is at most longest_token bytes) is refused before it is tokenized."""
    model = served.model
    try:
        check_fits_as_text(model, text, param)
    except ContextError as exc:
        raise ApiError(400, str(exc), param, "context_length_exceeded") from None
    try:
        return model.tokenizer.encode(text)
    except TokenizerError as exc:
        raise ApiError(400, str(exc), param) from None


def _prompts(served: Served, prompt: Any) -> list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    tokenizer, vocab = served.model.tokenizer, served.model.config.vocab_size

    def ids_of(item: Any) -> list[int]:
        if isinstance(item, str):
            return _encode(served, item, "prompt") or [tokenizer.eos_id]
        if isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            if not all(0 <= t < vocab for t in item):
                raise ApiError(400, f"token ids must lie in [0, {vocab})", "prompt")
            return item
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token id lists", "prompt")

    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        return [ids_of(p) for p in prompt]
    return [ids_of(prompt)]


async def _body(request: HttpRequest) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _submit_all(served: Served, requests: list[Request]) -> list[Stream]:
    """Queues every request or none (the queue's limit applies to the whole set)."""
    try:
        return served.engine.submit_all(requests)
    except QueueFullError as exc:
        served.rejected += 1
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


def _check_error(chunk: Chunk) -> None:
    if chunk.finish_reason == "error":
        raise ApiError(500, f"generation failed: {chunk.error}", kind="server_error")


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
        if body.get("suffix"):
            raise ApiError(400, "'suffix' is not supported", "suffix")
        self.prompts = _prompts(served, body["prompt"])
        self.text_ends: dict[int, int] = {}  # per choice: length of the token texts sent so far

    def requests(self) -> list[Request]:
        return [Request(ids, self.params, self.max_tokens, self.seed, i * self.n + j, self.stops,
                        logprobs=self.logprobs, prompt_logprobs=self.echo and self.logprobs is not None)
                for i, ids in enumerate(self.prompts) for j in range(self.n)]

    def _prompt_text(self, index: int) -> str:
        return self.served.model.tokenizer.decode(self.prompts[index // self.n]) if self.echo else ""

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict | None:
        """The legacy logprobs object; text_offset counts from the start of the choice's text,
        across every chunk of a stream."""
        if self.logprobs is None:
            return None
        tokenizer = self.served.model.tokenizer
        tokens = [tokenizer.decode([e.token]) for e in entries]
        offsets, at = [], self.text_ends.get(index, 0)
        for text in tokens:
            offsets.append(at)
            at += len(text)
        self.text_ends[index] = at
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in e.top} if e.logprob is not None else None
                                 for e in entries],
                "text_offset": offsets}

    def choice(self, index: int, text: str, entries: list[TokenLogprob], prompt_entries: list[TokenLogprob],
               finish: str | None, first: bool) -> dict:
        prefix = self._prompt_text(index) if first else ""
        logprobs = self._logprobs(index, (prompt_entries if first else []) + entries)
        return {"index": index, "text": prefix + text, "logprobs": logprobs, "finish_reason": finish}


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
        self.stops = chat.STOPS + stops
        limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        self.max_tokens = _field(body, limit, (int,), 128, lambda v: v >= 1, "an integer >= 1")
        want = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "an integer between 0 and 20")
        self.logprobs = top if want else None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        texts = []
        for i, m in enumerate(messages):
            content = _message_text(m.get("content")) if isinstance(m, dict) else None
            if content is None or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, f"messages[{i}] must have a role (system, developer, user or assistant) "
                                    f"and content: a string or a list of text parts", f"messages[{i}]")
            texts.append({"role": m["role"], "content": content})
        self.prompt = _encode(served, chat.transcript(texts), "messages")

    def requests(self) -> list[Request]:
        return [Request(self.prompt, self.params, self.max_tokens, self.seed, j, self.stops, logprobs=self.logprobs)
                for j in range(self.n)]

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if self.logprobs is None:
            return None
        decode = self.served.model.tokenizer.decode

        def item(token: int, logprob: float) -> dict:
            text = decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def choice(self, index: int, text: str, entries: list[TokenLogprob], prompt_entries: list[TokenLogprob],
               finish: str | None, first: bool) -> dict:
        message = {"role": "assistant", "content": text.lstrip() if first else text}
        return {"index": index, "message": message, "logprobs": self._logprobs(entries), "finish_reason": finish}

    def delta(self, index: int, text: str, entries: list[TokenLogprob], finish: str | None, first: bool) -> dict:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
        if finish and not text:
            delta = {}
        return {"index": index, "delta": delta, "logprobs": self._logprobs(entries), "finish_reason": finish}


async def _generate(http: HttpRequest, served: Served, shape: Any, stream: bool) -> Any:
    streams = _submit_all(served, shape.requests())
    meta = {"id": f"{shape.prefix}-{secrets.token_hex(12)}", "created": int(time.time()), "model": served.name}
    prompt_tokens = sum(len(r.prompt) for r in (s.request for s in streams))
    if not stream:
        texts = [""] * len(streams)
        entries: list[list[TokenLogprob]] = [[] for _ in streams]
        finish: list[str | None] = [None] * len(streams)
        completion_tokens = 0
        watcher = asyncio.create_task(_cancel_on_disconnect(http, streams))
        try:
            async for index, chunk in _merged(streams):
                _check_error(chunk)
                texts[index] += chunk.text
                entries[index] += chunk.logprobs
                finish[index] = chunk.finish_reason
                completion_tokens += len(chunk.tokens)
        finally:
            watcher.cancel()
        choices = [shape.choice(i, texts[i], entries[i], streams[i].prompt_logprobs, finish[i], True)
                   for i in range(len(streams))]
        return JSONResponse({**meta, "object": shape.kind, "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})

    async def events() -> AsyncIterator[str]:
        first = [True] * len(streams)
        async for index, chunk in _merged(streams):
            if chunk.finish_reason == "error":
                yield _sse({"error": {"message": f"generation failed: {chunk.error}", "type": "server_error",
                                      "param": None, "code": None}})
                break
            if not (chunk.text or chunk.finish_reason or chunk.logprobs):
                continue
            if isinstance(shape, _ChatCompletions):
                text = chunk.text.lstrip() if first[index] else chunk.text
                choice = shape.delta(index, text, chunk.logprobs, chunk.finish_reason, first[index])
            else:
                choice = shape.choice(index, chunk.text, chunk.logprobs, streams[index].prompt_logprobs,
                                      chunk.finish_reason, first[index])
            first[index] = False
            yield _sse({**meta, "object": shape.chunk_kind, "choices": [choice]})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the app ------------------------------------------------------------------------------------
def _metrics(served: Served) -> str:
    stats, engine = served.engine.stats, served.engine
    ttft = sorted(stats.first_token_seconds)

    def quantile(q: float) -> float:
        return ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    lines = [
        ("neocore_requests_total", "counter", "Generation requests accepted.", stats.requests),
        ("neocore_requests_finished_total", "counter", "Generation requests finished.", stats.finished),
        ("neocore_requests_rejected_total", "counter", "Requests refused: queue full.", served.rejected),
        ("neocore_generated_tokens_total", "counter", "Tokens generated.", stats.tokens_generated),
        ("neocore_prompt_tokens_total", "counter", "Prompt tokens read.", stats.prompt_tokens),
        ("neocore_queue_depth", "gauge", "Requests waiting for a place in the batch.", engine.queue_depth),
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
    out += ["# HELP neocore_time_to_first_token_seconds Time from a request's arrival to its first token.",
            "# TYPE neocore_time_to_first_token_seconds summary"]
    out += [f'neocore_time_to_first_token_seconds{{quantile="{q}"}} {quantile(q)}' for q in (0.5, 0.95)]
    out += [f"neocore_time_to_first_token_seconds_sum {sum(ttft)}",
            f"neocore_time_to_first_token_seconds_count {len(ttft)}"]
    return "\n".join(out) + "\n"


class _ReplicaHeader:
    """Names the serving replica (Ray Serve) in an x-neocore-replica header. Plain ASGI: a
    BaseHTTPMiddleware (@app.middleware) would hide a client's disconnect from the routes."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        served = getattr(scope["app"].state, "served", None) if scope["type"] == "http" else None
        if served is None or not served.replica:
            return await self.app(scope, receive, send)
        header = (b"x-neocore-replica", served.replica.encode())

        async def send_naming_the_replica(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)
        await self.app(scope, receive, send_naming_the_replica)


def build_app() -> FastAPI:
    """The OpenAI-compatible app; set app.state.served (a Served) before it takes requests."""
    app = FastAPI(title="neocore", docs_url=None, redoc_url=None, openapi_url=None)

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
        return ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    app.add_middleware(_ReplicaHeader)

    @app.get("/health")
    async def health(request: HttpRequest) -> dict:
        served: Served = request.app.state.served
        return {"status": "ok", "model": served.name, "active": served.engine.active,
                "queued": served.engine.queue_depth}

    @app.get("/metrics")
    async def metrics(request: HttpRequest) -> PlainTextResponse:
        return PlainTextResponse(_metrics(request.app.state.served), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HttpRequest) -> dict:
        served = served_of(request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "neocore"}]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        served = served_of(request)
        body = await _body(request)
        # tokenizing a long prompt takes a while: off the event loop, which serves everyone
        shape = await asyncio.to_thread(_Completions, served, body)
        return await _generate(request, served, shape, _field(body, "stream", (bool,), False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        served = served_of(request)
        body = await _body(request)
        shape = await asyncio.to_thread(_ChatCompletions, served, body)
        return await _generate(request, served, shape, _field(body, "stream", (bool,), False))

    return app


def serve(model: Any, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          max_queue: int | None = 64, api_key: str | None = None, name: str | None = None,
          shutdown_timeout: float = 30.0) -> None:
    """Runs the server until SIGINT/SIGTERM: then it stops accepting, lets running requests
    finish (for at most shutdown_timeout seconds) and returns."""
    import uvicorn
    if model.tokenizer is None:
        raise NeocoreError(f"{model.path}: no tokenizer files: the server needs one")
    engine = model.start_engine(max_batch, max_queue)
    app = build_app()
    app.state.served = Served(model, engine, name or model.path.name, api_key)
    print(f"neocore: serving {app.state.served.name} on http://{host}:{port}/v1 ({model.threads} threads, "
          f"up to {max_batch} sequences at once)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn hands a caught SIGTERM back to the previous handler once it has shut down: make
    # that one a no-op, so a requested stop ends the process with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        engine.close(shutdown_timeout)
