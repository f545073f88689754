"""Qwen3.5 (dense: Qwen3.5-0.8B/2B/4B/9B): Gated DeltaNet linear attention mixed with gated full attention.

Layers are of two kinds (`layer_types` in the config): "linear_attention" (a Gated DeltaNet: a causal
depthwise conv over q/k/v, then a gated delta-rule recurrence with one state per value head) and
"full_attention" (Qwen3's attention with q/k norms, the query projection twice as wide: query and a sigmoid
gate per head), usually three linear layers per full one. Rotary positions are partial (a quarter of each
head) and interleaved MRoPE; for text every section sees the same position. RMSNorm weights are stored as
w and applied as (1 + w), except the DeltaNet's gated output norm.

The tensors go to llama.cpp's `qwen35` as its converter writes them (conversion/qwen.py, Qwen3_5TextModel):
per-layer-kind rows (`TensorRow.layers`) and row transforms (`TensorRow.transform`): A_log -> -exp(A_log),
the (1 + w) norms stored as 1 + w, the conv1d kernel squeezed to [channels, kernel], and the value heads
reordered from grouped-by-key-head to tiled when there are more value heads than key heads (ggml broadcasts
tiled). Published checkpoints are `Qwen3_5ForConditionalGeneration` (the text model under
`model.language_model.`, a vision tower that the GGUF leaves out) or `Qwen3_5ForCausalLM`.

Published checkpoints also hold a multi-token prediction (MTP) head beside the text model (`mtp.*`, which
transformers neither runs nor saves): a projection of [embedding; hidden] (`mtp.fc`) after two norms, one
full-attention decoder layer (`mtp.layers.0.*`) and a final norm. The converter writes it by default
(conversion/qwen.py, _QwenMtpMixin) as extra blocks after the last layer: block_count grows by
`mtp_num_hidden_layers` ({arch}.nextn_predict_layers), the layer as `blk.{n}.*` (a full-attention layer, not
recurrent), fc / the norms as `blk.{n}.nextn.eh_proj` / `enorm` / `hnorm` / `shared_head_norm` (norms 1 + w).
kiln writes exactly that when the checkpoint holds `mtp.*` tensors, and the converter's `--no-mtp` output when
it holds none (a checkpoint saved by transformers). llama.cpp skips the blocks when decoding (they load only
for its MTP draft graph) and keeps no K/V or state for them, so the cost model counts their weights only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kiln.checkpoint.spec import ModelSpec
from kiln.errors import KilnError
from kiln.families.base import DECODER_HEAD, DECODER_TAIL, Family, TensorRow, _int
from kiln.families.registry import register

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_KINDS = (LINEAR, FULL)


def _conv_dim(s: ModelSpec) -> int:
    return 2 * s.linear_k_heads * s.linear_k_dim + s.linear_v_heads * s.linear_v_dim


def _v(s: ModelSpec) -> int:
    return s.linear_v_heads * s.linear_v_dim


def _L(hf: str, gguf: str, shape, transform: str | None = None, **kw) -> TensorRow:
    return TensorRow(hf, gguf, shape, layers=LINEAR, transform=transform, **kw)


def _F(hf: str, gguf: str, shape, transform: str | None = None) -> TensorRow:
    return TensorRow(hf, gguf, shape, layers=FULL, transform=transform)


QWEN35_LAYER: tuple[TensorRow, ...] = (
    TensorRow("input_layernorm.weight", "attn_norm.weight", lambda s: (s.hidden_size,), transform="plus_one"),
    _L("linear_attn.A_log", "ssm_a", lambda s: (s.linear_v_heads,), "neg_exp"),
    _L("linear_attn.conv1d.weight", "ssm_conv1d.weight", lambda s: (_conv_dim(s), s.linear_conv_kernel), "conv",
       f32=True, hf_shape=lambda s: (_conv_dim(s), 1, s.linear_conv_kernel)),
    _L("linear_attn.dt_bias", "ssm_dt.bias", lambda s: (s.linear_v_heads,), "v_heads"),
    _L("linear_attn.in_proj_a.weight", "ssm_alpha.weight", lambda s: (s.linear_v_heads, s.hidden_size), "v_heads"),
    _L("linear_attn.in_proj_b.weight", "ssm_beta.weight", lambda s: (s.linear_v_heads, s.hidden_size), "v_heads"),
    _L("linear_attn.in_proj_qkv.weight", "attn_qkv.weight", lambda s: (_conv_dim(s), s.hidden_size), "qkv"),
    _L("linear_attn.in_proj_z.weight", "attn_gate.weight", lambda s: (_v(s), s.hidden_size), "v_rows"),
    _L("linear_attn.norm.weight", "ssm_norm.weight", lambda s: (s.linear_v_dim,)),
    _L("linear_attn.out_proj.weight", "ssm_out.weight", lambda s: (s.hidden_size, _v(s)), "v_cols"),
    TensorRow("mlp.down_proj.weight", "ffn_down.weight", lambda s: (s.hidden_size, s.intermediate_size)),
    TensorRow("mlp.gate_proj.weight", "ffn_gate.weight", lambda s: (s.intermediate_size, s.hidden_size)),
    TensorRow("mlp.up_proj.weight", "ffn_up.weight", lambda s: (s.intermediate_size, s.hidden_size)),
    TensorRow("post_attention_layernorm.weight", "post_attention_norm.weight", lambda s: (s.hidden_size,),
              transform="plus_one"),
    _F("self_attn.k_norm.weight", "attn_k_norm.weight", lambda s: (s.head_dim,), "plus_one"),
    _F("self_attn.k_proj.weight", "attn_k.weight", lambda s: (s.n_kv_heads * s.head_dim, s.hidden_size)),
    _F("self_attn.o_proj.weight", "attn_output.weight", lambda s: (s.hidden_size, s.n_heads * s.head_dim)),
    _F("self_attn.q_norm.weight", "attn_q_norm.weight", lambda s: (s.head_dim,), "plus_one"),
    # query and its output gate, per head: twice the query width
    _F("self_attn.q_proj.weight", "attn_q.weight", lambda s: (2 * s.n_heads * s.head_dim, s.hidden_size)),
    _F("self_attn.v_proj.weight", "attn_v.weight", lambda s: (s.n_kv_heads * s.head_dim, s.hidden_size)),
)
# The MTP head's own tensors, written once in the first MTP block (the converter's _QwenMtpMixin remapper);
# its decoder layer uses the layer rows of a full-attention layer, under `mtp.layers.{j}.`.
QWEN35_MTP: tuple[TensorRow, ...] = (
    TensorRow("mtp.fc.weight", "nextn.eh_proj.weight", lambda s: (s.hidden_size, 2 * s.hidden_size)),
    TensorRow("mtp.pre_fc_norm_embedding.weight", "nextn.enorm.weight", lambda s: (s.hidden_size,),
              transform="plus_one"),
    TensorRow("mtp.pre_fc_norm_hidden.weight", "nextn.hnorm.weight", lambda s: (s.hidden_size,),
              transform="plus_one"),
    TensorRow("mtp.norm.weight", "nextn.shared_head_norm.weight", lambda s: (s.hidden_size,), transform="plus_one"),
)
MTP_PREFIX = "mtp."
QWEN35_TAIL: tuple[TensorRow, ...] = (
    TensorRow("model.norm.weight", "output_norm.weight", lambda s: (s.hidden_size,), transform="plus_one"),
    *(r for r in DECODER_TAIL if r.hf == "lm_head.weight"),
)


def _tiled(w: np.ndarray, axis: int, k_heads: int, per_k: int, head: int, inverse: bool) -> np.ndarray:
    """Value heads grouped by key head [K0v0, K0v1, K1v0, ...] -> tiled [K0v0, K1v0, K0v1, ...] along `axis`
    (llama.cpp's converter, _LinearAttentionVReorderBase._reorder_v_heads), or back."""
    if per_k == 1:
        return w
    w = np.moveaxis(w, axis, 0)
    rest = w.shape[1:]
    src = (k_heads, per_k, head) if not inverse else (per_k, k_heads, head)
    out = w.reshape(*src, *rest).swapaxes(0, 1).reshape(-1, *rest)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _exp32(w: np.ndarray) -> np.ndarray:
    """exp of a float32 tensor as torch computes it (the converter's torch.exp: its float32 exp is not
    correctly rounded, and numpy's differs from it in the last bit), numpy's float64 one rounded without torch."""
    try:
        import torch
    except ImportError:
        return np.exp(w.astype(np.float64)).astype(np.float32)
    return torch.exp(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))).numpy()


@register
class Qwen3_5(Family):
    name = "qwen35"
    description = "a Qwen3.5 checkpoint (Gated DeltaNet hybrid)"
    architectures = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
    qk_norm = True
    gguf_head_dim_keys = True  # Qwen3_5TextConfig always defines head_dim (256 by default)
    head_rows = DECODER_HEAD
    layer_rows = QWEN35_LAYER
    tail_rows = QWEN35_TAIL
    mtp_rows: ClassVar[tuple[TensorRow, ...]] = QWEN35_MTP
    # ONNX: onnxruntime-genai's builder (0.18) takes Qwen3.5 as the published multimodal layout only
    # (Qwen3_5ForConditionalGeneration, the text config nested): `onnx_builder_config` stages that config over the
    # checkpoint's own weight files (transformers reads un-prefixed text tensors into it too), the vision tower left
    # out of the graph. Its DeltaNet layers become com.microsoft CausalConvWithState + LinearAttention nodes with a
    # conv and a recurrent state per layer as inputs/outputs (past.L.conv / past.L.recurrent), which kiln's
    # onnxruntime engine carries per row beside the full-attention layers' K/V; positions are a [3, batch, seq]
    # position_ids input (MRoPE). Every precision the builder writes (fp32/int8/int4 on CPU, fp16 for CUDA).
    onnx_builder = True
    onnx_precisions = None
    # the embedding inside the graph (the builder's multimodal default leaves it out), no MTP graph (mtp.onnx)
    onnx_builder_options: ClassVar[tuple[str, ...]] = ("exclude_embeds=false", "exclude_mtp=true")
    onnx_norm_offset: ClassVar[float] = 1.0  # the (1 + w) RMSNorms, stored as 1 + w (GatedRMSNorm's w as it is)
    # GPTQ / imatrix: the full-attention layers as any decoder's (gptq_groups / imatrix_hooks: the base's), the
    # DeltaNet layers by their own linears: q/k/v, z, b and a read the normed hidden state (one group, one input),
    # out_proj the gated norm's output; every layer's MLP as a dense decoder's. llama.cpp's quantizer quantizes all of
    # these (attn_qkv, attn_gate, ssm_alpha, ssm_beta, ssm_out: 2-D ".weight" names it does not exempt); it keeps
    # ssm_conv1d, ssm_a, ssm_dt and the norms as they are, and GPTQ does not touch them.
    gptq_groups_by_kind = {LINEAR: (
        ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a"),
        ("linear_attn.out_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )}
    imatrix_hooks_by_kind = {LINEAR: {
        "linear_attn.in_proj_qkv": ("attn_qkv", "attn_gate", "ssm_beta", "ssm_alpha"),
        "linear_attn.out_proj": ("ssm_out",),
        "mlp.gate_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",),
    }}
    # The published multimodal layout: the text model's tensors under this prefix instead of "model.".
    multimodal_prefix: ClassVar[str] = "model.language_model."
    default_mrope_section: ClassVar[tuple[int, ...]] = (11, 11, 10)  # transformers' and the converter's

    @classmethod
    def default_head_dim(cls, hidden: int, heads: int) -> int:
        return 256  # Qwen3_5TextConfig's default

    @classmethod
    def text_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The text model's config: config.json itself, or its `text_config` (Qwen3_5ForConditionalGeneration)."""
        inner = config.get("text_config")
        if not isinstance(inner, dict):
            return config
        merged = dict(inner)
        if "tie_word_embeddings" not in merged and "tie_word_embeddings" in config:
            merged["tie_word_embeddings"] = config["tie_word_embeddings"]
        for key in ("_name_or_path",):
            if key in config and key not in merged:
                merged[key] = config[key]
        return merged

    @classmethod
    def read_spec(cls, directory: Path, config: dict[str, Any], architecture: str) -> ModelSpec:
        path = directory / "config.json"
        text = cls.text_config(config)
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise KilnError(f"{path}: rope_parameters must be an object, got {rope!r}")
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            raise KilnError(f"{path}: rope scaling {rope.get('rope_type') or rope.get('type')!r} with Qwen3.5's "
                            "MRoPE is not supported")
        spec = super().read_spec(directory, text, architecture)
        n = spec.n_layers
        interval = _int(text, "full_attention_interval", path, default=4)
        types = text.get("layer_types")
        if types is None:
            types = [LINEAR if (i + 1) % interval else FULL for i in range(n)]
        if not isinstance(types, list) or len(types) != n:
            raise KilnError(f"{path}: layer_types has {len(types) if isinstance(types, list) else '?'} entries, "
                            f"num_hidden_layers is {n}")
        for i, t in enumerate(types):
            if t not in LAYER_KINDS:
                raise KilnError(f"{path}: layer {i}: layer type {t!r} is neither {LINEAR!r} nor {FULL!r}")
        k_heads = _int(text, "linear_num_key_heads", path, default=16)
        v_heads = _int(text, "linear_num_value_heads", path, default=32)
        if v_heads % k_heads:
            raise KilnError(f"{path}: linear_num_value_heads {v_heads} is not a multiple of "
                            f"linear_num_key_heads {k_heads}")
        partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
        rope_dim = int(spec.head_dim * float(partial))
        sections = tuple(rope.get("mrope_section") or cls.default_mrope_section)
        spec = replace(
            spec, layer_types=tuple(types), full_attention_interval=interval,
            linear_conv_kernel=_int(text, "linear_conv_kernel_dim", path, default=4),
            linear_k_heads=k_heads, linear_v_heads=v_heads,
            linear_k_dim=_int(text, "linear_key_head_dim", path, default=128),
            linear_v_dim=_int(text, "linear_value_head_dim", path, default=128),
            rope_dim=rope_dim, rope_sections=(*sections, *(0,) * (4 - len(sections))),
            mtp_layers=cls.mtp_layer_count(directory, text))
        spec = cls.refine_spec(spec, text, path)
        count = sum(int(np.prod(shape)) for _, _, shape, _ in cls.tensors(spec))
        return replace(spec, param_count=count)

    @classmethod
    def onnx_builder_config(cls, staged: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
        """The multimodal layout the builder reads (its only Qwen3.5 entry): the staged text config nested as
        `text_config` under the family's ConditionalGeneration architecture, the source's vision config (its
        tensors load with it), or a one-block stand-in for a checkpoint that has none (left out of the graph)."""
        tie = bool(staged.get("tie_word_embeddings", cls.tie_default))
        # tie_word_embeddings in both configs: transformers ties by the text config's (default False)
        text = {**{k: v for k, v in staged.items() if k != "architectures"}, "tie_word_embeddings": tie}
        kind = str(text.get("model_type") or "")
        vision = source.get("vision_config")
        if not isinstance(vision, dict):
            vision = {"depth": 1, "hidden_size": 16, "num_heads": 1, "intermediate_size": 16,
                      "out_hidden_size": staged.get("hidden_size")}
        return {"architectures": [next(a for a in cls.architectures if a.endswith("ForConditionalGeneration"))],
                "model_type": kind[:-len("_text")] if kind.endswith("_text") else kind,
                "text_config": text, "vision_config": vision,
                "tie_word_embeddings": tie}

    @classmethod
    def refine_spec(cls, spec: ModelSpec, text: dict[str, Any], path: Path) -> ModelSpec:
        """What a refining family (Qwen3.5-MoE: its experts) adds to the spec before the tensors are counted."""
        return spec

    # ------------------------------------------------------------------ multi-token prediction head
    @staticmethod
    def _weight_names(directory: Path) -> list[str]:
        """The checkpoint's tensor names from its safetensors index or headers (no tensor data read); [] for
        pickle weights or none (their reader says what is wrong; a pickled MTP head is left out, with a warning)."""
        from kiln.checkpoint.tensors import find_weight_files, open_safetensors
        from kiln.jsonfile import read_json_object

        try:
            kind, files = find_weight_files(directory, allow_pickle=True)
        except KilnError:
            return []
        if kind != "safetensors":
            return []
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json_object(index).get("weight_map")
            return list(weight_map) if isinstance(weight_map, dict) else []
        return open_safetensors(files).names()

    @classmethod
    def mtp_layer_count(cls, directory: Path, text: dict[str, Any]) -> int:
        """MTP blocks to write: none when the checkpoint holds no `mtp.*` tensor (what transformers saves), else
        `mtp_num_hidden_layers` as the converter reads it (counted from the `mtp.layers.N` tensors when the config
        leaves it out); a block the config promises and the tensors lack fails as a missing tensor."""
        names = [n for n in cls._weight_names(directory) if n.startswith(MTP_PREFIX)]
        if not names:
            return 0
        stated = cls.mtp_config_layers(text)
        if stated:
            return stated
        found = {int(p[2]) for p in (n.split(".", 3) for n in names)
                 if len(p) == 4 and p[1] == "layers" and p[2].isdecimal()}
        if not found:
            raise KilnError(f"{directory}: the checkpoint holds {len(names)} mtp.* tensors but no mtp.layers.N "
                            "block and config.json states no mtp_num_hidden_layers: cannot tell how many "
                            "multi-token prediction layers it has")
        return max(found) + 1

    @classmethod
    def tensors(cls, spec: ModelSpec) -> list[tuple[str, str, tuple[int, ...], TensorRow]]:
        """The base table, with the MTP blocks (when the checkpoint has them) after the last decoder layer and
        before the output norm: each a full-attention layer `mtp.layers.{j}.*` -> `blk.{n_layers + j}.*`, the
        first also holding the head's own tensors (fc, its two norms, the final norm)."""
        out = super().tensors(spec)
        if not spec.mtp_layers:
            return out
        tail = sum(1 for r in cls.tail_rows if cls._applies(r, spec))
        mtp: list[tuple[str, str, tuple[int, ...], TensorRow]] = []
        for j in range(spec.mtp_layers):
            block = spec.n_layers + j
            mtp += [(f"{MTP_PREFIX}layers.{j}.{r.hf}", f"blk.{block}.{r.gguf}", cls._shape(r, spec), r)
                    for r in cls.layer_rows if cls._applies(r, spec) and r.layers in (None, FULL)]
            if j == 0:
                mtp += [(r.hf, f"blk.{block}.{r.gguf}", cls._shape(r, spec), r) for r in cls.mtp_rows]
        return out[:len(out) - tail] + mtp + out[len(out) - tail:]

    @classmethod
    def _row(cls, hf_name: str) -> TensorRow | None:
        if hf_name.startswith(f"{MTP_PREFIX}layers."):
            suffix = hf_name.split(".", 3)[3]
            return next((r for r in cls.layer_rows if r.hf == suffix and r.layers in (None, FULL)), None)
        if hf_name.startswith(MTP_PREFIX):
            return next((r for r in cls.mtp_rows if r.hf == hf_name), None)
        return super()._row(hf_name)

    @classmethod
    def hf_targets(cls, hf: str, w: np.ndarray, names) -> list[tuple[str, Any, np.ndarray]]:
        """An MTP block read back from a GGUF (blk.{n_layers}.*, named as a decoder layer by `hf_name`) has no
        parameter in the transformers model, which holds no MTP head: nothing to copy."""
        if hf.startswith("model.layers.") and f"model.layers.{hf.split('.')[2]}.input_layernorm.weight" not in names:
            return []
        return super().hf_targets(hf, w, names)

    @classmethod
    def layer_kinds_from_tensors(cls, spec: ModelSpec, names: set[str]) -> None:
        """A layer whose tensors are of the other kind than `layer_types` says fails with its index."""
        for i, kind in enumerate(spec.layer_types):
            has_linear = cls.checkpoint_name(f"model.layers.{i}.linear_attn.in_proj_qkv.weight", spec) in names
            has_full = cls.checkpoint_name(f"model.layers.{i}.self_attn.q_proj.weight", spec) in names
            actual = LINEAR if has_linear and not has_full else FULL if has_full and not has_linear else None
            if actual is not None and actual != kind:
                raise KilnError(f"{spec.source}: layer {i}: layer_types says {kind!r}, its tensors are "
                                f"{actual!r} ones")

    @classmethod
    def sources(cls, spec: ModelSpec, names=()) -> list[tuple[str, tuple[int, ...], str]]:
        if names:
            cls.layer_kinds_from_tensors(spec, set(names))
        # a stacked row's "layer N, expert E": the MTP block's own index is not a decoder layer's
        return [(n, shape, f"MTP {what}" if what and n.startswith(MTP_PREFIX) else what)
                for n, shape, what in super().sources(spec, names)]

    @classmethod
    def position_scope(cls, spec: ModelSpec) -> dict[str, Any]:
        full = sum(1 for t in spec.layer_types if t == FULL)
        linear = len(spec.layer_types) - full
        return {"rotary_layers": full, "unpositioned_layers": linear,
                "note": f"the RoPE settings apply to the {full} full-attention layers; the {linear} linear-attention "
                        "(Gated DeltaNet) layers carry no positions and have no position limit"}

    @classmethod
    def export_warnings(cls, spec: ModelSpec, names) -> list[str]:
        out = []
        vision = sum(1 for n in names if n.startswith(("model.visual.", "visual.")))
        if vision:
            out.append(f"the vision tower ({vision} tensor{'s' * (vision != 1)}) is not written: the artifact "
                       "holds the text model only (llama.cpp runs a vision tower from a separate mmproj file)")
        mtp = sum(1 for n in names if n.startswith(("mtp.", "model.mtp.")) and not (spec.mtp_layers and
                                                                               n.startswith(MTP_PREFIX)))
        if mtp:
            out.append(f"the multi-token prediction head ({mtp} tensor{'s' * (mtp != 1)}) is not written "
                       "(as llama.cpp's converter with --no-mtp; it serves speculative decoding only)")
        return out

    @classmethod
    def checkpoint_name(cls, hf: str, spec: ModelSpec) -> str:
        if spec.hf_architecture == "Qwen3_5ForConditionalGeneration" and hf.startswith("model."):
            return cls.multimodal_prefix + hf[len("model."):]
        return hf

    # ------------------------------------------------------------------ row transforms
    @classmethod
    def transform_dims(cls, spec: ModelSpec | None = None, header: Any = None) -> dict[str, int]:
        if spec is not None:
            return {"k_heads": spec.linear_k_heads, "v_heads": spec.linear_v_heads,
                    "k_dim": spec.linear_k_dim, "v_dim": spec.linear_v_dim}
        v_heads = int(header.get(f"{cls.name}.ssm.time_step_rank"))
        return {"k_heads": int(header.get(f"{cls.name}.ssm.group_count")), "v_heads": v_heads,
                "k_dim": int(header.get(f"{cls.name}.ssm.state_size")),
                "v_dim": int(header.get(f"{cls.name}.ssm.inner_size")) // v_heads}

    @staticmethod
    def _v_reorder(w: np.ndarray, axis: int, dims: dict[str, int], head: int, inverse: bool) -> np.ndarray:
        return _tiled(w, axis, dims["k_heads"], dims["v_heads"] // dims["k_heads"], head, inverse)

    @classmethod
    def transform_plus_one(cls, w: np.ndarray, dims: dict[str, int], inverse: bool) -> np.ndarray:
        return w - 1 if inverse else w + 1

    @classmethod
    def transform_neg_exp(cls, w: np.ndarray, dims: dict[str, int], inverse: bool) -> np.ndarray:
        if inverse:
            return cls._v_reorder(np.log(-w.astype(np.float64)).astype(np.float32), 0, dims, 1, True)
        return -_exp32(cls._v_reorder(w, 0, dims, 1, False))

    @classmethod
    def transform_v_heads(cls, w: np.ndarray, dims: dict[str, int], inverse: bool) -> np.ndarray:
        return cls._v_reorder(w, 0, dims, 1, inverse)

    @classmethod
    def transform_v_rows(cls, w: np.ndarray, dims: dict[str, int], inverse: bool) -> np.ndarray:
        return cls._v_reorder(w, 0, dims, dims["v_dim"], inverse)

    @classmethod
    def transform_v_cols(cls, w: np.ndarray, dims: dict[str, int], inverse: bool) -> np.ndarray:
        return cls._v_reorder(w, 1, dims, dims["v_dim"], inverse)

    @classmethod
    def transform_qkv(cls, w: np.ndarray, dims: dict[str, int], inverse: bool) -> np.ndarray:
        """q and k rows as they are, the value rows (after them) reordered."""
        qk = 2 * dims["k_heads"] * dims["k_dim"]
        return np.concatenate([w[:qk], cls._v_reorder(w[qk:], 0, dims, dims["v_dim"], inverse)])

    @classmethod
    def transform_conv(cls, w: np.ndarray, dims: dict[str, int], inverse: bool) -> np.ndarray:
        """[channels, 1, kernel] -> [channels, kernel], value channels reordered (and back)."""
        if not inverse:
            w = w.reshape(w.shape[0], w.shape[-1])
        out = cls.transform_qkv(w, dims, inverse)
        return out[:, None, :] if inverse else out

    # ------------------------------------------------------------------ cost model
    @classmethod
    def weight_shapes(cls, config: dict[str, Any], tied: bool) -> list[tuple[str, str, int | None, int, int]]:
        return super().weight_shapes(cls.text_config(config), tied)

    @classmethod
    def _kinds(cls, text: dict[str, Any]) -> list[str]:
        n = int(text["num_hidden_layers"])
        types = text.get("layer_types")
        if isinstance(types, list) and len(types) == n:
            return [str(t) for t in types]
        interval = int(text.get("full_attention_interval") or 4)  # Qwen3_5TextConfig's default layout
        return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(n)]

    @classmethod
    def _linear_dims(cls, text: dict[str, Any]) -> tuple[int, int, int, int, int]:
        """(key heads, key head dim, value heads, value head dim, conv kernel), transformers' defaults."""
        return (int(text.get("linear_num_key_heads") or 16), int(text.get("linear_key_head_dim") or 128),
                int(text.get("linear_num_value_heads") or 32), int(text.get("linear_value_head_dim") or 128),
                int(text.get("linear_conv_kernel_dim") or 4))

    @classmethod
    def kv_layer_count(cls, config: dict[str, Any]) -> int:
        """Only the gated full-attention layers keep K and V; the DeltaNet layers keep a fixed state."""
        return sum(k == FULL for k in cls._kinds(cls.text_config(config)))

    @classmethod
    def recurrent_state_bytes(cls, config: dict[str, Any]) -> int:
        """Per sequence, per DeltaNet layer, in f32 as llama.cpp keeps it (llama_hparams n_embd_r / n_embd_s):
        the conv window, (kernel - 1) x (q, k and v channels), and the state, one key x value matrix per value head."""
        text = cls.text_config(config)
        nk, dk, nv, dv, kernel = cls._linear_dims(text)
        per_layer = (kernel - 1) * (2 * nk * dk + nv * dv) + nv * dk * dv
        return 4 * per_layer * sum(k == LINEAR for k in cls._kinds(text))

    @classmethod
    def weight_shapes(cls, config: dict[str, Any], tied: bool) -> list[tuple[str, str, int | None, int, int]]:
        """Every weight from a config alone, each layer by its kind (the tensor table's shapes)."""
        text = cls.text_config(config)
        d, v = int(text["hidden_size"]), int(text["vocab_size"])
        h = int(text["num_attention_heads"])
        kv = int(text.get("num_key_value_heads") or h)
        hd = int(text.get("head_dim") or cls.default_head_dim(d, h))
        nk, dk, nv, dv, kernel = cls._linear_dims(text)
        conv = 2 * nk * dk + nv * dv
        mlp = cls._mlp_shapes(text)
        full = [("attn_q", "attn_q", d, 2 * h * hd), ("attn_k", "attn_k", d, kv * hd), ("attn_v", "attn_v", d, kv * hd),
                ("attn_output", "attn_output", h * hd, d), ("norms", "norm", 1, 2 * d + 2 * hd)]
        linear = [("attn_qkv", "attn_qkv", d, conv), ("attn_gate", "attn_q", d, nv * dv),
                  ("ssm_ab", "attn_q", d, 2 * nv), ("ssm_out", "attn_output", nv * dv, d),
                  ("ssm_conv1d", "norm", 1, conv * kernel), ("norms", "norm", 1, 2 * d + dv + 2 * nv)]
        out: list[tuple[str, str, int | None, int, int]] = [("token_embd", "token_embd", None, d, v)]
        for i, kind in enumerate(cls._kinds(text)):
            out += [(f"blk.{i}.{name}", cat, i, ne0, rows) for name, cat, ne0, rows in (full if kind == FULL else linear) + mlp]
        # The MTP blocks a published config states (mtp_num_hidden_layers; a checkpoint saved by transformers has no
        # mtp.* tensors, and its GGUF none: its config rarely states them): a full-attention layer each, the first
        # with the head's projection of [embedding; hidden] and its three norms. In the file, never run by plain
        # decoding (llama.cpp keeps no K/V for them).
        for j in range(cls.mtp_config_layers(text)):
            i = int(text["num_hidden_layers"]) + j
            out += [(f"blk.{i}.{name}", cat, i, ne0, rows) for name, cat, ne0, rows in full + mlp]
            if j == 0:
                out += [(f"blk.{i}.nextn.eh_proj", "nextn", i, 2 * d, d), (f"blk.{i}.nextn.norms", "norm", i, 1, 3 * d)]
        out.append(("output_norm", "norm", None, 1, d))
        if not tied:
            out.append(("output", "output", None, d, v))
        return out

    @classmethod
    def mtp_config_layers(cls, text: dict[str, Any]) -> int:
        """`mtp_num_hidden_layers` when the config states a positive count, else 0."""
        value = text.get("mtp_num_hidden_layers")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    @classmethod
    def _mlp_shapes(cls, text: dict[str, Any]) -> list[tuple[str, str, int, int]]:
        """One layer's feed-forward weights (GGUF suffix, category, columns, rows): Qwen3.5's dense SwiGLU."""
        d, ff = int(text["hidden_size"]), int(text["intermediate_size"])
        return [("ffn_gate", "ffn_gate", d, ff), ("ffn_up", "ffn_up", d, ff), ("ffn_down", "ffn_down", ff, d)]
