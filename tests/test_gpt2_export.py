"""GPT-2 shaped families end to end: Hugging Face `GPT2LMHeadModel` and nanoGPT `ckpt.pt`, each one file in
kiln.families, through the same pipeline and parity check as every other family.

GGUF (llama.cpp's gpt2) verified against transformers' GPT2LMHeadModel at short positions and at the end
of the position table, ONNX through kiln's GPT-2 graph verified in onnxruntime, a Modelfile that Ollama's
loader would read, and the refusals a user meets (a pickle without --allow-pickle, RoPE flags on absolute
positions, a precision kiln's graph does not have, GPTQ on a family it does not support).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from kiln import families  # noqa: E402
from kiln.fixtures import build  # noqa: E402
from kiln.formats import open_engine  # noqa: E402
from kiln.pipeline import export_gguf_artifact, export_onnx_artifact  # noqa: E402
from kiln.runtime.generate import generate  # noqa: E402
from kiln_cli import kiln, one_line_error  # noqa: E402


@pytest.fixture(scope="module")
def hf_gpt2() -> Path:
    return build("tiny-gpt2", progress=False)


@pytest.fixture(scope="module")
def nanogpt() -> Path:
    return build("tiny-nanogpt", progress=False) / "ckpt.pt"


def test_each_layout_is_one_family(hf_gpt2: Path, nanogpt: Path) -> None:
    assert families.for_source(hf_gpt2).__name__ == "GPT2"
    assert families.for_source(nanogpt).__name__ == "NanoGPT"
    for fam in (families.for_source(hf_gpt2), families.for_source(nanogpt)):
        assert fam.layout == "gpt2" and not fam.rotary and fam.gptq_groups is None


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_hf_gpt2_gguf_verified(hf_gpt2: Path, tmp_path: Path, quant: str) -> None:
    result = export_gguf_artifact(hf_gpt2, tmp_path / f"g.{quant}.gguf", quant, modelfile=quant == "q8_0", threads=2)
    ver = result.record["verification"]
    assert ver["passed"], ver["criterion"]
    assert ver["long_start"] > 128  # the long check ends at the last row of the position table
    assert result.record["source"]["architecture"] == "GPT2LMHeadModel"
    if quant == "f16":
        assert "weight-rounding floor" in ver["criterion"]  # transformers' model can be rounded: the float bound
    with open_engine(result.gguf, n_ctx=64) as engine:
        assert engine.meta("general.architecture") == "gpt2"
        out = generate(engine, engine.tokenize("The quick brown"), max_tokens=4)
    assert out.prompt_tokens > 0
    if result.modelfile is not None:
        assert "FROM ./g.q8_0.gguf" in result.modelfile.read_text()


@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
def test_nanogpt_gguf_verified(nanogpt: Path, tmp_path: Path, quant: str) -> None:
    result = export_gguf_artifact(nanogpt, tmp_path / f"n.{quant}.gguf", quant, allow_pickle=True, threads=2)
    ver = result.record["verification"]
    assert ver["passed"], ver["criterion"]
    assert any(n.startswith("gelu_drift") for n in ver["notes"])  # nanoGPT's GELU is exact erf
    assert result.record["source"]["architecture"] == "nanogpt"
    assert result.record["options"]["tokenizer"]


@pytest.mark.parametrize("which", ["hf", "nanogpt"])
def test_onnx_fp32_verified(hf_gpt2: Path, nanogpt: Path, tmp_path: Path, which: str) -> None:
    src, kw = (hf_gpt2, {}) if which == "hf" else (nanogpt, {"allow_pickle": True})
    result = export_onnx_artifact(src, tmp_path / "onnx", "fp32", threads=2, **kw)
    ver = result.record["verification"]
    assert ver["passed"], ver["criterion"]
    assert not ver["notes"]  # onnxruntime computes the model's own GELU: no allowance
    manifest = json.loads(result.manifest.read_text())
    assert manifest["options"]["precision"] == "fp32"


def test_refusals_are_one_line(hf_gpt2: Path, nanogpt: Path, tmp_path: Path) -> None:
    one_line_error(kiln("export", "gguf", nanogpt, "-o", tmp_path / "x.gguf"), "--allow-pickle")
    one_line_error(kiln("export", "gguf", hf_gpt2, "-o", tmp_path / "x.gguf", "--rope-scaling", "linear:2"),
                   "no RoPE")
    one_line_error(kiln("export", "onnx", hf_gpt2, "-o", tmp_path / "x-onnx", "--precision", "int4"), "fp32 only")
    one_line_error(kiln("quantize", "gptq", hf_gpt2, "-o", tmp_path / "x-gptq"), "GPTQ supports")
    assert not list(tmp_path.iterdir())
