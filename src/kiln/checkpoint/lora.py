"""Merge a PEFT LoRA adapter into its base checkpoint: W' = W + s · B @ A, written as a plain checkpoint.

It lives in `checkpoint/` because its output is just another Hugging Face checkpoint directory
(same config and tokenizer, merged weights) that every later stage reads as if it were the
source: quantizers and exporters never learn that an adapter existed. Numpy only, one tensor
at a time, so merging needs neither torch nor peft and peaks near the largest matrix.

PEFT's format (peft `LoraConfig`, `save_pretrained`): `adapter_config.json` (`r`, `lora_alpha`,
`target_modules`, `use_rslora`, `fan_in_fan_out`, `modules_to_save`, ...) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r]. The scale s is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with
rsLoRA; r is read from lora_A's shape, which also covers a per-module `rank_pattern`.
Anything that changes the forward in a way a plain weight cannot hold is refused in one line.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.atomic import atomic_dir
from kiln.checkpoint.tensors import TensorSource, open_safetensors, open_weights
from kiln.errors import KilnError
from kiln.jsonfile import read_json_object

PREFIX = "base_model.model."
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}
_EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out")
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
_SKIPPED_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "training_args.bin")


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear: the base weight it changes and its two factors."""

    weight: str  # base tensor name, e.g. model.layers.0.self_attn.q_proj.weight
    a: str  # adapter tensor names
    b: str


@dataclass
class LoraAdapter:
    directory: Path
    config: dict[str, Any]
    tensors: TensorSource
    pairs: list[LoraPair]
    replaced: dict[str, str]  # base name -> adapter name (modules_to_save copies)

    def scale(self, rank: int) -> float:
        alpha = float(self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def _refuse(directory: Path, why: str) -> KilnError:
    return KilnError(f"{directory}: LoRA adapter not supported: {why}")


def read_adapter(directory: str | Path) -> LoraAdapter:
    """Open and check a PEFT LoRA adapter directory (no tensor data is loaded)."""
    directory = Path(directory)
    cfg_path = directory / "adapter_config.json"
    if not cfg_path.is_file():
        raise KilnError(f"{directory}: adapter_config.json is missing (expected a PEFT adapter directory)")
    config = read_json_object(cfg_path)
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise _refuse(directory, f"peft_type {kind!r} (only LORA merges into plain weights)")
    if config.get("use_dora"):
        raise _refuse(directory, "DoRA (use_dora) rescales each column by a learned magnitude")
    for key in ("alpha_pattern", "layer_replication", "target_parameters"):
        if config.get(key):
            raise _refuse(directory, f"{key} is set")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise _refuse(directory, "trained biases (bias / lora_bias)")
    files = [directory / "adapter_model.safetensors"]
    if not files[0].is_file():
        raise KilnError(f"{directory}: adapter_model.safetensors is missing")
    tensors = open_safetensors(files)
    pairs, replaced = _classify(directory, tensors)
    if not pairs and not replaced:
        raise KilnError(f"{directory}: adapter_model.safetensors holds no lora_A/lora_B weights")
    return LoraAdapter(directory, config, tensors, pairs, replaced)


def _classify(directory: Path, tensors: TensorSource) -> tuple[list[LoraPair], dict[str, str]]:
    """lora_A/lora_B pairs by base weight, and modules_to_save copies (base name -> adapter name)."""
    pairs: list[LoraPair] = []
    replaced: dict[str, str] = {}
    names = set(tensors.names())
    for name in sorted(names):
        if not name.startswith(PREFIX):
            raise _refuse(directory, f"tensor {name!r} lacks the {PREFIX!r} prefix PEFT writes")
        inner = name[len(PREFIX):]
        if ".lora_embedding_" in inner or ".lora_magnitude_vector" in inner:
            raise _refuse(directory, f"{inner} (embedding LoRA / DoRA)")
        if ".lora_A." in inner:
            module, _, rest = inner.partition(".lora_A.")
            if rest != "weight":
                raise _refuse(directory, f"tensor {name!r} (named adapters or LoRA biases)")
            b = f"{PREFIX}{module}.lora_B.weight"
            if b not in names:
                raise KilnError(f"{directory}: {name} has no matching lora_B weight")
            pairs.append(LoraPair(f"{module}.weight", name, b))
        elif ".lora_B." in inner:
            if f"{PREFIX}{inner.replace('.lora_B.', '.lora_A.')}" not in names:
                raise KilnError(f"{directory}: {name} has no matching lora_A weight")
        else:  # modules_to_save: a full trained copy of a base tensor
            if any(part in _EMBEDDINGS for part in inner.split(".")):
                raise _refuse(directory, f"modules_to_save with embeddings ({inner})")
            replaced[inner] = name
    return pairs, replaced


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write `out`: the checkpoint `base` with `adapter` merged in (atomic; nothing at `out` on failure).

    An existing non-empty `out` is replaced only with `force` (a recipe passes it for the merged
    checkpoint its own records name). Returns a summary (adapted tensors, rank, scale) for manifests
    and reports.
    """
    from kiln.checkpoint import load_checkpoint
    from kiln.outputs import check_output, may_replace

    base = Path(base)
    out = check_output(out, "merged", force=force, sources=(base, adapter))
    ckpt = load_checkpoint(base)
    if ckpt.gptq is not None:
        raise KilnError(f"{base}: merge a LoRA adapter into the float checkpoint, then quantize")
    lora = read_adapter(adapter)
    weights = open_weights(base)
    by_weight = {p.weight: p for p in lora.pairs}
    fan_in_fan_out = bool(lora.config.get("fan_in_fan_out"))
    for name in [*by_weight, *lora.replaced]:
        if name not in weights:
            raise KilnError(f"{lora.directory}: adapts {name}, which {base} does not have (another base model?)")
    if ckpt.spec.tie_embeddings and any(n.startswith("lm_head") for n in by_weight):
        raise _refuse(lora.directory, "it adapts lm_head of a model with tied embeddings")

    ranks: set[int] = set()
    scales: set[float] = set()

    def merged(name: str) -> np.ndarray:
        if name in lora.replaced:
            new = lora.tensors.load(lora.replaced[name])
            if tuple(new.shape) != tuple(weights.shape(name)):
                raise KilnError(f"{lora.directory}: {name} has shape {list(new.shape)}, the base has "
                                f"{list(weights.shape(name))}")
            return new
        pair = by_weight[name]
        a, b = lora.tensors.load(pair.a), lora.tensors.load(pair.b)
        rank = a.shape[0]
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != rank:
            raise KilnError(f"{lora.directory}: {pair.a} {list(a.shape)} and {pair.b} {list(b.shape)} do not pair")
        scale = lora.scale(rank)
        ranks.add(rank)
        scales.add(scale)
        delta = (b @ a) * np.float32(scale)
        if fan_in_fan_out:
            delta = delta.T
        w = weights.load(name)
        if w.shape != delta.shape:
            raise KilnError(f"{lora.directory}: {name}: the adapter's update is {list(delta.shape)}, the base "
                            f"weight {list(w.shape)}")
        return w + delta

    changed = set(by_weight) | set(lora.replaced)
    with atomic_dir(out, may_replace("merged", force)) as tmp:
        _write_safetensors(tmp / "model.safetensors", weights, changed, merged)
        for path in sorted(base.iterdir()):
            if path.is_file() and not path.name.endswith(_WEIGHT_FILES) and path.name not in _SKIPPED_FILES \
                    and not path.name.startswith("."):
                shutil.copyfile(path, tmp / path.name)
    return {"adapter": str(Path(adapter)), "adapted": len(by_weight), "replaced": sorted(lora.replaced),
            "ranks": sorted(ranks), "scales": sorted(scales), "rslora": bool(lora.config.get("use_rslora"))}


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) as uint16 bits, as torch's .to(bfloat16) does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = 0x7FC0
    return out


def _stored(name: str, weights: TensorSource, changed: set[str], merged) -> np.ndarray:
    """A tensor as it is written: changed ones in their base dtype (merged in float32), others byte for byte."""
    if name not in changed:
        return weights.load_raw(name)
    value = merged(name)
    dtype = weights.dtype(name)
    if dtype == "BF16":
        return _f32_to_bf16(value)
    return value.astype(np.float16 if dtype == "F16" else np.float32)


def _write_safetensors(dest: Path, weights: TensorSource, changed: set[str], merged) -> None:
    """Stream a safetensors file: header from shapes and dtypes, then one tensor at a time."""
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    names = sorted(weights.names())
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "merged_by": "kiln"}}
    offset = 0
    for name in names:
        dtype = weights.dtype(name)
        dtype = dtype if dtype in sizes else _ST_DTYPES[np.dtype(dtype)]
        if name in changed and dtype not in ("BF16", "F16"):
            dtype = "F32"
        n = int(np.prod(weights.shape(name), dtype=np.int64)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(weights.shape(name)), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            arr = _stored(name, weights, changed, merged)
            f.write(np.ascontiguousarray(arr).tobytes())
