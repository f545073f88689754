"""The GGUF file: one file holding weights, tokenizer and metadata, run by llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.formats.base import Format, register
from kiln.manifest import manifest_path

if TYPE_CHECKING:
    from kiln.runtime.llamacpp import LlamaCppEngine

MAGIC = b"GGUF"
SUFFIX = ".gguf"


def has_magic(path: Path) -> bool:
    """Whether the file starts with GGUF's magic (a .gguf written under another name)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@register
class GGUF(Format):
    name = "gguf"
    noun = "a GGUF file"
    hint = "a .gguf file"
    shared_kv_pool = True  # llama.cpp with kv_unified: one cell pool for every sequence
    # f32 K and V (GGML_TYPE_F32 = 0) and no flash attention: only the artifact's own rounding shows
    verification_options = {"flash_attn": False, "type_k": 0, "type_v": 0}
    rope_angle_drift = True
    approximate_gelu = True
    configurable_kv = True
    kv_cell_multiple = 256  # llama.cpp pads its KV cache to a multiple of 256 cells

    def detect(self, path: Path) -> bool:
        """A file named *.gguf (whatever its bytes: a broken one gets the reader's one-line error), or
        any file that starts with the GGUF magic."""
        return path.is_file() and (path.suffix == SUFFIX or has_magic(path))

    def open_engine(self, path: Path, **options: Any) -> LlamaCppEngine:
        from kiln.runtime.llamacpp import LlamaCppEngine

        return LlamaCppEngine(path, **options)

    def preload(self) -> None:
        from kiln.runtime.llamacpp import _llama

        _llama()

    def engine_options(self, kv_type: str | None = None, flash_attn: bool | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if flash_attn is not None:
            out["flash_attn"] = bool(flash_attn)
        if kv_type is not None:
            import llama_cpp

            t = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}", None)
            if t is None:
                raise KilnError(f"unknown KV-cache type {kv_type!r} for llama.cpp")
            out["type_k"] = out["type_v"] = t
        return out

    def manifest_path(self, path: Path) -> Path:
        return manifest_path(path)  # NAME.gguf.manifest.json beside the file

    def weights_bytes(self, path: Path) -> int:
        return path.stat().st_size

    def inspect(self, path: Path) -> dict[str, Any]:
        """From the GGUF's header alone (kiln.gguf_header: no tensor data is read, the vocabulary is
        counted, not decoded)."""
        return _description(path)


def _description(path: Path) -> dict[str, Any]:
    from kiln.gguf_header import open_gguf

    g = open_gguf(path)
    get = g.get

    arch = get("general.architecture")
    if arch is None:
        raise KilnError(f"{path}: GGUF key general.architecture is missing")
    types, n_bytes, n_el = g.tensor_totals()
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
        "file_type": get("general.file_type"), "tensor_types": types,
        "bits_per_weight": round(8 * n_bytes / max(n_el, 1), 4), "file_size": path.stat().st_size,
    }
