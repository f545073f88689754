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
SHAPES = {"qwen2.5-0.5b-shape": QWEN25_05B, "arbor-500m-shape": ARBOR_500M}
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
    if arbor:  # Llama-3-style vocabulary (Arbor's tokenizer is Hermes-4-405B's, 128k entries)
        tok = synthetic_tokenizer(config["vocab_size"], bpe.LLAMA3_REGEX, tiny.LLAMA3_SPECIALS)
        state = arbor_state(config)
    else:
        tok = synthetic_tokenizer(config["vocab_size"])
        state = random_state(config)
    assert tok.get_vocab_size(with_added_tokens=True) == config["vocab_size"]
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
    (tmp / "README.md").write_text(f"# {name}\n\nRandom weights with {name.replace('-shape', '')}'s exact config; "
                                   "a synthetic tokenizer of the same size. Cost-only benchmarks: never quality.\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


if __name__ == "__main__":
    print(build(*(sys.argv[1:2] or ["qwen2.5-0.5b-shape"])))
