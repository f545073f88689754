"""Every GPT-2 layout (HF GPT2LMHeadModel, nanoGPT ckpt.pt, native Arbor) read into one HF-form model,
checked against independent references: transformers' own loader, nanoGPT's forward written out here,
llama.cpp's converter (tensors bit for bit), and the native-Arbor GGUF pins (byte for byte)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kiln.checkpoint.arbor import is_native_arbor, read_arbor_gpt2  # noqa: E402
from kiln.checkpoint.gpt2 import (  # noqa: E402
    LAYER_SHAPES,
    Gpt2Checkpoint,
    is_nanogpt,
    read_hf_gpt2,
    read_nanogpt,
    tokenizer_dir_for,
    tokenizer_size,
)
from kiln.compress.llama_quant import quant_type  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.export.gguf import write_gguf_atomic  # noqa: E402
from kiln.export.gguf_gpt2 import hf_state_from_gguf, write_gpt2_gguf  # noqa: E402
from kiln.fixtures import LLAMA_CPP_PRE, build  # noqa: E402
from kiln.fixtures.arbor import build_arbor_fixtures  # noqa: E402
from kiln.fixtures.gpt2 import write_nanogpt  # noqa: E402
from kiln.gguf_header import open_gguf  # noqa: E402

PROMPT = "The bakery on Orchard Lane opens at six in the morning, but the work starts long before that."
PINS = Path(__file__).with_name("artifact_pins.json")


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    return build("tiny-gpt2", progress=False)


@pytest.fixture(scope="module")
def nanogpt_dir() -> Path:
    return build("tiny-nanogpt", progress=False)


@pytest.fixture(scope="module")
def arbor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_arbor_fixtures(tmp_path_factory.mktemp("arbor"))


def _one_line(exc: pytest.ExceptionInfo[KilnError]) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def _hf_model(model: Gpt2Checkpoint):
    """transformers' GPT2LMHeadModel built from the common form's config and state alone."""
    config = transformers.GPT2Config(**{k: v for k, v in model.config.items() if not k.startswith("arbor")})
    hf = transformers.GPT2LMHeadModel(config).eval()
    result = hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state.items()}, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == (["lm_head.weight"] if model.tied else [])
    return hf


def _logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def _ids(directory: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).encode(PROMPT).ids


def _write_f32(model: Gpt2Checkpoint, out: Path) -> Path:
    write_gguf_atomic(out, quant_type("f32"), lambda dest, q, ftype: write_gpt2_gguf(model, dest, q, ftype))
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- HF GPT2LMHeadModel


def test_read_hf_gpt2_shapes_and_config(gpt2_dir: Path) -> None:
    m = read_hf_gpt2(gpt2_dir)
    assert (m.n_layers, m.hidden, m.n_heads, m.vocab, m.context, m.ffn) == (2, 64, 4, 512, 256, 256)
    assert m.tied and "lm_head.weight" not in m.state
    assert m.config["n_inner"] == 256 and m.config["n_ctx"] == 256  # None in config.json: 4 x n_embd
    assert m.config["activation_function"] == "gelu_new" and m.ln_eps == 1e-5
    assert (m.architecture, m.layout, m.name) == ("GPT2LMHeadModel", "hf", "tiny-gpt2")
    assert m.tokenizer_dir == gpt2_dir and len(m.tokenizer.tokens) == 512
    assert m.tokenizer.eos_id == m.config["eos_token_id"] == 511
    expected = {"transformer.wte.weight": (512, 64), "transformer.wpe.weight": (256, 64),
                "transformer.ln_f.weight": (64,), "transformer.ln_f.bias": (64,)}
    for i in range(2):
        expected |= {f"transformer.h.{i}.{s}": shape(64, 256) for s, shape in LAYER_SHAPES.items()}
    assert {k: v.shape for k, v in m.state.items()} == expected
    assert all(v.dtype == np.float32 for v in m.state.values())


def test_hf_state_gives_transformers_logits_exactly(gpt2_dir: Path) -> None:
    m = read_hf_gpt2(gpt2_dir)
    ids = _ids(gpt2_dir)
    ours = _logits(_hf_model(m), ids)
    theirs = _logits(transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir, dtype=torch.float32).eval(), ids)
    assert ours.std() > 1.5  # peaked logits: parity means something (fixtures/gpt2.py GPT2_INIT)
    assert torch.equal(ours, theirs)


def test_hub_layout_bare_names_and_mask_buffers(gpt2_dir: Path, tmp_path: Path) -> None:
    """openai-community/gpt2's model.safetensors: bare `h.0.*`/`wte.weight` names plus the old
    `attn.bias` mask buffers; read to the same state as save_pretrained's layout."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "hub"
    shutil.copytree(gpt2_dir, src, ignore=shutil.ignore_patterns(".kiln-*"))
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(gpt2_dir / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((256, 256), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    a, b = read_hf_gpt2(gpt2_dir), read_hf_gpt2(src)
    assert a.state.keys() == b.state.keys()
    assert all(np.array_equal(a.state[k], b.state[k]) for k in a.state)
    del tensors["h.1.ln_2.bias"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KilnError) as exc:
        read_hf_gpt2(src)
    assert "tensor h.1.ln_2.bias is missing" in _one_line(exc)  # named as the file names it


def test_sharded_and_pickled_weights(gpt2_dir: Path, tmp_path: Path) -> None:
    """Two safetensors shards with an index, and pytorch_model.bin (only with allow_pickle): same state."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(gpt2_dir / "model.safetensors")
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    shutil.copytree(gpt2_dir, sharded, ignore=shutil.ignore_patterns(".kiln-*", "model.safetensors"))
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, str(sharded / file), metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}))
    pickled = tmp_path / "pickled"
    shutil.copytree(gpt2_dir, pickled, ignore=shutil.ignore_patterns(".kiln-*", "model.safetensors"))
    torch.save({n: torch.from_numpy(v) for n, v in tensors.items()}, pickled / "pytorch_model.bin")
    with pytest.raises(KilnError) as exc:
        read_hf_gpt2(pickled)
    assert "--allow-pickle" in _one_line(exc)
    base = read_hf_gpt2(gpt2_dir)
    for m in (read_hf_gpt2(sharded), read_hf_gpt2(pickled, allow_pickle=True)):
        assert m.state.keys() == base.state.keys()
        assert all(np.array_equal(m.state[k], base.state[k]) for k in base.state)


def _hf_copy(gpt2_dir: Path, dest: Path, config: dict[str, Any] | None = None,
             edit: Any = None) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(gpt2_dir, dest, ignore=shutil.ignore_patterns(".kiln-*"))
    if config:
        cfg = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    if edit:
        tensors = load_file(dest / "model.safetensors")
        edit(tensors)
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize(("config", "edit", "message"), [
    (None, lambda t: t.pop("transformer.h.1.mlp.c_proj.bias"), "tensor transformer.h.1.mlp.c_proj.bias is missing"),
    (None, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": np.zeros((192, 64), np.float32)}),
     "tensor transformer.h.0.attn.c_attn.weight has shape [192, 64], expected [64, 192]"),
    (None, lambda t: t.update({"transformer.h.0.attn.q_attn.weight": np.zeros((64, 64), np.float32)}),
     "unexpected tensor transformer.h.0.attn.q_attn.weight (not part of GPT2LMHeadModel)"),
    (None, lambda t: t.update({"transformer.h.2.ln_1.weight": np.zeros((64,), np.float32)}),
     "unexpected tensor transformer.h.2.ln_1.weight (config.json's n_layer is 2)"),
    ({"scale_attn_by_inverse_layer_idx": True}, None, "scale_attn_by_inverse_layer_idx is true"),
    ({"architectures": ["GPT2Model"]}, None, "not ['GPT2LMHeadModel']"),
    ({"tie_word_embeddings": False}, None, "tensor lm_head.weight is missing"),
    ({"n_inner": 128}, None, "mlp.c_fc.weight has shape [64, 256], expected [64, 128]"),
])
def test_hf_bad_input_is_one_line(gpt2_dir: Path, tmp_path: Path, config, edit, message: str) -> None:
    src = _hf_copy(gpt2_dir, tmp_path / "bad", config, edit)
    with pytest.raises(KilnError) as exc:
        read_hf_gpt2(src)
    assert message in _one_line(exc)


def test_hf_untied_head_is_kept(gpt2_dir: Path, tmp_path: Path) -> None:
    head = np.random.default_rng(0).standard_normal((512, 64)).astype(np.float32)
    src = _hf_copy(gpt2_dir, tmp_path / "untied", {"tie_word_embeddings": False},
                   lambda t: t.update({"lm_head.weight": head}))
    m = read_hf_gpt2(src)
    assert not m.tied and m.config["tie_word_embeddings"] is False
    assert np.array_equal(m.state["lm_head.weight"], head)
    ids = _ids(src)
    assert torch.equal(_logits(_hf_model(m), ids),
                       _logits(transformers.GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32).eval(), ids))


# ---------------------------------------------------------------- nanoGPT


def nanogpt_forward(sd: dict[str, Any], args: dict[str, Any], ids: list[int]) -> torch.Tensor:
    """nanoGPT's model.py GPT.forward (all positions) on its raw state dict, in float64 torch."""
    import torch.nn.functional as F

    sd = {k.removeprefix("_orig_mod."): v.double() for k, v in sd.items()}
    d, nh, t = args["n_embd"], args["n_head"], len(ids)

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:  # LayerNorm(ndim, bias): F.layer_norm, eps 1e-5
        return F.layer_norm(x, (d,), sd[f"{name}.weight"], sd.get(f"{name}.bias"), 1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:  # nn.Linear(..., bias=config.bias)
        return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    x = sd["transformer.wte.weight"][torch.tensor(ids)] + sd["transformer.wpe.weight"][:t]
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}."
        q, k, v = linear(ln(x, p + "ln_1"), p + "attn.c_attn").split(d, dim=-1)
        q, k, v = (a.view(t, nh, d // nh).transpose(0, 1) for a in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + linear(y.transpose(0, 1).reshape(t, d), p + "attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["lm_head.weight"].T


def _raw(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_nanogpt_needs_allow_pickle(nanogpt_dir: Path) -> None:
    with pytest.raises(KilnError) as exc:
        read_nanogpt(nanogpt_dir / "ckpt.pt")
    assert "--allow-pickle" in _one_line(exc)


@pytest.mark.parametrize("variant", ["fixture", "no-bias", "no-prefix"])
def test_nanogpt_matches_its_own_forward(nanogpt_dir: Path, tmp_path: Path, variant: str) -> None:
    if variant == "fixture":
        path = nanogpt_dir / "ckpt.pt"
    else:
        path = write_nanogpt(tmp_path / variant, bias=variant != "no-bias", compiled=variant != "no-prefix", seed=3)
    raw = _raw(path)
    assert any(k.startswith("_orig_mod.") for k in raw["model"]) == (variant != "no-prefix")
    m = read_nanogpt(path, allow_pickle=True)
    assert m.layout == ("nanogpt" if variant == "no-prefix" else "nanogpt-compiled")
    assert (m.architecture, m.activation, m.ln_eps, m.ffn) == ("nanogpt", "gelu", 1e-5, 256)
    assert not any(k.startswith("_orig_mod.") or k.endswith(".attn.bias") for k in m.state)
    assert m.tied and m.state["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Linear -> Conv1D
    biases = [v for k, v in m.state.items() if k.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1 and all(b.any() for b in biases) == (variant != "no-bias")
    ids = _ids(path.parent)
    ours = _logits(_hf_model(m), ids)
    reference = nanogpt_forward(raw["model"], raw["model_args"], ids)
    assert reference.std() > 1.5
    assert torch.allclose(ours.double(), reference, rtol=0, atol=1e-5), float((ours.double() - reference).abs().max())


def test_nanogpt_vocab_padded_past_the_tokenizer(nanogpt_dir: Path, tmp_path: Path) -> None:
    """nanoGPT pads GPT-2's 50257 to 50304; the fixture 300 to 320. Rows past the tokenizer become
    [PAD{id}] tokens of type UNUSED, as llama.cpp's converter writes them, and the GGUF keeps every row."""
    m = read_nanogpt(nanogpt_dir, allow_pickle=True)  # the out_dir works as well as ckpt.pt
    assert tokenizer_size(nanogpt_dir) == 300 and m.vocab == 320 and m.state["transformer.wte.weight"].shape[0] == 320
    tok = m.tokenizer
    assert len(tok.tokens) == 320
    assert tok.tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)] and set(tok.token_types[300:]) == {5}
    assert tok.tokens[299] == "<|endoftext|>" and tok.eos_id == 299
    g = open_gguf(_write_f32(m, tmp_path / "nano.f32.gguf"))
    assert g.get("gpt2.vocab_size") == 320 and g.array_len("tokenizer.ggml.tokens") == 320
    assert g.tensor("token_embd.weight").np_shape == (320, 64)
    assert g.get("gpt2.context_length") == 128 and g.get("gpt2.feed_forward_length") == 256
    assert m.record["nanogpt"]["model_args"]["vocab_size"] == 320 and m.name == "tiny-nanogpt"


def test_nanogpt_tokenizer_must_be_found(tmp_path: Path, nanogpt_dir: Path) -> None:
    path = write_nanogpt(tmp_path / "run")
    (path.parent / "tokenizer.json").unlink()
    with pytest.raises(KilnError) as exc:
        read_nanogpt(path, allow_pickle=True)
    assert "pass --tokenizer DIR" in _one_line(exc)
    assert read_nanogpt(path, tokenizer=nanogpt_dir, allow_pickle=True).tokenizer_dir == nanogpt_dir
    assert tokenizer_dir_for(path, nanogpt_dir) == nanogpt_dir
    (path.parent / "tokenizer").mkdir()
    shutil.copy(nanogpt_dir / "tokenizer.json", path.parent / "tokenizer" / "tokenizer.json")
    assert tokenizer_dir_for(path, None) == path.parent / "tokenizer"


def _edited(nanogpt_dir: Path, tmp_path: Path, edit) -> Path:
    obj = _raw(nanogpt_dir / "ckpt.pt")
    edit(obj)
    out = tmp_path / "edited" / "ckpt.pt"
    out.parent.mkdir()
    torch.save(obj, out)
    shutil.copy(nanogpt_dir / "tokenizer.json", out.parent / "tokenizer.json")
    return out


P = "_orig_mod.transformer."


@pytest.mark.parametrize(("edit", "message"), [
    (lambda o: o.pop("model_args"), "not a nanoGPT checkpoint ('model_args' is missing"),
    (lambda o: o["model_args"].pop("n_embd"), "model_args lacks 'n_embd'"),
    (lambda o: o["model"].update({P + "h.1.mlp.c_fc.weight": torch.zeros(10, 64)}),
     "tensor transformer.h.1.mlp.c_fc.weight has shape [10, 64], expected [256, 64]"),
    (lambda o: o["model"].pop(P + "h.0.attn.c_proj.bias"), "tensor transformer.h.0.attn.c_proj.bias is missing"),
    (lambda o: o["model"].pop(P + "wpe.weight"), "tensor transformer.wpe.weight is missing"),
    (lambda o: o["model"].update({P + "h.0.attn.rotary.inv_freq": torch.zeros(8)}),
     "unexpected tensor transformer.h.0.attn.rotary.inv_freq"),
    (lambda o: o["model_args"].update({"bias": False}), "unexpected tensor transformer.h.0.attn.c_attn.bias (a bias"),
    (lambda o: o["model_args"].update({"vocab_size": 300}), "tensor transformer.wte.weight has shape [320, 64]"),
])
def test_nanogpt_bad_input_is_one_line(nanogpt_dir: Path, tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(KilnError) as exc:
        read_nanogpt(_edited(nanogpt_dir, tmp_path, edit), allow_pickle=True)
    assert message in _one_line(exc)


# ---------------------------------------------------------------- detection


def test_detection_nanogpt_versus_arbor(nanogpt_dir: Path, gpt2_dir: Path, arbor: dict[str, Path],
                                        tmp_path: Path) -> None:
    assert is_nanogpt(nanogpt_dir) and is_nanogpt(nanogpt_dir / "ckpt.pt")
    assert not is_native_arbor(nanogpt_dir / "ckpt.pt") and not is_native_arbor(nanogpt_dir)
    assert is_native_arbor(arbor["A"]) and not is_nanogpt(arbor["A"])  # Arbor's trainer .pt
    assert not is_nanogpt(arbor["B"]) and not is_nanogpt(arbor["B"] / "pytorch_model.bin")
    assert not is_nanogpt(gpt2_dir) and not is_native_arbor(gpt2_dir)
    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 (non-zip) format is recognised as well
    torch.save(_raw(nanogpt_dir / "ckpt.pt"), legacy, _use_new_zipfile_serialization=False)
    assert is_nanogpt(legacy) and not is_native_arbor(legacy)
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert not is_nanogpt(tmp_path / "junk.pt")


class _Touch:
    """A pickle that, if ever unpickled, creates `path` (as a malicious checkpoint would run code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_detection_never_unpickles(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"model": _Touch(marker), "model_args": {"n_layer": 1}}, protocol=2)
    evil = tmp_path / "ckpt.pt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    assert is_nanogpt(evil) and not is_native_arbor(evil)
    with pytest.raises(KilnError) as exc:
        read_nanogpt(evil, allow_pickle=True)
    assert "refused: the pickle holds objects other than tensors" in _one_line(exc)
    assert not marker.exists()


# ---------------------------------------------------------------- Arbor through the common form


def test_arbor_common_form_and_byte_identical_gguf(arbor: dict[str, Path], tmp_path: Path) -> None:
    m = read_arbor_gpt2(arbor["B"], allow_pickle=True)
    spec, tensors = m.native
    assert (m.architecture, m.layout, m.name, m.tied) == ("arbor", "B", "B", True)
    assert m.gguf_keys == (("arbor.ffn_dims", [256, 256]), ("arbor.activation", "gelu_erf"),
                           ("arbor.source_format", "native-B"))
    assert m.record == {"arbor": {"ffn_widths": [256, 256], "max_positions": 128, "activation": "gelu"}}
    assert m.options == {"n_heads": None, "tokenizer": str(arbor["B"] / "tokenizer")}
    assert m.activation == "gelu" and m.ffn == spec.ffn_max
    new = _write_f32(m, tmp_path / "new.f32.gguf")
    assert _sha(new) == json.loads(PINS.read_text())["arbor-native.f32.gguf"]
    grown = read_arbor_gpt2(arbor["ffn_grown"], allow_pickle=True, tokenizer=arbor["B"] / "tokenizer")
    assert grown.ffn == 288 and grown.gguf_keys[0] == ("arbor.ffn_dims", [256, 288])
    assert open_gguf(_write_f32(grown, tmp_path / "g.f32.gguf")).get("gpt2.feed_forward_length") == 288


# ---------------------------------------------------------------- GGUF -> HF form


def test_hf_state_from_gguf_round_trip(gpt2_dir: Path, nanogpt_dir: Path, arbor: dict[str, Path],
                                       tmp_path: Path) -> None:
    import dataclasses

    hf = read_hf_gpt2(gpt2_dir)
    # fewer model rows than tokens: the GGUF pads the embedding with zero rows, reading back trims them
    short = dataclasses.replace(hf, config={**hf.config, "vocab_size": 500},
                                state={**hf.state, "transformer.wte.weight": hf.state["transformer.wte.weight"][:500]})
    head = short.state["transformer.wte.weight"] * 2
    untied = dataclasses.replace(short, state={**short.state, "lm_head.weight": head})
    models = {"hf": hf, "short": short, "untied": untied,
              "nanogpt": read_nanogpt(nanogpt_dir, allow_pickle=True),
              "arbor": read_arbor_gpt2(arbor["ffn_grown"], allow_pickle=True, tokenizer=arbor["B"] / "tokenizer")}
    for name, m in models.items():
        path = _write_f32(m, tmp_path / f"{name}.f32.gguf")
        if name in ("short", "untied"):
            g = open_gguf(path)
            assert g.tensor("token_embd.weight").np_shape == (512, 64)
            assert (g.tensor("output.weight") is not None) == (name == "untied")
        back = hf_state_from_gguf(path, m)
        assert back.keys() == m.state.keys(), name
        for k, v in m.state.items():
            assert back[k].dtype == np.float32 and np.array_equal(back[k], v), (name, k)


# ---------------------------------------------------------------- llama.cpp's converter


# What kiln's gpt2 GGUF deliberately writes differently from convert_hf_to_gguf.py, and why.
KILN_ONLY = {
    "gpt2.attention.head_count_kv": "llama.cpp defaults it to head_count; kiln writes it for every family",
    "gpt2.vocab_size": "the converter writes vocab_size for llama only; kiln for every family (= the token count)",
    "tokenizer.ggml.eot_token_id": ("llama.cpp finds <|endoftext|> as end-of-turn by its text at load time; kiln "
                                    "writes the id for its Modelfile writer"),
}
CONVERTER_ONLY = {
    "general.size_label": ("cosmetic (nothing in llama.cpp reads it); the gpt2 writer omits it so native-Arbor "
                           "GGUFs stay byte-identical to their pins (tests/artifact_pins.json)"),
}
VALUES = {
    "general.name": "kiln names the model as the checkpoint does; the converter title-cases the directory name",
}


def _fields(path: Path) -> dict[str, Any]:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def converted(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports it: pip install -e '.[dev]'")
    from kiln.fixtures.llama_converter import convert_many

    root = tmp_path_factory.mktemp("gpt2-convert")
    conv = root / "tiny-gpt2.llama.gguf"
    convert_many([(gpt2_dir, conv, LLAMA_CPP_PRE["tiny-gpt2"])], "f32")
    return _write_f32(read_hf_gpt2(gpt2_dir), root / "tiny-gpt2.kiln.gguf"), conv


@pytest.mark.slow
def test_tensors_equal_llama_cpp_converter(converted: tuple[Path, Path]) -> None:
    import gguf

    kiln = {t.name: t for t in gguf.GGUFReader(converted[0]).tensors}
    conv = {t.name: t for t in gguf.GGUFReader(converted[1]).tensors}
    assert sorted(kiln) == sorted(conv)
    for name, t in kiln.items():
        c = conv[name]
        assert (t.tensor_type, list(t.shape)) == (c.tensor_type, list(c.shape)), name
        assert np.array_equal(t.data, c.data), name


@pytest.mark.slow
def test_keys_equal_llama_cpp_converter(converted: tuple[Path, Path]) -> None:
    kiln, conv = _fields(converted[0]), _fields(converted[1])
    assert kiln["general.architecture"] == conv["general.architecture"] == "gpt2"
    assert set(kiln) - set(conv) == set(KILN_ONLY), sorted(set(kiln) - set(conv))
    assert set(conv) - set(kiln) == set(CONVERTER_ONLY), sorted(set(conv) - set(kiln))
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.layer_norm_epsilon"):
        assert kiln[f"gpt2.{key}"] == conv[f"gpt2.{key}"], key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert kiln[key] == conv[key], key
    differ = {k for k in set(kiln) & set(conv) if kiln[k] != conv[k]}
    shown = {k: (str(kiln[k])[:60], str(conv[k])[:60]) for k in differ - set(VALUES)}
    assert differ <= set(VALUES), f"values differ (kiln, converter): {shown}"


def test_gpt2_pre_tokenizer_name_is_llama_cpps(gpt2_dir: Path) -> None:
    """GPT-2's ByteLevel pre-tokenizer is "gpt-2" to llama.cpp, which refuses to load a file saying "gpt2"."""
    assert read_hf_gpt2(gpt2_dir).tokenizer.pre == LLAMA_CPP_PRE["tiny-gpt2"] == "gpt-2"
