"""Read a JSON file that must hold an object: the one place its two failure messages are worded.

Used by the checkpoint readers and the runtime alike (imports nothing but the standard library).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.errors import KilnError


def read_json_object(path: Path) -> dict[str, Any]:
    """The object in `path`; a KilnError naming the file if it is not valid JSON or not an object.
    A missing file raises FileNotFoundError: what that means differs per caller."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KilnError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise KilnError(f"{path}: expected a JSON object")
    return data
