"""The generic decoder family every registered family refines: its knowledge as class data.

A family is everything kiln must know about one Hugging Face architecture, in one class: how its
config.json becomes a `ModelSpec`, its tensor table (HF name, GGUF name, shape, transform), the GGUF
keys that differ by family, whether onnxruntime-genai's builder takes it, which linears GPTQ and the
imatrix visit and in what order, and the cost model's per-layer terms. Exporters, compress, verify
and bench ask the family; none of them tests an architecture name (the llama.cpp `conversion/`
package's design: one small registered class per family over one generic base).

The base describes the pre-norm RMSNorm / SwiGLU / rotary decoder that Llama, Mistral, Qwen2 and
Qwen3 share; a family overrides only what differs (Qwen2's q/k/v biases, Qwen3's q/k norms,
Llama's q/k row permutation for llama.cpp's NORM-style rope).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kiln.checkpoint import rope as rope_mod
from kiln.checkpoint.spec import ModelSpec
from kiln.checkpoint.tokenizer import read_tokenizer
from kiln.errors import KilnError


@dataclass(frozen=True)
class TensorRow:
    """One row of a family's tensor table (gguf-py's tensor maps, plus shape and transform).

    `hf` and `gguf` are suffixes under `model.layers.N.` / `blk.N.` for a per-layer row, full names
    for a global one. `when` names a boolean `ModelSpec` attribute the row depends on. `permute`
    names the head count whose rows llama.cpp wants interleaved ("n_heads" / "n_kv_heads").

    A *stacked* row (mixture-of-experts weights) sets `experts`, the `ModelSpec` attribute holding the
    expert count: `hf` then holds "{e}" where the expert index goes, `shape` is one expert's, and the
    GGUF tensor is the experts' tensors stacked on a new first axis (llama.cpp's converter:
    torch.stack(dim=0)). `fused` names the other layout a checkpoint may hold them in, one
    [experts, parts x rows, columns] tensor: (its suffix, this row's part, parts), e.g. the gate
    half of transformers 5's `mlp.experts.gate_up_proj`. `f32` keeps the tensor float32 at every GGUF
    type, as the converter does for routers and llama.cpp's quantizer leaves them.

    A hybrid decoder (Qwen3.5) sets `layers` on the rows of one layer kind: the row applies only to layers
    whose `ModelSpec.layer_types` entry is that kind ("linear_attention", "full_attention"). `transform`
    names the family's classmethod `transform_<name>(w, dims, inverse)` that turns the checkpoint's tensor
    into the GGUF's (inverse=False) and back (inverse=True, for verification's dequantized model), where
    `dims` is the family's `transform_dims` (from a ModelSpec, or from a GGUF header: the file describes
    itself); `hf_shape` is the checkpoint tensor's shape where the transform changes it (a squeezed axis).
    """

    hf: str
    gguf: str
    shape: Callable[[ModelSpec], tuple[int, ...]]
    when: str | None = None
    permute: str | None = None
    experts: str | None = None
    fused: tuple[str, int, int] | None = None
    f32: bool = False
    layers: str | None = None
    transform: str | None = None
    hf_shape: Callable[[ModelSpec], tuple[int, ...]] | None = None


def _q(s: ModelSpec) -> int:
    return s.n_heads * s.head_dim


def _kv(s: ModelSpec) -> int:
    return s.n_kv_heads * s.head_dim


DECODER_LAYER: tuple[TensorRow, ...] = (
    TensorRow("input_layernorm.weight", "attn_norm.weight", lambda s: (s.hidden_size,)),
    TensorRow("post_attention_layernorm.weight", "ffn_norm.weight", lambda s: (s.hidden_size,)),
    TensorRow("self_attn.q_proj.weight", "attn_q.weight", lambda s: (_q(s), s.hidden_size), permute="n_heads"),
    TensorRow("self_attn.k_proj.weight", "attn_k.weight", lambda s: (_kv(s), s.hidden_size), permute="n_kv_heads"),
    TensorRow("self_attn.v_proj.weight", "attn_v.weight", lambda s: (_kv(s), s.hidden_size)),
    TensorRow("self_attn.o_proj.weight", "attn_output.weight", lambda s: (s.hidden_size, _q(s))),
    TensorRow("self_attn.q_proj.bias", "attn_q.bias", lambda s: (_q(s),), "attention_bias", permute="n_heads"),
    TensorRow("self_attn.k_proj.bias", "attn_k.bias", lambda s: (_kv(s),), "attention_bias", permute="n_kv_heads"),
    TensorRow("self_attn.v_proj.bias", "attn_v.bias", lambda s: (_kv(s),), "attention_bias"),
    TensorRow("self_attn.q_norm.weight", "attn_q_norm.weight", lambda s: (s.head_dim,), "qk_norm"),
    TensorRow("self_attn.k_norm.weight", "attn_k_norm.weight", lambda s: (s.head_dim,), "qk_norm"),
    TensorRow("mlp.gate_proj.weight", "ffn_gate.weight", lambda s: (s.intermediate_size, s.hidden_size)),
    TensorRow("mlp.up_proj.weight", "ffn_up.weight", lambda s: (s.intermediate_size, s.hidden_size)),
    TensorRow("mlp.down_proj.weight", "ffn_down.weight", lambda s: (s.hidden_size, s.intermediate_size)),
)
DECODER_HEAD: tuple[TensorRow, ...] = (
    TensorRow("model.embed_tokens.weight", "token_embd.weight", lambda s: (s.vocab_size, s.hidden_size)),
)
DECODER_TAIL: tuple[TensorRow, ...] = (
    TensorRow("model.norm.weight", "output_norm.weight", lambda s: (s.hidden_size,)),
    TensorRow("lm_head.weight", "output.weight", lambda s: (s.vocab_size, s.hidden_size), "untied"),
)

# GPTQ's "true sequential" order within a decoder layer: each group sees the outputs of the groups
# quantized before it (q/k/v read the same input, so they are one group; then o; gate/up; down).
DECODER_GPTQ_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# The imatrix hooks one module per distinct input: q/k/v read one input, gate/up another.
DECODER_IMATRIX_HOOKS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("attn_q", "attn_k", "attn_v"), "self_attn.o_proj": ("attn_output",),
    "mlp.gate_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",),
}
# In both, a name holding "{e}" is a mixture of experts' per-expert linear ("mlp.experts.{e}.gate_proj"): GPTQ
# quantizes each expert from the calibration tokens routed to it, and the imatrix entry is the stacked GGUF
# tensor's, one slice per expert (llama-imatrix's per-expert counts). Where transformers holds the experts fused
# (`TensorRow.fused`), the family's `expert_inputs` says what each expert's matrices read.

_COLUMN_ORDERS: dict[tuple[Any, ...], np.ndarray | None] = {}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs (as convert_hf_to_gguf does)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows`: what a GGUF `llama` q/k tensor looked like in HF."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _int(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise KilnError(f"{path}: required key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KilnError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return value


def _license(directory: Path) -> str | None:
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (directory / name).exists():
            return (directory / name).read_text(encoding="utf-8", errors="replace")
    return None


class Family:
    """A Llama-shaped decoder family. Subclasses set class data; methods read it."""

    # --- identity
    name: ClassVar[str] = ""  # kiln's family name, equal to the GGUF general.architecture
    description: ClassVar[str] = ""  # how messages name a checkpoint of this family, when it matters
    architectures: ClassVar[tuple[str, ...]] = ()  # HF `architectures` names read as this family
    # --- how kiln reads, writes and checks it
    # "decoder": config.json -> ModelSpec (kiln.checkpoint.load_checkpoint), kiln.export.gguf's tensor table,
    # onnxruntime-genai's builder, a transformers reference. "gpt2": the family's `read_gpt2` gives kiln's GPT-2
    # form (kiln.checkpoint.gpt2.Gpt2Checkpoint), written by kiln.export.gguf_gpt2 / onnx_gpt2.
    layout: ClassVar[str] = "decoder"
    # What verification runs the source with: "transformers" (the source as transformers computes it) or
    # "arbor" (Arbor's own forward, kiln.verify.arbor_reference: Arbor has no transformers class).
    reference: ClassVar[str] = "transformers"
    # Whether positions are rotary (so --rope-scaling / --context can be baked); absolute tables cannot.
    rotary: ClassVar[bool] = True
    # --- config -> ModelSpec
    attention_bias: ClassVar[bool | None] = None  # None: config["attention_bias"] (default False)
    qk_norm: ClassVar[bool] = False
    tie_default: ClassVar[bool] = False  # tie_word_embeddings when config.json does not say
    # --- tensors
    head_rows: ClassVar[tuple[TensorRow, ...]] = DECODER_HEAD
    layer_rows: ClassVar[tuple[TensorRow, ...]] = DECODER_LAYER
    tail_rows: ClassVar[tuple[TensorRow, ...]] = DECODER_TAIL
    permute_qk: ClassVar[bool] = False  # llama.cpp runs this architecture with NORM-style rope
    # --- GGUF keys that differ by family (the converter's own choices, tests/test_gguf_keys.py)
    # Whether the converter always writes {arch}.attention.key_length/value_length: it reads config.json
    # through transformers, whose config class for this family always defines head_dim.
    gguf_head_dim_keys: ClassVar[bool] = False
    # Whether tokenizer.ggml.add_space_prefix is written when tokenizer_config.json states add_prefix_space.
    gguf_add_space_prefix: ClassVar[bool] = False
    # --- ONNX: onnxruntime-genai's builder maps this architecture onto its GroupQueryAttention decoder
    onnx_builder: ClassVar[bool] = True
    onnx_precisions: ClassVar[tuple[str, ...] | None] = None  # None: every precision the builder writes
    # why only `onnx_precisions` (the refusal of another precision says it)
    onnx_precisions_reason: ClassVar[str] = "kiln writes that graph itself; onnxruntime-genai's builder does not take the family"
    # `--extra_options KEY=VALUE` the builder always needs for this family (kiln.export.onnx adds its own)
    onnx_builder_options: ClassVar[tuple[str, ...]] = ()
    # The builder stores every (Skip)SimplifiedLayerNormalization weight as this offset + w (its add_offset, for
    # families whose RMSNorm applies (1 + w)); kiln.verify.onnx_weights subtracts it reading the weights back.
    onnx_norm_offset: ClassVar[float] = 0.0
    # --- calibration (None: GPTQ / imatrix do not support the family)
    gptq_groups: ClassVar[tuple[tuple[str, ...], ...] | None] = DECODER_GPTQ_GROUPS
    imatrix_hooks: ClassVar[dict[str, tuple[str, ...]] | None] = DECODER_IMATRIX_HOOKS
    # A hybrid decoder's layers of another kind (ModelSpec.layer_types entry -> its groups / hooks); a layer whose
    # kind is not listed uses gptq_groups / imatrix_hooks.
    gptq_groups_by_kind: ClassVar[dict[str, tuple[tuple[str, ...], ...]]] = {}
    imatrix_hooks_by_kind: ClassVar[dict[str, dict[str, tuple[str, ...]]]] = {}

    # ------------------------------------------------------------------ config
    @classmethod
    def default_head_dim(cls, hidden: int, heads: int) -> int:
        """head_dim when config.json leaves it out: what the family's transformers config defaults to."""
        return hidden // heads

    @classmethod
    def has_attention_bias(cls, config: dict[str, Any]) -> bool:
        return cls.attention_bias if cls.attention_bias is not None else bool(config.get("attention_bias", False))

    @classmethod
    def read_spec(cls, directory: Path, config: dict[str, Any], architecture: str) -> ModelSpec:
        """The ModelSpec of a checkpoint directory whose config.json this family reads."""
        path = directory / "config.json"
        hidden = _int(config, "hidden_size", path)
        heads = _int(config, "num_attention_heads", path)
        head_dim = _int(config, "head_dim", path, default=cls.default_head_dim(hidden, heads))
        kv_heads = _int(config, "num_key_value_heads", path, default=heads)
        if heads % kv_heads:
            raise KilnError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        eps = config.get("rms_norm_eps")
        if not isinstance(eps, (int, float)) or eps <= 0:
            raise KilnError(f"{path}: required key 'rms_norm_eps' is missing or not positive")
        rope_block = config.get("rope_parameters") or {}
        theta = config.get("rope_theta", rope_block.get("rope_theta") if isinstance(rope_block, dict) else None)
        if theta is None:
            theta = 10000.0  # transformers' default for these families
        vocab = _int(config, "vocab_size", path)
        _int(config, "max_position_embeddings", path)
        return ModelSpec(
            family=cls.name,
            hf_architecture=architecture,
            source=directory,
            n_layers=_int(config, "num_hidden_layers", path),
            hidden_size=hidden,
            intermediate_size=_int(config, "intermediate_size", path),
            n_heads=heads,
            n_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            rms_norm_eps=float(eps),
            rope_theta=float(theta),
            context_length=config["max_position_embeddings"],
            rope=rope_mod.from_config(config, str(path)),
            tie_embeddings=bool(config.get("tie_word_embeddings", cls.tie_default)),
            attention_bias=cls.has_attention_bias(config),
            qk_norm=cls.qk_norm,
            tokenizer=read_tokenizer(directory, vocab),
            name=config.get("_name_or_path") or directory.name,
            license=_license(directory),
            config=config,
        )

    # ------------------------------------------------------------------ ONNX (onnxruntime-genai's builder)
    @classmethod
    def onnx_builder_config(cls, staged: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        """config.json as the builder must read it (staged beside the checkpoint's own weight files), from
        kiln's staged text config (`staged`: the rope settings to build with) and the checkpoint's config.json
        (`source`). The staged config itself for a family the builder takes as transformers saves it."""
        return staged

    # ------------------------------------------------------------------ tensors
    @classmethod
    def _applies(cls, row: TensorRow, spec: ModelSpec) -> bool:
        if row.when is None:
            return True
        if row.when == "untied":
            return not spec.tie_embeddings
        return bool(getattr(spec, row.when))

    @classmethod
    def _in_layer(cls, row: TensorRow, spec: ModelSpec, layer: int) -> bool:
        """Whether a per-layer row applies to layer `layer` (a row for one layer kind: that kind's layers)."""
        return row.layers is None or spec.layer_types[layer] == row.layers

    @classmethod
    def _shape(cls, row: TensorRow, spec: ModelSpec) -> tuple[int, ...]:
        """The row's tensor as written: a stacked row's shape has the expert count in front."""
        one = row.shape(spec)
        return (getattr(spec, row.experts), *one) if row.experts else one

    @classmethod
    def tensors(cls, spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...], TensorRow]]:
        """(HF name, GGUF name, shape, row) of every tensor the GGUF holds, in write order. For a stacked
        row the HF name keeps its "{e}" (`sources` names the checkpoint's tensors) and the shape is the
        stack's."""
        out = [(r.hf, r.gguf, cls._shape(r, spec), r) for r in cls.head_rows if cls._applies(r, spec)]
        for i in range(spec.n_layers):
            out += [(f"model.layers.{i}.{r.hf}", f"blk.{i}.{r.gguf}", cls._shape(r, spec), r)
                    for r in cls.layer_rows if cls._applies(r, spec) and cls._in_layer(r, spec, i)]
        out += [(r.hf, r.gguf, cls._shape(r, spec), r) for r in cls.tail_rows if cls._applies(r, spec)]
        return out

    @classmethod
    def _fused_name(cls, hf: str, row: TensorRow) -> str | None:
        """The fused tensor a stacked row's HF name (with "{e}") is part of, in the same layer."""
        return None if row.fused is None else hf[: len(hf) - len(row.hf)] + row.fused[0]

    @classmethod
    def sources(cls, spec: ModelSpec, names: Collection[str] = ()) -> list[tuple[str, tuple[int, ...], str]]:
        """(HF tensor name, shape, what it is) of every tensor the checkpoint must hold, in write order.

        A stacked row needs one tensor per expert ("layer 3, expert 7"), or, when the checkpoint (`names`)
        holds its fused tensor and not the first expert's, that fused tensor (once for all its parts).
        """
        names = set(names)
        out: list[tuple[str, tuple[int, ...], str]] = []
        seen: set[str] = set()
        for hf, _, shape, row in cls.tensors(spec):
            if not row.experts:
                out.append((cls.checkpoint_name(hf, spec), row.hf_shape(spec) if row.hf_shape else shape, ""))
                continue
            layer = hf.split(".")[2]
            fused = cls._fused_name(hf, row)
            if fused is not None and fused in names and hf.format(e=0) not in names:
                if fused not in seen:
                    seen.add(fused)
                    parts = row.fused[2]
                    out.append((fused, (shape[0], parts * shape[1], *shape[2:]), f"layer {layer}"))
                continue
            out += [(hf.format(e=e), shape[1:], f"layer {layer}, expert {e}") for e in range(shape[0])]
        return out

    @classmethod
    def expected_tensors(cls, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape, checked before any export (a wrong shape fails with its name)."""
        return {hf: shape for hf, shape, _ in cls.sources(spec)}

    @classmethod
    def load_tensor(cls, tensors: Any, hf: str, spec: ModelSpec) -> np.ndarray:
        """The float32 tensor `hf` (a `tensors()` name) from a checkpoint's tensors (kiln.checkpoint's
        TensorSource): a stacked row's experts stacked, or its part of the fused tensor."""
        row = cls._row(hf)
        if row is None or not row.experts:
            return tensors.load(cls.checkpoint_name(hf, spec))
        n = int(getattr(spec, row.experts))
        fused = cls._fused_name(hf, row)
        if fused is not None and fused in tensors and hf.format(e=0) not in tensors:
            _, part, parts = row.fused
            w = tensors.load(fused)
            rows = w.shape[1] // parts
            return np.ascontiguousarray(w[:, part * rows:(part + 1) * rows])
        out = np.empty((n, *tensors.shape(hf.format(e=0))), np.float32)  # one stack in memory, not two
        for e in range(n):
            out[e] = tensors.load(hf.format(e=e))
        return out

    @classmethod
    def checkpoint_name(cls, hf: str, spec: ModelSpec) -> str:
        """The name a `tensors()` HF name has in the checkpoint (a family with another published layout,
        e.g. a multimodal wrapper's prefix, maps it here)."""
        return hf

    @classmethod
    def export_warnings(cls, spec: ModelSpec, names: Collection[str]) -> list[str]:
        """One line per part of the checkpoint (`names`: its tensors) the GGUF leaves out on purpose."""
        return []

    @classmethod
    def position_scope(cls, spec: ModelSpec) -> dict[str, Any]:
        """What the manifest's `rope` record adds about the layers positions reach: a hybrid's recurrent layers
        have no positions, so a baked context or RoPE scaling bounds only its attention layers."""
        return {}

    @classmethod
    def transform_dims(cls, spec: ModelSpec | None = None, header: Any = None) -> dict[str, int]:
        """What the family's row transforms need to know, from a ModelSpec or from a GGUF header."""
        return {}

    @classmethod
    def hf_targets(cls, hf: str, w: np.ndarray, names: Collection[str]) -> list[tuple[str, Any, np.ndarray]]:
        """Where a tensor read back from a GGUF (in HF layout: `from_gguf`) goes in a model whose parameter
        names are `names`: [(parameter, index into it or None for all of it, values)]. A stacked row goes
        to its per-expert parameters, or to its part of the fused one (transformers 5 holds experts fused);
        [] for a tensor the model does not hold."""
        row = cls._row(hf)
        if row is None or not row.experts:
            return [(hf, None, w)] if hf in names else []
        per = [hf.format(e=e) for e in range(w.shape[0])]
        if all(p in names for p in per):
            return [(p, None, w[e]) for e, p in enumerate(per)]
        fused = cls._fused_name(hf, row)
        if fused is not None and fused in names:
            _, part, _ = row.fused
            rows = w.shape[1]
            return [(fused, (slice(None), slice(part * rows, (part + 1) * rows)), w)]
        raise KilnError(f"{hf}: the model holds neither its per-expert tensors nor {fused or 'a fused tensor'}")

    @classmethod
    def gguf_name(cls, hf_name: str) -> str:
        for r in (*cls.head_rows, *cls.tail_rows):
            if r.hf == hf_name:
                return r.gguf
        prefix, _, rest = hf_name.partition("model.layers.")
        if prefix == "" and rest:
            index, _, suffix = rest.partition(".")
            for r in cls.layer_rows:
                if r.hf == suffix:
                    return f"blk.{index}.{r.gguf}"
        raise KeyError(hf_name)

    @classmethod
    def hf_name(cls, gguf_tensor: str) -> str | None:
        """Inverse of `gguf_name` (None for generated tensors such as rope_freqs)."""
        for r in (*cls.head_rows, *cls.tail_rows):
            if r.gguf == gguf_tensor:
                return r.hf
        if gguf_tensor.startswith("blk."):
            index, _, suffix = gguf_tensor[4:].partition(".")
            for r in cls.layer_rows:
                if r.gguf == suffix:
                    return f"model.layers.{index}.{r.hf}"
        return None

    @classmethod
    def _row(cls, hf_name: str) -> TensorRow | None:
        suffix = hf_name.split(".", 3)[3] if hf_name.startswith("model.layers.") else hf_name
        rows = cls.layer_rows if hf_name.startswith("model.layers.") else (*cls.head_rows, *cls.tail_rows)
        return next((r for r in rows if r.hf == suffix), None)

    @classmethod
    def to_gguf(cls, hf_name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
        """The HF tensor as the GGUF stores it (llama's q/k rows interleaved for NORM rope)."""
        row = cls._row(hf_name)
        if cls.permute_qk and row is not None and row.permute:
            return permute_rows(w, getattr(spec, row.permute))
        if row is not None and row.transform:
            return getattr(cls, f"transform_{row.transform}")(w, cls.transform_dims(spec=spec), False)
        return w

    @classmethod
    def from_gguf(cls, hf_name: str, w: np.ndarray, n_heads: int, n_kv_heads: int,
                  header: Any = None) -> np.ndarray:
        """Inverse of `to_gguf` for a tensor read back from a GGUF (verification's dequantized model);
        `header` (kiln.gguf_header.GGUFFile) is the file a row transform reads its dimensions from."""
        row = cls._row(hf_name)
        if cls.permute_qk and row is not None and row.permute:
            return unpermute_rows(w, n_heads if row.permute == "n_heads" else n_kv_heads)
        if row is not None and row.transform:
            return getattr(cls, f"transform_{row.transform}")(w, cls.transform_dims(header=header), True)
        return w

    # ------------------------------------------------------------------ calibration (GPTQ, imatrix)
    @classmethod
    def _for_layer(cls, spec: ModelSpec, layer: int, by_kind: dict[str, Any], default: Any, what: str) -> Any:
        """`by_kind`'s entry for the layer's kind in a hybrid decoder, else `default`; None of both: refused."""
        kind = spec.layer_types[layer] if spec.layer_types else None
        found = by_kind.get(kind) if kind is not None else None
        if found is None and default is None:
            raise KilnError(f"{spec.source}: {what} does not support {cls.description or cls.name} layouts")
        return found if found is not None else default

    @classmethod
    def gptq_layer_groups(cls, spec: ModelSpec, layer: int) -> tuple[tuple[str, ...], ...]:
        """GPTQ's sequential groups for decoder layer `layer` (by its kind in a hybrid decoder)."""
        return cls._for_layer(spec, layer, cls.gptq_groups_by_kind, cls.gptq_groups, "GPTQ")

    @classmethod
    def imatrix_layer_hooks(cls, spec: ModelSpec, layer: int) -> dict[str, tuple[str, ...]]:
        """The imatrix's hooked modules -> GGUF tensors sharing that input, for decoder layer `layer`."""
        return cls._for_layer(spec, layer, cls.imatrix_hooks_by_kind, cls.imatrix_hooks, "imatrix")

    @classmethod
    def fused_expert(cls, suffix: str) -> tuple[str, int, int] | None:
        """For a per-expert linear ("mlp.experts.{e}.gate_proj"): (fused parameter suffix, part, parts) of the
        layout transformers 5 holds it in (`TensorRow.fused`), or None."""
        row = cls._row(f"model.layers.0.{suffix}.weight")
        return None if row is None else row.fused

    @classmethod
    def expert_inputs(cls, experts: Any, hidden: Any, top_k_index: Any, wanted: Collection[str]):
        """Yield (expert, {fused parameter name: the input its matrix multiplies}) for every expert that
        `top_k_index` routes a token to, from a fused experts module's call (hidden [tokens, width])."""
        raise KilnError(f"{cls.name}: no mixture of experts")

    @classmethod
    def gguf_column_order(cls, hf: str, spec: ModelSpec) -> np.ndarray | None:
        """For a linear's weight `hf` (a `tensors()` name): the checkpoint column each GGUF column holds, where
        the row's transform reorders input columns (Qwen3.5's ssm_out: value heads tiled); None where the GGUF
        keeps the checkpoint's column order. GPTQ groups and imatrix entries follow the GGUF order: it is the one
        llama.cpp's blocks and quantizer see. Found by sending column indices through `to_gguf`."""
        row = cls._row(hf)
        if row is None or row.transform is None or row.experts:
            return None
        shape = row.hf_shape(spec) if row.hf_shape else row.shape(spec)
        if len(shape) != 2:
            return None
        dims = cls.transform_dims(spec=spec)
        key = (cls, row.hf, tuple(shape), tuple(sorted(dims.items())))
        if key not in _COLUMN_ORDERS:
            idx = np.ascontiguousarray(np.broadcast_to(np.arange(shape[1], dtype=np.float32), shape))
            out = np.asarray(cls.to_gguf(hf, idx, spec))
            order = out[0].astype(np.int64)
            if out.shape != tuple(shape) or not np.array_equal(out, np.broadcast_to(out[0], out.shape)) \
                    or not np.array_equal(np.sort(order), np.arange(shape[1])):
                raise KilnError(f"{hf}: its GGUF transform is not a row and column permutation")
            _COLUMN_ORDERS[key] = None if np.array_equal(order, np.arange(shape[1])) else order
        return _COLUMN_ORDERS[key]

    # ------------------------------------------------------------------ cost model
    @classmethod
    def weight_shapes(cls, config: dict[str, Any], tied: bool) -> list[tuple[str, str, int | None, int, int]]:
        """(GGUF name, llama.cpp tensor category, layer, columns, rows) of every weight, from a config alone."""
        d, n_layers, v = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])
        out: list[tuple[str, str, int | None, int, int]] = [("token_embd", "token_embd", None, d, v)]
        for i in range(n_layers):
            out += [(f"blk.{i}.{name}", category, i, ne0, rows)
                    for name, category, ne0, rows in cls.layer_weight_tensors(config)]
        out.append(("output_norm", "norm", None, 1, d))
        if not tied:
            out.append(("output", "output", None, d, v))
        return out

    @classmethod
    def kv_layer_count(cls, config: dict[str, Any]) -> int:
        """Layers that keep K and V per token (all of a plain decoder's), from a config alone."""
        return int(config["num_hidden_layers"])

    @classmethod
    def recurrent_state_bytes(cls, config: dict[str, Any]) -> int:
        """Bytes of fixed per-sequence state (recurrent layers), independent of context; 0 for attention only."""
        return 0

    @classmethod
    def layer_weight_tensors(cls, config: dict[str, Any]) -> list[tuple[str, str, int, int]]:
        """(GGUF suffix, llama.cpp tensor category, columns, rows) of one layer's matrices and the
        per-layer vector groups, from a config alone (kiln plan reads no weights)."""
        d, h = int(config["hidden_size"]), int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or h)
        hd = int(config.get("head_dim") or cls.default_head_dim(d, h))
        ff = int(config["intermediate_size"])
        out = [("attn_q", "attn_q", d, h * hd), ("attn_k", "attn_k", d, kv * hd), ("attn_v", "attn_v", d, kv * hd),
               ("attn_output", "attn_output", h * hd, d), ("ffn_gate", "ffn_gate", d, ff),
               ("ffn_up", "ffn_up", d, ff), ("ffn_down", "ffn_down", ff, d), ("norms", "norm", 1, 2 * d)]
        if cls.has_attention_bias(config):
            out.append(("qkv_bias", "bias", 1, (h + 2 * kv) * hd))
        if cls.qk_norm:
            out.append(("qk_norm", "norm", 1, 2 * hd))
        return out
