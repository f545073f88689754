"""Export options beyond the quant type: rope scaling declared in config.json (yarn, llama3),
and an importance matrix passed through to llama.cpp's quantizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

pytest.importorskip("llama_cpp")

from kiln.compress.imatrix_file import read_imatrix, write_legacy_imatrix  # noqa: E402
from kiln.pipeline import export_gguf_artifact  # noqa: E402


def _with_rope(src: Path, dst: Path, block: dict) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_parameters"] = {"rope_theta": theta, **block}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _field(path: Path, key: str):
    f = GGUFReader(path).fields.get(key)
    return None if f is None else f.contents()


def test_yarn_declared_in_config_is_baked_and_faithful(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    # Qwen's documented way to enable long context: a yarn block in config.json.
    src = _with_rope(tiny_qwen2_dir, tmp_path / "src",
                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512})
    out = tmp_path / "m.gguf"
    result = export_gguf_artifact(src, out, "f32", threads=2)
    assert result.record["verification"]["passed"], result.record["verification"]["criterion"]
    assert _field(out, "qwen2.rope.scaling.type") == "yarn"
    assert _field(out, "qwen2.rope.scaling.factor") == pytest.approx(4.0)
    assert _field(out, "qwen2.rope.scaling.original_context_length") == 512
    assert _field(out, "qwen2.context_length") == 2048
    assert result.record["verification"]["long_start"] > 512


def test_llama3_rope_writes_rope_freqs_and_is_faithful(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = _with_rope(tiny_llama_dir, tmp_path / "src",
                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})
    out = tmp_path / "m.gguf"
    result = export_gguf_artifact(src, out, "f32", threads=2)
    ver = result.record["verification"]
    assert ver["passed"], ver["criterion"]
    names = [t.name for t in GGUFReader(out).tensors]
    assert "rope_freqs.weight" in names
    # llama3 scaling is carried by the tensor alone, as convert_hf_to_gguf writes it
    assert _field(out, "llama.rope.scaling.type") is None


def test_imatrix_is_passed_to_llama_quantizer(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """A legacy-format imatrix round-trips and changes llama.cpp's k-quant choices."""
    plain = tmp_path / "plain.gguf"
    export_gguf_artifact(tiny_qwen2_dir, plain, "q4_k_m", verify=False, threads=2)
    f32 = tmp_path / "f32.gguf"
    export_gguf_artifact(tiny_qwen2_dir, f32, "f32", verify=False, threads=2)
    rng = np.random.default_rng(0)
    values = {}
    for t in GGUFReader(f32).tensors:
        if len(t.shape) == 2 and t.name != "token_embd.weight":
            # strongly non-uniform importance so the quantizer's choices must change
            values[t.name] = (rng.random(int(t.shape[0])) ** 8 * 100).astype(np.float32)
    imx = write_legacy_imatrix(tmp_path / "imatrix.dat", values, ncall=10, dataset="synthetic")
    back = read_imatrix(imx)
    assert set(back) == set(values)
    for name, vals in values.items():
        np.testing.assert_allclose(back[name], vals, rtol=1e-6)
    with_imx = tmp_path / "imx.gguf"
    result = export_gguf_artifact(tiny_qwen2_dir, with_imx, "q4_k_m", imatrix=imx, verify=False, threads=2)
    assert result.record["options"]["imatrix"] == str(imx)
    assert plain.read_bytes() != with_imx.read_bytes()
    assert {t.name for t in GGUFReader(plain).tensors} == {t.name for t in GGUFReader(with_imx).tensors}
