"""Turns what the user typed after -m into a local model folder: a folder as it is, or a
Hugging Face repo id fetched into the hub's cache (config, tokenizer, one weight file)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelNotFoundError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one found is fetched


def resolve_model(spec: str | os.PathLike) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: is a file; give the model folder that holds it")
    if isinstance(spec, str) and REPO_ID.match(spec) and not spec.startswith("."):
        return fetch_from_hub(spec)
    raise ModelNotFoundError(f"{path}: no such model folder")


def fetch_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id}: not a local folder; to fetch it from the Hugging Face Hub, "
            f"pip install 'neocore[hub]' (or download its files into a folder and pass -m FOLDER)") from None

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except Exception as exc:  # offline, not cached, missing file, unknown repo, ...
            fetch.last_error = exc
            return None

    fetch.last_error = None
    config = fetch("config.json")
    if config is None:
        reason = type(fetch.last_error).__name__ if fetch.last_error else "unknown error"
        raise ModelNotFoundError(
            f"{repo_id}: not a local folder, and the Hugging Face Hub could not provide it "
            f"({reason}: offline, not cached, or no such repository); download its files into a "
            f"folder and pass -m FOLDER")
    for name in TOKENIZER_FILES:
        fetch(name)
    if not any(fetch(name) for name in WEIGHT_FILES):
        raise ModelNotFoundError(f"{repo_id}: the hub has none of {', '.join(WEIGHT_FILES)} for it")
    return config.parent
