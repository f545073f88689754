"""bench.json, bench.md and bench.png: one row per configuration, every figure labelled (as llama-bench)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.atomic import atomic_file

MIB = 2 ** 20


def _f(value: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def markdown(report: dict[str, Any]) -> str:
    m, o = report["machine"], report["options"]
    lines = [
        f"# kiln bench{' — ' + report['label'] if report.get('label') else ''}",
        "",
        f"- machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['ram_gb']} GB RAM; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m.get('load_avg') or [])}",
        f"- threads: {o['threads']}; memory bandwidth (numpy copy, read+write, {o['threads']} threads): "
        f"{report['bandwidth_bytes_s'] / 1e9:.1f} GB/s; versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        f"- {report['date']}. TTFT = prefill of a prompt that fills the context less the room for generation "
        "(prompt tokens column); pp = those prompt tokens / TTFT; tg = tokens generated per second at that depth "
        "(N particles: N sequences stepping together, tokens of all of them); "
        "bound = bandwidth / (model bytes + KV bytes at that depth); peak RSS = the probe process's VmHWM; "
        "KV = bytes the engine allocated (llama.cpp's log; ONNX: kiln's past/present buffers) / the formula "
        "2·layers·kv_heads·head_dim·context·bytes; predicted = `kiln plan`'s cost model.",
        "- anchor: llama-cpp-python's high-level `Llama.generate` (GGUF) or onnxruntime-genai's `Generator` (ONNX) "
        "on the same file in one process, decoding in alternating chunks with kiln's engine; kiln/anchor = ratio "
        "of their decode tokens/s.",
        "",
        "| artifact | ctx | KV type | FA | N | prompt tok | TTFT s | pp tok/s | tg tok/s | % of bound | "
        "peak RSS MiB | predicted MiB (err) | KV MiB meas / formula | model MiB | anchor tg tok/s | kiln/anchor | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['artifact']} | {r['context']} | {r['kv_type']} | {r['flash_attn']} | {r['particles']} "
                         f"| | | | | | | | | | | | {r.get('skipped') or 'error: ' + r['error']} |")
            continue
        a = r.get("anchor") or {}
        frac = r.get("fraction_of_bound")
        pred = r.get("predicted_peak_bytes")
        pred_s = f"{pred / MIB:.0f} ({100 * r['prediction_error']:+.0f}%)" if pred else "–"
        lines.append(
            f"| {r['artifact']} | {r['context']} | {r['kv_type']} | {r['flash_attn']} | {r['particles']} | "
            f"{r['prompt_tokens']} | {r['ttft_s']:.2f} | {r['pp_tok_s']:.0f} | {r['tg_tok_s']:.1f} | "
            f"{'–' if frac is None else f'{100 * frac:.0f}%'} | {_f(r['peak_rss_kib'], '.0f', 1024)} | {pred_s} | "
            f"{_f(r.get('kv_bytes_measured'), '.1f', MIB)} / {_f(r.get('kv_bytes_formula'), '.1f', MIB)} | "
            f"{r['model_bytes'] / MIB:.1f} | {_f(a.get('anchor_tg_tok_s'))} | "
            f"{_f(a.get('tg_ratio_kiln_over_anchor'), '.3f')} | {r.get('note') or ''} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Decode and prompt speed and peak memory vs context, one line per artifact (N=1, first KV/FA option)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"] if "ttft_s" in r and r["particles"] == 1]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['artifact']} (KV {r['kv_type']}, FA {r['flash_attn']})", []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        axes[0].plot(x, [r["tg_tok_s"] for r in rs], marker="o", label=name)
        axes[1].plot(x, [r["pp_tok_s"] for r in rs], marker="o", label=name)
        axes[2].plot(x, [r["peak_rss_kib"] / 1024 for r in rs], marker="o", label=name)
    titles = ("token generation (tok/s)", "prompt processing (tok/s)", "peak RSS (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"kiln bench{' — ' + report['label'] if report.get('label') else ''}: {m['cpu']}, "
                 f"{report['options']['threads']} threads", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path, stem: str = "bench") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_file(paths["md"]) as tmp:
        tmp.write_text(markdown(report))
    if plot(report, out / f"{stem}.png"):
        paths["png"] = out / f"{stem}.png"
    return paths
