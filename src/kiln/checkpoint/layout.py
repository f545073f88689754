"""The tensors a family's HF checkpoint must contain, with their shapes.

Checked before any export so a checkpoint whose shapes disagree with its config
fails with the tensor's name, not deep inside llama.cpp.
"""

from __future__ import annotations

from kiln.checkpoint.spec import ModelSpec

# Per-layer HF tensors: (suffix under model.layers.N., shape function, condition attribute)
_LAYER = (
    ("input_layernorm.weight", lambda s: (s.hidden_size,), None),
    ("post_attention_layernorm.weight", lambda s: (s.hidden_size,), None),
    ("self_attn.q_proj.weight", lambda s: (s.n_heads * s.head_dim, s.hidden_size), None),
    ("self_attn.k_proj.weight", lambda s: (s.n_kv_heads * s.head_dim, s.hidden_size), None),
    ("self_attn.v_proj.weight", lambda s: (s.n_kv_heads * s.head_dim, s.hidden_size), None),
    ("self_attn.o_proj.weight", lambda s: (s.hidden_size, s.n_heads * s.head_dim), None),
    ("self_attn.q_proj.bias", lambda s: (s.n_heads * s.head_dim,), "attention_bias"),
    ("self_attn.k_proj.bias", lambda s: (s.n_kv_heads * s.head_dim,), "attention_bias"),
    ("self_attn.v_proj.bias", lambda s: (s.n_kv_heads * s.head_dim,), "attention_bias"),
    ("self_attn.q_norm.weight", lambda s: (s.head_dim,), "qk_norm"),
    ("self_attn.k_norm.weight", lambda s: (s.head_dim,), "qk_norm"),
    ("mlp.gate_proj.weight", lambda s: (s.intermediate_size, s.hidden_size), None),
    ("mlp.up_proj.weight", lambda s: (s.intermediate_size, s.hidden_size), None),
    ("mlp.down_proj.weight", lambda s: (s.hidden_size, s.intermediate_size), None),
)


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, in the order an exporter should write them."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.n_layers):
        for suffix, shape, cond in _LAYER:
            if cond is None or getattr(spec, cond):
                out[f"model.layers.{i}.{suffix}"] = shape(spec)
    out["model.norm.weight"] = (spec.hidden_size,)
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    return out
