#!/usr/bin/env python
"""Long-range quality of SmolLM2-135M (native 8K) with baked RoPE settings: the table of docs/long-context.md.

SmolLM2-135M-Instruct (the real fixture, `kiln.fixtures.build("smollm2-135m")`) is exported with kiln's own
API for every rope SETTING (none, linear:2, yarn:2 → 16K, linear:4, yarn:4 → 32K; original context 8192) and
every QUANT (f16, q8_0, q4_k_m GGUF, int4 ONNX), cached under $KILN_CACHE/bench-artifacts. Each artifact is then
measured by `kiln.longeval.long_eval` (NLL by position from one long forward at its window, passkey retrieval
at the given depths and lengths), with the unscaled artifact of the same quantization as the truncation
baseline. Every (artifact, length, depth) cell is one JSON file under CELLS (default docs/long-context/cells,
committed), keyed by the artifact's content hash: exports are deterministic, so a cell measured in one sitting
is found again in the next on another machine, and a changed exporter or engine setting measures again. The
NLL cells of every artifact run first (all quantizations), then the passkey cells (unscaled and YaRN before
linear, q8_0 and int4 first); `--budget MINUTES` starts
no cell after that many minutes, so the grid is filled in sittings and each one's cells are committed.

Writes docs/long-context/longeval.{json,md}, nll_by_position.png, passkey_heatmap.png, the section between the
markers in docs/long-context.md (saying how many cells are still missing) and, once every NLL cell of the
default grid is measured, src/kiln/data/rope_findings.json: a setting is recorded as harmful when every quantization measured
with it scored a higher mean NLL over its window than the unscaled model truncated to 8K over the same tokens
(`kiln export` then warns).

Cost (2 cores, llama.cpp with flash attention, measured): one forward with every position's logits takes
about 75 s at 8K, 245 s at 16K and about 15 min at 32K for the GGUF files, half that for int4 ONNX; the NLL
cells of the default grid take about 2.5 hours and the passkey cells (three per artifact, at its window)
about three times that. `make bench` runs what is missing with `--budget 180`.

    .venv/bin/python bench/longctx.py                                         # the full grid (hours)
    .venv/bin/python bench/longctx.py --settings none --quants q8_0 --lengths 512,1024 --depths 0.1,0.9 \\
        --threads 1 -o /tmp/longctx-smoke --cells /tmp/longctx-smoke/cells --smoke   # a smoke run (minutes)
    .venv/bin/python bench/longctx.py --budget 90                             # a sitting: what is missing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from kiln import longeval as L  # noqa: E402

SETTINGS = ("none", "linear:2", "yarn:2", "linear:4", "yarn:4")
QUANTS = ("f16", "q8_0", "q4_k_m", "int4")
NATIVE = 8192
BEGIN, END = "<!-- longctx:begin -->", "<!-- longctx:end -->"
ORDER = ("q8_0", "int4", "q4_k_m", "f16")  # the sittings fill the most used quantizations first
# passkey cells by setting: the unscaled baseline and YaRN (the settings that can keep a model useful) before
# linear scaling, whose NLL is already worse than truncation from the first token
PASSKEY_ORDER = ("none", "yarn:2", "yarn:4", "linear:2", "linear:4")
DOCS = REPO / "docs" / "long-context"


def cache() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench-artifacts"


def artifact(src: Path, setting: str, quant: str, verify: bool) -> Path:
    from kiln.pipeline import export_gguf_artifact

    tag = "" if setting == "none" else "-" + setting.replace(":", "")
    out = cache() / (f"longctx-smollm2-135m{tag}-{quant}" if quant == "int4" else f"longctx-smollm2-135m{tag}.{quant}.gguf")
    if out.exists():
        return out
    print(f"exporting {out.name} (once; cached in {out.parent})", file=sys.stderr)
    rope = {} if setting == "none" else {"rope_scaling": setting, "original_context": NATIVE}
    out.parent.mkdir(parents=True, exist_ok=True)
    if quant == "int4":
        # in a child under kiln.pinned_math's environment: the rotary caches are then the same bytes on Intel
        # and AMD hosts, so the committed cells (keyed by the bytes) are found again on either
        import subprocess

        from kiln.pinned_math import PINNED_MATH_ENV

        flags = ["--rope-scaling", setting, "--original-context", str(NATIVE)] if rope else []
        argv = ["export", "onnx", str(src), "-o", str(out), "--precision", "int4", "--threads", "2", *flags,
                *([] if verify else ["--no-verify"])]
        proc = subprocess.run([sys.executable, "-c", "from kiln.cli import main; main()", *argv],
                              env={**os.environ, **PINNED_MATH_ENV}, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"exporting {out.name} failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    else:
        export_gguf_artifact(src, out, quant, verify=verify, threads=2, **rope)
    return out


def findings(results: dict[tuple[str, str], dict]) -> list[dict]:
    """One finding per scaled setting: harmful when every quantization measured was worse than truncation."""
    out = []
    for setting in SETTINGS[1:]:
        rows = [(q, r) for (s, q), r in results.items() if s == setting]
        verdicts = [(q, e) for q, r in rows for e in r["lengths"] if "worse_than_truncation" in e]
        if not verdicts:
            continue
        kind, factor = setting.split(":")
        harmful = all(e["worse_than_truncation"] for _, e in verdicts)
        evidence = "; ".join(f"{q} at {e['length']}: NLL {e['mean_nll']:.3f} vs truncated {e['truncated_nll']:.3f}"
                             for q, e in verdicts)
        out.append({"family": "llama", "model": "SmolLM2-135M-Instruct", "type": kind, "factor": float(factor),
                    "original_context": NATIVE, "harmful": harmful, "evidence": f"SmolLM2-135M, {evidence}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--lengths", help="lengths for every artifact (default: each artifact's window)")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-verify", action="store_true", help="export without the parity check")
    ap.add_argument("--exact", action="store_true", help="the engines' verification settings (llama.cpp: no flash "
                    "attention, f32 KV): slower, cells of their own")
    ap.add_argument("--budget", type=float, help="start no cell after this many minutes (default: no limit)")
    ap.add_argument("--smoke", action="store_true",
                    help="a smoke run: writes OUT only, neither docs/long-context.md nor the findings file")
    ap.add_argument("--cells", type=Path, default=DOCS / "cells", help="the cell cache (default: the committed one)")
    ap.add_argument("-o", "--out", type=Path, default=DOCS)
    args = ap.parse_args()
    deadline = time.monotonic() + 60 * args.budget if args.budget is not None else None

    from kiln.fixtures import build

    src = build("smollm2-135m", progress=False)
    settings = args.settings.split(",")
    quants = sorted(args.quants.split(","), key=lambda q: ORDER.index(q) if q in ORDER else len(ORDER))
    lengths = L.parse_lengths(args.lengths) if args.lengths else None
    depths = L.parse_depths(args.depths)
    paths = {(s, q): artifact(src, s, q, not args.no_verify) for s in settings for q in quants}
    arts = {k: L.describe(p) for k, p in paths.items()}  # described and content-hashed once for every pass
    text, text_info = L.text_record()

    def show(info: L.LongProgress) -> None:
        print("\r" + info.text()[:150].ljust(150), end="", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    results: dict[tuple[str, str], dict] = {}
    merged: dict | None = None
    def baseline(q: str) -> L.Artifact | None:  # the truncation baseline of a quantization's scaled artifacts
        return arts.get(("none", q)) if any(s != "none" for s in settings) else None

    common = dict(depths=depths, cache_dir=args.cells, threads=args.threads, progress=show, exact=args.exact,
                  text=text, text_info=text_info)
    # NLL of every artifact first
    for q in quants:
        L.long_eval([arts[(s, q)] for s in settings], lengths, baseline=baseline(q), retrieval=False,
                    deadline=deadline, **common)
    # then the passkeys, setting by setting
    for s in sorted(settings, key=lambda s: PASSKEY_ORDER.index(s) if s in PASSKEY_ORDER else len(PASSKEY_ORDER)):
        for q in quants:
            L.long_eval([arts[(s, q)]], lengths, perplexity=False, deadline=deadline, **common)
    # the last pass only gathers (every cell cached or missing), one run per quantization: its unscaled
    # artifact is the truncation baseline
    for q in quants:
        res = L.long_eval([arts[(s, q)] for s in settings], lengths, baseline=baseline(q),
                          deadline=time.monotonic() - 1, **common)
        for s, row in zip(settings, res["rows"]):
            results[(s, q)] = row
        if merged is None:
            merged = res
        else:
            merged["rows"] += res["rows"]
            for k in ("cells", "cells_cached", "cells_missing"):
                merged[k] += res[k]
    print(file=sys.stderr)
    merged["machine"] = {"cores": os.cpu_count(), "threads": args.threads}
    merged["seconds"] = round(time.monotonic() - t0, 1)
    quant_of = {Path(path).name: q for (_, q), path in paths.items()}
    L.write_outputs(merged, args.out, panel_of=lambda name: quant_of.get(name, ""))
    md = L.markdown(merged)
    print(md)
    missing = merged["cells_missing"]
    print(f"{merged['cells']} cells measured, {missing} missing", file=sys.stderr)
    if args.smoke:
        return
    rel = os.path.relpath(args.out, REPO / "docs")
    todo = (f"**{missing} of {merged['cells'] + missing} cells are not measured yet** (`bench/longctx.py --budget "
            f"MINUTES` measures the missing ones, NLL first); the rows below are those measured so far.\n\n"
            if missing else "")
    section = (f"{BEGIN}\n_Produced by `bench/longctx.py` (`make bench`) on {os.cpu_count()} cores, {args.threads} "
               f"thread(s), engine path: {merged['engine']}; truncation baseline: the unscaled artifact of the "
               f"same quantization in pieces of {NATIVE} tokens. Cells in `{os.path.relpath(args.cells, REPO)}`; "
               f"raw figures in `{rel}/longeval.json`._\n\n{todo}{md}\n"
               f"![NLL by position]({rel}/nll_by_position.png)\n"
               + (f"![passkey]({rel}/passkey_heatmap.png)\n" if (args.out / "passkey_heatmap.png").exists() else "")
               + END)
    doc = REPO / "docs" / "long-context.md"
    text = doc.read_text()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        doc.write_text(text)
    # the harmful verdict rests on NLL alone: written once every NLL cell of the default grid is measured
    nll_done = all("mean_nll" in e and (s == "none" or "truncated_nll" in e)
                   for (s, _), row in results.items() for e in row["lengths"])
    full = set(settings) == set(SETTINGS) and set(quants) == set(QUANTS) and lengths is None and nll_done
    if full:
        (REPO / "src" / "kiln" / "data" / "rope_findings.json").write_text(json.dumps(
            {"source": "bench/longctx.py", "findings": findings(results)}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
