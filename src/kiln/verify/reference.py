"""The reference a kiln artifact is checked against: transformers on the source checkpoint.

The reference gets exactly the rope settings baked into the artifact (staged into
its config from `kiln.checkpoint.rope`), so "faithful" means faithful to the model
the user asked for, including any context extension.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.checkpoint.rope import RopeSettings
from kiln.errors import KilnError


class Reference:
    """A float32 transformers model that returns next-token logits for token sequences."""

    def __init__(self, source: str | Path, rope: RopeSettings | None = None, dtype: str = "float32"):
        try:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise KilnError("verification needs torch and transformers (pip install 'kiln-llm[torch]')") from None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self._torch = torch
        config = _hf_config(source, AutoConfig)
        if rope is not None:
            theta = _rope_theta(config)
            config.rope_parameters = rope.hf_rope_parameters(theta)
            config.max_position_embeddings = max(int(rope.context_length or 0), config.max_position_embeddings)
        if getattr(config, "quantization_config", None):
            self.model = _dequantized_model(source, config, getattr(torch, dtype))
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                source, config=config, dtype=getattr(torch, dtype), trust_remote_code=False,
                attn_implementation="eager")
        self.model.eval()
        self._cache: dict[tuple[tuple[int, ...], int], np.ndarray] = {}

    def logits(self, tokens: Sequence[int], start: int = 0) -> np.ndarray:
        """Logits for every position (cached: several artifacts are checked against one reference)."""
        key = (tuple(tokens), start)
        if key not in self._cache:
            self._cache[key] = self._forward(tokens, start)
        return self._cache[key]

    def _forward(self, tokens: Sequence[int], start: int) -> np.ndarray:
        torch = self._torch
        ids = torch.tensor([list(tokens)])
        pos = torch.arange(start, start + len(tokens)).unsqueeze(0)
        with torch.no_grad():
            out = self.model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        return out.float().numpy()

    def rounded_copy(self, dtype: str) -> Reference:
        """The same model with weights rounded to `dtype` and back: the floor a `dtype` export cannot beat."""
        torch = self._torch
        clone = object.__new__(Reference)
        clone._torch = torch
        clone._cache = {}
        import copy

        clone.model = copy.deepcopy(self.model)
        with torch.no_grad():
            for p in clone.model.parameters():
                if p.ndim >= 2:
                    p.copy_(p.to(getattr(torch, dtype)).float())
        return clone


def _dequantized_model(source: str | Path, config, dtype):
    """A quantized (GPTQ) checkpoint as a float transformers model: kiln's reader dequantizes
    every linear, so no GPTQ kernel package (optimum, gptqmodel) is needed to run it."""
    import torch
    from transformers import AutoModelForCausalLM

    from kiln.checkpoint import load_checkpoint

    ckpt = load_checkpoint(source)
    if ckpt.gptq is None:
        raise KilnError(f"{source}: quantization_config names a method kiln cannot read")
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    state = {name: torch.from_numpy(ckpt.tensors.load(name)).to(dtype) for name in ckpt.tensors.names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise KilnError(f"{source}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def with_gguf_weights(ref: Reference, gguf: str | Path, permuted_qk: bool, n_heads: int,
                      n_kv_heads: int) -> Reference:
    """The reference with every weight replaced by the GGUF's dequantized one.

    This isolates what quantizing the *weights* costs from how llama.cpp runs them: an
    artifact is faithful if llama.cpp's output stays close to this model's.
    """
    from kiln.export.gguf_arch import hf_name, unpermute_rows
    from kiln.gguf_header import open_gguf

    torch = ref._torch
    clone = ref.rounded_copy("float32")
    params = dict(clone.model.named_parameters())
    tied_head = "lm_head.weight" in params and params["lm_head.weight"] is params.get("model.embed_tokens.weight")
    g = open_gguf(gguf)
    with torch.no_grad():
        for t in g.tensors:
            name = hf_name(t.name)
            if name is None or name not in params:
                continue
            w = g.dequantize(t)
            if permuted_qk and (".q_proj." in name or ".k_proj." in name):
                w = unpermute_rows(w, n_heads if ".q_proj." in name else n_kv_heads)
            params[name].copy_(torch.from_numpy(w.copy()))
    if tied_head is False and "lm_head.weight" in params and g.tensor("output.weight") is None:
        with torch.no_grad():
            params["lm_head.weight"].copy_(params["model.embed_tokens.weight"])
    return clone


def _hf_config(source: str | Path, auto_config):
    """The source's transformers config, as kiln reads it: a checkpoint recognised by its tensor
    names (kiln.checkpoint.families.BY_TENSORS, e.g. Arbor's Llama-style layout) gets the
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


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))
