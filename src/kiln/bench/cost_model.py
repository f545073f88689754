"""kiln's cost model: the memory an artifact needs at a context, from its shapes alone.

Peak resident memory = runtime (interpreter + libraries) + weights + KV cache + compute buffers.
The weights of a GGUF type come from llama.cpp's own per-tensor type choice (llama-quant.cpp:
`llama_tensor_get_type_impl` and `tensor_type_fallback`), replayed here for the types `kiln plan`
offers, so "q4_k_m" on a model whose rows are not multiples of 256 comes out at the 6+ bits per
weight llama.cpp really writes instead of a nominal 4.5. The KV cache is the exact formula. The
compute buffers and the runtime baseline are what `kiln bench` measured on this project's fixtures
(constants below, with the measurement they come from); `kiln bench` reports the prediction next
to every measured peak so the model stays checked (issue goal: within 15%).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln import families
from kiln.bench.geometry import Geometry

MIB = 2 ** 20

# (bytes per block, elements per block) of the ggml types the plan can produce.
GGML_BLOCK = {"f32": (4, 1), "f16": (2, 1), "bf16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32), "q4_1": (20, 32),
              "q5_0": (22, 32), "q5_1": (24, 32), "q4_k": (144, 256), "q5_k": (176, 256), "q6_k": (210, 256)}
# llama.cpp's tensor_type_fallback: a 256-block type on rows that are not a multiple of 256.
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# Types llama.cpp's CPU backend repacks into an interleaved copy at load (CPU_REPACK buffer, anonymous
# memory) when the tensor is a matmul weight with rows % 8 == 0; measured: smollm2 q4_k_m logs exactly
# the bytes of its 16 Q4_K ffn_down tensors as CPU_REPACK.
REPACKED = {"q4_0", "q4_k", "iq4_nl"}
# ftype -> default type of llama_ftype_get_default_type.
FTYPE_DEFAULT = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0",
                 "q5_1": "q5_1", "q6_k": "q6_k", "q5_k_m": "q5_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k",
                 "q4_k_s": "q4_k"}
PLAN_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")

# Runtime baselines: RSS of the interpreter with numpy, kiln and the engine library imported, plus the
# library code paged in once it runs; measured by kiln.bench.probe on this machine (Python 3.11,
# llama-cpp-python 0.3.36: 41 MiB before the model + 5 MiB of file pages once decoding; onnxruntime
# 1.31.1: 46 MiB before the model, see rss_baseline_kib in bench.json).
RUNTIME_BASE = {"gguf": 46 * MIB, "onnx": 46 * MIB}


@dataclass
class Tensor:
    name: str
    category: str  # token_embd, output, attn_q/k/v/output, ffn_gate/up/down, norm, bias, pos_embd, router
    layer: int | None
    ne0: int  # row length (input features): what the block size must divide
    rows: int

    @property
    def n(self) -> int:
        return self.ne0 * self.rows


def hf_tensors(config: dict[str, Any]) -> list[Tensor]:
    """The weight tensors of a config's model in GGUF terms, as its family (kiln.families) lays them out."""
    c = config.get("text_config") or config
    family = families.for_config(c) or families.Family  # an unregistered name: the generic decoder
    tied = bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", False)))
    return [Tensor(*row) for row in family.weight_shapes(c, tied)]


def _more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(t: Tensor, ftype: str, n_layers: int, tied: bool) -> str:
    """The ggml type llama.cpp's quantizer gives tensor `t` for `ftype` (the subset of rules kiln plans with)."""
    if t.category in ("norm", "bias", "pos_embd", "router"):  # routers: llama.cpp's quantizer leaves them f32
        return "f32"
    default = FTYPE_DEFAULT[ftype]
    if default in ("f16", "bf16", "f32"):
        return default
    new = default
    if t.category == "output" or (tied and t.category == "token_embd"):
        block = GGML_BLOCK[new][1]
        new = "q8_0" if t.ne0 % block else ("q8_0" if new == "q8_0" else "q6_k")
    elif t.category == "token_embd":
        pass
    elif t.category == "attn_v" and ftype in ("q4_k_m", "q5_k_m") and _more_bits(t.layer, n_layers):
        new = "q6_k"
    elif t.category == "attn_v" and ftype == "q4_k_s" and t.layer < 4:
        new = "q5_k"
    elif t.category == "ffn_down" and ftype in ("q4_k_m", "q5_k_m") and _more_bits(t.layer, n_layers):
        new = "q6_k"
    elif t.category == "ffn_down" and ftype == "q4_k_s" and t.layer < n_layers // 8:
        new = "q5_k"
    elif t.category == "attn_qkv" and ftype in ("q4_k_m", "q5_k_m"):
        new = "q5_k" if ftype == "q4_k_m" else "q6_k"
    if t.ne0 % GGML_BLOCK[new][1]:
        new = FALLBACK.get(new, new)
        if t.ne0 % GGML_BLOCK[new][1]:
            new = "f16"
    return new


def tensor_bytes(t: Tensor, ggml_type: str) -> int:
    size, block = GGML_BLOCK[ggml_type]
    return t.n // block * size


@dataclass
class WeightPlan:
    ftype: str
    bytes: int
    repacked_bytes: int
    n_params: int
    types: dict[str, int] = field(default_factory=dict)  # ggml type -> tensor count

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(self.n_params, 1)


def gguf_weights(config: dict[str, Any], ftype: str) -> WeightPlan:
    """Bytes of the tensors llama.cpp writes for `ftype` (GGUF metadata and vocabulary not included)."""
    ts = hf_tensors(config)
    c = config.get("text_config") or config
    tied = bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))) or "n_embd" in c
    n_layers = int(c.get("num_hidden_layers") or c.get("n_layer"))
    # llama.cpp's n_layer_all: the blocks in the file, a multi-token prediction block after the decoder's included
    n_layers = max(n_layers, 1 + max((t.layer for t in ts if t.layer is not None), default=-1))
    # llama-quant.cpp counts attn_v and a hybrid's fused attn_qkv together ("attention-v-like", its i_attention_wv
    # over n_attention_wv, in file order: by layer) and gives both the attn_v rule
    v_like = [t for t in ts if t.category in ("attn_v", "attn_qkv")]
    total = repacked = 0
    types: dict[str, int] = {}
    for t in ts:
        if t.category in ("attn_v", "attn_qkv"):
            ty = tensor_type(Tensor(t.name, "attn_v", v_like.index(t), t.ne0, t.rows), ftype, len(v_like), tied)
        else:
            ty = tensor_type(t, ftype, n_layers, tied)
        b = tensor_bytes(t, ty)
        total += b
        types[ty] = types.get(ty, 0) + 1
        if ty in REPACKED and t.category not in ("token_embd", "pos_embd") and t.rows % 8 == 0:
            repacked += b
    return WeightPlan(ftype, total, repacked, sum(t.n for t in ts), types)


# --- compute buffers ----------------------------------------------------------------------------
# What a process touches besides weights and KV, measured with kiln.bench.probe (peak RSS, RssAnon)
# on tiny-qwen2, tiny-llama and smollm2 at contexts 512..8192, flash attention off and on:
# * a fixed part (thread pools, allocator arenas, llama.cpp's graph): LLAMA_FIXED;
# * the vocabulary held by llama.cpp and the engine (token texts, piece cache, merge ranks):
#   VOCAB_BYTES per entry (smollm2 minus the tiny models: 28 MiB for 48k more entries);
# * the feed-forward activations of one 512-token ubatch: gate, up, their product and its
#   quantized copy, 16 B per ubatch token per FFN unit;
# * without flash attention, the attention scores per ubatch token per context cell: f32 scores
#   and softmax per head (2 x 4 B... fused to 4 B), the f16 copy llama.cpp makes of them for the
#   V product (2 B per head) and the f32 mask (4 B): 6 B per head + 4 B, matching the slopes
#   measured on smollm2 (9 heads: 58 B) and the tiny models (4 and 6 heads: 28 and 40 B);
# * with flash attention only the mask grows with the context (4 B per cell).
UBATCH = 512
LLAMA_FIXED = 8.3 * MIB
VOCAB_BYTES = 440


def llama_compute_bytes(geo: Geometry, context: int, flash_attn: bool, ff: int | None = None) -> int:
    cells = -(-context // 256) * 256
    ff = ff or _ff_guess(geo)
    per_cell = 4 if flash_attn else 6 * geo.n_heads + 2
    return int(LLAMA_FIXED + geo.vocab * VOCAB_BYTES + UBATCH * ff * 16 + UBATCH * cells * per_cell)


def _ff_guess(geo: Geometry) -> int:
    """The FFN width when only the artifact is at hand: from the bytes per layer, else 8/3 x hidden."""
    return geo.ffn or int(8 * geo.hidden / 3)


# onnxruntime (measured on smollm2 int4 and int8 at 512..8192 and tiny-qwen2 int4): a fixed part, the
# activations of a 512-token chunk (about 20 B per token per FFN unit), and the logits of a
# prefill chunk for every position (the genai builder's graph outputs them all: chunk x vocab x 4 B),
# held twice once the prompt spans more than one chunk (onnxruntime's arena keeps the previous
# chunk's output block while the next is computed); attention scratch stays under 4 MiB. The 4-bit
# weights MLAS prepacks are Geometry.repacked_bytes.
ONNX_FIXED = 28 * MIB


def onnx_compute_bytes(geo: Geometry, context: int, particles: int) -> int:
    chunk = min(UBATCH, context)
    buffers = 1 if context <= UBATCH else 2
    return int(ONNX_FIXED + chunk * _ff_guess(geo) * 20 + buffers * chunk * geo.vocab * 4)


@dataclass
class MemoryEstimate:
    runtime: int
    weights: int
    repacked: int
    kv: int
    compute: int
    kv_per_token: float

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.repacked + self.kv + self.compute

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "weights": self.weights, "repacked": self.repacked, "kv": self.kv,
                "compute": self.compute, "total": self.total, "kv_per_token": self.kv_per_token}


def engine_sequences(particles: int) -> int:
    """Sequence ids kiln's llama.cpp engine opens for `particles` sequences: its prompt-cache slots (hidden ids after
    the caller's, kiln.runtime.llamacpp) come on top, and llama.cpp allocates a recurrent state for every id
    (seen: tiny-qwen3_5 opened with n_seq_max 4 reports the state buffer of 8 sequences)."""
    from kiln.runtime.llamacpp import _MAX_SEQ, PROMPT_CACHE_SLOTS

    return min(particles + PROMPT_CACHE_SLOTS, _MAX_SEQ)


def predict_peak(geo: Geometry, context: int, kv_type: str | None = None, particles: int = 1,
                 flash_attn: bool = False, weights: int | None = None, repacked: int = 0) -> MemoryEstimate:
    """Peak RSS of a process running the artifact `geo` at `context` tokens (N particles)."""
    fmt = "onnx" if geo.format == "onnx" else "gguf"
    w = geo.model_bytes if weights is None else weights
    repacked = repacked or geo.repacked_bytes
    if fmt == "gguf":
        # one unified cache of `context` cells for all sequences, plus a recurrent state (hybrids) for every sequence
        # id the engine opens: the particles and kiln's prompt-cache slots
        kv = geo.kv_bytes(context, kv_type or "f16") + geo.state_bytes * engine_sequences(particles)
        compute = llama_compute_bytes(geo, context, flash_attn)
        per_token = geo.kv_bytes_per_token(kv_type or "f16")
    else:
        kv = (geo.kv_bytes(context) + geo.state_bytes) * particles  # a row of `context` positions per particle
        compute = onnx_compute_bytes(geo, context, particles)
        per_token = geo.kv_bytes_per_token()
    return MemoryEstimate(RUNTIME_BASE[fmt], w, repacked, kv, compute, per_token)
