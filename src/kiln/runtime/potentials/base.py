"""The potential contract: Φ over generated token strings, with prefix and complete semantics.

SMC targets π(x) ∝ p(x EOS) · Π_k Φ_k(x) over complete strings x (tokens after the prompt).
A potential gives two log scores (−inf means 0):

* `complete(state)`: log Φ(x) for x ended here.
* `prefix(state)`: a prefix score used as a twist. Contract (genlm-control's): if prefix(x) is
  −inf then complete(xy) and prefix(xy) are −inf for every extension y, i.e. a prefix score
  never rules out a string that can still become valid. `tests/test_potentials.py` checks this
  for every shipped potential on strings it accepts.

States are immutable values: `advance` returns a new state and never mutates its argument, so
after resampling several particles can share one state object without copies. Potentials that
wrap a mutable matcher (llguidance) copy on advance.

A potential that can be multiplied into the proposal (masks, token-level boosts) implements
`logw_next`: for every token v, prefix(x v) − prefix(x), and, in the last entry, the EOS weight
complete(x) − prefix(x). Critics (twists) only need `prefix`/`complete`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

State = Any


@dataclass(frozen=True)
class Vocab:
    """What potentials know about the model's tokens: their bytes and which ones end generation.

    `size` is the width of the logits (it may exceed the tokenizer's vocabulary: padded rows
    decode to b"" and are never produced by a well-trained model).
    """

    token_bytes: tuple[bytes, ...]
    eog_ids: frozenset[int]
    size: int
    #: text -> token ids without special tokens (grammar engines want the model's own tokenizer)
    tokenize: Callable[[str], list[int]] | None = field(default=None, compare=False)
    bos_id: int | None = None

    @classmethod
    def from_engine(cls, engine: Any) -> Vocab:
        n = int(engine.vocab_size)
        return cls(tuple(engine.token_bytes(i) for i in range(n)), frozenset(engine.eog_ids), n,
                   lambda text: engine.tokenize(text, add_special=False, parse_special=False),
                   engine.bos_id)

    def text(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes[t] for t in tokens)


class Potential(ABC):
    """Log-space potential over the generated tokens of one vocabulary."""

    #: True when prefix/complete only take the values 0 and −inf (a hard constraint).
    boolean: bool = False
    #: True when `set_prompt` changes what the potential computes (a ReferenceCritic without its own
    #: prompt): one object then serves one prompt at a time, so `smc_batch` needs one per prompt.
    prompt_conditioned: bool = False

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab

    @abstractmethod
    def initial_state(self) -> State: ...

    @abstractmethod
    def advance(self, state: State, token: int) -> State:
        """The state after appending `token` (a non-EOG token); must not mutate `state`."""

    @abstractmethod
    def prefix(self, state: State) -> float: ...

    @abstractmethod
    def complete(self, state: State) -> float: ...

    def logw_next(self, state: State) -> np.ndarray | None:
        """[vocab.size + 1] float32 next-token log weights (last = EOS), or None if not
        proposal-capable. EOG token entries are ignored by the sampler (EOS is the last entry)."""
        return None

    def batch_logw_next(self, states: Sequence[State]) -> np.ndarray | None:
        rows = [self.logw_next(s) for s in states]
        if any(r is None for r in rows):
            return None
        return np.stack(rows) if rows else np.zeros((0, self.vocab.size + 1), np.float32)

    def batch_prefix(self, states: Sequence[State]) -> np.ndarray:
        return np.array([self.prefix(s) for s in states], dtype=np.float64)

    def batch_complete(self, states: Sequence[State]) -> np.ndarray:
        return np.array([self.complete(s) for s in states], dtype=np.float64)

    # Whole-string helpers (tests, one-off scoring): fold `advance` over the tokens.
    def state_of(self, tokens: Sequence[int]) -> State:
        state = self.initial_state()
        for t in tokens:
            state = self.advance(state, int(t))
        return state

    def prefix_of(self, tokens: Sequence[int]) -> float:
        return self.prefix(self.state_of(tokens))

    def complete_of(self, tokens: Sequence[int]) -> float:
        return self.complete(self.state_of(tokens))

    def set_prompt(self, prompt_ids: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """Called by the sampler with the prompt's token ids before generating; potentials that
        condition on the prompt (ReferenceCritic) override it. Products and Scaled forward it."""

    def prompt_conditioned_parts(self) -> list[Potential]:
        """The objects inside this potential whose scores depend on `set_prompt` (itself, or factors of
        a product): a sampler running several prompts must not share them between prompts."""
        return [self] if self.prompt_conditioned else []

    def __mul__(self, other: Potential) -> Product:
        return Product([self, other])


class Product(Potential):
    """Φ1 · Φ2 · …: logs add, states are tuples, masks intersect."""

    def __init__(self, factors: Sequence[Potential]) -> None:
        flat: list[Potential] = []
        for f in factors:
            flat.extend(f.factors if isinstance(f, Product) else [f])
        if not flat:
            raise ValueError("a product needs at least one potential")
        super().__init__(flat[0].vocab)
        self.factors = flat
        self.boolean = all(f.boolean for f in flat)

    def set_prompt(self, prompt_ids: Sequence[int]) -> None:
        for f in self.factors:
            f.set_prompt(prompt_ids)

    @property
    def prompt_conditioned(self) -> bool:  # type: ignore[override]
        return any(f.prompt_conditioned for f in self.factors)

    def prompt_conditioned_parts(self) -> list[Potential]:
        return [part for f in self.factors for part in f.prompt_conditioned_parts()]

    def initial_state(self) -> State:
        return tuple(f.initial_state() for f in self.factors)

    def advance(self, state: State, token: int) -> State:
        return tuple(f.advance(s, token) for f, s in zip(self.factors, state))

    def prefix(self, state: State) -> float:
        total = 0.0
        for f, s in zip(self.factors, state):
            total += f.prefix(s)
            if total == -math.inf:
                break
        return total

    def complete(self, state: State) -> float:
        total = 0.0
        for f, s in zip(self.factors, state):
            total += f.complete(s)
            if total == -math.inf:
                break
        return total

    def logw_next(self, state: State) -> np.ndarray | None:
        total = None
        for f, s in zip(self.factors, state):
            row = f.logw_next(s)
            if row is None:
                return None
            total = row.astype(np.float32, copy=True) if total is None else total + row
        return total

    def batch_prefix(self, states: Sequence[State]) -> np.ndarray:
        total = np.zeros(len(states), dtype=np.float64)
        for k, f in enumerate(self.factors):
            total += f.batch_prefix([s[k] for s in states])  # lets a factor batch (critics, masks)
        return total

    def batch_complete(self, states: Sequence[State]) -> np.ndarray:
        total = np.zeros(len(states), dtype=np.float64)
        for k, f in enumerate(self.factors):
            total += f.batch_complete([s[k] for s in states])
        return total

    def batch_logw_next(self, states: Sequence[State]) -> np.ndarray | None:
        total = None
        for k, f in enumerate(self.factors):
            rows = f.batch_logw_next([s[k] for s in states])
            if rows is None:
                return None
            total = rows.astype(np.float32, copy=True) if total is None else total + rows
        return total


class Scaled(Potential):
    """Φ^β (logs times β > 0): tempers a soft potential (a strength knob). States, Boolean-ness
    and proposal capability are the wrapped potential's."""

    def __init__(self, potential: Potential, beta: float) -> None:
        beta = float(beta)
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"Scaled needs a finite beta > 0, got {beta}")
        super().__init__(potential.vocab)
        self.potential = potential
        self.beta = beta
        self.boolean = potential.boolean

    def set_prompt(self, prompt_ids: Sequence[int]) -> None:
        self.potential.set_prompt(prompt_ids)

    @property
    def prompt_conditioned(self) -> bool:  # type: ignore[override]
        return self.potential.prompt_conditioned

    def prompt_conditioned_parts(self) -> list[Potential]:
        return self.potential.prompt_conditioned_parts()

    def initial_state(self) -> State:
        return self.potential.initial_state()

    def advance(self, state: State, token: int) -> State:
        return self.potential.advance(state, token)

    def prefix(self, state: State) -> float:
        return self.beta * self.potential.prefix(state)

    def complete(self, state: State) -> float:
        return self.beta * self.potential.complete(state)

    def logw_next(self, state: State) -> np.ndarray | None:
        row = self.potential.logw_next(state)
        return None if row is None else row * np.float32(self.beta)

    def batch_logw_next(self, states: Sequence[State]) -> np.ndarray | None:
        rows = self.potential.batch_logw_next(states)
        return None if rows is None else rows * np.float32(self.beta)

    def batch_prefix(self, states: Sequence[State]) -> np.ndarray:
        return self.beta * self.potential.batch_prefix(states)

    def batch_complete(self, states: Sequence[State]) -> np.ndarray:
        return self.beta * self.potential.batch_complete(states)

    def __repr__(self) -> str:
        return f"Scaled({self.potential!r}, {self.beta})"
