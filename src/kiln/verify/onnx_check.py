"""Verify an ONNX model directory against its source checkpoint, in onnxruntime.

Same checks and same report as the GGUF verification (kiln.verify.gguf_check), run through
kiln's own onnxruntime engine, and with the batch path exercised: the short prompts sit in
four rows of different lengths and take one batched step together, so a graph that mixes
rows, misplaces a row's position or writes its cache in the wrong slot fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.checkpoint.rope import RopeSettings
from kiln.errors import KilnError
from kiln.runtime.onnx_engine import OnnxEngine
from kiln.verify import tolerances
from kiln.verify.parity import compare, compare_many
from kiln.verify.reference import Reference
from kiln.verify.result import SHORT_PROMPTS, Verification, parity_text


def row_pairs(engine: OnnxEngine, prompts: list[list[int]],
              reference: Callable[[list[int]], np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(reference, engine) logit pairs with the prompts as rows of different lengths, prefilled one by
    one, then one batched step for all rows (each with the reference's own next token)."""
    engine.reset()
    pairs, nexts = [], []
    for row, ids in enumerate(prompts):
        want = reference(ids)
        pairs.append((want, engine.prefill(ids, seq=row, all_logits=True)))
        nexts.append(int(np.argmax(want[-1])))
    stepped = engine.step(nexts, list(range(len(prompts))))
    for row, ids in enumerate(prompts):
        pairs.append((reference(ids + [nexts[row]])[-1:], stepped[row:row + 1]))
    engine.reset()
    return pairs


def verify_onnx(onnx_dir: str | Path, source: str | Path, rope: RopeSettings, precision: str,
                threads: int | None = None, reference: Reference | None = None,
                max_text_tokens: int = 384) -> Verification:
    """Compare onnxruntime on `onnx_dir` with transformers on `source` (same rope settings)."""
    if precision == "fp16":
        raise KilnError("fp16 ONNX graphs run on CUDA only; kiln verifies ONNX graphs on the CPU")
    ref = reference or Reference(source, rope)
    text = parity_text()
    engine = OnnxEngine(onnx_dir, n_ctx=max(512, max_text_tokens + 8), n_seq_max=len(SHORT_PROMPTS),
                        threads=threads)
    try:
        prompts = [engine.tokenize(p) for p in SHORT_PROMPTS]
        text_ids = engine.tokenize(text)[:max_text_tokens]
        context = int(rope.context_length or engine.context_length)
        longest = max(len(p) for p in prompts)
        long_start = max(0, context - longest - 1)
        short_pairs = row_pairs(engine, prompts, ref.logits)
        long_pairs = [(ref.logits(ids, start=long_start), engine.score(ids, start=long_start)) for ids in prompts]
        text_ref = ref.logits(text_ids)
        text_cmp = compare(text_ref, engine.score(text_ids))
        weights_kl = None
        if precision in ("int4", "int8"):
            from kiln.verify.onnx_weights import with_onnx_weights

            weights_kl = compare(text_ref, with_onnx_weights(ref, onnx_dir).logits(text_ids)).mean_kl
    finally:
        engine.close()
    short, long = compare_many(short_pairs), compare_many(long_pairs)
    max_pos = long_start + longest
    worst = max(short.rel, long.rel)
    floor_rel = bound = None
    if precision == "fp32":
        # onnxruntime reads rope angles from tables transformers itself computed, so unlike
        # llama.cpp there is no position-dependent angle error: the flat f32 base applies.
        bound = tolerances.F32_BASE
        passed, criterion = worst <= bound, f"max|Δ|/std {worst:.2e} <= {bound:.2e} (f32 bound)"
    else:
        floor_rel = weights_kl
        passed, bound, criterion = tolerances.quantized_verdict(text_cmp.mean_kl, weights_kl)
    quality = None
    anchor = tolerances.ONNX_KL_BOUNDS.get(precision)
    if anchor is not None:
        quality = {"bound": anchor, "within": text_cmp.mean_kl <= anchor}
    return Verification(quant=precision, passed=passed, criterion=criterion, short=short, long=long,
                        quality=quality, long_start=long_start, text_kl=text_cmp.mean_kl,
                        text_top1=text_cmp.top1, text_positions=text_cmp.positions,
                        floor_rel=floor_rel, bound=bound)
