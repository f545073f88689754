"""`kiln plan`: which quantization and how much context fit a memory budget, from the model's config.

It replaces the seeds' hand-written "which model for which VRAM" tables: every figure comes from
the model's own shapes through kiln's cost model (kiln.bench.cost_model), which `kiln bench` checks
against measured peak memory on every configuration it runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.bench.cost_model import (PLAN_TYPES, MemoryEstimate, gguf_weights, hf_tensors, predict_peak)
from kiln.bench.geometry import Geometry, hf_geometry
from kiln.errors import KilnError

MIB = 2 ** 20
GIB = 2 ** 30
ONNX_PLAN = ("fp32", "int8", "int4")
# GGUF bytes besides the tensors (vocabulary, merges, chat template): measured 36 B per vocabulary entry
# on smollm2 (1.78 MB for 49152 tokens).
GGUF_VOCAB_BYTES = 36


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '8GB', '2.5G', '1000000' -> bytes (GiB/MiB binary, GB/MB decimal, bare G/M binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", text or "")
    if not m or (m.group(2) == "" and (m.group(3) or m.group(4) and m.group(4) != "B")):
        raise KilnError(f"cannot read the memory size {text!r} (examples: 8GiB, 512MiB, 16GB)")
    value, unit, binary, b = float(m.group(1)), m.group(2).upper(), m.group(3), m.group(4)
    power = " KMGT".index(unit) if unit else 0
    base = 1000 if (b == "B" and not binary and unit) else 1024
    return int(value * base ** power)


def _human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


@dataclass
class Candidate:
    target: str
    quant: str
    weights: int
    repacked: int
    bits_per_weight: float
    max_context: int  # largest context that fits (0: not even the weights)
    estimate: MemoryEstimate | None = None  # at the chosen context
    fits: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "quant": self.quant, "weights_bytes": self.weights,
                "bits_per_weight": round(self.bits_per_weight, 3), "max_context": self.max_context,
                "fits": self.fits, "estimate": self.estimate.to_json() if self.estimate else None}


@dataclass
class Plan:
    source: str
    memory: int
    target: str
    context: int | None
    recommended: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    explanation: str = ""
    geometry: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "memory_bytes": self.memory, "target": self.target,
                "requested_context": self.context, "geometry": self.geometry,
                "recommended": self.recommended.to_json() if self.recommended else None,
                "candidates": [c.to_json() for c in self.candidates], "explanation": self.explanation}


def _read_config(src: Path) -> dict[str, Any]:
    if src.is_file() and src.name == "config.json":
        src = src.parent
    path = src / "config.json"
    if not src.exists():
        raise KilnError(f"{src}: no such checkpoint directory")
    if not path.is_file():
        raise KilnError(f"{src}: no config.json (kiln plan reads a checkpoint's config; for an exported "
                        "artifact use kiln bench)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KilnError(f"{path}: not valid JSON ({exc})") from None


def onnx_weights(config: dict[str, Any], precision: str) -> tuple[int, float, int]:
    """(bytes, bits per weight, bytes MLAS prepacks) of kiln's default ONNX export (onnxruntime-genai
    builder: block-32 MatMulNBits with float32 scales, int8 lm_head, int4 embeddings at int4 and float
    ones otherwise), checked against smollm2's exports (int4 118.4 MB, int8 267.0 MB)."""
    ts = hf_tensors(config)
    emb = sum(t.n for t in ts if t.category in ("token_embd", "pos_embd"))
    out = sum(t.n for t in ts if t.category == "output")
    small = sum(t.n for t in ts if t.category in ("norm", "bias"))
    lin = sum(t.n for t in ts) - emb - out - small
    c = config.get("text_config") or config
    vocab_rows = int(c["vocab_size"]) * int(c.get("hidden_size") or c.get("n_embd"))
    head = out or vocab_rows  # a tied lm_head is written as its own int8 MatMulNBits
    if precision == "fp32":
        bits = 32 * (lin + emb + out) + 32 * small
        n = lin + emb + out + small
        return bits // 8, 32.0 if n else 0.0, 0
    lin_bits = {"int4": 4 + 1, "int8": 8 + 1}[precision]
    emb_bits = 5 if precision == "int4" else 32
    total_bits = lin * lin_bits + emb * emb_bits + head * 9 + small * 32
    n = lin + emb + out + small
    packed = lin * lin_bits // 8 if precision == "int4" else 0
    return total_bits // 8, total_bits / n, packed


def _largest_context(geo: Geometry, budget: int, kw: dict[str, Any], limit: int) -> int:
    if predict_peak(geo, 64, **kw).total > budget:
        return 0
    lo, hi = 64, limit
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if predict_peak(geo, mid, **kw).total <= budget:
            lo = mid
        else:
            hi = mid
    if predict_peak(geo, hi, **kw).total <= budget:
        lo = hi
    if lo == limit:
        return lo
    # The search stops within 16 tokens of the edge, and the compute buffer grows in 256-cell steps, so the edge is
    # often a multiple of 256 just above `lo`: take it when it fits.
    up = (lo // 256 + 1) * 256
    if up <= limit and predict_peak(geo, up, **kw).total <= budget:
        return up
    return max(64, lo // 256 * 256 or lo)


def _meminfo(key: str) -> int | None:
    """A /proc/meminfo figure in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup(name: str) -> int | None:
    """A cgroup v2 memory figure in bytes (memory.max, memory.current), None where unlimited or absent."""
    try:
        text = Path("/sys/fs/cgroup", name).read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, or less where a cgroup limit says so."""
    avail, limit, used = _meminfo("MemAvailable"), _cgroup("memory.max"), _cgroup("memory.current")
    if limit is not None and used is not None:
        avail = limit - used if avail is None else min(avail, limit - used)
    return avail


def total_memory() -> int | None:
    """Bytes of this machine's memory (MemTotal, or a smaller cgroup limit)."""
    total, limit = _meminfo("MemTotal"), _cgroup("memory.max")
    if limit is not None:
        total = limit if total is None else min(total, limit)
    return total


def machine_num_ctx(gguf: Path, memory: int | None = None) -> int:
    """The largest context (a multiple of 256, at most the model's) whose KV cache, weights and buffers fit
    `memory` by kiln plan's cost model; 256 when none does. Default `memory`: half of this machine's total
    memory, not what is free this minute, so that the Modelfile one machine writes does not change from
    run to run (the other half stays for the system and the apps beside Ollama)."""
    from kiln.bench.geometry import read_geometry

    geo = read_geometry(gguf)
    total = total_memory()
    budget = memory if memory is not None else (None if total is None else total // 2)
    if budget is None:
        return geo.context_length
    fits = _largest_context(geo, budget, {"kv_type": "f16", "flash_attn": False, "particles": 1}, geo.context_length)
    return max(256, min(geo.context_length, fits) // 256 * 256) if fits < geo.context_length else geo.context_length


def plan(src: str | Path, memory: int, context: int | None = None, target: str = "gguf",
         kv_type: str = "f16", flash_attn: bool = False, particles: int = 1) -> Plan:
    """The best quantization whose weights + KV + compute + runtime fit `memory` at `context`
    (default: the model's full context, else the largest that fits)."""
    src = Path(src)
    if memory <= 0:
        raise KilnError("--memory must be positive")
    if target not in ("gguf", "onnx"):
        raise KilnError(f"--target must be gguf or onnx, got {target!r}")
    config = _read_config(src)
    base = hf_geometry(config, None)
    if context is not None and context > base.context_length:
        raise KilnError(f"--context {context} exceeds the model's context of {base.context_length} "
                        "(bake RoPE scaling into the export to go further: kiln export --rope-scaling)")
    candidates: list[Candidate] = []
    for quant in (PLAN_TYPES if target == "gguf" else ONNX_PLAN):
        if target == "gguf":
            wp = gguf_weights(config, quant)
            weights, repacked, bpw = wp.bytes + base.vocab * GGUF_VOCAB_BYTES, wp.repacked_bytes, wp.bits_per_weight
            geo = _with(base, "gguf", weights, 2.0)
            kw = {"kv_type": kv_type, "flash_attn": flash_attn, "particles": particles, "repacked": repacked}
        else:
            weights, bpw, repacked = onnx_weights(config, quant)
            geo = _with(base, "onnx", weights, 4.0)
            kw = {"particles": particles, "repacked": repacked}
        cand = Candidate(target, quant, weights, repacked, bpw, _largest_context(geo, memory, kw, base.context_length))
        want = context or base.context_length
        cand.fits = cand.max_context >= want
        chosen = want if cand.fits else cand.max_context
        cand.estimate = predict_peak(geo, chosen, **kw) if chosen else None
        candidates.append(cand)
    rec = next((c for c in candidates if c.fits), None)
    if rec is None and context is None:  # the full context fits nowhere: the best quality with a usable window
        usable = min(4096, base.context_length)
        rec = next((c for c in candidates if c.max_context >= usable), None) or max(
            candidates, key=lambda c: c.max_context)
        if rec.max_context == 0:
            rec = None
    p = Plan(str(src), memory, target, context, rec, candidates, geometry=base.to_json())
    p.explanation = explain(p, base)
    return p


def _with(geo: Geometry, fmt: str, weights: int, kv_elem: float) -> Geometry:
    from dataclasses import replace

    return replace(geo, format=fmt, model_bytes=weights, kv_bytes_per_elem=kv_elem)


def explain(p: Plan, geo: Geometry) -> str:
    if p.recommended is None or p.recommended.estimate is None:
        smallest = min(p.candidates, key=lambda c: c.weights)
        return (f"nothing fits in {_human(p.memory)}: the smallest, {smallest.quant}, needs "
                f"{_human(smallest.weights)} of weights alone plus runtime and buffers")
    c, e = p.recommended, p.recommended.estimate
    ctx = p.context or (geo.context_length if c.fits else c.max_context)
    kv_note = f"KV {_human(e.kv_per_token)}/token ({_human(e.kv)} at {_ctx(ctx)})"
    if geo.state_bytes:  # a hybrid: the DeltaNet layers' fixed state per sequence is inside that figure
        kv_note = (f"KV {_human(e.kv_per_token)}/token in {geo.kv_layers} attention layers + recurrent state "
                   f"{_human(geo.state_bytes)}/sequence ({_human(e.kv)} at {_ctx(ctx)})")
    parts = [f"weights {_human(c.weights)} ({c.bits_per_weight:.2f} bpw)"]
    if e.repacked:
        parts.append(f"CPU repack {_human(e.repacked)}")
    parts += [kv_note, f"compute {_human(e.compute)}", f"runtime {_human(e.runtime)}"]
    head = f"{c.quant}, {_ctx(c.max_context)} context"
    line = f"{head}: " + ", ".join(parts) + f" = {_human(e.total)} of {_human(p.memory)} at {_ctx(ctx)}"
    better = p.candidates[:p.candidates.index(c)]
    if better:
        b = better[-1]
        line += (f"; {b.quant} would fit only {_ctx(b.max_context)}" if b.max_context
                 else f"; {b.quant}'s weights alone do not fit")
    if geo.rope_scaling:
        line += f" (context beyond {geo.native_context} uses the config's {geo.rope_scaling})"
    return line
