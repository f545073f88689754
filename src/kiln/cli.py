"""The `kiln` command line: a thin layer over kiln's Python API.

Every user-fixable problem surfaces as one line on stderr and exit code 1 (2 for
bad usage, 130 for Ctrl-C); tracebacks are reserved for bugs in kiln itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from kiln import __version__
from kiln.cli_common import emit_json, options, progress, read_text, stderr_console
from kiln.errors import KilnError

OVERFLOW_CHOICES = ("error", "truncate", "chunk")  # kiln.runtime.document.OVERFLOW_POLICIES (not imported: fast --help)
RANK_CHOICES = ("bm25", "likelihood")
PACK_CHOICES = ("relevant", "fill")

_rope_options = options(
    click.option("--rope-scaling", help="Bake RoPE scaling: linear:F, yarn:F or none (default: from config.json)."),
    click.option("--original-context", type=int, help="Context the model was trained at (for --rope-scaling)."),
    click.option("--context", type=int, help="Context length the artifact advertises (default: factor x original)."),
    click.option("--allow-shorter-context", is_flag=True, help="Permit --context below the trained context."),
)
_force_option = click.option(
    "--force", is_flag=True,
    help="Replace an existing output that kiln did not write (without it such a path is refused; a previous "
         "kiln output of the same kind is replaced anyway).")
_source_options = options(
    click.option("--allow-pickle", is_flag=True, help="Permit pytorch_model.bin / .pt (loaded with weights_only=True)."),
    click.option("--n-heads", type=int, help="Attention heads of a native Arbor state dict without a config."),
    click.option("--tokenizer", type=click.Path(path_type=Path),
                 help="Directory with tokenizer.json, for a checkpoint that has none beside it (native Arbor, "
                      "nanoGPT ckpt.pt)."),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kiln")
def cli() -> None:
    """kiln: compress small causal LMs, bake their RoPE/context settings, export GGUF and ONNX, verified.

    \b
    Examples:
      kiln fixtures                                  # build the test models into the cache
      kiln export gguf ./SmolLM2 -o out/smol.q4_k_m.gguf --quant q4_k_m --modelfile
      kiln export gguf ./Qwen2.5-0.5B -o q.gguf --quant q8_0 --rope-scaling yarn:4 --original-context 32768
      kiln export onnx ./SmolLM2 -o out/smol-int4 --precision int4
      kiln inspect out/smol.q4_k_m.gguf --json
      kiln generate out/smol.q4_k_m.gguf --chat --prompt "What is the capital of France?"
      kiln generate out/smol-int4 --chat --prompt "What is the capital of France?"
    """


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even if already built.")
@click.option("--json", "as_json", is_flag=True, help="Print fixture paths as JSON.")
def fixtures(names: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Build the test fixtures once into the cache ($KILN_CACHE or ~/.cache/kiln).

    \b
    Examples:
      kiln fixtures                  # all: smollm2-135m, tiny-qwen2, tiny-qwen3, tiny-llama,
                                     # tiny-gpt2, tiny-nanogpt, tiny-qwen2-moe, tiny-qwen3-moe, tiny-qwen3_5,
                                     # tiny-qwen3_5-mtp, tiny-qwen3_5-moe
      kiln fixtures tiny-qwen2 --force
    """
    from kiln import fixtures as fx

    chosen = names or fx.FIXTURE_NAMES
    paths = {name: str(fx.build(name, force=force, progress=not as_json)) for name in chosen}
    if as_json:
        emit_json(paths)
    else:
        for name, path in paths.items():
            click.echo(f"{name}: {path}")


@cli.group()
def export() -> None:
    """Export a checkpoint to a runtime format."""


@export.command("gguf")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output .gguf file path (NAME.gguf.manifest.json and, with --modelfile, NAME.Modelfile go beside it).")
@click.option("--quant", default=None,
              help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_m, q4_k_s, q4_k_m, q5_k_m, q6_k, iq4_xs, "
                   "... [default: f16; for a GPTQ checkpoint its own block type q4_0/q4_1/q8_0, bit-exact]")
@click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix for llama.cpp's quantizer.")
@_rope_options
@click.option("--modelfile", is_flag=True, help="Also write an Ollama Modelfile next to the GGUF.")
@click.option("--num-ctx", type=int, default=None,
              help="With --modelfile: its PARAMETER num_ctx [default: the largest context half this machine's "
                   "memory holds by kiln plan's cost model, at most the model's].")
@click.option("--no-verify", is_flag=True, help="Skip the logits check against the source (not recommended).")
@click.option("--threads", type=int, default=0, help="Threads for quantizing and verifying (0: all).")
@_source_options
@_force_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_gguf_cmd(src: Path, out: Path, quant: str, imatrix: Path | None, rope_scaling: str | None,
                    original_context: int | None, context: int | None, allow_shorter_context: bool,
                    modelfile: bool, num_ctx: int | None, no_verify: bool, threads: int, allow_pickle: bool, n_heads: int | None,
                    tokenizer: Path | None, force: bool, as_json: bool) -> None:
    """Export the checkpoint SRC (Hugging Face, native Arbor, nanoGPT) to a GGUF file, verified in llama.cpp.

    \b
    Examples:
      kiln export gguf ./SmolLM2-135M-Instruct -o smol.q8_0.gguf --quant q8_0 --modelfile
      kiln export gguf ./Qwen2.5-0.5B -o qwen.gguf --quant q4_k_m --rope-scaling yarn:4 --original-context 32768
      kiln export gguf ./model -o m.gguf --quant q4_k_m --imatrix imatrix.dat
      kiln export gguf arbor/latest_checkpoint.pt -o arbor.q8_0.gguf --quant q8_0 --allow-pickle --tokenizer tok/
      kiln export gguf out-shakespeare/ckpt.pt -o nano.f16.gguf --allow-pickle --tokenizer gpt2-tokenizer/
    """
    from kiln.pipeline import export_gguf_artifact

    if num_ctx is not None and (num_ctx < 1 or not modelfile):
        raise KilnError(f"--num-ctx {num_ctx}: must be positive" if num_ctx < 1 else "--num-ctx needs --modelfile")
    with progress(not as_json) as update:
        result = export_gguf_artifact(
            src, out, quant, rope_scaling=rope_scaling, original_context=original_context, context=context,
            allow_shorter_context=allow_shorter_context, imatrix=imatrix, modelfile=modelfile,
            num_ctx=num_ctx, verify=not no_verify, threads=threads, allow_pickle=allow_pickle, n_heads=n_heads, tokenizer=tokenizer,
            progress=update, force=force)
    if as_json:
        emit_json(result.record)
        return
    rec = result.record
    where = (f"rope {rec['rope'].get('type')}, context {rec['rope'].get('context_length')}" if "rope" in rec
             else f"absolute positions, context {rec['context_length']}")
    click.echo(f"wrote {result.gguf} ({rec['files'][0]['size'] / 1e6:.1f} MB, {rec['bits_per_weight']:.2f} bits/weight, "
               f"{where})")
    if result.modelfile:
        click.echo(f"wrote {result.modelfile}  (ollama create NAME -f {result.modelfile})")
    ver = rec.get("verification")
    if ver:
        click.echo(f"verified: {ver['criterion']}; text KL {ver['text_mean_kl']:.4f}, top-1 {ver['text_top1']:.3f}")
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)


@export.command("onnx")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory to create, e.g. out/model-int4 (an existing one is replaced only if it is a "
                   "kiln ONNX directory holding nothing else).")
@click.option("--precision", "-p", default="int4", show_default=True,
              type=click.Choice(["fp32", "fp16", "int8", "int4"]), help="Weight precision (int4/int8: MatMulNBits).")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4/int8 block: 16, 32, 64, 128 or 256.")
@click.option("--symmetric/--asymmetric", default=True, show_default=True, help="int4/int8 without/with zero points.")
@click.option("--accuracy-level", type=int, default=4, show_default=True,
              help="MatMulNBits compute: 4 = int8 activations (fast on CPU), 1 = fp32, 0 = unset.")
@click.option("--lm-head", type=click.Choice(["int8", "quant", "float"]), default="int8", show_default=True,
              help="LM head at 8 bits (as llama.cpp keeps its output tensor), like the body (smallest), or float.")
@click.option("--method", type=click.Choice(["default", "rtn", "k_quant"]), default="default", show_default=True,
              help="onnxruntime's weight-only quantizer (default: blockwise round-to-nearest in C++).")
@click.option("--embeddings", type=click.Choice(["quant", "float"]), default="quant", show_default=True,
              help="Token embeddings quantized (int4 GatherBlockQuantized where possible) or unquantized.")
@click.option("--execution-provider", "-e", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Target of the graph (fp16 needs cuda).")
@_rope_options
@click.option("--no-verify", is_flag=True, help="Skip the logits check against the source (not recommended).")
@click.option("--threads", type=int, default=0, help="Threads for verifying (0: all).")
@_source_options
@_force_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_onnx_cmd(src: Path, out: Path, precision: str, block_size: int, symmetric: bool, accuracy_level: int,
                    lm_head: str, method: str, embeddings: str, execution_provider: str, rope_scaling: str | None,
                    original_context: int | None, context: int | None, allow_shorter_context: bool,
                    no_verify: bool, threads: int, allow_pickle: bool, n_heads: int | None, tokenizer: Path | None,
                    force: bool, as_json: bool) -> None:
    """Export the checkpoint SRC (Hugging Face, native Arbor, nanoGPT) to an ONNX directory, verified in onnxruntime.

    The directory holds model.onnx (+ model.onnx.data), genai_config.json (onnxruntime-genai
    loads it as is), the tokenizer files and manifest.json.

    \b
    Examples:
      kiln export onnx ./SmolLM2-135M-Instruct -o smol-int4 --precision int4
      kiln export onnx ./Qwen2.5-0.5B -o qwen-int8 -p int8 --rope-scaling yarn:4 --original-context 32768
      kiln export onnx ./model -o m-int4 -p int4 --block-size 128 --asymmetric --lm-head float
      kiln export onnx arbor/latest_checkpoint.pt -o arbor-onnx -p fp32 --allow-pickle --tokenizer tok/
    """
    from kiln.pipeline import export_onnx_artifact

    with progress(not as_json) as update:
        result = export_onnx_artifact(
            src, out, precision, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level,
            lm_head=lm_head, embeddings=embeddings, execution_provider=execution_provider, method=method,
            rope_scaling=rope_scaling, original_context=original_context, context=context,
            allow_shorter_context=allow_shorter_context, verify=not no_verify, threads=threads,
            allow_pickle=allow_pickle, n_heads=n_heads, tokenizer=tokenizer, progress=update, force=force)
    if as_json:
        emit_json(result.record)
        return
    rec = result.record
    size = sum(f["size"] for f in rec["files"] if f["name"].startswith("model.onnx"))
    where = (f"{rec['bits_per_weight']:.2f} bits/weight, rope {rec['rope'].get('type')}, context "
             f"{rec['rope'].get('context_length')}" if "rope" in rec
             else f"kiln's GPT-2 graph, context {rec['context_length']}")
    click.echo(f"wrote {result.directory}/ ({size / 1e6:.1f} MB of graph and weights, {where})")
    ver = rec.get("verification")
    if ver:
        click.echo(f"verified: {ver['criterion']}; text KL {ver['text_mean_kl']:.4f}, top-1 {ver['text_top1']:.3f}")
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)


@cli.group()
def quantize() -> None:
    """Calibrated quantization into a checkpoint that other tools load too."""


@quantize.command("gptq")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output checkpoint directory to create, e.g. out/model-gptq.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="32 = GGUF's block: the result exports to GGUF q4_0/q4_1/q8_0 bit for bit.")
@click.option("--sym/--asym", default=True, show_default=True,
              help="Symmetric (GGUF q4_0/q8_0) or with zero points (q4_1).")
@click.option("--act-order", is_flag=True,
              help="Quantize columns by decreasing Hessian diagonal (static groups); recommended: on SmolLM2 "
                   "it lowers q4_0's mean KL from 0.55 to 0.43.")
@click.option("--scale-search/--no-scale-search", default=True, show_default=True,
              help="Symmetric grids: choose each group's scale by importance-weighted (diag H) rounding error "
                   "instead of max-magnitude; the stored layout is unchanged.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (default: the one kiln ships).")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per calibration chunk.")
@click.option("--samples", type=int, default=128, show_default=True, help="At most this many chunks.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="Hessian dampening (fraction of mean diag).")
@click.option("--threads", type=int, default=0)
@_force_option
@click.option("--json", "as_json", is_flag=True)
def quantize_gptq_cmd(src: Path, out: Path, bits: str, group_size: str, sym: bool, act_order: bool,
                      scale_search: bool, calib: Path | None, seq_len: int, samples: int, damp: float, threads: int,
                      force: bool, as_json: bool) -> None:
    """GPTQ (Frantar et al. 2022) on the CPU, written in the auto-gptq/GPTQModel checkpoint format.

    With --group-size 32 the weights are rounded onto GGUF's own block grid, so
    `kiln export gguf` writes them into q4_0 / q4_1 / q8_0 blocks unchanged, and
    `kiln export onnx` takes them through onnxruntime-genai's GPTQ loader.

    \b
    Examples:
      kiln quantize gptq ./SmolLM2-135M-Instruct -o smol-gptq --bits 4 --group-size 32 --act-order
      kiln export gguf smol-gptq -o smol.gptq.q4_0.gguf          # bit-exact q4_0 blocks
      kiln export onnx smol-gptq -o smol-gptq-int4 --precision int4
    """
    from kiln.compress.gptq import GPTQOptions, quantize_gptq
    from kiln.compress.imatrix import calibration_text

    text = read_text(calib, "calibration text", calibration_text)
    opts = GPTQOptions(bits=int(bits), group_size=int(group_size), sym=sym, act_order=act_order, damp=damp,
                       seq_len=seq_len, samples=samples, scale_search=scale_search)
    with progress(not as_json) as update:
        report = quantize_gptq(src, out, text, opts, threads=threads or None, progress=update, force=force)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(f"{out}: GPTQ {bits}-bit, group {group_size}, grid {report.grid}, {report.linears} linears in "
                   f"{report.layers} layers, {report.chunks} chunks x {seq_len} tokens, {report.seconds:.0f} s; "
                   f"mean weight error {report.mean_rel_error:.4f}, layer output error {report.output_error:.4f}")
    for w in report.warnings:
        click.echo(f"note: {w}", err=True)


@cli.command()
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output path (default: NAME.Modelfile beside the GGUF).")
@click.option("--num-ctx", type=int, default=None,
              help="PARAMETER num_ctx: the context Ollama allocates a KV cache for [default: the largest that fits "
                   "half this machine's memory by kiln plan's cost model, a multiple of 256, at most the "
                   "model's context].")
@_force_option
def modelfile(gguf: Path, out: Path | None, num_ctx: int | None, force: bool) -> None:
    """Write an Ollama Modelfile for an existing GGUF, from its own metadata.

    \b
    Examples:
      kiln modelfile out/smol.q4_k_m.gguf && ollama create smol -f out/smol.q4_k_m.Modelfile
      kiln modelfile out/qwen-128k.q4_k_m.gguf --num-ctx 16384
    """
    from kiln.bench.plan import machine_num_ctx
    from kiln.export.modelfile import write_modelfile
    from kiln.pipeline import modelfile_path

    if not gguf.is_file():
        raise KilnError(f"{gguf}: no such GGUF file")
    if num_ctx is not None and num_ctx < 1:
        raise KilnError(f"--num-ctx {num_ctx}: must be positive")
    chosen = num_ctx if num_ctx is not None else machine_num_ctx(gguf)
    import logging

    warnings: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    log = logging.getLogger("kiln.export.modelfile")
    handler = _Collect()
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False
    try:
        path = write_modelfile(gguf, out or modelfile_path(gguf), force=force, num_ctx=chosen)
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
    click.echo(f"wrote {path}  (num_ctx {min(chosen, _gguf_context(gguf))})")
    for w in warnings:
        click.echo(f"warning: {w}", err=True)


def _gguf_context(gguf: Path) -> int:
    from kiln.bench.geometry import read_geometry

    return read_geometry(gguf).context_length


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--allow-pickle", is_flag=True, help="Permit pytorch_model.bin checkpoints.")
def inspect(path: Path, as_json: bool, allow_pickle: bool) -> None:
    """Describe a checkpoint directory, a GGUF file or an ONNX directory: architecture, size, context, rope.

    \b
    Examples:
      kiln inspect ~/.cache/kiln/fixtures/smollm2-135m
      kiln inspect out/smol.q4_k_m.gguf --json
      kiln inspect out/smol-int4
    """
    from kiln.inspect_artifact import inspect_path

    info = inspect_path(path, allow_pickle=allow_pickle)
    if as_json:
        emit_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(path), show_header=False)
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
        table.add_row(key, str(value))
    Console().print(table)


@cli.command("eval")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidates", nargs=-1, type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="Held-out text (default: the English text kiln ships, used for nothing else).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Chunk length; the second half is scored.")
@click.option("--threads", type=int, default=0)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(reference: Path, candidates: tuple[Path, ...], text_file: Path | None, ctx: int, threads: int,
             as_json: bool) -> None:
    """Perplexity, KL divergence and top-1 agreement of CANDIDATES against REFERENCE.

    Any mix of HF checkpoint directories, .gguf files and ONNX directories; figures as
    llama-perplexity --kl-divergence reports them (chunks of --ctx tokens, second half scored).

    \b
    Examples:
      kiln eval ~/.cache/kiln/fixtures/smollm2-135m out/smol.q8_0.gguf out/smol.q4_k_m.gguf out/smol-int4
      kiln eval out/smol.f16.gguf out/smol.q4_0.gguf --text wiki.txt --ctx 1024 --json
    """
    from kiln.evaluate import evaluate, heldout_text, markdown

    text = read_text(text_file, "text", heldout_text)
    with progress(not as_json) as update:
        rows = evaluate(reference, candidates, text, ctx=ctx, threads=threads or None, progress=update)
    if as_json:
        emit_json({"ctx": ctx, "rows": [r.to_json() for r in rows]})
    else:
        click.echo(markdown(rows, ctx))


@cli.command("longeval")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--lengths", help="Context lengths in tokens, comma-separated (default: each artifact's window).")
@click.option("--depths", default="0.1,0.3,0.5,0.7,0.9", show_default=True, help="Passkey depths (fractions).")
@click.option("--chunks", type=int, default=1, show_default=True, help="Chunks of the text per length (NLL).")
@click.option("--trials", type=int, default=1, show_default=True, help="Passkey keys per (length, depth).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--baseline", type=click.Path(path_type=Path),
              help="The unscaled model: scored over the same tokens in pieces of its own window (truncation).")
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="Long text (default: CPython's language reference, pydoc_data.topics, in sorted order).")
@click.option("--no-retrieval", is_flag=True, help="NLL by position only.")
@click.option("--no-perplexity", is_flag=True, help="Passkey retrieval only.")
@click.option("-o", "--out", "out", type=click.Path(path_type=Path),
              help="Write longeval.json, longeval.md, nll_by_position.png, passkey_heatmap.png here.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path),
              help="Cell cache for resuming (default: OUT/cache with -o, else none).")
@click.option("--force", is_flag=True, help="Replace output files of these names that kiln did not write.")
@click.option("--exact", is_flag=True,
              help="The engines' verification settings (llama.cpp: flash attention off, f32 KV) instead of the "
                   "fast ones users run: about 1.8x slower at 16K; bucket means agree within 0.002 nats.")
@click.option("--threads", type=int, default=0)
@click.option("--json", "as_json", is_flag=True)
def longeval_cmd(artifacts: tuple[Path, ...], lengths: str | None, depths: str, chunks: int, trials: int, seed: int,
                 baseline: Path | None, text_file: Path | None, no_retrieval: bool, no_perplexity: bool,
                 out: Path | None, cache_dir: Path | None, force: bool, exact: bool, threads: int,
                 as_json: bool) -> None:
    """Long-range quality of ARTIFACTS: NLL by position and passkey retrieval (depth x length).

    Any mix of HF checkpoint directories, .gguf files and ONNX directories. Each length is one long
    forward per chunk (not sliding windows); every (artifact, length, depth) cell is cached, so an
    interrupted run resumes. A length beyond an artifact's advertised window is refused.

    \b
    Examples:
      kiln longeval out/smol.q8_0.gguf out/smol-16k.q8_0.gguf --lengths 4096,8192,16384 -o out/long
      kiln longeval out/smol-16k.q8_0.gguf --baseline out/smol.q8_0.gguf --lengths 16384 --no-retrieval
      kiln longeval out/smol-int4 --lengths 1024 --depths 0.1,0.5,0.9 --threads 1 --json
    """
    from kiln.longeval import file_text_record, long_eval, markdown, parse_depths, parse_lengths, write_outputs

    if no_retrieval and no_perplexity:
        raise KilnError("--no-retrieval and --no-perplexity together leave nothing to measure")
    text, info = file_text_record(text_file) if text_file is not None else (None, None)
    if cache_dir is None and out is not None:
        cache_dir = out / "cache"
    console = stderr_console() if not as_json else None
    live = console is not None and console.is_interactive

    def update(info_) -> None:
        if live:
            console.print(info_.text(), end="\r", soft_wrap=True, highlight=False)

    result = long_eval(artifacts, parse_lengths(lengths) if lengths else None, depths=parse_depths(depths),
                       chunks=chunks, trials=trials, seed=seed, text=text, text_info=info, baseline=baseline,
                       retrieval=not no_retrieval, perplexity=not no_perplexity, cache_dir=cache_dir,
                       threads=threads or None, progress=update, exact=exact)
    if live:
        console.print(" " * 100, end="\r")
    if out is not None:
        write_outputs(result, out, force=force)
    if as_json:
        emit_json({k: v for k, v in result.items()})
    else:
        click.echo(markdown(result))


@cli.command("imatrix")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration text (default: the English text kiln ships for this, not the eval text).")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Output imatrix path (.dat).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Chunk length in tokens.")
@click.option("--chunks", type=int, help="Use at most N chunks (default: all the text holds).")
@click.option("--process-output", is_flag=True, help="Also collect the LM head (output.weight), as llama-imatrix.")
@click.option("--threads", type=int, default=0, help="Torch threads (0: torch's default).")
@_force_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def imatrix_cmd(src: Path, calib: Path | None, out: Path, ctx: int, chunks: int | None, process_output: bool,
                threads: int, force: bool, as_json: bool) -> None:
    """Compute an importance matrix for llama.cpp's quantizer from the checkpoint SRC.

    As llama-imatrix computes it (chunks of --ctx tokens, each from an empty cache, BOS first),
    but on the transformers model in float32; written in llama.cpp's legacy .dat format, which
    `kiln export gguf --imatrix` and llama-quantize --imatrix both read.

    \b
    Examples:
      kiln imatrix ./SmolLM2-135M-Instruct -o smol.imatrix.dat
      kiln export gguf ./SmolLM2-135M-Instruct -o smol.q4_k_m.gguf --quant q4_k_m --imatrix smol.imatrix.dat
      kiln imatrix ./model --calib my-domain.txt -o m.imatrix.dat --ctx 256 --chunks 100
    """
    from kiln.compress.imatrix import calibration_text, write_imatrix

    text = read_text(calib, "calibration text", calibration_text)
    dataset = calib.name if calib is not None else "kiln/data/calibration.txt"
    with progress(not as_json) as update:
        result, manifest = write_imatrix(src, out, text, dataset, ctx=ctx, chunks=chunks, threads=threads or None,
                                         process_output=process_output, progress=update, force=force)
    if as_json:
        emit_json({"imatrix": str(out), "manifest": str(manifest), "dataset": dataset, **result.to_json()})
        return
    click.echo(f"wrote {out} ({len(result.values)} tensors, {result.chunks} chunks x {result.ctx} tokens of "
               f"{dataset}, {result.seconds:.1f}s)")
    click.echo(f"next: kiln export gguf {src} -o model.q4_k_m.gguf --quant q4_k_m --imatrix {out}")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt text (a user message with --chat). Repeatable: with SMC several prompts run together "
                   "(one population each, one engine step for all); without SMC one after another. With "
                   "--prompt-file: the instruction that follows the document.")
@click.option("--prompt-file", type=click.Path(path_type=Path, allow_dash=True),
              help="Read the prompt (a document) from FILE, '-' for standard input: UTF-8 text, read and tokenized "
                   "in pieces; the context is sized from its tokens.")
@click.option("--question", help="With --prompt-file: the question to answer; chunks are ranked by it "
                                  "(--overflow chunk). Also the instruction when --prompt is not given.")
@click.option("--overflow", type=click.Choice(OVERFLOW_CHOICES), default="error", show_default=True,
              help="A document over the window: refuse it, keep its start and end (the middle goes), or split it "
                   "into chunks (ranked by the question and packed into the window; without a question the "
                   "instruction runs over every chunk and a final pass combines the answers).")
@click.option("--chunk-size", type=int, default=1024, show_default=True, help="Tokens per chunk (--overflow chunk).")
@click.option("--overlap", type=int, default=128, show_default=True, help="Tokens shared by consecutive chunks.")
@click.option("--rank", "rank_method", type=click.Choice(RANK_CHOICES), default="bm25", show_default=True,
              help="Chunk ranking: BM25 (bm25s) or the model's likelihood of the question given the chunk "
                   "(measured: bench/longdoc.py, docs/long-context.md).")
@click.option("--pack", type=click.Choice(PACK_CHOICES), default="relevant", show_default=True,
              help="What ranked chunks go into the window: the document's opening chunk and those sharing a word "
                   "with the question (BM25), or the best-ranked ones until the window is full (measured: "
                   "bench/longanswer.py, docs/long-context.md).")
@click.option("--max-chunks", type=int, default=256, show_default=True,
              help="Most chunks a document may give (a bound on time and memory; more is refused).")
@click.option("--memory", "memory", default=None, metavar="SIZE",
              help="Memory the run may use (e.g. 8GiB) [default: what the machine has available]; a context "
                   "that would not fit by kiln plan's cost model is refused before loading.")
@click.option("--chat", is_flag=True, help="Wrap the prompt with the artifact's chat template.")
@click.option("--system", help="System message (with --chat).")
@click.option("--think/--no-think", "thinking", default=None,
              help="With --chat: turn a reasoning template's thinking block on or off (Qwen3, Qwen3.5: "
                   "enable_thinking) [default: the template's own].")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=None,
              help="0 = greedy (plain generation, the default there); with SMC the target is the model at this "
                   "temperature [SMC default: 1].")
@click.option("--seed", type=int, default=None, help="Seed (a seeded SMC run is cached and repeatable).")
@click.option("--particles", "-n", type=int, default=None, help="SMC particles (turns on SMC steering).")
@click.option("--regex", help="Constrain the output to match this regular expression (SMC).")
@click.option("--json-schema", "json_schema", help="Constrain the output to JSON valid for this schema file (SMC).")
@click.option("--grammar", help="Constrain the output to this Lark grammar file (SMC).")
@click.option("--potential", "potentials", multiple=True, metavar="NAME:ARGS",
              help="More potentials: stop:STR, sentence, length:max=N, style:formal, lexicon:FILE, "
                   "critic:ARTIFACT, python:MODULE:FN, regex:/json:/lark: ... (repeatable).")
@click.option("--ess-threshold", type=float, default=0.5, show_default=True,
              help="Resample when ESS < threshold x N (0: importance sampling, 1: every step).")
@click.option("--resampling", type=click.Choice(["systematic", "stratified", "multinomial", "residual"]),
              default="systematic", show_default=True)
@click.option("--timeout", type=float, default=None, help="Seconds; returns the weighted set reached by then.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the generation cache.")
@click.option("--threads", type=int, default=0)
@click.option("--ctx", type=int, default=None,
              help="Context to allocate [default: what the run needs: the prompt's tokens + --max-tokens (+ the "
                   "particles' tails), within the artifact's window].")
@click.option("--json", "as_json", is_flag=True)
def generate(artifact: Path, prompts: tuple[str, ...], prompt_file: Path | None, question: str | None,
             overflow: str, chunk_size: int, overlap: int, rank_method: str, pack: str, max_chunks: int,
             memory: str | None,
             chat: bool, system: str | None, thinking: bool | None,
             max_tokens: int,
             temperature: float | None, seed: int | None, particles: int | None, regex: str | None,
             json_schema: str | None, grammar: str | None, potentials: tuple[str, ...], ess_threshold: float,
             resampling: str, timeout: float | None, no_cache: bool, threads: int, ctx: int | None,
             as_json: bool) -> None:
    """Generate text from an exported artifact (a .gguf file or an ONNX model directory).

    With --particles (or any constraint) it runs Sequential Monte Carlo steering: N particles
    decoded together, constraints as masks whose lost mass enters the weights, soft potentials
    as twists, resampling when the effective sample size drops. It prints one draw from the
    weighted posterior and the posterior over distinct outputs (--json: everything, incl. log Z).

    Several --prompt values: with SMC they run as one batch (a population of N particles per
    prompt, every step one engine call for all; the generation cache is not used), printing a
    "== prompt I/K: TEXT" header before each result (--json: a list, one object per prompt).
    Without SMC they are generated one after another, each under such a header.

    A long document: --prompt-file FILE (or - for standard input), with --prompt as the instruction
    after it and/or --question. The context is sized from the tokens (a run the machine's memory
    cannot hold is refused first); a document over the artifact's window follows --overflow.
    Long prefills show tokens, tokens/s and ETA on an interactive stderr.

    From Python: kiln.runtime.steer_prompts (SMC, the same result objects as --json),
    kiln.runtime.generate_prompts (plain generation) and kiln.runtime.answer_document (documents).

    \b
    Examples:
      kiln generate smol.q4_k_m.gguf --chat --prompt "What is the capital of France?"
      kiln generate smol.q8_0.gguf --prompt "Once upon a time" --temperature 0.8 --seed 1
      kiln generate qwen3.5-0.8b.q8_0.gguf --chat --think --prompt "Is 391 prime?" --max-tokens 512
      kiln generate smol-int4/ --chat --prompt "What is the capital of France?"   # an ONNX directory
      kiln generate smol.q4_k_m.gguf --chat --prompt "Name a colour." -n 16 --regex " ?[A-Z][a-z]+\\." --seed 0
      kiln generate smol.q4_k_m.gguf --prompt "Person:" -n 8 --json-schema person.json --max-tokens 60
      kiln generate smol.q4_k_m.gguf --prompt "Dear Sir," -n 16 --potential style:formal --potential sentence
      kiln generate smol.q4_k_m.gguf --chat --prompt "Is ice cold?" --prompt "Is fire cold?" -n 8 --regex "(Yes|No)\\."
      kiln generate smol.q4_k_m.gguf --chat --prompt-file report.txt --prompt "Summarize this." --overflow chunk
      kiln generate smol.q4_k_m.gguf --chat --prompt-file - --question "Who signed it?" --overflow chunk < doc.txt
    """
    if thinking is not None and not chat:
        raise KilnError("--think/--no-think set a chat template's thinking block: use them with --chat")
    if not prompts and prompt_file is None:
        raise KilnError("give a --prompt or a --prompt-file")
    if question is not None and prompt_file is None:
        raise KilnError("--question goes with --prompt-file (the document it asks about)")
    if prompt_file is not None and len(prompts) > 1:
        raise KilnError("with --prompt-file, give at most one --prompt (the instruction after the document)")
    steered = particles is not None or regex is not None or json_schema is not None or grammar is not None \
        or bool(potentials)
    check = _memory_check(artifact, memory)
    if prompt_file is not None:
        _document_generate(artifact, prompt_file, prompts[0] if prompts else None, question, overflow, chunk_size,
                           overlap, rank_method, pack, max_chunks, chat, system, thinking, max_tokens, temperature,
                           seed, threads, ctx, as_json, check, steered, particles, regex, json_schema, grammar,
                           potentials, ess_threshold, resampling, timeout, no_cache)
        return
    if not steered:
        _plain_generate(artifact, list(prompts), chat, system, thinking, max_tokens, temperature, seed, threads, ctx,
                        as_json, check)
        return
    from kiln.runtime.steering import Constraints, SteerOptions, steer_prompts

    n = 16 if particles is None else particles
    steer_options = SteerOptions(particles=n, max_tokens=max_tokens, ess_threshold=ess_threshold,
                                 resampling=resampling, temperature=1.0 if temperature is None else temperature,
                                 seed=seed, timeout=timeout)
    steer_options.validate()  # before the display starts: a bad flag is the only line on stderr
    constraints = Constraints(regex=regex, json_schema=json_schema, grammar=grammar, specs=list(potentials))
    with _smc_display(not as_json, n, len(prompts)) as on_step:
        outs = steer_prompts(artifact, prompts, steer_options, constraints, chat=chat, system=system,
                             thinking=thinking, threads=threads or None, n_ctx=ctx, use_cache=not no_cache, on_step=on_step,
                             memory_check=check)
    if as_json:
        emit_json(outs[0] if len(prompts) == 1 else outs)
    elif len(prompts) == 1:
        out = outs[0]
        if out["sample"] is None:
            raise KilnError("no particle finished: every particle was ruled out by the constraints"
                            + (" or the timeout came first" if out["timed_out"] else ""))
        _print_steered(out, n, out["cached"])
    else:
        _print_steered_batch(outs, prompts, n)


# --- kiln chat (issue 19): a thin layer over kiln.chat.ChatSession; the loop is kiln.chat.terminal ---
@cli.command("chat")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--system", help="System message (/system TEXT changes it during the chat).")
@click.option("--think/--no-think", "thinking", default=None,
              help="Turn a reasoning template's thinking block on or off (Qwen3, Qwen3.5: enable_thinking) "
                   "[default: the template's own].")
@click.option("--max-tokens", type=int, default=256, show_default=True,
              help="Most tokens per answer; the context always keeps this much room for the answer.")
@click.option("--temperature", type=float, default=None,
              help="0 = greedy (plain answers' default); constrained answers sample the model at this "
                   "temperature [default there: 1].")
@click.option("--seed", type=int, default=None, help="Seed: the same conversation gives the same answers.")
@click.option("--particles", "-n", type=int, default=8, show_default=True,
              help="SMC particles for constrained answers (/regex, /json-schema); /particles N changes it.")
@click.option("--ctx", type=int, default=None,
              help="Context the conversation lives in; the oldest turns leave it when it fills "
                   "[default: the artifact's, at most 4096].")
@click.option("--threads", type=int, default=0, help="Engine threads (0: the cores, at most 8).")
def chat_cmd(artifact: Path, system: str | None, thinking: bool | None, max_tokens: int, temperature: float | None,
             seed: int | None, particles: int, ctx: int | None, threads: int) -> None:
    """Chat with an artifact in the terminal (a .gguf file or an ONNX model directory).

    Each message is answered with the artifact's own chat template, streamed as it is written.
    The conversation stays in the context (the oldest turns leave it, with a note, when it fills);
    each turn decodes only what is new since the last one. Ctrl-C stops an answer (the part
    written stays, marked interrupted); at the prompt Ctrl-C or Ctrl-D ends the chat.

    \b
    Commands during the chat:
      /system TEXT       set the system message (/system alone: remove it)
      /regex RE          answers must match RE, sampled exactly by SMC (/regex alone: off)
      /json-schema FILE  answers must be JSON valid for the schema in FILE (SMC; alone: off)
      /particles N       SMC particles; a status line after each such answer shows the ESS
      /reset             forget the conversation
      /save FILE         write the conversation as JSON (replaces only a file kiln chat saved)
      /help, /exit       (a message in \"\"\" ... \"\"\" spans several lines)

    From Python: kiln.chat.ChatSession(artifact, kiln.chat.ChatOptions(...)).ask(text).

    \b
    Examples:
      kiln chat smol.q4_k_m.gguf
      kiln chat smol.q4_k_m.gguf --system "You are a terse assistant." --temperature 0.7 --seed 1
      kiln chat qwen3.5-0.8b.q8_0.gguf --think --max-tokens 1024
      kiln chat smol-int4/ --ctx 2048                  # an ONNX directory
      >>> /regex (Yes|No)\\.
      >>> Is the sky blue?
    """
    from kiln.chat.session import ChatOptions
    from kiln.chat.terminal import run_chat

    run_chat(artifact, ChatOptions(system=system, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   ctx=ctx, threads=threads or None, thinking=thinking, particles=particles))


def _plain_generate(artifact: Path, prompts: list[str], chat: bool, system: str | None, thinking: bool | None,
                    max_tokens: int,
                    temperature: float | None, seed: int | None, threads: int, ctx: int | None,
                    as_json: bool, check=None) -> None:
    """Without SMC: each prompt in turn, streamed to stdout (under a header when there are several)."""
    from kiln.runtime.generate import generate_prompts

    def start(i: int) -> None:
        if i:
            click.echo()  # ends the previous prompt's streamed text
        if len(prompts) > 1:
            click.echo(_prompt_header(i, prompts))

    with _prefill_display(not as_json) as on_prefill:
        outs = generate_prompts(artifact, prompts, chat=chat, system=system, thinking=thinking, max_tokens=max_tokens,
                                temperature=temperature or 0.0, seed=seed, threads=threads or None, n_ctx=ctx,
                                on_prompt=None if as_json else start,
                                on_token=None if as_json else (lambda i, text: click.echo(text, nl=False)),
                                on_prefill=on_prefill, memory_check=check)
    if as_json:
        emit_json(outs[0] if len(prompts) == 1 else outs)
    else:
        click.echo()


def _memory_check(artifact: Path, memory: str | None):
    """A `memory_check(n_ctx, n_seq_max)` for the runtime: kiln plan's cost model (kiln.bench.cost_model) of the
    artifact at that context against `memory` (default: the memory this machine has available now)."""
    from kiln.bench.plan import parse_size

    budget = parse_size(memory) if memory is not None else None
    if budget is not None and budget <= 0:
        raise KilnError("--memory must be positive")

    def check(n_ctx: int, n_seq: int) -> None:
        from kiln.bench.cost_model import predict_peak
        from kiln.bench.geometry import read_geometry
        from kiln.bench.plan import _human, available_memory

        limit = budget if budget is not None else available_memory()
        if limit is None:
            return
        est = predict_peak(read_geometry(artifact), n_ctx, particles=n_seq)
        if est.total > limit:
            seqs = f" for {n_seq} sequences" if n_seq > 1 else ""
            raise KilnError(f"a context of {n_ctx} tokens{seqs} needs about {_human(est.total)} (KV cache "
                            f"{_human(est.kv)}, weights {_human(est.weights + est.repacked)}, compute "
                            f"{_human(est.compute)}, runtime {_human(est.runtime)}) but "
                            + (f"--memory is {_human(limit)}" if budget is not None else
                               f"this machine has {_human(limit)} available")
                            + ": lower --ctx, --max-tokens or --particles, or use --overflow truncate or chunk")
    return check


@contextmanager
def _prefill_display(enabled: bool):
    """A status line for long prefills (tokens, tokens/s, ETA) on an interactive stderr, rewritten in place and
    cleared when the prefill ends (stdout, where the answer streams, is left alone); None elsewhere."""
    console = stderr_console() if enabled else None
    if console is None or not console.is_interactive:
        yield None
        return
    err = click.get_text_stream("stderr")
    shown = [False]

    def update(info) -> None:
        if info.done >= info.total:
            if shown[0]:
                err.write("\r\033[K")
                err.flush()
                shown[0] = False
            return
        err.write("\r\033[K" + info.text()[:max(console.width - 1, 20)])
        err.flush()
        shown[0] = True

    try:
        yield update
    finally:
        if shown[0]:
            err.write("\r\033[K")
            err.flush()


def _document_generate(artifact: Path, prompt_file: Path, instruction: str | None, question: str | None,
                       overflow: str, chunk_size: int, overlap: int, rank_method: str, pack: str, max_chunks: int,
                       chat: bool,
                       system: str | None, thinking: bool | None, max_tokens: int, temperature: float | None,
                       seed: int | None, threads: int, ctx: int | None, as_json: bool, check, steered: bool,
                       particles: int | None, regex: str | None, json_schema: str | None, grammar: str | None,
                       potentials: tuple[str, ...], ess_threshold: float, resampling: str, timeout: float | None,
                       no_cache: bool) -> None:
    """--prompt-file: kiln.runtime.document.answer_document, the answer streamed (plain) or SMC's draw printed."""
    from kiln.runtime.document import DocumentOptions, answer_document, stdin_source

    options = DocumentOptions(overflow=overflow, chunk_size=chunk_size, overlap=overlap, rank=rank_method,
                              pack=pack, max_chunks=max_chunks)
    options.validate()
    steer = None
    n = 16 if particles is None else particles
    if steered:
        from kiln.runtime.steering import Constraints, SteerOptions

        steer = (SteerOptions(particles=n, max_tokens=max_tokens, ess_threshold=ess_threshold, resampling=resampling,
                              temperature=1.0 if temperature is None else temperature, seed=seed, timeout=timeout),
                 Constraints(regex=regex, json_schema=json_schema, grammar=grammar, specs=list(potentials)))
        steer[0].validate()
    elif temperature is not None and not temperature >= 0:
        raise KilnError(f"temperature {float(temperature)}: must be >= 0 (0 = greedy)")
    if str(prompt_file) == "-":
        source, name = stdin_source(), "standard input"
    else:
        source, name = prompt_file, str(prompt_file)
    stream = None if as_json or steered else (lambda text: click.echo(text, nl=False))
    with _prefill_display(not as_json) as on_prefill:
        out = answer_document(artifact, source, instruction, question=question, max_tokens=max_tokens,
                              options=options, chat=chat, system=system, thinking=thinking,
                              temperature=temperature or 0.0, seed=seed, steer=steer, threads=threads or None,
                              n_ctx=ctx, memory_check=check, progress=on_prefill,
                              on_token=stream, use_cache=not no_cache, name=name,
                              on_note=None if as_json else (lambda note: click.echo(f"note: {note}", err=True)))
    if as_json:
        emit_json(out)
    elif steer is not None:
        if out["sample"] is None:
            raise KilnError("no particle finished: every particle was ruled out by the constraints"
                            + (" or the timeout came first" if out["timed_out"] else ""))
        _print_steered(out, n, out["cached"])
    else:
        click.echo()


def _prompt_header(i: int, prompts: Sequence[str]) -> str:
    text = " ".join(prompts[i].split())
    return f"== prompt {i + 1}/{len(prompts)}: {text[:70] + '…' if len(text) > 70 else text}"


def _print_steered(out: dict[str, Any], particles: int, hit: bool) -> None:
    """The sample on stdout; the run's summary and the top of the posterior on stderr."""
    click.echo(out["sample"])
    err = click.get_text_stream("stderr")
    log_ml = "—" if out["log_ml"] is None else f"{out['log_ml']:.3f}"
    click.echo(f"\n{particles} particles · {out['steps']} steps · {len(out['resample_steps'])} resamples · "
               f"log Z {log_ml} · {out['distinct']} distinct · {out['wall_time']:.2f} s"
               + (" · cached" if hit else "") + (" · timed out" if out["timed_out"] else ""), file=err)
    for row in out["posterior"][:5]:
        click.echo(f"  {row['probability']:6.3f}  {row['text']!r}", file=err)


def _print_steered_batch(outs: list[dict[str, Any]], prompts: Sequence[str], particles: int) -> None:
    """Each prompt's result under its header; a prompt with no finished particle is a line on stderr."""
    for i, out in enumerate(outs):
        click.echo(_prompt_header(i, prompts))
        if out["sample"] is None:
            click.echo("kiln: no particle finished: every particle was ruled out by the constraints"
                       + (" or the timeout came first" if out["timed_out"] else ""), err=True)
            continue
        _print_steered(out, particles, False)
    if all(out["sample"] is None for out in outs):
        raise KilnError("no particle finished for any prompt")


@contextmanager
def _smc_display(enabled: bool, particles: int, prompts: int = 1):
    """A live status line (particles alive, ESS, resamples) on an interactive stderr."""
    console = stderr_console() if enabled else None
    if console is None or not console.is_interactive:
        yield None
        return
    from rich.live import Live
    from rich.text import Text

    resamples = [0]
    with Live(Text(""), console=console, transient=True, refresh_per_second=8) as live:
        def update(info) -> None:
            resamples[0] += int(info.resampled)
            which = f" · prompt {info.prompt + 1}/{prompts}" if prompts > 1 else ""
            live.update(Text(f"SMC step {info.step}{which} · live {info.live}/{particles} · ESS {info.ess:.1f} · "
                             f"resamples {resamples[0]} · {info.elapsed:.1f} s"))
        yield update


from kiln.recipe.cli import recipe as _recipe_group  # noqa: E402 - registered after the core commands

cli.add_command(_recipe_group)


from kiln.bench.commands import bench_cmd, plan_cmd  # noqa: E402  (commands defined in their own modules)

cli.add_command(bench_cmd)
cli.add_command(plan_cmd)


# --- kiln serve (issue 19): a thin layer over kiln.serve.serve; the server's modules load only here ---
@cli.command("serve")
@click.argument("artifacts", nargs=-1, required=True, metavar="ARTIFACT...")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --api-key.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", envvar="KILN_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every route but /health [env: KILN_API_KEY].")
@click.option("--ctx", type=int, default=None,
              help="Tokens one sequence may hold, prompt included [default: the artifact's context, at most 4096].")
@click.option("--rows", type=int, default=16, show_default=True,
              help="Engine sequences shared by the requests running at once (continuous batching): one request's "
                   "choices (n) or SMC particles are rows, and it may use all of them (ONNX allocates "
                   "rows x ctx KV positions up front).")
@click.option("--kv-cells", type=int, default=None,
              help="GGUF: cells of llama.cpp's one KV cache shared by all rows [default: max(ctx, 4096)].")
@click.option("--particles", type=int, default=8, show_default=True,
              help="SMC particles of a constrained request that names none (at least its n).")
@click.option("--max-tokens", type=int, default=256, show_default=True,
              help="Tokens generated when a request gives no max_tokens (less if the context is fuller).")
@click.option("--queue-limit", type=int, default=16, show_default=True,
              help="Requests waiting per model for free rows; beyond it: 429 with Retry-After.")
@click.option("--threads", type=int, default=None, help="Engine threads [default: the cores, at most 8].")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_cmd(artifacts: tuple[str, ...], host: str, port: int, api_key: str | None, ctx: int | None, rows: int,
              kv_cells: int | None, particles: int, max_tokens: int, queue_limit: int, threads: int | None,
              log_level: str) -> None:
    """Serve artifacts over an OpenAI-compatible HTTP API (needs the `serve` extra).

    GET /v1/models, POST /v1/chat/completions (the artifact's own chat template), POST /v1/completions,
    GET /health; streaming (server-sent events), n, seed, temperature, top_p, stop, logprobs, usage.
    Each ARTIFACT is a .gguf file or an ONNX directory, served under its file name (without .gguf)
    or as NAME=PATH.

    Structured output: response_format {"type": "json_schema", ...} or {"type": "json_object"}, or the
    kiln extension {"kiln": {"regex": ...}} / {"kiln": {"grammar": LARK}}, is sampled exactly by SMC
    (the response's "kiln" field carries the ESS and log Z); {"kiln": {"sampler": "mask"}} gives
    mask-only decoding, {"kiln": {"particles": N}} sets the particles.

    Requests to one model run in one continuous batch (they join at step boundaries when their rows
    are free; one engine call per step for all); bad requests get OpenAI's error JSON (400).
    From Python: kiln.serve.serve(kiln.serve.ServeOptions(...)).

    \b
    Examples:
      kiln serve out/smol.q4_k_m.gguf                       # http://127.0.0.1:8000/v1, model "smol.q4_k_m"
      kiln serve smol=out/smol.q4_k_m.gguf onnx=out/smol-int4 --port 8080
      KILN_API_KEY=secret kiln serve out/smol.q4_k_m.gguf --host 0.0.0.0
      curl localhost:8000/v1/chat/completions -d '{"model": "smol.q4_k_m",
        "messages": [{"role": "user", "content": "Is the sky blue?"}], "kiln": {"regex": "(Yes|No)\\\\."}}'
    """
    from kiln.serve import ServeOptions, serve

    serve(ServeOptions(artifacts=list(artifacts), host=host, port=port, api_key=api_key, ctx=ctx, rows=rows,
                       kv_cells=kv_cells, particles=particles, max_tokens=max_tokens, queue_limit=queue_limit,
                       threads=threads, log_level=log_level))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except KilnError as exc:
        click.echo(f"kiln: error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("kiln: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("kiln: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except OSError as exc:
        click.echo(f"kiln: error: {exc.filename or ''}: {exc.strerror or exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
