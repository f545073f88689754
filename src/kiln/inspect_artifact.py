"""`kiln inspect`: what a checkpoint directory, GGUF file or ONNX directory contains, for people and scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import KilnError


def inspect_path(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise KilnError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        return inspect_gguf(path)
    if path.is_dir() and (path / "genai_config.json").exists():
        return inspect_onnx(path)
    if path.is_dir():
        return inspect_checkpoint(path, allow_pickle)
    raise KilnError(f"{path}: expected a checkpoint directory, a .gguf file or an ONNX model directory")


def inspect_onnx(path: Path) -> dict[str, Any]:
    """From genai_config.json, the graph's operator counts and kiln's manifest (when kiln wrote it)."""
    import json

    from kiln.manifest import read_manifest

    try:
        genai = json.loads((path / "genai_config.json").read_text(encoding="utf-8"))
        model, dec = genai["model"], genai["model"]["decoder"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise KilnError(f"{path / 'genai_config.json'}: not a valid onnxruntime-genai config ({exc})") from None
    manifest = read_manifest(path) or {}
    size = sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(dec.get("filename", "model.onnx")))
    n_params = manifest.get("n_params")
    return {
        "path": str(path), "format": "onnx", "architecture": model.get("type"),
        "layers": dec.get("num_hidden_layers"), "hidden_size": dec.get("hidden_size"),
        "heads": dec.get("num_attention_heads"), "kv_heads": dec.get("num_key_value_heads"),
        "vocab_size": model.get("vocab_size"), "context_length": model.get("context_length"),
        "position_ids_input": "position_ids" in dec.get("inputs", {}),
        "precision": (manifest.get("options") or {}).get("precision"),
        "rope": manifest.get("rope"), "op_counts": manifest.get("op_counts"),
        "n_params": n_params, "file_size": size,
        "bits_per_weight": round(8 * size / n_params, 4) if n_params else None,
        "verification": (manifest.get("verification") or {}).get("criterion"),
    }


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


def inspect_gguf(path: Path) -> dict[str, Any]:
    """From the GGUF's header alone (kiln.gguf_header: no tensor data is read, the vocabulary is counted,
    not decoded)."""
    from kiln.gguf_header import open_gguf

    g = open_gguf(path)
    get = g.get

    arch = get("general.architecture")
    if arch is None:
        raise KilnError(f"{path}: GGUF key general.architecture is missing")
    from kiln.export.gguf import tensor_stats

    stats = tensor_stats(g, path)
    n_el = stats.n_elements
    tied = g.tensor("output.weight") is None
    n_tokens = g.array_len("tokenizer.ggml.tokens")
    return {
        "path": str(path), "format": "gguf", "architecture": arch, "name": get("general.name"),
        "n_params": n_el, "tied_embeddings": tied,
        "layers": get(f"{arch}.block_count"), "hidden_size": get(f"{arch}.embedding_length"),
        "heads": get(f"{arch}.attention.head_count"), "kv_heads": get(f"{arch}.attention.head_count_kv"),
        "vocab_size": n_tokens if n_tokens is not None else len(get("tokenizer.ggml.tokens") or []),
        "context_length": get(f"{arch}.context_length"),
        "rope": {
            "theta": get(f"{arch}.rope.freq_base"), "type": get(f"{arch}.rope.scaling.type") or "none",
            "factor": get(f"{arch}.rope.scaling.factor"),
            "original_context": get(f"{arch}.rope.scaling.original_context_length"),
        },
        "file_type": get("general.file_type"), "tensor_types": stats.tensor_types,
        "bits_per_weight": round(stats.bits_per_weight, 4), "file_size": stats.size,
    }
