"""The one canonical description of a model that every exporter consumes.

`checkpoint/` produces it from whatever layout the user has; `export/` never looks at
config.json again. Architecture differences live in `families.py`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.checkpoint.rope import RopeSettings


@dataclass(frozen=True)
class TokenizerSpec:
    """A byte-level BPE vocabulary in the form GGUF and llama.cpp want it."""

    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values: NORMAL=1 CONTROL=3 USER_DEFINED=4 UNUSED=5
    merges: list[str]
    pre: str  # llama.cpp pre-tokenizer name (qwen2, llama-bpe, smollm, gpt2, ...)
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    eot_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    source: Path  # tokenizer.json
    unrepresentable_bytes: tuple[int, ...] = ()  # bytes with no byte token (see kiln.bytelevel)
    # The rest mirrors what llama.cpp's converter (gguf-py's SpecialVocab) writes when the checkpoint
    # says so; None/empty means the checkpoint does not say, and no GGUF key is written.
    sep_id: int | None = None
    mask_id: int | None = None
    eom_id: int | None = None
    add_sep: bool | None = None  # from a TemplateProcessing / RobertaProcessing post-processor
    add_prefix_space: bool | None = None  # tokenizer_config.json add_prefix_space
    named_chat_templates: tuple[tuple[str, str], ...] = ()  # (name, template) besides the default one
    normalizer_lowercase: bool | None = None  # tokenizer.json normalizer flags
    normalizer_strip_accents: bool | None = None


@dataclass(frozen=True)
class ModelSpec:
    family: str  # kiln family name, equal to the GGUF architecture (llama, qwen2, qwen3)
    hf_architecture: str
    source: Path
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int  # native max_position_embeddings of the checkpoint
    rope: RopeSettings  # scaling found in config.json (type "none" if absent)
    tie_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    tokenizer: TokenizerSpec | None
    name: str
    license: str | None = None
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    # Mixture of experts (n_experts 0: a dense decoder). Every layer routes each token to n_experts_used
    # of n_experts SwiGLU experts of width expert_ff (plus, where shared_expert_ff > 0, one shared expert
    # under a sigmoid gate); the families refuse configs with dense layers mixed in.
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ff: int = 0  # one expert's FFN width (moe_intermediate_size)
    shared_expert_ff: int = 0  # the shared expert's FFN width (shared_expert_intermediate_size); 0: none
    norm_topk_prob: bool = False  # the top-k routing weights are renormalised to sum to 1
    # Hybrid decoders (Qwen3.5): each layer's kind ("linear_attention" / "full_attention", transformers'
    # `layer_types`); empty: every layer is the family's one kind. A TensorRow with `layers` set applies only
    # to layers of that kind.
    layer_types: tuple[str, ...] = ()
    # Gated DeltaNet (linear attention) dimensions; 0 where the model has none.
    linear_conv_kernel: int = 0
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_k_dim: int = 0  # one key head's width (the recurrent state's size per head)
    linear_v_dim: int = 0  # one value head's width
    full_attention_interval: int = 0
    rope_dim: int = 0  # rotated dimensions of a head (partial rotary); 0: all of head_dim
    rope_sections: tuple[int, ...] = ()  # MRoPE sections in frequency pairs (GGUF rope.dimension_sections)
    # Multi-token prediction blocks written after the n_layers decoder layers (llama.cpp's NextN layers:
    # GGUF block_count n_layers + mtp_layers, {arch}.nextn_predict_layers); 0: none. The reference
    # (transformers) and llama.cpp's plain decoding both ignore them.
    mtp_layers: int = 0
    # The parameter count when the dense-decoder formula below does not describe the model (the family
    # counts its tensor table); 0: use the formula.
    param_count: int = 0

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def shared_expert(self) -> bool:
        return self.shared_expert_ff > 0

    @property
    def expert_params(self) -> int:
        """Parameters of one expert summed over the layers (gguf-py's `expert_params`, for the size label)."""
        return (self.n_layers + self.mtp_layers) * 3 * self.hidden_size * self.expert_ff if self.n_experts else 0

    @property
    def n_params(self) -> int:
        """Parameter count from the dimensions (tied embeddings counted once)."""
        if self.param_count:
            return self.param_count
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * self.head_dim
        if self.n_experts:
            mlp = self.n_experts * (3 * h * self.expert_ff + h)  # experts and the router
            if self.shared_expert:
                mlp += 3 * h * self.shared_expert_ff + h  # the shared expert and its gate
        else:
            mlp = 3 * h * f
        layer = attn + mlp + 2 * h
        total = self.n_layers * layer + v * h + h
        if not self.tie_embeddings:
            total += v * h
        return total
