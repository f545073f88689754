"""Reading an onnxruntime-genai graph's weights back as Hugging Face tensors (kiln.verify.onnx_weights).

fp32 graphs must give back the source checkpoint bit for bit. For int4 graphs the decisive check
is onnxruntime itself: with accuracy_level 0 (no int8 activations) onnxruntime computes with exactly
the dequantized weights, so the reference carrying them must reproduce its logits to float rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")
pytest.importorskip("torch")

from safetensors.numpy import load_file  # noqa: E402

from kiln.checkpoint import load_checkpoint  # noqa: E402
from kiln.checkpoint.rope import resolve  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.export.onnx import OnnxOptions, export_onnx  # noqa: E402
from kiln.runtime.onnx_engine import OnnxEngine  # noqa: E402
from kiln.verify.onnx_weights import onnx_weights, with_onnx_weights  # noqa: E402
from kiln.verify.parity import compare  # noqa: E402
from kiln.verify.reference import Reference  # noqa: E402
from kiln.verify.result import parity_text  # noqa: E402

TOKENS = 128


def _export(source: Path, out: Path, options: OnnxOptions) -> Path:
    ckpt = load_checkpoint(source)
    out.mkdir(parents=True)
    export_onnx(ckpt, out, options, resolve(ckpt.spec.rope, None))
    return out


def _source(source: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(f))
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def _logits(onnx_dir: Path, ref: Reference) -> tuple[float, float, float]:
    """mean KL of onnxruntime against the plain reference, and against the one carrying the graph's weights,
    plus the latter's max |Δlogit| / std."""
    engine = OnnxEngine(onnx_dir, n_ctx=512, threads=2)
    tokens = engine.tokenize(parity_text())[:TOKENS]
    ort_logits = engine.score(tokens)
    engine.close()
    own = compare(with_onnx_weights(ref, onnx_dir).logits(tokens), ort_logits)
    return compare(ref.logits(tokens), ort_logits).mean_kl, own.mean_kl, own.rel


@pytest.fixture(scope="module")
def fp32(tiny_qwen2_dir, tiny_qwen3_dir, tmp_path_factory):
    """name -> (source dir, its fp32 export), each exported once."""
    sources = {"tiny-qwen2": tiny_qwen2_dir, "tiny-qwen3": tiny_qwen3_dir}
    made: dict[str, Path] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            made[name] = _export(sources[name], tmp_path_factory.mktemp(name) / "fp32", OnnxOptions(precision="fp32"))
        return sources[name], made[name]
    return get


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-qwen3"])
def test_fp32_weights_are_the_source(name, fp32) -> None:
    source, out = fp32(name)
    got, want = onnx_weights(out), _source(source)
    want.setdefault("lm_head.weight", want["model.embed_tokens.weight"])  # tied: the graph still has an LM head
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key].shape == w.shape, key
        assert np.array_equal(got[key], w), key
    # the copy carrying them is the reference itself, and tied weights stay tied
    ref = Reference(source)
    copy = with_onnx_weights(ref, out)
    tokens = list(range(3, 40))
    assert np.array_equal(copy.logits(tokens), ref.logits(tokens))
    assert (copy.model.lm_head.weight is copy.model.model.embed_tokens.weight) == (
        ref.model.lm_head.weight is ref.model.model.embed_tokens.weight)


@pytest.mark.parametrize("symmetric, block, accuracy", [(False, 32, 0), (True, 64, 4)])
def test_int4_weights_are_what_onnxruntime_computes_with(symmetric, block, accuracy, tiny_llama_dir,
                                                          tmp_path: Path) -> None:
    out = _export(tiny_llama_dir, tmp_path / "int4", OnnxOptions(precision="int4", block_size=block,
                                                                 symmetric=symmetric, accuracy_level=accuracy))
    got, want = onnx_weights(out), _source(tiny_llama_dir)
    assert set(got) == set(want)
    for key, w in want.items():
        err = float(np.sqrt(((got[key] - w) ** 2).mean()) / w.std()) if w.std() > 0 else 0.0
        if key == "lm_head.weight":
            assert 0.001 < err < 0.01, (key, err)  # the LM head is int8 by default
        elif key.endswith("proj.weight"):
            assert 0.02 < err < 0.15, (key, err)  # int4 rounding: a few percent of the weights' spread
        else:
            assert np.array_equal(got[key], w), key  # norms and (float) embeddings are not quantized
    plain_kl, own_kl, own_rel = _logits(out, Reference(tiny_llama_dir))
    assert own_kl < plain_kl / 20, (plain_kl, own_kl)
    if accuracy == 0:  # onnxruntime multiplies by exactly these weights: only float rounding is left
        assert own_kl < 1e-7 and own_rel < 1e-3, (own_kl, own_rel)


def test_graph_it_does_not_understand(fp32, tmp_path: Path) -> None:
    import onnx

    with pytest.raises(KilnError, match="genai_config.json"):
        onnx_weights(tmp_path)
    odd = tmp_path / "odd"
    shutil.copytree(fp32("tiny-qwen2")[1], odd)
    model = onnx.load(str(odd / "model.onnx"), load_external_data=True)
    next(n for n in model.graph.node if n.name == "/lm_head/MatMul").name = "/lm_head/Projection"
    onnx.save(model, str(odd / "model.onnx"))
    with pytest.raises(KilnError, match="/lm_head/Projection .*cannot name"):
        onnx_weights(odd)
