"""Checkpoint -> GGUF: kiln's own converter on gguf-py's writer, llama.cpp's quantizer for the rest.

Tensors are streamed: the header is planned from shapes alone, then each tensor is
loaded, converted and written before the next is touched, so peak memory is about
one tensor (llama.cpp's convert_hf_to_gguf holds far more). Output is atomic, and
the file is re-read (kiln.gguf_header) before llama.cpp ever sees it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from kiln.atomic import atomic_file, temp_prefix
from kiln.bytelevel import describe, essential_missing, missing_bytes
from kiln.checkpoint import Checkpoint
from kiln.checkpoint.gptq import GPTQLinear
from kiln.checkpoint.rope import RopeSettings
from kiln.compress.llama_quant import QuantType, quantize_gguf
from kiln import families
from kiln.errors import KilnError
from kiln.export.gguf_blocks import gguf_blocks, gguf_moves, gguf_type_for, q4_1_min_error
from kiln.export.gguf_meta import llama3_rope_factors, write_hparams, write_tokenizer
from kiln.gguf_header import GGUFFile, open_gguf
from kiln.outputs import check_output, may_replace

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class GGUFStats:
    size: int
    bits_per_weight: float  # all tensor bytes * 8 / all tensor elements
    tensor_types: dict[str, int]  # ggml type name -> tensor count
    n_elements: int


def _planned(ckpt: Checkpoint, rope: RopeSettings) -> Iterator[tuple[str, str | None, tuple[int, ...], bool,
                                                                    families.TensorRow | None]]:
    """(gguf name, hf name or None for generated tensors, numpy shape, kept float32, its family row) in write
    order. A mixture of experts' stacked tensors have the expert count in front (families.base.TensorRow)."""
    spec = ckpt.spec
    if rope.type == "llama3":
        yield "rope_freqs.weight", None, (spec.head_dim // 2,), True, None
    for hf, gguf, shape, row in families.of(spec).tensors(spec):
        yield gguf, hf, shape, row.f32, row


def _convert(arr: np.ndarray, qtype: Q) -> np.ndarray:
    """Encode as raw bytes of `qtype` (1-D tensors always stay F32, as llama.cpp expects)."""
    if arr.ndim == 1 or qtype == Q.F32:
        return np.ascontiguousarray(arr, dtype=np.float32).view(np.uint8)
    if qtype == Q.F16:
        return np.ascontiguousarray(arr.astype(np.float16)).view(np.uint8)
    return np.ascontiguousarray(quantize(arr, qtype)).view(np.uint8)


def _tensor_qtype(shape: tuple[int, ...], qtype: Q, f32: bool = False) -> Q:
    return Q.F32 if len(shape) == 1 or f32 else qtype


def _byte_shape(shape: tuple[int, ...], qtype: Q) -> tuple[int, ...]:
    itemsize = {Q.F32: 4, Q.F16: 2, Q.BF16: 2}[qtype]
    return (*shape[:-1], shape[-1] * itemsize)


_GPTQ_TARGETS = {"q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q8_0": Q.Q8_0}


def default_quant(ckpt: Checkpoint) -> str:
    """f16 for float checkpoints; a GPTQ checkpoint's own GGUF block type (bit-exact) otherwise."""
    g = ckpt.gptq
    if g is None:
        return "f16"
    if g.bits == 8:
        return "q8_0"
    return "q4_0" if g.sym else "q4_1"


def _gptq_parts(ckpt: Checkpoint, hf: str, shape: tuple[int, ...],
                row: families.TensorRow) -> list[tuple[str, GPTQLinear | None, str]]:
    """The GPTQ linears the GGUF tensor `hf` (a family `tensors()` row) is made of, each moved into the GGUF's
    layout (rows and input columns as the family's transform orders them, groups following their columns):
    one for a matrix, one per expert slot, in the GGUF's expert order, for a stacked row (`TensorRow.experts`).
    Each is (checkpoint linear, layout or None, why it has none); [] where the tensor holds no GPTQ linear."""
    spec = ckpt.spec
    family = families.of(spec)
    linears = set(ckpt.tensors.linears)
    names = [hf.format(e=e) for e in range(shape[0])] if row.experts else [hf]
    bases = [family.checkpoint_name(n, spec)[: -len(".weight")] for n in names if n.endswith(".weight")]
    held = [b for b in bases if b in linears]
    if not held:
        return []
    if len(held) < len(names):
        return [(b, None, "stacked with experts that are not GPTQ linears") for b in held]
    moves = gguf_moves(lambda w: family.to_gguf(hf, w, spec), shape)
    if moves is None:
        return [(b, None, "the GGUF's transform of the tensor is not a reordering") for b in bases]
    order = (moves[0] if moves[0] is not None else range(shape[0])) if row.experts else [0]
    rows, cols = moves[-2:]
    return [(bases[k], ckpt.tensors.linear(bases[k]).reordered(rows, cols), "") for k in order]


def gptq_plan(ckpt: Checkpoint, quant: QuantType) -> tuple[dict[str, Q], list[str]]:
    """GGUF tensors (family `tensors()` names) written as their GPTQ linears' own blocks, and a warning for
    the linears that cannot be.

    Only linears whose GPTQ grid *is* a GGUF block of the requested type are kept exactly, in the GGUF's
    layout (reordered rows and columns, experts stacked); the rest are dequantized here and requantized by
    llama.cpp, which loses the calibration's rounding decisions (the warning says why, and which --quant
    would keep them).
    """
    if ckpt.gptq is None:
        return {}, []
    target = _GPTQ_TARGETS.get(quant.name)
    plan: dict[str, Q] = {}
    reasons: dict[str, int] = {}
    exact_type = None
    min_error = 0.0
    for hf, _, shape, row in families.of(ckpt.spec).tensors(ckpt.spec):
        parts = _gptq_parts(ckpt, hf, shape, row)
        found = []
        for _, layer, why in parts:
            t = None
            if layer is not None:
                t, why = gguf_type_for(layer, ckpt.gptq.group_size)
            if t is not None:
                exact_type = t
                if t != target:
                    t, why = None, f"its exact GGUF type is {t.name.lower()}, not {quant.name}"
            found.append((t, why, layer))
        if found and target is not None and all(t == target for t, _, _ in found):
            plan[hf] = target
            if target == Q.Q4_1:
                min_error = max(min_error, *(q4_1_min_error(layer) for _, _, layer in found))
            continue
        for t, why, _ in found:
            why = why or "stacked with experts that have no exact GGUF block"
            reasons[why] = reasons.get(why, 0) + 1
    warnings = []
    for why, n in reasons.items():
        hint = f" (--quant {exact_type.name.lower()} keeps them bit for bit)" if exact_type is not None else ""
        warnings.append(f"{n} GPTQ linears are dequantized and requantized to {quant.name}: {why}; the "
                        f"calibrated rounding is not kept{hint}")
    if min_error > 0:
        warnings.append(f"Q4_1 stores the block minimum as float16: GPTQ zero·scale rounded by up to {min_error:.3g} "
                        "(kiln's own q4_1 grid is exact)")
    return plan, warnings


def gptq_tensor(ckpt: Checkpoint, hf: str, shape: tuple[int, ...], row: families.TensorRow, qtype: Q) -> np.ndarray:
    """Raw GGUF bytes of the GGUF tensor `hf` from its GPTQ linears (`gptq_plan`): each linear's blocks in the
    GGUF's layout, a stacked row's experts stacked on the first axis as the GGUF orders them."""
    blocks = []
    for base, layer, why in _gptq_parts(ckpt, hf, shape, row):
        if layer is None:
            raise KilnError(f"{base}: no exact GGUF form ({why})")
        blocks.append(gguf_blocks(layer, qtype))
    return np.stack(blocks) if row.experts else blocks[0]


def write_direct_gguf(ckpt: Checkpoint, dest: Path, qtype: Q, file_type: int, rope: RopeSettings,
                      progress: Progress | None = None, blocks: dict[str, Q] | None = None) -> None:
    """Write f32/f16/bf16 GGUF at `dest` (not atomic by itself: callers pass a temp path).

    `blocks` names GPTQ linears written as their own GGUF blocks (gptq_plan); llama.cpp's
    quantizer later copies tensors already of the target type unchanged.
    """
    blocks = blocks or {}
    spec = ckpt.spec
    family = families.of(spec)
    if spec.tokenizer is None:
        raise KilnError(f"{spec.source}: no tokenizer; a GGUF without vocabulary cannot run")
    w = GGUFWriter(dest, family.name)
    write_hparams(w, spec, rope, file_type)
    write_tokenizer(w, spec)
    plan = list(_planned(ckpt, rope))
    for name, hf, shape, f32, _ in plan:
        if hf in blocks:
            t = blocks[hf]
            block, nbytes = GGML_QUANT_SIZES[t]
            byte_shape = (*shape[:-1], shape[-1] // block * nbytes)
        else:
            t = _tensor_qtype(shape, qtype, f32)
            byte_shape = _byte_shape(shape, t)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, hf, shape, f32, row) in enumerate(plan):
        if hf in blocks:
            w.write_tensor_data(gptq_tensor(ckpt, hf, shape, row, blocks[hf]))
            if progress:
                progress("convert", i + 1, len(plan))
            continue
        if hf is None:
            arr = llama3_rope_factors(spec, rope)
        else:
            arr = family.to_gguf(hf, family.load_tensor(ckpt.tensors, hf, spec), spec)
        if not np.isfinite(arr).all():
            if hf is not None and "{e}" in hf:  # stacked experts: name the first expert at fault
                hf = hf.format(e=int(np.argmin(np.isfinite(arr).reshape(arr.shape[0], -1).all(axis=1))))
            raise KilnError(f"{spec.source}: tensor {hf} contains NaN or infinite values")
        w.write_tensor_data(_convert(arr, _tensor_qtype(shape, qtype, f32)))
        if progress:
            progress("convert", i + 1, len(plan))
    w.close()


def validate_gguf(path: Path) -> GGUFStats:
    """Re-read with kiln's GGUF reader; a file llama.cpp could choke on fails here with a clear message."""
    g = open_gguf(path)
    for key in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in g:
            raise KilnError(f"{path}: GGUF key {key} is missing")
    if g.get("tokenizer.ggml.model") == "gpt2":
        essential = essential_missing(missing_bytes(g.get("tokenizer.ggml.tokens")))
        if essential:
            raise KilnError(f"{path}: byte-level vocabulary lacks byte tokens for {describe(essential)}; "
                            "llama.cpp would abort on ordinary text")
    return tensor_stats(g, path)


def tensor_stats(header: GGUFFile, path: Path) -> GGUFStats:
    """Tensor type counts and real bits per weight (all tensor bytes over all elements), from the header."""
    types, n_bytes, n_el = header.tensor_totals()
    return GGUFStats(size=path.stat().st_size, bits_per_weight=8 * n_bytes / max(n_el, 1),
                     tensor_types=types, n_elements=n_el)


def export_gguf(ckpt: Checkpoint, out: str | os.PathLike[str], quant: QuantType, rope: RopeSettings,
                imatrix: Path | None = None, threads: int = 0, progress: Progress | None = None,
                warnings: list[str] | None = None, force: bool = False) -> GGUFStats:
    """Write `out` atomically: direct types in one pass, others via an f32 intermediate
    (which already holds a GPTQ checkpoint's linears as blocks of the target type)."""
    blocks, notes = gptq_plan(ckpt, quant)
    if warnings is not None:
        warnings.extend(notes)
        warnings.extend(families.of(ckpt.spec).export_warnings(ckpt.spec, ckpt.tensors.names()))
    return write_gguf_atomic(
        Path(out), quant,
        lambda dest, qtype, ftype: write_direct_gguf(ckpt, dest, qtype, ftype, rope, progress, blocks),
        imatrix=imatrix, threads=threads, progress=progress, force=force)


def write_gguf_atomic(out: Path, quant: QuantType, write_direct: Callable[[Path, Q, int], None],
                      imatrix: Path | None = None, threads: int = 0,
                      progress: Progress | None = None, force: bool = False) -> GGUFStats:
    """Any architecture's direct writer (f32/f16/bf16) + llama.cpp's quantizer, written atomically;
    an existing `out` is replaced only if it is a kiln GGUF (kiln.outputs) or `force`."""
    check_output(out, "gguf", force=force)
    if imatrix is not None and quant.direct:
        raise KilnError(f"--imatrix has no effect on {quant.name}; it applies to quantized types")
    with atomic_file(out, may_replace("gguf", force)) as tmp:
        if quant.direct:
            write_direct(tmp, quant.gguf_type, quant.ftype)
        else:
            # Quantize from f32 so no value is rounded twice (f16 first would shift the grid).
            fd, mid = tempfile.mkstemp(prefix=temp_prefix(out), suffix=".f32.part", dir=out.parent)
            os.close(fd)
            try:
                write_direct(Path(mid), Q.F32, 0)
                validate_gguf(Path(mid))
                if progress:
                    progress(f"quantize {quant.name}", 0, 1)
                quantize_gguf(Path(mid), tmp, quant, imatrix=imatrix, threads=threads)
                if progress:
                    progress(f"quantize {quant.name}", 1, 1)
            finally:
                Path(mid).unlink(missing_ok=True)
        stats = validate_gguf(tmp)
    return stats
