"""The few numbers of an artifact that its speed and memory depend on, read without loading it.

One `Geometry` for GGUF files (kiln.gguf_header: metadata only, tensors stay on disk), ONNX
directories (genai_config.json) and Hugging Face checkpoints (config.json, for `kiln plan`), so the
benchmark, its KV formula and the cost model all read the same fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.formats import ONNX, by_name, format_of
from kiln.jsonfile import read_json_object

# Bytes per element of llama.cpp's KV-cache types (block types: block bytes / block elements).
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                 "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32}


@dataclass(frozen=True)
class Geometry:
    """Shapes that set memory and speed; `native_context` is the window before any baked RoPE scaling."""

    format: str  # "gguf" | "onnx" | "hf"
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    context_length: int  # what the artifact advertises (raised when RoPE scaling is baked in)
    native_context: int  # the window it was trained for
    rope_scaling: str | None  # e.g. "yarn x4.0", None when no scaling is baked in
    model_bytes: int  # bytes on disk of the weights (what decode streams, plus tables it only gathers)
    kv_bytes_per_elem: float  # the artifact's own KV element size (ONNX: the graph's KV type; GGUF: f16)
    repacked_bytes: int = 0  # weights the CPU backend copies into its own layout (llama.cpp repack, MLAS prepack)
    ffn: int = 0  # feed-forward width (0: unknown)
    gathered_bytes: int = 0  # tables only looked up per token (positions; untied token embeddings): not streamed
    kv_layers: int = 0  # layers that keep K and V per token (0: all; a hybrid's recurrent layers keep none)
    state_bytes: int = 0  # fixed recurrent state per sequence (Gated DeltaNet conv window + state), any context

    @property
    def streamed_bytes(self) -> int:
        """Weight bytes decode reads per token: what the bandwidth bound divides by."""
        return self.model_bytes - self.gathered_bytes

    def kv_bytes_per_token(self, kv_type: str | None = None) -> float:
        """K and V of one token in the attention layers: 2 x layers x n_kv_heads x head_dim x bytes per element."""
        per = KV_TYPE_BYTES[kv_type] if kv_type else self.kv_bytes_per_elem
        return 2 * (self.kv_layers or self.n_layers) * self.n_kv_heads * self.head_dim * per

    def kv_cells(self, context: int) -> int:
        """Cells a runtime allocates for `context` (llama.cpp pads its KV cache to a multiple of 256)."""
        multiple = by_name(self.format).kv_cell_multiple if self.format != "hf" else 1
        return -(-context // multiple) * multiple

    def kv_bytes(self, tokens: int, kv_type: str | None = None) -> int:
        return int(round(self.kv_bytes_per_token(kv_type) * tokens))

    def context_note(self, context: int) -> str | None:
        """Why a context is out of range or relies on baked RoPE scaling; None for the native window."""
        if context > self.context_length:
            return f"beyond the artifact's context of {self.context_length}"
        if context > self.native_context:
            return f"beyond the native {self.native_context}: uses the baked {self.rope_scaling}"
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_geometry(path: str | Path) -> Geometry:
    """The geometry of an artifact (by its format, kiln.formats) or of a checkpoint directory."""
    path = Path(path)
    fmt = format_of(path)
    if fmt is not None:
        return _READERS[fmt.name](path)
    if path.is_dir() and (path / "config.json").is_file():
        return hf_geometry(json.loads((path / "config.json").read_text(encoding="utf-8")), path)
    if not path.exists():
        raise KilnError(f"{path}: no such file or directory")
    raise KilnError(f"{path}: expected a .gguf file, an ONNX model directory or a checkpoint directory")


def _gguf(path: Path) -> Geometry:
    from kiln.gguf_header import open_gguf

    g = open_gguf(path)
    get = g.get

    arch = get("general.architecture")
    if not arch:
        raise KilnError(f"{path}: GGUF without general.architecture")
    try:
        n_layers = int(get(f"{arch}.block_count"))
        hidden = int(get(f"{arch}.embedding_length"))
        n_heads = int(get(f"{arch}.attention.head_count"))
        ctx = int(get(f"{arch}.context_length"))
    except (TypeError, ValueError):
        raise KilnError(f"{path}: GGUF lacks the {arch}.* shape keys") from None
    if n_heads <= 0:
        raise KilnError(f"{path}: GGUF key {arch}.attention.head_count is {n_heads}")
    n_kv = int(get(f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(get(f"{arch}.attention.key_length", hidden // n_heads))
    scaling = get(f"{arch}.rope.scaling.type")
    native, note = ctx, None
    if scaling and scaling != "none":
        factor = float(get(f"{arch}.rope.scaling.factor", 1.0))
        native = int(get(f"{arch}.rope.scaling.original_context_length", ctx / max(factor, 1.0)))
        note = f"{scaling} x{factor:g}"
    vocab = g.array_len("tokenizer.ggml.tokens") or 0
    # Matmul weights of the types llama.cpp's CPU backend repacks (rows % 8 == 0; embeddings are only gathered).
    repacked = sum(t.n_bytes for t in g.tensors
                   if t.tensor_type.name in ("Q4_0", "Q4_K", "IQ4_NL") and len(t.shape) > 1 and t.shape[1] % 8 == 0
                   and not t.name.startswith(("token_embd", "position_embd")))
    ffn = int(get(f"{arch}.feed_forward_length", 0) or 0)
    names = {t.name: t.n_bytes for t in g.tensors}
    gathered = names.get("position_embd.weight", 0) + (names.get("token_embd.weight", 0) if "output.weight" in names else 0)
    # A hybrid (Qwen3.5's Gated DeltaNet layers) flags its recurrent layers: they keep no K/V but a fixed f32
    # state per sequence, sized as llama.cpp sizes it (llama_hparams n_embd_r: conv window, n_embd_s: state).
    recurrent = sum(bool(x) for x in get(f"{arch}.attention.recurrent_layers") or [])
    d_conv, d_inner = int(get(f"{arch}.ssm.conv_kernel", 0) or 0), int(get(f"{arch}.ssm.inner_size", 0) or 0)
    d_state, n_group = int(get(f"{arch}.ssm.state_size", 0) or 0), int(get(f"{arch}.ssm.group_count", 0) or 0)
    state = 4 * recurrent * (max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state) + d_state * d_inner)
    # Multi-token prediction (NextN) blocks after the decoder's layers are in block_count, but llama.cpp's plain
    # decoding skips them and keeps no cache for them.
    nextn = int(get(f"{arch}.nextn_predict_layers", 0) or 0)
    return Geometry("gguf", arch, n_layers, n_heads, n_kv, head_dim, hidden, vocab, ctx, native, note,
                    path.stat().st_size, 2.0, repacked, ffn, gathered, kv_layers=n_layers - nextn - recurrent,
                    state_bytes=state)


def _onnx(path: Path) -> Geometry:
    config = ONNX.config_path(path)
    try:
        cfg = read_json_object(config)  # the engine's own message for a file that is not JSON
    except FileNotFoundError:
        raise KilnError(f"{config}: missing (not an ONNX model directory written by kiln or onnxruntime-genai)") from None
    try:
        model, dec = cfg["model"], cfg["model"]["decoder"]
        n_layers, n_kv = int(dec["num_hidden_layers"]), int(dec["num_key_value_heads"])
        head_dim, n_heads = int(dec["head_size"]), int(dec["num_attention_heads"])
        hidden, vocab, ctx = int(dec["hidden_size"]), int(model["vocab_size"]), int(model["context_length"])
        filename = dec["filename"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise KilnError(f"{config}: missing or malformed entry ({exc})") from None
    size = sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(filename))
    native, note = ctx, None
    manifest = by_name("onnx").manifest(path)
    if manifest is not None:  # kiln's manifest records the RoPE settings it baked into the graph
        rope = manifest.get("rope") or {}
        if rope.get("type") not in (None, "none"):
            native = int(rope.get("original_context") or ctx)
            note = f"{rope['type']} x{float(rope.get('factor') or 1):g}"
    kv_elem, packed, widest, gathered = _onnx_graph_facts(path / filename, dec)
    return Geometry("onnx", model.get("type", "?"), n_layers, n_heads, n_kv, head_dim, hidden, vocab, ctx,
                    native, note, size, kv_elem, packed, widest if widest > hidden else 0, gathered)


def _onnx_graph_facts(onnx_path: Path, dec: dict) -> tuple[float, int, int, int]:
    """(KV element size of the graph's past_key_values input, bytes of its 4-bit MatMulNBits weights,
    the widest MatMulNBits input: the FFN width, read off the down projection, bytes of tables that
    are only gathered).

    The second is what onnxruntime's MLAS prepacks into a second copy at session start (measured:
    smollm2 int4's peak RSS holds its 4-bit linears twice; int8 MatMulNBits are not prepacked)."""
    try:
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        past0 = dec["inputs"]["past_key_names"] % 0
        elem = {i.name: i.type.tensor_type.elem_type for i in graph.input}.get(past0)
        sizes = {}
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                sizes[t.name] = int({e.key: e.value for e in t.external_data}.get("length", 0))
            else:
                sizes[t.name] = len(t.raw_data)
        consumers: dict[str, set[str]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
        gathered = sum(size for name, size in sizes.items()
                       if consumers.get(name) and consumers[name] <= {"Gather", "GatherBlockQuantized"})
        packed = widest = 0
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                attrs = {a.name: a.i for a in node.attribute}
                widest = max(widest, attrs.get("K", 0))
                if attrs.get("bits", 4) == 4:
                    packed += sum(sizes.get(name, 0) for name in node.input[1:3])
        return (2.0 if elem == onnx.TensorProto.FLOAT16 else 4.0), packed, widest, gathered
    except Exception:  # noqa: BLE001 - without onnx: float32 KV (kiln's CPU exports), prepacking unknown
        return 4.0, 0, 0, 0


_READERS = {"gguf": _gguf, "onnx": _onnx}  # format name -> reader of that format's metadata


def hf_geometry(config: dict[str, Any], path: Path | None = None) -> Geometry:
    """From a Hugging Face config.json (or a native Arbor config), for planning before any export."""
    text = config.get("text_config") or config
    try:
        n_layers = int(text.get("num_hidden_layers") or text["n_layer"])
        hidden = int(text.get("hidden_size") or text["n_embd"])
        n_heads = int(text.get("num_attention_heads") or text["n_head"])
        vocab = int(text["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KilnError(f"{path or 'config'}: config.json lacks {exc} (layers, hidden size, heads, vocab)") from None
    n_kv = int(text.get("num_key_value_heads") or n_heads)
    head_dim = int(text.get("head_dim") or hidden // n_heads)
    ctx = int(text.get("max_position_embeddings") or text.get("n_positions") or text.get("n_ctx") or 2048)
    native, note = ctx, None
    rope = text.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type")
    if kind and kind != "default":
        factor = float(rope.get("factor") or 1)
        native = int(rope.get("original_max_position_embeddings") or ctx)
        ctx = max(ctx, int(native * factor))
        note = f"{kind} x{factor:g}"
    size = 0
    if path is not None:
        size = sum(p.stat().st_size for p in path.glob("*.safetensors")) or sum(
            p.stat().st_size for p in path.glob("*.bin"))
    ffn = int(text.get("intermediate_size") or text.get("n_inner") or text.get("ffn_dim") or 4 * hidden)
    from kiln import families

    family = families.for_config(config)
    kv_layers = family.kv_layer_count(config) if family is not None and "num_hidden_layers" in text else n_layers
    state = family.recurrent_state_bytes(config) if family is not None else 0
    return Geometry("hf", (config.get("architectures") or [config.get("model_type", "?")])[0], n_layers, n_heads,
                    n_kv, head_dim, hidden, vocab, ctx, native, note, size, 2.0, 0, ffn, kv_layers=kv_layers,
                    state_bytes=state)
