"""Length of the generated text in tokens, characters or words.

Hard (`hard=True`, the default): prefix = 0 iff len ≤ max (lengths only grow, so a prefix over
the maximum can never become valid), complete = 0 iff min ≤ len ≤ max. A minimum is checked only
at complete: a short prefix may still grow.

Soft (`hard=False`): prefix = 0, complete = −penalty · (distance from len to [min, max]);
`target=T` is shorthand for min = max = T, i.e. complete = −penalty·|len − T|.

Units: "tokens"; "chars" = Unicode code points (UTF-8 lead bytes, so a character split across
tokens counts once, when its first byte arrives); "words" = maximal runs of bytes other than
ASCII whitespace (space, tab, newline, CR, VT, FF). All are proposal-capable: `logw_next` is
vectorized over the vocabulary with per-token tables built once per Vocab.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, State, Vocab
from kiln.runtime.potentials.grammar import vocab_cache

UNITS = ("tokens", "chars", "words")
_WORD_RUN = re.compile(rb"[^ \t\n\r\x0b\x0c]+")
_WS = b" \t\n\r\x0b\x0c"


def length_tables(vocab: Vocab) -> dict[str, np.ndarray]:
    """Per-token tables: char counts, word runs, whether the token starts/ends with a word byte,
    and whether it is empty (cached per Vocab)."""
    cache = vocab_cache(vocab)
    tables = cache.get("length_tables")
    if tables is None:
        n = vocab.size
        chars = np.zeros(n, dtype=np.int64)
        runs = np.zeros(n, dtype=np.int64)
        starts = np.zeros(n, dtype=bool)
        ends = np.zeros(n, dtype=bool)
        empty = np.ones(n, dtype=bool)
        for i, piece in enumerate(vocab.token_bytes[:n]):
            if not piece:
                continue
            empty[i] = False
            chars[i] = sum(1 for b in piece if b & 0xC0 != 0x80)
            runs[i] = len(_WORD_RUN.findall(piece))
            starts[i] = piece[0] not in _WS
            ends[i] = piece[-1] not in _WS
        tables = cache["length_tables"] = {"chars": chars, "runs": runs, "starts": starts, "ends": ends,
                                           "empty": empty}
    return tables


def _bound(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise KilnError(f"length {name} must be a non-negative integer, got {value!r}")
    return int(value)


class Length(Potential):
    """Length constraint (hard) or preference (soft); see the module docstring."""

    def __init__(self, vocab: Vocab, min: int | None = None, max: int | None = None,  # noqa: A002
                 unit: str = "tokens", hard: bool = True, penalty: float = 1.0,
                 target: int | None = None) -> None:
        super().__init__(vocab)
        if unit not in UNITS:
            raise KilnError(f"length unit must be one of {', '.join(UNITS)}, got {unit!r}")
        if target is not None:
            if min is not None or max is not None:
                raise KilnError("length: give either target or min/max, not both")
            min = max = target  # noqa: A001
        self.min, self.max = _bound("min", min), _bound("max", max)
        if self.min is None and self.max is None:
            raise KilnError("length needs min, max or target")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise KilnError(f"length min {self.min} exceeds max {self.max}")
        try:
            self.penalty = float(penalty)
        except (TypeError, ValueError):
            raise KilnError(f"length penalty must be a number, got {penalty!r}") from None
        if not self.penalty >= 0 or self.penalty == math.inf:
            raise KilnError(f"length penalty must be finite and >= 0, got {penalty!r}")
        self.unit = unit
        self.hard = bool(hard)
        self.boolean = self.hard
        self._t = length_tables(vocab) if unit != "tokens" else None

    # state: (length so far, text ends inside a word)
    def initial_state(self) -> State:
        return (0, False)

    def advance(self, state: tuple[int, bool], token: int) -> tuple[int, bool]:
        n, in_word = state
        if self.unit == "tokens":
            return (n + 1, False)
        t = self._t
        if self.unit == "chars":
            return (n + int(t["chars"][token]), False)
        if t["empty"][token]:
            return state
        return (n + int(t["runs"][token]) - int(in_word and t["starts"][token]), bool(t["ends"][token]))

    def _next_lengths(self, state: tuple[int, bool]) -> np.ndarray:
        n, in_word = state
        if self.unit == "tokens":
            return np.full(self.vocab.size, n + 1, dtype=np.int64)
        t = self._t
        if self.unit == "chars":
            return n + t["chars"]
        return n + t["runs"] - (t["starts"] if in_word else 0)

    def distance(self, n: int) -> int:
        if self.min is not None and n < self.min:
            return self.min - n
        if self.max is not None and n > self.max:
            return n - self.max
        return 0

    def prefix(self, state: tuple[int, bool]) -> float:
        if self.hard and self.max is not None and state[0] > self.max:
            return -math.inf
        return 0.0

    def complete(self, state: tuple[int, bool]) -> float:
        d = self.distance(state[0])
        if self.hard:
            return 0.0 if d == 0 else -math.inf
        return -self.penalty * d

    def logw_next(self, state: tuple[int, bool]) -> np.ndarray:
        v = self.vocab.size
        row = np.zeros(v + 1, dtype=np.float32)
        if self.prefix(state) == -math.inf:
            row[:] = -np.inf
            return row
        if self.hard and self.max is not None:
            row[:v][self._next_lengths(state) > self.max] = -np.inf
        row[v] = self.complete(state)
        return row

    def batch_logw_next(self, states: Sequence[tuple[int, bool]]) -> np.ndarray:
        rows = [self.logw_next(s) for s in states]
        return np.stack(rows) if rows else np.zeros((0, self.vocab.size + 1), np.float32)

    def __repr__(self) -> str:
        kind = "hard" if self.hard else f"soft, penalty={self.penalty}"
        return f"Length(min={self.min}, max={self.max}, unit={self.unit!r}, {kind})"
