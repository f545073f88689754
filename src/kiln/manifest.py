"""The record written next to every artifact: where it came from, how, and how faithful it is.

Deterministic on purpose (no timestamps, sorted keys): the same input and options
give a byte-identical manifest, like the artifact itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.atomic import atomic_file, sha256_file


def file_record(path: Path) -> dict[str, Any]:
    return {"name": path.name, "sha256": sha256_file(path), "size": path.stat().st_size}


def manifest_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".manifest.json")


def write_manifest(artifact: Path, record: dict[str, Any]) -> Path:
    """`<artifact>.manifest.json` beside a single-file artifact (GGUF)."""
    return write_manifest_file(manifest_path(artifact), record)


def write_manifest_file(dest: Path, record: dict[str, Any]) -> Path:
    """The manifest at `dest` (a directory artifact keeps it inside, as `manifest.json`)."""
    body = {"kiln_version": __version__, **record}
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dest


def read_manifest_file(dest: Path) -> dict[str, Any] | None:
    """The manifest at `dest`, or None when there is none. Where an artifact keeps it is its format's
    business (kiln.formats: `Format.manifest_path`, `Format.manifest`)."""
    if not dest.is_file():
        return None
    return json.loads(dest.read_text(encoding="utf-8"))
