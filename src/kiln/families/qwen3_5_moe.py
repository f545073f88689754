"""Qwen3.5-MoE (Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B): Qwen3.5's hybrid with a routed mixture of experts.

Qwen3.5's layers (kiln.families.qwen3_5: Gated DeltaNet and gated full attention, partial interleaved MRoPE,
(1 + w) norms, the value-head reorder) with every layer's MLP replaced by a softmax router over `num_experts`
SwiGLU experts, the top `num_experts_per_tok` of which run on each token with their routing weights
renormalised to sum to 1 (transformers' Qwen3_5MoeTopKRouter; llama.cpp's qwen35moe graph does the same), plus
one shared SwiGLU expert scaled by a sigmoid gate. The experts are stacked as Qwen2/3-MoE's (kiln.families.qwen2_moe:
one 3-D GGUF tensor per kind); transformers and the published checkpoints hold them fused
(`mlp.experts.gate_up_proj` / `down_proj`), the published MTP layer one tensor per expert: both are read.

The GGUF is llama.cpp's `qwen35moe` as its converter writes it (conversion/qwen.py, Qwen3_5MoeTextModel): the
expert keys, routers and the shared expert's gate in F32, and (Qwen3_5MoeTextConfig has no intermediate_size)
no feed_forward_length. The MTP head, where the checkpoint holds it, is written as for the dense model, its layer
with experts. ONNX is onnxruntime-genai's Qwen3.5-MoE graph (fp32: see `onnx_precisions`); GPTQ / the imatrix
do not visit this family yet.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from kiln.checkpoint.spec import ModelSpec
from kiln.errors import KilnError
from kiln.families.base import TensorRow, _int
from kiln.families.qwen2_moe import MOE_EXPERTS, SHARED_EXPERT
from kiln.families.qwen3_5 import QWEN35_LAYER, Qwen3_5
from kiln.families.registry import register

# Qwen3.5's layer rows without the dense MLP, then the router, the stacked experts and the shared expert.
QWEN35_MOE_LAYER: tuple[TensorRow, ...] = (*(r for r in QWEN35_LAYER if not r.hf.startswith("mlp.")),
                                           *MOE_EXPERTS, *SHARED_EXPERT)


@register
class Qwen3_5Moe(Qwen3_5):
    name = "qwen35moe"
    description = "a Qwen3.5-MoE checkpoint (Gated DeltaNet hybrid, mixture of experts)"
    architectures = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
    layer_rows = QWEN35_MOE_LAYER
    # onnxruntime-genai's builder has a Qwen3.5-MoE graph (its MoE op runs on the CPU); kiln's verification reads
    # a quantized graph's weights back, which it cannot yet do for the router and expert nodes: fp32 only.
    onnx_precisions = ("fp32",)
    onnx_precisions_reason = ("kiln verifies a quantized graph against its own weights, and cannot yet read the "
                              "builder's quantized router and expert nodes back")
    gptq_groups = None  # GPTQ / imatrix over DeltaNet projections and these experts: later work
    imatrix_hooks = None
    gptq_groups_by_kind: ClassVar[dict[str, Any]] = {}
    imatrix_hooks_by_kind: ClassVar[dict[str, Any]] = {}
    # Qwen3_5MoeTextConfig's defaults, for keys a config.json leaves out (the converter reads it through it).
    moe_defaults: ClassVar[dict[str, int]] = {"num_experts": 256, "num_experts_per_tok": 8,
                                             "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512}

    @classmethod
    def read_spec(cls, directory: Path, config: dict[str, Any], architecture: str) -> ModelSpec:
        """Qwen3.5's reading; Qwen3_5MoeTextConfig has no dense intermediate_size, so without one in config.json
        the spec's is 0 (and the GGUF, as the converter's, has no feed_forward_length)."""
        text = cls.text_config(config)
        if "intermediate_size" in text:
            return super().read_spec(directory, config, architecture)
        filled = {**text, "intermediate_size": 1}
        spec = super().read_spec(directory, {**config, "text_config": filled} if "text_config" in config
                                 else filled, architecture)
        return replace(spec, intermediate_size=0, config=text)

    @classmethod
    def refine_spec(cls, spec: ModelSpec, text: dict[str, Any], path: Path) -> ModelSpec:
        d = cls.moe_defaults
        n = _int(text, "num_experts", path, default=d["num_experts"])
        used = _int(text, "num_experts_per_tok", path, default=d["num_experts_per_tok"])
        if used > n:
            raise KilnError(f"{path}: num_experts_per_tok {used} exceeds the {n} experts")
        return replace(spec, n_experts=n, n_experts_used=used,
                       expert_ff=_int(text, "moe_intermediate_size", path, default=d["moe_intermediate_size"]),
                       shared_expert_ff=_int(text, "shared_expert_intermediate_size", path,
                                             default=d["shared_expert_intermediate_size"]),
                       norm_topk_prob=True)

    # ------------------------------------------------------------------ cost model
    @classmethod
    def _mlp_shapes(cls, text: dict[str, Any]) -> list[tuple[str, str, int, int]]:
        """The router, the stacked experts (one GGUF tensor of experts x rows each) and the shared expert with its
        gate; categories as llama.cpp's quantizer matches them by name (routers stay F32)."""
        d, m = int(text["hidden_size"]), cls.moe_defaults
        n = int(text.get("num_experts") or m["num_experts"])
        ff = int(text.get("moe_intermediate_size") or m["moe_intermediate_size"])
        sff = int(text.get("shared_expert_intermediate_size") or m["shared_expert_intermediate_size"])
        return [("ffn_gate_inp", "router", d, n), ("ffn_gate_exps", "ffn_gate", d, n * ff),
                ("ffn_up_exps", "ffn_up", d, n * ff), ("ffn_down_exps", "ffn_down", ff, n * d),
                ("ffn_gate_inp_shexp", "router", d, 1), ("ffn_gate_shexp", "ffn_gate", d, sff),
                ("ffn_up_shexp", "ffn_up", d, sff), ("ffn_down_shexp", "ffn_down", sff, d)]
