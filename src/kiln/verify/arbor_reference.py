"""Arbor's native forward (reference/arbor.md §2.2), written from the spec, in float64.

Why here: parity checks of every Arbor re-expression (HF GPT-2, GGUF gpt2, ONNX) need one
independent implementation of the source model, and Arbor's own module cannot serve: it runs an
unsaved random router that may truncate inputs and it has no KV cache. This one takes the native
tensors as found (unpadded per-layer FFN widths included) and does not import Arbor's code.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from kiln.verify.parity import compare_many
from kiln.verify.reference import ParityReference

_ACT = {"gelu": "gelu", "relu": "relu", "swish": "silu"}


def arbor_forward(
    tensors: dict[str, np.ndarray], ids: np.ndarray, n_heads: int, eps: float = 1e-5, activation: str = "gelu",
    start: int = 0,
) -> np.ndarray:
    """Logits [batch, seq, vocab] (float64) of native Arbor tensors on token ids [batch, seq], causal, eval mode."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in tensors.items()}
    # gelu_tanh: llama.cpp's gpt2 GELU, to measure what that approximation alone changes.
    from kiln.verify.reference import ggml_gelu

    act = {"gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "gelu_ggml": ggml_gelu,
           "relu": F.relu, "silu": F.silu}[_ACT.get(activation, activation)]
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    _, seq = ids_t.shape
    emb = t["token_embedding.embedding.weight"]
    d = emb.shape[1]
    hd = d // n_heads
    x = emb[ids_t] + t["pos_encoding.pe"][0, start:start + seq]  # start: the first token's absolute position
    n_layers = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"layers\.(\d+)\.", k)))
    mask = torch.triu(torch.full((seq, seq), float("-inf"), dtype=torch.float64), diagonal=1)

    def ln(v: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(v, (d,), t[f"{name}.weight"], t[f"{name}.bias"], eps)

    for i in range(n_layers):
        p = f"layers.{i}."
        h = ln(x, p + "norm1")
        qkv = h @ t[p + "self_attn.in_proj_weight"].T + t[p + "self_attn.in_proj_bias"]
        q, k, v = (z.unflatten(-1, (n_heads, hd)).transpose(1, 2) for z in qkv.split(d, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + mask
        a = (scores.softmax(-1) @ v).transpose(1, 2).flatten(-2)
        x = x + a @ t[p + "self_attn.out_proj.weight"].T + t[p + "self_attn.out_proj.bias"]
        h = ln(x, p + "norm2")
        h = act(h @ t[p + "ffn.fc1.weight"].T + t[p + "ffn.fc1.bias"])
        x = x + h @ t[p + "ffn.fc2.weight"].T + t[p + "ffn.fc2.bias"]
    x = ln(x, "final_norm")
    head = t.get("lm_head.weight", emb)
    return (x @ head.T).numpy()


class ArborReference(ParityReference):
    """Native Arbor as its own forward computes it (float64, exact-erf GELU), for kiln.verify.check.

    `model` is the checkpoint in kiln's GPT-2 form (kiln.checkpoint.gpt2.Gpt2Checkpoint) whose `native`
    holds Arbor's spec and native tensors. `activation` replaces Arbor's own: "gelu_ggml" is what
    llama.cpp's gpt2 graph computes (kiln.verify.reference.ggml_gelu: the tanh form through an f16 table),
    to measure that apart from the artifact's error. Measured on the tiny random fixture: drift to it
    2.03e-3, artifact 2.05e-3 (the table accounts for all of the engine's error; the tanh form alone
    drifts 8.5e-4); "gelu_tanh" (the tanh form in full precision) is what the dequantized-weights floor
    of a quantized GGUF runs with.
    """

    weights_label = "its dequantized weights with tanh GELU"

    def __init__(self, model, activation: str | None = None, tensors: dict[str, np.ndarray] | None = None):
        self.model = model
        self.spec, native = model.native
        self.tensors = native if tensors is None else tensors
        self.activation = activation or self.spec.activation
        self.max_positions = self.spec.max_positions
        self._cache: dict[tuple[tuple[int, ...], int], np.ndarray] = {}

    def logits(self, tokens, start: int = 0) -> np.ndarray:
        key = (tuple(tokens), start)
        if key not in self._cache:
            out = arbor_forward(self.tensors, np.asarray([list(tokens)]), self.spec.n_heads, self.spec.ln_eps,
                                self.activation, start)[0]
            self._cache[key] = out.astype(np.float32)[:, :self.spec.vocab]
        return self._cache[key]

    def gelu_drift(self, prompts) -> float | None:
        if self.activation != "gelu":
            return None
        engine_like = ArborReference(self.model, "gelu_ggml", self.tensors)
        return compare_many([(self.logits(ids), engine_like.logits(ids)) for ids in prompts]).rel

    def with_artifact_weights(self, path: Path, fmt) -> ArborReference:
        """Arbor's forward on the GGUF's dequantized tensors, with the GELU the engine computes."""
        from kiln.export.gguf_gpt2 import hf_state_from_gguf

        native = native_from_gpt2(hf_state_from_gguf(path, self.model), self.spec.n_layers)
        return ArborReference(self.model, "gelu_tanh" if fmt.approximate_gelu else None, native)


def native_from_gpt2(state: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """Inverse of kiln.checkpoint.arbor.to_gpt2: HF GPT-2 names and Conv1D layout back to Arbor's own."""
    from kiln.checkpoint.arbor import EMBED, GPT2_LAYER, LM_HEAD, POS

    out = {EMBED: state["transformer.wte.weight"], POS: state["transformer.wpe.weight"][None],
           "final_norm.weight": state["transformer.ln_f.weight"], "final_norm.bias": state["transformer.ln_f.bias"]}
    if "lm_head.weight" in state:
        out[LM_HEAD] = state["lm_head.weight"]
    for i in range(n_layers):
        for gpt2, native, transpose in GPT2_LAYER:
            value = state[f"transformer.h.{i}.{gpt2}"]
            out[f"layers.{i}.{native}"] = np.ascontiguousarray(value.T) if transpose else value
    return out
