"""Where kiln keeps what it builds once and reuses (fixtures, downloads, wheels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root: ``$KILN_CACHE`` or ``~/.cache/kiln``, outside any repository on purpose."""
    root = os.environ.get("KILN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "kiln"


def fixtures_dir() -> Path:
    return cache_dir() / "fixtures"
