"""The GPTQ checkpoint format that auto-gptq and GPTQModel write, read and written by kiln.

Per quantized linear `X` (weight [out, in] in transformers' layout) the checkpoint holds:

* `X.qweight` int32 [in·bits/32, out]: codes packed along the input dimension, low bits first;
* `X.qzeros`  int32 [groups, out·bits/32]: zero points packed along the output dimension,
  stored minus one ("checkpoint_format": "gptq", the v1 convention every loader expects);
* `X.scales`  float16 [groups, out];
* `X.g_idx`   int32 [in]: the group of every input column (non-trivial after act-order).

The weight is `scales[g_idx[i], o] * (q[i, o] - zeros[g_idx[i], o])`. `quantization_config`
in config.json (and quantize_config.json beside it) says bits, group_size, sym, desc_act.

kiln reads such checkpoints by dequantizing on load (`GPTQTensors` presents `X.weight`), so
every consumer of a checkpoint (GGUF export, the transformers reference, eval) takes them
unchanged; the GGUF exporter asks for the integer codes instead when they fit a GGUF block
grid exactly (kiln.export.gguf_blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.checkpoint.tensors import TensorSource
from kiln.errors import KilnError
from kiln.jsonfile import read_json_object

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    desc_act: bool
    static_groups: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True
    grid: str | None = None  # kiln's GGUF grid (q4_0/q4_1/q8_0) when quantized onto one
    act_order: bool = False  # kiln quantized in act-order (with static groups, so g_idx is trivial)
    scale_search: bool = False  # kiln chose group scales by importance-weighted error (layout unchanged)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "quant_method": "gptq", "checkpoint_format": "gptq", "bits": self.bits,
            "group_size": self.group_size, "sym": self.sym, "desc_act": self.desc_act,
            "static_groups": self.static_groups, "damp_percent": self.damp_percent,
            "true_sequential": self.true_sequential,
        }
        if self.grid:
            out["kiln_grid"] = self.grid
        if self.act_order:
            out["kiln_act_order"] = True
        if self.scale_search:
            out["kiln_scale_search"] = True
        return out


def read_gptq_config(directory: Path, config: dict[str, Any]) -> GPTQConfig | None:
    """The GPTQ settings of a checkpoint, or None for an ordinary float checkpoint."""
    q = config.get("quantization_config")
    if q is None and (directory / "quantize_config.json").exists():
        q = read_json_object(directory / "quantize_config.json")
        q.setdefault("quant_method", "gptq")
    if q is None:
        return None
    method = q.get("quant_method")
    if method != "gptq":
        raise KilnError(f"{directory}: quantization method {method!r} is not supported (kiln reads GPTQ checkpoints)")
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", None):
        raise KilnError(f"{directory}: GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq', the "
                        "auto-gptq/GPTQModel default)")
    bits = q.get("bits")
    if bits not in (2, 4, 8):
        raise KilnError(f"{directory}: GPTQ bits {bits!r} not supported (2, 4 or 8)")
    group = q.get("group_size", -1)
    if not isinstance(group, int) or (group != -1 and group <= 0):
        raise KilnError(f"{directory}: GPTQ group_size {group!r} is not a positive integer or -1")
    return GPTQConfig(bits=bits, group_size=group, sym=bool(q.get("sym", True)), desc_act=bool(q.get("desc_act")),
                      static_groups=bool(q.get("static_groups", False)),
                      damp_percent=float(q.get("damp_percent", 0.01)),
                      true_sequential=bool(q.get("true_sequential", True)), grid=q.get("kiln_grid"),
                      act_order=bool(q.get("kiln_act_order", False)),
                      scale_search=bool(q.get("kiln_scale_search", False)))


@dataclass
class GPTQLinear:
    """One quantized linear, unpacked: integer codes and per-group parameters."""

    q: np.ndarray  # uint8/int32 [out, in] codes in 0 .. 2^bits - 1
    scales: np.ndarray  # float16 [groups, out]
    zeros: np.ndarray  # int32 [groups, out] (true zero points, not the stored minus-one)
    g_idx: np.ndarray  # int32 [in]
    bits: int

    def dequantize(self) -> np.ndarray:
        """float32 [out, in]: scale·(q − zero) evaluated in float32, as llama.cpp evaluates its blocks."""
        s = self.scales.astype(np.float32)[self.g_idx].T  # [out, in]
        z = self.zeros[self.g_idx].T.astype(np.float32)
        return s * (self.q.astype(np.float32) - z)

    def trivial_groups(self, group_size: int) -> bool:
        """True when groups are contiguous runs of `group_size` input columns (no act-order permutation)."""
        expected = np.arange(self.g_idx.size, dtype=np.int64) // group_size
        return bool(np.array_equal(self.g_idx.astype(np.int64), expected))

    def reordered(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> GPTQLinear:
        """The same linear with its rows and columns moved: W'[i, j] = W[rows[i], cols[j]] (None: unmoved).

        Codes move with both; a row's scales and zero points move with it; every column keeps its group, so
        g_idx moves with the columns (a column reorder that gathers each group's columns leaves it trivial)."""
        q, scales, zeros, g_idx = self.q, self.scales, self.zeros, self.g_idx
        if rows is not None:
            q, scales, zeros = q[rows], scales[:, rows], zeros[:, rows]
        if cols is not None:
            q, g_idx = q[:, cols], g_idx[cols]
        return GPTQLinear(np.ascontiguousarray(q), np.ascontiguousarray(scales), np.ascontiguousarray(zeros),
                          np.ascontiguousarray(g_idx), self.bits)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack small unsigned ints along axis 0 into int32 words, low bits first ([n, m] -> [n·bits/32, m])."""
    per = 32 // bits
    n = values.shape[0]
    if n % per:
        raise KilnError(f"cannot pack {n} rows of {bits}-bit values into 32-bit words")
    v = values.astype(np.uint32).reshape(n // per, per, *values.shape[1:])
    shifts = (np.arange(per, dtype=np.uint32) * bits).reshape(1, per, *([1] * (values.ndim - 1)))
    return np.bitwise_or.reduce(v << shifts, axis=1).view(np.int32)


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    w = words.view(np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits).reshape(1, per, *([1] * (w.ndim - 1)))
    out = (w[:, None] >> shifts) & np.uint32((1 << bits) - 1)
    return out.reshape(w.shape[0] * per, *w.shape[1:]).astype(np.int32)


def pack_linear(layer: GPTQLinear) -> dict[str, np.ndarray]:
    """The four checkpoint tensors of one linear (v1 format: zeros stored minus one)."""
    mask = (1 << layer.bits) - 1
    stored_zeros = (layer.zeros - 1) & mask
    return {
        "qweight": pack_rows(np.ascontiguousarray(layer.q.T), layer.bits),
        "qzeros": np.ascontiguousarray(pack_rows(np.ascontiguousarray(stored_zeros.T), layer.bits).T),
        "scales": np.ascontiguousarray(layer.scales.astype(np.float16)),
        "g_idx": np.ascontiguousarray(layer.g_idx.astype(np.int32)),
    }


def unpack_linear(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
                  bits: int, group_size: int, name: str) -> GPTQLinear:
    q = unpack_rows(qweight, bits).T  # [out, in]
    n_out, n_in = q.shape
    zeros = (unpack_rows(np.ascontiguousarray(qzeros.T), bits).T + 1) & ((1 << bits) - 1)
    zeros = zeros[:, :n_out]
    if g_idx is None or g_idx.size == 0:
        g = group_size if group_size > 0 else n_in
        g_idx = np.arange(n_in, dtype=np.int32) // g
    g_idx = g_idx.astype(np.int32)
    if scales.shape[1] != n_out or g_idx.shape != (n_in,) or g_idx.max(initial=0) >= scales.shape[0]:
        raise KilnError(f"GPTQ tensors of {name} have inconsistent shapes (qweight {list(qweight.shape)}, "
                        f"scales {list(scales.shape)}, g_idx {list(g_idx.shape)})")
    return GPTQLinear(q.astype(np.uint8 if bits <= 8 else np.int32), scales.astype(np.float16),
                      zeros.astype(np.int32), g_idx, bits)


class GPTQTensors(TensorSource):
    """A checkpoint's tensors with every GPTQ linear presented as its dequantized `X.weight`."""

    def __init__(self, raw: TensorSource, config: GPTQConfig):
        self._raw = raw
        self.config = config
        names = raw.names()
        self._linears = sorted({n[: -len(".qweight")] for n in names if n.endswith(".qweight")})
        hidden = {f"{b}.{s}" for b in self._linears for s in SUFFIXES}
        self._plain = [n for n in names if n not in hidden]
        if not self._linears:
            raise KilnError("GPTQ config present but no *.qweight tensors in the weights")

    @property
    def linears(self) -> list[str]:
        return list(self._linears)

    def names(self) -> list[str]:
        return self._plain + [f"{b}.weight" for b in self._linears]

    def __contains__(self, name: str) -> bool:
        return name in self._plain or (name.endswith(".weight") and name[: -len(".weight")] in self._linears)

    def _base(self, name: str) -> str | None:
        if name.endswith(".weight") and name[: -len(".weight")] in self._linears:
            return name[: -len(".weight")]
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        base = self._base(name)
        if base is None:
            return self._raw.shape(name)
        qshape = self._raw.shape(f"{base}.qweight")
        return (qshape[1], qshape[0] * 32 // self.config.bits)

    def dtype(self, name: str) -> str:
        return "F32" if self._base(name) is not None else self._raw.dtype(name)

    def linear(self, base: str) -> GPTQLinear:
        """The unpacked codes and parameters of the linear `base` (e.g. model.layers.0.mlp.up_proj)."""
        raw = self._raw
        g_idx = raw.load_raw(f"{base}.g_idx") if f"{base}.g_idx" in raw else None
        return unpack_linear(raw.load_raw(f"{base}.qweight"), raw.load_raw(f"{base}.qzeros"),
                             raw.load_raw(f"{base}.scales"), g_idx, self.config.bits, self.config.group_size, base)

    def load(self, name: str) -> np.ndarray:
        base = self._base(name)
        if base is None:
            return self._raw.load(name)
        return self.linear(base).dequantize()

    def load_raw(self, name: str) -> np.ndarray:
        return self._raw.load_raw(name)
