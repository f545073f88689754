"""Qwen3ForCausalLM: Qwen2's decoder with RMSNorm on q and k per head and no q/k/v biases by default."""

from __future__ import annotations

from kiln.families.base import Family
from kiln.families.registry import register


@register
class Qwen3(Family):
    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)
    qk_norm = True
    gguf_head_dim_keys = True  # Qwen3Config always defines head_dim (128 by default)

    @classmethod
    def default_head_dim(cls, hidden: int, heads: int) -> int:
        return 128  # transformers' Qwen3Config default, not hidden/heads
