"""OpenAI response objects: chat.completion / text_completion, their streaming chunks, logprobs, usage.

The kiln report of a constrained request (sampler, particles, ESS, log Ẑ, posterior) rides in a
top-level `"kiln"` field (the openai client keeps unknown fields: `completion.kiln`); streamed,
it comes with the chunk that carries the finish reasons.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from kiln import __version__
from kiln.runtime.sampling import Choice, TokenLogprob

FINGERPRINT = f"kiln-{__version__}"


class Reply:
    """The fixed parts of one request's response objects (id, model, created, endpoint kind)."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    # --- logprobs --------------------------------------------------------------------------------
    def _logprobs(self, lps: Sequence[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
        if lps is None:
            return None
        if self.kind == "chat":
            return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                                 "top_logprobs": [{"token": a, "logprob": lp, "bytes": b} for a, b, lp in t.top]}
                                for t in lps]}
        offsets, at = [], offset
        for t in lps:
            offsets.append(at)
            at += len(t.token)
        return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": [{a: lp for a, _, lp in t.top} for t in lps], "text_offset": offsets}

    @staticmethod
    def usage(prompt_tokens: int, choices: Sequence[Choice]) -> dict[str, int]:
        completion = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    # --- whole responses -----------------------------------------------------------------------
    def completion(self, choices: Sequence[Choice], prompt_tokens: int,
                   report: dict[str, Any] | None) -> dict[str, Any]:
        out = self._base(chunk=False)
        items = []
        for c in choices:
            if self.kind == "chat":
                items.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                              "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason})
            else:
                items.append({"index": c.index, "text": c.text, "logprobs": self._logprobs(c.logprobs),
                              "finish_reason": c.finish_reason})
        out["choices"] = items
        out["usage"] = self.usage(prompt_tokens, choices)
        if report is not None:
            out["kiln"] = report
        return out

    # --- streaming -----------------------------------------------------------------------------
    def chunk(self, index: int, text: str | None, lps: Sequence[TokenLogprob] | None = None,
              finish_reason: str | None = None, role: bool = False, offset: int = 0) -> dict[str, Any]:
        out = self._base(chunk=True)
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": self._logprobs(lps), "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": self._logprobs(lps, offset),
                      "finish_reason": finish_reason}
        out["choices"] = [choice]
        return out

    def usage_chunk(self, prompt_tokens: int, choices: Sequence[Choice]) -> dict[str, Any]:
        out = self._base(chunk=True)
        out["choices"] = []
        out["usage"] = self.usage(prompt_tokens, choices)
        return out


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (`data: ...` and a blank line)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
