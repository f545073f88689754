"""The single place that decides a model's effective RoPE scaling and context length.

Both exporters (GGUF keys, ONNX rotary tables) and the parity checks (the staged
transformers config) take their rope settings from here, so an artifact and the
reference it is checked against can never disagree about positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from kiln.errors import KilnError

SCALING_TYPES = ("none", "linear", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSettings:
    """RoPE scaling as both llama.cpp and transformers understand it.

    ``original_context`` is the context the model was trained at; ``context_length``
    is what the artifact advertises (llama.cpp slots and Ollama's num_ctx are capped by it),
    so baking a factor raises it to ``factor * original_context``.
    """

    type: str = "none"
    factor: float = 1.0
    original_context: int | None = None
    context_length: int | None = None
    beta_fast: float | None = None  # yarn only
    beta_slow: float | None = None
    attention_factor: float | None = None
    low_freq_factor: float | None = None  # llama3 only
    high_freq_factor: float | None = None

    @property
    def scaled(self) -> bool:
        return self.type != "none"

    def describe(self) -> str:
        if not self.scaled:
            return f"none (context {self.context_length})"
        return f"{self.type} x{self.factor:g} (original {self.original_context}, context {self.context_length})"

    def hf_rope_parameters(self, rope_theta: float) -> dict[str, Any]:
        """The `rope_parameters` block transformers 5 reads (also valid as `rope_scaling`)."""
        params: dict[str, Any] = {"rope_theta": rope_theta}
        if not self.scaled:
            params["rope_type"] = "default"
            return params
        params.update(rope_type=self.type, type=self.type, factor=float(self.factor),
                      original_max_position_embeddings=int(self.original_context or 0))
        for key in ("beta_fast", "beta_slow", "attention_factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, key)
            if value is not None:
                params[key] = value
        return params

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def from_config(config: dict[str, Any], source: str) -> RopeSettings:
    """Read the scaling a checkpoint's config.json declares (`rope_parameters` or `rope_scaling`)."""
    max_pos = config.get("max_position_embeddings")
    block = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(block, dict):
        raise KilnError(f"{source}: rope_scaling must be an object, got {block!r}")
    kind = block.get("rope_type") or block.get("type") or "default"
    if kind in ("default", "none", None):
        return RopeSettings(context_length=max_pos, original_context=max_pos)
    if kind not in SCALING_TYPES:
        raise KilnError(f"{source}: rope scaling type {kind!r} is not supported (supported: linear, yarn, llama3)")
    factor = block.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise KilnError(f"{source}: rope scaling 'factor' must be a positive number, got {factor!r}")
    original = block.get("original_max_position_embeddings")
    if kind == "linear":
        original = original or max_pos
    elif original is None:
        if kind == "yarn":
            raise KilnError(f"{source}: yarn rope scaling needs 'original_max_position_embeddings'")
        original = max_pos
    context = max(int(max_pos or 0), int(round(factor * original)))
    return RopeSettings(
        type=kind, factor=float(factor), original_context=int(original), context_length=context,
        beta_fast=block.get("beta_fast"), beta_slow=block.get("beta_slow"),
        attention_factor=block.get("attention_factor"),
        low_freq_factor=block.get("low_freq_factor"), high_freq_factor=block.get("high_freq_factor"),
    )


def parse_scaling(text: str) -> tuple[str, float]:
    """Parse ``--rope-scaling TYPE:FACTOR`` (or ``none``)."""
    if text.strip().lower() == "none":
        return "none", 1.0
    kind, sep, factor_text = text.partition(":")
    kind = kind.strip().lower()
    if kind not in ("linear", "yarn") or not sep:
        raise KilnError(f"--rope-scaling {text!r}: expected linear:FACTOR, yarn:FACTOR or none")
    try:
        factor = float(factor_text)
    except ValueError:
        raise KilnError(f"--rope-scaling {text!r}: factor {factor_text!r} is not a number") from None
    if not math.isfinite(factor) or factor <= 0:
        raise KilnError(f"--rope-scaling {text!r}: factor must be a positive number")
    if factor < 1:
        raise KilnError(f"--rope-scaling {text!r}: a factor below 1 shrinks the context; use --context instead")
    return kind, factor


def resolve(
    native: RopeSettings,
    scaling: str | None = None,
    original_context: int | None = None,
    context: int | None = None,
    allow_shorter_context: bool = False,
) -> RopeSettings:
    """Combine the checkpoint's own settings with the user's overrides into what gets baked.

    Refuses nonsense rather than writing an artifact that silently misbehaves: a
    context beyond what the scaling supports, or below the trained context unless asked.
    """
    settings = native
    trained = native.original_context or native.context_length
    if original_context is not None:
        if original_context <= 0:
            raise KilnError(f"--original-context must be positive, got {original_context}")
        if scaling is None and not native.scaled:
            raise KilnError("--original-context only makes sense with --rope-scaling")
    if scaling is not None:
        kind, factor = parse_scaling(scaling)
        if kind == "none":
            settings = RopeSettings(context_length=trained, original_context=trained)
        else:
            base = original_context or trained
            if base is None:
                raise KilnError("the checkpoint declares no max_position_embeddings: pass --original-context")
            settings = RopeSettings(type=kind, factor=factor, original_context=int(base),
                                    context_length=int(round(factor * base)))
    elif original_context is not None:
        settings = replace(settings, original_context=original_context,
                           context_length=int(round(settings.factor * original_context)))
    if context is not None:
        if context <= 0:
            raise KilnError(f"--context must be positive, got {context}")
        supported = settings.context_length or 0
        if context > supported:
            hint = "" if settings.scaled else "; pass --rope-scaling linear:F or yarn:F to extend it"
            raise KilnError(f"--context {context} exceeds what the rope settings support ({supported}){hint}")
        floor = settings.original_context or supported
        if context < floor and not allow_shorter_context:
            raise KilnError(f"--context {context} is below the model's trained context {floor}; "
                            "pass --allow-shorter-context if that is intended")
        settings = replace(settings, context_length=context)
    return settings
