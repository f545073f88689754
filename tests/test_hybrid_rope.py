"""RoPE overrides on a hybrid (Qwen3.5): they reach the full-attention layers only, and the manifest says so.

tiny-qwen3_5 (3 Gated DeltaNet layers, 1 gated attention layer, native window 512) baked with
`--rope-scaling yarn:4`: the GGUF advertises 2048, llama.cpp's logits match transformers' with the same
YaRN settings at short positions and at the end of the 2048 window (the export's own verification), and the
manifest's rope record says which layers the settings apply to and that the linear-attention layers, which
carry no positions, have no position limit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from kiln.fixtures import build  # noqa: E402
from kiln.gguf_header import read_header  # noqa: E402
from kiln.pipeline import export_gguf_artifact  # noqa: E402


def test_yarn_on_a_hybrid_is_verified_and_scoped(tmp_path: Path) -> None:
    out = tmp_path / "q35-yarn4.gguf"
    result = export_gguf_artifact(build("tiny-qwen3_5", progress=False), out, "f32", rope_scaling="yarn:4")
    verification = result.record["verification"]
    assert verification["passed"], verification["criterion"]
    assert verification["long_start"] + verification["long_positions"]["positions"] > 2000  # the window's end
    header = read_header(out, ("qwen35.context_length", "qwen35.rope.scaling.type"))
    assert header["qwen35.context_length"] == 2048 and header["qwen35.rope.scaling.type"] == "yarn"
    rope = json.loads(out.with_name(out.name + ".manifest.json").read_text())["rope"]
    assert (rope["type"], rope["factor"], rope["context_length"]) == ("yarn", 4.0, 2048)
    assert (rope["rotary_layers"], rope["unpositioned_layers"]) == (1, 3)
    assert "no position limit" in rope["note"]


def test_dense_manifests_carry_no_scope(tiny_qwen2_f32_gguf: Path) -> None:
    rope = json.loads(tiny_qwen2_f32_gguf.with_name(tiny_qwen2_f32_gguf.name + ".manifest.json").read_text())["rope"]
    assert "unpositioned_layers" not in rope and "note" not in rope
