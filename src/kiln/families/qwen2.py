"""Qwen2ForCausalLM: Qwen 1.5, 2 and 2.5 (q/k/v always carry biases; NEOX rope, written as is)."""

from __future__ import annotations

from kiln.families.base import Family
from kiln.families.registry import register


@register
class Qwen2(Family):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    attention_bias = True
