"""Model families: one registered class per Hugging Face architecture (see kiln.families.base).

Adding a family is one new module here with one `@register`ed class (docs/architecture.md). Import
the family of a checkpoint with `for_architecture`, of a config with `for_config`, of a GGUF's
general.architecture with `by_name`; `of(spec)` for a ModelSpec already read.
"""

from __future__ import annotations

# Each import registers its classes. Order matters only among families that claim paths: nanoGPT's
# ckpt.pt before native Arbor, which claims any other torch file.
from kiln.families import gpt2, llama, nanogpt, qwen2, qwen2_moe, qwen3, qwen3_5, qwen3_5_moe, qwen3_moe  # noqa: F401, I001
from kiln.families import arbor  # noqa: F401, E402, I001
from kiln.families.base import Family, TensorRow
from kiln.families.registry import (FAMILIES, TensorDetection, by_name, claiming, detected_config, detection_for,
                                    for_architecture, for_config, for_source, register, resolve,
                                    supported)


def of(spec) -> type[Family]:
    """The family of a ModelSpec (by its HF architecture)."""
    return for_architecture(spec.hf_architecture)


__all__ = ["FAMILIES", "Family", "TensorDetection", "TensorRow", "by_name", "claiming", "detected_config",
           "detection_for", "for_architecture", "for_config", "for_source", "of", "register", "resolve", "supported"]
