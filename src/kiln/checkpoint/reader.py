"""Open a local Hugging Face checkpoint directory as a `Checkpoint` (spec + lazy tensors)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.checkpoint import rope as rope_mod
from kiln.checkpoint.families import BY_TENSORS, FAMILIES, READ_ELSEWHERE, detect_by_tensors, supported
from kiln.checkpoint.gptq import GPTQConfig, GPTQTensors, read_gptq_config
from kiln.checkpoint.layout import expected_tensors
from kiln.checkpoint.spec import ModelSpec
from kiln.checkpoint.tensors import TensorSource, open_weights
from kiln.checkpoint.tokenizer import read_tokenizer
from kiln.errors import KilnError
from kiln.jsonfile import read_json_object


@dataclass
class Checkpoint:
    spec: ModelSpec
    tensors: TensorSource
    gptq: GPTQConfig | None = None  # set for GPTQ checkpoints; `tensors` then dequantizes on load

    def source_hash(self) -> str:
        return source_hash(self.spec.source)


def source_hash(directory: Path) -> str:
    """A content hash of the files that define the model (config, tokenizer, weights).

    Weights are hashed by their safetensors headers plus size and a sample of bytes:
    hashing gigabytes on every export would cost more than the export itself.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        h.update(path.name.encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            if size <= 8 << 20:
                h.update(f.read())
            else:
                for pos in range(0, size, max(size // 64, 1)):
                    f.seek(pos)
                    h.update(f.read(4096))
    return h.hexdigest()


def _load_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.exists():
        raise KilnError(f"{directory}: config.json is missing (expected a Hugging Face checkpoint directory)")
    return read_json_object(path)


def _int(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise KilnError(f"{path}: required key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KilnError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    return value


def _architecture(
    path: Path, config: dict[str, Any], tensor_names: Callable[[], Collection[str]] | None
) -> tuple[str, dict[str, Any]]:
    """The FAMILIES key for this config, and the config as that family reads it.

    `architectures` decides; only a config whose model_type has a `BY_TENSORS` row (families.py)
    is recognised by its tensor names instead, and then gets the family's own spelling of keys.
    """
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in FAMILIES), None)
    if arch is not None:
        return arch, config
    found = ", ".join(archs) if archs else f"model_type {config.get('model_type')!r}"
    if tensor_names is not None and any(r.model_type == config.get("model_type") for r in BY_TENSORS):
        names = tensor_names()
        row = detect_by_tensors(config, names)
        if row is None:
            elsewhere = next((READ_ELSEWHERE[n] for n in READ_ELSEWHERE if n in names), None)
            if elsewhere is not None:
                raise KilnError(f"{path}: unknown architecture {found}: {elsewhere}")
            first = next(iter(sorted(names)), "none")
            raise KilnError(f"{path}: unknown architecture {found} (model_type {config.get('model_type')!r}, "
                            f"but tensors such as {first!r} match no family kiln reads; supported: {supported()})")
        config = {**config, "architectures": [row.architecture], "model_type": row.hf_model_type}
        for key, alias in row.aliases:
            if key not in config and alias in config:
                config[key] = config[alias]
        return row.architecture, config
    raise KilnError(f"{path}: unknown architecture {found} (supported: {supported()})")


def read_spec(
    directory: Path, config: dict[str, Any], tensor_names: Callable[[], Collection[str]] | None = None
) -> ModelSpec:
    """The ModelSpec of a checkpoint directory; `tensor_names` is asked only when the config alone cannot say."""
    path = directory / "config.json"
    arch, config = _architecture(path, config, tensor_names)
    family = FAMILIES[arch]
    hidden = _int(config, "hidden_size", path)
    heads = _int(config, "num_attention_heads", path)
    head_dim = _int(config, "head_dim", path, default=hidden // heads)
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
    bias = family.attention_bias if family.attention_bias is not None else bool(config.get("attention_bias", False))
    return ModelSpec(
        family=family.name,
        hf_architecture=arch,
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
        tie_embeddings=bool(config.get("tie_word_embeddings", family.tie_default)),
        attention_bias=bias,
        qk_norm=family.qk_norm,
        tokenizer=read_tokenizer(directory, vocab),
        name=config.get("_name_or_path") or directory.name,
        license=_license(directory),
        config=config,
    )


def _license(directory: Path) -> str | None:
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (directory / name).exists():
            return (directory / name).read_text(encoding="utf-8", errors="replace")
    return None


def check_tensors(spec: ModelSpec, tensors: TensorSource) -> None:
    for name, shape in expected_tensors(spec).items():
        if name not in tensors:
            raise KilnError(f"{spec.source}: tensor {name} is missing from the weights")
        actual = tensors.shape(name)
        if tuple(actual) != tuple(shape):
            raise KilnError(f"{spec.source}: tensor {name} has shape {list(actual)}, config.json implies {list(shape)}")


def load_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Open and validate a checkpoint without loading any tensor data."""
    directory = Path(path)
    if not directory.exists():
        raise KilnError(f"{directory}: no such file or directory")
    if not directory.is_dir():
        raise KilnError(f"{directory}: expected a checkpoint directory")
    config = _load_config(directory)
    opened: list[TensorSource] = []

    def tensor_names() -> list[str]:
        opened.append(open_weights(directory, allow_pickle=allow_pickle))
        return opened[-1].names()

    spec = read_spec(directory, config, tensor_names)
    tensors = opened[-1] if opened else open_weights(directory, allow_pickle=allow_pickle)
    gptq = read_gptq_config(directory, config)
    if gptq is not None:
        tensors = GPTQTensors(tensors, gptq)
    check_tensors(spec, tensors)
    return Checkpoint(spec, tensors, gptq)
