"""The weights an onnxruntime-genai decoder graph really computes with, as Hugging Face tensors.

An ONNX artifact is checked like a GGUF one: onnxruntime's logits are compared with the
transformers reference run on the artifact's *own* dequantized weights, which separates what
quantizing the weights costs from how onnxruntime runs them. So every weight is decoded
exactly as the operator that consumes it defines it (com.microsoft MatMulNBits and
GatherBlockQuantized in onnxruntime's ContribOperators.md), never re-derived from the
quantizer:

* codes are packed low bits first along the quantized (K) axis, `8 // bits` per byte;
* weight = (code - zero_point) * scale, one scale and zero point per block of K;
* zero points are packed like the codes (uint8) or stored unpacked as floats; absent, they
  are 2^(bits-1) (8 for int4, 128 for int8), except 0 for int4/uint4-typed data.

Which HF parameter a weight belongs to is read off the builder's node names, all in `_NODES`.
What the builder stores transformed is undone: a family's (1 + w) RMSNorm weights stored as 1 + w
(`Family.onnx_norm_offset`), Gated DeltaNet's A_log stored as -exp(A_log).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.verify.reference import Reference

# Builder node name (re.fullmatch) -> HF parameter name; `qkv_proj` is the builder's fused
# q/k/v projection (rows q, then k, then v), split into the three HF projections.
_MATMUL = r"MatMul(?:_Q\d+|NBits)?"  # float MatMul, or MatMulNBits as renamed by the quantizer
_NODES: list[tuple[str, str]] = [
    (r"/model/embed_tokens/(?:Gather|GatherBlockQuantized)(?:_Q\d+)?", "model.embed_tokens.weight"),
    (r"/model/layers\.(\d+)/(input|post_attention)_layernorm/(?:Skip)?LayerNorm",
     "model.layers.{0}.{1}_layernorm.weight"),
    (r"/model/layers\.\d+/final_norm_layernorm/(?:Skip)?LayerNorm", "model.norm.weight"),
    (r"/model/layers\.(\d+)/attn/([qk])_norm/SimplifiedLayerNormalization",
     "model.layers.{0}.self_attn.{1}_norm.weight"),
    (rf"/model/layers\.(\d+)/attn/(qkv|q|k|v|o)_proj/{_MATMUL}", "model.layers.{0}.self_attn.{1}_proj.weight"),
    (r"/model/layers\.(\d+)/attn/(qkv|q|k|v|o)_proj/Add", "model.layers.{0}.self_attn.{1}_proj.bias"),
    (rf"/model/layers\.(\d+)/mlp/(gate|up|down)_proj/{_MATMUL}", "model.layers.{0}.mlp.{1}_proj.weight"),
    (rf"/model/layers\.(\d+)/linear_attn/(qkv|z|b|a)_proj/{_MATMUL}",
     "model.layers.{0}.linear_attn.in_proj_{1}.weight"),
    (rf"/model/layers\.(\d+)/linear_attn/out_proj/{_MATMUL}", "model.layers.{0}.linear_attn.out_proj.weight"),
    (r"/model/layers\.(\d+)/linear_attn/CausalConvWithState", "model.layers.{0}.linear_attn.conv1d.weight"),
    (r"/model/layers\.(\d+)/linear_attn/GatedRMSNorm", "model.layers.{0}.linear_attn.norm.weight"),
    (r"/model/layers\.(\d+)/linear_attn/LinearAttentionGate", "model.layers.{0}.linear_attn."),
    (rf"/lm_head/{_MATMUL}", "lm_head.weight"),
    (r"/lm_head/Add", "lm_head.bias"),
]
# The builder keeps weights in initializers (shape constants are Constant nodes); these ops read
# initializers that are not HF weights themselves: shape plumbing, and attention's rotary tables.
_NOT_WEIGHTS = {"Constant", "Reshape", "Transpose", "GroupQueryAttention", "RotaryEmbedding", "MRotaryEmbedding"}
# Where each weight-carrying op keeps its weight (Add: whichever input is constant).
_WEIGHT_INPUT = {"MatMul": 1, "MatMulNBits": 1, "Gather": 0, "GatherBlockQuantized": 0,
                 "SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2,
                 "CausalConvWithState": 1, "GatedRMSNorm": 1, "LinearAttentionGate": 1}
_NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
_MATMUL_NBITS_BIAS = 5


def onnx_weights(onnx_dir: str | Path, norm_offset: float = 0.0) -> dict[str, np.ndarray]:
    """Every weight of an onnxruntime-genai-built decoder graph, dequantized to float32 and keyed by the
    Hugging Face parameter name (model.layers.{i}.self_attn.q_proj.weight, ..., model.embed_tokens.weight,
    lm_head.weight, model.norm.weight, ...), shaped as in the HF model ([out_features, in_features] for
    linears). `norm_offset`: what the builder added to every RMSNorm weight (the family's onnx_norm_offset)."""
    import onnx

    onnx_dir = Path(onnx_dir)
    path = onnx_dir / "model.onnx"
    try:
        decoder = json.loads((onnx_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
        q_rows = int(decoder["num_attention_heads"]) * int(decoder["head_size"])
        kv_rows = int(decoder["num_key_value_heads"]) * int(decoder["head_size"])
        hidden = int(decoder["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KilnError(f"{onnx_dir / 'genai_config.json'}: cannot read the decoder's sizes ({exc})") from None
    try:
        graph = onnx.load(str(path), load_external_data=True).graph
    except Exception as exc:  # onnx raises assorted types for missing or corrupt files
        raise KilnError(f"{path}: cannot load it: {str(exc).splitlines()[0][:200]}") from None
    consts = _Constants(graph, path)
    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        name = _hf_name(node.name)
        if name is None:
            if node.op_type not in _NOT_WEIGHTS and any(i in consts.inits for i in node.input):
                raise KilnError(f"{path}: node {node.name} ({node.op_type}) holds weights kiln cannot name")
            continue
        for hf, w in _node_weights(node, name, consts, path).items():
            if node.op_type in _NORMS and norm_offset:
                w = w - np.float32(norm_offset)
            if hf.endswith(".qkv_proj.weight") or hf.endswith(".qkv_proj.bias"):
                # a gated attention's query projection (Qwen3.5) holds a query and a gate row block per head
                q = next((n for n in (q_rows, 2 * q_rows) if w.shape[0] == n + 2 * kv_rows), None)
                if q is None:
                    raise KilnError(f"{path}: {node.name} has {w.shape[0]} rows, expected q+k+v = "
                                    f"{q_rows}+{kv_rows}+{kv_rows} from genai_config.json (or a gated query, "
                                    f"{2 * q_rows} rows)")
                parts = np.split(w, [q, q + kv_rows])
                pieces = {hf.replace(".qkv_proj.", f".{p}_proj."): t for p, t in zip("qkv", parts)}
            elif hf == "model.embed_tokens.weight":
                pieces = {hf: w[:, :hidden]}  # a quantized table keeps each row padded to whole blocks
            else:
                pieces = {hf: w}
            for key, tensor in pieces.items():
                if key in out:
                    raise KilnError(f"{path}: two nodes hold {key}")
                out[key] = np.array(tensor, dtype=np.float32, order="C")  # a writable copy, for torch
    if not out:
        raise KilnError(f"{path}: no weights found; not a graph written by onnxruntime-genai's builder")
    return out


def with_onnx_weights(ref: Reference, onnx_dir: str | Path) -> Reference:
    """A copy of the transformers reference with every weight replaced by the ONNX graph's dequantized one.

    Like `with_gguf_weights`. A checkpoint with tied embeddings stays tied when the graph
    shares one table too (tied int4 GatherBlockQuantized, or Transpose+Gather); when the graph
    quantized the LM head and the embeddings differently, the copy's LM head is untied.
    Biases the builder dropped because they are all zero keep their (zero) reference value.
    """
    from kiln import families

    torch = ref._torch
    architecture = (getattr(ref.model.config, "architectures", None) or [""])[0]
    family = families.FAMILIES.get(architecture)
    weights = onnx_weights(onnx_dir, family.onnx_norm_offset if family is not None else 0.0)
    clone = ref.rounded_copy("float32")
    model = clone.model
    params = dict(model.named_parameters(remove_duplicate=False))
    embed, head = params.get("model.embed_tokens.weight"), params.get("lm_head.weight")
    tied = head is not None and head is embed
    if tied and "lm_head.weight" in weights and not np.array_equal(weights["lm_head.weight"],
                                                                  weights.get("model.embed_tokens.weight")):
        model.lm_head.weight = torch.nn.Parameter(head.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        params["lm_head.weight"] = model.lm_head.weight
        tied = False
    # a zero bias the builder adds where the model has none (CausalConvWithState's) changes nothing
    extra = sorted(n for n in set(weights) - set(params) if not (n.endswith(".bias") and not weights[n].any()))
    if extra:
        raise KilnError(f"{onnx_dir}: the graph holds {extra[0]}, which the {type(model).__name__} "
                        "reference does not have")
    with torch.no_grad():
        for name, p in params.items():
            w = weights.get(name)
            if w is None and tied and name in ("lm_head.weight", "model.embed_tokens.weight"):
                w = weights.get("model.embed_tokens.weight" if name == "lm_head.weight" else "lm_head.weight")
            if w is None:
                if name.endswith(".bias") and not p.any():
                    continue
                raise KilnError(f"{onnx_dir}: the graph holds no {name}")
            if tuple(w.shape) != tuple(p.shape):
                raise KilnError(f"{onnx_dir}: {name} has shape {list(w.shape)} in the graph, "
                                f"{list(p.shape)} in the reference")
            p.copy_(torch.from_numpy(w))
    return clone


def _hf_name(node_name: str) -> str | None:
    for pattern, template in _NODES:
        m = re.fullmatch(pattern, node_name)
        if m:
            return template.format(*m.groups())
    return None


def _node_weights(node, hf: str, consts: _Constants, path: Path) -> dict[str, np.ndarray]:
    """The HF-layout weight (and a MatMulNBits bias, if any) that `node` holds."""
    op = node.op_type
    if op == "Add":
        const = [i for i in node.input if consts.is_constant(i)]
        if len(const) != 1:
            raise KilnError(f"{path}: bias node {node.name} has {len(const)} constant inputs, expected 1")
        return {hf: consts.value(const[0])}
    if op not in _WEIGHT_INPUT or len(node.input) <= _WEIGHT_INPUT[op]:
        raise KilnError(f"{path}: node {node.name} is a {op}; kiln cannot read weights from it")
    attrs = {a.name: _attr(a) for a in node.attribute}
    weight = consts.value(node.input[_WEIGHT_INPUT[op]])
    if op == "MatMul":
        return {hf: weight.T}  # ONNX MatMul weights are [in, out]
    if op == "MatMulNBits":
        return _matmul_nbits(node, attrs, weight, hf, consts, path)
    if op == "GatherBlockQuantized":
        return {hf: _gather_block_quantized(node, attrs, weight, consts, path)}
    if op == "CausalConvWithState":  # depthwise conv [channels, 1, kernel] and its bias
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return {hf: weight, **({hf[:-len("weight")] + "bias": consts.value(bias)} if bias else {})}
    if op == "LinearAttentionGate":  # Gated DeltaNet's dt_bias and -exp(A_log)
        neg_exp_a = consts.value(node.input[2]).astype(np.float64)
        return {hf + "dt_bias": weight, hf + "A_log": np.log(-neg_exp_a).astype(np.float32)}
    return {hf: weight}


def _matmul_nbits(node, attrs: dict, packed: np.ndarray, hf: str, consts: _Constants,
                  path: Path) -> dict[str, np.ndarray]:
    """com.microsoft MatMulNBits: B is [N, ceil(K/block), block*bits/8], scales [N, blocks],
    zero points [N, ceil(blocks*bits/8)] packed like B (or [N, blocks] floats)."""
    k, n, bits, block = int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4)), int(attrs["block_size"])
    blocks = -(-k // block)
    opt = list(node.input) + [""] * 6
    if packed.dtype != np.uint8 or packed.size != n * blocks * block * bits // 8:
        raise KilnError(f"{path}: {node.name} has {packed.dtype} weights of shape {list(packed.shape)}, "
                        f"expected uint8 [{n}, {blocks}, {block * bits // 8}]")
    codes = _unpack(packed.reshape(n, -1), bits)
    scales = consts.value(opt[2]).astype(np.float32).reshape(n, blocks)
    zero = _zero_points(consts.value(opt[3]) if opt[3] else None, (n, blocks), bits, np.uint8)
    if opt[4]:  # g_idx (GPTQ act-order): column k uses the parameters of group g_idx[k]
        g_idx = consts.value(opt[4]).astype(np.int64).reshape(-1)
        if g_idx.shape != (k,) or g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= blocks:
            raise KilnError(f"{path}: {node.name} has a g_idx of shape {list(g_idx.shape)} that does not index "
                            f"its {blocks} groups")
        weight = (codes[:, :k].astype(np.float32) - zero[:, g_idx]) * scales[:, g_idx]
    else:
        weight = _dequantize(codes, scales, zero, block)[:, :k]
    out = {hf: weight}
    if opt[_MATMUL_NBITS_BIAS]:
        out[hf.rsplit(".", 1)[0] + ".bias"] = consts.value(opt[_MATMUL_NBITS_BIAS])
    return out


def _gather_block_quantized(node, attrs: dict, data: np.ndarray, consts: _Constants, path: Path) -> np.ndarray:
    """com.microsoft GatherBlockQuantized over the whole table (gather axis 0, quantized along axis 1)."""
    bits, block = int(attrs.get("bits", 4)), int(attrs.get("block_size", 128))
    if data.ndim != 2 or int(attrs.get("gather_axis", 0)) != 0 or int(attrs.get("quantize_axis", 1)) not in (1, -1):
        raise KilnError(f"{path}: {node.name} is not a row-gather of a table quantized along its rows")
    if data.dtype == np.uint8:
        codes = _unpack(data, bits)
    elif data.dtype.name in ("int4", "uint4"):  # onnx unpacks these to one code per element
        codes = data.astype(np.int32)
    else:
        raise KilnError(f"{path}: {node.name} gathers {data.dtype} data, expected uint8, int4 or uint4 "
                        "(the builder wrote an invalid graph)")
    opt = list(node.input) + [""] * 4
    scales = consts.value(opt[2]).astype(np.float32)
    blocks = -(-codes.shape[1] // block)
    if scales.shape != (codes.shape[0], blocks):
        raise KilnError(f"{path}: {node.name} has scales {list(scales.shape)}, expected {[codes.shape[0], blocks]}")
    zero = _zero_points(consts.value(opt[3]) if opt[3] else None, scales.shape, bits, data.dtype)
    return _dequantize(codes, scales, zero, block)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes packed low bits first along the last axis, one code per element."""
    if bits == 8:
        return packed.astype(np.int32)
    if bits not in (2, 4):
        raise KilnError(f"{bits}-bit weights are not supported")
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1).astype(np.int32)


def _zero_points(zp: np.ndarray | None, shape: tuple[int, int], bits: int, data_dtype) -> np.ndarray:
    if zp is None:  # the operators' default: mid-range for unsigned codes, 0 for (u)int4-typed data
        return np.full(shape, 2 ** (bits - 1) if data_dtype == np.uint8 else 0, dtype=np.float32)
    if zp.dtype == np.uint8:
        return _unpack(zp.reshape(shape[0], -1), bits)[:, :shape[1]].astype(np.float32)
    return zp.astype(np.float32).reshape(shape)


def _dequantize(codes: np.ndarray, scales: np.ndarray, zero: np.ndarray, block: int) -> np.ndarray:
    """(code - zero point) * scale, blockwise along the last axis of `codes` ([rows, blocks*block])."""
    rows, blocks = scales.shape
    q = codes[:, :blocks * block].reshape(rows, blocks, -1).astype(np.float32)
    return ((q - zero[:, :, None]) * scales[:, :, None]).reshape(rows, -1)


def _attr(a):
    import onnx

    return onnx.helper.get_attribute_value(a)


class _Constants:
    """Constant tensors of a graph: initializers and what Constant/Reshape/Transpose make of them
    (the builder feeds tied embeddings through a Reshape or Transpose of the LM head's weight)."""

    def __init__(self, graph, path: Path):
        self.path = path
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}

    def is_constant(self, name: str) -> bool:
        node = self.producer.get(name)
        return name in self.inits or (node is not None and node.op_type == "Constant")

    def value(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        op = node.op_type if node is not None else None
        if op == "Constant":
            attrs = {a.name: a for a in node.attribute}
            if "value" not in attrs:
                raise KilnError(f"{self.path}: Constant {node.name} has no tensor value")
            return numpy_helper.to_array(attrs["value"].t)
        if op == "Reshape":
            x, shape = self.value(node.input[0]), self.value(node.input[1])
            shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape)]  # 0 copies the input dim
            try:
                return x.reshape(shape)
            except ValueError:
                raise KilnError(f"{self.path}: {node.name} cannot reshape {list(x.shape)} to {shape}") from None
        if op == "Transpose":
            perm = next((list(_attr(a)) for a in node.attribute if a.name == "perm"), None)
            return np.transpose(self.value(node.input[0]), perm)
        raise KilnError(f"{self.path}: {name!r} is not a constant kiln can evaluate "
                        f"({'made by ' + op if op else 'not produced by any node'})")
