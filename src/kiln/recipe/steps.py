"""What each kind of step does: one call into kiln's Python API each, never the CLI.

Every artifact is written by an API that builds it beside its destination and renames it into
place (kiln.atomic), so an interrupted step leaves at most a hidden `.NAME.kiln-*.part` entry, which
the runner sweeps away before the next run. Outputs without a manifest of their own (the merged
checkpoint, eval.json, report.*) are replaced only when a step record names them (`ctx.force`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.atomic import atomic_file
from kiln.recipe.plan import Step

Progress = Callable[[str, int, int], None]


@dataclass
class StepContext:
    output: Path
    paths: dict[str, Path]  # step id (or source) -> its main artifact path
    texts: dict[str, Path | None]  # role -> resolved text file (None: kiln's shipped text)
    lora: Path | None
    threads: int
    results: dict[str, dict[str, Any]]  # step id -> result of a finished (or cached) step
    progress: Progress | None
    force: bool = False  # the runner found this step's existing outputs recorded as the recipe's own


def _recorded_only(ctx: StepContext) -> Callable[[Path], bool]:
    """atomic_file's commit check for outputs that only the recipe's records vouch for."""
    return lambda dest: ctx.force


def _source_kwargs(o: dict[str, Any]) -> dict[str, Any]:
    tok = o.get("tokenizer")
    return {"rope_scaling": o["rope_scaling"], "original_context": o["original_context"], "context": o["context"],
            "allow_shorter_context": o["allow_shorter_context"], "verify": o["verify"],
            "allow_pickle": o["allow_pickle"], "n_heads": o["n_heads"], "tokenizer": Path(tok) if tok else None}


def _export_summary(record: dict[str, Any]) -> dict[str, Any]:
    ver = record.get("verification") or {}
    keep = ("criterion", "passed", "text_mean_kl", "text_top1")
    return {"bits_per_weight": record.get("bits_per_weight"), "n_params": record.get("n_params"),
            "rope": record.get("rope"), "verification": {k: ver.get(k) for k in keep} if ver else None,
            "warnings": record.get("warnings", [])}


def run_merge(step: Step, ctx: StepContext) -> dict[str, Any]:
    from kiln.checkpoint.lora import merge_lora

    assert ctx.lora is not None
    return merge_lora(ctx.paths[step.inputs[0]], ctx.lora, ctx.output / step.outputs[0], force=ctx.force)


def run_gguf(step: Step, ctx: StepContext) -> dict[str, Any]:
    from kiln.pipeline import export_gguf_artifact

    o = step.options
    result = export_gguf_artifact(ctx.paths[step.inputs[0]], ctx.output / step.outputs[0], o["quant"],
                                  modelfile=o["modelfile"], threads=ctx.threads, progress=ctx.progress,
                                  **_source_kwargs(o))
    return _export_summary(result.record)


def run_onnx(step: Step, ctx: StepContext) -> dict[str, Any]:
    from kiln.pipeline import export_onnx_artifact

    o = step.options
    result = export_onnx_artifact(ctx.paths[step.inputs[0]], ctx.output / step.outputs[0], o["precision"],
                                  threads=ctx.threads, progress=ctx.progress, **_source_kwargs(o))
    return _export_summary(result.record)


def text_for(role: str, path: Path | None) -> str:
    """The calibration or eval text: the recipe's file, or the one kiln ships for that role."""
    from kiln.compress.imatrix import calibration_text
    from kiln.evaluate import heldout_text

    if path is None:
        return calibration_text() if role == "calibration" else heldout_text()
    return path.read_text(encoding="utf-8")


def run_gptq(step: Step, ctx: StepContext) -> dict[str, Any]:
    from kiln.compress.gptq import GPTQOptions, quantize_gptq

    opts = GPTQOptions(**step.options)
    text = text_for("calibration", ctx.texts.get("calibration"))
    report = quantize_gptq(ctx.paths[step.inputs[0]], ctx.output / step.outputs[0], text, opts,
                           threads=ctx.threads or None, progress=ctx.progress)
    out = report.to_json()
    out.pop("seconds", None)  # results are cached with the artifact: keep them deterministic
    out["out"] = step.outputs[0]
    return out


def run_eval(step: Step, ctx: StepContext) -> dict[str, Any]:
    from kiln.evaluate import evaluate

    ref = ctx.paths[step.inputs[0]]
    candidates = [ctx.paths[i] for i in step.inputs[1:]]
    rows = evaluate(ref, candidates, text_for("eval", ctx.texts.get("eval")), ctx=step.options["ctx"],
                    threads=ctx.threads or None, progress=ctx.progress)
    by_path = {str(p): sid for sid, p in ctx.paths.items()}
    table = [{**r.to_json(), "step": by_path.get(r.artifact, "source"), "artifact": Path(r.artifact).name}
             for r in rows]
    with atomic_file(ctx.output / step.outputs[0], _recorded_only(ctx)) as tmp:
        tmp.write_text(json.dumps({"ctx": step.options["ctx"], "rows": table}, indent=2, sort_keys=True) + "\n",
                       encoding="utf-8")
    return {"ctx": step.options["ctx"], "rows": table}


def run_bench(step: Step, ctx: StepContext) -> dict[str, Any]:
    from kiln.bench.run import BenchOptions, run_bench as bench

    artifacts = [ctx.paths[i] for i in step.inputs]
    return bench(artifacts, BenchOptions(**step.options), ctx.output / step.outputs[0], progress=ctx.progress,
                 force=ctx.force)


def run_report(step: Step, ctx: StepContext) -> dict[str, Any]:
    from kiln.recipe.report import build_report, render_markdown

    report = build_report(ctx.output, step.inputs, ctx.paths, ctx.results)
    with atomic_file(ctx.output / "report.json", _recorded_only(ctx)) as tmp:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    with atomic_file(ctx.output / "report.md", _recorded_only(ctx)) as tmp:
        tmp.write_text(render_markdown(report), encoding="utf-8")
    return {}


RUNNERS: dict[str, Callable[[Step, StepContext], dict[str, Any]]] = {
    "merge-lora": run_merge, "gguf": run_gguf, "onnx": run_onnx, "gptq": run_gptq, "eval": run_eval,
    "bench": run_bench, "report": run_report,
}
