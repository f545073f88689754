"""The record a finished step leaves beside its outputs, and the content digests the cache keys use.

`.<step>.step.json` in the output directory holds the step's cache key, every output file with
its sha256, size and mtime, and the step's result (figures for the report). It is written only
after every output is complete and removed before a step starts again, so a record always
describes finished outputs. Re-hashing is skipped while a file's size and mtime are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kiln.atomic import atomic_file, sha256_file


def state_path(output: Path, step_id: str) -> Path:
    return output / f".{step_id}.step.json"


def _files(output: Path, name: str) -> list[Path]:
    path = output / name
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.is_file() else []


def describe_outputs(output: Path, names: list[str], known: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """{relative path: {sha256, size, mtime_ns}} of every file of `names`, or None if one is missing.

    `known` (a previous description) lends its sha256 to files whose size and mtime did not change.
    """
    known = known or {}
    files: dict[str, Any] = {}
    for name in names:
        found = _files(output, name)
        if not found:
            return None
        for path in found:
            rel = path.relative_to(output).as_posix()
            st = path.stat()
            old = known.get(rel)
            if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
                sha = old["sha256"]
            else:
                sha = sha256_file(path)
            files[rel] = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return files


def digest(files: dict[str, Any]) -> str:
    """One hash of a step's outputs: names and contents, not times."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def dir_digest(path: Path) -> str:
    """Content hash of a directory of inputs (a LoRA adapter): every file's name and sha256."""
    files = {p.relative_to(path).as_posix(): {"sha256": sha256_file(p)} for p in sorted(path.rglob("*"))
             if p.is_file()}
    return digest(files)


def read_state(output: Path, step_id: str) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path(output, step_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "key" in data and "files" in data else None


def write_state(output: Path, step_id: str, record: dict[str, Any]) -> None:
    with atomic_file(state_path(output, step_id)) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def invalidate_state(output: Path, step_id: str) -> None:
    """Before a step runs again: its record stops counting as a cache hit (no key) but keeps naming
    the files the step wrote, so an interrupted rerun still knows they are kiln's to replace."""
    path = state_path(output, step_id)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return
    files = data.get("files") if isinstance(data, dict) else None
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"step": step_id, "files": files if isinstance(files, dict) else {}},
                                  indent=2, sort_keys=True) + "\n", encoding="utf-8")


def recorded_outputs(output: Path) -> set[str]:
    """Every relative path some step's record (finished or invalidated) says kiln wrote in `output`."""
    found: set[str] = set()
    for path in output.glob(".*.step.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        files = data.get("files") if isinstance(data, dict) else None
        if isinstance(files, dict):
            found.update(k for k in files if isinstance(k, str))
    return found
