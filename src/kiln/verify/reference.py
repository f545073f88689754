"""The reference a kiln artifact is checked against: transformers on the source checkpoint.

The reference gets exactly the rope settings baked into the artifact (staged into
its config from `kiln.checkpoint.rope`), so "faithful" means faithful to the model
the user asked for, including any context extension.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.checkpoint.hf_model import float_model
from kiln.checkpoint.rope import RopeSettings
from kiln.errors import KilnError


class Reference:
    """A float32 transformers model that returns next-token logits for token sequences."""

    def __init__(self, source: str | Path, rope: RopeSettings | None = None, dtype: str = "float32"):
        try:
            import torch
        except ImportError:
            raise KilnError("verification needs torch and transformers (pip install 'kiln-llm[torch]')") from None
        self._torch = torch
        self.model = float_model(source, rope, dtype)
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


def with_gguf_weights(ref: Reference, gguf: str | Path, n_heads: int, n_kv_heads: int) -> Reference:
    """The reference with every weight replaced by the GGUF's dequantized one.

    This isolates what quantizing the *weights* costs from how llama.cpp runs them: an
    artifact is faithful if llama.cpp's output stays close to this model's.
    """
    from kiln import families
    from kiln.gguf_header import open_gguf

    torch = ref._torch
    clone = ref.rounded_copy("float32")
    params = dict(clone.model.named_parameters())
    tied_head = "lm_head.weight" in params and params["lm_head.weight"] is params.get("model.embed_tokens.weight")
    g = open_gguf(gguf)
    family = families.by_name(str(g.get("general.architecture")))
    if family is None:
        raise KilnError(f"{gguf}: architecture {g.get('general.architecture')!r} is not one kiln writes")
    with torch.no_grad():
        for t in g.tensors:
            name = family.hf_name(t.name)
            if name is None or name not in params:
                continue
            w = family.from_gguf(name, g.dequantize(t), n_heads, n_kv_heads)
            params[name].copy_(torch.from_numpy(w.copy()))
    if tied_head is False and "lm_head.weight" in params and g.tensor("output.weight") is None:
        with torch.no_grad():
            params["lm_head.weight"].copy_(params["model.embed_tokens.weight"])
    return clone
