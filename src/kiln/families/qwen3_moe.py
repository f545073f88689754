"""Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (q/k norms), routed experts.

Qwen2-MoE's mixture of experts (kiln.families.qwen2_moe) without the shared expert, and with the top-k
routing weights renormalised to sum to 1, as llama.cpp's qwen3moe graph always does (the released
configs say `norm_topk_prob: true`; another value is refused). head_dim defaults to hidden / heads
(Qwen3MoeConfig has no head_dim of its own; the releases state 128).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.checkpoint.spec import ModelSpec
from kiln.errors import KilnError
from kiln.families.qwen2_moe import MOE_ATTENTION, MOE_EXPERTS, Qwen2Moe
from kiln.families.registry import register


@register
class Qwen3Moe(Qwen2Moe):
    name = "qwen3moe"
    description = "a Qwen3-MoE checkpoint (mixture of experts)"
    architectures = ("Qwen3MoeForCausalLM",)
    qk_norm = True
    layer_rows = (*MOE_ATTENTION, *MOE_EXPERTS)
    renormalises_top_k = True
    moe_defaults = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768}
    shared_expert_key = None
    # Qwen2-MoE's GPTQ groups and imatrix hooks without the shared expert; the router is hooked for its own entry.
    gptq_groups = tuple(tuple(n for n in g if "shared_expert" not in n) for g in Qwen2Moe.gptq_groups)
    imatrix_hooks = {**{k: v for k, v in Qwen2Moe.imatrix_hooks.items() if "shared_expert" not in k},
                     "mlp.gate": ("ffn_gate_inp",)}
    ties_embeddings = True  # llama.cpp's qwen3moe falls back to token_embd for the output

    @classmethod
    def has_attention_bias(cls, config: dict[str, Any]) -> bool:
        return bool(config.get("attention_bias", False))

    @classmethod
    def read_spec(cls, directory: Path, config: dict[str, Any], architecture: str) -> ModelSpec:
        if cls.has_attention_bias(config):
            raise KilnError(f"{directory / 'config.json'}: attention_bias is true (q/k/v/o biases): llama.cpp's "
                            f"{cls.name} has no o_proj bias")
        return super().read_spec(directory, config, architecture)
