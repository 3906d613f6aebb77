"""Text in, text out: generation with stop strings and streaming, and scoring (perplexity)."""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import ContextError, EngineClosedError, NeocoreError, SamplingError, shown
from .sampling import NON_FINITE_LOGITS, Sampler, SamplingParams, check_seed, is_integer


@dataclass
class GenerationStats:
    """Timings of one generation, filled in while it runs."""
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0   # prefill and the first token's choice
    new_tokens: int = 0
    decode_seconds: float = 0.0   # everything after the first new token

    def summary(self) -> str:
        def rate(tokens: int, seconds: float) -> str:
            return f"{tokens / seconds:.1f} tokens/s" if seconds else "not timed"  # nothing ran
        return (f"prompt: {self.prompt_tokens} tokens, {rate(self.prompt_tokens, self.prompt_seconds)}; "
                f"generated: {self.new_tokens} tokens, {rate(self.new_tokens - 1, self.decode_seconds)}")


def tokens_after(model, context_ids: list[int], new_ids: Sequence[int], sampler: Sampler,
                 max_new_tokens: int, stats: GenerationStats | None = None) -> Iterator[int]:
    """Feeds new_ids after what the cache holds, then yields sampled tokens, feeding each one
    before choosing the next. context_ids mirrors the cache and is extended in place (a
    yielded token is in it once the next is chosen). Ends at max_new_tokens or a full context."""
    stats = stats or GenerationStats()
    started = time.perf_counter()
    logits = model.append(new_ids)
    context_ids.extend(new_ids)
    stats.prompt_tokens = len(new_ids)
    for produced in range(max_new_tokens):
        token = sampler.choose(logits, context_ids)
        now = time.perf_counter()
        if produced == 0:
            stats.prompt_seconds, first = now - started, now
        else:
            stats.decode_seconds = now - first
        stats.new_tokens = produced + 1
        yield token
        if produced + 1 == max_new_tokens or model.position >= model.context_length:
            return
        logits = model.append([token])
        context_ids.append(token)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of text that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in text, or -1."""
    return min((text.find(s) for s in stops if s in text), default=-1)


class TextStream:
    """Token ids in, text out: whole characters only, ending before the first stop string
    (which may span tokens); text that might still grow into a stop string is held back."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stops = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False  # a stop string was found: nothing more comes

    def _take(self, upto: int) -> str:
        chunk = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return chunk

    def add(self, token: int) -> str:
        """The text this token completes that can be shown now."""
        if self.stopped:
            return ""
        self.text += self.decoder.add(token)
        cut = _first_stop(self.text, self.stops)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._take(cut)
        return self._take(len(self.text) - _held_back(self.text, self.stops))

    def finish(self) -> str:
        """The rest, once no token follows."""
        if not self.stopped:
            self.text += self.decoder.flush()
            cut = _first_stop(self.text, self.stops)
            if cut >= 0:
                self.text = self.text[:cut]
        return self._take(len(self.text))


def stream_text(model, tokens: Iterator[int], stop: Sequence[str] = ()) -> Iterator[str]:
    """Text chunks of tokens, ending before EOS or the first stop string (see TextStream)."""
    text = TextStream(model.tokenizer, stop)
    for token in tokens:
        if token in model.config.eos_token_ids:
            break
        chunk = text.add(token)
        if chunk:
            yield chunk
        if text.stopped:
            return
    rest = text.finish()
    if rest:
        yield rest


def check_fits_as_text(model, text: str, what: str = "prompt") -> None:
    """Refuses, before tokenizing it, text longer than the context could hold whatever its
    tokens are (each is at most longest_token characters): tokenizing megabytes takes seconds."""
    if len(text) > model.context_length * model.tokenizer.longest_token:
        raise ContextError(f"the {what} is {len(text)} characters long, more than a context of "
                           f"{model.context_length} tokens can hold")


def prompt_ids(model, prompt: str, what: str = "prompt", allow_special: bool = True) -> list[int]:
    """The prompt's tokens, which leave room in the context for a new one; an empty prompt
    starts from <|endoftext|>, GPT-Neo's document start. what names the text in errors;
    allow_special=False reads '<|endoftext|>' in it as text (a chat transcript: chat.encode)."""
    if not isinstance(prompt, str):
        raise NeocoreError(f"a {what} must be a string, got {shown(prompt)}")
    if model.tokenizer is None:
        raise NeocoreError(f"{model.path}: no tokenizer files (vocab.json + merges.txt or tokenizer.json)")
    check_fits_as_text(model, prompt, what)
    ids = model.tokenizer.encode(prompt, allow_special) or [model.tokenizer.eos_id]
    if len(ids) > model.context_length:  # a full context still chooses a token (never fed)
        raise ContextError(f"the {what} is {len(ids)} tokens long; the context holds {model.context_length}")
    return ids


def _params(max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float,
            seed: int | None, stop: Sequence[str]) -> tuple[SamplingParams, list[str]]:
    """The sampling parameters, and the stop strings read once (for all of a batch's prompts);
    every argument checked here, since with no token asked for the engine never sees them."""
    from .engine import check_stops
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    check_seed(seed)
    stops = check_stops(stop)
    if not is_integer(max_new_tokens) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an integer >= 0, got {shown(max_new_tokens)}")
    return params, stops


def _chunks_text(handle, stats: GenerationStats) -> Iterator[str]:
    """A request's text as it comes; leaving early cancels the request."""
    started = time.perf_counter()
    first = None
    try:
        for chunk in handle:
            if chunk.finish_reason == "error":
                raise NeocoreError(chunk.error or "generation failed")
            if chunk.finish_reason == "cancelled":  # not by the reader (it would not be here): close()
                raise EngineClosedError("the engine shut down before this request finished")
            if chunk.tokens:
                now = time.perf_counter()
                if first is None:
                    first = now
                    stats.prompt_seconds = now - started
                stats.new_tokens += len(chunk.tokens)
                stats.decode_seconds = now - first
            if chunk.text:
                yield chunk.text
    finally:
        handle.cancel()


def stream(model, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
           top_p: float = 0.95, repetition_penalty: float = 1.0, seed: int | None = None,
           stop: Sequence[str] = (), stats: GenerationStats | None = None) -> Iterator[str]:
    """Text chunks of the continuation as they are produced (see Model.stream)."""
    from .engine import Request
    params, stop = _params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    ids = prompt_ids(model, prompt)
    stats = stats or GenerationStats()
    stats.prompt_tokens = len(ids)
    if max_new_tokens == 0:
        return (chunk for chunk in ())  # closable, as TextChunks is
    handle = model.engine.submit(Request(ids, params, max_new_tokens, seed, 0, stop), asynchronous=False)
    return TextChunks(handle, stats)


class TextChunks:
    """A request's text as it comes (Model.stream). Closing it or dropping it cancels the
    request, read or not: a generator closed or dropped before its first chunk runs no
    finally, and the request would run to its end."""

    def __init__(self, handle, stats: GenerationStats):
        self._handle = handle
        self._chunks = _chunks_text(handle, stats)
        weakref.finalize(self, handle.canceller)

    def __iter__(self) -> "TextChunks":
        return self

    def __next__(self) -> str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()
        self._handle.cancel()


def generate_many(model, prompts: Sequence[str], max_new_tokens: int = 128, temperature: float = 0.8,
                  top_k: int = 40, top_p: float = 0.95, repetition_penalty: float = 1.0,
                  seed: int | None = None, stop: Sequence[str] = ()) -> list[str]:
    """The continuation of each prompt, decoded together; prompt i samples with its own
    generator derived from (seed, i), so its text does not depend on the other prompts."""
    from .engine import Request
    params, stop = _params(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    ids = [prompt_ids(model, p) for p in prompts]
    if max_new_tokens == 0:
        return ["" for _ in prompts]
    requests = [Request(p, params, max_new_tokens, seed, i, stop) for i, p in enumerate(ids)]
    return [completion.text for completion in model.engine.results(requests)]


SCORE_CHUNK = 256  # positions whose logits are held at once while scoring


@dataclass
class Score:
    tokens: list[int]        # the text's tokens
    logprobs: np.ndarray     # natural log-probability of each, given what came before
    stride: int              # tokens advanced between windows (texts longer than the context)

    @property
    def perplexity(self) -> float:
        return math.exp(-float(np.mean(self.logprobs))) if self.logprobs.size else float("nan")


def check_stride(stride: object, window: int) -> int:
    """A scoring stride for windows of window positions: an integer from 1 to window - 1."""
    if not is_integer(stride) or not 1 <= stride <= window - 1:
        raise NeocoreError(f"stride must be an integer between 1 and {window - 1}, got {shown(stride)}")
    return int(stride)


def score(model, text: str, stride: int | None = None,
          progress: Callable[[int, int], None] | None = None) -> Score:
    """Log-probability of every token of text, each predicted from <|endoftext|> and the text
    before it. A text longer than the context is read in windows of context length that
    advance by stride tokens (default half the context); each window scores only its last
    stride tokens, so every token after the first window sees at least context - stride."""
    if model.tokenizer is None:
        raise NeocoreError(f"{model.path}: no tokenizer files to score text with")
    tokens = model.tokenizer.encode(text)
    if not tokens:
        raise NeocoreError("the text is empty: nothing to score")
    ids = [model.tokenizer.eos_id] + tokens
    window = model.context_length
    if window < 2:  # a window must hold a token and the one it predicts
        raise ContextError(f"scoring needs a context of at least 2 positions, got {window}")
    stride = check_stride(window // 2 if stride is None else stride, window)
    logprobs = np.empty(len(tokens), dtype=np.float64)
    with model._direct:  # the model's own sequence, for the whole text
        _score_windows(model, ids, logprobs, stride, progress)
    return Score(tokens, logprobs, stride)


def _score_windows(model, ids: list[int], logprobs: np.ndarray, stride: int,
                   progress: Callable[[int, int], None] | None) -> None:
    """score's windows: logprobs[k] = the log-probability of ids[k + 1] after ids[..k]."""
    tokens, window = ids[1:], model.context_length
    scored = 0  # logprobs[k] is tokens[k] = ids[k + 1], predicted at input position k
    start = 0   # first position of the current window
    while scored < len(tokens):
        end = min(start + window, len(ids))
        model.reset()
        if scored > start:  # context only: no logits needed
            model.append(ids[start:scored])
        for at in range(scored, end - 1, SCORE_CHUNK):
            chunk = ids[at:min(at + SCORE_CHUNK, end - 1)]
            rows = model.append(chunk, all_logits=True)
            if not np.isfinite(rows).all():
                raise NeocoreError(NON_FINITE_LOGITS)
            top = rows.max(axis=1, keepdims=True)
            log_total = np.log(np.exp(rows - top).sum(axis=1, dtype=np.float64))
            targets = np.asarray(ids[at + 1:at + 1 + len(chunk)])
            picked = rows[np.arange(len(chunk)), targets].astype(np.float64)
            logprobs[at:at + len(chunk)] = picked - top[:, 0] - log_total
        scored = end - 1
        if progress:
            progress(scored, len(tokens))
        start += stride
