"""Choosing the next token: transformers' logits processors, in transformers' order
(repetition penalty, temperature, top-k, top-p), on float32 logits, drawn with a seeded
NumPy Generator so that a seed gives the same text on every run and thread count."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import NeocoreError, SamplingError, shown


# Temperatures below this are greedy: dividing float32 logits by less can overflow them to
# infinity (1e-300 rounds to 0 in float32), and the draw is the argmax long before that.
GREEDY_BELOW = 1e-5
# Temperatures and repetition penalties past this (either way, for the penalty) would take
# float32 logits to infinity or to ties: refused rather than silently sampling other tokens.
SCALE_LIMIT = 1e6
# Weights holding NaN or infinity give such logits: no token can be chosen or scored from them.
NON_FINITE_LOGITS = "the model's logits are NaN or infinite: its weights hold NaN or infinity"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8   # 0 (or below GREEDY_BELOW) means greedy
    top_k: int = 40            # 0 disables
    top_p: float = 0.95        # 1 disables
    repetition_penalty: float = 1.0  # 1 disables

    def __post_init__(self) -> None:
        if not (is_real(self.temperature) and 0 <= self.temperature <= SCALE_LIMIT):
            raise SamplingError(f"temperature must be a number from 0 (greedy) to {SCALE_LIMIT:g}, "
                                f"got {shown(self.temperature)}")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {shown(self.top_k)}")
        if not (is_real(self.top_p) and 0 <= self.top_p <= 1):  # 0 keeps the most likely token, as in transformers
            raise SamplingError(f"top_p must be in [0, 1], got {shown(self.top_p)}")
        if not (is_real(self.repetition_penalty)
                and 1 / SCALE_LIMIT <= self.repetition_penalty <= SCALE_LIMIT):
            raise SamplingError(f"repetition_penalty must be a number from {1 / SCALE_LIMIT:g} to "
                                f"{SCALE_LIMIT:g} (1 = off), got {shown(self.repetition_penalty)}")
        # Python's numbers from here on: a numpy unsigned top_k would wrap around as -top_k
        for name, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("repetition_penalty", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def apply_repetition_penalty(logits: np.ndarray, previous: Sequence[int], penalty: float) -> np.ndarray:
    """Each token already seen: divided by penalty if positive, multiplied if negative."""
    if penalty == 1.0 or not len(previous):
        return logits
    seen = np.unique(np.asarray(previous, dtype=np.int64))
    scores = logits[seen]
    logits[seen] = np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))
    return logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    e = np.exp(shifted)
    return e / e.sum()


def apply_top_p(logits: np.ndarray, p: float, candidates: np.ndarray | None = None) -> np.ndarray:
    """Drops the least likely tokens whose total probability is at most 1 - p (keeping one).
    Tokens already at -inf carry no probability, so only the others need sorting (after top-k,
    a few dozen instead of the whole vocabulary); candidates: their ids, where known."""
    if p >= 1.0:
        return logits
    if candidates is None:
        candidates = np.flatnonzero(np.isfinite(logits))
    # ascending and stable, as torch.sort (transformers') orders ties on the CPU up to 16 values;
    # past that its order of ties is its own, and a tie at the cut may keep another of the ids
    order = candidates[np.argsort(logits[candidates], kind="stable")]
    # summed in float64 and rounded to float32 each, as torch's cumsum does on the CPU: a float32
    # running sum over 50257 probabilities drifts past 1 and moved the cut by a token
    cumulative = np.cumsum(_softmax(logits[order]), dtype=np.float64).astype(np.float32)
    remove = cumulative <= (1 - p)
    remove[-1] = False
    logits[order[remove]] = -np.inf
    return logits


def process_logits(logits: np.ndarray, previous: Sequence[int], params: SamplingParams) -> np.ndarray:
    """The filtered, tempered scores a token is drawn from (a new float32 array)."""
    return process_rows(logits[None], [previous], [params])[0]


def process_rows(logits: np.ndarray, previous: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> np.ndarray:
    """process_logits for every row of logits [B, vocab] at once (a new array). Each row's
    result depends only on that row: whole-vocabulary work is done for rows sharing a setting
    together, the rest on each row's few survivors."""
    return _filter_rows(logits, previous, params)[0]


def _filter_rows(logits: np.ndarray, previous: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """process_rows, and for each row that top-k filtered, the ids of its finite survivors
    (before top-p)."""
    scores = np.array(logits, dtype=np.float32)
    kept: list[np.ndarray | None] = [None] * len(scores)
    for row, (p, seen) in enumerate(zip(params, previous)):
        apply_repetition_penalty(scores[row], seen, p.repetition_penalty)
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled:
        return scores, kept
    # greedy rows are divided by 1, which leaves them exactly as they are
    scores /= np.array([1.0 if p.greedy else p.temperature for p in params], dtype=np.float32)[:, None]
    by_k: dict[int, list[int]] = {}
    for row in sampled:
        by_k.setdefault(params[row].top_k, []).append(row)
    for k, rows in by_k.items():
        if 0 < k < scores.shape[1]:
            whole = len(rows) == len(scores)
            block = scores if whole else scores[rows]  # a view when every row shares k
            cut = block < kth_largest(block, k)[:, None]  # a NaN is never cut, nor cuts
            np.copyto(block, -np.inf, where=cut)
            if not whole:
                scores[rows] = block
            # what top-p weighs: the finite survivors (np.nonzero of a 2-D mask took 10x longer)
            at, ids = np.divmod(np.flatnonzero(np.isfinite(block)), block.shape[1])
            for row, row_ids in zip(rows, np.split(ids, np.cumsum(np.bincount(at, minlength=len(rows)))[:-1])):
                kept[row] = row_ids
    for row in sampled:
        apply_top_p(scores[row], params[row].top_p, kept[row])
    return scores, kept


KTH_CHUNK = 256  # columns whose maximum kth_largest takes as one


def kth_largest(block: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of each row of block [B, V], as np.partition(block, -k,
    axis=1)[:, -k] gives it, without partitioning whole rows (0.38 ms for 50257 values): a
    row's k-th largest chunk maximum is at most its k-th largest value, so only the values at
    or above it (a few more than k) are partitioned. Rows holding NaN, which np.partition
    orders past every number, are partitioned whole."""
    rows, width = block.shape
    chunks = width // KTH_CHUNK
    if chunks < k:
        return np.partition(block, -k, axis=1)[:, -k]
    maxima = block[:, :chunks * KTH_CHUNK].reshape(rows, chunks, KTH_CHUNK).max(axis=2)
    bound = np.partition(maxima, -k, axis=1)[:, -k]
    with_nan = np.isnan(maxima).any(axis=1) | np.isnan(block[:, chunks * KTH_CHUNK:]).any(axis=1)
    out = np.empty(rows, block.dtype)
    for row in range(rows):
        values = block[row] if with_nan[row] else block[row][block[row] >= bound[row]]
        out[row] = np.partition(values, -k)[-k]
    return out


def choose_rows(logits: np.ndarray, previous: Sequence[Sequence[int]],
                params: Sequence[SamplingParams], rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """The next token of every row of logits [B, vocab]: greedy rows by argmax, the others
    drawn with their own generator from their filters' survivors."""
    scores, kept = _filter_rows(logits, previous, params)
    chosen = np.argmax(scores, axis=1)
    for row, (p, rng) in enumerate(zip(params, rngs)):
        if p.greedy:
            continue
        # the survivors, in token order
        ids = kept[row]
        candidates = np.flatnonzero(np.isfinite(scores[row])) if ids is None else ids[np.isfinite(scores[row, ids])]
        if not candidates.size:  # nothing finite to draw from (NaN logits): keep the argmax
            continue
        # every id a survivor (top-k and top-p off): the row itself, not a gathered copy
        weights = scores[row] if candidates.size == scores.shape[1] else scores[row, candidates]
        cumulative = np.cumsum(_softmax(weights), dtype=np.float64)
        pick = np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")
        chosen[row] = candidates[min(pick, candidates.size - 1)]
    return chosen


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Natural log-probabilities of logits [B, vocab], in float64."""
    top = logits.max(axis=1, keepdims=True)
    shifted = logits.astype(np.float64) - top
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def sequence_rng(seed: int | None, index: int = 0) -> np.random.Generator:
    """The generator of the index-th sequence of a request with this seed: its draws never
    depend on the other sequences (None: fresh entropy)."""
    return np.random.default_rng(None if seed is None else [seed, index])


def is_integer(value: object) -> bool:
    """An int or a numpy integer, not a bool."""
    return is_integer_type(type(value))


def is_integer_type(kind: type) -> bool:
    return issubclass(kind, numbers.Integral) and not issubclass(kind, (bool, np.bool_))


def is_real(value: object) -> bool:
    """An int, a float or a numpy number (np.float32 included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def token_array(ids: object, vocab_size: int) -> np.ndarray:
    """ids as int32, or a NeocoreError: a 1-D integer array, or a sequence (not a string) of
    integers (numpy's of any width included), in the vocabulary. A float, a bool or a string
    is not rounded or parsed to some token: a sequence's element types are checked themselves,
    since np.asarray makes [1, True] integers and [np.uint64(1), 2] floats."""
    if isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)) \
            and all(is_integer_type(kind) for kind in set(map(type, ids))):
        try:
            ids = np.array(ids, dtype=np.int64)
        except OverflowError:
            raise NeocoreError(f"token ids must be integers in [0, {vocab_size})") from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise NeocoreError("token ids must be a flat sequence of integers")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise NeocoreError(f"token ids must be integers in [0, {vocab_size})")
    return ids.astype(np.int32, copy=False)  # an int32 array (checked before) is used as it is


def check_seed(seed: object) -> None:
    """Raises a SamplingError unless seed is None or an integer numpy's generators take."""
    if seed is not None and not (is_integer(seed) and 0 <= seed < 2 ** 63):
        raise SamplingError(f"seed must be an integer in [0, 2**63), got {shown(seed)}")


def without_ids_from(logits: np.ndarray, vocab: int | None) -> np.ndarray:
    """logits with every id from vocab on out of reach (-inf): a copy where there are such ids
    (a vocabulary padded past its tokenizer's, whose ids have no text), else logits itself."""
    if vocab is None or vocab >= logits.shape[-1]:
        return logits
    kept = logits.copy()
    kept[..., vocab:] = -np.inf
    return kept


class Sampler:
    """Chooses tokens for one sequence (the chat loop's), among the first `vocab` ids when
    given (those its tokenizer can turn into text)."""

    def __init__(self, params: SamplingParams, seed: int | None = None, vocab: int | None = None):
        check_seed(seed)
        self.params = params
        self.rng = sequence_rng(seed)
        self.vocab = vocab

    def choose(self, logits: np.ndarray, previous: Sequence[int]) -> int:
        if not np.isfinite(logits).all():
            raise NeocoreError(NON_FINITE_LOGITS)
        row = without_ids_from(logits[None], self.vocab)
        return int(choose_rows(row, [previous], [self.params], [self.rng])[0])
