"""Turns what the user typed after -m into a local model folder."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError


def resolve_model(spec: str | os.PathLike) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: is a file; give the model folder that holds it")
    raise ModelNotFoundError(f"{path}: no such model folder")
