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
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        if rope is not None:
            theta = _rope_theta(config)
            config.rope_parameters = rope.hf_rope_parameters(theta)
            config.max_position_embeddings = max(int(rope.context_length or 0), config.max_position_embeddings)
        self.model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=getattr(torch, dtype), trust_remote_code=False, attn_implementation="eager")
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


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))
