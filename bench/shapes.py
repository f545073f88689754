#!/usr/bin/env python
"""Full-size model shapes with random weights, for cost-only benchmarks (speed and memory, never quality).

Why: the seeds promise "context 4K / 16K / 32K" tables for Qwen-class models, and this machine has no
hub access. Memory and speed depend on the shapes alone (layers, heads, KV heads, widths, vocabulary),
so a checkpoint with Qwen2.5-0.5B's exact config.json and random weights costs exactly what the real
one costs. Its tokenizer is synthetic (a byte-level BPE with the same number of entries, 151936, built
from byte pairs and triples) because the real one cannot be downloaded here; it tokenizes nothing
meaningfully and every report labels these rows "cost only, random weights".

The checkpoint is written once into $KILN_CACHE/bench-shapes/<name> (1 GB, float16 safetensors) and
reused; `build(name)` returns its path.

Qwen3.5-0.8B and Qwen3.5-2B (Gated DeltaNet hybrids) are written from their family's own tensor table
(kiln.families: `Family.tensors(spec)` of the spec read from the shape's config.json), so every name and
shape comes from the code that exports them and nothing about their layout is repeated here; bfloat16, as
published, streamed tensor by tensor into one safetensors file (1.5 GB and 3.9 GB).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

# Qwen/Qwen2.5-0.5B-Instruct config.json (the published one; torch_dtype bfloat16 -> written as float16).
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "float16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
# Arbor-500M's native ArborConfig as its trainer builds it (reference/arbor.md §1.3: vocab 128000, dim 1024,
# 24 layers, 16 heads, ffn 4096, max_seq_length 131072; GPT-2 layout with a learned-size sinusoidal table).
ARBOR_500M = {
    "vocab_size": 128000, "dim": 1024, "num_layers": 24, "num_heads": 16, "ffn_dim": 4096,
    "max_seq_length": 131072, "dropout": 0.1, "attention_dropout": 0.1, "ffn_dropout": 0.1,
    "layer_norm_eps": 1e-5, "activation": "gelu", "causal": True, "tie_word_embeddings": True,
    "adaptive_context": False, "min_context_length": 1024, "max_context_length": 131072,
}

_LAYER_TYPES = ["linear_attention"] * 3 + ["full_attention"]
# Qwen/Qwen3.5-0.8B config.json, its `text_config` written as a Qwen3_5ForCausalLM text config (the published
# checkpoint is Qwen3_5ForConditionalGeneration: the same text model plus a vision tower that a GGUF leaves
# out). Values from several public copies of that config.json, which agree: vocab 248320, hidden 1024,
# intermediate 3584, 24 layers ([linear x3, full] x 6), 8 heads / 2 KV heads of 256, attn_output_gate, linear
# (DeltaNet) 16 key heads / 16 value heads of 128, conv kernel 4, rms_norm_eps 1e-6, full_attention_interval 4,
# 262144 positions, tied embeddings, one MTP layer (mtp_num_hidden_layers 1, mtp_use_dedicated_embeddings
# false), rope_parameters as below, eos 248044.
QWEN35_08B = {
    "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "dtype": "bfloat16",
    "attention_bias": False, "attn_output_gate": True, "eos_token_id": 248044, "full_attention_interval": 4,
    "head_dim": 256, "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3584,
    "layer_types": _LAYER_TYPES * 6, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_value_head_dim": 128,
    "max_position_embeddings": 262144, "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
    "num_attention_heads": 8, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    "tie_word_embeddings": True, "vocab_size": 248320,
}
# Qwen/Qwen3.5-2B: the 0.8B's layout, wider. No public copy of its config.json was found here; the figures
# come from its model card as restated by several public pages (apxml.com/models/qwen35-2b,
# awesomeagents.ai/models/qwen-3-5-2b, fitmygpu.com/models/qwen-3.5-2b), which agree: hidden 2048, FFN
# intermediate 6144, 24 layers as 6 x (3 DeltaNet + 1 gated attention), attention 8 Q / 2 KV heads of 256 (rotary
# dim 64, theta 1e7), DeltaNet 16 QK / 16 V heads of 128, vocab 248320, 262144 positions, one MTP layer.
# NOT confirmed from a copy of config.json: tie_word_embeddings (true assumed, as the 0.8B: kiln's cost model
# gives a tied 2B q4_k_m without the MTP block 1.272 GB, the Q4_K_M published for it is 1,280,835,840 bytes, an
# untied one would be 1.558 GB), and linear_conv_kernel_dim 4, rms_norm_eps 1e-6, eos 248044, the rope_parameters
# (the family's shared values, taken from the 0.8B).
QWEN35_2B = {**QWEN35_08B, "hidden_size": 2048, "intermediate_size": 6144}
# Qwen2.5-0.5B with YaRN x4 baked into its exports (kiln export --rope-scaling yarn:4 --original-context 32768),
# the only way it reaches 131072 (its native window is 32768): the same checkpoint, so the same build.
QWEN25_YARN = {"rope_scaling": "yarn:4", "original_context": 32768}
SHAPES = {"qwen2.5-0.5b-shape": QWEN25_05B, "arbor-500m-shape": ARBOR_500M,
          "qwen3.5-0.8b-shape": QWEN35_08B, "qwen3.5-2b-shape": QWEN35_2B}
FROM_TENSOR_TABLE = ("qwen3.5-0.8b-shape", "qwen3.5-2b-shape")  # random weights from the family's own table
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench-shapes"


def synthetic_tokenizer(size: int, regex: str | None = None, specials: tuple[str, ...] = SPECIALS):
    """A byte-level BPE with exactly `size` entries: 256 byte symbols, byte pairs, then pair+byte triples."""
    from kiln.fixtures import bpe

    regex = regex or bpe.QWEN2_REGEX

    sym = bpe.byte_symbols()
    alphabet = [sym[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    target = size - len(specials)
    pairs = [(a, b) for a in alphabet for b in alphabet]
    for a, b in pairs:
        if len(vocab) >= target:
            break
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    for a, b in pairs:
        for c in alphabet:
            if len(vocab) >= target:
                break
            if a + b + c not in vocab:
                vocab[a + b + c] = len(vocab)
                merges.append((a + b, c))
        if len(vocab) >= target:
            break
    return bpe.from_vocab(vocab, merges, bpe.regex_pre_tokenizer(regex), specials)


def random_state(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    h, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = d // h
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)

    state = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": np.ones(d, np.float16)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": w(h * hd, d), p + "self_attn.q_proj.bias": w(h * hd),
            p + "self_attn.k_proj.weight": w(kv * hd, d), p + "self_attn.k_proj.bias": w(kv * hd),
            p + "self_attn.v_proj.weight": w(kv * hd, d), p + "self_attn.v_proj.bias": w(kv * hd),
            p + "self_attn.o_proj.weight": w(d, h * hd),
            p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d), p + "mlp.down_proj.weight": w(d, ff),
            p + "input_layernorm.weight": np.ones(d, np.float16),
            p + "post_attention_layernorm.weight": np.ones(d, np.float16),
        })
    return state


def arbor_state(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Arbor's native state dict (ArborTransformer names), float16, random; the positional table as Arbor
    computes it (sinusoidal, [1, P, D])."""
    d, f, v, P = config["dim"], config["ffn_dim"], config["vocab_size"], config["max_seq_length"]
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)

    pos = np.arange(P, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, d, 2, dtype=np.float32) * (-np.log(10000.0) / d))
    pe = np.zeros((P, d), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    state = {"token_embedding.embedding.weight": w(v, d), "pos_encoding.pe": pe[None].astype(np.float16),
             "final_norm.weight": np.ones(d, np.float16), "final_norm.bias": np.zeros(d, np.float16)}
    for i in range(config["num_layers"]):
        p = f"layers.{i}."
        state.update({
            p + "self_attn.in_proj_weight": w(3 * d, d), p + "self_attn.in_proj_bias": w(3 * d),
            p + "self_attn.out_proj.weight": w(d, d), p + "self_attn.out_proj.bias": w(d),
            p + "norm1.weight": np.ones(d, np.float16), p + "norm1.bias": np.zeros(d, np.float16),
            p + "norm2.weight": np.ones(d, np.float16), p + "norm2.bias": np.zeros(d, np.float16),
            p + "ffn.fc1.weight": w(f, d), p + "ffn.fc1.bias": w(f),
            p + "ffn.fc2.weight": w(d, f), p + "ffn.fc2.bias": w(d),
        })
    return state


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def table_tensors(directory: Path, config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(checkpoint name, shape, init) of every tensor the config's family exports, from its tensor table: the spec
    is read from `directory` (config.json and tokenizer already there, no weights yet), with the MTP blocks the
    config states (a published checkpoint holds them; kiln writes them as the converter does). init: "normal"
    for matrices, "zeros" for the norms stored as w and applied as (1 + w), "ones" for other vectors."""
    from dataclasses import fields, replace

    from kiln import families

    family = families.for_config(config)
    if family is None:
        raise SystemExit(f"no kiln family reads {config.get('architectures')}")
    spec = family.read_spec(directory, config, config["architectures"][0])
    mtp = int(config.get("mtp_num_hidden_layers") or 0)
    if mtp and "mtp_layers" in {f.name for f in fields(spec)}:
        spec = replace(spec, mtp_layers=mtp)
    out = []
    for hf, _, shape, row in family.tensors(spec):
        if row.experts:
            raise SystemExit(f"{hf}: stacked (expert) rows are not written by this script")
        hf_shape = tuple(row.hf_shape(spec)) if row.hf_shape else tuple(shape)
        init = "normal" if len(hf_shape) > 1 else "zeros" if row.transform == "plus_one" else "ones"
        out.append((family.checkpoint_name(hf, spec), hf_shape, init))
    return out


def write_random_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], str]], seed: int = 0) -> None:
    """One bfloat16 safetensors file, written tensor by tensor (a few hundred MB of memory for a 2B model)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for _, shape, init in tensors:
            if init != "normal":
                f.write(_bf16(np.full(shape, 0.0 if init == "zeros" else 1.0, np.float32)).tobytes())
                continue
            rows, per_row = shape[0], int(np.prod(shape[1:]))
            step = max(1, (1 << 24) // per_row)  # about 64 MB of float32 at a time
            for r in range(0, rows, step):
                n = min(step, rows - r)
                f.write(_bf16(0.02 * rng.standard_normal(n * per_row, dtype=np.float32)).tobytes())


def build(name: str = "qwen2.5-0.5b-shape", force: bool = False) -> Path:
    """The random-weight checkpoint `name` (built once, then reused from the cache)."""
    from safetensors.numpy import save_file

    from kiln.fixtures import bpe, tiny

    dest = cache_dir() / name
    if (dest / "config.json").is_file() and not force:
        return dest
    config = SHAPES[name]
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arbor = "dim" in config
    state = None
    if arbor:  # Llama-3-style vocabulary (Arbor's tokenizer is Hermes-4-405B's, 128k entries)
        tok = synthetic_tokenizer(config["vocab_size"], bpe.LLAMA3_REGEX, tiny.LLAMA3_SPECIALS)
        state = arbor_state(config)
    else:  # Qwen's byte-level BPE with ChatML specials (Qwen2.5: 151936 entries, Qwen3.5: 248320)
        tok = synthetic_tokenizer(config["vocab_size"])
        if name not in FROM_TENSOR_TABLE:
            state = random_state(config)
    assert tok.get_vocab_size(with_added_tokens=True) == config["vocab_size"]
    if state is not None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if arbor:
        bpe.write_tokenizer_files(tok, tmp, chat_template=tiny.LLAMA3_TEMPLATE, bos="<|begin_of_text|>",
                                  eos="<|end_of_text|>", pad="<|end_of_text|>", unk=None, add_bos_token=True,
                                  model_max_length=config["max_seq_length"])
    else:
        bpe.write_tokenizer_files(tok, tmp, chat_template=tiny.CHATML_TEMPLATE, bos=None, eos="<|im_end|>",
                                  pad="<|endoftext|>", unk=None, add_bos_token=False,
                                  model_max_length=config["max_position_embeddings"])
    if state is None:  # the family's tensor table needs the config and tokenizer in place to read its spec
        write_random_safetensors(tmp / "model.safetensors", table_tensors(tmp, config))
    (tmp / "README.md").write_text(f"# {name}\n\nRandom weights with {name.replace('-shape', '')}'s exact config; "
                                   "a synthetic tokenizer of the same size. Cost-only benchmarks: never quality.\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


if __name__ == "__main__":
    print(build(*(sys.argv[1:2] or ["qwen2.5-0.5b-shape"])))
