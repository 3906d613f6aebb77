"""neocore: a fast, exact CPU inference engine for EleutherAI GPT-Neo models."""
import os


def _load_core_with_short_spins() -> None:
    """Loads the C core, and with it libgomp, which reads its spin count once, then. Its
    default (300,000 spins) keeps a thread that waits at a barrier busy, and on a machine
    shared with other work that busy thread takes the core its partner needs: beside one busy
    process, 2-thread decode steps stalled at random, 1.3-3.6x slower on average. With 1000
    spins they ran steady, for about 7% of one sequence's speed on a quiet machine
    (BENCHMARKS.md). A setting of the user's wins. The variable is removed again, so that
    programs started later do not inherit it; a library that loaded the system's libgomp
    before neocore keeps its settings, and one loaded after shares these."""
    ours = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    if ours:
        os.environ["GOMP_SPINCOUNT"] = "1000"
    try:
        from . import _core  # noqa: F401
    finally:
        if ours:
            del os.environ["GOMP_SPINCOUNT"]


_load_core_with_short_spins()

from .config import GPTNeoConfig  # noqa: E402
from .errors import (CheckpointError, ConfigError, ContextError, EngineClosedError, ModelNotFoundError,
                     NeocoreError, QueueFullError, SamplingError, TokenizerError)
from .model import Model, load
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "load", "Model", "Tokenizer", "GPTNeoConfig", "NeocoreError", "ConfigError", "CheckpointError",
    "TokenizerError", "ContextError", "SamplingError", "ModelNotFoundError", "QueueFullError",
    "EngineClosedError",
]
