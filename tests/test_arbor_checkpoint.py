"""Native Arbor checkpoints: detection in every layout Arbor's code writes, exact GPT-2 re-expression,
the Llama-style published layout through the ordinary Llama path, and refusals of bad input.

Fixtures are tiny random checkpoints built into a tmp dir (kiln.fixtures.arbor, about 0.3 s); the
reference is an independent float64 implementation of Arbor's forward (kiln.verify.arbor_reference)
run on the tensors as written, before any padding, so the padding itself is under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.checkpoint import load_checkpoint, rope
from kiln.checkpoint.arbor import ArborSpec, read_arbor, to_gpt2
from kiln.errors import KilnError
from kiln.fixtures.arbor import build_arbor_fixtures, tokenizer
from kiln.verify.arbor_reference import arbor_forward

PROMPTS = ("The quick brown fox jumps over the lazy dog.", "Arbor grows wider and deeper over time.",
           "1 2 3 4 5 6 7 8 9 10, and then some more numbers: 11 12 13")
TOL = 1e-4  # float32 GPT-2 vs float64 reference; logits have std ~2-3


@pytest.fixture(scope="module")
def arbor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_arbor_fixtures(tmp_path_factory.mktemp("arbor"))


def raw_state(path: Path) -> dict[str, np.ndarray]:
    """The native tensors exactly as written, read without kiln."""
    import torch
    from safetensors.numpy import load_file

    if path.is_dir() and (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    obj = torch.load(path if path.is_file() else path / "pytorch_model.bin", weights_only=True)
    obj = obj.get("model_state_dict", obj)
    return {k: v.numpy() for k, v in obj.items()}


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


def write_bare(directory: Path, state: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


# ----------------------------------------------------------------------------- reading

def test_builder_is_fast(tmp_path: Path) -> None:
    import time

    tokenizer()  # warm imports (torch, tokenizers) so the timing is the builder's own
    start = time.perf_counter()
    paths = build_arbor_fixtures(tmp_path)
    assert time.perf_counter() - start < 5
    assert set(paths) == {"A", "B", "C", "E", "ffn_grown", "layer_grown"}


def test_same_model_from_every_layout(arbor: dict[str, Path]) -> None:
    a_spec, a = read_arbor(arbor["A"], allow_pickle=True)
    b_spec, b = read_arbor(arbor["B"], allow_pickle=True)
    c_spec, c = read_arbor(arbor["C"], n_heads=4)
    assert (a_spec.layout, b_spec.layout, c_spec.layout) == ("A", "B", "C")
    for spec in (a_spec, b_spec, c_spec):
        assert isinstance(spec, ArborSpec)
        assert (spec.n_layers, spec.hidden, spec.n_heads, spec.vocab, spec.max_positions) == (2, 64, 4, 384, 128)
        assert spec.ffn_widths == (256, 256) and spec.tied and spec.ln_eps == 1e-5 and spec.activation == "gelu"
    assert sorted(a) == sorted(b) == sorted(c)
    for name in a:
        assert a[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])
    # A bare state dict can be named directly too, as safetensors or as a pickle.
    assert read_arbor(arbor["C"] / "model.safetensors", n_heads=4)[0].layout == "C"
    bin_spec, from_bin = read_arbor(arbor["B"] / "pytorch_model.bin", n_heads=4, allow_pickle=True)
    assert bin_spec.layout == "C" and all(np.array_equal(from_bin[k], a[k]) for k in a)


def test_ffn_grown_is_padded_to_the_widest_layer(arbor: dict[str, Path]) -> None:
    spec, tensors = read_arbor(arbor["ffn_grown"], allow_pickle=True)  # its config says ffn_dim 256
    assert spec.ffn_widths == (256, 288) and spec.ffn_max == 288
    raw = raw_state(arbor["ffn_grown"])
    for i in range(2):
        assert tensors[f"layers.{i}.ffn.fc1.weight"].shape == (288, 64)
        assert tensors[f"layers.{i}.ffn.fc1.bias"].shape == (288,)
        assert tensors[f"layers.{i}.ffn.fc2.weight"].shape == (64, 288)
    np.testing.assert_array_equal(tensors["layers.0.ffn.fc1.weight"][:256], raw["layers.0.ffn.fc1.weight"])
    assert not tensors["layers.0.ffn.fc1.weight"][256:].any() and not tensors["layers.0.ffn.fc1.bias"][256:].any()
    assert not tensors["layers.0.ffn.fc2.weight"][:, 256:].any()
    np.testing.assert_array_equal(tensors["layers.1.ffn.fc2.weight"], raw["layers.1.ffn.fc2.weight"])


def test_layer_grown_counts_layers_from_tensors(arbor: dict[str, Path]) -> None:
    spec, _ = read_arbor(arbor["layer_grown"])  # heads from the YAML sidecar, whose num_layers (2) is stale
    assert spec.n_layers == 4 and spec.n_heads == 4 and spec.ffn_widths == (256,) * 4


def test_bare_state_dict_needs_heads(arbor: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(KilnError) as exc:
        read_arbor(arbor["C"])
    one_line(exc, str(arbor["C"]), "n_heads")
    with pytest.raises(KilnError) as exc:
        read_arbor(arbor["C"], n_heads=5)
    one_line(exc, "does not divide the hidden size 64")
    with pytest.raises(KilnError) as exc:
        read_arbor(arbor["layer_grown"], n_heads=8)
    one_line(exc, "training_config.yaml", "'num_heads' is 4")


# ----------------------------------------------------------------------------- GPT-2 re-expression

def gpt2_model(config: dict, state: dict[str, np.ndarray]):
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    return model


@pytest.mark.parametrize("name", ["C", "ffn_grown", "layer_grown"])
def test_gpt2_reproduces_native_forward(arbor: dict[str, Path], name: str) -> None:
    import torch

    spec, tensors = read_arbor(arbor[name], n_heads=4 if name == "C" else None, allow_pickle=True)
    config, state = to_gpt2(spec, tensors)
    assert config["activation_function"] == "gelu" and config["n_inner"] == spec.ffn_max
    assert config["arbor_ffn_widths"] == list(spec.ffn_widths)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: in x out
    model = gpt2_model(config, state)
    raw = raw_state(arbor[name])  # unpadded, as Arbor wrote it
    tok = tokenizer()
    rng = np.random.default_rng(7)
    batches = [np.array([tok.encode(p).ids]) for p in PROMPTS] + [rng.integers(0, spec.vocab, (2, spec.max_positions))]
    for ids in batches:
        ref = arbor_forward(raw, ids, n_heads=4)
        assert ref.std() > 1.0  # peaked logits, so agreement means something
        with torch.no_grad():
            got = model(torch.from_numpy(ids)).logits.numpy()
        assert np.abs(got - ref).max() < TOL, (name, np.abs(got - ref).max())
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    # Incremental decoding through GPT-2's KV cache gives the same logits as the native full forward.
    ids = batches[0]
    split = ids.shape[1] // 2
    with torch.no_grad():
        first = model(torch.from_numpy(ids[:, :split]), use_cache=True)
        rest = model(torch.from_numpy(ids[:, split:]), cache=first.past_key_values, use_cache=True)
    both = np.concatenate([first.logits.numpy(), rest.logits.numpy()], axis=1)
    assert np.abs(both - arbor_forward(raw, ids, n_heads=4)).max() < TOL


def test_gpt2_config_round_trips_through_save_pretrained(arbor: dict[str, Path], tmp_path: Path) -> None:
    import torch
    import transformers
    from safetensors.numpy import save_file

    spec, tensors = read_arbor(arbor["ffn_grown"], allow_pickle=True)
    config, state = to_gpt2(spec, tensors)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = np.array([tokenizer().encode(PROMPTS[0]).ids])
    with torch.no_grad():
        got = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - arbor_forward(raw_state(arbor["ffn_grown"]), ids, n_heads=4)).max() < TOL


# ----------------------------------------------------------------------------- Llama-style layout (E)

def test_llama_style_arbor_loads_through_the_llama_path(arbor: dict[str, Path]) -> None:
    ckpt = load_checkpoint(arbor["E"])
    raw_config = json.loads((arbor["E"] / "config.json").read_text())
    assert raw_config["architectures"] == ["ArborForCausalLM"] and "rms_norm_eps" not in raw_config
    spec = ckpt.spec
    assert (spec.family, spec.hf_architecture) == ("llama", "LlamaForCausalLM")
    assert spec.rms_norm_eps == 1e-5  # from layer_norm_eps
    assert spec.rope == rope.from_config(raw_config, "config.json")
    # spec.config is the config as the Llama family reads it, so a staged copy loads in transformers.
    assert (spec.config["model_type"], spec.config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert (spec.rope.type, spec.rope.factor, spec.context_length) == ("linear", 32.0, 131072)
    assert not spec.tie_embeddings and spec.n_kv_heads == spec.n_heads == 4
    assert "lm_head.weight" in ckpt.tensors
    with pytest.raises(KilnError) as exc:
        read_arbor(arbor["E"])
    one_line(exc, "load_checkpoint")


def test_llama_style_config_without_weights_is_refused(arbor: dict[str, Path], tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(arbor["E"] / name, tmp_path / name)
    with pytest.raises(KilnError) as exc:
        load_checkpoint(tmp_path)
    one_line(exc, str(tmp_path), "no weights")


def test_native_arbor_dir_is_not_read_as_llama(arbor: dict[str, Path], tmp_path: Path) -> None:
    shutil.copy(arbor["C"] / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "arbor", "architectures": ["ArborForCausalLM"]}))
    with pytest.raises(KilnError) as exc:
        load_checkpoint(tmp_path)
    one_line(exc, "config.json", "ArborForCausalLM", "read_arbor")


# ----------------------------------------------------------------------------- bad input

def test_unrelated_model_calling_itself_arbor(tmp_path: Path) -> None:
    """A byte-level BitNet project also uses model_type "arbor" / ArborForCausalLM (arbor.md §1.1)."""
    rng = np.random.default_rng(0)
    write_bare(tmp_path, {"model.byte_embedding.weight": rng.standard_normal((256, 32)).astype(np.float32),
                          "model.local_encoder.layers.0.weight": rng.standard_normal((32, 32)).astype(np.float32)})
    config = {"model_type": "arbor", "architectures": ["ArborForCausalLM"], "patch_size": 4, "max_bytes": 1024,
              "bitnet": True, "local_hidden_size": 32, "auto_map": {"AutoModelForCausalLM": "modeling_arbor.X"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KilnError) as exc:
        load_checkpoint(tmp_path)
    one_line(exc, str(tmp_path / "config.json"), "model.byte_embedding.weight")
    with pytest.raises(KilnError) as exc:
        read_arbor(tmp_path, n_heads=4)
    one_line(exc, str(tmp_path), "not a native Arbor checkpoint", "model_type 'arbor'")


def test_inconsistent_shapes_are_refused(arbor: dict[str, Path], tmp_path: Path) -> None:
    base = raw_state(arbor["C"])
    cases = {
        "in_proj": ("layers.1.self_attn.in_proj_weight", np.zeros((3 * 64, 65), np.float32),
                    "layers.1.self_attn.in_proj_weight has shape [192, 65], expected [192, 64]"),
        "half_grown": ("layers.0.ffn.fc1.weight", np.zeros((288, 64), np.float32),  # fc1 grew, fc2 did not
                       "layers.0.ffn.fc1.bias has shape [256], expected [288]"),
        "enterprise": ("layers.0.attention.q_proj.weight", np.zeros((64, 64), np.float32), "unexpected tensor"),
        "gap": ("layers.3.norm1.weight", np.zeros(64, np.float32), "layers.2.* is missing"),
        "pe": ("pos_encoding.pe", np.zeros((1, 128, 64), np.float32), "sin/cos"),
    }
    for case, (name, value, needle) in cases.items():
        directory = write_bare(tmp_path / case, {**base, name: value})
        with pytest.raises(KilnError) as exc:
            read_arbor(directory, n_heads=4)
        one_line(exc, str(directory), needle)
    directory = write_bare(tmp_path / "no_pe", {k: v for k, v in base.items() if k != "pos_encoding.pe"})
    with pytest.raises(KilnError) as exc:
        read_arbor(directory, n_heads=4)
    one_line(exc, "pos_encoding.pe")


def test_enterprise_variant_is_refused(arbor: dict[str, Path], tmp_path: Path) -> None:
    directory = write_bare(tmp_path, {"layers.0.attention.q_proj.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(KilnError) as exc:
        read_arbor(directory, n_heads=4)
    one_line(exc, "enterprise")


def test_pickle_needs_allow_pickle(arbor: dict[str, Path]) -> None:
    with pytest.raises(KilnError) as exc:
        read_arbor(arbor["A"])
    one_line(exc, str(arbor["A"]), "allow-pickle")
    with pytest.raises(KilnError) as exc:
        read_arbor(arbor["B"])
    one_line(exc, str(arbor["B"]), "pytorch_model.bin", "allow-pickle")


def test_corrupt_pickle_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latest_checkpoint.pt"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(KilnError) as exc:
        read_arbor(path, allow_pickle=True)
    one_line(exc, str(path), "weights_only")


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_llama_style_arbor_exports_verified_with_rope_baked(arbor: dict[str, Path], tmp_path: Path,
                                                            fmt: str) -> None:
    """Layout E end to end: exported like any Llama, its linear x32 rope baked (from an original
    context of 128 to 4096) and verified against transformers at short and long positions."""
    pytest.importorskip("llama_cpp" if fmt == "gguf" else "onnxruntime_genai")
    from kiln.pipeline import export_gguf_artifact, export_onnx_artifact

    if fmt == "gguf":
        result = export_gguf_artifact(arbor["E"], tmp_path / "e.f32.gguf", "f32", rope_scaling="linear:32",
                                      original_context=128, threads=2)
    else:
        result = export_onnx_artifact(arbor["E"], tmp_path / "e-fp32", "fp32", rope_scaling="linear:32",
                                      original_context=128, threads=2)
    ver = result.record["verification"]
    assert ver["passed"], ver["criterion"]
    assert result.record["rope"] == {"type": "linear", "factor": 32.0, "original_context": 128,
                                     "context_length": 4096}
    assert ver["long_start"] > 4000
