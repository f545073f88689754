"""A potential from any Python function of the generated text.

`FromCallable(vocab, complete=fn, prefix=fn_or_None)`: each function takes the decoded text
(str) and returns a log score (float, −inf = ruled out) or a bool (True -> 0, False -> −inf).

`complete` sees the final text (invalid UTF-8 replaced by U+FFFD). `prefix` sees the text
generated so far with an incomplete trailing UTF-8 character held back (it is completed by the
next token). `prefix=None` means 0: every prefix is viable, the function only judges finished
texts (a pure critic at EOS).

Your prefix function must respect the potential contract: if prefix(x) is −inf then every
extension y must have complete(xy) = prefix(xy) = −inf, i.e. it may only rule out a prefix that
can *never* become acceptable (e.g. "contains a banned word" is fine, "does not end with a full
stop" is not: the full stop may still come). A prefix that breaks this silently removes valid
texts from the posterior. `kiln.runtime.potentials.check_soundness` can test it on examples.

Not proposal-capable (`logw_next` is None): scoring every vocabulary item would call the
function 49k times per step. Use it as a critic (twist). The state is the text's bytes, so a
step copies the text (O(T) per step); the functions are called once per `prefix`/`complete`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, State, Vocab


def as_log(value, what: str = "potential function") -> float:
    """bool -> 0/−inf, numbers -> float; NaN, +inf and other types are errors."""
    if isinstance(value, (bool, np.bool_)):
        return 0.0 if value else -math.inf
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise KilnError(f"{what} must return a float (log score) or a bool, got {type(value).__name__}") from None
    if math.isnan(out) or out == math.inf:
        raise KilnError(f"{what} returned {out}, expected a log score in [-inf, inf)")
    return out


def _complete_prefix_text(data: bytes) -> str:
    """Decode, holding back an incomplete UTF-8 sequence at the end (at most 3 bytes)."""
    for cut in range(0, min(3, len(data)) + 1):
        try:
            return data[:len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


class FromCallable(Potential):
    """Potential from text functions; see the module docstring for the contract."""

    def __init__(self, vocab: Vocab, complete: Callable[[str], float | bool],
                 prefix: Callable[[str], float | bool] | None = None, boolean: bool = False,
                 name: str | None = None) -> None:
        super().__init__(vocab)
        if not callable(complete):
            raise KilnError("FromCallable: complete must be a callable taking the text")
        if prefix is not None and not callable(prefix):
            raise KilnError("FromCallable: prefix must be a callable taking the text, or None")
        self._complete = complete
        self._prefix = prefix
        self.boolean = bool(boolean)
        self.name = name or getattr(complete, "__name__", "callable")

    def initial_state(self) -> State:
        return b""

    def advance(self, state: bytes, token: int) -> bytes:
        return state + self.vocab.token_bytes[token]

    def prefix(self, state: bytes) -> float:
        if self._prefix is None:
            return 0.0
        return as_log(self._prefix(_complete_prefix_text(state)), f"{self.name} (prefix)")

    def complete(self, state: bytes) -> float:
        if self._prefix is not None and self.prefix(state) == -math.inf:
            return -math.inf  # the contract, even if the complete function disagrees
        return as_log(self._complete(state.decode("utf-8", errors="replace")), f"{self.name} (complete)")

    def __repr__(self) -> str:
        return f"FromCallable({self.name})"
