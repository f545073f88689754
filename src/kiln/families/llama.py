"""Llama and Mistral (SmolLM2, Llama 2/3, Mistral 7B): the base decoder, with rows permuted for llama.cpp.

llama.cpp runs the `llama` architecture with NORM-style rope (adjacent pairs), so the q/k rows of
HF's rotate-half layout are interleaved when written, as convert_hf_to_gguf.py does.
"""

from __future__ import annotations

from kiln.families.base import Family
from kiln.families.registry import register


@register
class Llama(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    permute_qk = True
    gguf_head_dim_keys = True  # LlamaConfig / MistralConfig always define head_dim
    gguf_add_space_prefix = True  # the converter's LlamaModel.set_vocab writes it; Qwen's do not
