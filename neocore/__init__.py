"""neocore: a fast, exact CPU inference engine for EleutherAI GPT-Neo models."""
from .config import GPTNeoConfig
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
