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
5. Only with `--only qwen3.5` (or `--sections`), not in a plain run: Qwen3.5-0.8B's and Qwen3.5-2B's exact
   shapes (Gated DeltaNet hybrids, random weights from the family's tensor table) and, beside them,
   Qwen2.5-0.5B's shapes exported with YaRN x4 baked in (its native window is 32768; the bench skips a
   context above an artifact's window, so 131072 needs that export), GGUF q8_0 and q4_k_m at
   4096 / 32768 / 131072, anchors at 4096. Each 131072 row prefills 131072 tokens on 2 cores: hours per row.

Artifacts are exported once (verified, as `kiln export` does) into $KILN_CACHE/bench-artifacts and
reused. Results: docs/benchmarks/<name>.{json,md,png} and docs/benchmarks.md (committed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from rich.console import Console  # noqa: E402

from kiln.bench.report import write_report  # noqa: E402
from kiln.bench.run import BenchOptions, run_bench  # noqa: E402

MIB = 2 ** 20


def cache() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench-artifacts"


def artifact(src: Path, name: str, kind: str, quant: str, console: Console, verify: bool = True,
             rope: dict | None = None) -> Path:
    """`rope`: kiln export's RoPE options ({"rope_scaling": "yarn:4", "original_context": 32768}) for GGUF."""
    from kiln.pipeline import export_gguf_artifact, export_onnx_artifact

    out = cache() / (f"{name}.{quant}.gguf" if kind == "gguf" else f"{name}-{quant}")
    if out.exists():
        return out
    console.print(f"exporting {out.name} (once; cached in {out.parent})")
    if kind == "gguf":
        export_gguf_artifact(src, out, quant, verify=verify, threads=2, **(rope or {}))
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
# Sections a plain run (make bench) leaves out: selected with --only GROUP or --sections. Their 131072-token rows
# take hours each on 2 cores.
EXTRA_SECTIONS = ("qwen3.5-0.8b-shape", "qwen3.5-2b-shape", "qwen2.5-0.5b-shape-yarn4")
GROUPS = {"qwen3.5": EXTRA_SECTIONS}
QWEN35_CONTEXTS = (4096, 32768, 131072)
QWEN35_ANCHOR_MAX = 4096  # the anchor fills the context a second time: at 131072 that is hours more per row
LABELS = {
    "qwen3.5-0.8b-shape": "Qwen3.5-0.8B shapes (Gated DeltaNet hybrid: 18 DeltaNet + 6 attention layers), cost only, "
                          "random weights",
    "qwen3.5-2b-shape": "Qwen3.5-2B shapes (Gated DeltaNet hybrid: 18 DeltaNet + 6 attention layers), cost only, "
                        "random weights",
    "qwen2.5-0.5b-shape-yarn4": "Qwen2.5-0.5B shapes with YaRN x4 baked in (native 32768, context 131072), cost only, "
                                "random weights",
}


def _ints(text: str) -> list[int]:
    return [int(x.strip().upper().replace("K", "")) * (1024 if x.strip().upper().endswith("K") else 1)
            for x in text.split(",") if x.strip()]


EXAMPLES = """example:
  .venv/bin/python bench/contexts.py                 # every default section (about an hour here)
  .venv/bin/python bench/contexts.py --sections arbor-500m-shape   # one section; docs/benchmarks.md is reassembled
                                                     # from every section's JSON
  .venv/bin/python bench/contexts.py --quick         # smollm2 q4_k_m only, 512/2048
  .venv/bin/python bench/contexts.py --only qwen3.5  # Qwen3.5-0.8B/2B + Qwen2.5-0.5B YaRN x4 at 4K/32K/128K (many hours)
  .venv/bin/python bench/contexts.py --only qwen3.5 --contexts 4096   # a short first pass
  .venv/bin/python bench/contexts.py --docs-only     # reassemble docs/benchmarks.md, measure nothing
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=EXAMPLES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    ap.add_argument("--quick", action="store_true", help="smollm2 q4_k_m at 512 and 2048 only (a smoke run)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {', '.join(SECTIONS + EXTRA_SECTIONS)}")
    ap.add_argument("--only", choices=sorted(GROUPS),
                    help="run only this group of sections (qwen3.5: " + ", ".join(GROUPS["qwen3.5"]) + ")")
    ap.add_argument("--contexts", type=_ints, default=list(QWEN35_CONTEXTS), metavar="N,N,...",
                    help="contexts of the qwen3.5 group's sections (default: %(default)s; 128K style accepted)")
    ap.add_argument("--anchor-max-context", type=int, default=QWEN35_ANCHOR_MAX, metavar="N",
                    help="qwen3.5 group: pair kiln with llama.cpp's own loop up to this context (default: %(default)s)")
    ap.add_argument("--docs-only", action="store_true",
                    help="measure nothing: reassemble docs/benchmarks.md from the sections' JSON and kiln plan")
    args = ap.parse_args()
    console = Console(stderr=True)
    from kiln.fixtures import build

    import shapes

    t = args.threads
    if args.docs_only:
        write_docs(_reports(args.out), args.out)
        console.print(f"wrote {args.out.parent / 'benchmarks.md'}")
        return 0
    if args.quick:
        smol = build("smollm2-135m", progress=False)
        q4 = artifact(smol, "smollm2-135m", "gguf", "q4_k_m", console)
        quick = run("quick", [q4], BenchOptions(contexts=[512, 2048], threads=t), args.out, console)
        print("\n".join(summary({"quick": quick})))
        return 0
    wanted = list(GROUPS[args.only]) if args.only else [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = [x for x in wanted if x not in SECTIONS + EXTRA_SECTIONS]
    if bad:
        raise SystemExit(f"unknown section {bad[0]!r} (known: {', '.join(SECTIONS + EXTRA_SECTIONS)})")
    if any(x.startswith("smollm2") for x in wanted):
        smol = build("smollm2-135m", progress=False)
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
    # Qwen3.5 beside Qwen2.5-0.5B at 4K / 32K / 128K: every artifact against llama.cpp's own loop on the same file
    # (anchors up to --anchor-max-context), kiln plan's prediction on every measured row.
    group = BenchOptions(contexts=sorted(args.contexts), threads=t, anchor_max_context=args.anchor_max_context)
    for name in ("qwen3.5-0.8b-shape", "qwen3.5-2b-shape", "qwen2.5-0.5b-shape-yarn4"):
        if name not in wanted:
            continue
        yarn = name.endswith("-yarn4")
        src = shapes.build("qwen2.5-0.5b-shape" if yarn else name)
        arts = [artifact(src, name, "gguf", q, console, rope=shapes.QWEN25_YARN if yarn else None)
                for q in ("q8_0", "q4_k_m")]
        run(name, arts, replace(group, label=LABELS[name]), args.out, console)
    reports = _reports(args.out)
    write_docs(reports, args.out)
    print("\n".join(summary(reports)))
    return 0


def _reports(out: Path) -> dict[str, dict]:
    return {n: json.loads((out / f"{n}.json").read_text()) for n in SECTIONS + EXTRA_SECTIONS
            if (out / f"{n}.json").is_file()}


# `kiln plan`'s predictions for the Qwen3.5 shapes beside Qwen2.5-0.5B (llama.cpp, KV f16, one sequence).
PLAN_CONTEXTS = (4096, 32768, 131072, 262144)
PLAN_QUANTS = ("q8_0", "q4_k_m")


def plan_rows() -> list[dict]:
    """kiln plan (kiln.bench.plan.plan, the code behind the command) on each shape's config.json at each of
    PLAN_CONTEXTS, flash attention off and on: predicted peak bytes, or None beyond the model's context."""
    import tempfile

    import shapes

    from kiln.bench.geometry import hf_geometry
    from kiln.bench.plan import plan

    models = [("Qwen3.5-0.8B", shapes.QWEN35_08B), ("Qwen3.5-2B", shapes.QWEN35_2B),
              # YaRN x4 (what kiln export --rope-scaling yarn:4 bakes in) is how it reaches 131072
              ("Qwen2.5-0.5B (YaRN x4)", {**shapes.QWEN25_05B, "rope_scaling": {
                  "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in models:
            d = Path(tmp) / label.split()[0]
            d.mkdir()
            (d / "config.json").write_text(json.dumps(config))
            geo = hf_geometry(config)
            for fa in (False, True):
                got = {q: {"model": label, "quant": q, "flash_attn": fa, "kv_per_token": geo.kv_bytes_per_token("f16"),
                           "kv_layers": geo.kv_layers or geo.n_layers, "state_bytes": geo.state_bytes, "peaks": {}}
                       for q in PLAN_QUANTS}
                for ctx in PLAN_CONTEXTS:
                    # a budget nothing reaches (1 TiB): each candidate's estimate is at `ctx`
                    p = plan(d, 1 << 40, context=ctx, flash_attn=fa) if ctx <= geo.context_length else None
                    for q, row in got.items():
                        cand = next(c for c in p.candidates if c.quant == q) if p else None
                        row["peaks"][ctx] = cand.estimate.total if cand else None
                        if cand:
                            row["weights"] = cand.weights
                rows += got.values()
    return rows


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plan_section(measured: list[int] | None) -> list[str]:
    """`measured`: the contexts the Qwen3.5 sections below hold so far (None: none yet)."""
    rows = plan_rows()
    lines = [
        "## Qwen3.5 shapes (plan)",
        "",
        "**Predictions, not measurements**: `kiln plan`'s cost model (kiln.bench.cost_model) from each config.json "
        "alone, for llama.cpp with an f16 KV cache and one sequence. Qwen3.5-0.8B and -2B are Gated DeltaNet "
        "hybrids: only 6 of their 24 layers keep K and V (2 KV heads of 256: 12288 B per token, the same as "
        "Qwen2.5-0.5B's 24 layers x 2 KV heads of 64), and each of the other 18 keeps a fixed float32 state per "
        "sequence, 19.3 MiB in all at any context (counted 5 times: llama.cpp keeps one per sequence id, and kiln's "
        "engine opens 4 prompt-cache ids beside the one sequence). The 2B's KV and state equal the 0.8B's; it costs "
        "more only in "
        "weights, which include the one multi-token-prediction block the published checkpoints carry (kiln writes it, "
        "as llama.cpp's converter does; plain decoding never runs it). Qwen2.5-0.5B reaches 131072 only with YaRN x4 "
        "baked into its export (native 32768), and not 262144 (–). "
        "Without flash attention llama.cpp's attention-score buffer (512-token ubatch x context cells x (6 x heads "
        "+ 2) B: 25 KiB per cell for Qwen3.5's 8 heads, 43 KiB for Qwen2.5's 14) outgrows the KV cache at long "
        "contexts; with it on, only the mask grows (2 KiB per cell).",
        "",
        "| model | type | FA | weights MiB | KV B/token | state MiB/seq | "
        + " | ".join(f"peak MiB @ {c}" for c in PLAN_CONTEXTS) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(PLAN_CONTEXTS),
    ]
    for r in rows:
        peaks = [f"{r['peaks'][c] / MIB:,.0f}" if r["peaks"][c] else "–" for c in PLAN_CONTEXTS]
        lines.append(f"| {r['model']} | {r['quant']} | {'on' if r['flash_attn'] else 'off'} | "
                     f"{r['weights'] / MIB:,.0f} | {r['kv_per_token']:,.0f} | {r['state_bytes'] / MIB:.1f} | "
                     + " | ".join(peaks) + " |")
    lines += [
        "",
        ("Measured rows: the Qwen3.5 sections below (`bench/contexts.py --only qwen3.5`), each with kiln plan's "
         f"prediction and its error beside the measured peak; measured so far at {', '.join(map(str, measured))} "
         "(the default run adds " + ", ".join(str(c) for c in QWEN35_CONTEXTS if c not in measured) + ", not "
         "measured here: from the measured prefill cost per token of Qwen3.5-0.8B q8_0, 12.3 ms at 4096 and 20.8 ms "
         "at 32768 (linear DeltaNet layers plus a part that grows with the attention span), one 131072-token row "
         "takes about 1.8 h for the 0.8B and about 5 h for the 2B on these 2 cores; the predictions above stand "
         "for them; each section's title says which contexts it holds)."
         if measured else
         "Measured rows: pending the `bench/contexts.py --only qwen3.5` run (Qwen3.5-0.8B, Qwen3.5-2B and "
         "Qwen2.5-0.5B with YaRN x4, GGUF q8_0 and q4_k_m, at 4096 / 32768 / 131072 against llama.cpp's own loop "
         "on the same file; hours per 131072-token row on 2 cores)."),
        "",
        "```sh",
        ".venv/bin/python bench/contexts.py --only qwen3.5    # measured rows; docs/benchmarks.md is reassembled",
        ".venv/bin/python bench/contexts.py --docs-only       # this table again, from kiln plan (seconds)",
        "```",
        "",
    ]
    return lines


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
              "arbor-500m-shape": "Arbor-500M native shapes, random weights (cost only) to 8K",
              "qwen3.5-0.8b-shape": "Qwen3.5-0.8B shapes, random weights (cost only)",
              "qwen3.5-2b-shape": "Qwen3.5-2B shapes, random weights (cost only)",
              "qwen2.5-0.5b-shape-yarn4": "Qwen2.5-0.5B shapes with YaRN x4, random weights (cost only)"}
    measured = sorted({int(c) for n in EXTRA_SECTIONS if n in reports for c in reports[n]["options"]["contexts"]})
    planned = False
    for name, rep in reports.items():
        from kiln.bench.report import markdown

        if name in EXTRA_SECTIONS and not planned:
            parts += plan_section(measured=measured)
            planned = True

        table = markdown(rep).split("\n")
        body = [ln for ln in table if ln.startswith("|")]
        title = titles.get(name, name)
        if name in EXTRA_SECTIONS:  # named by what it holds so far
            title += " at " + " / ".join(_k(int(c)) for c in rep["options"]["contexts"])
        parts += [f"## {title}", ""]
        if rep.get("label"):
            parts += [f"**{rep['label']}.**", ""]
        parts += body + [""]
        if (out / f"{name}.png").exists():
            parts += [f"![{name}]({rel.name}/{name}.png)", ""]
        parts += [f"Raw figures: [`{rel.name}/{name}.json`]({rel.name}/{name}.json).", ""]
    if not planned:
        parts += plan_section(measured=None)
    parts += kept_sections(out.parent / "benchmarks.md")
    with atomic_file(out.parent / "benchmarks.md") as tmp:
        tmp.write_text("\n".join(parts))


# Sections of docs/benchmarks.md that other bench scripts write (bench/serve.py): kept as they are.
OTHER_SECTIONS = ("## Serving",)


def kept_sections(path: Path) -> list[str]:
    """The lines of the sections other scripts own, from the current file (to put back after a rewrite)."""
    old = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    kept: list[str] = []
    for i, line in enumerate(old):
        if line.strip() in OTHER_SECTIONS:
            end = next((j for j in range(i + 1, len(old)) if old[j].startswith("## ")), len(old))
            kept += old[i:end]
    return kept + ([""] if kept and kept[-1].strip() else [])


if __name__ == "__main__":
    sys.exit(main())
