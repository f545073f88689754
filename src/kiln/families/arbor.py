"""Arbor (Noema-Research/Arbor): its published Llama-style layout, and its native GPT-2 shaped checkpoints.

The Llama-style `arbor-500m-1b-hf/config.json` (reference/arbor.md §1.2, flavour E) names
`ArborForCausalLM`, spells `rms_norm_eps` as `layer_norm_eps` and has Llama tensor names: it is read
as a Llama model, recognised by its tensors (never by model_type alone). Native Arbor checkpoints
(trainer .pt, save_pretrained directory, bare state dict) are GPT-2 shaped: sinusoidal absolute
positions, LayerNorm with bias, fused QKV, exact-erf GELU, no RoPE; kiln.checkpoint.arbor reads them
by tensor names and they export through llama.cpp's gpt2 architecture and kiln's own GPT-2 graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kiln.families.base import Family
from kiln.families.registry import TensorDetection, register


@register
class ArborLlamaStyle(Family):
    """Recognition only: a matching checkpoint is read by the Llama family (see `by_tensors`)."""

    name = "llama"
    architectures = ()
    by_tensors = TensorDetection(
        model_type="arbor",
        require=("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight"),
        forbid=("model.layers.0.self_attn.q_norm.weight",),
        architecture="LlamaForCausalLM",
        hf_model_type="llama",
        aliases=(("rms_norm_eps", "layer_norm_eps"),),
    )


@register
class NativeArbor(Family):
    """GPT-2 shaped Arbor, read by path with kiln.checkpoint.arbor (it has no HF config to dispatch on)."""

    name = "gpt2"
    description = "a native Arbor checkpoint (GPT-2 style)"
    architectures = ()
    claims_paths = True
    onnx_builder = False  # kiln writes its GPT-2 graph itself (kiln.export.onnx_gpt2), fp32 only
    gptq_groups = None
    imatrix_hooks = None
    # Tensors of checkpoints that share a model_type with a by-tensors row but are read here.
    read_elsewhere: ClassVar[dict[str, str]] = {
        "token_embedding.embedding.weight": "a native Arbor checkpoint (GPT-2 style): read it with "
                                            "kiln.checkpoint.arbor.read_arbor",
    }

    @classmethod
    def claims(cls, path: Path) -> bool:
        from kiln.checkpoint.arbor import is_native_arbor

        return is_native_arbor(path)

    @classmethod
    def claims_config(cls, config: dict[str, Any]) -> bool:
        return "n_embd" in config and "hidden_size" not in config  # a GPT-2 layout config (cost model)

    @classmethod
    def weight_shapes(cls, config: dict[str, Any], tied: bool) -> list[tuple[str, str, int | None, int, int]]:
        """GPT-2 layout: a position table beside the token embedding, LayerNorms with biases, a tied head."""
        d, n_layers, v = int(config["n_embd"]), int(config["n_layer"]), int(config["vocab_size"])
        pos = int(config.get("n_positions") or config.get("n_ctx") or 1024)
        out: list[tuple[str, str, int | None, int, int]] = [
            ("token_embd", "token_embd", None, d, v), ("position_embd", "pos_embd", None, d, pos)]
        for i in range(n_layers):
            out += [(f"blk.{i}.{name}", category, i, ne0, rows)
                    for name, category, ne0, rows in cls.layer_weight_tensors(config)]
        return out + [("output_norm", "norm", None, 1, 2 * d)]

    @classmethod
    def layer_weight_tensors(cls, config: dict[str, Any]) -> list[tuple[str, str, int, int]]:
        d = int(config["n_embd"])
        ff = int(config.get("n_inner") or 4 * d)
        return [("attn_qkv", "attn_qkv", d, 3 * d), ("attn_output", "attn_output", d, d),
                ("ffn_up", "ffn_up", d, ff), ("ffn_down", "ffn_down", ff, d),
                ("norms", "norm", 1, 4 * d), ("biases", "bias", 1, 3 * d + d + ff + d)]
