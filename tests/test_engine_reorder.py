"""`Engine.reorder` on both engines: resampling gives each row exactly its ancestor's continuation.

The llama.cpp engine uses the generic version (copies through spare sequence ids), the onnxruntime
engine its batch-axis gather; both must agree with running the ancestors' sequences afresh.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from kiln.errors import KilnError  # noqa: E402
from kiln.runtime.llamacpp import LlamaCppEngine  # noqa: E402


@pytest.fixture(scope="module")
def gguf(tiny_qwen2_f32_gguf: Path) -> Path:
    return tiny_qwen2_f32_gguf


def _run(engine, prompts: list[list[int]], ancestors: list[int] | None, tail: list[list[int]]) -> list[np.ndarray]:
    engine.reset()
    for row, ids in enumerate(prompts):
        engine.prefill(ids, seq=row)
    if ancestors is not None:
        engine.reorder(ancestors)
    return [engine.step(t, list(range(len(t)))) for t in tail]


def test_generic_reorder_on_llamacpp(gguf: Path) -> None:
    with LlamaCppEngine(gguf, n_ctx=256, n_seq_max=8, threads=2, flash_attn=False, type_k=0, type_v=0) as engine:
        prompts = [engine.tokenize(t) for t in ("one", "two two", "three three three", "four")]
        ancestors = [2, 0, 2, 1]  # row 0 and 2 are sources that are also overwritten: needs spares
        tail = [[5, 6, 7, 8], [9, 10, 11, 12]]
        got = _run(engine, prompts, ancestors, tail)
        assert engine.positions() == {r: len(prompts[a]) + 2 for r, a in enumerate(ancestors)}
        want = _run(engine, [prompts[a] for a in ancestors], None, tail)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_reorder_without_spare_ids_is_a_clear_error(gguf: Path) -> None:
    with LlamaCppEngine(gguf, n_ctx=64, n_seq_max=2, threads=2) as engine:
        engine.prefill(engine.tokenize("a"), seq=0)
        engine.prefill(engine.tokenize("b"), seq=1)
        with pytest.raises(KilnError, match="spare sequence ids"):
            engine.reorder([1, 0])
        engine.reorder([0, 0])  # no source is overwritten: no spare needed
        assert engine.positions() == {0: 1, 1: 1}
