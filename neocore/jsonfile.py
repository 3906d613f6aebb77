"""A JSON file's top-level object, or one line saying what is wrong with it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import NeocoreError


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
