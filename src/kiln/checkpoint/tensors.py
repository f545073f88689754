"""Lazy, streaming access to a checkpoint's tensors.

Own safetensors reader on purpose: the `safetensors` package's numpy backend cannot
return bf16 and its torch backend would make plain GGUF export depend on torch. The
format is a little-endian u64 header length, a JSON header and raw buffers, so we
read one tensor at a time with plain reads: peak memory stays near the
largest tensor, not the model. Pickle checkpoints are read only on request, with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset
    end: int


def _read_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise KilnError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise KilnError(f"{path}: corrupt safetensors header (length {n} exceeds file size {size})")
        raw = f.read(n)
        if len(raw) != n:
            raise KilnError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSONDecodeError, 4300+ digit ints
            raise KilnError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise KilnError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    infos = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            if (not isinstance(dtype, str)
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (lo, hi, *shape))
                    or hi < lo):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise KilnError(f"{path}: corrupt safetensors entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise KilnError(f"{path}: tensor {name!r} has unsupported dtype {dtype:.40}")
        # Python ints: a damaged shape like [2**62, 8] must not wrap around in int64 and pass
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        if math.prod(d for d in shape if d) * itemsize >= 2**63:  # numpy refuses such a shape even empty
            raise KilnError(f"{path}: tensor {name!r} has an impossible shape {list(shape)}")
        expected = math.prod(shape) * itemsize
        if hi - lo != expected:
            raise KilnError(f"{path}: tensor {name!r} has {hi - lo} bytes, shape {list(shape)} needs {expected}")
        if base + hi > size:
            raise KilnError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte {base + hi}, "
                            f"file has {size})")
        infos.append(TensorInfo(name, dtype, shape, path, base + lo, base + hi))
    return infos


class TensorSource:
    """Named tensors of a checkpoint, loaded one at a time as float32 numpy arrays."""

    def __init__(self, infos: dict[str, TensorInfo], pickled: dict[str, np.ndarray] | None = None):
        self._infos = infos
        self._pickled = pickled or {}

    def names(self) -> list[str]:
        return list(self._infos) + list(self._pickled)

    def __contains__(self, name: str) -> bool:
        return name in self._infos or name in self._pickled

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._pickled:
            return tuple(self._pickled[name].shape)
        return self._infos[name].shape

    def dtype(self, name: str) -> str:
        if name in self._pickled:
            return str(self._pickled[name].dtype)
        return self._infos[name].dtype

    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 array (a copy; the mapped file is never written)."""
        if name in self._pickled:
            return np.asarray(self._pickled[name], dtype=np.float32)
        raw = self.load_raw(name)
        if self._infos[name].dtype == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)

    def load_raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (packed integer tensors must not pass through float32)."""
        if name in self._pickled:
            return np.asarray(self._pickled[name])
        info = self._infos[name]
        # pread into a fresh buffer rather than memory-mapping: mapped pages stay in the
        # process's RSS for the life of the mapping (the whole file by the end), read pages don't.
        buf = bytearray(info.end - info.start)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            if f.readinto(buf) != len(buf):
                raise KilnError(f"{info.file}: truncated while reading tensor {name!r}")
        return np.frombuffer(buf, dtype=_DTYPES[info.dtype]).reshape(info.shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names():
            yield name, self.load(name)


def open_safetensors(files: list[Path]) -> TensorSource:
    infos: dict[str, TensorInfo] = {}
    for path in files:
        for info in _read_header(path):
            if info.name in infos:
                raise KilnError(f"{path}: tensor {info.name!r} also appears in {infos[info.name].file.name}")
            infos[info.name] = info
    return TensorSource(infos)


# Lines of torch's weights_only error text that are advice, not a description of the file: they
# point the user at loading the file unsafely, which kiln never suggests.
_TORCH_ADVICE = ("weights_only", "Weights only", "can still be loaded", "safe_globals", "documentation of torch.load",
                 "Please file an issue", "trusted source", "trust the source", "arbitrary code")
# the name torch reports comes from the file: keep it to what a Python dotted name can hold
_REFUSED_OBJECT = re.compile(r"GLOBAL ([\w.<>]{1,120})|reduce for unrecognized function|Can only create new object")


def _torch_detail(text: str) -> str | None:
    """The first line of torch's message that describes the file (not its advice), if any."""
    for line in text.splitlines():
        line = line.strip().removeprefix("Weights only load failed.").strip()
        if line and not any(a in line for a in _TORCH_ADVICE):
            return "".join(c if c.isprintable() else "?" for c in line[:200])  # text from the file: no escapes
    return None


def pickle_error(path: Path, exc: BaseException) -> KilnError:
    """One line saying what kiln refused and why, instead of torch's text (whose first line, "Weights
    only load failed. This file can still be loaded...", steers the user toward an unsafe load)."""
    text = str(exc)
    unsafe = _REFUSED_OBJECT.search(text)
    if unsafe is not None:
        what = f"GLOBAL {unsafe.group(1)}" if unsafe.group(1) else _torch_detail(text)
        return KilnError(f"{path}: refused: the pickle holds objects other than tensors and plain containers"
                         f"{f' ({what})' if what else ''}; kiln loads pickles only with torch's weights_only "
                         "loader and never runs code from a checkpoint")
    detail = _torch_detail(text) or type(exc).__name__
    if "Weights only load failed" in text:
        return KilnError(f"{path}: torch's weights_only loader cannot read this pickle ({detail}); kiln never "
                         "runs code from a checkpoint")
    return KilnError(f"{path}: cannot read the pickle ({detail})")


def torch_load_weights(path: Path, mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True` (tensors and plain containers only: no code from the
    file runs); every failure is a one-line KilnError (`pickle_error`). `mmap` applies to torch's
    zip format only (torch refuses it for the legacy one, which is then read plainly)."""
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise pickle_error(path, exc) from None


def open_pickle(files: list[Path]) -> TensorSource:
    """Read `pytorch_model*.bin` with torch's safe loader (no code from the file is executed)."""
    try:
        import torch
    except ImportError:
        raise KilnError("reading .bin checkpoints needs torch (pip install 'kiln-llm[torch]')") from None
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        state = torch_load_weights(path, mmap=True)
        if not isinstance(state, dict):
            raise KilnError(f"{path}: expected a state dict, found {type(state).__name__}")
        for name, value in state.items():
            if isinstance(value, torch.Tensor):  # packed integer tensors (GPTQ) keep their dtype
                tensors[name] = value.float().numpy() if value.is_floating_point() else value.numpy()
    return TensorSource({}, tensors)


def find_weight_files(directory: Path, allow_pickle: bool) -> tuple[str, list[Path]]:
    """Locate single or sharded weights; an index file decides the shard list when present."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise KilnError(f"{index}: corrupt index (no weight_map)") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise KilnError(f"{index}: shard {missing[0]} is missing")
        return "safetensors", files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return "safetensors", files
    bins = sorted(p for p in directory.glob("*.bin") if p.name != "training_args.bin")
    if bins:
        if not allow_pickle:
            raise KilnError(f"{directory}: only pickle weights ({bins[0].name}) found; pickle can run code, "
                            "pass --allow-pickle to load them with torch's weights_only loader")
        return "pickle", bins
    raise KilnError(f"{directory}: no weights found (*.safetensors or, with --allow-pickle, *.bin)")


def open_weights(directory: Path, allow_pickle: bool = False) -> TensorSource:
    kind, files = find_weight_files(directory, allow_pickle)
    return open_safetensors(files) if kind == "safetensors" else open_pickle(files)


def file_bytes(directory: Path) -> int:
    return sum(os.path.getsize(p) for p in directory.iterdir() if p.is_file())
