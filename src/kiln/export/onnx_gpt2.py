"""Write an HF GPT-2 model (config dict + float32 state dict) as an ONNX decoder kiln's engine runs.

onnxruntime-genai's model builder has no GPT-2, and native Arbor checkpoints are GPT-2 models
(`kiln.checkpoint.arbor.to_gpt2`), so kiln writes this graph itself with `onnx.helper`, following
the conventions of the builder's graphs that `OnnxEngine` already drives (DESIGN.md §2):

* inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, total] (each row's valid length is
  its row sum), ``position_ids`` [batch, seq] and ``past_key_values.%d.key/value``
  [batch, heads, past, head_dim]; outputs ``logits`` and ``present.%d.key/value``, which may be
  bound to the same buffers as the past (``past_present_share_buffer``);
* the mask becomes ``seqlens_k = ReduceSum(mask, 1) - 1`` and ``total_sequence_length =
  Shape(mask)[1]`` (int32), fed to one ``com.microsoft.GroupQueryAttention`` per layer with the
  packed q|k|v projection (GPT-2's ``c_attn`` already lays it out the way GroupQueryAttention
  reads a packed input when kv heads = heads), and ``do_rotary=0``: GPT-2's positions are an
  absolute table added at the input, ``Gather(wte, input_ids) + Gather(wpe, position_ids)``;
* pre-LN blocks with ``LayerNormalization`` (bias, the config's epsilon), GPT-2's Conv1D weights
  ([in, out]) as plain ``MatMul`` + ``Add``, the activation from ``activation_function`` (exact
  erf GELU for ``gelu``, the tanh form for ``gelu_new``, ReLU, SiLU) and a tied or untied head.

The output is deterministic: the same model gives byte-identical files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 21  # Gelu needs 20, LayerNormalization 17
MS_DOMAIN = "com.microsoft"
INPUT_IDS, MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"

# HF ACT2FN names -> how the graph computes them.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md")


def _int(config: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise KilnError(f"GPT-2 config: {key!r} must be a positive integer, got {value!r}")
            return value
    raise KilnError(f"GPT-2 config: missing {keys[0]!r}")


def _tensor(state: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in state:
        raise KilnError(f"GPT-2 state dict: tensor {name} is missing")
    value = np.asarray(state[name])
    if tuple(value.shape) != shape:
        raise KilnError(f"GPT-2 state dict: tensor {name} has shape {list(value.shape)}, expected {list(shape)}")
    return np.ascontiguousarray(value, dtype=np.float32)


class _Graph:
    """Nodes and initializers, named the way the builder names them (``/model/...``)."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._consts: dict[tuple[str, Any], str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_i64(self, value: int | list[int]) -> str:
        key = ("i64", tuple(value) if isinstance(value, list) else value)
        if key not in self._consts:
            name = f"/model/constants/INT64/{str(value).replace(' ', '')}"  # "[1]" or "1", like the builder
            self._consts[key] = self.init(name, np.asarray(value, np.int64))
        return self._consts[key]

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, outputs: list[str] | None = None,
             domain: str = "", **attrs: Any) -> list[str]:
        from onnx import helper

        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        return self.node(op, inputs, name, **attrs)[0]


def _activation(g: _Graph, x: str, kind: str, prefix: str) -> str:
    if kind == "gelu":
        return g.op("Gelu", [x], f"{prefix}/Gelu", approximate="none")
    if kind == "gelu_tanh":
        return g.op("Gelu", [x], f"{prefix}/Gelu", approximate="tanh")
    if kind == "relu":
        return g.op("Relu", [x], f"{prefix}/Relu")
    sig = g.op("Sigmoid", [x], f"{prefix}/Sigmoid")
    return g.op("Mul", [x, sig], f"{prefix}/Mul")


def build_gpt2_graph(config: dict[str, Any], state: dict[str, np.ndarray]) -> Any:
    """The ONNX ModelProto of an HF GPT-2 model (weights inline; `write_gpt2_onnx` moves them out)."""
    import onnx
    from onnx import TensorProto, helper

    vocab = _int(config, "vocab_size")
    hidden = _int(config, "n_embd", "hidden_size")
    n_layers = _int(config, "n_layer", "num_hidden_layers")
    n_heads = _int(config, "n_head", "num_attention_heads")
    positions = _int(config, "n_positions", "max_position_embeddings")
    if hidden % n_heads:
        raise KilnError(f"GPT-2 config: n_head {n_heads} does not divide n_embd {hidden}")
    head_dim = hidden // n_heads
    act_name = config.get("activation_function", "gelu_new")
    if act_name not in ACTIVATIONS:
        raise KilnError(f"GPT-2 config: activation_function {act_name!r} is not supported "
                        f"(expected one of {', '.join(ACTIVATIONS)})")
    act = ACTIVATIONS[act_name]
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    if not eps > 0:
        raise KilnError(f"GPT-2 config: layer_norm_epsilon must be positive, got {eps!r}")
    base_scale = 1.0 / math.sqrt(head_dim) if config.get("scale_attn_weights", True) else 1.0
    by_layer = bool(config.get("scale_attn_by_inverse_layer_idx", False))
    ffn = state.get("transformer.h.0.mlp.c_fc.weight")
    if ffn is None or np.ndim(ffn) != 2:
        raise KilnError("GPT-2 state dict: tensor transformer.h.0.mlp.c_fc.weight is missing or not a matrix")
    tied = "lm_head.weight" not in state  # to_gpt2 leaves it out when tied, as HF's state dict does not need it

    g = _Graph()
    wte = g.init("transformer.wte.weight", _tensor(state, "transformer.wte.weight", (vocab, hidden)))
    wpe = g.init("transformer.wpe.weight", _tensor(state, "transformer.wpe.weight", (positions, hidden)))

    # attention mask -> per-row lengths (minus one) and the total width, as the builder computes them
    one = g.const_i64([1])
    total = g.op("ReduceSum", [MASK, one], "/model/attn_mask_reformat/attn_mask_subgraph/ReduceSum", keepdims=0)
    seqlens = g.op("Sub", [total, one], "/model/attn_mask_reformat/attn_mask_subgraph/Sub")
    seqlens = g.op("Cast", [seqlens], "/model/attn_mask_reformat/attn_mask_subgraph/Sub/Cast", to=TensorProto.INT32)
    shape = g.op("Shape", [MASK], "/model/attn_mask_reformat/attn_mask_subgraph/Shape")
    width = g.op("Gather", [shape, g.const_i64(1)], "/model/attn_mask_reformat/attn_mask_subgraph/Gather", axis=0)
    width = g.op("Cast", [width], "/model/attn_mask_reformat/attn_mask_subgraph/Gather/Cast", to=TensorProto.INT32)

    tok = g.op("Gather", [wte, INPUT_IDS], "/model/embed_tokens/Gather", axis=0)
    pos = g.op("Gather", [wpe, POSITION_IDS], "/model/embed_positions/Gather", axis=0)
    x = g.op("Add", [tok, pos], "/model/embed/Add")

    def linear(h: str, prefix: str, hf: str, n_in: int, n_out: int) -> str:
        w = g.init(f"{hf}.weight", _tensor(state, f"{hf}.weight", (n_in, n_out)))
        b = g.init(f"{hf}.bias", _tensor(state, f"{hf}.bias", (n_out,)))
        y = g.op("MatMul", [h, w], f"{prefix}/MatMul")
        return g.op("Add", [y, b], f"{prefix}/Add")

    def layer_norm(h: str, prefix: str, hf: str) -> str:
        w = g.init(f"{hf}.weight", _tensor(state, f"{hf}.weight", (hidden,)))
        b = g.init(f"{hf}.bias", _tensor(state, f"{hf}.bias", (hidden,)))
        return g.op("LayerNormalization", [h, w, b], prefix, axis=-1, epsilon=eps, stash_type=1)

    inner = int(np.shape(ffn)[1])
    for i in range(n_layers):
        p, hf = f"/model/layers.{i}", f"transformer.h.{i}"
        h = layer_norm(x, f"{p}/input_layernorm/LayerNorm", f"{hf}.ln_1")
        qkv = linear(h, f"{p}/attn/qkv_proj", f"{hf}.attn.c_attn", hidden, 3 * hidden)
        scale = base_scale / (i + 1) if by_layer else base_scale
        attn = g.node("GroupQueryAttention",
                      [qkv, "", "", PAST_KEY % i, PAST_VALUE % i, seqlens, width],
                      f"{p}/attn/GroupQueryAttention", domain=MS_DOMAIN,
                      outputs=[f"{p}/attn/GroupQueryAttention/output_0", PRESENT_KEY % i, PRESENT_VALUE % i],
                      num_heads=n_heads, kv_num_heads=n_heads, do_rotary=0, rotary_interleaved=0,
                      local_window_size=-1, softcap=0.0, scale=float(scale))[0]
        x = g.op("Add", [x, linear(attn, f"{p}/attn/o_proj", f"{hf}.attn.c_proj", hidden, hidden)],
                 f"{p}/attn/residual/Add")
        h = layer_norm(x, f"{p}/post_attention_layernorm/LayerNorm", f"{hf}.ln_2")
        h = linear(h, f"{p}/mlp/fc_proj", f"{hf}.mlp.c_fc", hidden, inner)
        h = _activation(g, h, act, f"{p}/mlp/act_fn")
        x = g.op("Add", [x, linear(h, f"{p}/mlp/down_proj", f"{hf}.mlp.c_proj", inner, hidden)],
                 f"{p}/mlp/residual/Add")
    x = layer_norm(x, "/model/norm/LayerNorm", "transformer.ln_f")
    if tied:
        head = g.op("Transpose", [wte], "/lm_head/Transpose", perm=[1, 0])
    else:
        head = g.init("lm_head.MatMul.weight", _tensor(state, "lm_head.weight", (vocab, hidden)).T)
    g.node("MatMul", [x, head], "/lm_head/MatMul", outputs=[LOGITS])

    kv_past = ["batch_size", n_heads, "past_sequence_length", head_dim]
    kv_total = ["batch_size", n_heads, "total_sequence_length", head_dim]
    inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info(MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    inputs += [helper.make_tensor_value_info(n % i, TensorProto.FLOAT, kv_past)
               for n in (PAST_KEY, PAST_VALUE) for i in range(n_layers)]
    inputs.append(helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, ["batch_size", "sequence_length"]))
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    outputs += [helper.make_tensor_value_info(n % i, TensorProto.FLOAT, kv_total)
                for n in (PRESENT_KEY, PRESENT_VALUE) for i in range(n_layers)]
    graph = helper.make_graph(g.nodes, "gpt2", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, producer_name="kiln", opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def genai_config(config: dict[str, Any], eos_token_id: int | None, bos_token_id: int | None,
                 pad_token_id: int | None = None) -> dict[str, Any]:
    """genai_config.json for the graph, named the way the builder names things (plus position_ids)."""
    hidden = _int(config, "n_embd", "hidden_size")
    n_heads = _int(config, "n_head", "num_attention_heads")
    context = _int(config, "n_positions", "max_position_embeddings")
    eos = eos_token_id if eos_token_id is not None else config.get("eos_token_id")
    bos = bos_token_id if bos_token_id is not None else config.get("bos_token_id")
    model: dict[str, Any] = {
        "bos_token_id": bos,
        "context_length": context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": MODEL_FILE,
            "head_size": hidden // n_heads,
            "hidden_size": hidden,
            "inputs": {"input_ids": INPUT_IDS, "attention_mask": MASK, "past_key_names": PAST_KEY,
                       "past_value_names": PAST_VALUE, "position_ids": POSITION_IDS},
            "outputs": {"logits": LOGITS, "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            "num_attention_heads": n_heads,
            "num_hidden_layers": _int(config, "n_layer", "num_hidden_layers"),
            "num_key_value_heads": n_heads,
        },
        "eos_token_id": eos,
        "pad_token_id": pad_token_id if pad_token_id is not None else eos,
        "type": "gpt2",
        "vocab_size": _int(config, "vocab_size"),
    }
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {"model": model, "search": search}


def write_gpt2_onnx(config: dict[str, Any], state: dict[str, np.ndarray], out: Path, tokenizer_dir: Path | None = None,
                    eos_token_id: int | None = None, bos_token_id: int | None = None) -> dict[str, int]:
    """Write model.onnx (+ model.onnx.data), genai_config.json and (if given) the tokenizer files for an HF GPT-2
    model given as its config dict + float32 state dict; returns op counts."""
    import onnx

    out = Path(out)
    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise KilnError(f"{tokenizer_dir}: no tokenizer.json")
    model = build_gpt2_graph(config, state)
    out.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, DATA_FILE):  # onnx appends to an existing data file
        (out / name).unlink(missing_ok=True)
    try:
        onnx.save(model, str(out / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=DATA_FILE, size_threshold=1024)
    except OSError as exc:
        raise KilnError(f"cannot write {out / MODEL_FILE}: {exc}") from None
    genai = genai_config(config, eos_token_id, bos_token_id)
    (out / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    if tokenizer_dir is not None:
        import shutil

        tokenizer_dir = Path(tokenizer_dir)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out / name)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
