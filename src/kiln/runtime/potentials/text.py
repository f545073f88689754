"""Where generation may end: stop strings and sentence ends.

Both are "end conditions": prefix is always 0 (an unfinished text can always still reach a
stop string), complete is 0 iff the text ends as required, else −inf (hard, the default) or
−penalty (soft: a finished-but-unterminated text is down-weighted, not ruled out). They are
proposal-capable: every token entry of `logw_next` is 0 and the EOS entry is `complete`, so a
proposal that multiplies them in only allows EOS right after a stop string.

States are the last few bytes of the text (as many as the longest stop string needs), so a stop
string split across two or more tokens is found, and a step costs O(longest stop string).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, State, Vocab


def _penalty(penalty: float) -> float:
    try:
        value = float(penalty)
    except (TypeError, ValueError):
        raise KilnError(f"penalty must be a number, got {penalty!r}") from None
    if math.isnan(value) or value < 0:
        raise KilnError(f"penalty must be >= 0 (math.inf for a hard constraint), got {penalty!r}")
    return value


class EndCondition(Potential):
    """Base of potentials whose only say is whether the text may end here (prefix ≡ 0).
    The state is the text's last `keep` bytes."""

    keep = 32

    def __init__(self, vocab: Vocab, penalty: float = math.inf) -> None:
        super().__init__(vocab)
        self.penalty = _penalty(penalty)
        self.boolean = self.penalty == math.inf

    def ends(self, tail: bytes) -> bool:
        raise NotImplementedError

    def initial_state(self) -> State:
        return b""

    def advance(self, state: bytes, token: int) -> bytes:
        return (state + self.vocab.token_bytes[token])[-self.keep:]

    def prefix(self, state: bytes) -> float:
        return 0.0

    def complete(self, state: bytes) -> float:
        return 0.0 if self.ends(state) else -self.penalty

    def logw_next(self, state: bytes) -> np.ndarray:
        row = np.zeros(self.vocab.size + 1, dtype=np.float32)
        row[-1] = self.complete(state)
        return row

    def batch_logw_next(self, states: Sequence[bytes]) -> np.ndarray:
        out = np.zeros((len(states), self.vocab.size + 1), dtype=np.float32)
        out[:, -1] = [self.complete(s) for s in states]
        return out


class StopSequences(EndCondition):
    """complete = 0 iff the text ends with one of `stops` (else −penalty; hard by default)."""

    def __init__(self, vocab: Vocab, stops: str | Iterable[str], penalty: float = math.inf) -> None:
        stops = [stops] if isinstance(stops, str) else list(stops)
        if not stops or any(not isinstance(s, str) or not s for s in stops):
            raise KilnError("stop sequences must be non-empty strings")
        super().__init__(vocab, penalty)
        self.stops = stops
        self._encoded = tuple(s.encode("utf-8") for s in stops)
        self.keep = max(map(len, self._encoded))

    def ends(self, tail: bytes) -> bool:
        return tail.endswith(self._encoded)

    def __repr__(self) -> str:
        return f"StopSequences({self.stops!r}, penalty={self.penalty})"


# sentence punctuation, then optional closing quotes/brackets, then optional whitespace
_WS_RUN = re.compile(rb"[ \t\n\r\x0b\x0c]{2,}")
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019\u00bb)\]]*\s*\Z")


class SentenceEnd(EndCondition):
    """complete = 0 iff the text ends a sentence: `.`, `!`, `?` or `…` (also CJK `。！？`),
    optionally followed by closing quotes/brackets and whitespace (else −penalty)."""

    keep = 24

    def advance(self, state: bytes, token: int) -> bytes:
        # runs of ASCII whitespace collapse to one space: the test only asks for `\s*` at the end,
        # so a long run of newlines after the full stop cannot push it out of the kept tail
        return _WS_RUN.sub(b" ", state + self.vocab.token_bytes[token])[-self.keep:]

    def ends(self, tail: bytes) -> bool:
        return _SENTENCE_END.search(tail.decode("utf-8", errors="ignore")) is not None

    def __repr__(self) -> str:
        return f"SentenceEnd(penalty={self.penalty})"
