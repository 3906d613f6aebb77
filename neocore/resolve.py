"""Turns what the user typed after -m into a local model folder: a folder as it is, or a
Hugging Face repo id fetched into the hub's cache (config, generation config, tokenizer, one weight
file)."""
from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .config import GENERATION_CONFIG
from .errors import ModelNotFoundError, shown
from .tokenizer import HF_TOKENIZER_FILES

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_FILES = ("config.json",)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one found is fetched


def resolve_model(spec: str | os.PathLike) -> Path:
    if not isinstance(spec, (str, os.PathLike)):
        raise ModelNotFoundError(f"a model is a folder path (str or os.PathLike) or a hub id, got {shown(spec)}")
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # ~user for a user that does not exist
        raise ModelNotFoundError(f"{spec}: no such model folder (no such home directory)") from None
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: is a file; give the model folder that holds it")
    if isinstance(spec, str) and REPO_ID.match(spec) and not spec.startswith("."):
        return fetch_from_hub(spec)
    raise ModelNotFoundError(f"{path}: no such model folder")


def fetch_from_hub(repo_id: str) -> Path:
    """The repo's files from the hub cache; what the cache lacks is downloaded, if the hub can be
    reached at all (checked first, so that no network means one quick error, not retries)."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id}: not a local folder; to fetch it from the Hugging Face Hub, "
            f"pip install 'neocore[hub]' (or download its files into a folder and pass -m FOLDER)") from None
    online = not constants.HF_HUB_OFFLINE and _reachable(constants.ENDPOINT)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry chatter would break the one-line error rule

    def fetch(filename: str) -> Path | None:
        for local_only in (True, False) if online else (True,):
            try:
                return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
            except Exception:  # not cached, missing file, unknown repo, no network, ...
                continue
        return None

    try:
        config = fetch("config.json")
        if config is None:
            where = "the hub has no such repository" if online else \
                "it is not in the local hub cache and the hub cannot be reached (offline)"
            raise ModelNotFoundError(f"{repo_id}: not a local folder, and {where}; download its files "
                                     f"into a folder and pass -m FOLDER")
        for name in (*HF_TOKENIZER_FILES, GENERATION_CONFIG):  # each there or not
            fetch(name)
        if not any(fetch(name) for name in WEIGHT_FILES):
            raise ModelNotFoundError(f"{repo_id}: found none of {', '.join(WEIGHT_FILES)} for it")
    finally:
        hub_log.setLevel(level)
    return config.parent


def _reachable(endpoint: str) -> bool:
    """Whether the hub's host name resolves: a missing network fails here at once."""
    host = urlparse(endpoint).hostname
    try:
        return bool(host) and bool(socket.getaddrinfo(host, 443))
    except OSError:
        return False
