"""The served artifacts: each opened once with its engine, under a model id, with its context budget.

An engine holds `rows` sequences (the most choices or particles one request may use). What a
request may generate depends on the format's KV layout (kiln.formats): llama.cpp keeps every row
in one pool of `kv_cells` (the prompt once, then each row's own tail), onnxruntime gives every row
`ctx` positions of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.formats import require_format
from kiln.formats.base import Format
from kiln.runtime.engine import Engine
from kiln.serve.errors import APIError, bad_request
from kiln.serve.options import ServeOptions

DEFAULT_CTX = 4096


def _model_id(path: Path) -> str:
    name = path.name.rstrip("/")
    return name[:-len(".gguf")] if name.lower().endswith(".gguf") else name


def parse_artifact(spec: str) -> tuple[str, Path]:
    """'PATH' or 'NAME=PATH' -> (model id, path); the id defaults to the file name without .gguf."""
    name, eq, rest = spec.partition("=")
    if eq and name and "/" not in name and not Path(spec).exists():
        return name, Path(rest)
    return _model_id(Path(spec)), Path(spec)


@dataclass
class ServedModel:
    id: str
    path: Path
    format: Format
    engine: Engine
    ctx: int  # positions one sequence may hold
    created: int = field(default_factory=lambda: int(time.time()))
    _vocab: Any = None

    @property
    def rows(self) -> int:
        return int(self.engine.n_seq_max)

    def vocab(self):
        """kiln's `Vocab` of this engine (built once: llguidance caches its tokenizer per Vocab)."""
        if self._vocab is None:
            from kiln.runtime.potentials.base import Vocab

            self._vocab = Vocab.from_engine(self.engine)
        return self._vocab

    def room(self, prompt_tokens: int, rows: int) -> int:
        """Tokens each of `rows` sequences can still generate after a prompt of `prompt_tokens`."""
        per_seq = self.ctx - prompt_tokens
        if self.format.shared_kv_pool:
            return min(per_seq, (self.engine.n_ctx - prompt_tokens) // max(rows, 1))
        return per_seq

    def budget(self, prompt_tokens: int, rows: int, asked: int | None, default: int, *, prompt_param: str,
               rows_param: str) -> int:
        """max_tokens for a request: `asked` if it fits, else a 400; without one, `default` or what fits.
        `prompt_param` and `rows_param` name the request fields a 400 blames for the prompt and the rows."""
        if rows > self.rows:
            raise bad_request(f"{rows} sequences asked for: this server holds {self.rows} per request "
                              "(kiln serve --rows)", rows_param)
        if prompt_tokens >= self.ctx:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens: this model's context is {self.ctx} tokens",
                           param=prompt_param, code="context_length_exceeded")
        room = self.room(prompt_tokens, rows)
        if room < 1:
            raise APIError(400, f"a {prompt_tokens}-token prompt leaves no room for {rows} sequences in the KV cache "
                                f"of {self.engine.n_ctx} cells (kiln serve --kv-cells)",
                           param=prompt_param, code="context_length_exceeded")
        if asked is None:
            return min(default, room)
        if asked > room:
            where = (f"{rows} sequences in the KV cache of {self.engine.n_ctx} cells" if rows > 1
                     and self.format.shared_kv_pool else f"the context of {self.ctx}")
            raise APIError(400, f"max_tokens={asked} after a {prompt_tokens}-token prompt does not fit {where}: "
                                f"at most {room}", param="max_tokens", code="context_length_exceeded")
        return asked

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "kiln",
                "kiln": {"format": self.format.name, "context": self.ctx, "rows": self.rows}}


def open_models(options: ServeOptions) -> dict[str, ServedModel]:
    """Open every artifact (one-line KilnErrors for missing paths, duplicate ids, unloadable files)."""
    specs = [parse_artifact(s) for s in options.artifacts]
    seen: dict[str, Path] = {}
    for mid, path in specs:
        if mid in seen:
            raise KilnError(f"two artifacts are served as {mid!r} ({seen[mid]} and {path}): name them NAME=PATH")
        seen[mid] = path
    fmts = [require_format(path) for _, path in specs]  # every path checked before any model is opened
    models: dict[str, ServedModel] = {}
    try:
        for (mid, path), fmt in zip(specs, fmts):
            ctx = options.ctx or DEFAULT_CTX
            cells = max(ctx, options.kv_cells or DEFAULT_CTX) if fmt.shared_kv_pool else ctx
            engine = fmt.open_engine(path, n_ctx=cells, n_seq_max=options.rows, threads=options.threads)
            # one sequence never holds more than the artifact's trained context
            per_seq = min(ctx, int(engine.context_length or ctx), int(engine.n_ctx))
            models[mid] = ServedModel(mid, path, fmt, engine, per_seq)
    except BaseException:
        close_models(models)
        raise
    return models


def close_models(models: dict[str, ServedModel]) -> None:
    for m in models.values():
        m.engine.close()
