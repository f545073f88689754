"""Open a local Hugging Face checkpoint directory as a `Checkpoint` (spec + lazy tensors)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kiln.families as families
from kiln.checkpoint.gptq import GPTQConfig, GPTQTensors, read_gptq_config
from kiln.checkpoint.spec import ModelSpec
from kiln.checkpoint.tensors import TensorSource, open_weights
from kiln.errors import KilnError
from kiln.families.registry import resolve
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


def read_spec(
    directory: Path, config: dict[str, Any], tensor_names: Callable[[], Collection[str]] | None = None
) -> ModelSpec:
    """The ModelSpec of a checkpoint directory, read by its family (kiln.families);
    `tensor_names` is asked only when the config alone cannot say which family it is."""
    family, arch, config = resolve(directory / "config.json", config, tensor_names)
    return family.read_spec(directory, config, arch)


def check_tensors(spec: ModelSpec, tensors: TensorSource) -> None:
    """Every tensor the family's table needs is there with the shape config.json implies (a mixture of
    experts' per-expert tensors, or its fused ones, are named with their layer and expert)."""
    for name, shape, what in families.of(spec).sources(spec, tensors.names()):
        where = f"{what}: " if what else ""
        if name not in tensors:
            raise KilnError(f"{spec.source}: {where}tensor {name} is missing from the weights")
        actual = tensors.shape(name)
        if tuple(actual) != tuple(shape):
            raise KilnError(f"{spec.source}: {where}tensor {name} has shape {list(actual)}, "
                            f"config.json implies {list(shape)}")


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
