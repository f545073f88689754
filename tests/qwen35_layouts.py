"""Qwen3.5 as it is published, built from the tiny fixture: shared by the GGUF and ONNX tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from kiln.fixtures import build


def multimodal(dest: Path, name: str = "tiny-qwen3_5") -> Path:
    """The fixture as Qwen3.5 is published: Qwen3_5ForConditionalGeneration, the text config nested, the text
    model's tensors under model.language_model., and a (tiny, fake) vision tower beside them."""
    src = build(name, progress=False)
    dest.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.startswith(".kiln"):
            shutil.copy(f, dest / f.name)
    text = json.loads((src / "config.json").read_text())
    tie = text.pop("tie_word_embeddings")
    text.pop("architectures")
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
              "text_config": text, "vision_config": {"depth": 1, "hidden_size": 16}, "tie_word_embeddings": tie}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    weights = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in load_file(src / "model.safetensors").items()}
    weights["model.visual.blocks.0.norm1.weight"] = np.ones(16, np.float32)
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest
