"""The run's final report: every artifact with its size, bits per weight, verification, quality and cost.

Built only from what the steps recorded (their results and the artifacts' manifests), so it can
be rewritten without measuring anything again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.formats import require_format


def _format_and_size(path: Path) -> tuple[str, int]:
    """The artifact's format name and the bytes of its model files (kiln.formats)."""
    fmt = require_format(path, what="recipe's artifact")
    return fmt.name, fmt.weights_bytes(path)


def build_report(output: Path, inputs: list[str], paths: dict[str, Path],
                 results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row per exported artifact, joined with its eval row, plus the eval reference and bench rows."""
    eval_rows = {r["step"]: r for r in results.get("eval", {}).get("rows", [])}
    artifacts = []
    for sid in inputs:
        if sid in ("eval", "bench"):
            continue
        res, path = results.get(sid, {}), paths[sid]
        ver = res.get("verification") or {}
        ev = eval_rows.get(sid, {})
        fmt, size = _format_and_size(path)
        artifacts.append({
            "step": sid, "artifact": path.relative_to(output).as_posix(), "format": fmt, "size": size,
            "bits_per_weight": res.get("bits_per_weight"),
            "verified": ver.get("passed"), "verification": ver.get("criterion"),
            "perplexity": ev.get("perplexity"), "mean_kl": ev.get("mean_kl"), "p99_kl": ev.get("p99_kl"),
            "top1": ev.get("top1"),
        })
    reference = next((r for r in eval_rows.values() if r.get("mean_kl") is None), None)
    bench = results.get("bench")
    return {"kiln_version": __version__, "artifacts": artifacts,
            "eval": ({"ctx": results["eval"]["ctx"], "reference": reference} if "eval" in results else None),
            "gptq": results.get("gptq"), "merge_lora": results.get("merge-lora"),
            "bench": bench}


def _f(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


BENCH_COLUMNS = [("artifact", "artifact", "s"), ("context", "context", "d"), ("particles", "N", "d"),
                 ("kv_type", "KV", "s"), ("flash_attn", "flash attn", "s"), ("pp_tok_s", "prefill tok/s", ".1f"),
                 ("tg_tok_s", "decode tok/s", ".1f"), ("fraction_of_bound", "of bandwidth bound", ".2f"),
                 ("peak_rss_kib", "peak RSS MiB", "rss"), ("skipped", "skipped", "s")]


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if spec == "rss":
        return f"{value / 1024:.0f}"
    return format(value, spec) if spec != "s" else str(value)


def _bench_table(rows: list[dict[str, Any]]) -> list[str]:
    """The main columns of kiln.bench's rows (all of them are in bench/bench.md and report.json)."""
    cols = [c for c in BENCH_COLUMNS if any(c[0] in row for row in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), spec) for key, _, spec in cols) + " |")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Recipe report", ""]
    ev = report.get("eval")
    if ev and ev.get("reference"):
        ref = ev["reference"]
        lines.append(f"Quality against `{ref['artifact']}` (perplexity {ref['perplexity']:.3f}) on held-out text, "
                     f"chunks of {ev['ctx']} tokens, second half scored ({ref['tokens']} tokens).")
        lines.append("")
    lines += ["| artifact | size MB | bits/weight | verified | PPL | mean KL | p99 KL | top-1 |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for a in report["artifacts"]:
        verified = "—" if a["verified"] is None else ("yes" if a["verified"] else "NO")
        lines.append(f"| {a['artifact']} | {a['size'] / 1e6:.1f} | {_f(a['bits_per_weight'], '.2f')} | {verified} | "
                     f"{_f(a['perplexity'], '.3f')} | {_f(a['mean_kl'], '.4f')} | {_f(a['p99_kl'], '.4f')} | "
                     f"{_f(a['top1'], '.3f')} |")
    g = report.get("gptq")
    if g:
        lines += ["", f"GPTQ: grid {g['grid']}, {g['linears']} linears, {g['chunks']} chunks ({g['tokens']} tokens); "
                      f"mean weight error {g['mean_rel_error']:.4f}, layer output error {g['output_error']:.4f}."]
    m = report.get("merge_lora")
    if m:
        lines += ["", f"LoRA merged first: {m['adapted']} matrices, rank {m['ranks']}, scale {m['scales']}."]
    bench = report.get("bench")
    if bench and bench.get("rows"):
        lines += ["", "## Cost (kiln bench)", "", *_bench_table(bench["rows"]), "",
                  "Every figure, the machine and the anchors: bench/bench.md."]
    lines += ["", f"kiln {report['kiln_version']}", ""]
    return "\n".join(lines)
