"""Importance matrices in the two file formats llama.cpp's quantizer reads.

llama-cpp-python exposes `llama_model_quantize` but not llama.cpp's imatrix loader
(it lives in the CLI's `common/`), so the files are read here. Semantics follow
common/imatrix-loader.cpp and tools/quantize: legacy `.dat` stores sums already
averaged per chunk and a call count to divide by; the GGUF format stores
`<tensor>.in_sum2` and `<tensor>.counts`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from kiln.atomic import atomic_file
from kiln.errors import KilnError


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Tensor name -> per-column importance (float32), as llama.cpp's quantizer uses it."""
    path = Path(path)
    if not path.exists():
        raise KilnError(f"{path}: imatrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise KilnError(f"{path}: truncated imatrix file")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise KilnError(f"{path}: not an imatrix file (no entries)")
    out: dict[str, np.ndarray] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length <= 0 or pos + length > len(data):
            raise KilnError(f"{path}: corrupt imatrix entry name")
        name = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise KilnError(f"{path}: corrupt imatrix entry {name!r}")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = sums / ncall if ncall > 0 else sums.copy()
    return out


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    """llama-imatrix's GGUF format, through kiln's one GGUF reader (same checks, same messages)."""
    from kiln.gguf_header import open_gguf

    g = open_gguf(path)
    tensors = {t.name: np.asarray(g.tensor_data(t), dtype=np.float32).reshape(-1) for t in g.tensors}
    out: dict[str, np.ndarray] = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise KilnError(f"{path}: {base}.counts is missing")
        per = sums.reshape(len(counts), -1)
        values = np.where(counts[:, None] > 0, per / np.maximum(counts[:, None], 1), 1.0)
        out[base] = values.reshape(-1).astype(np.float32)
    if not out:
        raise KilnError(f"{path}: no imatrix entries found")
    return out


def write_legacy_imatrix(path: str | Path, values: dict[str, np.ndarray], ncall: int | dict[str, int],
                         dataset: str = "", chunks: int | None = None) -> Path:
    """Write the legacy `.dat` format (`values` already averaged per token, like llama-imatrix): per entry its
    name, ncall (one number, or per entry: llama-imatrix writes each entry's own) and the values times ncall;
    then the chunk count (`chunks`, default the one ncall) and the dataset name. A stacked experts entry is
    its experts' values one after another (llama.cpp's quantizer takes expert e's from offset e x columns)."""
    path = Path(path)
    calls = ncall if isinstance(ncall, dict) else dict.fromkeys(values, ncall)
    if chunks is None:
        if isinstance(ncall, dict):
            raise ValueError("write_legacy_imatrix: per-entry ncall needs the chunk count")
        chunks = ncall
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, vals in values.items():
            encoded = name.encode()
            vals = np.asarray(vals, dtype="<f4")
            f.write(struct.pack("<i", len(encoded)))
            f.write(encoded)
            f.write(struct.pack("<ii", calls[name], vals.size))
            f.write((vals * calls[name]).astype("<f4").tobytes())
        encoded = dataset.encode()
        f.write(struct.pack("<ii", chunks, len(encoded)))
        f.write(encoded)
    return path
