#!/usr/bin/env python
"""Long-range quality of SmolLM2-135M (native 8K) with baked RoPE settings: the table of docs/long-context.md.

SmolLM2-135M-Instruct (the real fixture, `kiln.fixtures.build("smollm2-135m")`) is exported with kiln's own
API for every rope SETTING (none, linear:2, yarn:2 → 16K, linear:4, yarn:4 → 32K; original context 8192) and
every QUANT (f16, q8_0, q4_k_m GGUF, int4 ONNX), cached under $KILN_CACHE/bench-artifacts. Each artifact is then
measured by `kiln.longeval.long_eval` (NLL by position from one long forward at its window, passkey retrieval
at the given depths and lengths), with the unscaled artifact of the same quantization as the truncation
baseline. Every (artifact, length, depth) cell is cached under OUT/cache: an interrupted run resumes.

Writes OUT/longeval.{json,md}, OUT/nll_by_position.png, OUT/passkey_heatmap.png, the section between the
markers in docs/long-context.md and, on a full run only (the default grid), src/kiln/data/rope_findings.json:
a setting is recorded as harmful when every quantization measured with it scored a higher mean NLL over its
window than the unscaled model truncated to 8K over the same tokens (`kiln export` then warns).

Cost (2 cores): an 8K prefill of SmolLM2 takes about 40 s in llama.cpp, a 32K one several minutes; the default
grid (20 artifacts; NLL at each window; passkey at 0.1/0.5/0.9 at each window) takes hours. `make bench` runs it.

    .venv/bin/python bench/longctx.py                                         # the full grid (hours)
    .venv/bin/python bench/longctx.py --settings none --quants q8_0 --lengths 512,1024 --depths 0.1,0.9 \\
        --threads 1 -o /tmp/longctx-smoke --smoke                             # a smoke run (minutes)
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


def cache() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench-artifacts"


def artifact(src: Path, setting: str, quant: str, verify: bool) -> Path:
    from kiln.pipeline import export_gguf_artifact, export_onnx_artifact

    tag = "" if setting == "none" else "-" + setting.replace(":", "")
    out = cache() / (f"longctx-smollm2-135m{tag}-{quant}" if quant == "int4" else f"longctx-smollm2-135m{tag}.{quant}.gguf")
    if out.exists():
        return out
    print(f"exporting {out.name} (once; cached in {out.parent})", file=sys.stderr)
    rope = {} if setting == "none" else {"rope_scaling": setting, "original_context": NATIVE}
    out.parent.mkdir(parents=True, exist_ok=True)
    if quant == "int4":
        export_onnx_artifact(src, out, "int4", verify=verify, threads=2, **rope)
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
    ap.add_argument("--smoke", action="store_true",
                    help="a smoke run: writes OUT only, neither docs/long-context.md nor the findings file")
    ap.add_argument("-o", "--out", type=Path, default=REPO / "bench" / "results" / "longctx")
    args = ap.parse_args()

    from kiln.fixtures import build

    src = build("smollm2-135m", progress=False)
    settings, quants = args.settings.split(","), args.quants.split(",")
    lengths = L.parse_lengths(args.lengths) if args.lengths else None
    depths = L.parse_depths(args.depths)
    arts = {(s, q): artifact(src, s, q, not args.no_verify) for s in settings for q in quants}

    def show(info: L.LongProgress) -> None:
        print("\r" + info.text()[:150].ljust(150), end="", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    results: dict[tuple[str, str], dict] = {}
    merged: dict | None = None
    for q in quants:  # one run per quantization: its unscaled artifact is the truncation baseline
        group = [(s, arts[(s, q)]) for s in settings]
        base = arts.get(("none", q)) if any(s != "none" for s in settings) else None
        res = L.long_eval([p for _, p in group], lengths, depths=depths, baseline=base, cache_dir=args.out / "cache",
                          threads=args.threads, progress=show)
        for (s, _), row in zip(group, res["rows"]):
            results[(s, q)] = row
        if merged is None:
            merged = res
        else:
            merged["rows"] += res["rows"]
            merged["cells"] += res["cells"]
            merged["cells_cached"] += res["cells_cached"]
    print(file=sys.stderr)
    merged["machine"] = {"cores": os.cpu_count(), "threads": args.threads}
    merged["seconds"] = round(time.monotonic() - t0, 1)
    L.write_outputs(merged, args.out)
    md = L.markdown(merged)
    print(md)
    if args.smoke:
        return
    section = (f"{BEGIN}\n_Produced by `bench/longctx.py` (`make bench`) on {os.cpu_count()} cores, {args.threads} "
               f"thread(s), {merged['seconds']:.0f} s; truncation baseline: the unscaled artifact of the same "
               f"quantization in pieces of {NATIVE} tokens._\n\n{md}\n"
               f"![NLL by position](../bench/results/longctx/nll_by_position.png)\n"
               f"![passkey](../bench/results/longctx/passkey_heatmap.png)\n{END}")
    doc = REPO / "docs" / "long-context.md"
    text = doc.read_text()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        doc.write_text(text)
    full = set(settings) == set(SETTINGS) and set(quants) == set(QUANTS) and lengths is None
    if full:
        (REPO / "src" / "kiln" / "data" / "rope_findings.json").write_text(json.dumps(
            {"source": "bench/longctx.py", "findings": findings(results)}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
