#!/usr/bin/env python
"""Benchmark: HF checkpoint dir -> f16 GGUF, kiln's converter versus llama.cpp's convert_hf_to_gguf.py.

Both converters run side by side in one run, each in a fresh subprocess, alternating
(ABBA order), `--repeat` times; wall time and peak RSS of each child come from
os.wait4's rusage. Results are reported as medians and as kiln / llama.cpp ratios
(DESIGN.md section 8: compare in one run, as ratios, with medians). Afterwards both
outputs are loaded in llama.cpp and their next-token logits for a prompt compared.

llama.cpp's converter comes from the llama-cpp-python sdist (vendor/llama.cpp), the
same llama.cpp that kiln runs against; only convert_hf_to_gguf.py, conversion/ and
gguf-py/ are extracted, into kiln's cache (never into the repository), by
kiln.fixtures.llama_converter (shared with tests/test_gguf_keys.py). It runs with
its bundled gguf-py (NO_LOCAL_GGUF unset) under this interpreter.

Writes <out>/convert-<model>-<timestamp>.json and .md and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kiln.bench.machine import machine
from kiln.errors import KilnError
from kiln.fixtures.llama_converter import LLAMA_CPP_PYTHON, bundled_gguf_version, converter_command, llama_converter

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT = "The capital of France is"
TOOLS = ("kiln", "llama.cpp")

KILN_CODE = """\
import sys
from kiln.checkpoint import load_checkpoint
from kiln.compress.llama_quant import quant_type
from kiln.export.gguf import export_gguf
ckpt = load_checkpoint(sys.argv[1])
export_gguf(ckpt, sys.argv[2], quant_type("f16"), ckpt.spec.rope)
"""

EXAMPLE = """\
example:
  .venv/bin/python bench/convert.py                       # SmolLM2-135M fixture, 3 rounds
  .venv/bin/python bench/convert.py --repeat 5 --out /tmp/bench
  .venv/bin/python bench/convert.py --src ~/models/SmolLM2-360M --model smollm2-360m
"""


# --- measuring ----------------------------------------------------------------------------------

def command(tool: str, src: Path, out: Path, conv: Path) -> tuple[list[str], Path | None, dict[str, str]]:
    if tool == "kiln":
        return [sys.executable, "-c", KILN_CODE, str(src), str(out)], None, dict(os.environ)
    return converter_command(src, out, "f16", conv)


class _Sampler(threading.Thread):
    """Polls /proc/PID/status for the peak of RssAnon and RssFile (kB), a breakdown of ru_maxrss.

    ru_maxrss counts file-backed pages mapped into the process (np.memmap, mmap'd safetensors)
    as well as anonymous memory; the sampled peaks show which of the two a peak is made of.
    Sampling every 10 ms can miss a short spike, so these are lower bounds.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                text = self.path.read_text()
            except OSError:
                return
            for line in text.splitlines():
                key = line.split(":", 1)[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]))
            self.stop.wait(0.01)


def run_once(tool: str, src: Path, out: Path, conv: Path, log: Path) -> dict:
    """One conversion in a fresh process: wall seconds and the child's own peak RSS."""
    out.unlink(missing_ok=True)
    argv, cwd, env = command(tool, src, out, conv)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        sampler = _Sampler(proc.pid)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{tool} conversion failed (exit {proc.returncode}); last output:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024, "size_bytes": out.stat().st_size,
            "peak_rss_anon_mb_sampled": sampler.peak["RssAnon"] / 1024,
            "peak_rss_file_mb_sampled": sampler.peak["RssFile"] / 1024}


def warm_page_cache(src: Path) -> None:
    """Read the source once so the first timed run does not pay for cold disk reads alone."""
    for p in sorted(src.iterdir()):
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def compare_outputs(paths: dict[str, Path], prompt: str, threads: int) -> dict:
    """Load both GGUFs in llama.cpp; compare next-token logits, tensors and pre-tokenizer."""
    import gguf
    import numpy as np

    from kiln.runtime.llamacpp import LlamaCppEngine

    res: dict = {"prompt": prompt, "threads": threads}
    logits, ids = {}, {}
    for tool, path in paths.items():
        e = LlamaCppEngine(path, n_ctx=256, threads=threads, flash_attn=False, type_k=0, type_v=0)
        try:
            ids[tool] = e.tokenize(prompt)
            logits[tool] = np.asarray(e.score(ids[tool]), dtype=np.float32)[-1]
        finally:
            e.close()
    a, b = (logits[t] for t in TOOLS)
    res["same_tokens"] = ids["kiln"] == ids["llama.cpp"]
    res["tokens"] = {t: ids[t] for t in TOOLS}
    res["max_abs_logit_diff"] = float(np.max(np.abs(a - b))) if a.shape == b.shape else None
    res["same_argmax"] = bool(a.shape == b.shape and int(a.argmax()) == int(b.argmax()))
    res["argmax"] = {t: int(logits[t].argmax()) for t in TOOLS}

    tensors, pre = {}, {}
    for tool, path in paths.items():
        r = gguf.GGUFReader(path)
        tensors[tool] = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), t.data) for t in r.tensors}
        f = r.get_field("tokenizer.ggml.pre")
        pre[tool] = f.contents() if f is not None else None
    k, l = tensors["kiln"], tensors["llama.cpp"]
    common = sorted(set(k) & set(l))
    identical = sum(1 for n in common if k[n][:2] == l[n][:2] and np.array_equal(k[n][2], l[n][2]))
    res["tensors"] = {"kiln": len(k), "llama.cpp": len(l), "common": len(common), "byte_identical": identical,
                      "only_kiln": sorted(set(k) - set(l)), "only_llama.cpp": sorted(set(l) - set(k))}
    res["tokenizer_pre"] = pre
    return res


# --- report -------------------------------------------------------------------------------------



def versions(conv: Path) -> dict:
    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    return {"python": platform.python_version(), "torch": v("torch"), "transformers": v("transformers"),
            "gguf": v("gguf"), "gguf (llama.cpp bundled)": bundled_gguf_version(conv),
            "llama-cpp-python": v("llama-cpp-python"), "kiln": v("kiln-llm"), "numpy": v("numpy")}


def summarize(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    rss = [r["peak_rss_mb"] for r in runs]
    anon = [r["peak_rss_anon_mb_sampled"] for r in runs]
    file_ = [r["peak_rss_file_mb_sampled"] for r in runs]
    return {"wall_s_median": statistics.median(walls), "wall_s_min": min(walls), "wall_s_max": max(walls),
            "peak_rss_mb_median": statistics.median(rss), "peak_rss_mb_max": max(rss),
            "peak_rss_anon_mb_sampled_median": statistics.median(anon),
            "peak_rss_file_mb_sampled_median": statistics.median(file_),
            "size_bytes": runs[-1]["size_bytes"], "runs": runs}


def markdown(rep: dict) -> str:
    m, s, c = rep["machine"], rep["summary"], rep["check"]
    ver = ", ".join(f"{k} {v}" for k, v in rep["versions"].items())
    lines = [
        f"# Convert HF -> f16 GGUF: kiln vs llama.cpp ({rep['model']})",
        "",
        f"- date: {rep['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['ram_gb']} GB RAM, {m['os']}",
        f"- threads: conversion unpinned (torch default {rep['torch_threads']}); logits check {c['threads']}",
        f"- model: {rep['model']} (`{rep['src']}`, {rep['src_bytes'] / 1e6:.1f} MB on disk)",
        f"- versions: {ver}",
        f"- method: {rep['repeat']} rounds, fresh process per conversion, ABBA order, medians; "
        "peak RSS is the child's ru_maxrss (os.wait4), which counts mmap'd file pages too; "
        "its anon / file-backed split is the peak of RssAnon and RssFile polled every 10 ms "
        "(separate peaks, lower bounds); page cache warmed first",
        "",
        "| tool | wall s (median) | wall s (min) | wall s (max) | peak RSS MB (median) "
        "| of which anon / file-backed MB (sampled) | output bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in TOOLS:
        r = s[t]
        lines.append(f"| {t} | {r['wall_s_median']:.2f} | {r['wall_s_min']:.2f} | {r['wall_s_max']:.2f} "
                     f"| {r['peak_rss_mb_median']:.0f} | {r['peak_rss_anon_mb_sampled_median']:.0f} / "
                     f"{r['peak_rss_file_mb_sampled_median']:.0f} | {r['size_bytes']:,} |")
    rt, rm = rep["ratios"]["wall"], rep["ratios"]["peak_rss"]
    ra = rep["ratios"]["peak_rss_anon_sampled"]
    lines.append(f"| **kiln / llama.cpp** | **{rt:.2f}×** | | | **{rm:.2f}×** | anon {ra:.2f}× | "
                 f"{s['kiln']['size_bytes'] / s['llama.cpp']['size_bytes']:.4f}× |")
    diff = c["max_abs_logit_diff"]
    tens = c["tensors"]
    lines += [
        "",
        f"Goal (issue): kiln no slower (time ratio ≤ 1.00) and lower peak memory (RSS ratio < 1.00): "
        f"time {'met' if rt <= 1.0 else 'NOT met'}, memory {'met' if rm < 1.0 else 'NOT met'} "
        "(run-to-run noise here is about ±20%, DESIGN.md §8).",
        "",
        f"Check: both outputs load in llama.cpp; prompt {c['prompt']!r} → tokens "
        f"{'identical' if c['same_tokens'] else 'DIFFER'}, next-token max |Δlogit| = "
        f"{'n/a' if diff is None else f'{diff:.3g}'}, argmax {'same' if c['same_argmax'] else 'DIFFERS'} "
        f"({c['argmax']['kiln']}); tensors byte-identical {tens['byte_identical']}/{tens['common']} common "
        f"(kiln {tens['kiln']}, llama.cpp {tens['llama.cpp']}); tokenizer.ggml.pre kiln "
        f"{c['tokenizer_pre']['kiln']!r}, llama.cpp {c['tokenizer_pre']['llama.cpp']!r}.",
    ]
    for note in rep.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Time and peak memory of HF dir -> f16 GGUF: kiln's converter vs llama.cpp's "
                    "convert_hf_to_gguf.py, side by side in one run, as ratios.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="HF checkpoint directory (default: the smollm2-135m fixture)")
    ap.add_argument("--model", help="label for the model in the report (default: the source dir name)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each converts once with each tool (default 3)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                    help="where JSON and Markdown go (default bench/results/)")
    ap.add_argument("--work", type=Path, help="scratch dir for the GGUFs (default: a temp dir, removed after)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the logits check (default 2)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt for the logits check ({DEFAULT_PROMPT!r})")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if args.src is None:
        from kiln.fixtures import build

        with console.status("building / locating the smollm2-135m fixture"):
            args.src = Path(build("smollm2-135m"))
    src = args.src.expanduser().resolve()
    if not (src / "config.json").is_file():
        raise SystemExit(f"{src}: not a HF checkpoint directory (no config.json)")
    model = args.model or src.name
    try:
        with console.status("extracting llama.cpp's convert_hf_to_gguf.py"):
            conv = llama_converter()
    except KilnError as exc:
        raise SystemExit(str(exc)) from None

    work_ctx = tempfile.TemporaryDirectory(prefix="kiln-bench-convert-") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)
    outs = {"kiln": work / "kiln-f16.gguf", "llama.cpp": work / "llama.cpp-f16.gguf"}
    runs: dict[str, list[dict]] = {t: [] for t in TOOLS}
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as prog:
            task = prog.add_task("warming page cache", total=2 * args.repeat + 1)
            warm_page_cache(src)
            for i in range(args.repeat):
                order = TOOLS if i % 2 == 0 else TOOLS[::-1]
                for tool in order:
                    prog.update(task, description=f"round {i + 1}/{args.repeat}: {tool}")
                    r = run_once(tool, src, outs[tool], conv, work / f"{tool}-{i}.log")
                    runs[tool].append(r)
                    prog.console.log(f"{tool:9s} round {i + 1}: {r['wall_s']:.2f} s, {r['peak_rss_mb']:.0f} MB")
                    prog.advance(task)
            prog.update(task, description="logits check in llama.cpp")
            check = compare_outputs(outs, args.prompt, args.threads)
            prog.advance(task)
    finally:
        if work_ctx:
            work_ctx.cleanup()

    import torch

    summary = {t: summarize(runs[t]) for t in TOOLS}
    now = dt.datetime.now().astimezone()
    rep = {
        "benchmark": "convert-hf-to-f16-gguf",
        "date": now.isoformat(timespec="seconds"),
        "model": model,
        "src": str(src),
        "src_bytes": sum(p.stat().st_size for p in src.iterdir() if p.is_file()),
        "repeat": args.repeat,
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(conv),
        "commands": {"kiln": "python -c <load_checkpoint; export_gguf(..., quant_type('f16'), ckpt.spec.rope)>",
                     "llama.cpp": "python convert_hf_to_gguf.py SRC --outtype f16 --outfile OUT "
                                  f"(llama-cpp-python {LLAMA_CPP_PYTHON} sdist, bundled gguf-py)"},
        "summary": summary,
        "ratios": {"wall": summary["kiln"]["wall_s_median"] / summary["llama.cpp"]["wall_s_median"],
                   "peak_rss": summary["kiln"]["peak_rss_mb_median"] / summary["llama.cpp"]["peak_rss_mb_median"],
                   "peak_rss_anon_sampled": summary["kiln"]["peak_rss_anon_mb_sampled_median"]
                   / max(summary["llama.cpp"]["peak_rss_anon_mb_sampled_median"], 1e-9)},
        "check": check,
        "notes": [],
    }
    if check["max_abs_logit_diff"] is None or not check["same_tokens"]:
        rep["notes"].append("the two outputs do not give comparable logits; see check in the JSON")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"convert-{model}-{now.strftime('%Y%m%d-%H%M%S')}"
    md = markdown(rep)
    (args.out / f"{stem}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    console.print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
