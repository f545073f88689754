"""Several recipes at once: a sweep file, the executor choice, and the sweep's own report.

A sweep file is a small YAML mapping (told from a recipe by its `recipes:` key):

    recipes: [smollm2.yaml, qwen2.5-0.5b.yaml]   # relative to this file
    executor: ray                                # local (default) | ray
    address: auto                                # a Ray cluster (default: a local instance)
    store: s3://bucket/kiln-steps                # the step cache every worker reads (default: $KILN_CACHE/recipe-store)
    output: ../out/sweep                         # recipe NAME writes to OUTPUT/NAME; report.md here
    set: [bench.contexts=[512]]                  # --set overrides applied to every recipe

The sweep's `report.md`/`report.json` has one row per artifact of every recipe (size, bits per weight,
verification, quality, decode speed), built from each recipe's own report.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from kiln import __version__
from kiln.errors import KilnError
from kiln.recipe.schema import Strict

EXECUTORS = ("local", "ray")


class SweepFile(Strict):
    recipes: list[str] = Field(min_length=1)
    executor: Literal["local", "ray"] | None = None
    address: str | None = None
    store: str | None = None
    output: str | None = None
    set: list[str] = Field(default_factory=list)


@dataclass
class Sweep:
    """What to run: recipe files with their overrides, where, and on what."""

    files: list[Path]
    overrides: list[str] = field(default_factory=list)
    executor: str | None = None
    address: str | None = None
    store: str | None = None
    output: Path | None = None


def is_sweep_file(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "recipes" in data


def load_sweep(path: Path) -> Sweep:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        raise KilnError(f"{path}: {where}: {e['msg']}") from None
    base = path.resolve().parent

    def rel(v: str) -> Path:
        p = Path(v).expanduser()
        return p if p.is_absolute() else base / p

    store = spec.store
    if store and "://" not in store:
        store = str(rel(store))
    return Sweep([rel(r) for r in spec.recipes], list(spec.set), spec.executor, spec.address, store,
                 rel(spec.output) if spec.output else None)


def default_store() -> str:
    from kiln.paths import cache_dir

    return str(cache_dir() / "recipe-store")


# --- progress -------------------------------------------------------------------------------------

def progress_line(counts: dict[str, dict[str, int]]) -> str:
    """`smollm2-135m 3/8 done (1 cached), 1 running, 0 failed | tiny 2/4 done, ...`"""
    parts = []
    for label, c in counts.items():
        total = sum(c.values())
        finished = c["done"] + c["cached"]
        cached = f" ({c['cached']} cached)" if c["cached"] else ""
        parts.append(f"{label} {finished}/{total} done{cached}, {c['running']} running, {c['failed']} failed")
    return " | ".join(parts)


# --- the sweep's report -----------------------------------------------------------------------------

def _speed(bench: dict[str, Any] | None, artifact: str) -> tuple[float | None, float | None]:
    """(decode, prefill) tok/s of `artifact` at its smallest context, one sequence (kiln bench rows)."""
    rows = [r for r in (bench or {}).get("rows", []) if isinstance(r, dict) and not r.get("skipped")
            and Path(str(r.get("artifact", ""))).name == Path(artifact).name and r.get("particles", 1) == 1]
    if not rows:
        return None, None
    best = min(rows, key=lambda r: (r.get("context") or 0))
    return best.get("tg_tok_s"), best.get("pp_tok_s")


def sweep_report(outputs: list[tuple[str, Path]]) -> dict[str, Any]:
    """One row per artifact of every recipe (`outputs`: recipe name, output directory with report.json)."""
    rows = []
    for name, out in outputs:
        try:
            report = json.loads((out / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for a in report.get("artifacts", []):
            decode, prefill = _speed(report.get("bench"), a["artifact"])
            rows.append({"recipe": name, "output": str(out), **a, "decode_tok_s": decode, "prefill_tok_s": prefill})
    return {"kiln_version": __version__, "kind": "sweep-report", "artifacts": rows}


def _f(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_sweep(report: dict[str, Any]) -> str:
    lines = ["# Sweep report", "",
             "| recipe | artifact | size MB | bits/weight | verified | PPL | mean KL | top-1 | decode tok/s | "
             "prefill tok/s |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for a in report["artifacts"]:
        verified = "—" if a.get("verified") is None else ("yes" if a["verified"] else "NO")
        lines.append(f"| {a['recipe']} | {a['artifact']} | {a['size'] / 1e6:.1f} | "
                     f"{_f(a.get('bits_per_weight'), '.2f')} | {verified} | "
                     f"{_f(a.get('perplexity'), '.3f')} | "
                     f"{_f(a.get('mean_kl'), '.4f')} | {_f(a.get('top1'), '.3f')} | "
                     f"{_f(a.get('decode_tok_s'), '.1f')} | "
                     f"{_f(a.get('prefill_tok_s'), '.1f')} |")
    lines += ["", "Each recipe's report.md has its eval reference and full bench grid.", "",
              f"kiln {report['kiln_version']}", ""]
    return "\n".join(lines)


def _ours(path: Path) -> bool:
    """A sweep report kiln wrote (report.json with kind sweep-report; report.md beside it)."""
    try:
        data = json.loads((path.parent / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == "sweep-report"


def write_sweep_report(directory: Path, outputs: list[tuple[str, Path]]) -> Path:
    from kiln.atomic import atomic_file

    report = sweep_report(outputs)
    md = directory / "report.md"
    for path in (md, directory / "report.json"):
        if path.exists() and not _ours(path):
            raise KilnError(f"{path}: exists and is not a sweep report kiln wrote; choose another output")
    with atomic_file(md, _ours) as tmp:
        tmp.write_text(render_sweep(report), encoding="utf-8")
    with atomic_file(directory / "report.json", _ours) as tmp:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return md
