"""`kiln bench`: speed and memory of exported artifacts across context lengths, with anchors.

Every configuration (artifact x context x KV type x flash attention x particles) runs in a fresh
process (kiln.bench.probe) so that its peak RSS is its own. Next to kiln's own engine, the same
file runs in the anchor in one process with alternating turns (llama-cpp-python's high-level
`Llama`, or onnxruntime-genai's `Generator`): their ratio shows the harness adds no overhead.
Decode speed is also put against this machine's bandwidth bound (bandwidth / bytes per token).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.bench.geometry import Geometry, read_geometry
from kiln.bench.machine import copy_bandwidth, machine, versions
from kiln.bench.probe import ProbeSpec
from kiln.errors import KilnError
from kiln.formats import by_name

Progress = Callable[[str, int, int], None]
KV_TYPES = ("f16", "q8_0", "q4_0", "f32")
FLASH = {"off": False, "on": True}


@dataclass
class BenchOptions:
    contexts: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    threads: int = 2
    particles: list[int] = field(default_factory=lambda: [1])
    kv_types: list[str] = field(default_factory=lambda: ["f16"])  # llama.cpp only
    flash_attn: list[str] = field(default_factory=lambda: ["off"])  # llama.cpp only: "off", "on"
    anchors: bool = True
    anchor_max_context: int | None = None  # pair probes only up to this context (None: all)
    n_gen: int = 32
    label: str | None = None  # e.g. "cost only, random weights"

    def check(self) -> None:
        if not self.contexts or any(c < 64 for c in self.contexts):
            raise KilnError(f"contexts must be at least 64 tokens, got {self.contexts}")
        if self.threads < 1:
            raise KilnError(f"--threads must be at least 1, got {self.threads}")
        if not self.particles or any(n < 1 for n in self.particles):
            raise KilnError(f"--particles must be at least 1, got {self.particles}")
        bad = [k for k in self.kv_types if k not in KV_TYPES]
        if bad:
            raise KilnError(f"unknown KV-cache type {bad[0]!r} (known: {', '.join(KV_TYPES)})")
        bad = [f for f in self.flash_attn if f not in FLASH]
        if bad:
            raise KilnError(f"flash attention must be 'on' or 'off', got {bad[0]!r}")


def _configs(geo: Geometry, opts: BenchOptions) -> list[tuple[str, str]]:
    if not by_name(geo.format).configurable_kv:
        return [("graph", "n/a")]  # ONNX: the KV type is the graph's, attention is GroupQueryAttention
    return [(k, f) for k in opts.kv_types for f in opts.flash_attn]


def probe_in_process_of_its_own(spec: ProbeSpec, timeout: float | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "kiln.bench.probe", json.dumps(asdict(spec))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def _row(path: Path, geo: Geometry, context: int, kv: str, fa: str, n: int) -> dict[str, Any]:
    return {"artifact": path.name, "path": str(path), "format": geo.format, "context": context,
            "kv_type": kv if by_name(geo.format).configurable_kv else
            f"graph {'f16' if geo.kv_bytes_per_elem == 2 else 'f32'}",
            "flash_attn": fa, "particles": n, "model_bytes": geo.model_bytes,
            "note": geo.context_note(context)}


def _derive(row: dict[str, Any], geo: Geometry, kv: str, bandwidth: float) -> None:
    """Formula KV bytes, bytes read per decode step and the bandwidth bound, next to what was measured."""
    fmt = by_name(geo.format)
    kv_type = kv if fmt.configurable_kv else None
    rows = 1 if fmt.shared_kv_pool else row["particles"]  # llama.cpp: one unified cache of n_ctx cells
    row["kv_bytes_formula"] = geo.kv_bytes(geo.kv_cells(row["context"]), kv_type) * rows
    depth = row.get("prompt_tokens")
    if depth is not None and row.get("tg_tok_s") and row["particles"] == 1:
        step_bytes = geo.streamed_bytes + geo.kv_bytes(depth, kv_type)
        row["bytes_per_token"] = step_bytes
        row["bandwidth_bound_tok_s"] = bandwidth / step_bytes
        row["fraction_of_bound"] = row["tg_tok_s"] / row["bandwidth_bound_tok_s"]


def run_bench(artifacts: Sequence[str | Path], options: BenchOptions, out: str | Path | None = None,
              progress: Progress | None = None, force: bool = False) -> dict[str, Any]:
    """Measure every configuration; write bench.json/.md/.png to `out` when given; return the report.

    `out` is a directory artifact (with manifest.json): a path holding anything else is refused
    before measuring, unless `force`; a previous kiln bench directory there is replaced whole."""
    options.check()
    if out is not None:
        from kiln.outputs import check_output

        check_output(out, "bench", force=force, sources=artifacts)
    paths = [Path(a) for a in artifacts]
    geos = {p: read_geometry(p) for p in paths}
    for p, g in geos.items():
        if g.format == "hf":
            raise KilnError(f"{p}: a checkpoint, not an artifact: export it first (kiln export gguf/onnx)")
    jobs: list[tuple[Path, int, str, str, int, str]] = []
    for p in paths:
        for c in options.contexts:
            for kv, fa in _configs(geos[p], options):
                for n in options.particles:
                    jobs.append((p, c, kv, fa, n, "kiln"))
                if options.anchors and (options.anchor_max_context is None or c <= options.anchor_max_context):
                    jobs.append((p, c, kv, fa, 1, "pair"))
    if progress:
        progress("bandwidth", 0, 1)
    bandwidth = copy_bandwidth(options.threads)
    rows: list[dict[str, Any]] = []
    anchors: dict[tuple, dict[str, Any]] = {}
    for i, (p, c, kv, fa, n, kind) in enumerate(jobs):
        if progress:
            progress(f"{p.name} ctx {c} {kind} N={n}", i, len(jobs))
        geo = geos[p]
        row = _row(p, geo, c, kv, fa, n)
        skip = None
        if c > geo.context_length:
            skip = row["note"]
        elif by_name(geo.format).configurable_kv and kv not in ("f16", "f32") and fa == "off":
            skip = "a quantized V cache needs flash attention (llama.cpp refuses it with flash attention off)"
        if skip:
            if kind == "kiln":
                rows.append({**row, "skipped": skip})
            continue
        spec = ProbeSpec(str(p), kind, c, n, options.n_gen, options.threads,
                         kv if by_name(geo.format).configurable_kv else "f16", FLASH.get(fa, False))
        result = probe_in_process_of_its_own(spec)
        result.pop("spec", None)
        if kind == "pair":
            anchors[(p, c, kv, fa)] = result
            continue
        row.update(result)
        _derive(row, geo, kv, bandwidth)
        rows.append(row)
    for row in rows:  # the anchor figures go on the N=1 row of the same configuration
        pair = anchors.get((Path(row["path"]), row["context"], row.get("kv_type"), row["flash_attn"]))
        if pair is None and row["format"] == "onnx":
            pair = anchors.get((Path(row["path"]), row["context"], "graph", "n/a"))
        if pair and row["particles"] == 1:
            row["anchor"] = {"name": "llama-cpp-python Llama.generate" if row["format"] == "gguf"
                             else "onnxruntime-genai Generator", **pair}
    if progress:
        progress("done", len(jobs), len(jobs))
    report = {
        "benchmark": "kiln-bench", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "label": options.label, "options": asdict(options), "machine": machine(), "versions": versions(),
        "bandwidth_bytes_s": bandwidth, "artifacts": {p.name: geos[p].to_json() for p in paths}, "rows": rows,
    }
    _attach_predictions(report, geos)
    if out is not None:
        from kiln.atomic import atomic_dir
        from kiln.bench.report import write_report
        from kiln.manifest import file_record, write_manifest_file
        from kiln.outputs import may_replace

        with atomic_dir(out, may_replace("bench", force)) as tmp:
            write_report(report, tmp)
            files = [file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()]
            write_manifest_file(tmp / "manifest.json", {"kind": "bench", "files": files})
    return report


def _attach_predictions(report: dict[str, Any], geos: dict[Path, Geometry]) -> None:
    """kiln plan's predicted peak memory for each measured row, and its error (the 15% check)."""
    from kiln.bench.cost_model import predict_peak

    for row in report["rows"]:
        if row.get("peak_rss_kib") is None:
            continue
        geo = geos[Path(row["path"])]
        kv = row["kv_type"] if by_name(geo.format).configurable_kv else None
        pred = predict_peak(geo, row["context"], kv_type=kv, particles=row["particles"],
                            flash_attn=row["flash_attn"] == "on")
        row["predicted_peak_bytes"] = pred.total
        row["prediction_error"] = pred.total / (row["peak_rss_kib"] * 1024) - 1
