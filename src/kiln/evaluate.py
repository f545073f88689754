"""`kiln eval`: perplexity, KL divergence and top-1 agreement of artifacts against a reference.

Figures as `llama-perplexity --kl-divergence` reports them: the text is tokenized once (by the
reference's tokenizer: every candidate scores the same ids), cut into chunks of `ctx` tokens,
each chunk scored from an empty cache, and only the second half of each chunk counts, so every
scored token has at least ctx/2 tokens of context. KL is KL(reference ‖ candidate) per token;
its mean and 99th percentile are reported, with the candidate's perplexity and how often its
argmax agrees with the reference's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.formats import format_of
from kiln.verify.parity import kl_rows, log_softmax

Scorer = Callable[[list[int]], np.ndarray]  # token ids -> logits [n, vocab] from an empty cache


@dataclass
class EvalRow:
    artifact: str
    kind: str  # hf, gguf, onnx
    perplexity: float
    mean_kl: float | None  # None for the reference itself
    p99_kl: float | None
    top1: float | None
    tokens: int
    file_size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def heldout_text() -> str:
    """The shipped held-out English text (public domain; not used for calibration or verification)."""
    return resources.files("kiln").joinpath("data/heldout.txt").read_text(encoding="utf-8")


def _size(path: Path) -> int:
    fmt = format_of(path)
    if fmt is not None:
        return fmt.weights_bytes(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.startswith(("model", "pytorch")))


def open_scorer(path: Path, n_ctx: int, threads: int | None) -> tuple[str, Scorer, Callable[[], None]]:
    """(kind, scorer, close) for a GGUF file, an ONNX directory (kiln.formats) or an HF checkpoint dir."""
    fmt = format_of(path)
    if fmt is not None:
        # the format's verification settings (llama.cpp: flash attention off, f32 KV), so only the
        # artifact's own rounding shows
        engine = fmt.open_engine(path, n_ctx=n_ctx, threads=threads, **fmt.verification_options)
        return fmt.name, engine.score, engine.close
    if path.is_dir() and (path / "config.json").exists():
        from kiln.verify.reference import Reference

        ref = Reference(path)
        return "hf", lambda ids: ref._forward(ids, 0), lambda: None
    if not path.exists():
        raise KilnError(f"{path}: no such file or directory")
    raise KilnError(f"{path}: expected an HF checkpoint directory, a .gguf file or an ONNX model directory")


def reference_tokens(path: Path, text: str) -> list[int]:
    """The reference's own tokenization of `text` (tokenizer.json of a checkpoint or ONNX dir, or the
    engine's own for a format that embeds its vocabulary, as GGUF does)."""
    fmt = format_of(path)
    tok_path = fmt.tokenizer_json(path) if fmt is not None else path / "tokenizer.json"
    if tok_path is None:
        with fmt.open_engine(path, n_ctx=64) as engine:
            return engine.tokenize(text)
    from tokenizers import Tokenizer

    if not tok_path.exists():
        raise KilnError(f"{path}: tokenizer.json is missing")
    return list(Tokenizer.from_file(str(tok_path)).encode(text, add_special_tokens=True).ids)


def chunks(ids: Sequence[int], ctx: int) -> list[list[int]]:
    if ctx < 16:
        raise KilnError(f"--ctx {ctx}: too small (at least 16)")
    out = [list(ids[i:i + ctx]) for i in range(0, len(ids) - ctx + 1, ctx)]
    if not out:
        raise KilnError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    return out


def evaluate(reference: str | Path, candidates: Sequence[str | Path], text: str, ctx: int = 512,
             threads: int | None = None, progress: Callable[[str, int, int], None] | None = None) -> list[EvalRow]:
    """One row for the reference (its perplexity) and one per candidate (perplexity, KL, top-1)."""
    ref_path = Path(reference)
    for path in (ref_path, *map(Path, candidates)):
        if not path.exists():  # before minutes of scoring, not after
            raise KilnError(f"{path}: no such file or directory")
    ids = reference_tokens(ref_path, text)
    parts = chunks(ids, ctx)
    half = ctx // 2
    rows = []
    ref_lp: list[np.ndarray] = []
    for k, path in enumerate([ref_path, *map(Path, candidates)]):
        kind, score, close = open_scorer(path, ctx, threads)
        nll, kls, agree, n = 0.0, [], 0, 0
        try:
            for j, part in enumerate(parts):
                logits = score(part)
                lp = log_softmax(logits[half:-1])  # predictions of tokens half+1 .. ctx-1
                target = np.asarray(part[half + 1:])
                if k == 0:
                    ref_lp.append(lp)
                else:
                    if lp.shape != ref_lp[j].shape:
                        raise KilnError(f"{path}: vocabulary of {lp.shape[1]} tokens, the reference has "
                                        f"{ref_lp[j].shape[1]}")
                    p = np.exp(ref_lp[j])
                    kls.append((p * (ref_lp[j] - lp)).sum(axis=-1))
                    agree += int((lp.argmax(-1) == ref_lp[j].argmax(-1)).sum())
                nll -= float(lp[np.arange(len(target)), target].sum())
                n += len(target)
                if progress:
                    progress(f"eval {path.name}", j + 1, len(parts))
        finally:
            close()
        kl = np.concatenate(kls) if kls else None
        rows.append(EvalRow(artifact=str(path), kind=kind, perplexity=float(np.exp(nll / n)),
                            mean_kl=float(kl.mean()) if kl is not None else None,
                            p99_kl=float(np.percentile(kl, 99)) if kl is not None else None,
                            top1=agree / n if k else None, tokens=n, file_size=_size(path)))
    return rows


def markdown(rows: Sequence[EvalRow], ctx: int) -> str:
    lines = [f"| artifact | kind | size MB | PPL | mean KL | p99 KL | top-1 | tokens (ctx {ctx}) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def f(v: float | None, spec: str) -> str:
            return "—" if v is None else format(v, spec)
        lines.append(f"| {Path(r.artifact).name} | {r.kind} | {r.file_size / 1e6:.1f} | {r.perplexity:.3f} | "
                     f"{f(r.mean_kl, '.4f')} | {f(r.p99_kl, '.4f')} | {f(r.top1, '.3f')} | {r.tokens} |")
    return "\n".join(lines)


__all__ = ["EvalRow", "evaluate", "heldout_text", "markdown", "kl_rows"]
