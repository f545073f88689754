"""GPT-2 (Hugging Face `GPT2LMHeadModel`), and the base of every GPT-2 shaped family (nanoGPT, native Arbor).

A GPT-2 shaped model has learned or fixed absolute positions added once at the input, pre-LayerNorm
with bias, fused q|k|v, a GELU MLP and (usually) a tied head. kiln reads each layout into one form,
an HF GPT-2 config + state dict (kiln.checkpoint.gpt2.Gpt2Checkpoint), and writes that form as
llama.cpp's `gpt2` architecture (kiln.export.gguf_gpt2: tensors as llama.cpp's converter writes them
for the HF layout) and as kiln's own ONNX GPT-2 graph (kiln.export.onnx_gpt2: onnxruntime-genai's
builder has no GPT-2). A family over this class differs only in how it finds and reads its files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from kiln.errors import KilnError
from kiln.families.base import Family
from kiln.families.registry import register


@register
class GPT2(Family):
    name = "gpt2"
    description = "a GPT-2 checkpoint"
    architectures = ("GPT2LMHeadModel",)
    layout = "gpt2"
    rotary = False
    onnx_builder = False  # kiln writes the GPT-2 graph itself (kiln.export.onnx_gpt2), fp32 only
    onnx_precisions = ("fp32",)
    gptq_groups = None
    imatrix_hooks = None
    read_elsewhere: ClassVar[dict[str, str]] = {}

    @classmethod
    def read_gpt2(cls, path: Path, *, n_heads: int | None = None, tokenizer: str | Path | None = None,
                  allow_pickle: bool = False):
        """The checkpoint in kiln's GPT-2 form (the head count is in config.json: `n_heads` is not needed)."""
        from kiln.checkpoint.gpt2 import read_hf_gpt2

        return read_hf_gpt2(path, tokenizer=tokenizer)

    @classmethod
    def read_spec(cls, directory: Path, config: dict[str, Any], architecture: str):
        raise KilnError(f"{directory}: {cls.description} is GPT-2 shaped: `kiln export gguf|onnx` reads it; GPTQ, "
                        "the imatrix and LoRA merges take the Llama-shaped families")

    @classmethod
    def weight_shapes(cls, config: dict[str, Any], tied: bool) -> list[tuple[str, str, int | None, int, int]]:
        """GPT-2 layout: a position table beside the token embedding, LayerNorms with biases, a tied head."""
        d, n_layers, v = int(config["n_embd"]), int(config["n_layer"]), int(config["vocab_size"])
        pos = int(config.get("n_positions") or config.get("n_ctx") or config.get("block_size") or 1024)
        out: list[tuple[str, str, int | None, int, int]] = [
            ("token_embd", "token_embd", None, d, v), ("position_embd", "pos_embd", None, d, pos)]
        for i in range(n_layers):
            out += [(f"blk.{i}.{name}", category, i, ne0, rows)
                    for name, category, ne0, rows in cls.layer_weight_tensors(config)]
        out += [("output_norm", "norm", None, 1, 2 * d)]
        if not config.get("tie_word_embeddings", True):  # GPT2Config ties unless it says otherwise
            out.append(("output", "output", None, d, v))
        return out

    @classmethod
    def layer_weight_tensors(cls, config: dict[str, Any]) -> list[tuple[str, str, int, int]]:
        d = int(config["n_embd"])
        ff = int(config.get("n_inner") or 4 * d)
        return [("attn_qkv", "attn_qkv", d, 3 * d), ("attn_output", "attn_output", d, d),
                ("ffn_up", "ffn_up", d, ff), ("ffn_down", "ffn_down", ff, d),
                ("norms", "norm", 1, 4 * d), ("biases", "bias", 1, 3 * d + d + ff + d)]
