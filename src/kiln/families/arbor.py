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
from kiln.families.gpt2 import GPT2
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
class NativeArbor(GPT2):
    """GPT-2 shaped Arbor, read by path with kiln.checkpoint.arbor (it has no HF config to dispatch on)."""

    description = "a native Arbor checkpoint (GPT-2 style)"
    architectures = ()
    claims_paths = True
    reference = "arbor"  # Arbor's own forward (kiln.verify.arbor_reference): no transformers class runs it
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
    def read_gpt2(cls, path: Path, *, n_heads: int | None = None, tokenizer: str | Path | None = None,
                  allow_pickle: bool = False):
        from kiln.checkpoint.arbor import read_arbor_gpt2

        return read_arbor_gpt2(path, n_heads=n_heads, tokenizer=tokenizer, allow_pickle=allow_pickle)
