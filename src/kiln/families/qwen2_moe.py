"""Qwen2MoeForCausalLM (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention, a routed mixture of experts.

Every layer's MLP is a softmax router over `num_experts` SwiGLU experts, of which the top
`num_experts_per_tok` run on each token, weighted by their router probabilities (not renormalised:
llama.cpp's qwen2moe graph never renormalises), plus one shared SwiGLU expert scaled by a sigmoid
gate. llama.cpp stores each kind of expert matrix as one 3-D tensor, the experts stacked on the first
axis (the stacked `TensorRow`s below); checkpoints hold them one tensor per expert, or (some
transformers 5 checkpoints) fused as `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`, both read.

What llama.cpp cannot run is refused when the config is read, with the reason: dense layers mixed in
(`mlp_only_layers`, `decoder_sparse_step`), top-k renormalisation other than the graph's, and (Qwen2-MoE)
tied embeddings, since llama.cpp's qwen2moe needs its own `output.weight`. onnxruntime-genai's builder has no
Qwen2-MoE / Qwen3-MoE, so ONNX export refuses too. GPTQ and the imatrix visit every expert with the calibration
tokens routed to it (`gptq_groups`, `imatrix_hooks`, `expert_inputs`).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

from kiln.checkpoint.spec import ModelSpec
from kiln.errors import KilnError
from kiln.families.base import DECODER_GPTQ_GROUPS, DECODER_IMATRIX_HOOKS, DECODER_LAYER, Family, TensorRow, _int
from kiln.families.registry import register

# Attention and the two norms: the Llama-shaped layer without its dense MLP.
MOE_ATTENTION: tuple[TensorRow, ...] = tuple(r for r in DECODER_LAYER if not r.hf.startswith("mlp."))
# The router, and the experts stacked on a new first axis (GGUF names from gguf-py's tensor map).
MOE_EXPERTS: tuple[TensorRow, ...] = (
    TensorRow("mlp.gate.weight", "ffn_gate_inp.weight", lambda s: (s.n_experts, s.hidden_size), f32=True),
    TensorRow("mlp.experts.{e}.gate_proj.weight", "ffn_gate_exps.weight", lambda s: (s.expert_ff, s.hidden_size),
              experts="n_experts", fused=("mlp.experts.gate_up_proj", 0, 2)),
    TensorRow("mlp.experts.{e}.up_proj.weight", "ffn_up_exps.weight", lambda s: (s.expert_ff, s.hidden_size),
              experts="n_experts", fused=("mlp.experts.gate_up_proj", 1, 2)),
    TensorRow("mlp.experts.{e}.down_proj.weight", "ffn_down_exps.weight", lambda s: (s.hidden_size, s.expert_ff),
              experts="n_experts", fused=("mlp.experts.down_proj", 0, 1)),
)
# Qwen2-MoE's shared expert and its sigmoid gate ([1, hidden]: llama.cpp reads it as a vector).
SHARED_EXPERT: tuple[TensorRow, ...] = (
    TensorRow("mlp.shared_expert_gate.weight", "ffn_gate_inp_shexp.weight", lambda s: (1, s.hidden_size),
              "shared_expert", f32=True),
    TensorRow("mlp.shared_expert.gate_proj.weight", "ffn_gate_shexp.weight",
              lambda s: (s.shared_expert_ff, s.hidden_size), "shared_expert"),
    TensorRow("mlp.shared_expert.up_proj.weight", "ffn_up_shexp.weight",
              lambda s: (s.shared_expert_ff, s.hidden_size), "shared_expert"),
    TensorRow("mlp.shared_expert.down_proj.weight", "ffn_down_shexp.weight",
              lambda s: (s.hidden_size, s.shared_expert_ff), "shared_expert"),
)


@register
class Qwen2Moe(Family):
    name = "qwen2moe"
    description = "a Qwen2-MoE checkpoint (mixture of experts)"
    architectures = ("Qwen2MoeForCausalLM",)
    layer_rows = (*MOE_ATTENTION, *MOE_EXPERTS, *SHARED_EXPERT)
    onnx_builder = False  # onnxruntime-genai's builder has no Qwen2-MoE (its CPU MoE ops are another family's)
    onnx_precisions = ()  # so `kiln export onnx` refuses before reading the checkpoint
    # GPTQ: attention as any decoder's, then the MLP: the shared expert's and every routed expert's gate/up (one
    # group: they read the same normed hidden state, each expert only the tokens routed to it), then the downs.
    # The routers (and the shared expert's gate) stay float32, as llama.cpp's quantizer keeps them.
    gptq_groups = (*DECODER_GPTQ_GROUPS[:2],
                   ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                    "mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
                   ("mlp.shared_expert.down_proj", "mlp.experts.{e}.down_proj"))
    # imatrix: the routers read the shared expert's input (llama-imatrix collects them too: plain products).
    imatrix_hooks = {**{k: v for k, v in DECODER_IMATRIX_HOOKS.items() if k.startswith("self_attn.")},
                     "mlp.shared_expert.gate_proj": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_gate_inp",
                                                     "ffn_gate_inp_shexp"),
                     "mlp.shared_expert.down_proj": ("ffn_down_shexp",),
                     "mlp.experts.{e}.gate_proj": ("ffn_gate_exps", "ffn_up_exps"),
                     "mlp.experts.{e}.down_proj": ("ffn_down_exps",)}
    # Whether llama.cpp's graph renormalises the top-k routing weights (qwen2moe: never; qwen3moe: always).
    renormalises_top_k: ClassVar[bool] = False
    # transformers' config defaults, for keys a config.json leaves out (the converter reads them the same way).
    moe_defaults: ClassVar[dict[str, int]] = {"num_experts": 60, "num_experts_per_tok": 4,
                                             "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632}
    shared_expert_key: ClassVar[str | None] = "shared_expert_intermediate_size"
    ties_embeddings: ClassVar[bool] = False  # llama.cpp's qwen2moe requires output.weight

    @classmethod
    def expert_inputs(cls, experts: Any, hidden: Any, top_k_index: Any, wanted: Collection[str]):
        """transformers 5's fused experts (Qwen2MoeExperts / Qwen3MoeExperts: `gate_up_proj` [experts, 2 x ff,
        hidden], gate rows first, `down_proj` [experts, hidden, ff]): expert e multiplies the tokens routed to it
        by gate_up_proj[e], and act(gate) * up of them by down_proj[e] (its forward, recomputed here from the
        module's current weights)."""
        import torch
        import torch.nn.functional as F

        n = experts.gate_up_proj.shape[0]
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < n:
                continue
            x = hidden[(top_k_index == e).any(dim=-1)]
            out = {"gate_up_proj": x}
            if "down_proj" in wanted:
                gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                out["down_proj"] = experts.act_fn(gate) * up
            yield e, out

    @classmethod
    def has_attention_bias(cls, config: dict[str, Any]) -> bool:
        return bool(config.get("qkv_bias", True))  # Qwen2MoeConfig.qkv_bias (older configs: always biased)

    @classmethod
    def expert_count(cls, config: dict[str, Any], path: Path | str = "config.json") -> int:
        """num_local_experts (what transformers 5 writes for Qwen3-MoE) or num_experts (what releases state)."""
        key = "num_local_experts" if "num_local_experts" in config else "num_experts"
        return _int(config, key, Path(path), default=cls.moe_defaults["num_experts"])

    @classmethod
    def read_spec(cls, directory: Path, config: dict[str, Any], architecture: str) -> ModelSpec:
        from dataclasses import replace

        spec = super().read_spec(directory, config, architecture)
        path = directory / "config.json"
        d = cls.moe_defaults
        n = cls.expert_count(config, path)
        used = _int(config, "num_experts_per_tok", path, default=d["num_experts_per_tok"])
        if used > n:
            raise KilnError(f"{path}: num_experts_per_tok {used} exceeds the {n} experts")
        step = _int(config, "decoder_sparse_step", path, default=1)
        only = config.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise KilnError(f"{path}: 'mlp_only_layers' must be a list of layer indices, got {only!r}")
        dense = [i for i in range(spec.n_layers) if i in only or (i + 1) % step]
        if dense:
            raise KilnError(f"{path}: layers {dense[:8]} have a dense MLP (mlp_only_layers / decoder_sparse_step): "
                            f"llama.cpp's {cls.name} routes every layer through its experts")
        norm = bool(config.get("norm_topk_prob", False))
        if norm != cls.renormalises_top_k:
            raise KilnError(f"{path}: norm_topk_prob is {str(norm).lower()}, but llama.cpp's {cls.name} "
                            f"{'always' if cls.renormalises_top_k else 'never'} renormalises the top-{used} routing "
                            "weights: the GGUF would compute another model")
        if spec.tie_embeddings and not cls.ties_embeddings:
            raise KilnError(f"{path}: tie_word_embeddings is true, but llama.cpp's {cls.name} needs an output.weight "
                            "of its own")
        shared = 0
        if cls.shared_expert_key is not None:
            shared = _int(config, cls.shared_expert_key, path, default=d[cls.shared_expert_key])
        return replace(spec, n_experts=n, n_experts_used=used,
                       expert_ff=_int(config, "moe_intermediate_size", path, default=d["moe_intermediate_size"]),
                       shared_expert_ff=shared, norm_topk_prob=norm)

    @classmethod
    def layer_weight_tensors(cls, config: dict[str, Any]) -> list[tuple[str, str, int, int]]:
        """The attention of the dense decoder, then the router and the stacked experts (each expert matrix
        is one GGUF tensor of experts x rows; categories as llama.cpp's quantizer matches them by name)."""
        d = int(config["hidden_size"])
        n = cls.expert_count(config)
        ff = int(config.get("moe_intermediate_size") or cls.moe_defaults["moe_intermediate_size"])
        out = [t for t in super().layer_weight_tensors(config) if t[1] not in ("ffn_gate", "ffn_up", "ffn_down")]
        out += [("ffn_gate_inp", "router", d, n), ("ffn_gate_exps", "ffn_gate", d, n * ff),
                ("ffn_up_exps", "ffn_up", d, n * ff), ("ffn_down_exps", "ffn_down", ff, n * d)]
        if cls.shared_expert_key is not None:
            sff = int(config.get(cls.shared_expert_key) or cls.moe_defaults[cls.shared_expert_key])
            out += [("ffn_gate_inp_shexp", "router", d, 1), ("ffn_gate_shexp", "ffn_gate", d, sff),
                    ("ffn_up_shexp", "ffn_up", d, sff), ("ffn_down_shexp", "ffn_down", sff, d)]
        return out
