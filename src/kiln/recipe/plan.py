"""A recipe as a small DAG of steps, each with a content-addressed cache key.

merge-lora → gguf-* (+ Modelfile) / gptq → gptq-gguf-* / gptq-onnx / onnx-* → eval → bench → report.

A step's key is the sha256 of its kind, its options, the kiln version and the content hashes of
its inputs (the source checkpoint's `source_hash`, the sha256 of each input text, and the output
digest of each upstream step). A step whose key equals the one recorded beside its output, with
that output still intact, is skipped; anything else makes it run again, and the steps after it
see a new input digest only if its output really changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.recipe.schema import Recipe

SOURCE = "source"
LORA = "lora"  # pseudo-inputs: their digests are content hashes of the source and the adapter directory


@dataclass
class Step:
    id: str  # unique, also the name of its state file
    kind: str  # merge-lora, gguf, gptq, onnx, eval, bench, report
    options: dict[str, Any]
    inputs: list[str]  # upstream step ids, or SOURCE
    outputs: list[str]  # names inside the output directory (a file or a directory each)
    texts: dict[str, Path | None] = field(default_factory=dict)  # role -> file (None: kiln's shipped text)

    def key(self, digests: dict[str, str], text_hashes: dict[str, str]) -> str:
        body = {"kind": self.kind, "options": self.options, "kiln": __version__,
                "inputs": {i: digests[i] for i in self.inputs},
                "texts": {role: text_hashes[role] for role in self.texts}}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _rope(recipe: Recipe) -> dict[str, Any]:
    r = recipe.rope
    return {"rope_scaling": r.flag(), "original_context": r.original_context, "context": r.context,
            "allow_shorter_context": r.allow_shorter_context}


def gptq_name(recipe: Recipe) -> str:
    g = recipe.targets.gptq
    assert g is not None
    return f"{recipe.name}-gptq-w{g.bits}g{g.group_size}{'' if g.sym else 'a'}{'-act' if g.act_order else ''}"


def export_ids(recipe: Recipe) -> list[str]:
    """Ids of the steps that produce an exported artifact (what eval and bench measure)."""
    t = recipe.targets
    ids = [f"gguf-{q}" for q in t.gguf] + [f"onnx-{p}" for p in t.onnx]
    if t.gptq:
        ids += [f"gptq-gguf-{q}" for q in t.gptq.gguf] + (["gptq-onnx"] if t.gptq.onnx else [])
    return ids


def build_plan(recipe: Recipe, has_lora: bool, calibration: Path | None = None,
               eval_text: Path | None = None, tokenizer: Path | None = None) -> list[Step]:
    """The steps in an order that respects their inputs (the order they run in).

    `calibration` / `eval_text` / `tokenizer` are the recipe's paths resolved against its file
    (None for a text: the one kiln ships)."""
    t, name = recipe.targets, recipe.name
    src_opts = {**recipe.source_options.model_dump(), "tokenizer": str(tokenizer) if tokenizer else None}
    common = {**_rope(recipe), "verify": recipe.verify, **src_opts}
    steps: list[Step] = []
    model = SOURCE
    if has_lora:
        steps.append(Step("merge-lora", "merge-lora", {}, [SOURCE, LORA], [f"{name}-merged"]))
        model = "merge-lora"
    for q in t.gguf:
        out = f"{name}.{q}.gguf"
        steps.append(Step(f"gguf-{q}", "gguf", {**common, "quant": q, "modelfile": t.modelfile}, [model],
                          [out, f"{out}.manifest.json"] + ([f"{name}.{q}.Modelfile"] if t.modelfile else [])))
    if t.gptq:
        g = t.gptq
        ck = gptq_name(recipe)
        gopts = g.model_dump(exclude={"gguf", "onnx"})
        steps.append(Step("gptq", "gptq", gopts, [model], [ck], {"calibration": calibration}))
        for q in g.gguf:
            out = f"{ck}.{q}.gguf"
            steps.append(Step(f"gptq-gguf-{q}", "gguf", {**common, "quant": q, "modelfile": t.modelfile}, ["gptq"],
                              [out, f"{out}.manifest.json"] + ([f"{ck}.{q}.Modelfile"] if t.modelfile else [])))
        if g.onnx:
            steps.append(Step("gptq-onnx", "onnx", {**common, "precision": f"int{g.bits}"}, ["gptq"],
                              [f"{ck}-int{g.bits}-onnx"]))
    for p in t.onnx:
        steps.append(Step(f"onnx-{p}", "onnx", {**common, "precision": p}, [model], [f"{name}-{p}-onnx"]))
    exports = export_ids(recipe)
    if recipe.eval.enabled:
        ref = model if recipe.eval.reference == SOURCE else recipe.eval.reference
        steps.append(Step("eval", "eval", {"ctx": recipe.eval.ctx, "reference": ref, "threads": recipe.threads},
                          [ref, *[e for e in exports if e != ref]], ["eval.json"],
                          {"eval": eval_text}))
    if recipe.bench.enabled:
        steps.append(Step("bench", "bench", recipe.bench.model_dump(exclude={"enabled"}), exports, ["bench"]))
    measured = [s.id for s in steps if s.kind in ("eval", "bench")]
    steps.append(Step("report", "report", {}, [*exports, *measured], ["report.md", "report.json"]))
    return steps


def needed(steps: list[Step], only: str | None) -> list[Step]:
    """`only` and the steps it depends on (transitively), or every step."""
    if only is None:
        return steps
    by_id = {s.id: s for s in steps}
    keep: set[str] = set()
    todo = [only]
    while todo:
        sid = todo.pop()
        if sid in by_id and sid not in keep:
            keep.add(sid)
            todo.extend(by_id[sid].inputs)
    return [s for s in steps if s.id in keep]
