"""GGUF quantization types and llama.cpp's own quantizer.

Every quantized GGUF type goes through llama.cpp's `llama_model_quantize` (via
llama-cpp-python) rather than our own packing: that *is* the reference
implementation users compare against (same per-tensor type mix for k-quants,
same fallbacks for widths that are not multiples of 256, same imatrix use).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from kiln.compress.imatrix_file import read_imatrix
from kiln.errors import KilnError


@dataclass(frozen=True)
class QuantType:
    """A GGUF `--quant` type, parsed once (`quant_type`) and handed down as is: the writer, the quantizer,
    the recipe schema and the verification all read what they need from it, never from its name."""

    name: str
    ftype: int  # llama_ftype
    direct: bool  # written by kiln's converter itself (no llama.cpp quantizer pass)
    needs_imatrix: bool = False

    @property
    def float_dtype(self) -> str | None:
        """The torch dtype a float type rounds weights to (float32 / float16 / bfloat16); None if quantized."""
        return {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}.get(self.name)

    @property
    def gguf_type(self) -> GGMLQuantizationType | None:
        """The gguf-py tensor type kiln's own writer uses for a direct (float) type."""
        return GGMLQuantizationType[self.name.upper()] if self.direct else None


_ROWS = [
    # name, llama_ftype value (include/llama.h), direct, needs imatrix
    ("f32", 0, True), ("f16", 1, True), ("bf16", 32, True),
    ("q8_0", 7, False), ("q4_0", 2, False), ("q4_1", 3, False), ("q5_0", 8, False), ("q5_1", 9, False),
    ("q2_k", 10, False), ("q2_k_s", 21, False, True),
    ("q3_k_s", 11, False), ("q3_k_m", 12, False), ("q3_k_l", 13, False),
    ("q4_k_s", 14, False), ("q4_k_m", 15, False), ("q5_k_s", 16, False), ("q5_k_m", 17, False),
    ("q6_k", 18, False),
    ("iq1_s", 24, False, True), ("iq1_m", 31, False, True),
    ("iq2_xxs", 19, False, True), ("iq2_xs", 20, False, True), ("iq2_s", 28, False, True), ("iq2_m", 29, False, True),
    ("iq3_xxs", 23, False), ("iq3_xs", 22, False), ("iq3_s", 26, False), ("iq3_m", 27, False),
    ("iq4_nl", 25, False), ("iq4_xs", 30, False),
    ("tq1_0", 36, False), ("tq2_0", 37, False),
]
QUANT_TYPES: dict[str, QuantType] = {r[0]: QuantType(r[0], r[1], r[2], *(r[3:])) for r in _ROWS}
ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "f64": "f32"}


def quant_type(name: str) -> QuantType:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in QUANT_TYPES:
        raise KilnError(f"unknown quantization type {name!r} (known: {', '.join(QUANT_TYPES)})")
    return QUANT_TYPES[key]


def _imatrix_array(values: dict[str, np.ndarray]):
    """Build the NULL-terminated `llama_model_imatrix_data` array the C API expects."""
    import llama_cpp

    n = len(values)
    arr = (llama_cpp.llama_model_imatrix_data * (n + 1))()
    keep = []
    for i, (name, vals) in enumerate(values.items()):
        buf = np.ascontiguousarray(vals, dtype=np.float32)
        keep.append(buf)
        arr[i].name = name.encode()
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    arr[n].name = None
    return arr, keep


def quantize_gguf(src: Path, dst: Path, qtype: QuantType, imatrix: Path | None = None,
                  threads: int = 0) -> None:
    """Quantize a f32/f16/bf16 GGUF into `dst` with llama.cpp's quantizer."""
    try:
        import llama_cpp
    except ImportError:
        raise KilnError(f"--quant {qtype.name} needs llama-cpp-python (pip install 'kiln-llm[llama]')") from None
    from kiln import llamacpp_log

    llamacpp_log.install()
    if qtype.needs_imatrix and imatrix is None:
        raise KilnError(f"--quant {qtype.name} needs an importance matrix: pass --imatrix FILE")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = qtype.ftype
    params.nthread = threads
    keep = None
    if imatrix is not None:
        arr, keep = _imatrix_array(read_imatrix(imatrix))
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    llamacpp_log.clear()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise KilnError(f"llama.cpp could not quantize to {qtype.name}: {llamacpp_log.last_error() or f'error {rc}'}")
