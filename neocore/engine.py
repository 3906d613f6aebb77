"""The engine: one loop that owns a model's sequence slots and advances every active sequence
each step, as vLLM's engine does. Requests come in from any thread (or asyncio task), join the
running batch between steps, and leave it when done; each caller reads its own Stream of
chunks. Model.generate, the server and the Ray layer are all thin users of it.

A step carries one row for every decoding sequence and, while rows are left, whole prefill
chunks of new prompts (PREFILL_CHUNK tokens, cut from the start of each prompt), so running
streams keep flowing while a long prompt is read. A sequence's chunk boundaries depend only on
its own prompt, and the C step computes each row independently of the others, so what a
request produces never depends on what else is running."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import numpy as np

from .errors import ContextError, EngineClosedError, NeocoreError, QueueFullError, shown
from .generate import TextStream
from .sampling import (NON_FINITE_LOGITS, SamplingParams, check_seed, choose_rows, is_integer, is_real,
                       log_softmax_rows, sequence_rng, token_array, without_ids_from)

PREFILL_CHUNK = 128  # prompt tokens a sequence brings to one step
LOOP_END_SECONDS = 1.0  # how long close_if_idle lets a loop with no work left end


class _Replaced(Exception):
    """Work sent to an engine that start_engine has replaced (see Engine.submit_all)."""


@dataclass
class Request:
    """What to generate: prompt token ids, sampling, and when to stop."""
    prompt: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 128    # 0: read the prompt only (with prompt_logprobs, to score it)
    seed: int | None = None
    seed_index: int = 0          # which of a seed's sequences this is (a batch's prompt index)
    stop: Sequence[str] = ()     # stop before these strings (text mode only)
    stop_at_eos: bool = True
    text: bool = True            # decode to text (needs the model's tokenizer)
    logprobs: int | None = None  # report the chosen token's log-probability and this many top ones
    prompt_logprobs: bool = False  # also report each prompt token's log-probability (echo)

    def __post_init__(self) -> None:
        self.stop = stop_list(self.stop)


def stop_list(stop: Any) -> Any:
    """Stop strings as a list, read once (an iterator shared by a batch's requests would reach
    only the first): one string is one stop, not its characters; what is no iterable of them
    is left as it is, for check_stops to refuse (bytes would read as a list of ints)."""
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, Iterable) and not isinstance(stop, (bytes, bytearray)):
        return list(stop)
    return stop


def check_stops(stop: Any) -> list[str]:
    """stop_list's list, or a NeocoreError unless it holds strings only."""
    stops = stop_list(stop)
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise NeocoreError(f"stop must be a string or a list of strings, got {shown(stop)}")
    return stops


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None                 # None for the first prompt token (nothing predicts it)
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """What one step added to a sequence. finish_reason is set on its last chunk: 'stop' (EOS
    or a stop string), 'length' (max_new_tokens or a full context), 'cancelled' or 'error'."""
    tokens: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob]


class Stream:
    """A request's chunks as they are produced: iterate it (threads) or `async for` it (asyncio,
    when submitted from a running event loop). cancel() ends the sequence at the next step."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.prompt_logprobs: list[TokenLogprob] = []
        self._loop = loop
        self._queue: Any = asyncio.Queue() if loop else queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._read: list[Chunk] = []  # the chunks taken from the queue so far, for result()
        # one reader takes from the queue at a time: two waiting there at once, the one that
        # did not get the last chunk would wait for ever
        self._reading: Any = asyncio.Lock() if loop else threading.Lock()

    def _put(self, chunk: Chunk) -> None:
        if self._loop:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
            except RuntimeError:  # the caller's loop is gone: nobody is listening
                self._cancelled.set()
        else:
            self._queue.put(chunk)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def canceller(self) -> Callable[[], None]:
        """cancel, holding nothing of the stream but its flag (for a finalizer)."""
        return self._cancelled.set

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def _finished(self) -> bool:
        return bool(self._read) and self._read[-1].finish_reason is not None

    def __iter__(self) -> Iterator[Chunk]:
        """The chunks not yet read, as they come (readers at once share them out). A wait for
        a chunk cut short (Ctrl-C) cancels the request; leaving the loop between chunks does
        not (read on later, cancel(), or read inside `with stream:`, which cancels at its end)."""
        if self._loop:
            raise TypeError("this stream was submitted from an event loop: read it with `async for`, "
                            "or submit with asynchronous=False to read it with `for`")
        while True:
            with self._reading:
                if self._finished:
                    return
                try:
                    chunk = self._queue.get()
                except BaseException:
                    self.cancel()
                    raise
                self._read.append(chunk)
            yield chunk

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        """__iter__ for asyncio: a wait cancelled (a timeout, the task cancelled) cancels the request."""
        if not self._loop:
            raise TypeError("this stream was submitted outside an event loop: read it with `for`")
        if asyncio.get_running_loop() is not self._loop:  # its chunks go to that loop alone
            raise TypeError("this stream is read in the event loop that submitted it")
        while True:
            async with self._reading:
                if self._finished:
                    return
                try:
                    chunk = await self._queue.get()
                except BaseException:
                    self.cancel()
                    raise
                self._read.append(chunk)
            yield chunk

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.cancel()  # nothing for a finished request

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.cancel()

    def result(self) -> Completion:
        """Waits for the whole completion (threads only): every chunk, those already read
        by iterating included. A wait cut short (Ctrl-C) cancels the request."""
        for _ in self:
            pass
        return _collect(self, self._read)

    async def aresult(self) -> Completion:
        """result for asyncio; a wait cancelled (a timeout, the task cancelled) cancels the request."""
        async for _ in self:
            pass
        return _collect(self, self._read)


def _one_line(exc: Exception) -> str:
    """What a failure inside the loop tells the requests it ends: its message's first line
    (one line, as every error neocore reports), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _collect(stream: Stream, chunks: list[Chunk]) -> Completion:
    last = chunks[-1]
    if last.finish_reason == "error":
        raise NeocoreError(last.error or "generation failed")
    return Completion(tokens=[t for c in chunks for t in c.tokens], text="".join(c.text for c in chunks),
                      finish_reason=last.finish_reason or "", prompt_tokens=len(stream.request.prompt),
                      logprobs=[lp for c in chunks for lp in c.logprobs],
                      prompt_logprobs=stream.prompt_logprobs)


RATE_WINDOW_SECONDS = 10.0  # tokens_per_second's window
RATE_BUCKET_SECONDS = 0.1   # its resolution: tokens are counted per bucket, however many come
RATE_BUCKETS = round(RATE_WINDOW_SECONDS / RATE_BUCKET_SECONDS)


@dataclass
class EngineStats:
    """Counters for /metrics; times in seconds. Requests count sequences: a request for n
    completions of each of several prompts is several."""
    requests: int = 0
    finished: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0      # in the C step
    python_seconds: float = 0.0    # the rest of each step: batching, sampling, text
    first_tokens: int = 0                   # sequences that have had their first token,
    first_token_seconds_total: float = 0.0  # and their waits for it, summed
    # the latest waits, for quantiles over recent traffic
    first_token_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1024))
    # [bucket number, tokens generated in it] for the last RATE_WINDOW_SECONDS
    token_buckets: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RATE_BUCKETS))

    def add_first_token(self, seconds: float) -> None:
        self.first_tokens += 1
        self.first_token_seconds_total += seconds
        self.first_token_seconds.append(seconds)

    def add_token(self, now: float) -> None:
        self.tokens_generated += 1
        bucket = int(now / RATE_BUCKET_SECONDS)
        if self.token_buckets and self.token_buckets[-1][0] == bucket:
            self.token_buckets[-1][1] += 1
        else:
            self.token_buckets.append([bucket, 1])

    def tokens_per_second(self, now: float | None = None) -> float:
        """Generated tokens per second over the last RATE_WINDOW_SECONDS (the current bucket
        and those before it) up to now (time.monotonic()'s clock)."""
        now = time.monotonic() if now is None else now
        oldest = int(now / RATE_BUCKET_SECONDS) - RATE_BUCKETS + 1
        # list(): a snapshot, as the engine's thread appends buckets meanwhile
        return sum(count for bucket, count in list(self.token_buckets) if bucket >= oldest) / RATE_WINDOW_SECONDS


class _Sequence:
    """A request in the running batch: its slot and where it stands."""

    def __init__(self, stream: Stream, slot: int, tokenizer: Any, submitted: float):
        request = stream.request
        self.stream = stream
        self.request = request
        self.slot = slot
        self.pending = list(request.prompt)   # prompt tokens not yet fed
        self.fed = 0                          # prompt tokens fed so far
        self.history = list(request.prompt)   # for the repetition penalty
        self.next_token: int | None = None    # sampled, fed in the next step
        self.generated = 0
        self.rng = sequence_rng(request.seed, request.seed_index)
        self.text = TextStream(tokenizer, request.stop) if request.text else None
        self.submitted = submitted
        self.first_token_at: float | None = None

    def rows(self) -> list[int]:
        """The tokens this sequence brings to the next step."""
        if self.next_token is not None:
            return [self.next_token]
        return self.pending[:PREFILL_CHUNK]


class Engine:
    """Owns a model's sequence slots (all but the one Model.append uses) and runs the loop on
    a thread of its own while there is work (started again when work comes after a pause).
    max_batch bounds the sequences decoded together; max_queue, the requests that may wait
    once the batch is full (None: unbounded)."""

    def __init__(self, model: Any, max_batch: int = 16, max_queue: int | None = None):
        from .model import DIRECT_SLOT, SEQUENCE_SLOTS
        Engine.check_limits(max_batch, max_queue)
        if model._engine is not None:  # two engines would share the model's sequence slots
            raise NeocoreError("this model already has an engine (model.engine): close it first")
        model._engine = self
        self.model = model
        self.max_batch = int(max_batch)  # Python's: numpy's narrow integers would wrap in sums
        self.max_queue = None if max_queue is None else int(max_queue)
        self.stats = EngineStats()
        self._free_slots = [s for s in range(SEQUENCE_SLOTS - 1, -1, -1) if s != DIRECT_SLOT]
        self._waiting: collections.deque[tuple[Stream, float]] = collections.deque()
        self._running: list[_Sequence] = []
        self._work = threading.Condition()
        self._closed = False
        self._replaced = False  # closed by close_if_idle: work still sent here goes to the model's new engine
        self._thread: threading.Thread | None = None
        self._logits = np.empty((0, model.config.vocab_size), np.float32)
        self._text_vocab = model.tokenizer.vocab_size if model.tokenizer else model.config.vocab_size

    @staticmethod
    def largest_batch() -> int:
        """The most sequences an engine decodes at once, the same for every model."""
        from .model import PREFILL_CHUNK as STEP_ROWS, SEQUENCE_SLOTS
        return min(SEQUENCE_SLOTS - 1, STEP_ROWS - PREFILL_CHUNK)  # room left for a prefill chunk

    @staticmethod
    def check_limits(max_batch: object, max_queue: object) -> None:
        """A NeocoreError unless an engine can have these limits."""
        largest = Engine.largest_batch()
        if not is_integer(max_batch) or not 1 <= max_batch <= largest:
            raise NeocoreError(f"max_batch must be an integer between 1 and {largest}, got {shown(max_batch)}")
        if max_queue is not None and (not is_integer(max_queue) or max_queue < 0):
            raise NeocoreError(f"max_queue must be an integer >= 0 or None, got {shown(max_queue)}")

    # ---- callers' side ------------------------------------------------------------------------
    def check(self, request: Request) -> Request:
        """Raises a NeocoreError for a request that cannot run (before it is queued); returns
        the request that runs: its prompt copied (what runs is what was checked, whatever the
        caller does with its list) and its numbers Python's (numpy's narrow ones would wrap)."""
        model = self.model
        tokens = token_array(request.prompt, model.config.vocab_size)
        if not tokens.size:
            raise NeocoreError("the prompt is empty: give at least one token")
        if tokens.size > model.context_length:  # a full one still chooses a token (never fed)
            raise ContextError(f"the prompt is {tokens.size} tokens long; the context holds {model.context_length}")
        if not is_integer(request.max_new_tokens) or request.max_new_tokens < 0:
            raise NeocoreError(f"max_new_tokens must be an integer >= 0, got {shown(request.max_new_tokens)}")
        if request.text and model.tokenizer is None:
            raise NeocoreError(f"{model.path}: no tokenizer files to turn tokens into text")
        if not isinstance(request.params, SamplingParams):
            raise NeocoreError(f"params must be a neocore SamplingParams, got {type(request.params).__name__}")
        check_seed(request.seed)
        if not is_integer(request.seed_index) or request.seed_index < 0:
            raise NeocoreError(f"seed_index must be an integer >= 0, got {shown(request.seed_index)}")
        if request.logprobs is not None and not (is_integer(request.logprobs) and 0 <= request.logprobs <= 20):
            raise NeocoreError(f"logprobs must be an integer from 0 to 20, got {shown(request.logprobs)}")
        for name in ("text", "stop_at_eos", "prompt_logprobs"):
            if not isinstance(getattr(request, name), (bool, np.bool_)):
                raise NeocoreError(f"{name} must be True or False, got {shown(getattr(request, name))}")
        stops = check_stops(request.stop)
        if stops and not request.text:
            raise NeocoreError("stop strings need text=True: they are looked for in the text")
        return replace(request, prompt=tokens.tolist(), max_new_tokens=int(request.max_new_tokens),
                       seed=None if request.seed is None else int(request.seed), seed_index=int(request.seed_index),
                       logprobs=None if request.logprobs is None else int(request.logprobs), stop=stops,
                       text=bool(request.text), stop_at_eos=bool(request.stop_at_eos),
                       prompt_logprobs=bool(request.prompt_logprobs))

    def submit(self, request: Request, asynchronous: bool | None = None) -> Stream:
        """Queues a request; its Stream is read with `async for` when asynchronous (the default:
        when submit is called from a running event loop), else with `for`. Raises
        QueueFullError when max_queue are waiting."""
        return self.submit_all([request], asynchronous)[0]

    def check_count(self, count: int) -> None:
        """A NeocoreError when count sequences could never be queued at once."""
        if self.max_queue is not None and count > self.max_batch + self.max_queue:
            raise NeocoreError(f"{count} sequences asked for at once; this engine runs "
                               f"{self.max_batch} and queues {self.max_queue} at most")

    def submit_all(self, requests: Sequence[Request], asynchronous: bool | None = None) -> list[Stream]:
        """Queues every request or none (a server request's n completions of each prompt):
        QueueFullError when they do not fit the queue now, NeocoreError when they never could.
        asynchronous as for submit."""
        # a generator is read once, here
        requests = list(requests) if isinstance(requests, Iterable) and not isinstance(requests, Request) else None
        if requests is None or not all(isinstance(r, Request) for r in requests):
            raise NeocoreError("submit takes neocore.engine.Request objects")
        self.check_count(len(requests))  # before the work of checking each
        if asynchronous is not None and not isinstance(asynchronous, bool):
            raise NeocoreError(f"asynchronous must be None, True or False, got {shown(asynchronous)}")
        checked = [self.check(request) for request in requests]
        loop = None
        if asynchronous is not False:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                if asynchronous:
                    raise NeocoreError("asynchronous streams need a running event loop") from None
        streams = [Stream(request, loop) for request in checked]
        try:
            self._queue_streams(streams)
        except _Replaced:  # start_engine replaced this idle engine after the caller took it
            return self.model.engine.submit_all(requests, asynchronous)
        return streams

    def _queue_streams(self, streams: list[Stream]) -> None:
        with self._work:
            if self._closed:
                raise _Replaced() if self._replaced else EngineClosedError("the engine is shutting down")
            if self.max_queue is not None:
                free_places = self.max_batch - len(self._running)
                waiting = self.queue_depth
                if waiting + len(streams) - free_places > self.max_queue:
                    queued = max(0, waiting - free_places)  # those beyond the batch's free places
                    needed = len(streams) - max(0, free_places - waiting)
                    raise QueueFullError(f"the queue holds {queued} of its {self.max_queue} places; "
                                         f"this request needs {needed}")
            now = time.monotonic()
            self._waiting.extend((stream, now) for stream in streams)
            self.stats.requests += len(streams)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="neocore-engine", daemon=True)
                try:
                    self._thread.start()
                except RuntimeError as exc:  # "can't start new thread": nothing stays queued
                    self._thread = None
                    for _ in streams:
                        self._waiting.pop()
                    self.stats.requests -= len(streams)
                    raise NeocoreError(f"cannot start the engine's thread ({exc})") from None
            self._work.notify()

    def results(self, requests: Sequence[Request]) -> list[Completion]:
        """Queues every request or none (submit_all) and waits for all their completions; if
        the wait is cut short (Ctrl-C, an error), the requests still running are cancelled."""
        streams = self.submit_all(requests, asynchronous=False)  # waited on here, in this thread
        try:
            completions = [stream.result() for stream in streams]
            if any(c.finish_reason == "cancelled" for c in completions):  # only close() cancels them
                raise EngineClosedError("the engine shut down before these requests finished")
            return completions
        finally:
            for stream in streams:
                stream.cancel()  # nothing for those that finished

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join the batch (cancelled ones leave at the next step)."""
        waiting = list(self._waiting)  # one copy in C: other threads change the deque meanwhile
        return sum(not stream.cancelled for stream, _ in waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    def close(self, timeout: float | None = None) -> None:
        """Stops taking requests, lets queued and running ones finish (for at most timeout
        seconds, then cancels them) and ends the loop. Interrupted (Ctrl-C), it cancels them at
        once: the model is never left holding a closed engine."""
        if timeout is not None and not (is_real(timeout) and timeout >= 0):
            raise NeocoreError(f"timeout must be a number of seconds >= 0, or None, got {shown(timeout)}")
        if timeout is not None and timeout > threading.TIMEOUT_MAX:  # infinity included: no bound
            timeout = None
        # The loop says itself when it has ended (_thread None): an interrupted Thread.join
        # marks a thread that still runs as stopped (CPython 3.9-3.12).
        with self._work:
            self._closed = True
            self._work.notify_all()
        try:
            with self._work:
                self._work.wait_for(lambda: self._thread is None, timeout)
        finally:
            with self._work:
                if self._thread is not None:  # past the timeout, or interrupted: cancel and wait
                    # copies: the loop's thread releases sequences without holding _work
                    for seq in list(self._running):
                        seq.stream.cancel()
                    for stream, _ in list(self._waiting):
                        stream.cancel()
                    self._work.wait_for(lambda: self._thread is None)
            self._detach()

    def _detach(self) -> None:
        """The loop is over: the model's next use makes a fresh engine."""
        if self.model._engine is self:
            self.model._engine = None

    def close_if_idle(self) -> bool:
        """Closes the engine if it has no requests, for start_engine to replace; says whether it
        did. A loop that has just delivered its last chunk is let end first: it has nothing
        left to do, and a caller that generated a moment ago must find its engine idle."""
        with self._work:
            self._work.wait_for(lambda: self._thread is None or self._waiting or self._running, LOOP_END_SECONDS)
            if self._waiting or self._running or self._thread is not None:
                return False
            self._closed = self._replaced = True
        self._detach()
        return True

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        """Runs while there is work, then ends (submit_all starts another): a thread waiting
        for work would hold the engine and its model, and a model a program drops would never
        be freed, its weights and maps with it."""
        ended = False
        try:
            while not ended:
                with self._work:
                    # decided and announced under one hold of the lock: a request submitted
                    # once it is released finds no loop, and starts one
                    if not self._waiting and not self._running:
                        self._thread, ended = None, True
                        self._work.notify_all()  # close() waits for this
                        continue
                try:
                    self.step()
                except Exception as exc:  # a failed step must not strand the callers
                    for seq in list(self._running):
                        self._finish(seq, "error", error=_one_line(exc))
        finally:
            if not ended:  # the loop itself failed: nobody may wait for ever
                # a fresh engine must find the slots empty; cleared before taking _work, since
                # the model's lock comes first wherever both are held (start_engine)
                for seq in list(self._running):
                    with contextlib.suppress(Exception):
                        self.model.clear_sequence(seq.slot)
                with self._work:
                    self._closed = True
                    for seq in self._running:
                        seq.stream._put(Chunk([], finish_reason="error", error="the engine's loop failed"))
                    for stream, _ in self._waiting:
                        self._end_waiting(stream, "error", "the engine's loop failed")
                    self._thread = None
                    self._work.notify_all()
            if self._closed:  # also when close() itself was interrupted
                self._detach()

    def _admit(self) -> None:
        with self._work:
            if any(stream.cancelled for stream, _ in self._waiting):  # ended now, full batch or not
                for entry in [entry for entry in self._waiting if entry[0].cancelled]:
                    self._waiting.remove(entry)
                    self._end_waiting(entry[0], "cancelled")
            while self._waiting and len(self._running) < self.max_batch:
                stream, submitted = self._waiting.popleft()
                try:
                    seq = _Sequence(stream, self._free_slots[-1], self.model.tokenizer, submitted)
                except Exception as exc:  # a request check() let through must still get an answer
                    self._end_waiting(stream, "error", _one_line(exc))
                    continue
                self._free_slots.pop()
                self._running.append(seq)

    def step(self) -> None:
        """One step: admit waiting requests, run one forward step over every active sequence's
        rows, sample, and hand each sequence its chunk."""
        started = time.perf_counter()
        self._admit()
        for seq in [s for s in self._running if s.stream.cancelled]:
            self._finish(seq, "cancelled")
        budget = self.model._core.max_rows
        batch: list[tuple[_Sequence, list[int]]] = []
        for seq in sorted(self._running, key=lambda s: s.next_token is None):  # decoders first
            rows = seq.rows()
            if len(rows) <= budget:
                batch.append((seq, rows))
                budget -= len(rows)
        if not batch:
            return
        tokens = np.fromiter((t for _, rows in batch for t in rows), np.int32)
        seqs = np.concatenate([np.full(len(rows), seq.slot, np.int32) for seq, rows in batch])
        want = np.zeros(tokens.size, np.uint8)
        at = 0
        for seq, rows in batch:
            if seq.request.prompt_logprobs and seq.next_token is None:
                want[at:at + len(rows)] = 1
            if seq.next_token is not None or len(rows) == len(seq.pending):
                want[at + len(rows) - 1] = 1   # the row whose logits choose the next token
            at += len(rows)
        wanted = int(want.sum())
        if self._logits.shape[0] < wanted:
            self._logits = np.empty((wanted, self.model.config.vocab_size), np.float32)
        logits = self._logits[:wanted]
        c_started = time.perf_counter()
        self.model.step(tokens, seqs, want, logits)
        c_seconds = time.perf_counter() - c_started
        self._after_step(batch, logits)
        self.stats.steps += 1
        self.stats.step_seconds += c_seconds
        self.stats.python_seconds += time.perf_counter() - started - c_seconds

    def _after_step(self, batch: list[tuple[_Sequence, list[int]]], logits: np.ndarray) -> None:
        """Records what was fed, then samples every sequence that now needs a token, together.
        A sequence whose logits are not finite (NaN or infinite weights, or an overflow) ends
        with an error instead: there is nothing sound to choose or score from."""
        finite = np.isfinite(logits).all(axis=1)
        choosers: list[tuple[_Sequence, int]] = []  # and the row of logits it chooses from
        at = 0
        for seq, rows in batch:
            if seq.next_token is not None:
                choosers.append((seq, at))
                at += 1
                continue
            if seq.request.prompt_logprobs:
                if not finite[at:at + len(rows)].all():
                    self._finish(seq, "error", error=NON_FINITE_LOGITS)
                    at += len(rows)
                    continue
                if not self._for_one(seq, self._record_prompt_logprobs, seq, rows, logits[at:at + len(rows)]):
                    at += len(rows)
                    continue
                at += len(rows) - 1
            seq.pending = seq.pending[len(rows):]
            seq.fed += len(rows)
            self.stats.prompt_tokens += len(rows)
            if not seq.pending:
                if seq.request.max_new_tokens:
                    choosers.append((seq, at))
                else:  # the prompt (and its logprobs) was all it asked for: a scoring request
                    self._finish(seq, "length")
                at += 1
            elif seq.request.prompt_logprobs:
                at += 1
        for seq, row in choosers:
            if not finite[row]:
                self._finish(seq, "error", error=NON_FINITE_LOGITS)
        choosers = [(seq, row) for seq, row in choosers if finite[row]]
        if not choosers:
            return
        sequences = [seq for seq, _ in choosers]
        rows_logits = logits[[row for _, row in choosers]]  # a copy: the masks below stay in it
        if self._text_vocab < rows_logits.shape[1]:  # a padded vocabulary (else nothing to mask)
            for i, seq in enumerate(sequences):
                rows_logits[i] = self._text_only(seq, rows_logits[i])
        chosen = choose_rows(rows_logits, [s.history for s in sequences],
                             [s.request.params for s in sequences], [s.rng for s in sequences])
        wants_logprobs = [i for i, s in enumerate(sequences) if s.request.logprobs is not None]
        logprobs = log_softmax_rows(rows_logits[wants_logprobs]) if wants_logprobs else None
        for i, seq in enumerate(sequences):
            entry = logprobs[wants_logprobs.index(i)] if logprobs is not None and i in wants_logprobs else None
            self._for_one(seq, self._deliver, seq, int(chosen[i]), entry)

    def _for_one(self, seq: _Sequence, work: Callable[..., None], *args: Any) -> bool:
        """work(*args) for one sequence; where it fails (its request's own tokens or options),
        that sequence alone ends with the error, and the others in the step go on. Whether it ran."""
        try:
            work(*args)
            return True
        except Exception as exc:
            if seq in self._running:  # else it had ended already, its slot freed
                self._finish(seq, "error", error=str(exc) or type(exc).__name__)
            return False

    def _text_only(self, seq: _Sequence, logits: np.ndarray) -> np.ndarray:
        """A text request's logits without the ids past the tokenizer's (a padded vocabulary):
        they have no text, so they are never chosen, nor named among its log-probabilities."""
        return without_ids_from(logits, self._text_vocab) if seq.text is not None else logits

    def _record_prompt_logprobs(self, seq: _Sequence, rows: list[int], logits: np.ndarray) -> None:
        """Row j's logits predict prompt token fed + j + 1: the log-probability of each."""
        stream = seq.stream
        if seq.fed == 0:
            stream.prompt_logprobs.append(TokenLogprob(rows[0], None))
        targets = seq.request.prompt[seq.fed + 1:seq.fed + len(rows) + 1]
        if not len(targets):
            return
        table = log_softmax_rows(self._text_only(seq, logits[:len(targets)]))
        for j, target in enumerate(targets):
            stream.prompt_logprobs.append(_logprob_entry(table[j], int(target), seq.request.logprobs or 0))

    def _deliver(self, seq: _Sequence, token: int, logprobs: np.ndarray | None) -> None:
        """Hands seq its chosen token (and, with logprobs, the row of log-probabilities it was
        chosen from)."""
        request, now = seq.request, time.monotonic()
        logprob = _logprob_entry(logprobs, token, request.logprobs) if logprobs is not None else None
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.stats.add_first_token(now - seq.submitted)
        seq.generated += 1
        seq.history.append(token)
        self.stats.add_token(now)
        chunk = Chunk([token], logprobs=[logprob] if logprob else [])
        eos = request.stop_at_eos and token in self.model.config.eos_token_ids
        if seq.text is not None and not eos:
            chunk.text = seq.text.add(token)
        if eos or (seq.text is not None and seq.text.stopped):
            chunk.finish_reason = "stop"
        elif seq.generated >= request.max_new_tokens or seq.fed + seq.generated > self.model.context_length:
            # the token just chosen could not be fed: the context is full
            chunk.finish_reason = "length"
        if chunk.finish_reason:
            if seq.text is not None:
                chunk.text += seq.text.finish()
            self._release(seq)
        else:
            seq.next_token = token
        seq.stream._put(chunk)

    def _end_waiting(self, stream: Stream, reason: str, error: str | None = None) -> None:
        """Ends a request that never joined the batch."""
        stream._put(Chunk([], finish_reason=reason, error=error))
        self.stats.finished += 1

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        self._release(seq)
        seq.stream._put(Chunk([], finish_reason=reason, error=error))

    def _release(self, seq: _Sequence) -> None:
        self.model.clear_sequence(seq.slot)
        self._free_slots.append(seq.slot)
        if seq in self._running:
            self._running.remove(seq)
        self.stats.finished += 1


def _logprob_entry(row: np.ndarray, token: int, top: int) -> TokenLogprob:
    top = min(top, row.size)  # a vocabulary smaller than the number asked for: all of it
    best = np.argpartition(-row, top - 1)[:top] if top else np.empty(0, np.int64)
    best = best[np.argsort(-row[best])]
    return TokenLogprob(token, float(row[token]), [(int(t), float(row[t])) for t in best])
