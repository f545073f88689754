"""One table of the model families kiln reads, keyed by the HF `architectures` name.

Adding a family means adding a row here (and a tensor map row in each exporter),
never an `if arch == ...` elsewhere.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # also the GGUF `general.architecture`
    attention_bias: bool | None  # None: read config["attention_bias"] (default False)
    qk_norm: bool
    tie_default: bool  # tie_word_embeddings when config.json does not say


FAMILIES: dict[str, Family] = {
    # Qwen 1.5 / 2 / 2.5 all use Qwen2ForCausalLM; q/k/v always carry biases.
    "Qwen2ForCausalLM": Family("qwen2", attention_bias=True, qk_norm=False, tie_default=False),
    "Qwen3ForCausalLM": Family("qwen3", attention_bias=None, qk_norm=True, tie_default=False),
    "LlamaForCausalLM": Family("llama", attention_bias=None, qk_norm=False, tie_default=False),
    "MistralForCausalLM": Family("llama", attention_bias=None, qk_norm=False, tie_default=False),
}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


@dataclass(frozen=True)
class TensorDetection:
    """A config whose `architectures` names no family above, recognised by its tensor names instead.

    Never by `model_type` alone: an unrelated byte-level BitNet project also calls itself "arbor",
    and native Arbor checkpoints (GPT-2 style, kiln.checkpoint.arbor) carry that name too.
    """

    model_type: str
    require: tuple[str, ...]  # every one of these tensors must be present
    forbid: tuple[str, ...]  # none of these may be present
    architecture: str  # the FAMILIES row the checkpoint is read as
    hf_model_type: str  # model_type of that row in transformers (so a staged config.json loads)
    aliases: tuple[tuple[str, str], ...] = ()  # (key the family reads, key this config spells it with)


BY_TENSORS: tuple[TensorDetection, ...] = (
    # Arbor's published arbor-500m-1b-hf/config.json (reference/arbor.md §1.2, flavour E): Llama keys,
    # `ArborForCausalLM`, `layer_norm_eps` instead of `rms_norm_eps`, rope linear x32. With Llama tensor
    # names it is a Llama model; its rope scaling goes through rope.from_config like any other.
    TensorDetection(
        model_type="arbor",
        require=("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight"),
        forbid=("model.layers.0.self_attn.q_norm.weight",),
        architecture="LlamaForCausalLM",
        hf_model_type="llama",
        aliases=(("rms_norm_eps", "layer_norm_eps"),),
    ),
)


def detect_by_tensors(config: dict, names: Collection[str]) -> TensorDetection | None:
    """The BY_TENSORS row matching this config's model_type and these tensor names, if any."""
    for row in BY_TENSORS:
        if (config.get("model_type") == row.model_type and all(n in names for n in row.require)
                and not any(n in names for n in row.forbid)):
            return row
    return None


# Tensors of checkpoints that share a model_type with a BY_TENSORS row but are read elsewhere in kiln.
READ_ELSEWHERE: dict[str, str] = {
    "token_embedding.embedding.weight": "a native Arbor checkpoint (GPT-2 style): read it with "
                                        "kiln.checkpoint.arbor.read_arbor",
}
