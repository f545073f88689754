"""The engines' prompt caches: reused prompt KV gives the logits a fresh prefill gives.

A tiny float32 Qwen2 (transformers-written random weights) as a GGUF with an f32 KV cache and as an
fp32 ONNX directory: a cached prefix plus a decoded tail must match a fresh prefill of the whole
prompt to float32 round-off (2e-4 on logits of std ~1: what batch-shape changes alone move), and
so must the continuation steps on top of it; llama.cpp's eviction must keep the cell pool for the
caller's `reserve`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from kiln.runtime.llamacpp import LlamaCppEngine  # noqa: E402
from kiln.runtime.smc import smc  # noqa: E402
from kiln.runtime.potentials.base import Vocab  # noqa: E402
from kiln.runtime.potentials.grammar import Regex  # noqa: E402


@pytest.fixture(scope="module")
def gguf(tiny_qwen2_f32_gguf: Path) -> Path:
    return tiny_qwen2_f32_gguf


@pytest.fixture(scope="module")
def onnx_dir(tiny_qwen2_dir: Path, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from kiln.pipeline import export_onnx_artifact

    out = tmp_path_factory.mktemp("pcache-onnx") / "tq2-fp32"
    export_onnx_artifact(tiny_qwen2_dir, out, "fp32", verify=False)
    return out


def test_onnx_cache_hits_match_a_fresh_prefill(onnx_dir: Path) -> None:
    from kiln.runtime.onnx_engine import OnnxEngine

    def run(e, prompt, tail, cached):
        e.reset()
        out = [e.prefill_prompt(prompt, seq=1) if cached else e.prefill(prompt, seq=1)]
        return out + [e.step([t], [1])[0] for t in tail]

    with OnnxEngine(onnx_dir, n_ctx=256, n_seq_max=2, threads=2) as e, \
            OnnxEngine(onnx_dir, n_ctx=256, n_seq_max=2, threads=2, prompt_cache=0) as fresh:
        system = e.tokenize("You are a helpful assistant. Answer briefly.")
        a = system + e.tokenize(" What is two plus two?", add_special=False)
        b = system + e.tokenize(" Name a colour.", add_special=False)
        tail = e.tokenize(" four five six", add_special=False)
        for prompt in (a, a, b, a, system):  # miss, exact hit, shared prefix, hit again, proper prefix
            for g, w in zip(run(e, prompt, tail, True), run(fresh, prompt, tail, False)):
                np.testing.assert_allclose(g, w, rtol=0, atol=2e-4)
        assert tuple(a) in e.cached_prompts() and tuple(b) in e.cached_prompts()
        assert fresh.cached_prompts() == []
        e.clear_prompt_cache()
        assert e.cached_prompts() == []


def _engine(gguf: Path, **kw) -> LlamaCppEngine:
    return LlamaCppEngine(gguf, n_ctx=kw.pop("n_ctx", 256), n_seq_max=4, threads=2, flash_attn=False,
                          type_k=0, type_v=0, **kw)


def _fresh(gguf: Path, prompt: list[int], tail: list[int]) -> list[np.ndarray]:
    with _engine(gguf, prompt_cache=0) as e:
        out = [e.prefill(prompt, seq=0)]
        out += [e.step([t], [0])[0] for t in tail]
    return out


def _cached(e: LlamaCppEngine, prompt: list[int], tail: list[int]) -> list[np.ndarray]:
    e.reset()
    out = [e.prefill_prompt(prompt, seq=0)]
    out += [e.step([t], [0])[0] for t in tail]
    return out


def test_cache_hits_match_a_fresh_prefill(gguf: Path) -> None:
    with _engine(gguf) as e:
        system = e.tokenize("You are a helpful assistant. Answer briefly.")
        a = system + e.tokenize(" What is two plus two?", add_special=False)
        b = system + e.tokenize(" Name a colour.", add_special=False)
        tail = e.tokenize(" four five six", add_special=False)
        for prompt in (a, a, b, a, system):  # miss, exact hit, shared prefix, hit again, proper prefix
            got = _cached(e, prompt, tail)
            want = _fresh(gguf, prompt, tail)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=0, atol=2e-4)
        assert set(e.cached_prompts()) >= {tuple(a), tuple(b)}
        assert e.positions() == {0: len(system) + len(tail)}


def test_cache_keeps_cells_free_for_the_caller(gguf: Path) -> None:
    with _engine(gguf, n_ctx=256) as e:
        prompts = [e.tokenize(f"prompt number {i} " * 10) for i in range(4)]
        for p in prompts:
            e.reset()
            e.prefill_prompt(p, seq=0)
        held = sum(len(p) for p in e.cached_prompts())
        assert held > 0
        e.reset()
        need = 256 - len(prompts[0]) - 8
        e.prefill_prompt(prompts[0], seq=0, reserve=need)  # evicts the others to keep `need` cells free
        others = [p for p in e.cached_prompts() if p != tuple(prompts[0])]
        assert sum(len(p) for p in others) + len(prompts[0]) + need <= 256
        e.reset()
        e.clear_prompt_cache()
        assert e.cached_prompts() == []


def test_smc_reuses_the_prompt_with_identical_results(gguf: Path) -> None:
    with _engine(gguf, n_ctx=512) as e:
        vocab = Vocab.from_engine(e)
        prompt = e.tokenize("Pick a letter:")
        runs = [smc(e, prompt, 4, proposal=Regex(vocab, r" ?[abc]{1,3}"), max_tokens=4, seed=3) for _ in range(2)]
        assert e.cached_prompts() == [tuple(prompt)]
    with _engine(gguf, n_ctx=512, prompt_cache=0) as e:
        vocab = Vocab.from_engine(e)
        ref = smc(e, prompt, 4, proposal=Regex(vocab, r" ?[abc]{1,3}"), max_tokens=4, seed=3)
    for r in runs:  # the cached logits are the ones a first prefill produced
        assert [p.tokens for p in r.particles] == [p.tokens for p in ref.particles]
        np.testing.assert_allclose([p.log_weight for p in r.particles], [p.log_weight for p in ref.particles],
                                   atol=1e-6)
