"""Read a recipe file: YAML with the line of every key, validated, errors as `FILE:LINE: key.path: what`.

PyYAML's composer gives each node its position; walking the node tree records the line of every
mapping key and sequence item under its key path, and a pydantic error's `loc` is mapped to the
longest recorded prefix. Paths in a recipe are relative to the recipe file's directory, so a
recipe means the same thing from any working directory; they must exist when the recipe is
checked, except a hub id (ORG/NAME), which is resolved only when the recipe runs.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kiln.errors import KilnError
from kiln.recipe.schema import HUB_ID, Recipe

Loc = tuple[str | int, ...]


class RecipeError(KilnError):
    """A recipe that does not validate; `problems` holds every `FILE:LINE: key: what` line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''}: kiln recipe validate " \
               "lists them)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


@dataclass
class LoadedRecipe:
    """A validated recipe with its paths resolved against the file's directory."""

    recipe: Recipe
    file: Path
    source: str  # a resolved local path, or the hub id to fetch at run time
    source_is_hub: bool
    lora: Path | None
    calibration: Path | None
    eval_text: Path | None
    tokenizer: Path | None
    output: Path
    overrides: dict[str, Any] = field(default_factory=dict)


def _lines(node: yaml.Node, path: Loc, out: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            out[sub] = key.start_mark.line + 1
            _lines(value, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            _lines(item, (*path, i), out)


def key_path(loc: Loc) -> str:
    """('targets', 'gguf', 1) -> 'targets.gguf[1]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model whose fields live at `loc` (for listing the known keys)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = model.model_fields[part].annotation
        for arg in typing.get_args(model) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _message(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = f" (known: {', '.join(model.model_fields)})" if model else ""
        return f"unknown key {loc[-1]!r}{known}"
    if err["type"] == "missing":
        return "missing (required)"
    msg = re.sub(r"^(Value error|Assertion failed), ", "", err["msg"])
    if err["type"] in ("literal_error", "enum"):
        msg = f"{err.get('input')!r}: {msg[0].lower()}{msg[1:]}"
    return msg


class _Locator:
    """Turns a key path into `FILE:LINE: key.path` (or `--set key.path` for a command-line override)."""

    def __init__(self, file: Path, lines: dict[Loc, int], overridden: set[Loc]):
        self.file, self.lines, self.overridden = file, lines, overridden

    def __call__(self, loc: Loc, message: str) -> str:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.overridden:
                return f"{self.file}: --set {key_path(loc)}: {message}"
            if loc[:n] in self.lines:
                return f"{self.file}:{self.lines[loc[:n]]}: {key_path(loc)}: {message}"
        return f"{self.file}: {key_path(loc)}: {message}"


def parse_override(text: str) -> tuple[Loc, Any]:
    """`targets.gptq.samples=4` -> (('targets', 'gptq', 'samples'), 4); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise KilnError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. targets.gptq.samples=4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return tuple(key.strip().split(".")), parsed


def _apply(data: dict[str, Any], loc: Loc, value: Any) -> None:
    node = data
    for i, part in enumerate(loc[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise KilnError(f"--set {key_path(loc)}: {key_path(loc[:i + 1])} is not a mapping")
        node = nxt
    node[loc[-1]] = value


def _read_yaml(file: Path) -> tuple[Any, dict[Loc, int]]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KilnError(f"{file}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KilnError(f"{file}: cannot read recipe ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise RecipeError([f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})"]) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        lines[()] = node.start_mark.line + 1
        _lines(node, (), lines)
    return data, lines


def load_recipe(file: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Parse, apply `--set` overrides, validate and resolve paths; a RecipeError lists every problem."""
    file = Path(file)
    data, lines = _read_yaml(file)
    if not isinstance(data, dict):
        raise RecipeError([f"{file}:1: expected a mapping of keys (name, source, targets, output, ...)"])
    overridden: set[Loc] = set()
    applied: dict[str, Any] = {}
    for text in overrides:
        loc, value = parse_override(text)
        _apply(data, loc, value)
        overridden.add(loc)
        applied[key_path(loc)] = value
    where = _Locator(file, lines, overridden)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError([where(tuple(e["loc"]), _message(e)) for e in exc.errors()]) from None
    return _resolve(recipe, file, where, applied)


def _path(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def looks_like_hub_id(value: str) -> bool:
    return bool(HUB_ID.match(value)) and not value.startswith(("./", "../", "/", "~"))


def _resolve(recipe: Recipe, file: Path, where: _Locator, applied: dict[str, Any]) -> LoadedRecipe:
    base = file.resolve().parent
    problems: list[str] = []

    def existing(loc: Loc, value: str | None, kind: str, inside: str | None = None) -> Path | None:
        if value is None:
            return None
        path = _path(base, value)
        ok = path.is_dir() if kind == "directory" else path.is_file() if kind == "file" else path.exists()
        if not ok:
            problems.append(where(loc, f"{value!r}: no such {kind} ({path})"))
        elif inside and not (path / inside).is_file():
            problems.append(where(loc, f"{value!r}: no {inside} in {path}"))
        return path

    source, hub = _source(recipe.source, base, where, problems)
    lora = existing(("lora",), recipe.lora, "directory", inside="adapter_config.json")
    calibration = existing(("calibration",), recipe.calibration, "file")
    eval_text = existing(("eval", "text"), recipe.eval.text, "file")
    tokenizer = existing(("source_options", "tokenizer"), recipe.source_options.tokenizer, "directory")
    if recipe.eval.enabled and recipe.eval.reference != "source":
        from kiln.recipe.plan import export_ids

        ids = export_ids(recipe)
        if recipe.eval.reference not in ids:
            problems.append(where(("eval", "reference"), f"{recipe.eval.reference!r}: not 'source' nor one of this "
                                  f"recipe's exports ({', '.join(ids)})"))
    if problems:
        raise RecipeError(problems)
    return LoadedRecipe(recipe, file, source, hub, lora, calibration, eval_text, tokenizer,
                        _path(base, recipe.output), applied)


def _source(value: str, base: Path, where: _Locator, problems: list[str]) -> tuple[str, bool]:
    """(resolved source, is a hub id): fixture:NAME -> its cache dir; ORG/NAME not on disk -> a hub id."""
    if value.startswith("fixture:"):
        from kiln.fixtures import fixture_path

        try:
            return str(fixture_path(value[len("fixture:"):])), False
        except KilnError as exc:
            problems.append(where(("source",), str(exc)))
            return value, False
    if value.startswith("hf:"):
        if not looks_like_hub_id(value[3:]):
            problems.append(where(("source",), f"{value!r}: expected hf:ORG/NAME or hf:ORG/NAME/PATH"))
        return value[3:], True
    path = _path(base, value)
    if path.exists():
        return str(path), False
    if looks_like_hub_id(value):
        return value, True
    problems.append(where(("source",), f"{value!r}: no such file or directory ({path}), and not a hub id ORG/NAME"))
    return value, False
