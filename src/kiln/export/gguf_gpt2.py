"""GPT-2 shaped models -> GGUF on llama.cpp's `gpt2` architecture, from the common HF form.

Every GPT-2 layout kiln reads (HF ``GPT2LMHeadModel``, nanoGPT, native Arbor) arrives as one
`kiln.checkpoint.gpt2.Gpt2Checkpoint`: HF names, Conv1D weights [in, out]. llama.cpp's gpt2 graph is
that model: token + position embeddings added once, pre-LayerNorm with bias, fused QKV with bias, a
2-matrix GELU MLP with biases, final LayerNorm, an optionally tied head. So tensors are written as
llama.cpp's converter (conversion/gpt2.py) writes them: Conv1D weights transposed to ggml's row
layout [out, in], everything else as stored. Two things the converter gets wrong are done right:
``feed_forward_length`` is the real FFN width (it writes 4 x n_embd, which llama.cpp refuses to load
for a grown Arbor or any other n_inner), and ``head_count_kv`` is written.

The one difference llama.cpp cannot express is GELU: its gpt2 graph uses the tanh approximation
(HF ``gelu_new``), where Arbor and nanoGPT use exact erf (``gelu``); verification measures that drift
apart from the artifact's own error (kiln.verify).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from kiln.checkpoint.arbor import ArborSpec, to_gpt2
from kiln.checkpoint.gpt2 import LM_HEAD, WTE, Gpt2Checkpoint
from kiln.checkpoint.spec import TokenizerSpec
from kiln.errors import KilnError
from kiln.export.gguf import _byte_shape, _convert, _tensor_qtype
from kiln.export.gguf_meta import write_token_spec

ARCH = "gpt2"
# HF activation names llama.cpp's GELU stands for: tanh forms exactly, erf ones with a measured drift.
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GELU_ERF = ("gelu", "gelu_python")


class Gpt2Tensor(NamedTuple):
    """Where a GGUF tensor comes from in the HF form; `transpose`: a Conv1D weight ([in, out] in HF,
    [out, in] as ggml rows)."""

    hf: str
    transpose: bool = False


# GGUF name -> HF name (one table for writing and reading back, as gguf-py's tensor maps are).
GPT2_TENSORS: dict[str, Gpt2Tensor] = {
    "token_embd.weight": Gpt2Tensor(WTE),
    "position_embd.weight": Gpt2Tensor("transformer.wpe.weight"),
    "output_norm.weight": Gpt2Tensor("transformer.ln_f.weight"),
    "output_norm.bias": Gpt2Tensor("transformer.ln_f.bias"),
    "output.weight": Gpt2Tensor(LM_HEAD),  # only when untied: llama.cpp duplicates token_embd otherwise
}
# Per layer: "blk.{i}." + GGUF suffix -> "transformer.h.{i}." + HF suffix.
GPT2_LAYER: dict[str, Gpt2Tensor] = {
    "attn_norm.weight": Gpt2Tensor("ln_1.weight"),
    "attn_norm.bias": Gpt2Tensor("ln_1.bias"),
    "attn_qkv.weight": Gpt2Tensor("attn.c_attn.weight", True),
    "attn_qkv.bias": Gpt2Tensor("attn.c_attn.bias"),
    "attn_output.weight": Gpt2Tensor("attn.c_proj.weight", True),
    "attn_output.bias": Gpt2Tensor("attn.c_proj.bias"),
    "ffn_norm.weight": Gpt2Tensor("ln_2.weight"),
    "ffn_norm.bias": Gpt2Tensor("ln_2.bias"),
    "ffn_up.weight": Gpt2Tensor("mlp.c_fc.weight", True),
    "ffn_up.bias": Gpt2Tensor("mlp.c_fc.bias"),
    "ffn_down.weight": Gpt2Tensor("mlp.c_proj.weight", True),
    "ffn_down.bias": Gpt2Tensor("mlp.c_proj.bias"),
}
_PADDED = (WTE, LM_HEAD)  # one row per token: padded with zeros up to the tokenizer's size
Progress = Callable[[str, int, int], None]


def tensor_names(n_layers: int, tied: bool) -> list[tuple[str, Gpt2Tensor]]:
    """(GGUF name, HF source) in write order: the global tensors, then each layer's."""
    out = [(g, t) for g, t in GPT2_TENSORS.items() if not (tied and t.hf == LM_HEAD)]
    for i in range(n_layers):
        out += [(f"blk.{i}.{g}", Gpt2Tensor(f"transformer.h.{i}.{t.hf}", t.transpose)) for g, t in GPT2_LAYER.items()]
    return out


def planned(model: Gpt2Checkpoint, vocab: int) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) in write order; the embedding (and an untied head) padded with zero rows up
    to the tokenizer's size (llama.cpp needs one row per token; a zero row gives logit exactly 0
    through a tied head)."""
    out = []
    for gname, t in tensor_names(model.n_layers, model.tied):
        arr = model.state[t.hf]
        if t.transpose:
            arr = arr.T
        if t.hf in _PADDED and arr.shape[0] < vocab:
            arr = np.concatenate([arr, np.zeros((vocab - arr.shape[0], arr.shape[1]), arr.dtype)])
        out.append((gname, arr))
    return out


def _add_key(w: GGUFWriter, key: str, value: Any) -> None:
    """An extra KV pair typed by its Python value (lists as arrays, ints as u32, floats as f32)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"GGUF key {key}: unsupported value type {type(value).__name__}")


def write_gpt2_gguf(model: Gpt2Checkpoint, dest: Path, qtype: Q, file_type: int,
                    progress: Progress | None = None) -> None:
    """Write `model` as an f32/f16/bf16 GGUF at `dest` (callers pass a temp path; quantized types go
    through f32 and llama.cpp's quantizer, kiln.export.gguf.write_gguf_atomic). Key order: the
    architecture keys, `model.gguf_keys`, then the tokenizer; tensors in `tensor_names` order."""
    if model.activation not in GELU_TANH + GELU_ERF:
        raise KilnError(f"{model.source}: activation {model.activation!r} has no llama.cpp gpt2 equivalent "
                        "(its graph applies GELU)")
    tokenizer = model.tokenizer
    vocab = len(tokenizer.tokens)
    if vocab < model.vocab:
        raise KilnError(f"{tokenizer.source}: tokenizer has {vocab} tokens, fewer than the model's {model.vocab} rows")
    w = GGUFWriter(dest, ARCH)
    w.add_name(model.name)
    w.add_type("model")
    w.add_block_count(model.n_layers)
    w.add_context_length(model.context)  # positions past the position table do not exist
    w.add_embedding_length(model.hidden)
    w.add_feed_forward_length(model.ffn)
    w.add_head_count(model.n_heads)
    w.add_head_count_kv(model.n_heads)
    w.add_layer_norm_eps(model.ln_eps)
    w.add_vocab_size(vocab)
    w.add_file_type(file_type)
    w.add_quantization_version(2)
    for key, value in model.gguf_keys:
        _add_key(w, key, value)
    write_token_spec(w, tokenizer)
    plan = planned(model, vocab)
    for gname, arr in plan:
        t = _tensor_qtype(arr.shape, qtype)
        byte_shape = _byte_shape(arr.shape, t)
        w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (gname, arr) in enumerate(plan):
        if not np.isfinite(arr).all():
            raise KilnError(f"{model.source}: tensor for {gname} contains NaN or infinite values")
        w.write_tensor_data(_convert(arr, _tensor_qtype(arr.shape, qtype)))
        if progress:
            progress("convert", i + 1, len(plan))
    w.close()


def write_gpt2_gguf_native(spec: ArborSpec, tensors: dict[str, np.ndarray], tokenizer: TokenizerSpec, dest: Path,
                           qtype: Q, file_type: int, name: str, progress: Progress | None = None) -> None:
    """The former native-Arbor signature (ArborSpec + native tensors), for callers not yet reading
    through kiln.checkpoint.arbor.read_arbor_gpt2: builds the common form and writes it, to the same
    bytes as before. Remove once nothing calls it."""
    config, state = to_gpt2(spec, tensors)
    model = Gpt2Checkpoint(
        config=config, state=state, source=spec.source, tokenizer_dir=tokenizer.source.parent, tokenizer=tokenizer,
        name=name, architecture="arbor", layout=spec.layout,
        gguf_keys=(("arbor.ffn_dims", list(spec.ffn_widths)), ("arbor.activation", "gelu_erf"),
                   ("arbor.source_format", f"native-{spec.layout}")),
        native=(spec, tensors))
    write_gpt2_gguf(model, dest, qtype, file_type, progress)


def hf_state_from_gguf(gguf_path: str | Path, model: Gpt2Checkpoint) -> dict[str, np.ndarray]:
    """The GGUF's tensors dequantized back into `model`'s HF form (names, Conv1D layout, the model's
    vocab rows): what the artifact computes with, for a reference run on the artifact's own weights.
    An f32 GGUF gives back `model.state` exactly."""
    from kiln.gguf_header import open_gguf

    g = open_gguf(gguf_path)
    sources = dict(tensor_names(model.n_layers, model.tied))
    out: dict[str, np.ndarray] = {}
    for t in g.tensors:
        src = sources.get(t.name)
        if src is None:
            raise KilnError(f"{gguf_path}: tensor {t.name} is not part of this GPT-2 model's GGUF")
        w = np.asarray(g.dequantize(t), np.float32)
        if src.transpose:
            w = np.ascontiguousarray(w.T)
        if src.hf in _PADDED:
            w = w[:model.vocab]
        out[src.hf] = np.array(w)  # a copy: the F32 dequantization is a view of the mapped file
    missing = sorted(set(model.state) - set(out))
    if missing:
        raise KilnError(f"{gguf_path}: no tensor for {missing[0]}")
    return out
