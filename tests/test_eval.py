"""`kiln eval`: perplexity and KL as llama-perplexity reports them, on HF, GGUF and ONNX artifacts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

from kiln.errors import KilnError  # noqa: E402
from kiln.evaluate import chunks, evaluate, heldout_text, reference_tokens  # noqa: E402
from kiln.pipeline import export_gguf_artifact, export_onnx_artifact  # noqa: E402

KILN = Path(sys.executable).parent / "kiln"
CTX = 128


@pytest.fixture(scope="module")
def artifacts(tiny_qwen2_dir: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    out = {"f32": root / "tq2.f32.gguf", "q4_0": root / "tq2.q4_0.gguf", "onnx": root / "tq2-fp32"}
    export_gguf_artifact(tiny_qwen2_dir, out["f32"], "f32", verify=False)
    export_gguf_artifact(tiny_qwen2_dir, out["q4_0"], "q4_0", verify=False)
    export_onnx_artifact(tiny_qwen2_dir, out["onnx"], "fp32", verify=False)
    return out


def test_reference_perplexity_matches_transformers(tiny_qwen2_dir: Path) -> None:
    """An independent computation: transformers' own cross-entropy over the second half of each chunk."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = evaluate(tiny_qwen2_dir, [], heldout_text(), ctx=CTX)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    ids = reference_tokens(tiny_qwen2_dir, heldout_text())
    nll, n = 0.0, 0
    for part in chunks(ids, CTX):
        x = torch.tensor([part])
        labels = x.clone()
        labels[0, : CTX // 2 + 1] = -100  # predictions of tokens half+1 .. ctx-1, as llama-perplexity
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels).loss
        k = CTX - CTX // 2 - 1
        nll += float(loss) * k
        n += k
    assert rows[0].tokens == n
    assert math.isclose(rows[0].perplexity, math.exp(nll / n), rel_tol=1e-4)


def test_candidates_of_every_kind(tiny_qwen2_dir: Path, artifacts: dict[str, Path]) -> None:
    rows = evaluate(tiny_qwen2_dir, [artifacts["f32"], artifacts["onnx"], artifacts["q4_0"]], heldout_text(),
                    ctx=CTX, threads=2)
    ref, f32, onnx, q4 = rows
    assert [r.kind for r in rows] == ["hf", "gguf", "onnx", "gguf"]
    for exact in (f32, onnx):  # float32 artifacts: the reference's own distribution
        assert exact.mean_kl < 1e-6 and exact.top1 > 0.99
        assert math.isclose(exact.perplexity, ref.perplexity, rel_tol=1e-3)
    assert q4.mean_kl > 1e-3 and q4.p99_kl >= q4.mean_kl
    assert q4.file_size < f32.file_size


def test_cli_json_and_bad_input(tiny_qwen2_dir: Path, artifacts: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    res = subprocess.run([KILN, "eval", tiny_qwen2_dir, artifacts["onnx"], "--ctx", str(CTX), "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ctx"] == CTX and len(data["rows"]) == 2 and data["rows"][1]["mean_kl"] < 1e-6
    for args, message in (([tmp_path / "missing.gguf"], "no such file"), (["--ctx", "100000"], "fewer than one chunk")):
        res = subprocess.run([KILN, "eval", tiny_qwen2_dir, *args], capture_output=True, text=True, env=env,
                             timeout=300)
        assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    with pytest.raises(KilnError, match="too small"):
        evaluate(tiny_qwen2_dir, [], heldout_text(), ctx=8)
