"""Verify a GGUF against its source checkpoint: logits at short and long positions.

This is the one place that imports both an exporter's output format and an engine
(DESIGN.md §1). The result goes into the artifact's manifest.
"""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.rope import RopeSettings
from kiln.compress.llama_quant import QuantType, quant_type
from kiln.runtime.llamacpp import LlamaCppEngine
from kiln.verify import tolerances
from kiln.verify.parity import compare, compare_many
from kiln.verify.reference import Reference, with_gguf_weights
from kiln.verify.result import SHORT_PROMPTS, Verification, parity_text

def verify_gguf(gguf: str | Path, source: str | Path, rope: RopeSettings, quant: QuantType | str,
                threads: int | None = None, reference: Reference | None = None,
                max_text_tokens: int = 384) -> Verification:
    """Compare llama.cpp on `gguf` with transformers on `source` (same rope settings)."""
    quant = quant_type(quant) if isinstance(quant, str) else quant
    ref = reference or Reference(source, rope)
    text = parity_text()
    # Flash attention off and an f32 KV cache: both would round activations to f16 and hide
    # what the artifact itself contributes (see kiln.verify.tolerances).
    engine = LlamaCppEngine(gguf, n_ctx=max(512, max_text_tokens + 8), threads=threads,
                            flash_attn=False, type_k=0, type_v=0)
    try:
        prompts = [engine.tokenize(p) for p in SHORT_PROMPTS]
        text_ids = engine.tokenize(text)[:max_text_tokens]
        context = int(rope.context_length or engine.context_length)
        longest = max(len(p) for p in prompts)
        long_start = max(0, context - longest - 1)
        short_pairs, long_pairs = [], []
        floor_pairs = []
        floor_model = None
        if quant.float_dtype in ("float16", "bfloat16"):
            floor_model = ref.rounded_copy(quant.float_dtype)
        for ids in prompts:
            r0 = ref.logits(ids)
            short_pairs.append((r0, engine.score(ids)))
            r1 = ref.logits(ids, start=long_start)
            long_pairs.append((r1, engine.score(ids, start=long_start)))
            if floor_model is not None:
                floor_pairs.append((r0, floor_model.logits(ids)))
        text_ref = ref.logits(text_ids)
        text_cmp = compare(text_ref, engine.score(text_ids))
        weights_kl = None
        if quant.float_dtype is None:
            cfg = ref.model.config
            deq = with_gguf_weights(ref, gguf, n_heads=cfg.num_attention_heads,
                                    n_kv_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
            weights_kl = compare(text_ref, deq.logits(text_ids)).mean_kl
    finally:
        engine.close()
    short, long = compare_many(short_pairs), compare_many(long_pairs)
    max_pos = long_start + longest
    worst = max(short.rel, long.rel)
    floor_rel = bound = None
    if quant.float_dtype == "float32":
        bound = tolerances.f32_bound(max_pos)
        passed, criterion = worst <= bound, f"max|Δ|/std {worst:.2e} <= {bound:.2e} (f32 bound)"
    elif floor_model is not None:
        floor_rel = compare_many(floor_pairs).rel
        bound = tolerances.float_bound(floor_rel, max_pos)
        passed = worst <= bound
        criterion = f"max|Δ|/std {worst:.2e} <= {bound:.2e} (4x weight-rounding floor {floor_rel:.2e})"
    else:
        # Faithful = llama.cpp runs the artifact as its own (dequantized) weights say; the
        # quality of the quantization itself is the KL against the published anchor.
        floor_rel = weights_kl
        passed, bound, criterion = tolerances.quantized_verdict(text_cmp.mean_kl, weights_kl)
    quality = None
    if quant.name in tolerances.KL_BOUNDS:
        anchor = tolerances.KL_BOUNDS[quant.name]
        quality = {"bound": anchor, "within": text_cmp.mean_kl <= anchor}
    return Verification(quant=quant.name, passed=passed, criterion=criterion, short=short, long=long, quality=quality,
                        long_start=long_start, text_kl=text_cmp.mean_kl, text_top1=text_cmp.top1,
                        text_positions=text_cmp.positions, floor_rel=floor_rel, bound=bound)
