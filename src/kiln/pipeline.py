"""The Python API behind `kiln export gguf|onnx`: read → resolve rope → write → (Modelfile) → verify → manifest.

The CLI is a thin layer over these functions so apps and recipes get exactly the same behaviour.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import families
from kiln.atomic import atomic_dir, atomic_file
from kiln.bytelevel import describe, reachable_missing
from kiln.checkpoint import load_checkpoint
from kiln.checkpoint.rope import resolve
from kiln.compress.llama_quant import quant_type
from kiln.errors import KilnError
from kiln.manifest import file_record, manifest_path, write_manifest, write_manifest_file
from kiln.outputs import check_output, may_replace

Progress = Callable[[str, int, int], None]


@dataclass
class OnnxExportResult:
    directory: Path
    manifest: Path
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class GGUFExportResult:
    gguf: Path
    manifest: Path
    modelfile: Path | None
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def modelfile_path(gguf: Path) -> Path:
    """`model.q8_0.gguf` -> `model.q8_0.Modelfile`: several GGUFs can share a directory."""
    return gguf.with_name((gguf.name[:-5] if gguf.name.endswith(".gguf") else gguf.name) + ".Modelfile")


def export_gguf_artifact(
    src: str | Path,
    out: str | Path,
    quant: str | None = None,
    *,
    rope_scaling: str | None = None,
    original_context: int | None = None,
    context: int | None = None,
    allow_shorter_context: bool = False,
    imatrix: str | Path | None = None,
    modelfile: bool = False,
    verify: bool = True,
    threads: int = 0,
    allow_pickle: bool = False,
    n_heads: int | None = None,
    tokenizer: str | Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> GGUFExportResult:
    """Export `src` to the GGUF `out`, verified against `src` unless `verify=False`.

    A native Arbor checkpoint (kiln.checkpoint.arbor) goes to llama.cpp's gpt2 architecture;
    `n_heads` and `tokenizer` are for Arbor sources that do not carry them. An existing `out`
    (and its manifest and Modelfile) is replaced only when kiln wrote it, or with `force`.
    """
    from kiln.export.gguf import default_quant, export_gguf

    out = check_output(out, "gguf", force=force, sources=(src, imatrix, tokenizer),
                       companions=lambda dest: _gguf_companions(dest, modelfile))
    if families.claiming(src) is not None:  # read by its family's own reader (native Arbor)
        qtype = quant_type(quant or "f16")
        if rope_scaling or original_context or context:
            raise KilnError(f"{src}: a native Arbor checkpoint has absolute positions, no RoPE to scale")
        return _export_arbor_gguf(Path(src), out, qtype, n_heads=n_heads, tokenizer=tokenizer,
                                  imatrix=imatrix, modelfile=modelfile, verify=verify, threads=threads,
                                  allow_pickle=allow_pickle, progress=progress, force=force)
    ckpt = load_checkpoint(src, allow_pickle=allow_pickle)
    qtype = quant_type(quant or default_quant(ckpt))
    rope = resolve(ckpt.spec.rope, rope_scaling, original_context, context, allow_shorter_context)
    imatrix_path = Path(imatrix) if imatrix else None
    warnings: list[str] = []
    stats = export_gguf(ckpt, out, qtype, rope, imatrix=imatrix_path, threads=threads, progress=progress,
                        warnings=warnings, force=force)
    reachable = reachable_missing(ckpt.spec.tokenizer.unrepresentable_bytes) if ckpt.spec.tokenizer else []
    if reachable:
        warnings.append(f"vocabulary has no byte token for {describe(reachable)}: "
                        "llama.cpp aborts on text containing them; kiln's runtime refuses such text")
    mf = None
    if modelfile:
        mf = write_modelfile_for(out, ckpt.spec.source, warnings, force=force)
    record = {
        "kind": "gguf",
        "source": {"path": str(Path(src).resolve()), "sha256": ckpt.source_hash(),
                   "architecture": ckpt.spec.hf_architecture, "family": ckpt.spec.family},
        "options": {"quant": qtype.name, "rope_scaling": rope_scaling, "original_context": original_context,
                    "context": context, "imatrix": str(imatrix_path) if imatrix_path else None},
        "rope": rope.to_json(),
        "files": [file_record(out)] + ([file_record(mf)] if mf else []),
        "bits_per_weight": round(stats.bits_per_weight, 4),
        "tensor_types": stats.tensor_types,
        "n_params": ckpt.spec.n_params,
        "verification": None,
        "warnings": warnings,
    }

    def check() -> dict[str, Any]:
        from kiln.verify.gguf_check import verify_gguf

        return verify_gguf(out, ckpt.spec.source, rope, qtype, threads=threads or None).to_json()

    return _record_and_verify(out, mf, record, check if verify else None, warnings, progress)


def _gguf_companions(out: Path, modelfile: bool) -> list[tuple[Path, str]]:
    """The files an export writes beside the GGUF, checked with it before any work."""
    return [(manifest_path(out), "manifest")] + ([(modelfile_path(out), "modelfile")] if modelfile else [])


def _record_and_verify(out: Path, mf: Path | None, record: dict[str, Any], check: Callable[[], dict[str, Any]] | None,
                       warnings: list[str], progress: Progress | None) -> GGUFExportResult:
    """Manifest first (so the GGUF is known as kiln's from the moment it is in place, even if the
    verification is interrupted), then the verification, then the manifest again with its figures."""
    manifest = write_manifest(out, record)
    if check is None:
        return GGUFExportResult(out, manifest, mf, record, warnings)
    if progress:
        progress("verify", 0, 1)
    verification = record["verification"] = check()
    if progress:
        progress("verify", 1, 1)
    write_manifest(out, record)
    if not verification["passed"]:
        raise KilnError(f"{out}: verification failed: {verification['criterion']} (see {manifest.name})")
    return GGUFExportResult(out, manifest, mf, record, warnings)


def _arbor_tokenizer_dir(src: Path, tokenizer: str | Path | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    base = src if src.is_dir() else src.parent
    for cand in (base, base / "tokenizer"):
        if (cand / "tokenizer.json").exists():
            return cand
    raise KilnError(f"{src}: no tokenizer.json beside the checkpoint (nor in tokenizer/): pass --tokenizer DIR")


def _export_arbor_gguf(src: Path, out: Path, qtype, *, n_heads: int | None, tokenizer: str | Path | None,
                       imatrix: str | Path | None, modelfile: bool, verify: bool, threads: int,
                       allow_pickle: bool, progress: Progress | None, force: bool) -> GGUFExportResult:
    from kiln.checkpoint.arbor import read_arbor
    from kiln.checkpoint.reader import source_hash
    from kiln.checkpoint.tokenizer import read_tokenizer
    from kiln.export.gguf import write_gguf_atomic
    from kiln.export.gguf_gpt2 import write_gpt2_gguf

    spec, tensors = read_arbor(src, n_heads=n_heads, allow_pickle=allow_pickle)
    tok_dir = _arbor_tokenizer_dir(src, tokenizer)
    tok = read_tokenizer(tok_dir, max(spec.vocab, _tokenizer_size(tok_dir)))
    name = src.stem if src.is_file() else src.name
    stats = write_gguf_atomic(
        out, qtype, lambda dest, q, ftype: write_gpt2_gguf(spec, tensors, tok, dest, q, ftype, name, progress),
        imatrix=Path(imatrix) if imatrix else None, threads=threads, progress=progress, force=force)
    warnings: list[str] = []
    mf = write_modelfile_for(out, None, warnings, force=force) if modelfile else None
    record = {
        "kind": "gguf",
        "source": {"path": str(src.resolve()), "sha256": source_hash(src) if src.is_dir() else None,
                   "architecture": "arbor", "family": "gpt2", "layout": spec.layout},
        "options": {"quant": qtype.name, "n_heads": n_heads, "tokenizer": str(tok_dir),
                    "imatrix": str(imatrix) if imatrix else None},
        "arbor": {"ffn_widths": list(spec.ffn_widths), "max_positions": spec.max_positions,
                  "activation": spec.activation},
        "files": [file_record(out)] + ([file_record(mf)] if mf else []),
        "bits_per_weight": round(stats.bits_per_weight, 4),
        "tensor_types": stats.tensor_types,
        "verification": None,
        "warnings": warnings,
    }

    def check() -> dict[str, Any]:
        from kiln.verify.arbor_check import verify_arbor_gguf

        return verify_arbor_gguf(out, spec, tensors, qtype, threads=threads or None).to_json()

    return _record_and_verify(out, mf, record, check if verify else None, warnings, progress)


def _export_arbor_onnx(src: Path, out: Path, *, n_heads: int | None, tokenizer: str | Path | None, verify: bool,
                       threads: int, allow_pickle: bool, force: bool) -> OnnxExportResult:
    """Native Arbor as an exact GPT-2 graph (kiln.export.onnx_gpt2), checked against Arbor's own forward:
    unlike llama.cpp, onnxruntime computes exact-erf GELU, so the flat f32 bound applies."""
    from kiln.checkpoint.arbor import read_arbor, to_gpt2
    from kiln.checkpoint.reader import source_hash
    from kiln.checkpoint.tokenizer import read_tokenizer
    from kiln.export.onnx_gpt2 import write_gpt2_onnx

    spec, tensors = read_arbor(src, n_heads=n_heads, allow_pickle=allow_pickle)
    tok_dir = _arbor_tokenizer_dir(src, tokenizer)
    tok = read_tokenizer(tok_dir, max(spec.vocab, _tokenizer_size(tok_dir)))
    config, state = to_gpt2(spec, tensors)

    def build(tmp: Path) -> dict[str, Any]:
        counts = write_gpt2_onnx(config, state, tmp, tokenizer_dir=tok_dir, eos_token_id=tok.eos_id,
                                 bos_token_id=tok.bos_id)
        return {"kind": "onnx",
                "source": {"path": str(src.resolve()), "sha256": source_hash(src) if src.is_dir() else None,
                           "architecture": "arbor", "family": "gpt2", "layout": spec.layout},
                "options": {"precision": "fp32", "n_heads": n_heads, "tokenizer": str(tok_dir)},
                "arbor": {"ffn_widths": list(spec.ffn_widths), "max_positions": spec.max_positions,
                          "activation": spec.activation},
                "op_counts": counts}

    def check(tmp: Path) -> dict[str, Any]:
        from kiln.verify.arbor_check import verify_arbor_onnx

        return verify_arbor_onnx(tmp, spec, tensors, threads=threads or None).to_json()

    return _onnx_directory(out, force, build, check if verify else None, [], None)


def _onnx_directory(out: Path, force: bool, build: Callable[[Path], dict[str, Any]],
                    check: Callable[[Path], dict[str, Any]] | None, warnings: list[str],
                    progress: Progress | None) -> OnnxExportResult:
    """Every ONNX export's one sequence: build the directory beside `out`, verify it there, record it
    (manifest.json inside, listing every file), and only then put it in place; a failed verification
    still publishes the directory with its figures, and raises."""
    with atomic_dir(out, may_replace("onnx", force)) as tmp:
        record = build(tmp)
        verification = None
        if check is not None:
            if progress:
                progress("verify", 0, 1)
            verification = check(tmp)
            if progress:
                progress("verify", 1, 1)
        record.update({"files": [file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()],
                       "verification": verification, "warnings": warnings})
        write_manifest_file(tmp / ONNX_MANIFEST, record)
    manifest = out / ONNX_MANIFEST
    if verification is not None and not verification["passed"]:
        raise KilnError(f"{out}: verification failed: {verification['criterion']} (see {manifest})")
    return OnnxExportResult(out, manifest, record, warnings)


def _tokenizer_size(directory: Path) -> int:
    """Ids the tokenizer uses (llama.cpp needs an embedding row for each: missing rows are zero-padded)."""
    import json

    try:
        data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
        ids = [*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0  # read_tokenizer reports what is wrong with it
    return max(ids) + 1 if ids else 0


def write_modelfile_for(gguf: Path, source: Path | None = None, warnings: list[str] | None = None,
                        out: Path | None = None, force: bool = False) -> Path:
    """Write `<name>.Modelfile` beside `gguf` (with the source's LICENSE copied next to it, unless a
    LICENSE is there already); an existing Modelfile not written by kiln is kept unless `force`."""
    from kiln.export.modelfile import render_modelfile

    if source is not None:
        for name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
            lic = source / name
            dest = gguf.parent / "LICENSE"
            if lic.exists() and not dest.exists():
                with atomic_file(dest) as tmp:
                    shutil.copyfile(lic, tmp)
                break
    dest = check_output(out or modelfile_path(gguf), "modelfile", force=force, sources=(gguf,))
    import os

    rel = os.path.relpath(gguf.resolve(), dest.resolve().parent)
    ref = rel if rel.startswith("..") else f"./{rel}"
    result = render_modelfile(gguf, from_ref=ref)
    if warnings is not None:
        warnings.extend(result.warnings)
    with atomic_file(dest, may_replace("modelfile", force)) as tmp:
        tmp.write_text(result.text, encoding="utf-8")
    return dest


ONNX_MANIFEST = "manifest.json"


def export_onnx_artifact(
    src: str | Path,
    out: str | Path,
    precision: str = "int4",
    *,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 4,
    lm_head: str = "int8",
    embeddings: str = "quant",
    execution_provider: str = "cpu",
    method: str = "default",
    rope_scaling: str | None = None,
    original_context: int | None = None,
    context: int | None = None,
    allow_shorter_context: bool = False,
    verify: bool = True,
    threads: int = 0,
    allow_pickle: bool = False,
    n_heads: int | None = None,
    tokenizer: str | Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> OnnxExportResult:
    """Export `src` to the ONNX model directory `out` (model.onnx + data, genai_config.json,
    tokenizer files, manifest.json), verified in onnxruntime against `src` unless `verify=False`.

    The directory appears only when complete: it is built beside `out` and renamed into place. An
    existing `out` is replaced only when it is a kiln ONNX directory holding nothing else, or with `force`.
    """
    from kiln.export.onnx import OnnxOptions, check_supported, export_onnx, options_json

    out = check_output(out, "onnx", force=force, sources=(src, tokenizer))
    if families.claiming(src) is not None:  # read by its family's own reader (native Arbor)
        if precision != "fp32":
            raise KilnError(f"{src}: native Arbor checkpoints export to ONNX at fp32 only (kiln writes that graph "
                            "itself; onnxruntime-genai's builder has no GPT-2)")
        if rope_scaling or original_context or context:
            raise KilnError(f"{src}: a native Arbor checkpoint has absolute positions, no RoPE to scale")
        return _export_arbor_onnx(Path(src), out, n_heads=n_heads, tokenizer=tokenizer, verify=verify,
                                  threads=threads, allow_pickle=allow_pickle, force=force)
    options = OnnxOptions(precision=precision, block_size=block_size, symmetric=symmetric,
                          accuracy_level=accuracy_level, lm_head=lm_head, embeddings=embeddings,
                          execution_provider=execution_provider, method=method)
    options.validate()
    if verify and precision == "fp16":
        raise KilnError("fp16 ONNX graphs run on CUDA only, and kiln verifies ONNX graphs in onnxruntime on the CPU: "
                        "pass --no-verify to export one unverified")
    ckpt = load_checkpoint(src, allow_pickle=allow_pickle)
    check_supported(ckpt)
    if ckpt.gptq is not None:
        # The builder's GPTQ loader keeps the checkpoint's codes and scales (MatMulNBits, not
        # re-quantized); --precision then only reaches the tensors GPTQ left in float.
        wanted = f"int{ckpt.gptq.bits}"
        if precision != wanted:
            raise KilnError(f"{src}: a {ckpt.gptq.bits}-bit GPTQ checkpoint exports as --precision {wanted} "
                            "(its weights go into the graph as they are)")
    rope = resolve(ckpt.spec.rope, rope_scaling, original_context, context, allow_shorter_context)
    def build(tmp: Path) -> dict[str, Any]:
        stats = export_onnx(ckpt, tmp, options, rope, progress=progress)
        return {"kind": "onnx",
                "source": {"path": str(Path(src).resolve()), "sha256": ckpt.source_hash(),
                           "architecture": ckpt.spec.hf_architecture, "family": ckpt.spec.family},
                "options": {**options_json(options), "rope_scaling": rope_scaling,
                            "original_context": original_context, "context": context},
                "rope": rope.to_json(), "bits_per_weight": round(stats.bits_per_weight, 4),
                "op_counts": stats.op_counts, "n_params": ckpt.spec.n_params}

    def check(tmp: Path) -> dict[str, Any]:
        from kiln.verify.onnx_check import verify_onnx

        return verify_onnx(tmp, ckpt.spec.source, rope, precision, threads=threads or None).to_json()

    return _onnx_directory(out, force, build, check if verify else None, [], progress)
