"""What a verification run reports, shared by the GGUF and ONNX checks (one format in every manifest)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from kiln.verify.parity import Parity

SHORT_PROMPTS = (
    "The capital of France is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 5, 8, 13,",
)


def parity_text() -> str:
    return resources.files("kiln.verify").joinpath("data/parity.txt").read_text(encoding="utf-8")


@dataclass
class Verification:
    quant: str
    passed: bool
    criterion: str
    short: Parity
    long: Parity
    long_start: int
    text_kl: float
    text_top1: float
    text_positions: int
    floor_rel: float | None = None  # float types: weight-rounding floor; quantized: KL of dequantized weights
    bound: float | None = None
    quality: dict[str, Any] | None = None  # KL against the published anchor for this type
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "quant": self.quant, "passed": self.passed, "criterion": self.criterion,
            "short_positions": self.short.to_json(), "long_positions": self.long.to_json(),
            "long_start": self.long_start, "text_mean_kl": self.text_kl, "text_top1": self.text_top1,
            "text_positions": self.text_positions, "floor": self.floor_rel, "bound": self.bound,
            "quality_anchor": self.quality,
            "notes": self.notes,
        }

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict} {self.criterion}; short max|Δ|/std {self.short.rel:.2e}, long (from position "
                f"{self.long_start}) {self.long.rel:.2e}, text KL {self.text_kl:.4f}, top-1 {self.text_top1:.3f}")
