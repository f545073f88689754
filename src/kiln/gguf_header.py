"""A streaming reader for a GGUF file's header: metadata keys and tensor infos, nothing materialized.

Why not gguf-py's GGUFReader here: it builds a numpy view for every element of every array field,
so opening SmolLM2's GGUF (49k tokens, 49k merges) costs 165 MiB of RAM while it lives and leaves
16 MiB behind after garbage collection (measured with kiln bench's probe); for a 152k-token Qwen
vocabulary that is half a gigabyte, more than the model. The runtime opens a GGUF only to check it
before llama.cpp sees it (llama.cpp aborts the process on some malformed vocabularies, DESIGN.md §3),
so it reads just the keys it asks for and validates the structure (header, every key, every tensor
info, every tensor inside the file) with gguf-py's own constants, in a few MB.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from kiln.errors import KilnError

_SCALAR = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
           GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
           GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
MAX_STRING = 1 << 30


class _Stream:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ValueError("file ends inside the header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self, keep: bool = True) -> bytes | None:
        n = self.unpack("Q")
        if n > MAX_STRING or self.f.tell() + n > self.size:
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        if keep:
            return self.read(n)
        self.f.seek(n, os.SEEK_CUR)
        return None

    def value(self, vtype: int, keep: bool) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            raw = self.string(keep)
            return raw.decode("utf-8", errors="replace") if keep else None
        if vtype == GGUFValueType.ARRAY:
            etype, count = GGUFValueType(self.unpack("I")), self.unpack("Q")
            if etype in _SCALAR:
                width = struct.calcsize(_SCALAR[etype])
                if self.f.tell() + width * count > self.size:
                    raise ValueError("array runs past the end of the file")
                if not keep:
                    self.f.seek(width * count, os.SEEK_CUR)
                    return None
                return list(struct.unpack(f"<{count}{_SCALAR[etype]}", self.read(width * count)))
            if etype == GGUFValueType.STRING:  # kept as bytes: tokens need not be valid UTF-8
                items = [self.string(keep) for _ in range(count)]
                return items if keep else None
            return [self.value(etype, keep) for _ in range(count)] if keep else [
                self.value(etype, False) for _ in range(count)] and None
        return self.unpack(_SCALAR[vtype])


def read_header(path: str | Path, keys: Iterable[str] = ()) -> dict[str, Any]:
    """The values of `keys` (absent keys are left out), after checking the whole header and tensor table.

    String arrays come back as lists of bytes. Raises KilnError naming the problem if the file is not
    a well-formed GGUF."""
    path = Path(path)
    wanted = set(keys)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            s = _Stream(f, size)
            if s.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            version = s.unpack("I")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            n_tensors, n_kv = s.unpack("Q"), s.unpack("Q")
            out: dict[str, Any] = {}
            alignment = 32
            for _ in range(n_kv):
                key = s.string().decode("utf-8", errors="replace")
                vtype = s.unpack("I")
                keep = key in wanted or key == "general.alignment"
                value = s.value(vtype, keep)
                if key == "general.alignment":
                    alignment = int(value)
                if key in wanted:
                    out[key] = value
            end = 0
            for _ in range(n_tensors):
                name = s.string()
                dims = [s.unpack("Q") for _ in range(s.unpack("I"))]
                qtype, offset = GGMLQuantizationType(s.unpack("I")), s.unpack("Q")
                block, type_size = GGML_QUANT_SIZES[qtype]
                n = 1
                for d in dims:
                    n *= d
                if n % block:
                    raise ValueError(f"tensor {name!r}: {n} elements are not whole {qtype.name} blocks")
                end = max(end, offset + n // block * type_size)
            data_start = -(-f.tell() // alignment) * alignment
            if data_start + end > size:
                raise ValueError(f"tensor data needs {data_start + end} bytes, the file has {size} (truncated?)")
    except OSError as exc:
        raise KilnError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, struct.error) as exc:
        raise KilnError(f"{path}: not a valid GGUF file ({exc})") from None
    return out
