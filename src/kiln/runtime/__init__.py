"""Run exported artifacts. Embeds without torch: imports only numpy and the engine's own library."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError
from kiln.runtime.engine import Engine


def load(path: str | Path, **options) -> Engine:
    """Open an artifact with the engine its format needs: a .gguf file -> llama.cpp, an ONNX
    model directory (genai_config.json + model.onnx) -> onnxruntime."""
    path = Path(path)
    if path.suffix == ".gguf":
        from kiln.runtime.llamacpp import LlamaCppEngine

        return LlamaCppEngine(path, **options)
    if not path.exists():
        raise KilnError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "genai_config.json").exists():
        from kiln.runtime.onnx_engine import OnnxEngine

        return OnnxEngine(path, **options)
    raise KilnError(f"{path}: unsupported artifact (expected a .gguf file or an ONNX directory with "
                    "genai_config.json)")


from kiln.runtime.smc import SMCResult, locally_constrained, smc, smc_batch  # noqa: E402  (after load: no cycle)

__all__ = ["Engine", "SMCResult", "load", "locally_constrained", "smc", "smc_batch"]
