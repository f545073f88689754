"""kiln's one GGUF reader: the header streamed and checked once, values and tensor data read on demand.

Every part of kiln that opens a GGUF goes through `open_gguf` (or `read_header`), so a broken file
gets the same one-line `KilnError` whichever command met it: `{path}: not a valid GGUF file (...)`.

Why not gguf-py's GGUFReader: it builds a numpy view for every element of every array field,
so opening SmolLM2's GGUF (49k tokens, 49k merges) costs 165 MiB of RAM while it lives and leaves
16 MiB behind after garbage collection (measured with kiln bench's probe); for a 152k-token Qwen
vocabulary that is half a gigabyte, more than the model. It also reports a damaged file with
whatever numpy says ("cannot reshape array of size 33254 into shape (512,256)"). Here the header
is streamed once (every key, every tensor info, every tensor's bytes inside the file, with
gguf-py's own constants) keeping only where each key's value lies; a key is decoded when asked
for, and a tensor's bytes are memory-mapped only when asked for, so checking a file costs a few
MB. The runtime checks a GGUF this way before llama.cpp sees it: llama.cpp aborts the process on
some malformed vocabularies (DESIGN.md §3).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from kiln.errors import KilnError

_SCALAR = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
           GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
           GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
_WIDTH = {t: struct.calcsize("<" + f) for t, f in _SCALAR.items()}
_U64 = struct.Struct("<Q")
MAX_NAME = 65535  # GGUF's limit on a key name; tensor names are held to it too (llama.cpp: 63)
MAX_DIMS = 4  # GGML_MAX_DIMS
# the stored element types whose data gguf-py's GGUFReader hands out as that numpy type (others: raw bytes)
_NUMPY = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


class _Bad(Exception):
    """A structural problem; `open_gguf` turns it into the one-line KilnError."""


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor's info from the header, checked to lie inside the file."""

    name: str
    shape: tuple[int, ...]  # ggml order (fastest-varying first), as gguf-py's ReaderTensor.shape
    tensor_type: GGMLQuantizationType
    n_elements: int
    n_bytes: int
    offset: int  # absolute byte offset of the data in the file

    @property
    def np_shape(self) -> tuple[int, ...]:
        """numpy (row-major) order: ggml's shape reversed, i.e. HF's [out, in] for a matrix."""
        return tuple(reversed(self.shape))


@dataclass(frozen=True)
class _Key:
    vtype: GGUFValueType
    etype: GGUFValueType | None  # element type of an array
    count: int  # elements of an array (1 otherwise)
    start: int  # first byte of the value (after the type field)
    end: int


class _Stream:
    """Checked little-endian reads: every length is compared with the file's size before it is used,
    so a length field damaged into 2**60 is a clean error, never an allocation."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def tell(self) -> int:
        return self.f.tell()

    def need(self, n: int, what: str) -> None:
        if self.f.tell() + n > self.size:
            raise _Bad(_past_end(what, self.size))

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        if len(data) != n:  # the file shrank under us
            raise _Bad(_past_end(what, self.size))
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, 1)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))[0]

    def name(self, what: str) -> str:
        n = self.unpack("Q", what)
        if n > MAX_NAME:
            raise _Bad(f"{what} is {n} bytes long (at most {MAX_NAME})")
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not valid UTF-8 ({raw[:40]!r})") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Walk over `count` strings (a vocabulary: 150k of them) reading their lengths from 1 MiB
        blocks rather than one small read and seek per string."""
        pos, size, block, base = self.f.tell(), self.size, b"", 0
        for _ in range(count):
            if pos + 8 > size:
                raise _Bad(_past_end(what, size))
            if pos + 8 > base + len(block):
                self.f.seek(pos)
                block, base = self.f.read(1 << 20), pos
                if len(block) < 8:  # the file shrank under us
                    raise _Bad(_past_end(what, size))
            pos += 8 + _U64.unpack_from(block, pos - base)[0]
        if pos > size:
            raise _Bad(_past_end(what, size))
        self.f.seek(pos)

    def skip_value(self, vtype: int, what: str) -> _Key:
        """Walk over one value without keeping it; where it lies, for decoding later."""
        start = self.tell()
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            raise _Bad(f"{what} has unknown value type {vtype}") from None
        etype, count = None, 1
        if vt == GGUFValueType.STRING:
            self.skip(self.unpack("Q", what), what)
        elif vt == GGUFValueType.ARRAY:
            raw_etype, count = self.unpack("I", what), self.unpack("Q", what)
            try:
                etype = GGUFValueType(raw_etype)
            except ValueError:
                raise _Bad(f"{what} is an array of unknown value type {raw_etype}") from None
            if etype == GGUFValueType.ARRAY:
                raise _Bad(f"{what} is an array of arrays, which llama.cpp does not read")
            if etype == GGUFValueType.STRING:
                self.need(8 * count, what)  # every string has at least its length
                self.skip_strings(count, what)
            else:
                self.skip(_WIDTH[etype] * count, what)
        else:
            self.skip(_WIDTH[vt], what)
        return _Key(vt, etype, count, start, self.tell())


def _past_end(what: str, size: int) -> str:
    return f"{what} runs past the end of the file at byte {size}; truncated?"


class GGUFFile:
    """A GGUF file whose header has been checked: keys (decoded on demand) and tensor infos.

    Holds no decoded values: each `get` re-reads just that key's bytes; the file is memory-mapped
    (read-only, nothing loaded until touched) on the first `tensor_data`. Strings decode as UTF-8
    (strictly, as gguf-py's GGUFReader does); values come back as Python values, arrays as lists:
    the values GGUFReader's `field.contents()` gives. Little-endian files only (what llama.cpp
    writes and reads on every machine kiln runs on)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map: np.memmap | None = None
        try:
            self.size = self.path.stat().st_size
            with self.path.open("rb", buffering=1 << 16) as f:
                self._parse(_Stream(f, self.size))
        except OSError as exc:
            raise KilnError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        except _Bad as exc:
            raise self._invalid(str(exc)) from None

    def _invalid(self, detail: str) -> KilnError:
        return KilnError(f"{self.path}: not a valid GGUF file ({detail})")

    def _parse(self, s: _Stream) -> None:
        head = s.f.read(4)
        if not head:
            raise _Bad("the file is empty")
        if head != b"GGUF":
            if b"GGUF".startswith(head):
                raise _Bad(_past_end("the magic", self.size))
            raise _Bad(f"no GGUF magic: the file starts with {head!r}, not b'GGUF'")
        self.version = s.unpack("I", "the header")
        if self.version in (2 << 24, 3 << 24):
            raise _Bad("a big-endian GGUF; kiln reads little-endian files only")
        if self.version not in (2, 3):
            raise _Bad(f"GGUF version {self.version} is not supported (kiln reads versions 2 and 3)")
        n_tensors, n_kv = s.unpack("Q", "the header"), s.unpack("Q", "the header")
        # the least a key (name length, type, one byte) and a tensor info (name length, n_dims, type,
        # offset) can take: a damaged count fails here rather than after a long walk
        if 13 * n_kv + 24 * n_tensors > self.size - s.tell():
            raise _Bad(_past_end(f"the header, with {n_kv} keys and {n_tensors} tensor infos,", self.size))
        self._keys: dict[str, _Key] = {}
        for i in range(n_kv):
            key = s.name(f"the name of key {i}")
            if key in self._keys:
                raise _Bad(f"key {key!r} appears twice")
            self._keys[key] = s.skip_value(s.unpack("I", f"key {key!r}"), f"key {key!r}")
        self.alignment = 32
        align = self._keys.get("general.alignment")
        if align is not None:
            if align.vtype != GGUFValueType.UINT32:
                raise _Bad(f"general.alignment has type {align.vtype.name}, not UINT32")
            here = s.tell()
            self.alignment = self._decode(s.f, "general.alignment", align, raw=False)
            s.f.seek(here)
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise _Bad(f"general.alignment {self.alignment} is not a power of two")
        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = s.name(f"the name of tensor {i}")
            if name in names:
                raise _Bad(f"tensor {name!r} appears twice")
            names.add(name)
            what = f"the info of tensor {name!r}"
            n_dims = s.unpack("I", what)
            if n_dims > MAX_DIMS:
                raise _Bad(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            dims = tuple(s.unpack("Q", what) for _ in range(n_dims))
            raw_type, offset = s.unpack("I", what), s.unpack("Q", what)
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise _Bad(f"tensor {name!r} has unknown type {raw_type}") from None
            if (dims[0] if dims else 1) % block:
                raise _Bad(f"tensor {name!r}: rows of {dims[0] if dims else 1} elements are not whole "
                           f"{qtype.name} blocks of {block}")
            if offset % self.alignment:
                raise _Bad(f"tensor {name!r}: data offset {offset} is not a multiple of the alignment "
                           f"{self.alignment}")
            n = 1
            for d in dims:
                n *= d or 1
            if n >= 1 << 62:  # zero dimensions aside: numpy cannot hold such a shape, not even empty
                raise _Bad(f"tensor {name!r} has an impossible shape {list(dims)}")
            n = n if all(dims) else 0
            infos.append((name, dims, qtype, n, n // block * type_size, offset))
        self.data_offset = -(-s.tell() // self.alignment) * self.alignment
        self.tensors: list[GGUFTensor] = []
        for name, dims, qtype, n, n_bytes, offset in infos:
            start = self.data_offset + offset
            if start + n_bytes > self.size:
                raise _Bad(_past_end(f"the data of tensor {name!r}, bytes {start} to {start + n_bytes},",
                                     self.size))
            self.tensors.append(GGUFTensor(name, dims, qtype, n, n_bytes, start))

    # --- keys ---------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def keys(self) -> list[str]:
        return list(self._keys)

    def value_type(self, key: str) -> GGUFValueType | None:
        """The key's value type (None when absent)."""
        k = self._keys.get(key)
        return k.vtype if k is not None else None

    def tensor_totals(self) -> tuple[dict[str, int], int, int]:
        """(tensor count by ggml type name, all tensor bytes, all tensor elements): real bits per weight
        is 8 * bytes / elements, as `kiln inspect` and every export manifest report it."""
        types: dict[str, int] = {}
        n_bytes = n_el = 0
        for t in self.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
            n_bytes += t.n_bytes
            n_el += t.n_elements
        return types, n_bytes, n_el

    def array_len(self, key: str) -> int | None:
        """Elements of an array key without decoding them (None when absent or not an array)."""
        k = self._keys.get(key)
        return k.count if k is not None and k.vtype == GGUFValueType.ARRAY else None

    def get(self, key: str, default: Any = None, raw: bool = False) -> Any:
        """The key's value (`default` when absent). `raw`: strings as bytes, undecoded (token
        pieces need not be valid UTF-8); otherwise text that is not UTF-8 is a KilnError."""
        k = self._keys.get(key)
        if k is None:
            return default
        try:
            with self.path.open("rb") as f:
                return self._decode(f, key, k, raw)
        except OSError as exc:
            raise KilnError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        except _Bad as exc:
            raise self._invalid(str(exc)) from None

    def _decode(self, f: BinaryIO, key: str, k: _Key, raw: bool) -> Any:
        f.seek(k.start)
        buf = f.read(k.end - k.start)
        if len(buf) != k.end - k.start:
            raise _Bad(_past_end(f"key {key!r}", self.size))

        def text(b: bytes) -> str | bytes:
            if raw:
                return b
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                raise _Bad(f"key {key!r} holds text that is not valid UTF-8 ({b[:40]!r})") from None

        try:
            return self._value(buf, k, text)
        except struct.error:  # the file changed since it was checked
            raise _Bad(_past_end(f"key {key!r}", self.size)) from None

    @staticmethod
    def _value(buf: bytes, k: _Key, text: Any) -> Any:
        if k.vtype == GGUFValueType.STRING:
            return text(buf[8:])
        if k.vtype != GGUFValueType.ARRAY:
            return struct.unpack_from("<" + _SCALAR[k.vtype], buf)[0]
        if k.etype != GGUFValueType.STRING:
            return list(struct.unpack_from(f"<{k.count}{_SCALAR[k.etype]}", buf, 12))
        out, pos, view = [], 12, memoryview(buf)
        for _ in range(k.count):
            (n,) = _U64.unpack_from(buf, pos)
            out.append(text(bytes(view[pos + 8:pos + 8 + n])))
            pos += 8 + n
        return out

    # --- tensors ------------------------------------------------------------------------------
    def tensor(self, name: str) -> GGUFTensor | None:
        return next((t for t in self.tensors if t.name == name), None)

    def tensor_data(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's stored bytes, a read-only view of the mapped file, as gguf-py's ReaderTensor.data:
        F32, F16, F64 and integer types as that numpy type in `np_shape`, every other type as uint8
        rows of blocks. Nothing is read until it is used."""
        shape = t.np_shape or (1,)
        if t.tensor_type in _NUMPY:
            dtype: Any = _NUMPY[t.tensor_type]
        else:
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            dtype, shape = np.uint8, (*shape[:-1], shape[-1] // block * type_size)
        if t.n_bytes == 0:
            return np.zeros(shape, dtype)
        try:
            if self._map is None:  # one read-only mapping of the file, as GGUFReader has; pages load on use
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            return self._map[t.offset:t.offset + t.n_bytes].view(dtype).reshape(shape)
        except OSError as exc:
            raise KilnError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        except ValueError:  # the file shrank since it was checked
            raise self._invalid(_past_end(f"the data of tensor {t.name!r}", self.path.stat().st_size)) from None

    def dequantize(self, t: GGUFTensor) -> np.ndarray:
        """The tensor as float32 in `np_shape` (gguf-py's `gguf.quants.dequantize`; F32 stays a
        read-only view of the mapped file)."""
        from gguf.quants import dequantize

        if t.n_elements == 0:  # a zero dimension: gguf-py's block code cannot reshape an empty array
            return np.zeros(t.np_shape, np.float32)
        try:
            w = dequantize(self.tensor_data(t), t.tensor_type)
        except NotImplementedError:
            raise KilnError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf-py "
                            "cannot dequantize") from None
        return w.reshape(t.np_shape)


def open_gguf(path: str | Path) -> GGUFFile:
    """Check `path`'s whole header and tensor table; a KilnError naming the problem if it is not a
    well-formed GGUF (truncated, no magic, unknown version, unknown key or tensor type, data past
    the end of the file)."""
    return GGUFFile(path)


def read_header(path: str | Path, keys: Iterable[str] = ()) -> dict[str, Any]:
    """The values of `keys` (absent keys are left out), after checking the whole header and tensor table.

    String arrays come back as lists of bytes (tokens need not be valid UTF-8), single strings as
    text (undecodable bytes replaced). Raises KilnError naming the problem if the file is not a
    well-formed GGUF."""
    g = GGUFFile(path)
    out: dict[str, Any] = {}
    for key in keys:
        if key in g:
            value = g.get(key, raw=True)
            out[key] = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    return out
