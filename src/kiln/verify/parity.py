"""Logit parity of an artifact against its source: the figures every export records.

Figures per check: max |Δlogit|, that divided by the reference logits' standard
deviation (scale-free, so one tolerance works for random tiny models and real ones),
top-1 agreement, and mean KL(reference ‖ artifact) over all positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_rows(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(p_ref ‖ p_cand) per row, in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(cand_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


@dataclass(frozen=True)
class Parity:
    positions: int
    max_abs: float
    ref_std: float
    rel: float  # max_abs / ref_std
    top1: float
    mean_kl: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    def merge(self, other: Parity) -> Parity:
        n = self.positions + other.positions
        max_abs = max(self.max_abs, other.max_abs)
        std = min(self.ref_std, other.ref_std)
        return Parity(n, max_abs, std, max(self.rel, other.rel),
                      (self.top1 * self.positions + other.top1 * other.positions) / n,
                      (self.mean_kl * self.positions + other.mean_kl * other.positions) / n)


def compare(ref: np.ndarray, cand: np.ndarray) -> Parity:
    if ref.shape != cand.shape:
        raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
    diff = float(np.abs(ref - cand).max())
    std = float(ref.std())
    return Parity(
        positions=int(ref.shape[0]), max_abs=diff, ref_std=std, rel=diff / max(std, 1e-12),
        top1=float((ref.argmax(-1) == cand.argmax(-1)).mean()), mean_kl=float(kl_rows(ref, cand).mean()),
    )


def compare_many(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> Parity:
    result = compare(*pairs[0])
    for ref, cand in pairs[1:]:
        result = result.merge(compare(ref, cand))
    return result
