"""The quantization grids GPTQ rounds onto: GGUF's block grids and auto-gptq's own.

A grid turns one group of weights (rows × group columns) into per-row (scale, zero) with
codes q in 0..2^bits−1 and value scale·(q − zero). Scales are rounded to float16 *before*
any code is chosen, because float16 is what both formats store: the weights GPTQ's error
compensation sees are then exactly the weights the artifact holds.

GGUF grids (group size 32, the GGUF block), chosen so a GPTQ checkpoint and a GGUF block
store the same numbers:

* q4_0: ggml's Q4_0 rule: d = (the signed value of largest magnitude) / −8, zero 8, so that
  value is exact and the grid is {−8..7}·d; a GGUF Q4_0 block is exactly (d, q).
* q4_1: min/max grid with zero in range (as auto-gptq), and d rounded to 7 significant bits
  so that the block minimum m = −zero·d is itself exact in float16: GGUF's Q4_1 stores m, GPTQ
  stores the integer zero, and both then describe identical values.
* q8_0: ggml's Q8_0 rule d = amax/127, codes q−128 in −128..127; a Q8_0 block is (d, q−128).

Other group sizes use auto-gptq's rules ("sym": scale 2·amax/(2^bits−1), zero 2^(bits−1);
"asym": min/max with an integer zero point).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

GGUF_GROUP = 32


@dataclass(frozen=True)
class Grid:
    name: str  # q4_0 | q4_1 | q8_0 | sym | asym
    bits: int

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def symmetric(self) -> bool:
        """A grid with a fixed zero point (only the scale is chosen per group)."""
        return self.name in ("q4_0", "q8_0", "sym")

    @property
    def gguf_type(self) -> str | None:
        return self.name if self.name.startswith("q") else None


def choose_grid(bits: int, group_size: int, sym: bool) -> Grid:
    """The GGUF block grid when the group is GGUF's block (32) and one exists, else auto-gptq's."""
    if group_size == GGUF_GROUP:
        if bits == 4:
            return Grid("q4_0" if sym else "q4_1", 4)
        if bits == 8 and sym:
            return Grid("q8_0", 8)
    return Grid("sym" if sym else "asym", bits)


def _f16(x):
    import torch

    return x.to(torch.float16).to(torch.float32)


def _round_significant(x, bits: int):
    """Round to `bits` significant binary digits (then exact in float16 times a small integer)."""
    import torch

    mant, exp = torch.frexp(x)
    scale = float(1 << bits)
    return torch.ldexp(torch.round(mant * scale) / scale, exp)


def grid_params(w, grid: Grid):
    """Per-row (scale float32 [rows], zero float32 [rows]) for the group `w` [rows, cols]."""
    import torch

    if grid.name == "q4_0":
        idx = w.abs().argmax(dim=1, keepdim=True)
        signed_max = torch.gather(w, 1, idx).squeeze(1)
        scale = _f16(signed_max / -8.0)
        zero = torch.full_like(scale, 8.0)
    elif grid.name == "q8_0":
        scale = _f16(w.abs().amax(dim=1) / 127.0)
        zero = torch.full_like(scale, 128.0)
    elif grid.name == "sym":
        scale = _f16(2.0 * w.abs().amax(dim=1) / grid.maxq)
        zero = torch.full_like(scale, float((grid.maxq + 1) // 2))
    else:  # q4_1, asym
        lo = torch.clamp(w.amin(dim=1), max=0.0)
        hi = torch.clamp(w.amax(dim=1), min=0.0)
        scale = (hi - lo) / grid.maxq
        scale = _f16(_round_significant(scale, 7) if grid.name == "q4_1" else scale)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / safe), 0, grid.maxq)
    # float16 underflow: an all-zero (or tiny) group gets scale 0 and codes at the zero point
    return scale, zero


SEARCH_FACTORS = tuple(1.0 - 0.02 * k for k in range(-3, 13))  # 1.06 .. 0.76 of the max-magnitude scale


def search_params(w, grid: Grid, importance=None):
    """Symmetric grids only: the per-row scale, among candidates, that minimises the importance-weighted
    squared rounding error Σ_j imp_j (w_ij − s·q_ij)² of the group (zero unchanged).

    The max-magnitude rule (`grid_params`) makes the largest weight exact and wastes resolution on
    the rest; like llama.cpp's `make_qx_quants` with an imatrix, each candidate shrinks (or stretches)
    that scale, its codes are re-fitted by least squares (s = Σ imp·w·q / Σ imp·q²), the result is
    rounded to float16 (what the file stores) and scored with codes re-chosen for it. `importance`
    [cols] is GPTQ's diag(H): the input channels' mean squared activations. The grid and the stored
    layout are unchanged (GGUF Q4_0/Q8_0 blocks stay exact); only the choice of d differs."""
    import torch

    scale0, zero = grid_params(w, grid)
    if not grid.symmetric:
        return scale0, zero
    imp = torch.ones(w.shape[1]) if importance is None else importance.to(torch.float32)
    imp = imp[None, :]
    lo = -zero[:, None]
    hi = grid.maxq - zero[:, None]

    def err_of(scale):  # scale [..., rows] -> (errors [..., rows], codes [..., rows, cols])
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]
        q = torch.clamp(torch.round(w / safe), lo, hi)
        return (imp * (w - safe * q) ** 2).sum(dim=-1), q

    # Every candidate at once ([factors, rows, cols] tensors) instead of one small op per candidate: the same
    # element-wise arithmetic and the same choice (the first candidate, in the order below, with the least
    # error: argmin's first occurrence is the sequential strict-improvement rule), 3-4x faster.
    base, _ = err_of(scale0)
    shrunk = scale0[None, :] * torch.tensor(SEARCH_FACTORS, dtype=scale0.dtype)[:, None]  # [F, rows]
    _, q = err_of(shrunk)
    num = (imp * w * q).sum(dim=-1)
    den = (imp * q * q).sum(dim=-1)
    fitted = _f16(torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), scale0))
    cands = torch.stack([_f16(shrunk), fitted], dim=1).reshape(-1, scale0.shape[0])  # f1, fit1, f2, fit2, ...
    if grid.name == "q4_0":  # keep Q4_0's sign convention: d carries the sign of the largest weight
        cands = torch.where(torch.sign(cands) == torch.sign(scale0), cands, scale0)
    e, _ = err_of(cands)
    e = torch.where((cands != 0) & ~torch.isnan(e), e, torch.full_like(e, math.inf))
    errors = torch.cat([torch.where(torch.isnan(base), torch.full_like(base, math.inf), base)[None], e])
    pick = torch.argmin(errors, dim=0)  # 0: keep scale0
    best_scale = torch.cat([scale0[None], cands]).gather(0, pick[None]).squeeze(0)
    return best_scale, zero


def quantize_values(w, scale, zero, grid: Grid):
    """(codes, dequantized values) of `w` [rows] or [rows, cols] on the per-row grid."""
    import torch

    if w.ndim == 2:
        scale, zero = scale[:, None], zero[:, None]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / safe) + zero, 0, grid.maxq)
    q = torch.where(scale == 0, zero.expand_as(q), q)
    return q, scale * (q - zero)
