"""GGUF metadata (hyper-parameters, rope, tokenizer) from a `ModelSpec`.

Key names are gguf-py's; which keys llama.cpp reads per architecture is in
reference/ecosystem.md §1.2. Rope scaling is written as resolved by
`kiln.checkpoint.rope`, with `context_length` raised to match (DESIGN.md §5).
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGUFWriter, RopeScalingType

from kiln.checkpoint.rope import RopeSettings
from kiln.checkpoint.spec import ModelSpec, TokenizerSpec

_LICENSE_IDS = (("Apache License", "apache-2.0"), ("MIT License", "mit"), ("Llama 3", "llama3"))


def license_id(text: str | None) -> str | None:
    if not text:
        return None
    for needle, ident in _LICENSE_IDS:
        if needle.lower() in text.lower():
            return ident
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first[:64] or None


def write_hparams(w: GGUFWriter, spec: ModelSpec, rope: RopeSettings, file_type: int) -> None:
    w.add_name(spec.name)
    w.add_type("model")
    lic = license_id(spec.license)
    if lic:
        w.add_license(lic)
    w.add_block_count(spec.n_layers)
    w.add_context_length(int(rope.context_length or spec.context_length))
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(spec.head_dim)
    if spec.head_dim * spec.n_heads != spec.hidden_size:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_vocab_size(spec.vocab_size)
    write_rope(w, rope)
    w.add_file_type(file_type)
    w.add_quantization_version(2)


def write_rope(w: GGUFWriter, rope: RopeSettings) -> None:
    if rope.type == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope.factor)
        w.add_rope_scaling_orig_ctx_len(int(rope.original_context))
    elif rope.type == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope.factor)
        w.add_rope_scaling_orig_ctx_len(int(rope.original_context))
        if rope.attention_factor is not None:
            # llama.cpp multiplies its own 0.1*ln(s)+1 by this; transformers replaces it.
            default = 0.1 * math.log(rope.factor) + 1.0
            w.add_rope_scaling_attn_factors(float(rope.attention_factor) / default)
    # llama3: carried by the rope_freqs tensor, no scaling keys (as convert_hf_to_gguf does)


def llama3_rope_factors(spec: ModelSpec, rope: RopeSettings) -> np.ndarray:
    """Per-frequency divisors for llama3-style scaling, the `rope_freqs` tensor llama.cpp reads."""
    dim = spec.head_dim
    base = spec.rope_theta
    factor = rope.factor
    low = rope.low_freq_factor or 1.0
    high = rope.high_freq_factor or 4.0
    old = rope.original_context or 8192
    low_wavelen, high_wavelen = old / low, old / high
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_tokenizer(w: GGUFWriter, spec: ModelSpec) -> None:
    assert spec.tokenizer is not None
    write_token_spec(w, spec.tokenizer)


def write_token_spec(w: GGUFWriter, tok: TokenizerSpec) -> None:
    """The tokenizer.ggml.* keys of a byte-level BPE vocabulary (any architecture)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_token_merges(tok.merges)
    for ident, add in ((tok.bos_id, w.add_bos_token_id), (tok.eos_id, w.add_eos_token_id),
                       (tok.pad_id, w.add_pad_token_id), (tok.unk_id, w.add_unk_token_id),
                       (tok.eot_id, w.add_eot_token_id)):
        if ident is not None:
            add(ident)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
