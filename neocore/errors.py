"""The exceptions neocore raises on bad input. The CLI prints each as one line."""


class NeocoreError(Exception):
    """Base class: a problem with what the user gave neocore, explained in one line."""


class ConfigError(NeocoreError):
    """config.json is missing, malformed, or describes a model neocore cannot run."""


class CheckpointError(NeocoreError):
    """A weight file is missing, truncated, malformed, hostile, or does not fit the config."""


class TokenizerError(NeocoreError):
    """Tokenizer files are missing or malformed, or ids cannot be decoded."""


class ContextError(NeocoreError):
    """A prompt or a generation does not fit in the model's context."""


class SamplingError(NeocoreError):
    """A sampling parameter is out of its valid range."""


class ModelNotFoundError(NeocoreError):
    """A model folder or hub repository id could not be resolved."""


class QueueFullError(NeocoreError):
    """The engine already has as many requests waiting as it was told to hold."""


class EngineClosedError(NeocoreError):
    """The engine is shutting down and takes no more requests."""


def shown(value: object, limit: int = 80) -> str:
    """A value as a one-line message quotes it: its repr, cut to limit characters (an integer
    past the 4300 digits Python converts to text is described instead)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[:limit - 3] + "..."
