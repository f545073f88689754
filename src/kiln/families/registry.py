"""The registry of families: HF architecture name -> family class, and how a checkpoint finds its family.

`architectures` in config.json decides. Two kinds of checkpoint are recognised otherwise, each by
data its family class declares: a config whose `model_type` a family lists in `by_tensors` is read
as that family when its tensor names match (never by model_type alone: unrelated projects reuse
names such as "arbor"); and a path a family `claims` (native Arbor's trainer .pt files, bare state
dicts, ArborConfig directories) is read by that family's own reader.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kiln.errors import KilnError

F = TypeVar("F", bound=type)

FAMILIES: dict[str, type] = {}  # HF architecture name -> family class
BY_NAME: dict[str, type] = {}  # kiln family name (= GGUF general.architecture) -> family class
_CLAIMING: list[type] = []  # families whose checkpoints are recognised by path, in registration order
_BY_TENSORS: list[tuple[TensorDetection, type]] = []


@dataclass(frozen=True)
class TensorDetection:
    """A config whose `architectures` names no registered family, recognised by its tensor names."""

    model_type: str
    require: tuple[str, ...]  # every one of these tensors must be present
    forbid: tuple[str, ...]  # none of these may be present
    architecture: str  # the registered architecture the checkpoint is read as
    hf_model_type: str  # model_type of that architecture in transformers (so a staged config.json loads)
    aliases: tuple[tuple[str, str], ...] = ()  # (key the family reads, key this config spells it with)


def register(cls: F) -> F:
    """Class decorator: make `cls` the family of each name in its `architectures`."""
    for arch in cls.architectures:
        if arch in FAMILIES:
            raise ValueError(f"architecture {arch} registered twice ({FAMILIES[arch].__name__}, {cls.__name__})")
        FAMILIES[arch] = cls
    if cls.architectures or getattr(cls, "claims_paths", False):  # not recognition-only classes
        BY_NAME.setdefault(cls.name, cls)
    if getattr(cls, "by_tensors", None) is not None:
        _BY_TENSORS.append((cls.by_tensors, cls))
    if getattr(cls, "claims_paths", False):
        _CLAIMING.append(cls)
    return cls


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def for_architecture(architecture: str) -> type:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise KilnError(f"unknown architecture {architecture} (supported: {supported()})") from None


def by_name(name: str) -> type | None:
    """The family a GGUF's general.architecture names (None for one kiln does not write)."""
    return BY_NAME.get(name)


def claiming(path: str | Path) -> type | None:
    """The family that reads `path` with a reader of its own (not a HF config), if one claims it."""
    return next((cls for cls in _CLAIMING if cls.claims(Path(path))), None)


def detection_for(config: dict[str, Any], names: Collection[str]) -> TensorDetection | None:
    """The by-tensors row matching this config's model_type and these tensor names, if any."""
    for row, _ in _BY_TENSORS:
        if (config.get("model_type") == row.model_type and all(n in names for n in row.require)
                and not any(n in names for n in row.forbid)):
            return row
    return None


def detected_config(config: dict[str, Any], row: TensorDetection) -> dict[str, Any]:
    """The config as the detected family reads it (and as transformers loads it, for the reference)."""
    config = {**config, "architectures": [row.architecture], "model_type": row.hf_model_type}
    for key, alias in row.aliases:
        if key not in config and alias in config:
            config[key] = config[alias]
    return config


def resolve(path: Path, config: dict[str, Any],
            tensor_names: Callable[[], Collection[str]] | None) -> tuple[type, str, dict[str, Any]]:
    """(family, architecture, the config as that family reads it) for a checkpoint's config.json;
    `tensor_names` is asked only when the config alone cannot say."""
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in FAMILIES), None)
    if arch is not None:
        return FAMILIES[arch], arch, config
    found = ", ".join(archs) if archs else f"model_type {config.get('model_type')!r}"
    if tensor_names is not None and any(r.model_type == config.get("model_type") for r, _ in _BY_TENSORS):
        names = tensor_names()
        row = detection_for(config, names)
        if row is None:
            elsewhere = next((cls.read_elsewhere[n] for cls in _CLAIMING for n in cls.read_elsewhere if n in names),
                             None)
            if elsewhere is not None:
                raise KilnError(f"{path}: unknown architecture {found}: {elsewhere}")
            first = next(iter(sorted(names)), "none")
            raise KilnError(f"{path}: unknown architecture {found} (model_type {config.get('model_type')!r}, "
                            f"but tensors such as {first!r} match no family kiln reads; supported: {supported()})")
        return FAMILIES[row.architecture], row.architecture, detected_config(config, row)
    raise KilnError(f"{path}: unknown architecture {found} (supported: {supported()})")


def for_config(config: dict[str, Any]) -> type | None:
    """The family of a config.json alone, for what needs no tensors (kiln plan's cost model)."""
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in FAMILIES), None)
    if arch is not None:
        return FAMILIES[arch]
    row = next((r for r, _ in _BY_TENSORS if r.model_type == config.get("model_type")), None)
    if row is not None:
        return FAMILIES[row.architecture]
    return next((cls for cls in _CLAIMING if cls.claims_config(config)), None)


def for_source(path: str | Path) -> type | None:
    """The family of a checkpoint path when it is known without reading tensors: the family that claims
    the path, else the one its config.json's `architectures` names. None leaves the decision to the
    decoder reader (kiln.checkpoint.load_checkpoint), which recognises the rest by tensors or refuses."""
    import json

    path = Path(path)
    claimed = claiming(path)
    if claimed is not None:
        return claimed
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    return next((FAMILIES[a] for a in archs or [] if isinstance(a, str) and a in FAMILIES), None)
