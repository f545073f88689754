"""Model families: one registered class per Hugging Face architecture (see kiln.families.base).

Adding a family is one new module here with one `@register`ed class (docs/architecture.md). Import
the family of a checkpoint with `for_architecture`, of a config with `for_config`, of a GGUF's
general.architecture with `by_name`; `of(spec)` for a ModelSpec already read.
"""

from __future__ import annotations

from kiln.families import arbor, llama, qwen2, qwen3  # noqa: F401  (each registers its classes)
from kiln.families.base import Family, TensorRow
from kiln.families.registry import (FAMILIES, TensorDetection, by_name, claiming, detected_config, detection_for,
                                    for_architecture, for_config, register, resolve, supported)


def of(spec) -> type[Family]:
    """The family of a ModelSpec (by its HF architecture)."""
    return for_architecture(spec.hf_architecture)


__all__ = ["FAMILIES", "Family", "TensorDetection", "TensorRow", "by_name", "claiming", "detected_config",
           "detection_for", "for_architecture", "for_config", "of", "register", "resolve", "supported"]
