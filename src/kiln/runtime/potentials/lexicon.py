"""Lexicon / style: a soft potential that rewards (or penalizes) listed words.

prefix(x) = Σ weight(w) over the listed words w that x contains as *finished* words (followed by
a non-word character); complete(x) = the same on the final text, where a word at the very end
also counts. Words are maximal runs of word bytes: ASCII letters and digits, plus any non-ASCII
byte (so accented words work; non-ASCII punctuation such as “—” counts as word bytes too).
Matching is case-insensitive (ASCII). Entries must be single words.

Being a twist, partial counts on prefixes are fine: the SMC weight telescopes to complete(x).
It is proposal-capable: `logw_next` adds, to every token that finishes a listed word, that word's
weight, vectorized over the vocabulary with per-vocabulary tables (built once, ~0.2 s for 49k
tokens), so a step costs O(V + words).

`Lexicon.style(vocab, "formal" | "conversational" | "technical", strength)` uses kiln's shipped
word lists (potentials/styles.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, State, Vocab
from kiln.runtime.potentials.grammar import vocab_cache
from kiln.runtime.potentials.styles import STYLES

_WORD_RUN = re.compile(rb"[A-Za-z0-9\x80-\xff]+")
_WORD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") | frozenset(range(0x80, 0x100))


class _Tables:
    """Per-vocabulary split of every token into (leading word run, inner finished words, trailing
    word run), lowercased; tokens made only of word bytes are kept whole."""

    def __init__(self, vocab: Vocab) -> None:
        n = vocab.size
        self.noop = np.zeros(n, dtype=bool)           # empty tokens change nothing
        self.allword = np.zeros(n, dtype=bool)
        self.piece: list[bytes] = [b""] * n           # lowercased bytes of all-word tokens
        self.lead: list[bytes] = [b""] * n
        self.trail: list[bytes] = [b""] * n
        self.lead_index: dict[bytes, list[int]] = {}  # lead run -> tokens (with a non-word byte)
        self.inner_index: dict[bytes, list[int]] = {}  # finished inner word -> tokens (repeats count)
        for i, raw in enumerate(vocab.token_bytes[:n]):
            if not raw:
                self.noop[i] = True
                continue
            piece = raw.lower()
            runs = list(_WORD_RUN.finditer(piece))
            if len(runs) == 1 and runs[0].start() == 0 and runs[0].end() == len(piece):
                self.allword[i] = True
                self.piece[i] = piece
                continue
            lead = runs[0].group() if runs and runs[0].start() == 0 else b""
            trail = runs[-1].group() if runs and runs[-1].end() == len(piece) else b""
            inner = [m.group() for m in runs
                     if m.start() != 0 and m.end() != len(piece)]
            self.lead[i], self.trail[i] = lead, trail
            self.lead_index.setdefault(lead, []).append(i)
            for w in inner:
                self.inner_index.setdefault(w, []).append(i)
        self.lead_arrays = {k: np.array(v, dtype=np.int64) for k, v in self.lead_index.items()}


def _tables(vocab: Vocab) -> _Tables:
    cache = vocab_cache(vocab)
    tables = cache.get("lexicon_tables")
    if tables is None:
        tables = cache["lexicon_tables"] = _Tables(vocab)
    return tables


def _normalize(words: Mapping[str, float] | Iterable[str], strength: float) -> dict[bytes, float]:
    items = words.items() if isinstance(words, Mapping) else ((w, 1.0) for w in words)
    out: dict[bytes, float] = {}
    for word, weight in items:
        if not isinstance(word, str):
            raise KilnError(f"lexicon words must be strings, got {word!r}")
        key = word.strip().encode("utf-8").lower()
        if not key or any(b not in _WORD_BYTES for b in key):
            raise KilnError(f"lexicon entry {word!r} is not a single word (letters and digits only)")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise KilnError(f"lexicon weight of {word!r} must be a number, got {weight!r}") from None
        if not math.isfinite(w):
            raise KilnError(f"lexicon weight of {word!r} must be finite, got {weight!r}")
        out[key] = out.get(key, 0.0) + w * strength
    if not out:
        raise KilnError("lexicon is empty")
    return {k: v for k, v in out.items() if v != 0.0} or out


class Lexicon(Potential):
    """Soft word-list potential; `words` maps word -> log weight (or lists words, weight 1 each),
    all multiplied by `strength`. See the module docstring for the counting rules."""

    def __init__(self, vocab: Vocab, words: Mapping[str, float] | Iterable[str], strength: float = 1.0,
                 name: str | None = None) -> None:
        super().__init__(vocab)
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise KilnError(f"lexicon strength must be a number, got {strength!r}") from None
        if not math.isfinite(strength):
            raise KilnError(f"lexicon strength must be finite, got {strength!r}")
        self.name = name
        self.strength = strength
        self.weights = _normalize(words, strength)
        self._prefixes = {w[:k] for w in self.weights for k in range(1, len(w) + 1)}
        t = self._t = _tables(vocab)
        v = vocab.size
        self._inner = np.zeros(v, dtype=np.float64)  # weight of words finished inside each token
        self._first = np.zeros(v, dtype=np.float64)  # weight of the word a token's lead run finishes (no tail)
        for w, wt in self.weights.items():
            ids = t.inner_index.get(w)
            if ids:
                np.add.at(self._inner, np.array(ids), wt)
            ids = t.lead_arrays.get(w)
            if ids is not None:
                self._first[ids] += wt
        self._base_empty = (self._inner + self._first).astype(np.float32)
        self._base = self._inner.astype(np.float32)

    @classmethod
    def style(cls, vocab: Vocab, name: str, strength: float = 1.0) -> Lexicon:
        """Shipped style word lists: "formal", "conversational", "technical"."""
        if name not in STYLES:
            raise KilnError(f"unknown style {name!r} (choose from {', '.join(sorted(STYLES))})")
        return cls(vocab, STYLES[name], strength, name=name)

    @classmethod
    def from_file(cls, vocab: Vocab, path: str | Path, strength: float = 1.0) -> Lexicon:
        """A .json file holding {word: weight} or [word, ...]; any other file: one word per line,
        optionally followed by a weight (`word 2.5`); `#` starts a comment."""
        path = Path(path)
        if not path.is_file():
            raise KilnError(f"{path}: no such lexicon file")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                words = json.loads(text)
            except json.JSONDecodeError as exc:
                raise KilnError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            if not isinstance(words, (dict, list)):
                raise KilnError(f"{path}: expected a JSON object {{word: weight}} or a list of words")
        else:
            words = {}
            for n, line in enumerate(text.splitlines(), 1):
                fields = line.split("#", 1)[0].split()
                if not fields:
                    continue
                if len(fields) > 2:
                    raise KilnError(f"{path}:{n}: expected 'word [weight]', got {line.strip()!r}")
                try:
                    words[fields[0]] = words.get(fields[0], 0.0) + (float(fields[1]) if len(fields) == 2 else 1.0)
                except ValueError:
                    raise KilnError(f"{path}:{n}: weight {fields[1]!r} is not a number") from None
        return cls(vocab, words, strength, name=path.name)

    # state: (score of finished words, tail) where tail is the current trailing word run when it
    # can still become a listed word, b"" outside a word, None inside a word that cannot
    def initial_state(self) -> State:
        return (0.0, b"")

    def advance(self, state: tuple[float, bytes | None], token: int) -> tuple[float, bytes | None]:
        score, tail = state
        t = self._t
        if t.noop[token]:
            return state
        if t.allword[token]:
            if tail is None:
                return state
            grown = tail + t.piece[token]
            return (score, grown if grown in self._prefixes else None)
        if tail is not None:
            word = tail + t.lead[token]
            if word:
                score += self.weights.get(word, 0.0)
        score += float(self._inner[token])
        trail = t.trail[token]
        return (score, trail if not trail or trail in self._prefixes else None)

    def prefix(self, state: tuple[float, bytes | None]) -> float:
        return state[0]

    def complete(self, state: tuple[float, bytes | None]) -> float:
        score, tail = state
        return score + (self.weights.get(tail, 0.0) if tail else 0.0)

    def logw_next(self, state: tuple[float, bytes | None]) -> np.ndarray:
        v = self.vocab.size
        _, tail = state
        row = np.empty(v + 1, dtype=np.float32)
        if tail == b"":
            row[:v] = self._base_empty
        else:
            row[:v] = self._base
            if tail:
                n = len(tail)
                for w, wt in self.weights.items():
                    if w.startswith(tail):
                        ids = self._t.lead_arrays.get(w[n:])
                        if ids is not None:
                            row[ids] += np.float32(wt)
        row[v] = self.complete(state) - state[0]
        return row

    def batch_logw_next(self, states: Sequence[tuple[float, bytes | None]]) -> np.ndarray:
        rows = [self.logw_next(s) for s in states]
        return np.stack(rows) if rows else np.zeros((0, self.vocab.size + 1), np.float32)

    def __repr__(self) -> str:
        what = self.name or f"{len(self.weights)} words"
        return f"Lexicon({what}, strength={self.strength})"
