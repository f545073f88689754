"""Native Arbor -> GGUF on llama.cpp's `gpt2` architecture (reference/arbor.md §4).

llama.cpp's gpt2 graph is Arbor's forward: token + position embeddings added once, pre-LayerNorm
with bias, fused QKV with bias packed exactly like `in_proj_weight`, a 2-matrix GELU MLP with
biases, final LayerNorm, tied head. So tensors are written as stored (torch out x in is ggml's
row layout already); FFN-grown layers arrive zero-padded to the widest layer (exact). llama.cpp's
own converter cannot be used: it assumes a 4 x n_embd FFN and knows no Arbor tensor names.

The one difference llama.cpp cannot express is the GELU: gpt2 uses the tanh approximation where
Arbor uses exact erf; `arbor.activation` records it, and verification measures that drift apart
from the artifact's own error (kiln.verify.arbor_check).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from kiln.checkpoint.arbor import EMBED, FINAL_NORM, LM_HEAD, POS, ArborSpec
from kiln.checkpoint.spec import TokenizerSpec
from kiln.errors import KilnError
from kiln.export.gguf import _byte_shape, _convert, _tensor_qtype
from kiln.export.gguf_meta import write_token_spec

ARCH = "gpt2"
# GGUF name -> native name; `{i}` is the layer (one table, as gguf-py's tensor maps).
GPT2_TENSORS: dict[str, str] = {
    "token_embd.weight": EMBED,
    "position_embd.weight": POS,
    "output_norm.weight": FINAL_NORM[0],
    "output_norm.bias": FINAL_NORM[1],
    "output.weight": LM_HEAD,  # only when untied: llama.cpp duplicates token_embd otherwise
}
GPT2_LAYER: dict[str, str] = {
    "attn_norm.weight": "norm1.weight",
    "attn_norm.bias": "norm1.bias",
    "attn_qkv.weight": "self_attn.in_proj_weight",
    "attn_qkv.bias": "self_attn.in_proj_bias",
    "attn_output.weight": "self_attn.out_proj.weight",
    "attn_output.bias": "self_attn.out_proj.bias",
    "ffn_norm.weight": "norm2.weight",
    "ffn_norm.bias": "norm2.bias",
    "ffn_up.weight": "ffn.fc1.weight",
    "ffn_up.bias": "ffn.fc1.bias",
    "ffn_down.weight": "ffn.fc2.weight",
    "ffn_down.bias": "ffn.fc2.bias",
}
Progress = Callable[[str, int, int], None]


def planned(spec: ArborSpec, tensors: dict[str, np.ndarray], vocab: int) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) in write order; the embedding padded with zero rows up to the tokenizer's size
    (llama.cpp needs one row per token; a zero row gives logit exactly 0 through the tied head)."""
    out = []
    for name, native in GPT2_TENSORS.items():
        if native == LM_HEAD and spec.tied:
            continue
        arr = tensors[native]
        if native == POS:
            arr = arr.reshape(arr.shape[-2], arr.shape[-1])
        if native in (EMBED, LM_HEAD) and arr.shape[0] < vocab:
            arr = np.concatenate([arr, np.zeros((vocab - arr.shape[0], arr.shape[1]), arr.dtype)])
        out.append((name, arr))
    for i in range(spec.n_layers):
        for name, native in GPT2_LAYER.items():
            out.append((f"blk.{i}.{name}", tensors[f"layers.{i}.{native}"]))
    return out


def write_gpt2_gguf(spec: ArborSpec, tensors: dict[str, np.ndarray], tokenizer: TokenizerSpec, dest: Path,
                    qtype: Q, file_type: int, name: str, progress: Progress | None = None) -> None:
    """Write f32/f16/bf16 GGUF at `dest` (callers pass a temp path; quantized types go through f32)."""
    if spec.activation != "gelu":
        raise KilnError(f"{spec.source}: activation {spec.activation!r} has no llama.cpp gpt2 equivalent "
                        "(its graph applies GELU)")
    vocab = len(tokenizer.tokens)
    if vocab < spec.vocab:
        raise KilnError(f"{tokenizer.source}: tokenizer has {vocab} tokens, fewer than the model's {spec.vocab} rows")
    w = GGUFWriter(dest, ARCH)
    w.add_name(name)
    w.add_type("model")
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.max_positions)  # positions past the sinusoid table do not exist
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn_max)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_heads)
    w.add_layer_norm_eps(spec.ln_eps)
    w.add_vocab_size(vocab)
    w.add_file_type(file_type)
    w.add_quantization_version(2)
    w.add_array("arbor.ffn_dims", list(spec.ffn_widths))
    w.add_string("arbor.activation", "gelu_erf")
    w.add_string("arbor.source_format", f"native-{spec.layout}")
    write_token_spec(w, tokenizer)
    plan = planned(spec, tensors, vocab)
    for gname, arr in plan:
        t = _tensor_qtype(arr.shape, qtype)
        byte_shape = _byte_shape(arr.shape, t)
        w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (gname, arr) in enumerate(plan):
        if not np.isfinite(arr).all():
            raise KilnError(f"{spec.source}: tensor for {gname} contains NaN or infinite values")
        w.write_tensor_data(_convert(arr, _tensor_qtype(arr.shape, qtype)))
        if progress:
            progress("convert", i + 1, len(plan))
    w.close()
