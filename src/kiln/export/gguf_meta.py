"""GGUF metadata (hyper-parameters, rope, tokenizer) from a `ModelSpec`.

Key names are gguf-py's; which keys llama.cpp reads per architecture is in
reference/ecosystem.md §1.2. Rope scaling is written as resolved by
`kiln.checkpoint.rope`, with `context_length` raised to match (DESIGN.md §5).

The key set equals the one llama.cpp's own convert_hf_to_gguf.py writes for the same checkpoint,
values included: a tool that asks the GGUF (llama.cpp, Ollama, another converter's user) must get
the same answer from either file. tests/test_gguf_keys.py compares the two on every fixture and
lists, with reasons, the few keys kiln deliberately adds or leaves out.
"""

from __future__ import annotations

import math
import re

import numpy as np
from gguf import GGUFWriter, Keys, RopeScalingType, size_label

from kiln import families
from kiln.checkpoint.rope import RopeSettings
from kiln.checkpoint.spec import ModelSpec, TokenizerSpec

_LICENSE_IDS = (("Apache License", "apache-2.0"), ("MIT License", "mit"), ("Llama 3", "llama3"))

# Not in gguf 0.19.0's Keys, but written by the gguf-py bundled with llama.cpp (and read by it).
_NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
_NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"


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
    # The converter's size class ("135M"; "4x1.2M" for a mixture of experts: gguf-py counts one expert's
    # share of every stacked tensor beside the rest), from the parameter count both files hold.
    if spec.n_experts:
        shared = spec.n_params - spec.n_experts * spec.expert_params
        w.add_size_label(size_label(spec.n_params, shared, spec.expert_params, spec.n_experts))
    else:
        w.add_size_label(size_label(spec.n_params, spec.n_params, 0, 0))
    lic = license_id(spec.license)
    if lic:
        w.add_license(lic)
    w.add_block_count(spec.n_layers + spec.mtp_layers)  # multi-token prediction blocks follow the decoder's
    if spec.mtp_layers:
        w.add_nextn_predict_layers(spec.mtp_layers)
    w.add_context_length(int(rope.context_length or spec.context_length))
    w.add_embedding_length(spec.hidden_size)
    if spec.intermediate_size:  # 0: no dense width (Qwen3.5-MoE's config has none, so the converter writes none)
        w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(spec.rotary_dim)  # partial rotary (Qwen3.5): the rotated dimensions only
    if spec.rope_sections:  # MRoPE (Qwen3.5, interleaved): llama.cpp's qwen35 loader requires the sections
        w.add_rope_dimension_sections(list(spec.rope_sections))
    # Where the converter writes them: it reads config.json through transformers' AutoConfig, whose
    # Llama/Mistral and Qwen3 configs always define head_dim (Qwen2's only when config.json states it).
    # And whenever head_dim is not hidden/heads, llama.cpp's default.
    if (families.of(spec).gguf_head_dim_keys or spec.config.get("head_dim") is not None
            or spec.head_dim * spec.n_heads != spec.hidden_size):
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    w.add_vocab_size(spec.vocab_size)
    if spec.n_experts:  # the converter's keys for a mixture of experts (its shared expert's only where it has one)
        w.add_expert_count(spec.n_experts)
        w.add_expert_used_count(spec.n_experts_used)
        w.add_expert_feed_forward_length(spec.expert_ff)
        if spec.shared_expert:
            w.add_expert_shared_feed_forward_length(spec.shared_expert_ff)
    if spec.layer_types and spec.linear_v_heads:  # a Gated DeltaNet hybrid: the converter's ssm_* keys
        write_linear_attention(w, spec)
    write_rope(w, rope)
    w.add_file_type(file_type)
    w.add_quantization_version(2)


def write_linear_attention(w: GGUFWriter, spec: ModelSpec) -> None:
    """Qwen3.5's Gated DeltaNet keys as llama.cpp's converter writes them (Qwen3NextModel): the conv kernel,
    the state size (a key head's width), key heads as groups, value heads as the time-step rank, the value
    width, which layers are recurrent, and the full-attention interval."""
    w.add_ssm_conv_kernel(spec.linear_conv_kernel)
    w.add_ssm_state_size(spec.linear_k_dim)
    w.add_ssm_group_count(spec.linear_k_heads)
    w.add_ssm_time_step_rank(spec.linear_v_heads)
    w.add_ssm_inner_size(spec.linear_v_dim * spec.linear_v_heads)
    # Not in gguf 0.19.0's writer; the key and type of the bundled gguf-py's add_recurrent_layers.
    w.add_array(f"{w.arch}.attention.recurrent_layers",
                [t == "linear_attention" for t in spec.layer_types] + [False] * spec.mtp_layers)
    w.add_full_attention_interval(spec.full_attention_interval)


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
        # The config's own yarn values, as the converter writes them. llama.cpp reads these only for a few
        # other architectures (not llama/qwen2/qwen3), so they are inert here, but equal to the converter's.
        if rope.attention_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(float(rope.attention_factor))
        if rope.beta_fast is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rope.beta_fast))
        if rope.beta_slow is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rope.beta_slow))
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
    if families.of(spec).gguf_add_space_prefix and spec.tokenizer.add_prefix_space is not None:
        w.add_add_space_prefix(spec.tokenizer.add_prefix_space)


def write_token_spec(w: GGUFWriter, tok: TokenizerSpec) -> None:
    """The tokenizer.ggml.* keys of a byte-level BPE vocabulary (any architecture)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_token_merges(tok.merges)
    for ident, add in ((tok.bos_id, w.add_bos_token_id), (tok.eos_id, w.add_eos_token_id),
                       (tok.pad_id, w.add_pad_token_id), (tok.unk_id, w.add_unk_token_id),
                       (tok.eot_id, w.add_eot_token_id), (tok.eom_id, w.add_eom_token_id),
                       (tok.sep_id, w.add_sep_token_id), (tok.mask_id, w.add_mask_token_id)):
        if ident is not None:
            add(ident)
    # Always both (the converter omits them when the tokenizer does not say): llama.cpp's default for a
    # llama-bpe vocabulary is to add BOS, transformers' is not to.
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.add_sep is not None:
        w.add_add_sep_token(tok.add_sep)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    if tok.named_chat_templates:
        # The keys GGUFWriter.add_chat_template(list) writes, but with the name list sorted: it builds the
        # list from a set, whose order changes between runs, and kiln's outputs are byte-reproducible.
        names = sorted({re.sub(r"[^A-Za-z0-9]", "_", name) for name, _ in tok.named_chat_templates})
        for name, text in tok.named_chat_templates:
            w.add_string(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=re.sub(r"[^A-Za-z0-9]", "_", name)), text)
        w.add_array(Keys.Tokenizer.CHAT_TEMPLATES, names)
    if tok.normalizer_lowercase is not None:
        w.add_bool(_NORMALIZER_LOWERCASE, tok.normalizer_lowercase)
    if tok.normalizer_strip_accents is not None:
        w.add_bool(_NORMALIZER_STRIP_ACCENTS, tok.normalizer_strip_accents)
