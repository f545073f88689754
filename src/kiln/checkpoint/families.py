"""One table of the model families kiln reads, keyed by the HF `architectures` name.

Adding a family means adding a row here (and a tensor map row in each exporter),
never an `if arch == ...` elsewhere.
"""

from __future__ import annotations

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
