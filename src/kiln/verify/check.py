"""The one parity check: an artifact in its engine against its source's reference, at short and long positions.

Every export of every family and format is verified here (DESIGN.md §1: the one place that imports
both an exporter's output and an engine). What differs is data, not code: the *format* says how its
engine computes (`kiln.formats.Format.verification_options`, `verification_rows`, `rope_angle_drift`,
`approximate_gelu`) and the *reference* (kiln.verify.reference) says what the source computes, up to
which position, and how to rebuild it with the artifact's own weights. The same sequence runs for all:

1. open the engine with the format's verification options (no setting that rounds on its own);
2. the short prompts from position 0 (on a format that runs rows, as four batch rows plus one batched
   step), the same prompts ending at the last position of the context, and the parity text;
3. the verdict by the artifact's precision (bounds and their reasons in kiln.verify.tolerances):
   float32 within the f32 bound (growing with position where the engine's rope angles drift, plus a
   GELU allowance where the engine approximates a GELU the source computes exactly); float16/bfloat16
   within a multiple of what rounding the weights alone does; quantized types within a multiple of the
   KL of the reference rebuilt with the artifact's own dequantized weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.formats import Format, require_format
from kiln.verify import tolerances
from kiln.verify.parity import compare, compare_many
from kiln.verify.reference import ParityReference
from kiln.verify.result import SHORT_PROMPTS, Verification, parity_text

FLOAT_TYPES = ("float32", "float16", "bfloat16")
# An f32 artifact run by an engine that approximates GELU stays within the f32 bound plus this multiple of
# the drift between the reference with its own GELU and with the engine's (kiln.verify.reference.ggml_gelu).
GELU_DRIFT_MULTIPLE = 3.0

Pair = tuple[np.ndarray, np.ndarray]


def _trim(ref: np.ndarray, got: np.ndarray) -> Pair:
    """Engines may carry padded vocabulary rows (llama.cpp needs one per token): compare the model's own."""
    return ref, got[..., :ref.shape[-1]]


def row_pairs(engine, prompts: list[list[int]], reference: Callable[[list[int]], np.ndarray]) -> list[Pair]:
    """(reference, engine) logit pairs with the prompts as rows of different lengths, prefilled one by
    one, then one batched step for all rows (each with the reference's own next token)."""
    engine.reset()
    pairs, nexts = [], []
    for row, ids in enumerate(prompts):
        want = reference(ids)
        pairs.append(_trim(want, engine.prefill(ids, seq=row, all_logits=True)))
        nexts.append(int(np.argmax(want[-1])))
    stepped = engine.step(nexts, list(range(len(prompts))))
    for row, ids in enumerate(prompts):
        pairs.append(_trim(reference(ids + [nexts[row]])[-1:], stepped[row:row + 1]))
    engine.reset()
    return pairs


def verify_artifact(path: str | Path, reference: ParityReference, precision: str, float_dtype: str | None,
                    *, fmt: Format | None = None, context: int | None = None, threads: int | None = None,
                    max_text_tokens: int = 384, anchors: dict[str, float] | None = None) -> Verification:
    """Compare the artifact at `path` (run in its format's engine) with `reference`.

    `precision` names the artifact's type in the report ("q4_k_m", "int4", "fp32"); `float_dtype` is
    the float type its weights are stored in (None for quantized types). `context` is the position the
    long check ends at (the baked rope context; default: the artifact's own context). `anchors` are the
    published KL figures the report compares a quantized type with (kiln.verify.tolerances).
    """
    path = Path(path)
    fmt = fmt or require_format(path)
    if float_dtype is not None and float_dtype not in FLOAT_TYPES:
        raise KilnError(f"unknown float type {float_dtype!r} for verification")
    limit = reference.max_positions
    n_ctx = max(512, max_text_tokens + 8) if limit is None else min(limit, max(512, max_text_tokens + 8))
    options = dict(fmt.verification_options)
    if fmt.verification_rows:
        options["n_seq_max"] = len(SHORT_PROMPTS)
    engine = fmt.open_engine(path, n_ctx=n_ctx, threads=threads, **options)
    try:
        context = int(context or engine.context_length)
        if limit is not None:
            context = min(context, limit)
        prompts = [engine.tokenize(p)[: context // 4] for p in SHORT_PROMPTS]
        text_ids = engine.tokenize(parity_text())[: min(max_text_tokens, context)]
        longest = max(len(p) for p in prompts)
        long_start = max(0, context - longest - 1)
        if fmt.verification_rows:
            short_pairs = row_pairs(engine, prompts, reference.logits)
        else:
            short_pairs = [_trim(reference.logits(ids), engine.score(ids)) for ids in prompts]
        long_pairs = [_trim(reference.logits(ids, start=long_start), engine.score(ids, start=long_start))
                      for ids in prompts]
        text_ref = reference.logits(text_ids)
        text_cmp = compare(*_trim(text_ref, engine.score(text_ids)))
    finally:
        engine.close()
    short, long = compare_many(short_pairs), compare_many(long_pairs)
    max_pos = long_start + longest
    worst = max(short.rel, long.rel)
    notes: list[str] = []
    drift = reference.gelu_drift(prompts) if fmt.approximate_gelu else None
    if drift is not None:
        notes.append(f"gelu_drift {drift:.2e}: the {fmt.name} engine computes GELU in the tanh form through an "
                     f"f16 table (kiln.verify.reference.ggml_gelu); the source as its config says")
    floor: float | None = None
    rounded = reference.rounded(float_dtype) if float_dtype in ("float16", "bfloat16") else None
    if float_dtype == "float32":
        bound = tolerances.f32_bound(max_pos) if fmt.rope_angle_drift else tolerances.F32_BASE
        why = "f32 bound"
        if drift is not None:
            bound += GELU_DRIFT_MULTIPLE * drift
            floor = drift
            why = f"f32 bound + {GELU_DRIFT_MULTIPLE:g}x the GELU drift {drift:.2e}"
        passed, criterion = worst <= bound, f"max|Δ|/std {worst:.2e} <= {bound:.2e} ({why})"
    elif rounded is not None:
        floor = compare_many([(reference.logits(ids), rounded.logits(ids)) for ids in prompts]).rel
        bound = tolerances.float_bound(floor, max_pos)
        passed = worst <= bound
        criterion = f"max|Δ|/std {worst:.2e} <= {bound:.2e} (4x weight-rounding floor {floor:.2e})"
    else:
        # Faithful = the engine runs the artifact as its own (dequantized) weights say; the quality of the
        # quantization itself is the KL against the published anchor.
        own = reference.with_artifact_weights(path, fmt)
        floor = compare(text_ref, own.logits(text_ids)).mean_kl
        passed, bound, criterion = tolerances.quantized_verdict(text_cmp.mean_kl, floor, own.weights_label)
    quality = None
    anchor = (anchors if anchors is not None else tolerances.KL_ANCHORS.get(fmt.name, {})).get(precision)
    if anchor is not None:
        quality = {"bound": anchor, "within": text_cmp.mean_kl <= anchor}
    return Verification(quant=precision, passed=passed, criterion=criterion, short=short, long=long,
                        quality=quality, long_start=long_start, text_kl=text_cmp.mean_kl, text_top1=text_cmp.top1,
                        text_positions=text_cmp.positions, floor_rel=floor, bound=bound, notes=notes)


def verify_gguf(gguf: str | Path, source: str | Path, rope, quant, threads: int | None = None,
                reference: ParityReference | None = None, max_text_tokens: int = 384) -> Verification:
    """A GGUF of a Hugging Face checkpoint (with the rope settings baked into it) against transformers."""
    from kiln.compress.llama_quant import quant_type
    from kiln.verify.reference import Reference

    quant = quant_type(quant) if isinstance(quant, str) else quant
    return verify_artifact(gguf, reference or Reference(source, rope), quant.name, quant.float_dtype,
                           context=rope.context_length, threads=threads, max_text_tokens=max_text_tokens)


ONNX_FLOAT = {"fp32": "float32", "fp16": "float16", "int8": None, "int4": None}


def verify_onnx(onnx_dir: str | Path, source: str | Path, rope, precision: str, threads: int | None = None,
                reference: ParityReference | None = None, max_text_tokens: int = 384) -> Verification:
    """An ONNX directory of a Hugging Face checkpoint against transformers, in onnxruntime on the CPU."""
    from kiln.verify.reference import Reference

    if precision == "fp16":
        raise KilnError("fp16 ONNX graphs run on CUDA only; kiln verifies ONNX graphs on the CPU")
    return verify_artifact(onnx_dir, reference or Reference(source, rope), precision, ONNX_FLOAT[precision],
                           context=rope.context_length, threads=threads, max_text_tokens=max_text_tokens)

