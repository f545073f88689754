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


class ParityReference:
    """What kiln.verify.check compares an artifact with: the source model as its own code computes it.

    A reference answers logits for a token sequence at any start position; says how far positions go
    (`max_positions`, None: as far as the artifact's rope context); can rebuild itself with weights
    rounded to a float type (None where it cannot: then float types are judged like quantized ones) and
    with an artifact's own dequantized weights; and measures what an engine's tanh GELU changes
    (`gelu_drift`, None for a source without a GELU).
    """

    max_positions: int | None = None
    weights_label: str = "its dequantized weights"

    def logits(self, tokens: Sequence[int], start: int = 0) -> np.ndarray:
        raise NotImplementedError

    def rounded(self, dtype: str) -> ParityReference | None:
        return None

    def with_artifact_weights(self, path: Path, fmt) -> ParityReference:
        raise KilnError(f"{path}: no reference with the {fmt.name} artifact's weights for this source")

    def gelu_drift(self, prompts: Sequence[Sequence[int]]) -> float | None:
        return None


class Reference(ParityReference):
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


    def rounded(self, dtype: str) -> Reference:
        return self.rounded_copy(dtype)

    def with_artifact_weights(self, path: Path, fmt) -> Reference:
        """The reference with the artifact's dequantized weights, read the way its format stores them."""
        return _ARTIFACT_WEIGHTS[fmt.name](self, path)


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
            if name is None:
                continue
            w = family.from_gguf(name, g.dequantize(t), n_heads, n_kv_heads, header=g)
            # A mixture of experts' stacked tensor goes back to its experts (per-expert or fused parameters).
            for target, index, part in family.hf_targets(name, w, params):
                dest = params[target] if index is None else params[target][index]
                dest.copy_(torch.from_numpy(np.array(part)))
    if tied_head is False and "lm_head.weight" in params and g.tensor("output.weight") is None:
        with torch.no_grad():
            params["lm_head.weight"].copy_(params["model.embed_tokens.weight"])
    return clone


def _gguf_weights(ref: Reference, gguf: Path) -> Reference:
    cfg = ref.model.config
    return with_gguf_weights(ref, gguf, n_heads=cfg.num_attention_heads,
                             n_kv_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))


def _onnx_weights(ref: Reference, onnx_dir: Path) -> Reference:
    from kiln.verify.onnx_weights import with_onnx_weights

    return with_onnx_weights(ref, onnx_dir)


# Format name -> how a transformers reference takes that format's dequantized weights (the one table
# verification keeps per format: reading weights back needs torch, which kiln.formats never imports).
_ARTIFACT_WEIGHTS = {"gguf": _gguf_weights, "onnx": _onnx_weights}


GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh")  # HF activation names of the GELU family


def ggml_gelu(x):
    """GELU as llama.cpp's CPU backend computes it (ggml_vec_gelu_f32 with GGML_GELU_FP16): the tanh form,
    read from a table of f16 values indexed by the f16 rounding of x, so both the input and the output
    are rounded to f16; x itself at or above 10, 0 at or below -10. Measured on tiny-gpt2 (whose GELU
    is already the tanh form): llama.cpp differs from transformers by 1.7e-3 of the logits' std, all of
    it this table (kiln.verify.check allows a multiple of the drift to this function)."""
    import torch

    y = torch.nn.functional.gelu(x.to(torch.float16).to(x.dtype), approximate="tanh").to(torch.float16).to(x.dtype)
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


class Gpt2Reference(Reference):
    """A GPT-2 shaped checkpoint (kiln.checkpoint.gpt2.Gpt2Checkpoint: HF GPT-2, nanoGPT) as transformers'
    own GPT2LMHeadModel, built from kiln's GPT-2 form of it (nanoGPT has no transformers class, and both
    layouts must be checked against the same model the GGUF and ONNX writers read).

    `activation` replaces the checkpoint's: "gelu_new" (tanh) is what llama.cpp's gpt2 graph computes.
    """

    def __init__(self, model, activation: str | None = None, state: dict[str, np.ndarray] | None = None):
        try:
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError:
            raise KilnError("verification needs torch and transformers (pip install 'kiln-llm[torch]')") from None
        self._torch = torch
        self._cache = {}
        self.source_model = model
        config = {k: v for k, v in model.config.items() if k not in ("architectures", "model_type")}
        if activation is not None:
            config["activation_function"] = activation
        self.activation = config.get("activation_function", "gelu_new")
        self.max_positions = int(model.config["n_positions"])
        net = GPT2LMHeadModel(GPT2Config(**config, attn_implementation="eager"))
        weights = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                   for k, v in (model.state if state is None else state).items()}
        missing, unexpected = net.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and net.config.tie_word_embeddings)]
        if missing or unexpected:
            raise KilnError(f"{model.source}: GPT-2 weights do not match (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        net.tie_weights()
        net.eval()
        self.model = net

    def gelu_drift(self, prompts: Sequence[Sequence[int]]) -> float | None:
        """max|Δ|/std between this model and the same model with llama.cpp's GELU (`ggml_gelu`)."""
        if self.activation not in GELUS:
            return None
        from kiln.verify.parity import compare_many

        torch = self._torch

        class GgmlGelu(torch.nn.Module):
            def forward(self, x):
                return ggml_gelu(x)

        engine_like = Gpt2Reference(self.source_model)
        for block in engine_like.model.transformer.h:
            block.mlp.act = GgmlGelu()
        return compare_many([(self.logits(ids), engine_like.logits(ids)) for ids in prompts]).rel

    def with_artifact_weights(self, path: Path, fmt) -> Gpt2Reference:
        """The model with the GGUF's dequantized weights (kiln's GPT-2 graph is fp32 only), with the GELU
        the engine computes."""
        from kiln.export.gguf_gpt2 import hf_state_from_gguf

        ref = Gpt2Reference(self.source_model, "gelu_new" if fmt.approximate_gelu else None,
                            hf_state_from_gguf(path, self.source_model))
        ref.weights_label = "its dequantized weights with tanh GELU" if self.activation == "gelu" else \
            "its dequantized weights"
        return ref
