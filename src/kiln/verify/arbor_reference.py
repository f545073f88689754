"""Arbor's native forward (reference/arbor.md §2.2), written from the spec, in float64.

Why here: parity checks of every Arbor re-expression (HF GPT-2, GGUF gpt2, ONNX) need one
independent implementation of the source model, and Arbor's own module cannot serve: it runs an
unsaved random router that may truncate inputs and it has no KV cache. This one takes the native
tensors as found (unpadded per-layer FFN widths included) and does not import Arbor's code.
"""

from __future__ import annotations

import math
import re

import numpy as np

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
    act = {"gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu,
           "silu": F.silu}[_ACT.get(activation, activation)]
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
