#!/usr/bin/env python
"""`make bench`'s context-length benchmark: writes docs/benchmarks.md and its tables and plots.

What it runs (DESIGN.md §8, issue 7), all through `kiln.bench.run_bench` (the code behind `kiln bench`):

1. SmolLM2-135M (the real fixture): GGUF f16, q8_0, q4_k_m and ONNX int8, int4, at contexts
   512 / 2048 / 8192 (its native window), each next to its anchor (llama-cpp-python's high-level
   `Llama`, onnxruntime-genai's `Generator`) on the same file in the same run.
2. The same smollm2 q4_k_m at 8192 with llama.cpp's KV-cache types and flash attention on/off, and
   with 16 particles (SMC's batched decoding).
3. Qwen2.5-0.5B's exact shapes with random weights (bench/shapes.py; "cost only"), GGUF q4_k_m and
   q8_0, at 512 / 2048 / 8192 / 32768, anchors up to 2048 (filling 32K tokens twice more per type
   would double the run for a ratio the smaller contexts already show).
4. Arbor-500M's native shapes (GPT-2 layout, 128k vocabulary), GGUF q4_k_m and q8_0, to 8192.

Artifacts are exported once (verified, as `kiln export` does) into $KILN_CACHE/bench-artifacts and
reused. Results: docs/benchmarks/<name>.{json,md,png} and docs/benchmarks.md (committed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from rich.console import Console  # noqa: E402

from kiln.bench.report import write_report  # noqa: E402
from kiln.bench.run import BenchOptions, run_bench  # noqa: E402

MIB = 2 ** 20


def cache() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench-artifacts"


def artifact(src: Path, name: str, kind: str, quant: str, console: Console, verify: bool = True) -> Path:
    from kiln.pipeline import export_gguf_artifact, export_onnx_artifact

    out = cache() / (f"{name}.{quant}.gguf" if kind == "gguf" else f"{name}-{quant}")
    if out.exists():
        return out
    console.print(f"exporting {out.name} (once; cached in {out.parent})")
    if kind == "gguf":
        export_gguf_artifact(src, out, quant, verify=verify, threads=2)
    else:
        export_onnx_artifact(src, out, quant, verify=verify, threads=2)
    return out


def progress_for(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    task = bar.add_task("bench", total=1)

    def update(stage: str, done: int, total: int) -> None:
        bar.update(task, description=stage, completed=done, total=total)

    return bar, update


def run(name: str, paths: list[Path], opts: BenchOptions, out: Path, console: Console) -> dict:
    bar, update = progress_for(console)
    with bar:
        report = run_bench(paths, opts, None, progress=update)
    write_report(report, out, stem=name)
    console.print(f"wrote {out / name}.md")
    return report


def summary(reports: dict[str, dict]) -> list[str]:
    ratios, errors = [], []
    for rep in reports.values():
        for r in rep["rows"]:
            a = r.get("anchor") or {}
            if a.get("tg_ratio_kiln_over_anchor"):
                ratios.append((a["tg_ratio_kiln_over_anchor"], r["artifact"], r["context"]))
            if r.get("prediction_error") is not None:
                errors.append((abs(r["prediction_error"]), r["prediction_error"], r["artifact"], r["context"],
                               r["kv_type"], r["flash_attn"], r["particles"]))
    lines = []
    if ratios:
        lo, hi = min(ratios), max(ratios)
        gguf = [x for x in ratios if x[1].endswith(".gguf")]
        within = sum(1 for x in ratios if x[0] >= 0.95)
        median = sorted(x[0] for x in ratios)[len(ratios) // 2]
        lines.append(f"- Harness overhead: kiln's decode tokens/s over the anchor's, same file, same run, alternating "
                     f"turns: median {median:.3f}, {lo[0]:.3f} ({lo[1]} at {lo[2]}) to {hi[0]:.3f} ({hi[1]} at "
                     f"{hi[2]}) over {len(ratios)} configurations, {within} of them at 0.95 or above"
                     + (f"; GGUF only: {min(gguf)[0]:.3f} to {max(gguf)[0]:.3f}" if gguf else "")
                     + ". Goal: kiln within 5% of the anchor (ratio ≥ 0.95).")
    if errors:
        worst = max(errors)
        lines.append(f"- `kiln plan`'s cost model against measured peak RSS: worst error {100 * worst[1]:+.1f}% "
                     f"({worst[2]} at context {worst[3]}, KV {worst[4]}, FA {worst[5]}, N={worst[6]}) over "
                     f"{len(errors)} measured configurations. Goal: within 15%.")
    return lines


SECTIONS = ("smollm2", "smollm2-kv", "smollm2-particles", "qwen2.5-0.5b-shape", "arbor-500m-shape")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  .venv/bin/python bench/contexts.py            # everything (about an hour here)\n"
                                        "  .venv/bin/python bench/contexts.py --sections arbor-500m-shape   # one section; "
                                        "docs/benchmarks.md is reassembled from every section's JSON\n"
                                        "  .venv/bin/python bench/contexts.py --quick    # smollm2 q4_k_m only, 512/2048\n")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    ap.add_argument("--quick", action="store_true", help="smollm2 q4_k_m at 512 and 2048 only (a smoke run)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = ap.parse_args()
    console = Console(stderr=True)
    from kiln.fixtures import build

    import shapes

    smol = build("smollm2-135m", progress=False)
    t = args.threads
    if args.quick:
        q4 = artifact(smol, "smollm2-135m", "gguf", "q4_k_m", console)
        quick = run("quick", [q4], BenchOptions(contexts=[512, 2048], threads=t), args.out, console)
        print("\n".join(summary({"quick": quick})))
        return 0
    wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = [x for x in wanted if x not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section {bad[0]!r} (known: {', '.join(SECTIONS)})")
    smol_arts = [artifact(smol, "smollm2-135m", "gguf", q, console) for q in ("f16", "q8_0", "q4_k_m")]
    smol_arts += [artifact(smol, "smollm2-135m", "onnx", p, console) for p in ("int8", "int4")]
    q4 = smol_arts[2]
    if "smollm2" in wanted:
        run("smollm2", smol_arts, BenchOptions(contexts=[512, 2048, 8192], threads=t), args.out, console)
    if "smollm2-kv" in wanted:
        run("smollm2-kv", [q4], BenchOptions(contexts=[8192], threads=t, kv_types=["f16", "q8_0"],
                                             flash_attn=["off", "on"], anchors=False), args.out, console)
    if "smollm2-particles" in wanted:
        run("smollm2-particles", [q4, smol_arts[4]], BenchOptions(contexts=[2048], threads=t, particles=[1, 4, 16],
                                                                  anchors=False), args.out, console)
    if "qwen2.5-0.5b-shape" in wanted:
        src = shapes.build("qwen2.5-0.5b-shape")
        arts = [artifact(src, "qwen2.5-0.5b-shape", "gguf", q, console) for q in ("q4_k_m", "q8_0")]
        run("qwen2.5-0.5b-shape", arts, BenchOptions(
            contexts=[512, 2048, 8192, 32768], threads=t, anchor_max_context=2048,
            label="Qwen2.5-0.5B shapes, cost only, random weights"), args.out, console)
    if "arbor-500m-shape" in wanted:
        # Arbor is full multi-head attention (16 KV heads): 8x Qwen2.5-0.5B's KV per token, so its
        # 32K fill alone would take longer than the rest of this run; it stops at 8192.
        src = shapes.build("arbor-500m-shape")
        arts = [artifact(src, "arbor-500m-shape", "gguf", q, console) for q in ("q4_k_m", "q8_0")]
        run("arbor-500m-shape", arts, BenchOptions(
            contexts=[512, 2048, 8192], threads=t, anchor_max_context=2048,
            label="Arbor-500M native shapes (GPT-2 layout), cost only, random weights"), args.out, console)
    reports = {n: json.loads((args.out / f"{n}.json").read_text()) for n in SECTIONS
               if (args.out / f"{n}.json").is_file()}
    write_docs(reports, args.out)
    print("\n".join(summary(reports)))
    return 0


def write_docs(reports: dict[str, dict], out: Path) -> None:
    from kiln.atomic import atomic_file

    first = next(iter(reports.values()))
    m = first["machine"]
    rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    parts = [
        "# Benchmarks: memory and speed across context lengths",
        "",
        "Generated by `make bench` (`bench/contexts.py`, which runs `kiln bench`'s code); do not edit by hand.",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['ram_gb']} GB RAM; "
        f"{first['options']['threads']} threads; memory bandwidth {first['bandwidth_bytes_s'] / 1e9:.1f} GB/s "
        "(numpy copy, read+write). Versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items() if v) + ".",
        "",
        "## Summary",
        "",
        *summary(reports),
        "",
        "How to read the tables: one row per configuration, each measured in a fresh process. TTFT is the "
        "prefill of a prompt that fills the context less the room for generation; pp is that prompt's tokens/s; "
        "tg is generation tokens/s at that depth; '% of bound' puts tg against bandwidth / (model + KV bytes per "
        "token); peak RSS is the process's VmHWM; 'predicted' is `kiln plan`'s cost model for the same "
        "configuration. The anchor columns are llama-cpp-python's high-level `Llama.generate` (GGUF) or "
        "onnxruntime-genai's `Generator` (ONNX) on the same file, in one process with kiln's engine, taking "
        "alternate turns.",
        "",
    ]
    titles = {"smollm2": "SmolLM2-135M (real weights): GGUF and ONNX across its native 8K window",
              "smollm2-kv": "SmolLM2-135M q4_k_m at 8192: KV-cache type and flash attention",
              "smollm2-particles": "SmolLM2-135M at 2048: N particles decoding together (SMC)",
              "qwen2.5-0.5b-shape": "Qwen2.5-0.5B shapes, random weights (cost only) to 32K",
              "arbor-500m-shape": "Arbor-500M native shapes, random weights (cost only) to 8K"}
    for name, rep in reports.items():
        from kiln.bench.report import markdown

        table = markdown(rep).split("\n")
        body = [ln for ln in table if ln.startswith("|")]
        parts += [f"## {titles.get(name, name)}", ""]
        if rep.get("label"):
            parts += [f"**{rep['label']}.**", ""]
        parts += body + [""]
        if (out / f"{name}.png").exists():
            parts += [f"![{name}]({rel.name}/{name}.png)", ""]
        parts += [f"Raw figures: [`{rel.name}/{name}.json`]({rel.name}/{name}.json).", ""]
    with atomic_file(out.parent / "benchmarks.md") as tmp:
        tmp.write_text("\n".join(parts))


if __name__ == "__main__":
    sys.exit(main())
