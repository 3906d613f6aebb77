"""GPT-Neo's shape, read from a Hugging Face config.json and checked for what the engine needs."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, shown
from .jsonfile import json_object, read_small_text

ATTENTION_KINDS = ("global", "local")
C_INT_MAX = 2**31 - 1  # sizes reach the engine as C ints
MAX_LAYERS = 4096      # GPT-Neo 2.7B has 32: far past any real model, short of a per-layer list bomb
CONFIG_LIMIT = 16 << 20  # bytes: a real config.json is a few KB
GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class GPTNeoConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    window_size: int
    attention_layers: tuple[str, ...]  # one of ATTENTION_KINDS per layer
    layer_norm_epsilon: float
    activation_function: str = "gelu_new"
    bos_token_id: int | None = 50256
    eos_token_ids: tuple[int, ...] = (50256,)  # generation stops at any of them, as in transformers

    @property
    def eos_token_id(self) -> int | None:
        """The end-of-text token: the first of eos_token_ids (config.json may list several)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layer_is_local(self) -> list[bool]:
        return [kind == "local" for kind in self.attention_layers]

    def num_parameters(self) -> int:
        h, f = self.hidden_size, self.intermediate_size
        per_layer = 4 * h * h + h + 2 * h * f + f + h + 4 * h
        return self.vocab_size * h + self.max_position_embeddings * h + self.num_layers * per_layer + 2 * h

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers writes for this shape (attention_types run-length coded)."""
        return {
            "model_type": "gpt_neo",
            "architectures": ["GPTNeoForCausalLM"],
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "window_size": self.window_size,
            "attention_types": [[[kind], 1] for kind in self.attention_layers],
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": self.activation_function,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id if len(self.eos_token_ids) <= 1 else list(self.eos_token_ids),
            "tie_word_embeddings": True,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config",
                  overrides: Mapping[str, Any] | None = None) -> "GPTNeoConfig":
        """Validates a config.json mapping; overrides replace its fields (and win over it)."""
        raw = dict(raw)
        known = {f.name for f in fields(cls)} - {"eos_token_ids"} | {"attention_types", "eos_token_id"}
        for key, value in (overrides or {}).items():
            if key not in known:
                raise ConfigError(f"{source}: unknown config field {key!r} in overrides")
            raw[key] = value
        model_type = raw.get("model_type", "gpt_neo")
        if model_type != "gpt_neo":
            raise ConfigError(f"{source}: model_type is {shown(model_type)}, but neocore runs only 'gpt_neo'")

        def integer(key: str, minimum: int = 1, default: Any = None) -> int:
            value = raw.get(key, default)
            if value is None:
                raise ConfigError(f"{source}: {key} is missing (give it as an override: {key}=...)")
            if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= C_INT_MAX:
                where = "override" if key in (overrides or {}) else source  # blame what set it
                raise ConfigError(f"{where}: {key} must be an integer from {minimum} to {C_INT_MAX}, got {shown(value)}")
            return value

        hidden = integer("hidden_size")
        layers = integer("num_layers")
        if layers > MAX_LAYERS:
            raise ConfigError(f"{source}: num_layers is {layers}; neocore runs at most {MAX_LAYERS}")
        heads = integer("num_heads")
        if hidden % heads:
            where = "override" if {"hidden_size", "num_heads"} & set(overrides or {}) else source
            raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_heads {heads}")
        if raw.get("tie_word_embeddings", True) is not True:
            # transformers then reads a separate lm_head.weight, which neocore has no place for
            raise ConfigError(f"{source}: tie_word_embeddings is {shown(raw['tie_word_embeddings'])}; neocore runs "
                              "GPT-Neo with its lm_head tied to the token embedding, as GPT-Neo checkpoints are")
        inner = raw.get("intermediate_size")
        inner = 4 * hidden if inner is None else integer("intermediate_size")
        # transformers derives attention_layers from attention_types (and may save both):
        # the latter is the source of truth unless the caller overrides the per-layer list.
        if overrides and "attention_layers" in overrides:
            given = overrides["attention_layers"]
            if isinstance(given, str) or not isinstance(given, (list, tuple)) \
                    or not all(isinstance(kind, str) for kind in given):
                raise ConfigError(f"override: attention_layers must be a list of 'global'/'local', one per layer, "
                                  f"got {shown(given)}")
            attention = tuple(given)
        else:
            attention = tuple(_expand_attention_types(raw.get("attention_types"), layers, source))
        if len(attention) != layers:
            raise ConfigError(f"{source}: attention_types describe {len(attention)} layers, "
                              f"but num_layers is {layers}")
        bad = sorted(set(attention) - set(ATTENTION_KINDS))
        if bad:
            raise ConfigError(f"{source}: unknown attention type(s) {bad}; expected 'global' or 'local'")
        activation = raw.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ConfigError(f"{source}: activation_function {shown(activation)} is not supported (only 'gelu_new')")
        eps = raw.get("layer_norm_epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"{source}: layer_norm_epsilon must be a number in (0, 1), got {shown(eps)}")
        bos = raw.get("bos_token_id", 50256)
        if bos is not None and not _token_id(bos):
            raise ConfigError(f"{source}: bos_token_id must be a token id (an integer >= 0) or null, got {shown(bos)}")
        return cls(
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=inner,
            vocab_size=integer("vocab_size", default=50257),
            max_position_embeddings=integer("max_position_embeddings", default=2048),
            window_size=integer("window_size", default=256),
            attention_layers=attention,
            layer_norm_epsilon=float(eps),
            activation_function=activation,
            bos_token_id=bos,
            eos_token_ids=eos_ids(raw.get("eos_token_id", 50256), source),
        )

    @classmethod
    def from_file(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "GPTNeoConfig":
        path = Path(path)
        return cls.from_dict(read_json_object(path), str(path), overrides)


def read_json_object(path: Path) -> dict[str, Any]:
    """A small JSON file's object (config.json, generation_config.json), or a ConfigError."""
    return json_object(read_small_text(path, CONFIG_LIMIT, ConfigError), path, ConfigError, "not a readable JSON file")


def _token_id(token: Any) -> bool:
    return not isinstance(token, bool) and isinstance(token, int) and 0 <= token <= C_INT_MAX


def eos_ids(eos: Any, source: str) -> tuple[int, ...]:
    """An eos_token_id field (an id, a list of them, as transformers allows, or null) as ids."""
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(_token_id(t) for t in ids):
        raise ConfigError(f"{source}: eos_token_id must be a token id (an integer >= 0), a list of them "
                          f"or null, got {shown(eos)}")
    return tuple(ids)


def generation_eos_ids(folder: Path) -> tuple[int, ...] | None:
    """The eos_token_id of the folder's generation_config.json, which transformers' generate
    stops at instead of config.json's; None where the field is absent (transformers would then
    not stop at an end-of-text token at all: config.json's is kept instead) or the file is not a
    regular one (a folder, a dangling link: transformers passes over those too)."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return None
    raw = read_json_object(path)
    return eos_ids(raw["eos_token_id"], str(path)) if "eos_token_id" in raw else None


def _expand_attention_types(types: Any, layers: int, source: str) -> list[str]:
    """[[["global", "local"], 12]] -> ["global", "local", ...] (24 entries), as transformers does."""
    if types is None:
        raise ConfigError(f"{source}: attention_types is missing")
    try:
        groups = [(kinds, repeat) for kinds, repeat in types]
        if not all(isinstance(kinds, list) and all(isinstance(k, str) for k in kinds) and isinstance(repeat, int)
                   and not isinstance(repeat, bool) and repeat >= 0 for kinds, repeat in groups):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: attention_types must look like [[['global', 'local'], 12]], "
                          f"got {shown(types, 200)}") from None
    # counted before it is built: [[['global'], 10**18]] would not fit in memory
    count = sum(len(kinds) * repeat for kinds, repeat in groups)
    if count != layers:
        raise ConfigError(f"{source}: attention_types describe {count} layers, but num_layers is {layers}")
    return [kind for kinds, repeat in groups for kind in kinds * repeat]
