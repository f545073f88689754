"""Qwen3.5 (Gated DeltaNet hybrid) to ONNX through onnxruntime-genai's builder, and kiln's onnxruntime engine
carrying the recurrent states beside the K/V cache.

tiny-qwen3_5 (three DeltaNet layers, one gated attention layer). The builder takes Qwen3.5 only in the
published multimodal layout, which the family stages (a config rewrite over the checkpoint's own weight
files); its graph has a conv window and a recurrent matrix per DeltaNet layer as inputs/outputs
(past.L.conv / past.L.recurrent) and MRoPE position_ids [3, batch, seq]. Checked here:

* fp32 and int4 exports pass kiln's verification against transformers (short prompts as batch rows plus a
  batched step, the same prompts at the end of the context, a text); the multimodal layout gives the same
  graph, byte for byte; a precision that cannot be built on the CPU, and Qwen2-MoE, are refused in one line;
* the engine's prefill, batched steps (also of rows that are not contiguous: the others' states must not
  move), copies, `reorder` and drops give, for every row, the logits of a fresh prefill of that row's
  history, to float32 round-off. Measured: at most 1.2e-6 of the logits' spread (a prefill multiplies many
  rows at once, a step one, so sums run in other orders); the bound is 1e-5, as for the llama.cpp engine
  (tests/test_recurrent_engine.py). A copy is exact: its states equal the original's bit for bit;
* the prompt cache reuses a cached prompt only whole (a state holds the end of its tokens only), keeps a
  checkpoint where two prompts part, and its hits give a fresh prefill's logits, then and on later steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")
pytest.importorskip("torch")

from kiln.errors import KilnError  # noqa: E402
from kiln.fixtures import build  # noqa: E402
from kiln.pipeline import export_onnx_artifact  # noqa: E402
from kiln.runtime.onnx_engine import OnnxEngine  # noqa: E402

NAME = "tiny-qwen3_5"
PROMPT = list(range(5, 25))
REL = 1e-5  # of the logits' std: float32 round-off (measured at most 1.2e-6, see above)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen35-onnx")


@pytest.fixture(scope="module")
def fp32(root: Path):
    return export_onnx_artifact(build(NAME, progress=False), root / "fp32", "fp32", threads=2)


def _engine(path: Path, **kw) -> OnnxEngine:
    return OnnxEngine(path, n_ctx=kw.pop("n_ctx", 256), n_seq_max=kw.pop("n_seq_max", 8), threads=2, **kw)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=REL * float(want.std()))


def test_fp32_export_is_verified(fp32) -> None:
    v = fp32.record["verification"]
    assert v["passed"], v["criterion"]
    assert "f32 bound" in v["criterion"] and v["long_start"] > 0  # the end of the context was checked too
    import onnx

    graph = onnx.load(str(fp32.directory / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert inputs["position_ids"] == [3, "batch_size", "sequence_length"]
    assert {"past.0.conv", "past.0.recurrent", "past_key_values.3.key"} <= set(inputs)
    assert "past_key_values.0.key" not in inputs  # a DeltaNet layer keeps no K/V
    assert fp32.record["op_counts"]["LinearAttention"] == 3 and fp32.record["op_counts"]["GroupQueryAttention"] == 1
    with _engine(fp32.directory) as e:
        assert e.recurrent and e._kv_layers == [3]
        assert sorted(name for name, _, _ in e._states) == sorted(f"past.{i}.{k}" for i in range(3)
                                                                  for k in ("conv", "recurrent"))


def test_int4_export_is_verified(root: Path) -> None:
    result = export_onnx_artifact(build(NAME, progress=False), root / "int4", "int4", threads=2)
    v = result.record["verification"]
    assert v["passed"], v["criterion"]
    assert result.record["op_counts"]["MatMulNBits"] > 0


def test_multimodal_layout_builds_the_same_graph(fp32, root: Path) -> None:
    """The published layout (Qwen3_5ForConditionalGeneration, text config nested, tensors under
    model.language_model., a vision tower): the same text graph and weights, byte for byte."""
    from qwen35_layouts import multimodal

    mm = multimodal(root / "mm-src", NAME)
    result = export_onnx_artifact(mm, root / "mm", "fp32", verify=False)
    assert result.record["source"]["architecture"] == "Qwen3_5ForConditionalGeneration"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (result.directory / name).read_bytes() == (fp32.directory / name).read_bytes(), name
    # the vision tower left out is said, in the result and the manifest, as the GGUF export says it
    assert len(result.warnings) == 1 and "vision tower" in result.warnings[0] and "\n" not in result.warnings[0]
    assert result.record["warnings"] == result.warnings and fp32.record["warnings"] == []


def test_unbuildable_precisions_and_moe_are_refused_in_one_line(root: Path) -> None:
    src = build(NAME, progress=False)
    with pytest.raises(KilnError) as err:  # the builder writes no fp16 CPU graph
        export_onnx_artifact(src, root / "fp16", "fp16")
    assert "fp16" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(KilnError) as err:  # the builder has no Qwen2-MoE graph
        export_onnx_artifact(build("tiny-qwen2-moe", progress=False), root / "moe", "fp32")
    assert "no ONNX export" in str(err.value) and "\n" not in str(err.value)
    assert not (root / "fp16").exists() and not (root / "moe").exists()


def test_copies_reorder_drops_and_scattered_steps_match_fresh_prefills(fp32) -> None:
    steps = [[30, 31, 32, 33], [40, 41, 42, 43], [50, 51, 52, 53], [60, 61, 62, 63]]
    ancestors = [2, 0, 2, 1]
    with _engine(fp32.directory) as e, _engine(fp32.directory, prompt_cache=0) as f:
        def fresh(tokens: list[int]) -> np.ndarray:
            return f.score(tokens)[-1]

        e.prefill(PROMPT, seq=0)
        for d in (1, 2, 3):
            e.copy_seq(0, d)
        assert all(np.array_equal(buf[0], buf[d]) for _, _, buf in e._states for d in (1, 2, 3))
        first = e.step(steps[0], [0, 1, 2, 3])
        second = e.step(steps[1], [0, 1, 2, 3])
        for r in range(4):
            _close(first[r], fresh(PROMPT + [steps[0][r]]))
            _close(second[r], fresh(PROMPT + [steps[0][r], steps[1][r]]))
        e.reorder(ancestors)  # rows 0 and 2 are sources that are also overwritten
        history = [PROMPT + [steps[0][a], steps[1][a]] for a in ancestors]
        third = e.step(steps[2], [0, 1, 2, 3])
        history = [h + [steps[2][r]] for r, h in enumerate(history)]
        for r in range(4):
            _close(third[r], fresh(history[r]))
        e.drop_seq(3)
        e.copy_seq(1, 3)
        history[3] = list(history[1])
        fourth = e.step(steps[3], [0, 1, 2, 3])
        history = [h + [steps[3][r]] for r, h in enumerate(history)]
        for r in range(4):
            _close(fourth[r], fresh(history[r]))
        scattered = e.step([70, 71], [2, 0])  # rows 1 and 3 run a dummy token: their states must not move
        history[2].append(70)
        history[0].append(71)
        _close(scattered[0], fresh(history[2]))
        _close(scattered[1], fresh(history[0]))
        last = e.step([80, 81, 82, 83], [0, 1, 2, 3])
        for r in range(4):
            _close(last[r], fresh(history[r] + [80 + r]))
        assert e.positions() == {r: len(history[r]) + 1 for r in range(4)}
        # a row prefilled in two parts, and rows of different lengths stepping together
        e.reset()
        e.prefill(PROMPT[:7], seq=5)
        e.prefill(PROMPT[7:], seq=5)
        e.prefill(PROMPT[:12], seq=6)
        both = e.step([90, 91], [5, 6])
        _close(both[0], fresh(PROMPT + [90]))
        _close(both[1], fresh(PROMPT[:12] + [91]))


def test_prompt_cache_reuses_whole_prompts_and_checkpoints(fp32) -> None:
    system = list(range(5, 35))
    a, b, c = system + [40, 41, 42], system + [50, 51], system + [60, 61, 62, 63]
    tail = [70, 71, 72]
    with _engine(fp32.directory) as e, _engine(fp32.directory, prompt_cache=0) as f:
        ran = [0]
        run = e._run

        def counting(lo, tokens, lengths, positions):
            ran[0] += tokens.shape[1]
            return run(lo, tokens, lengths, positions)

        e._run = counting
        decoded = []
        for prompt in (a, a, b, c, a + [80, 81], system, b[:-1]):
            before = ran[0]
            e.reset()
            got = [e.prefill_prompt(prompt, seq=0)] + [e.step([t], [0])[0] for t in tail]
            decoded.append(ran[0] - before)
            f.reset()
            want = [f.prefill(prompt, seq=0)] + [f.step([t], [0])[0] for t in tail]
            for g, w in zip(got, want):
                _close(g, w)
        # miss; exact hit; b parts from a after the system prompt: run whole, with a checkpoint there;
        # c starts from the checkpoint; a + 2 extends a; the system prompt is the checkpoint; b[:-1] extends it
        assert decoded == [len(a), 0, len(b), 4, 2, 0, 1]
        assert tuple(system) in e.cached_prompts()
