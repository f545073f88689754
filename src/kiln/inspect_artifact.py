"""`kiln inspect`: what a checkpoint directory, GGUF file or ONNX directory contains, for people and scripts.

Artifacts describe themselves (each format's `inspect`, kiln.formats); checkpoints are read here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.formats import by_name, format_of


def inspect_path(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """An artifact (described by its format, kiln.formats) or a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise KilnError(f"{path}: no such file or directory")
    fmt = format_of(path)
    if fmt is not None:
        return fmt.inspect(path)
    if path.is_dir():
        return inspect_checkpoint(path, allow_pickle)
    raise KilnError(f"{path}: expected a checkpoint directory, a .gguf file or an ONNX model directory")


def inspect_onnx(path: Path) -> dict[str, Any]:
    """An ONNX model directory: kiln.formats.ONNX.inspect."""
    return by_name("onnx").inspect(path)


def inspect_gguf(path: Path) -> dict[str, Any]:
    """A GGUF file, from its header alone: kiln.formats.GGUF.inspect."""
    return by_name("gguf").inspect(path)


def inspect_checkpoint(path: Path, allow_pickle: bool = False) -> dict[str, Any]:
    from kiln.checkpoint import load_checkpoint
    from kiln.checkpoint.tensors import file_bytes

    ckpt = load_checkpoint(path, allow_pickle=allow_pickle)
    spec = ckpt.spec
    types: dict[str, int] = {}
    bits = {"F32": 32, "F16": 16, "BF16": 16, "F64": 64, "I8": 8, "U8": 8, "I32": 32, "I64": 64}
    total_bits = total_el = 0
    for name in ckpt.tensors.names():
        dt = ckpt.tensors.dtype(name).upper().replace("FLOAT", "F").replace("TORCH.", "")
        types[dt] = types.get(dt, 0) + 1
        n = 1
        for d in ckpt.tensors.shape(name):
            n *= d
        total_el += n
        total_bits += n * bits.get(dt, 32)
    return {
        "path": str(path), "format": "hf", "architecture": spec.hf_architecture, "family": spec.family,
        "n_params": spec.n_params, "layers": spec.n_layers, "hidden_size": spec.hidden_size,
        "heads": spec.n_heads, "kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size, "context_length": spec.rope.context_length or spec.context_length,
        "rope": {"theta": spec.rope_theta, **spec.rope.to_json()},
        "tensor_types": types, "bits_per_weight": round(total_bits / max(total_el, 1), 4),
        "file_size": file_bytes(path),
    }
