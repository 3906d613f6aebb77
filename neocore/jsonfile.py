"""Small metadata files (JSON and text beside the weights): their contents, or one line saying
what is wrong with them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import NeocoreError


def read_small_text(path: Path, limit: int, error: type[NeocoreError]) -> str:
    """A small file's UTF-8 text, read whole: refused unless a regular file (a FIFO would
    block, /dev/zero never end) of at most limit bytes (a sparse file of gigabytes costs no
    disk, and its text would cost gigabytes of memory)."""
    if path.exists() and not path.is_file():
        raise error(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
        if size > limit:
            raise error(f"{path}: {size} bytes, too large for a {path.name} (at most {limit})")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:  # ValueError: bad UTF-8
        raise error(f"{path}: cannot read it as UTF-8 text ({exc})") from None


def json_object(text: str, source: Path, error: type[NeocoreError], unparsable: str) -> dict[str, Any]:
    """text's JSON object, else error("{source}: {unparsable} (why)"), or "expected a JSON
    object" where it holds another value."""
    try:
        data = json.loads(text)
    except ValueError as exc:  # bad JSON, or an integer too long for Python to convert
        raise error(f"{source}: {unparsable} ({exc})") from None
    except RecursionError:
        raise error(f"{source}: {unparsable} (nested too deeply)") from None
    if not isinstance(data, dict):
        raise error(f"{source}: expected a JSON object")
    return data
