"""Unit tests: RoPE settings (kiln.checkpoint.rope), the byte-level alphabet (kiln.bytelevel) and the
safetensors reader (kiln.checkpoint.tensors) against files written by the `safetensors` package and
by transformers' sharded `save_pretrained`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.bytelevel import (ESSENTIAL_BYTES, NEVER_IN_UTF8, _byte_to_char, byte_alphabet, describe,
                            essential_missing, missing_bytes, reachable_missing)
from kiln.checkpoint import load_checkpoint
from kiln.checkpoint.rope import RopeSettings, from_config, parse_scaling, resolve
from kiln.checkpoint.tensors import bf16_to_f32, open_safetensors, open_weights
from kiln.errors import KilnError

# ----------------------------------------------------------------------------- from_config

QWEN25_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def test_default_when_no_block() -> None:
    rope = from_config({"max_position_embeddings": 2048}, "config.json")
    assert rope == RopeSettings(type="none", factor=1.0, original_context=2048, context_length=2048)
    assert not rope.scaled


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind_key", ["type", "rope_type"])
@pytest.mark.parametrize("kind", ["default", "none"])
def test_default_spellings(key: str, kind_key: str, kind: str) -> None:
    config = {"max_position_embeddings": 512, key: {kind_key: kind, "rope_theta": 1e6}}
    rope = from_config(config, "config.json")
    assert rope.type == "none" and rope.context_length == 512 and rope.original_context == 512


def test_null_block_is_default() -> None:
    rope = from_config({"max_position_embeddings": 512, "rope_scaling": None}, "c")
    assert rope.type == "none" and rope.context_length == 512


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_linear(key: str) -> None:
    rope = from_config({"max_position_embeddings": 4096, key: {"type": "linear", "factor": 2}}, "c")
    assert (rope.type, rope.factor, rope.original_context, rope.context_length) == ("linear", 2.0, 4096, 8192)
    assert isinstance(rope.factor, float)


def test_linear_with_explicit_original() -> None:
    rope = from_config({"max_position_embeddings": 4096,
                        "rope_scaling": {"type": "linear", "factor": 4.0, "original_max_position_embeddings": 2048}},
                       "c")
    assert (rope.original_context, rope.context_length) == (2048, 8192)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_yarn_qwen25_style(key: str) -> None:
    block = dict(QWEN25_YARN)
    if key == "rope_parameters":  # transformers 5 spelling: rope_type + theta inside the block
        block = {"rope_type": block.pop("type"), **block, "rope_theta": 1e6}
    rope = from_config({"max_position_embeddings": 32768, key: block}, "c")
    assert (rope.type, rope.factor, rope.original_context, rope.context_length) == ("yarn", 4.0, 32768, 131072)


def test_yarn_keeps_beta_and_attention_factor() -> None:
    block = {**QWEN25_YARN, "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.1}
    rope = from_config({"max_position_embeddings": 32768, "rope_parameters": block}, "c")
    assert (rope.beta_fast, rope.beta_slow, rope.attention_factor) == (32.0, 1.0, 1.1)


def test_context_never_below_max_position_embeddings() -> None:
    # yarn declared on top of an already long max_position_embeddings: keep the larger
    rope = from_config({"max_position_embeddings": 65536,
                        "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}},
                       "c")
    assert rope.context_length == 65536 and rope.original_context == 4096


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_llama3(key: str) -> None:
    rope = from_config({"max_position_embeddings": 131072, key: dict(LLAMA31)}, "c")
    assert (rope.type, rope.factor, rope.original_context, rope.context_length) == ("llama3", 8.0, 8192, 131072)
    assert (rope.low_freq_factor, rope.high_freq_factor) == (1.0, 4.0)


def test_llama3_without_original_uses_max_position() -> None:
    block = {k: v for k, v in LLAMA31.items() if k != "original_max_position_embeddings"}
    rope = from_config({"max_position_embeddings": 8192, "rope_scaling": block}, "c")
    assert (rope.original_context, rope.context_length) == (8192, 65536)


def test_rope_parameters_wins_over_rope_scaling() -> None:
    config = {"max_position_embeddings": 1024, "rope_parameters": {"rope_type": "linear", "factor": 2.0},
              "rope_scaling": {"type": "linear", "factor": 8.0}}
    assert from_config(config, "c").factor == 2.0


@pytest.mark.parametrize("block, needle", [
    ({"type": "dynamic", "factor": 2.0}, "'dynamic'"),
    ({"type": "longrope", "factor": 2.0}, "'longrope'"),
    ({"type": "linear"}, "'factor'"),
    ({"type": "linear", "factor": 0}, "'factor'"),
    ({"type": "linear", "factor": -2}, "'factor'"),
    ({"type": "linear", "factor": "2"}, "'factor'"),
    ({"type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ("linear", "must be an object"),
    ([{"type": "linear"}], "must be an object"),
])
def test_from_config_refusals(block, needle: str) -> None:
    with pytest.raises(KilnError) as err:
        from_config({"max_position_embeddings": 512, "rope_scaling": block}, "/m/config.json")
    assert needle in str(err.value) and "/m/config.json" in str(err.value)


def test_from_real_fixture_config(tiny_qwen2_dir: Path) -> None:
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    rope = from_config(config, "c")
    assert rope.type == "none" and rope.context_length == config["max_position_embeddings"]


# ----------------------------------------------------------------------------- RopeSettings helpers

def test_hf_rope_parameters_round_trip() -> None:
    rope = from_config({"max_position_embeddings": 131072, "rope_parameters": dict(LLAMA31)}, "c")
    params = rope.hf_rope_parameters(500000.0)
    assert params["rope_theta"] == 500000.0 and params["rope_type"] == params["type"] == "llama3"
    again = from_config({"max_position_embeddings": 131072, "rope_parameters": params}, "c")
    assert again == rope
    assert RopeSettings(context_length=512).hf_rope_parameters(1e4) == {"rope_theta": 1e4, "rope_type": "default"}


def test_to_json_and_describe() -> None:
    rope = RopeSettings(type="linear", factor=2.0, original_context=512, context_length=1024)
    assert rope.to_json() == {"type": "linear", "factor": 2.0, "original_context": 512, "context_length": 1024}
    assert rope.describe() == "linear x2 (original 512, context 1024)"
    assert RopeSettings(original_context=512, context_length=512).describe() == "none (context 512)"


# ----------------------------------------------------------------------------- parse_scaling / resolve

NATIVE = RopeSettings(original_context=4096, context_length=4096)
NATIVE_YARN = RopeSettings(type="yarn", factor=4.0, original_context=32768, context_length=131072)


@pytest.mark.parametrize("text, expected", [
    ("none", ("none", 1.0)), ("NONE", ("none", 1.0)), ("linear:2", ("linear", 2.0)),
    ("yarn:4", ("yarn", 4.0)), ("Yarn:1.5", ("yarn", 1.5)), ("linear:1", ("linear", 1.0)),
])
def test_parse_scaling(text: str, expected) -> None:
    assert parse_scaling(text) == expected


@pytest.mark.parametrize("text, needle", [
    ("foo:2", "expected linear:FACTOR"), ("linear", "expected linear:FACTOR"), ("llama3:8", "expected"),
    ("yarn:abc", "not a number"), ("linear:", "not a number"), ("linear:0", "positive"),
    ("linear:-1", "positive"), ("linear:nan", "positive"), ("linear:inf", "positive"),
    ("yarn:0.5", "below 1"),
])
def test_parse_scaling_refusals(text: str, needle: str) -> None:
    with pytest.raises(KilnError) as err:
        parse_scaling(text)
    assert needle in str(err.value) and "--rope-scaling" in str(err.value)


def test_resolve_no_overrides_is_identity() -> None:
    assert resolve(NATIVE) == NATIVE
    assert resolve(NATIVE_YARN) == NATIVE_YARN


@pytest.mark.parametrize("kind", ["linear", "yarn"])
@pytest.mark.parametrize("factor", [2, 4, 1.5])
def test_resolve_raises_context_to_factor_times_original(kind: str, factor: float) -> None:
    rope = resolve(NATIVE, f"{kind}:{factor}")
    assert (rope.type, rope.factor, rope.original_context) == (kind, float(factor), 4096)
    assert rope.context_length == int(round(factor * 4096))


def test_resolve_with_original_context() -> None:
    rope = resolve(NATIVE, "yarn:4", original_context=2048)
    assert (rope.original_context, rope.context_length) == (2048, 8192)


def test_resolve_original_context_on_scaled_native() -> None:
    rope = resolve(NATIVE_YARN, original_context=16384)
    assert (rope.type, rope.factor, rope.original_context, rope.context_length) == ("yarn", 4.0, 16384, 65536)


def test_resolve_none_removes_native_scaling() -> None:
    rope = resolve(NATIVE_YARN, "none")
    assert rope == RopeSettings(original_context=32768, context_length=32768)


def test_resolve_scaling_replaces_native_scaling() -> None:
    rope = resolve(NATIVE_YARN, "linear:2")
    assert (rope.type, rope.factor, rope.original_context, rope.context_length) == ("linear", 2.0, 32768, 65536)
    assert rope.beta_fast is None


def test_resolve_context_override() -> None:
    assert resolve(NATIVE, "linear:4", context=10000).context_length == 10000
    assert resolve(NATIVE, "linear:4", context=16384).context_length == 16384  # exactly the limit
    assert resolve(NATIVE, context=4096).context_length == 4096
    shorter = resolve(NATIVE, context=1024, allow_shorter_context=True)
    assert shorter.context_length == 1024 and shorter.original_context == 4096


def test_resolve_context_below_trained_needs_flag() -> None:
    with pytest.raises(KilnError, match="--allow-shorter-context"):
        resolve(NATIVE, context=2048)
    with pytest.raises(KilnError, match="below the model's trained context 4096"):
        resolve(NATIVE, "yarn:2", context=2048)


def test_resolve_context_above_supported() -> None:
    with pytest.raises(KilnError, match=r"exceeds .*\(4096\).*--rope-scaling"):
        resolve(NATIVE, context=8192)
    with pytest.raises(KilnError, match=r"exceeds .*\(8192\)") as err:
        resolve(NATIVE, "linear:2", context=8193)
    assert "pass --rope-scaling" not in str(err.value)  # already scaled: no hint to scale


@pytest.mark.parametrize("kwargs, needle", [
    ({"scaling": "yarn:2", "original_context": 0}, "--original-context must be positive"),
    ({"scaling": "yarn:2", "original_context": -1}, "--original-context must be positive"),
    ({"original_context": 2048}, "only makes sense with --rope-scaling"),
    ({"context": 0}, "--context must be positive"),
    ({"context": -5, "allow_shorter_context": True}, "--context must be positive"),
    ({"scaling": "bogus:2"}, "--rope-scaling"),
])
def test_resolve_refusals(kwargs, needle: str) -> None:
    with pytest.raises(KilnError) as err:
        resolve(NATIVE, **kwargs)
    assert needle in str(err.value)


def test_resolve_without_known_context() -> None:
    with pytest.raises(KilnError, match="--original-context"):
        resolve(RopeSettings(), "linear:2")
    assert resolve(RopeSettings(), "linear:2", original_context=1000).context_length == 2000


# ----------------------------------------------------------------------------- bytelevel

def test_byte_alphabet_is_gpt2() -> None:
    table = _byte_to_char()
    assert len(table) == 256 and len(byte_alphabet()) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!"
    assert table[0x20] == "\u0120"  # 'Ġ'
    assert table[0x0A] == "\u010a"  # 'Ċ'
    assert table[0x00] == "\u0100"
    assert table[0xAD] == "\u0143"  # soft hyphen is not printable: remapped


def test_essential_set() -> None:
    assert {0x09, 0x0A, 0x0D, 0x20, ord("a"), ord("~")} <= ESSENTIAL_BYTES
    assert set(range(0x80, 0xC0)) <= ESSENTIAL_BYTES  # every continuation byte
    assert set(range(0xC2, 0xF1)) <= ESSENTIAL_BYTES  # lead bytes up to U+3FFFF
    for b in (0x00, 0x04, 0x1B, 0x7F, 0xC0, 0xC1, 0xF1, 0xF4, 0xF5, 0xFF):
        assert b not in ESSENTIAL_BYTES
    assert not (ESSENTIAL_BYTES & NEVER_IN_UTF8)
    # every character below U+40000 encodes to essential bytes only (control chars aside)
    for cp in list(range(0x20, 0x7F)) + [0xE9, 0x4E2D, 0x1F600, 0x3FFFF]:
        assert set(chr(cp).encode("utf-8")) <= ESSENTIAL_BYTES


def test_missing_bytes_and_essential() -> None:
    full = byte_alphabet()
    assert missing_bytes(full) == frozenset()
    table = _byte_to_char()
    vocab = set(full) - {table[0x61], table[0x20], table[0x04], table[0xFF]} | {"hello", "Ġworld"}
    assert missing_bytes(vocab) == {0x04, 0x20, 0x61, 0xFF}
    assert essential_missing(missing_bytes(vocab)) == [0x20, 0x61]
    assert reachable_missing(missing_bytes(vocab)) == [0x04, 0x20, 0x61]
    assert describe([0x61, 0x04]) == "0x04, 0x61"


SMOLLM2_MISSING = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2}


def test_smollm2_missing_bytes_are_not_essential() -> None:
    assert essential_missing(SMOLLM2_MISSING | NEVER_IN_UTF8) == []
    assert reachable_missing(SMOLLM2_MISSING | NEVER_IN_UTF8) == sorted(SMOLLM2_MISSING)


def test_smollm2_real_vocabulary(smollm2_dir: Path) -> None:
    vocab = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    missing = missing_bytes(vocab)
    assert set(reachable_missing(missing)) == SMOLLM2_MISSING
    assert essential_missing(missing) == []


def test_tiny_fixture_vocabularies_are_complete(tiny_qwen2_dir: Path, tiny_llama_dir: Path) -> None:
    for d in (tiny_qwen2_dir, tiny_llama_dir):
        vocab = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        assert missing_bytes(vocab) == frozenset()


# ----------------------------------------------------------------------------- safetensors reader

def _sample(shape=(3, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_reads_f32_and_f16_from_safetensors_numpy(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    a32, a16 = _sample((4, 6)), _sample((7,), 1).astype(np.float16)
    ints = np.arange(12, dtype=np.int32).reshape(3, 4)
    save_file({"a32": a32, "a16": a16, "ints": ints}, tmp_path / "model.safetensors", metadata={"format": "np"})
    src = open_weights(tmp_path)
    assert sorted(src.names()) == ["a16", "a32", "ints"]
    assert (src.dtype("a32"), src.dtype("a16"), src.dtype("ints")) == ("F32", "F16", "I32")
    assert src.shape("a32") == (4, 6) and src.shape("a16") == (7,)
    for name, ref in (("a32", a32), ("a16", a16), ("ints", ints)):
        got = src.load(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref.astype(np.float32))
    assert "a32" in src and "nope" not in src


def test_reads_bf16_f16_f32_from_safetensors_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ref = {
        "w.bf16": torch.randn(8, 16, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(5, 3, generator=g).to(torch.float16),
        "w.f32": torch.randn(2, 3, 4, generator=g),
        "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
    }
    ref["w.bf16"][0, :4] = torch.tensor([0.0, -0.0, 1e30, -3.0e-39], dtype=torch.bfloat16)  # incl. subnormal
    save_file(ref, tmp_path / "model.safetensors")
    src = open_safetensors([tmp_path / "model.safetensors"])
    assert src.dtype("w.bf16") == "BF16" and src.dtype("w.f16") == "F16"
    assert src.shape("scalar") == () and src.shape("w.f32") == (2, 3, 4)
    for name, t in ref.items():
        got = src.load(name)
        assert got.dtype == np.float32 and got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got, t.float().numpy())
    assert np.signbit(src.load("w.bf16")[0, 1])


def test_bf16_to_f32_exact() -> None:
    raw = np.array([0x3F80, 0xC000, 0x7F80, 0x0000, 0x8000, 0x0001], dtype=np.uint16)
    out = bf16_to_f32(raw)
    assert out[:3].tolist() == [1.0, -2.0, float("inf")]
    assert out[3] == 0.0 and np.signbit(out[4]) and 0 < out[5] < 1e-38


def test_load_returns_a_copy(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"x": _sample()}, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    arr = open_weights(tmp_path).load("x")
    arr[...] = 0  # writable, and writing it leaves the file alone
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_duplicate_tensor_across_files(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"x": _sample()}, tmp_path / "a.safetensors")
    save_file({"x": _sample()}, tmp_path / "b.safetensors")
    with pytest.raises(KilnError, match="also appears in a.safetensors"):
        open_weights(tmp_path)


@pytest.fixture(scope="module")
def sharded_qwen2(tiny_qwen2_dir: Path, tmp_path_factory) -> Path:
    """tiny-qwen2 re-saved by transformers in ~1 MB shards, with its tokenizer files alongside."""
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "tiny-qwen2"
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype="float32")
    model.save_pretrained(out, max_shard_size="1MB")
    for f in tiny_qwen2_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def test_sharded_equals_unsharded(sharded_qwen2: Path, tiny_qwen2_dir: Path) -> None:
    index = json.loads((sharded_qwen2 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (sharded_qwen2 / "model.safetensors").exists()
    sharded, single = open_weights(sharded_qwen2), open_weights(tiny_qwen2_dir)
    assert sorted(sharded.names()) == sorted(single.names())
    files = set()
    for name in single.names():
        assert sharded.shape(name) == single.shape(name)
        np.testing.assert_array_equal(sharded.load(name), single.load(name))
        files.add(sharded._infos[name].file.name)
    assert files == set(shards)  # really read from several shards


def test_sharded_checkpoint_loads_and_validates(sharded_qwen2: Path, tiny_qwen2_dir: Path) -> None:
    ckpt = load_checkpoint(sharded_qwen2)
    ref = load_checkpoint(tiny_qwen2_dir)
    assert ckpt.spec.n_params == ref.spec.n_params and ckpt.spec.family == "qwen2"


def test_sharded_index_decides_the_files(sharded_qwen2: Path, tmp_path: Path) -> None:
    broken = tmp_path / "m"
    shutil.copytree(sharded_qwen2, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (broken / victim).unlink()
    with pytest.raises(KilnError, match=f"shard {victim} is missing"):
        open_weights(broken)
    (broken / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(KilnError, match="corrupt index"):
        open_weights(broken)
    (broken / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(KilnError, match="corrupt index"):
        open_weights(broken)


def test_pickle_refused_without_flag_and_read_with_it(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    state = load_file(tiny_qwen2_dir / "model.safetensors")
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(KilnError, match="--allow-pickle"):
        open_weights(tmp_path)
    src = open_weights(tmp_path, allow_pickle=True)
    assert sorted(src.names()) == sorted(state)
    name = "model.embed_tokens.weight"
    np.testing.assert_array_equal(src.load(name), state[name].to(torch.bfloat16).float().numpy())
