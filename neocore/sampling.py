"""Choosing the next token: transformers' logits processors, in transformers' order
(repetition penalty, temperature, top-k, top-p), on float32 logits, drawn with a seeded
NumPy Generator so that a seed gives the same text on every run and thread count."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import SamplingError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8   # 0 means greedy
    top_k: int = 40            # 0 disables
    top_p: float = 0.95        # 1 disables
    repetition_penalty: float = 1.0  # 1 disables

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            raise SamplingError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, previous: Sequence[int], penalty: float) -> np.ndarray:
    """Each token already seen: divided by penalty if positive, multiplied if negative."""
    if penalty == 1.0 or not len(previous):
        return logits
    seen = np.unique(np.asarray(previous, dtype=np.int64))
    scores = logits[seen]
    logits[seen] = np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))
    return logits


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keeps the k highest (and any tied with the k-th); the rest become -inf."""
    if 0 < k < logits.size:
        kth = np.partition(logits, -k)[-k]
        logits[logits < kth] = -np.inf
    return logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    e = np.exp(shifted)
    return e / e.sum()


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Drops the least likely tokens whose total probability is at most 1 - p (keeping one).
    Tokens already at -inf carry no probability, so only the others need sorting (after top-k,
    a few dozen instead of the whole vocabulary)."""
    if p >= 1.0:
        return logits
    candidates = np.flatnonzero(np.isfinite(logits))
    order = candidates[np.argsort(logits[candidates])]  # ascending, as transformers sorts (ties unordered there too)
    cumulative = np.cumsum(_softmax(logits[order]))
    remove = cumulative <= (1 - p)
    remove[-1] = False
    logits[order[remove]] = -np.inf
    return logits


def process_logits(logits: np.ndarray, previous: Sequence[int], params: SamplingParams) -> np.ndarray:
    """The filtered, tempered scores a token is drawn from (a new float32 array)."""
    scores = np.array(logits, dtype=np.float32)
    scores = apply_repetition_penalty(scores, previous, params.repetition_penalty)
    if params.greedy:
        return scores
    scores /= np.float32(params.temperature)
    scores = apply_top_k(scores, params.top_k)
    return apply_top_p(scores, params.top_p)


class Sampler:
    def __init__(self, params: SamplingParams, seed: int | None = None):
        self.params = params
        self.rng = np.random.default_rng(seed)

    def choose(self, logits: np.ndarray, previous: Sequence[int]) -> int:
        scores = process_logits(logits, previous, self.params)
        if self.params.greedy:
            return int(np.argmax(scores))
        candidates = np.flatnonzero(np.isfinite(scores))  # the filters' survivors, in token order
        cumulative = np.cumsum(_softmax(scores[candidates]), dtype=np.float64)
        pick = np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")
        return int(candidates[min(pick, candidates.size - 1)])
