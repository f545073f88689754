"""`kiln bench` and `kiln plan`: thin click commands over kiln.bench.run and kiln.bench.plan."""

from __future__ import annotations

from pathlib import Path

import click

from kiln.cli_common import emit_json, progress
from kiln.errors import KilnError


def _ints(text: str, what: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            out.append(int(float(part[:-1] if mult > 1 else part) * mult))
        except ValueError:
            raise KilnError(f"{what}: cannot read {part!r} as a number (example: 512,2048,8K)") from None
    if not out:
        raise KilnError(f"{what}: no values given")
    return out


def _words(text: str) -> list[str]:
    return [w.strip().lower() for w in text.split(",") if w.strip()]


@click.command("bench")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--contexts", default="512,2048,8192", show_default=True,
              help="Context lengths (comma-separated; 8K = 8192).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--particles", default="1", show_default=True, help="Sequences decoding together (e.g. 1,16).")
@click.option("--kv-type", "kv_types", default="f16", show_default=True,
              help="llama.cpp KV-cache types to compare (f16, q8_0, q4_0, f32; quantized V needs --flash-attn on).")
@click.option("--flash-attn", "flash", default="off", show_default=True, help="llama.cpp flash attention: off, on, or off,on.")
@click.option("--no-anchor", is_flag=True, help="Skip the llama-cpp-python / onnxruntime-genai anchor runs.")
@click.option("--anchor-max-context", type=int, default=None, help="Run the anchor only up to this context.")
@click.option("--tokens", "n_gen", type=int, default=32, show_default=True, help="Timed generation steps per run.")
@click.option("--label", default=None, help="A label for the report (e.g. 'cost only, random weights').")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
              help="Directory to create for bench.json, bench.md, bench.png and manifest.json (an existing one "
                   "is replaced only if it is an earlier kiln bench directory).")
@click.option("--force", is_flag=True, help="Replace an existing -o directory that kiln did not write.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench_cmd(artifacts: tuple[Path, ...], contexts: str, threads: int, particles: str, kv_types: str, flash: str,
              no_anchor: bool, anchor_max_context: int | None, n_gen: int, label: str | None, out: Path,
              force: bool, as_json: bool) -> None:
    """Measure GGUF and ONNX artifacts across context lengths: prompt and generation speed, time to
    first token, peak memory, KV-cache bytes (measured and from the formula), each next to the same
    file in llama-cpp-python's / onnxruntime-genai's own loop and to this machine's bandwidth bound.

    Every configuration runs in a fresh process, so peak RSS is that configuration's alone.
    Contexts beyond an artifact's window are skipped; those beyond its native window (baked RoPE
    scaling) are marked.

    \b
    Examples:
      kiln bench out/smol.q4_k_m.gguf out/smol.q8_0.gguf --contexts 512,2048,8192
      kiln bench out/smol.q4_k_m.gguf --kv-type f16,q8_0 --flash-attn on --particles 1,16
      kiln bench out/smol-int4 --contexts 1K,4K --threads 4 -o out/bench --json
    """
    from kiln.bench.run import BenchOptions, run_bench

    opts = BenchOptions(contexts=_ints(contexts, "--contexts"), threads=threads,
                        particles=_ints(particles, "--particles"), kv_types=_words(kv_types),
                        flash_attn=_words(flash), anchors=not no_anchor, anchor_max_context=anchor_max_context,
                        n_gen=n_gen, label=label)
    for a in artifacts:
        if not a.exists():
            raise KilnError(f"{a}: no such file or directory")
    with progress(True) as update:
        report = run_bench(list(artifacts), opts, out, progress=update, force=force)
    if as_json:
        emit_json(report)
        return
    from kiln.bench.report import markdown

    click.echo(markdown(report))
    click.echo(f"wrote {out}/bench.json, bench.md" + (", bench.png" if (out / "bench.png").exists() else ""))


@click.command("plan")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--memory", required=True, help="Memory budget: 8GiB, 512MiB, 16GB ...")
@click.option("--context", default=None, help="Context you need (default: the model's full context).")
@click.option("--target", type=click.Choice(["gguf", "onnx"]), default="gguf", show_default=True)
@click.option("--kv-type", default="f16", show_default=True, help="llama.cpp KV-cache type (gguf target).")
@click.option("--flash-attn", is_flag=True, help="Plan for llama.cpp with flash attention on (smaller compute buffer).")
@click.option("--particles", type=int, default=1, show_default=True, help="SMC particles (ONNX: one KV row each).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(src: Path, memory: str, context: str | None, target: str, kv_type: str, flash_attn: bool,
             particles: int, as_json: bool) -> None:
    """Recommend a quantization and the largest context that fit a memory budget, from SRC's config.

    Weights per type follow llama.cpp's own per-tensor choices; KV is 2·layers·kv_heads·head_dim
    bytes per token; compute buffers and the runtime are the cost model that `kiln bench` checks
    against measured peak memory.

    \b
    Examples:
      kiln plan ~/.cache/kiln/fixtures/smollm2-135m --memory 512MiB
      kiln plan ./Qwen2.5-0.5B-Instruct --memory 8GiB --context 32K
      kiln plan ./Qwen2.5-0.5B-Instruct --memory 2GiB --target onnx --json
    """
    from kiln.bench.geometry import KV_TYPE_BYTES
    from kiln.bench.plan import parse_size, plan

    if kv_type not in KV_TYPE_BYTES:
        raise KilnError(f"unknown KV-cache type {kv_type!r} (known: {', '.join(KV_TYPE_BYTES)})")
    ctx = _ints(context, "--context")[0] if context else None
    p = plan(src, parse_size(memory), ctx, target, kv_type=kv_type, flash_attn=flash_attn, particles=particles)
    if as_json:
        emit_json(p.to_json())
        return
    click.echo(p.explanation)
    click.echo("")
    click.echo(f"{'type':<8} {'bpw':>6} {'weights':>11} {'largest context':>16}  fits")
    for c in p.candidates:
        click.echo(f"{c.quant:<8} {c.bits_per_weight:>6.2f} {c.weights / 2**20:>8.1f} MiB {c.max_context:>16}  "
                   f"{'yes' if c.fits else 'no'}")
    if p.recommended is None:
        raise SystemExit(1)
