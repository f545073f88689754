"""The Python API behind `kiln export gguf|onnx`: read → resolve rope → write → (Modelfile) → verify → manifest.

The CLI is a thin layer over these functions so apps and recipes get exactly the same behaviour.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln import families
from kiln.atomic import atomic_dir, atomic_file
from kiln.bytelevel import describe, reachable_missing
from kiln.checkpoint import load_checkpoint
from kiln.checkpoint.rope import RopeSettings, resolve
from kiln.compress.llama_quant import QuantType, quant_type
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


class _Source:
    """A checkpoint read for export: what the one pipeline asks of it, whatever its family's layout.

    `kiln.families` says which layout a family has; each layout has one source class here, the
    single place where a layout meets the writers (kiln.export) and the reference (kiln.verify)."""

    family: type
    path: Path
    default_quant = "f16"
    license_dir: Path | None = None

    def rope(self, rope_scaling: str | None, original_context: int | None, context: int | None,
             allow_shorter_context: bool) -> RopeSettings | None:
        raise NotImplementedError

    def source_record(self) -> dict[str, Any]:
        raise NotImplementedError

    def record(self, rope: RopeSettings | None) -> dict[str, Any]:
        """Manifest blocks beside `source` and `options` (rope, parameter count, family details)."""
        return {}

    def options(self) -> dict[str, Any]:
        return {}

    def write_gguf(self, out: Path, qtype: QuantType, rope: RopeSettings | None, imatrix: Path | None,
                   threads: int, progress: Progress | None, warnings: list[str], force: bool) -> Any:
        raise NotImplementedError

    def check_onnx(self, precision: str) -> None:
        """Refuse ONNX options this layout cannot honour, before any work."""

    def write_onnx(self, tmp: Path, options: Any, rope: RopeSettings | None, progress: Progress | None) -> dict[str, Any]:
        raise NotImplementedError

    def onnx_warnings(self) -> list[str]:
        """What the ONNX graph leaves out of the checkpoint on purpose (a vision tower, an MTP head)."""
        return []

    def reference(self, rope: RopeSettings | None) -> Any:
        """What verification compares the artifact with (kiln.verify.reference)."""
        raise NotImplementedError


class _DecoderSource(_Source):
    """A Llama-shaped checkpoint (kiln.checkpoint.load_checkpoint): kiln's GGUF writer, onnxruntime-genai's builder."""

    def __init__(self, src: Path, allow_pickle: bool):
        self.path = src
        self.ckpt = load_checkpoint(src, allow_pickle=allow_pickle)
        self.family = families.of(self.ckpt.spec)
        self.license_dir = self.ckpt.spec.source

    @property
    def default_quant(self) -> str:  # type: ignore[override]
        from kiln.export.gguf import default_quant

        return default_quant(self.ckpt)

    def rope(self, rope_scaling, original_context, context, allow_shorter_context):
        return resolve(self.ckpt.spec.rope, rope_scaling, original_context, context, allow_shorter_context)

    def source_record(self) -> dict[str, Any]:
        spec = self.ckpt.spec
        return {"path": str(self.path.resolve()), "sha256": self.ckpt.source_hash(),
                "architecture": spec.hf_architecture, "family": spec.family}

    def record(self, rope):
        return {"rope": {**rope.to_json(), **self.family.position_scope(self.ckpt.spec)},
                "n_params": self.ckpt.spec.n_params}

    def write_gguf(self, out, qtype, rope, imatrix, threads, progress, warnings, force):
        from kiln.export.gguf import export_gguf

        stats = export_gguf(self.ckpt, out, qtype, rope, imatrix=imatrix, threads=threads, progress=progress,
                            warnings=warnings, force=force)
        tok = self.ckpt.spec.tokenizer
        reachable = reachable_missing(tok.unrepresentable_bytes) if tok else []
        if reachable:
            warnings.append(f"vocabulary has no byte token for {describe(reachable)}: "
                            "llama.cpp aborts on text containing them; kiln's runtime refuses such text")
        return stats

    def check_onnx(self, precision):
        from kiln.export.onnx import check_supported

        check_supported(self.ckpt)
        if self.ckpt.gptq is not None:
            # The builder's GPTQ loader keeps the checkpoint's codes and scales (MatMulNBits, not
            # re-quantized); --precision then only reaches the tensors GPTQ left in float.
            wanted = f"int{self.ckpt.gptq.bits}"
            if precision != wanted:
                raise KilnError(f"{self.path}: a {self.ckpt.gptq.bits}-bit GPTQ checkpoint exports as --precision "
                                f"{wanted} (its weights go into the graph as they are)")

    def write_onnx(self, tmp, options, rope, progress):
        from kiln.export.onnx import export_onnx, options_json

        stats = export_onnx(self.ckpt, tmp, options, rope, progress=progress)
        return {"options": options_json(options), "bits_per_weight": round(stats.bits_per_weight, 4),
                "op_counts": stats.op_counts}

    def onnx_warnings(self):
        # the builder writes the text model only, without multi-token prediction layers (exclude_mtp)
        spec = replace(self.ckpt.spec, mtp_layers=0)
        return self.family.export_warnings(spec, self.ckpt.tensors.names())

    def reference(self, rope):
        from kiln.verify.reference import Reference

        return Reference(self.ckpt.spec.source, rope)


class _Gpt2Source(_Source):
    """A GPT-2 shaped checkpoint in kiln's GPT-2 form (kiln.checkpoint.gpt2): llama.cpp's gpt2 architecture
    and kiln's own ONNX GPT-2 graph; absolute positions, so no RoPE to scale."""

    def __init__(self, src: Path, family: type, n_heads: int | None, tokenizer: str | Path | None,
                 allow_pickle: bool):
        self.path = src
        self.family = family
        self.model = family.read_gpt2(src, n_heads=n_heads, tokenizer=tokenizer, allow_pickle=allow_pickle)
        self.license_dir = src if src.is_dir() else None

    def rope(self, rope_scaling, original_context, context, allow_shorter_context):
        return None  # absolute positions: `_refuse_early` has refused the rope options

    def source_record(self) -> dict[str, Any]:
        from kiln.checkpoint.reader import source_hash

        return {"path": str(self.path.resolve()), "sha256": source_hash(self.path) if self.path.is_dir() else None,
                "architecture": self.model.architecture, "family": self.family.name, "layout": self.model.layout}

    def options(self) -> dict[str, Any]:
        return dict(self.model.options)

    def record(self, rope):
        return {"context_length": self.model.context, **self.model.record}

    def write_gguf(self, out, qtype, rope, imatrix, threads, progress, warnings, force):
        from kiln.export.gguf import write_gguf_atomic
        from kiln.export.gguf_gpt2 import write_gpt2_gguf

        return write_gguf_atomic(
            out, qtype, lambda dest, q, ftype: write_gpt2_gguf(self.model, dest, q, ftype, progress),
            imatrix=imatrix, threads=threads, progress=progress, force=force)

    def write_onnx(self, tmp, options, rope, progress):
        from kiln.export.onnx_gpt2 import write_gpt2_onnx

        tok = self.model.tokenizer
        counts = write_gpt2_onnx(self.model.config, self.model.state, tmp, tokenizer_dir=self.model.tokenizer_dir,
                                 eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
        return {"options": {"precision": "fp32"}, "op_counts": counts}

    def reference(self, rope):
        from kiln.verify.arbor_reference import ArborReference
        from kiln.verify.reference import Gpt2Reference

        # the family's `reference` names which forward runs the source (kiln.families.base.Family)
        return {"transformers": Gpt2Reference, "arbor": ArborReference}[self.family.reference](self.model)


def _rope_findings(source: Any, rope: RopeSettings | None) -> list[str]:
    """Warnings for a rope setting that bench/longctx.py measured harmful on this family (kiln/data/rope_findings.json)."""
    from kiln.longeval import rope_warnings

    spec = getattr(getattr(source, "ckpt", None), "spec", None)
    return rope_warnings(getattr(spec, "family", "") or "", rope)


def _refuse_early(src: str | Path, *, rope: bool, precision: str | None = None) -> type | None:
    """The source's family (None: left to the decoder reader), after refusing the options it cannot honour,
    before anything is read (reading a pickle or a large checkpoint first would make the user wait for a
    refusal the family already knew)."""
    family = families.for_source(src)
    if family is None:
        return None
    if rope and not family.rotary:
        raise KilnError(f"{src}: {family.description} has absolute positions, no RoPE to scale")
    allowed = family.onnx_precisions
    if precision is not None and allowed is not None and precision not in allowed:
        if not allowed:
            raise KilnError(f"{src}: {family.description} has no ONNX export (onnxruntime-genai's builder does not "
                            "take the family, and kiln writes no graph of its own for it)")
        raise KilnError(f"{src}: {family.description} exports to ONNX at {'/'.join(allowed)} only "
                        f"({family.onnx_precisions_reason})")
    return family


def open_source(src: str | Path, *, allow_pickle: bool = False, n_heads: int | None = None,
                tokenizer: str | Path | None = None, family: type | None = None) -> _Source:
    """Read `src` the way its family says (`family`: already found by `families.for_source`): kiln's GPT-2
    form for a GPT-2 shaped family, the decoder reader (which recognises every other checkpoint, or
    refuses it with the reason) otherwise."""
    src = Path(src)
    family = family or families.for_source(src)
    if family is not None and family.layout == "gpt2":
        return _Gpt2Source(src, family, n_heads, tokenizer, allow_pickle)
    return _DecoderSource(src, allow_pickle)


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
    num_ctx: int | None = None,
    verify: bool = True,
    threads: int = 0,
    allow_pickle: bool = False,
    n_heads: int | None = None,
    tokenizer: str | Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> GGUFExportResult:
    """Export `src` to the GGUF `out`, verified against `src` unless `verify=False`.

    A GPT-2 shaped checkpoint (HF GPT-2, nanoGPT, native Arbor) goes to llama.cpp's gpt2 architecture;
    `n_heads` and `tokenizer` are for sources that do not carry them (Arbor, nanoGPT). An existing `out`
    (and its manifest and Modelfile) is replaced only when kiln wrote it, or with `force`.
    """
    out = check_output(out, "gguf", force=force, sources=(src, imatrix, tokenizer),
                       companions=lambda dest: _gguf_companions(dest, modelfile))
    family = _refuse_early(src, rope=bool(rope_scaling or original_context or context))
    source = open_source(src, allow_pickle=allow_pickle, n_heads=n_heads, tokenizer=tokenizer, family=family)
    qtype = quant_type(quant or source.default_quant)
    rope = source.rope(rope_scaling, original_context, context, allow_shorter_context)
    imatrix_path = Path(imatrix) if imatrix else None
    warnings: list[str] = _rope_findings(source, rope)
    stats = source.write_gguf(out, qtype, rope, imatrix_path, threads, progress, warnings, force)
    mf = write_modelfile_for(out, source.license_dir, warnings, force=force, num_ctx=num_ctx) if modelfile else None
    record = {
        "kind": "gguf",
        "source": source.source_record(),
        "options": {"quant": qtype.name, "rope_scaling": rope_scaling, "original_context": original_context,
                    "context": context, "imatrix": str(imatrix_path) if imatrix_path else None, **source.options()},
        **source.record(rope),
        "files": [file_record(out)] + ([file_record(mf)] if mf else []),
        "bits_per_weight": round(stats.bits_per_weight, 4),
        "tensor_types": stats.tensor_types,
        "verification": None,
        "warnings": warnings,
    }

    def check() -> dict[str, Any]:
        from kiln.formats import by_name
        from kiln.verify.check import verify_artifact

        return verify_artifact(out, source.reference(rope), qtype.name, qtype.float_dtype, fmt=by_name("gguf"),
                               context=rope.context_length if rope else None, threads=threads or None).to_json()

    manifest = write_manifest(out, record)  # first: the GGUF is known as kiln's even if verification is cut short
    if verify:
        _verified(record, check, progress)
        write_manifest(out, record)
        _raise_if_failed(record, out, manifest)
    return GGUFExportResult(out, manifest, mf, record, warnings)


def _gguf_companions(out: Path, modelfile: bool) -> list[tuple[Path, str]]:
    """The files an export writes beside the GGUF, checked with it before any work."""
    return [(manifest_path(out), "manifest")] + ([(modelfile_path(out), "modelfile")] if modelfile else [])


def _verified(record: dict[str, Any], check: Callable[[], dict[str, Any]], progress: Progress | None) -> None:
    if progress:
        progress("verify", 0, 1)
    record["verification"] = check()
    if progress:
        progress("verify", 1, 1)


def _raise_if_failed(record: dict[str, Any], out: Path, manifest: Path) -> None:
    verification = record["verification"]
    if verification is not None and not verification["passed"]:
        raise KilnError(f"{out}: verification failed: {verification['criterion']} (see {manifest.name})")


def write_modelfile_for(gguf: Path, source: Path | None = None, warnings: list[str] | None = None,
                        out: Path | None = None, force: bool = False, num_ctx: int | None = None) -> Path:
    """Write `<name>.Modelfile` beside `gguf` (with the source's LICENSE copied next to it, unless a
    LICENSE is there already); an existing Modelfile not written by kiln is kept unless `force`.
    `num_ctx` (PARAMETER num_ctx, the KV cache Ollama allocates): by default the largest context this
    machine's available memory holds by kiln plan's cost model, at most the model's."""
    from kiln.bench.plan import machine_num_ctx
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
    result = render_modelfile(gguf, from_ref=ref, num_ctx=num_ctx if num_ctx is not None else machine_num_ctx(gguf))
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

    The directory appears only when complete: it is built beside `out`, verified there, recorded
    (manifest.json inside, listing every file) and renamed into place; a failed verification still
    publishes the directory with its figures, and raises. An existing `out` is replaced only when it
    is a kiln ONNX directory holding nothing else, or with `force`.
    """
    from kiln.export.onnx import OnnxOptions

    out = check_output(out, "onnx", force=force, sources=(src, tokenizer))
    options = OnnxOptions(precision=precision, block_size=block_size, symmetric=symmetric,
                          accuracy_level=accuracy_level, lm_head=lm_head, embeddings=embeddings,
                          execution_provider=execution_provider, method=method)
    options.validate()
    if verify and precision == "fp16":
        raise KilnError("fp16 ONNX graphs run on CUDA only, and kiln verifies ONNX graphs in onnxruntime on the CPU: "
                        "pass --no-verify to export one unverified")
    family = _refuse_early(src, rope=bool(rope_scaling or original_context or context), precision=precision)
    source = open_source(src, allow_pickle=allow_pickle, n_heads=n_heads, tokenizer=tokenizer, family=family)
    source.check_onnx(precision)
    rope = source.rope(rope_scaling, original_context, context, allow_shorter_context)
    from kiln.formats import by_name

    fmt = by_name("onnx")
    with atomic_dir(out, may_replace("onnx", force)) as tmp:
        written = source.write_onnx(tmp, options, rope, progress)
        record = {"kind": "onnx", "source": source.source_record(), **source.record(rope),
                  **written,
                  "options": {**written.pop("options"), "rope_scaling": rope_scaling,
                              "original_context": original_context, "context": context, **source.options()},
                  "verification": None}

        def check() -> dict[str, Any]:
            from kiln.verify.check import ONNX_FLOAT, verify_artifact

            return verify_artifact(tmp, source.reference(rope), precision, ONNX_FLOAT[precision], fmt=fmt,
                                   context=rope.context_length if rope else None,
                                   threads=threads or None).to_json()

        if verify:
            _verified(record, check, progress)
        warnings = source.onnx_warnings() + _rope_findings(source, rope)
        record.update({"files": [file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()], "warnings": warnings})
        write_manifest_file(tmp / ONNX_MANIFEST, record)
    _raise_if_failed(record, out, out / ONNX_MANIFEST)
    return OnnxExportResult(out, out / ONNX_MANIFEST, record, warnings)
