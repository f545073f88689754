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
SHAPES = {"qwen2.5-0.5b-shape": QWEN25_05B}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench-shapes"


def synthetic_tokenizer(size: int):
    """A byte-level BPE with exactly `size` entries: 256 byte symbols, byte pairs, then pair+byte triples."""
    from kiln.fixtures import bpe

    sym = bpe.byte_symbols()
    alphabet = [sym[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    target = size - len(SPECIALS)
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
    return bpe.from_vocab(vocab, merges, bpe.regex_pre_tokenizer(bpe.QWEN2_REGEX), SPECIALS)


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
    tok = synthetic_tokenizer(config["vocab_size"])
    assert tok.get_vocab_size(with_added_tokens=True) == config["vocab_size"]
    save_file(random_state(config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
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
