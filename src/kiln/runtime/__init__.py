"""Run exported artifacts. Embeds without torch: imports only numpy and the engine's own library.

`load(path)` opens a GGUF file or an ONNX directory with its engine (kiln.formats decides which);
`smc` / `smc_batch` steer an open engine; `steer_prompts` is `kiln generate --particles` as one
call (engine sizing, chat template, per-prompt seeds, the generation cache); `generate_prompts` is
plain `kiln generate`; `answer_document` is `kiln generate --prompt-file` (long documents: `fit`, `chunk`,
`rank` and `answer` are its pieces, kiln.runtime.document).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.formats import open_engine
from kiln.runtime.document import (DocumentOptions, PrefillInfo, PrefillProgress, answer, answer_document, chunk,
                                   fit, rank)
from kiln.runtime.engine import Engine
from kiln.runtime.generate import generate_prompts
from kiln.runtime.smc import SMCResult, locally_constrained, smc, smc_batch
from kiln.runtime.steering import Constraints, SteerOptions, steer_prompts


def load(path: str | Path, **options: Any) -> Engine:
    """Open an artifact with the engine its format needs: a .gguf file (or a file with GGUF's magic)
    -> llama.cpp, an ONNX model directory (genai_config.json + model.onnx) -> onnxruntime. Options go
    to the engine (n_ctx, n_seq_max, threads, ...). A missing path or one of no artifact format is a
    one-line KilnError."""
    return open_engine(path, **options)


__all__ = ["Constraints", "DocumentOptions", "Engine", "PrefillInfo", "PrefillProgress", "SMCResult", "SteerOptions",
           "answer", "answer_document", "chunk", "fit", "generate_prompts", "load", "locally_constrained", "rank", "smc",
           "smc_batch", "steer_prompts"]
