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
with experts. ONNX is onnxruntime-genai's Qwen3.5-MoE graph (fp32: see `onnx_precisions`).

GPTQ and the imatrix combine the two families they come from, per layer kind: the token mixer as Qwen3.5's (a
DeltaNet layer's q/k/v, z, b and a on the normed hidden state, then out_proj; a full-attention layer's q/k/v then
o as any decoder's), then the MLP as Qwen2-MoE's (the shared expert seeing every token, each routed expert only
the calibration tokens the router sends it, an expert with too few of them rounded to nearest with a note; the
routers and the shared expert's gate stay F32). transformers 5's Qwen3_5MoeExperts holds the experts fused with
Qwen2-MoE's layout and forward, so Qwen2-MoE's `expert_inputs` reads what each expert multiplies.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from kiln.checkpoint.spec import ModelSpec
from kiln.errors import KilnError
from kiln.families.base import TensorRow, _int
from kiln.families.qwen2_moe import MOE_EXPERTS, SHARED_EXPERT, Qwen2Moe
from kiln.families.qwen3_5 import LINEAR, QWEN35_LAYER, Qwen3_5
from kiln.families.registry import register

# Qwen3.5's layer rows without the dense MLP, then the router, the stacked experts and the shared expert.
QWEN35_MOE_LAYER: tuple[TensorRow, ...] = (*(r for r in QWEN35_LAYER if not r.hf.startswith("mlp.")),
                                           *MOE_EXPERTS, *SHARED_EXPERT)


def _mlp(name: str) -> bool:
    return name.startswith("mlp.")


# Calibration, per layer kind: the token mixer's groups / hooks from Qwen3.5 (a DeltaNet layer's) or from any
# decoder (a full-attention layer's, as Qwen2-MoE keeps them), then Qwen2-MoE's mixture of experts.
_DELTANET_GROUPS = tuple(g for g in Qwen3_5.gptq_groups_by_kind[LINEAR] if not _mlp(g[0]))
_MOE_GROUPS = tuple(g for g in Qwen2Moe.gptq_groups if _mlp(g[0]))
_DELTANET_HOOKS = {k: v for k, v in Qwen3_5.imatrix_hooks_by_kind[LINEAR].items() if not _mlp(k)}
_MOE_HOOKS = {k: v for k, v in Qwen2Moe.imatrix_hooks.items() if _mlp(k)}


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
    # GPTQ / imatrix: full-attention layers as Qwen2-MoE's (attention, then shared and routed experts); DeltaNet
    # layers with Qwen3.5's DeltaNet groups / hooks in front of the same experts.
    gptq_groups = Qwen2Moe.gptq_groups
    imatrix_hooks = Qwen2Moe.imatrix_hooks
    gptq_groups_by_kind = {LINEAR: (*_DELTANET_GROUPS, *_MOE_GROUPS)}
    imatrix_hooks_by_kind = {LINEAR: {**_DELTANET_HOOKS, **_MOE_HOOKS}}
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
    def expert_inputs(cls, experts: Any, hidden: Any, top_k_index: Any, wanted: Collection[str]):
        """Qwen3_5MoeExperts is Qwen2-MoE's fused experts module (gate_up_proj [experts, 2 x ff, hidden], gate rows
        first; down_proj [experts, hidden, ff]; called as experts(hidden, top_k_index, top_k_weights))."""
        return Qwen2Moe.expert_inputs(experts, hidden, top_k_index, wanted)

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
