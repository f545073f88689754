"""A checkpoint as a float transformers model, as kiln reads it.

GPTQ and the imatrix (compress) and the verification reference (verify) all load the source model
this way; it lives here, below all three, so no layer reaches up into another for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.checkpoint.rope import RopeSettings
from kiln.errors import KilnError


def transformers_config(source: str | Path, auto_config: Any) -> Any:
    """The source's transformers config, as kiln reads it: a checkpoint recognised by its tensor
    names (a family's `by_tensors` in kiln.families, e.g. Arbor's Llama-style layout) gets the
    family's model_type and key names, which transformers itself would not know."""
    import json
    import tempfile

    from kiln.checkpoint import load_checkpoint

    try:
        return auto_config.from_pretrained(source, trust_remote_code=False)
    except (ValueError, KeyError):  # a model_type transformers does not know
        spec = load_checkpoint(source).spec
    with tempfile.TemporaryDirectory(prefix="kiln-config-") as tmp:
        config = {**spec.config, "architectures": [spec.hf_architecture]}
        Path(tmp, "config.json").write_text(json.dumps(config), encoding="utf-8")
        return auto_config.from_pretrained(tmp, trust_remote_code=False)


def float_model(source: str | Path, rope: RopeSettings | None = None, dtype: str = "float32",
                attn_implementation: str = "eager") -> Any:
    """The source as a transformers model in `dtype`, with `rope` (the settings baked into an artifact)
    applied; a GPTQ checkpoint is dequantized by kiln's reader (no GPTQ kernel package needed)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise KilnError("this needs torch and transformers (pip install 'kiln-llm[torch]')") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = transformers_config(source, AutoConfig)
    if rope is not None:
        # A multimodal wrapper's (Qwen3_5ForConditionalGeneration) rope lives in its text config.
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        theta = _rope_theta(text)
        # Keep what the scaling does not decide (Qwen3.5's partial_rotary_factor and MRoPE sections).
        kept = {k: v for k, v in (getattr(text, "rope_parameters", None) or {}).items()
                if k in ("partial_rotary_factor", "mrope_section", "mrope_interleaved")}
        text.rope_parameters = {**kept, **rope.hf_rope_parameters(theta)}
        text.max_position_embeddings = max(int(rope.context_length or 0), text.max_position_embeddings)
    if getattr(config, "quantization_config", None):
        model = _dequantized_model(source, config, getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=getattr(torch, dtype),
                                                     trust_remote_code=False,
                                                     attn_implementation=attn_implementation)
    model.eval()
    return model


def _dequantized_model(source: str | Path, config, dtype):
    """A quantized (GPTQ) checkpoint as a float transformers model: kiln's reader dequantizes
    every linear, so no GPTQ kernel package (optimum, gptqmodel) is needed to run it.

    A tensor the model holds under its own name is loaded as it is; a mixture of experts' per-expert tensors
    (what GPTQModel writes) go where the family's `hf_targets` puts them: transformers 5 holds the experts
    fused (`mlp.experts.gate_up_proj` / `down_proj`), as verification's GGUF weights do."""
    import torch
    from transformers import AutoModelForCausalLM

    from kiln import families
    from kiln.checkpoint import load_checkpoint

    ckpt = load_checkpoint(source)
    if ckpt.gptq is None:
        raise KilnError(f"{source}: quantization_config names a method kiln cannot read")
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    params = dict(model.named_parameters())
    keys = set(model.state_dict())
    names = ckpt.tensors.names()
    state = {name: torch.from_numpy(ckpt.tensors.load(name)).to(dtype) for name in names if name in keys}
    routed: list[tuple[str, object, np.ndarray]] = []
    left = set(names) - set(state)
    if left:
        spec = ckpt.spec
        family = families.of(spec)
        for hf, _, shape, row in family.tensors(spec):
            if not row.experts:
                continue
            per = {family.checkpoint_name(hf.format(e=e), spec) for e in range(shape[0])}
            if not per <= left:
                continue
            left -= per
            routed += family.hf_targets(hf, family.load_tensor(ckpt.tensors, hf, spec), keys)
    missing, _ = model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for target, index, part in routed:
            dest = params[target] if index is None else params[target][index]
            dest.copy_(torch.from_numpy(np.ascontiguousarray(part)))
    filled = {target for target, _, _ in routed}
    missing = [m for m in missing if m not in filled and not (m == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = sorted(left)
    if missing or unexpected:
        raise KilnError(f"{source}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))
