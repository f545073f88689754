"""A cache of finished generations keyed by (artifact content, prompt, options, seed).

A seeded SMC run is a pure function of those four things, so repeating it (a notebook re-run,
a recipe step, a web app asked the same question) can return the stored result instead of
decoding again. Unseeded runs are never cached: they are meant to differ.

Entries are small JSON files under `$KILN_CACHE/generations/` written atomically; a corrupt or
unreadable entry is treated as a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kiln.atomic import atomic_file
from kiln.errors import KilnError
from kiln.paths import cache_dir


def artifact_hash(path: str | Path) -> str:
    """Identity of an artifact's content: names, sizes and a sample of bytes of its files.

    Sampling (64 windows of 4 KiB per file) instead of hashing every byte keeps a lookup in
    milliseconds for multi-GB files; any re-export changes sizes or sampled bytes in practice.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode() + b"\0" + str(size).encode())
        with open(f, "rb") as fh:
            for pos in range(0, size, max(size // 64, 1)):
                fh.seek(pos)
                h.update(fh.read(4096))
    return h.hexdigest()


class GenerationCache:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "generations"

    @staticmethod
    def key(artifact: str, prompt: list[int], options: dict[str, Any], seed: int) -> str:
        blob = json.dumps({"artifact": artifact, "prompt": list(map(int, prompt)), "options": options,
                           "seed": int(seed)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        try:
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps(value), encoding="utf-8")
        except KilnError:
            pass  # a cache that cannot be written (read-only home, full disk) is only a slower run

    def clear(self) -> int:
        n = 0
        if self.root.exists():
            for p in self.root.rglob("*.json"):
                try:
                    os.unlink(p)
                    n += 1
                except OSError:
                    pass
        return n
