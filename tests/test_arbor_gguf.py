"""Native Arbor -> GGUF (llama.cpp gpt2): every layout and both growths, verified against Arbor's
own forward, with the tanh-vs-erf GELU drift measured and reported apart from the artifact's error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from kiln.fixtures.arbor import build_arbor_fixtures  # noqa: E402
from kiln.pipeline import export_gguf_artifact  # noqa: E402
from kiln.runtime.generate import generate  # noqa: E402
from kiln.runtime.llamacpp import LlamaCppEngine  # noqa: E402

KILN = Path(sys.executable).parent / "kiln"


@pytest.fixture(scope="module")
def arbor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_arbor_fixtures(tmp_path_factory.mktemp("arbor-gguf"))


@pytest.mark.parametrize("name", ["A", "B", "C", "ffn_grown", "layer_grown"])
def test_f32_matches_native_forward(arbor: dict[str, Path], tmp_path: Path, name: str) -> None:
    tok = arbor["B"] / "tokenizer"
    result = export_gguf_artifact(arbor[name], tmp_path / "a.f32.gguf", "f32", allow_pickle=True, tokenizer=tok,
                                  n_heads=4 if name == "C" else None, threads=2)
    ver = result.record["verification"]
    assert ver["passed"], ver["criterion"]
    assert any(n.startswith("gelu_drift") for n in ver["notes"])
    assert ver["long_start"] > 64  # positions near the end of the 128-row sinusoid table
    with LlamaCppEngine(result.gguf, n_ctx=128) as engine:
        assert engine.meta("general.architecture") == "gpt2"
        assert json.loads(json.dumps(engine.meta("arbor.activation"))) == "gelu_erf"
        assert engine.context_length == 128


def test_quantized_with_modelfile(arbor: dict[str, Path], tmp_path: Path) -> None:
    result = export_gguf_artifact(arbor["B"], tmp_path / "b.q8_0.gguf", "q8_0", allow_pickle=True, modelfile=True,
                                  threads=2)
    ver = result.record["verification"]
    assert ver["passed"], ver["criterion"]
    assert result.modelfile is not None and "FROM ./b.q8_0.gguf" in result.modelfile.read_text()
    with LlamaCppEngine(result.gguf, n_ctx=128) as engine:
        out = generate(engine, engine.tokenize("The quick brown"), max_tokens=8)
    assert out.prompt_tokens > 0


def _kiln(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def test_bad_arbor_input_is_one_line(arbor: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (("export", "gguf", arbor["A"], "-o", tmp_path / "x.gguf", "--tokenizer", arbor["B"] / "tokenizer"),
         "--allow-pickle"),
        (("export", "gguf", arbor["B"], "-o", tmp_path / "x.gguf", "--allow-pickle", "--rope-scaling", "linear:2"),
         "no RoPE"),
        (("export", "gguf", arbor["A"], "-o", tmp_path / "x.gguf", "--allow-pickle"), "--tokenizer"),
    ]
    for args, message in cases:
        res = _kiln(*args)
        assert res.returncode == 1, (args, res.stderr)
        assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not list(tmp_path.iterdir())


def test_gelu_drift_on_briefly_trained_weights(arbor: dict[str, Path], tmp_path: Path) -> None:
    """Random weights barely exercise GELU's curvature; a few dozen training steps on real text give
    activations of a trained model's spread. The GGUF must still pass, and the drift is reported."""
    import shutil

    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from kiln.checkpoint.arbor import EMBED, GPT2_LAYER, POS, read_arbor, to_gpt2
    from kiln.fixtures.tiny import corpus_text

    spec, tensors = read_arbor(arbor["B"], allow_pickle=True)
    config, state = to_gpt2(spec, tensors)
    model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in config.items() if not k.startswith("arbor")}))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=False)
    model.tie_weights()
    model.transformer.wpe.weight.requires_grad_(False)  # the sinusoid stays a sinusoid, as in Arbor
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(arbor["B"] / "tokenizer" / "tokenizer.json"))
    ids = torch.tensor(tok.encode(corpus_text()).ids)
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (8,))
        batch = torch.stack([ids[s:s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0  # it really learned something
    trained = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    native = {EMBED: trained["transformer.wte.weight"], POS: tensors[POS],
              "final_norm.weight": trained["transformer.ln_f.weight"], "final_norm.bias": trained["transformer.ln_f.bias"]}
    for i in range(spec.n_layers):
        for gpt2, name, transpose in GPT2_LAYER:
            w = trained[f"transformer.h.{i}.{gpt2}"]
            native[f"layers.{i}.{name}"] = np.ascontiguousarray(w.T if transpose else w)
    src = tmp_path / "trained"
    src.mkdir()
    save_file(native, str(src / "model.safetensors"))
    shutil.copy(arbor["B"] / "tokenizer" / "tokenizer.json", src / "tokenizer.json")
    result = export_gguf_artifact(src, tmp_path / "t.f32.gguf", "f32", n_heads=spec.n_heads, threads=2)
    ver = result.record["verification"]
    assert ver["passed"], ver["criterion"]
    print(f"trained: {ver['criterion']}; {ver['notes'][0]}")
