"""The ONNX model directory: model.onnx (+ external data), genai_config.json, tokenizer files,
manifest.json; run by onnxruntime with one batch row per sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.formats.base import Format, register

if TYPE_CHECKING:
    from kiln.runtime.onnx_engine import OnnxEngine

CONFIG = "genai_config.json"  # onnxruntime-genai's description of the graph: what marks the directory


@register
class ONNX(Format):
    name = "onnx"
    noun = "an ONNX model directory"
    hint = f"a directory with {CONFIG}"
    shared_kv_pool = False  # every particle is a batch row with its own past/present buffers
    verification_rows = True

    def detect(self, path: Path) -> bool:
        return path.is_dir() and self.config_path(path).is_file()

    @staticmethod
    def config_path(path: Path) -> Path:
        """genai_config.json of the directory `path`."""
        return path / CONFIG

    def open_engine(self, path: Path, **options: Any) -> OnnxEngine:
        from kiln.runtime.onnx_engine import OnnxEngine

        return OnnxEngine(path, **options)

    def preload(self) -> None:
        from kiln.runtime.onnx_engine import _ort

        _ort()

    def manifest_path(self, path: Path) -> Path:
        return path / "manifest.json"  # inside the directory

    def weights_bytes(self, path: Path) -> int:
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.startswith("model"))

    def tokenizer_json(self, path: Path) -> Path | None:
        return path / "tokenizer.json"

    def inspect(self, path: Path) -> dict[str, Any]:
        """From genai_config.json, the graph's operator counts and kiln's manifest (when kiln wrote it)."""
        config = self.config_path(path)
        try:
            genai = json.loads(config.read_text(encoding="utf-8"))
            model, dec = genai["model"], genai["model"]["decoder"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise KilnError(f"{config}: not a valid onnxruntime-genai config ({exc})") from None
        manifest = self.manifest(path) or {}
        return _description(path, model, dec, manifest)


def _description(path: Path, model: dict[str, Any], dec: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
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
