"""How each family's HF tensors become llama.cpp's GGUF tensors: one table, no special cases elsewhere.

Like gguf-py's tensor maps, but with the one transformation that differs by family:
llama.cpp runs the `llama` architecture with NORM-style rope, so its q/k rows must be
permuted from HF's rotate-half layout; Qwen2/Qwen3 run NEOX rope and are written as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@dataclass(frozen=True)
class GGUFArch:
    name: str  # general.architecture
    permute_qk: bool


ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2", permute_qk=False),
    "qwen3": GGUFArch("qwen3", permute_qk=False),
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    prefix, _, rest = hf_name.partition("model.layers.")
    if prefix == "" and rest:
        index, _, suffix = rest.partition(".")
        if suffix in LAYER_NAMES:
            return f"blk.{index}.{LAYER_NAMES[suffix]}"
    raise KeyError(hf_name)


def hf_name(gguf_tensor: str) -> str | None:
    """Inverse of `gguf_name` (None for generated tensors such as rope_freqs)."""
    for hf, gg in GLOBAL_NAMES.items():
        if gg == gguf_tensor:
            return hf
    if gguf_tensor.startswith("blk."):
        index, _, suffix = gguf_tensor[4:].partition(".")
        for hf, gg in LAYER_NAMES.items():
            if gg == suffix:
                return f"model.layers.{index}.{hf}"
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs (as convert_hf_to_gguf does)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows`: what a GGUF `llama` q/k tensor looked like in HF."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(arch: GGUFArch, hf_name: str, w: np.ndarray, n_heads: int, n_kv_heads: int) -> np.ndarray:
    if arch.permute_qk:
        if ".self_attn.q_proj." in hf_name:
            return permute_rows(w, n_heads)
        if ".self_attn.k_proj." in hf_name:
            return permute_rows(w, n_kv_heads)
    return w
