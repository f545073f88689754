"""`kiln plan` on a hybrid: Qwen3.5-0.8B's published config.json (no weights), checked against figures computed by
hand, beside Qwen2.5-0.5B's.

Qwen3.5-0.8B has 24 layers, 6 of them gated full attention (2 KV heads of 256) and 18 Gated DeltaNet layers that
keep no K/V but a fixed float32 state per sequence (a conv window of kernel - 1 columns over the q, k and v channels,
and one 128 x 128 matrix per value head). Qwen2.5-0.5B keeps K/V in all 24 layers, 2 KV heads of 64: the same
12288 bytes per token. At equal context the two differ by the 0.8B's 19.3 MiB of state, and, with flash attention
off, by llama.cpp's attention-score buffer (per context cell, 6 bytes per head: 8 heads against 14).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.bench.cost_model import LLAMA_FIXED, RUNTIME_BASE, UBATCH, VOCAB_BYTES
from kiln.bench.geometry import hf_geometry
from kiln.bench.plan import GGUF_VOCAB_BYTES, plan

MIB = 2 ** 20
LAYERS = ["linear_attention"] * 3 + ["full_attention"]
# Qwen/Qwen3.5-0.8B config.json's text_config, as a Qwen3_5ForCausalLM config (public copies of the file).
QWEN35_08B = {
    "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": 1024,
    "intermediate_size": 3584, "num_hidden_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 256, "attention_bias": False, "attn_output_gate": True, "linear_num_key_heads": 16,
    "linear_num_value_heads": 16, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6, "full_attention_interval": 4,
    "max_position_embeddings": 262144, "tie_word_embeddings": True, "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False, "layer_types": LAYERS * 6, "eos_token_id": 248044,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10], "mrope_interleaved": True},
}
# Qwen/Qwen2.5-0.5B-Instruct config.json, with the YaRN x4 Qwen documents for contexts past its native 32768.
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}

# By hand, from the numbers above.
KV_PER_TOKEN = 6 * 2 * 2 * 256 * 2  # full-attention layers x (K, V) x KV heads x head dim x f16 bytes
CONV_DIM = 2 * 16 * 128 + 16 * 128  # q and k (16 key heads of 128) and v (16 value heads of 128): 6144 channels
STATE = 18 * ((4 - 1) * CONV_DIM * 4 + 16 * 128 * 128 * 4)  # per DeltaNet layer: conv window + delta state, f32
QWEN25_KV_PER_TOKEN = 24 * 2 * 2 * 64 * 2
# llama.cpp keeps a state for every sequence id of the context: kiln's engine opens the caller's sequence and 4
# prompt-cache slots (kiln.runtime.llamacpp), so a one-sequence run holds 5 states (96.3 MiB).
SEQUENCES = 1 + 4


def q8_0_weight_bytes() -> int:
    """Qwen3.5-0.8B's q8_0 GGUF tensors by hand: every matrix in q8_0 blocks (34 bytes per 32), the vectors and the
    conv kernels float32; the MTP block the published checkpoint carries counted (llama.cpp's converter writes it);
    the embedding tied (no output.weight)."""
    d, ff, v, hd = 1024, 3584, 248320, 256
    mlp = 3 * d * ff
    linear_mat = d * CONV_DIM + d * 2048 + 2 * d * 16 + 2048 * d + mlp  # qkv, z (gate), b and a, out, MLP
    linear_vec = CONV_DIM * 4 + 2 * d + 128 + 2 * 16  # conv1d, two layer norms, gated norm, A, dt bias
    full_mat = d * 2 * 8 * hd + 2 * d * 2 * hd + 8 * hd * d + mlp  # q with its gate, k and v, o, MLP
    full_vec = 2 * d + 2 * hd  # two layer norms, q and k norms
    matrices = v * d + 18 * linear_mat + 7 * full_mat + 2 * d * d  # embedding, layers + MTP layer, MTP fc
    vectors = 18 * linear_vec + 7 * full_vec + 3 * d + d  # ... + MTP's three norms, output norm
    assert matrices + vectors == 772_845_888
    return matrices // 32 * 34 + vectors * 4


def fixed_bytes(weights: int, vocab: int, ff: int, state: int) -> int:
    """Everything that does not grow with the context (the cost model's runtime and compute constants)."""
    return RUNTIME_BASE["gguf"] + weights + state + int(LLAMA_FIXED + vocab * VOCAB_BYTES + UBATCH * ff * 16)


def per_token(kv: int, heads: int, flash_attn: bool) -> int:
    """KV plus llama.cpp's attention buffer per context cell: 6 bytes per head + 2 (f32 mask), or the mask alone."""
    return kv + UBATCH * (4 if flash_attn else 6 * heads + 2)


def largest(budget: int, fixed: int, step: int) -> int:
    return (budget - fixed) // step // 256 * 256


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, config in (("qwen3.5-0.8b", QWEN35_08B), ("qwen2.5-0.5b", QWEN25_05B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        out[name] = tmp_path / name
    return out


def test_kv_and_state_from_the_family_hooks() -> None:
    from kiln import families

    family = families.for_config(QWEN35_08B)
    assert family.kv_layer_count(QWEN35_08B) == 6
    assert family.recurrent_state_bytes(QWEN35_08B) == STATE == 20_201_472  # 19.3 MiB
    geo = hf_geometry(QWEN35_08B)
    assert (geo.n_layers, geo.kv_layers, geo.context_length) == (24, 6, 262144)
    assert geo.kv_bytes_per_token("f16") == KV_PER_TOKEN == 12288
    assert geo.state_bytes == STATE
    # The published multimodal layout (text model under text_config) reads the same.
    text = {k: v for k, v in QWEN35_08B.items() if k != "architectures"}
    mm = hf_geometry({"architectures": ["Qwen3_5ForConditionalGeneration"], "tie_word_embeddings": True,
                      "text_config": text})
    assert (mm.kv_layers, mm.kv_bytes_per_token("f16"), mm.state_bytes) == (6, KV_PER_TOKEN, STATE)


def test_qwen25_keeps_the_same_kv_per_token_without_state() -> None:
    """The interesting fact: a quarter of the layers with 4x wider KV heads, the same bytes per token."""
    geo = hf_geometry(QWEN25_05B)
    assert geo.kv_bytes_per_token("f16") == QWEN25_KV_PER_TOKEN == KV_PER_TOKEN
    assert geo.state_bytes == 0
    assert (geo.native_context, geo.context_length) == (32768, 131072)


def test_plan_command_context_for_a_budget(configs: dict[str, Path]) -> None:
    """`kiln plan --json` from config.json alone: q8_0's weights, KV per token, state and largest context in 2 GiB."""
    from kiln_cli import kiln

    proc = kiln("plan", configs["qwen3.5-0.8b"], "--memory", "2GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["geometry"]["kv_layers"] == 6 and out["geometry"]["state_bytes"] == STATE
    q8 = next(c for c in out["candidates"] if c["quant"] == "q8_0")
    weights = q8_0_weight_bytes() + 248320 * GGUF_VOCAB_BYTES
    assert q8["weights_bytes"] == weights == 831_569_152
    step = per_token(KV_PER_TOKEN, 8, flash_attn=False)  # 12288 + 25600 bytes per token
    want = largest(2 << 30, fixed_bytes(weights, 248320, 3584, SEQUENCES * STATE), step)
    assert q8["max_context"] == want == 26880
    e = q8["estimate"]
    assert e["kv_per_token"] == KV_PER_TOKEN and e["repacked"] == 0
    assert e["kv"] == KV_PER_TOKEN * want + SEQUENCES * STATE
    assert e["total"] <= 2 << 30 < e["total"] + 256 * step


@pytest.mark.parametrize("flash_attn", [False, True])
def test_plan_side_by_side_with_qwen25(configs: dict[str, Path], flash_attn: bool) -> None:
    """In 4 GiB at q8_0: Qwen3.5-0.8B's larger weights and its state against Qwen2.5-0.5B's larger attention
    buffer (14 heads against 8). Each plan's largest context equals the hand computation."""
    budget = 4 << 30
    p35 = plan(configs["qwen3.5-0.8b"], budget, flash_attn=flash_attn)
    p25 = plan(configs["qwen2.5-0.5b"], budget, flash_attn=flash_attn)
    c35 = next(c for c in p35.candidates if c.quant == "q8_0")
    c25 = next(c for c in p25.candidates if c.quant == "q8_0")
    want35 = largest(budget, fixed_bytes(c35.weights, 248320, 3584, SEQUENCES * STATE),
                     per_token(KV_PER_TOKEN, 8, flash_attn))
    want25 = min(131072, largest(budget, fixed_bytes(c25.weights, 151936, 4864, 0),
                                 per_token(QWEN25_KV_PER_TOKEN, 14, flash_attn)))
    assert (c35.max_context, c25.max_context) == (want35, want25)
    assert c35.estimate.kv_per_token == c25.estimate.kv_per_token == 12288
    if flash_attn:  # only KV grows: both reach far, Qwen3.5 to 4x Qwen2.5's 32K window
        assert c25.max_context == 131072 and c35.max_context > 131072
    else:  # the score buffer dominates: Qwen3.5 fits more context despite 287 MiB more weights and its states
        assert c35.max_context > c25.max_context
    assert "6 attention layers + recurrent state 19.3 MiB/sequence" in p35.explanation
