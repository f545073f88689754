"""Contract checks for any potential (genlm-control's PotentialTests, on kiln's API).

Each returns a list of problems (empty = fine), so tests can assert on it and users can check a
potential they wrote (e.g. a `FromCallable` prefix function) on their own examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from kiln.runtime.potentials.base import Potential, State


def _close(a: float, b: float, atol: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= atol * max(1.0, abs(a), abs(b))


def check_soundness(potential: Potential, examples: Iterable[Sequence[int] | str]) -> list[str]:
    """For every example the potential accepts (complete > −inf), every prefix must have
    prefix > −inf (a prefix score may never rule out a string that is valid). Strings are
    tokenized with the vocabulary's tokenizer."""
    problems = []
    for ex in examples:
        tokens = potential.vocab.tokenize(ex) if isinstance(ex, str) else list(ex)
        state = potential.initial_state()
        states = [state]
        for t in tokens:
            state = potential.advance(state, t)
            states.append(state)
        if potential.complete(state) == -math.inf:
            continue
        for n, s in enumerate(states):
            if potential.prefix(s) == -math.inf:
                text = potential.vocab.text(tokens[:n]).decode("utf-8", errors="replace")
                problems.append(f"{ex!r} is accepted but its prefix {text!r} ({n} tokens) is ruled out")
                break
    return problems


def check_logw_next(potential: Potential, state: State, tokens: Iterable[int], atol: float = 1e-5) -> list[str]:
    """logw_next[v] == prefix(advance(s, v)) − prefix(s) for the given tokens, and
    logw_next[EOS] == complete(s) − prefix(s). Only meaningful for a state with prefix > −inf."""
    row = potential.logw_next(state)
    if row is None:
        return []
    problems = []
    v = potential.vocab.size
    if row.shape != (v + 1,):
        return [f"logw_next has shape {row.shape}, expected ({v + 1},)"]
    base = potential.prefix(state)
    for t in tokens:
        want = potential.prefix(potential.advance(state, int(t))) - base
        if not _close(float(row[t]), want, atol):
            problems.append(f"token {t} {potential.vocab.token_bytes[t]!r}: logw_next {row[t]} != prefix difference {want}")
    want = potential.complete(state) - base
    if not _close(float(row[v]), want, atol):
        problems.append(f"EOS: logw_next {row[v]} != complete - prefix {want}")
    return problems


def check_autoreg(potential: Potential, tokens: Sequence[int], atol: float = 1e-4) -> list[str]:
    """complete(x) − prefix(ε) == Σ_t logw_next(x_<t)[x_t] + logw_next(x)[EOS] (telescoping)."""
    state = potential.initial_state()
    start = potential.prefix(state)
    total = 0.0
    for t in tokens:
        row = potential.logw_next(state)
        if row is None:
            return []
        total += float(row[t])
        state = potential.advance(state, t)
    row = potential.logw_next(state)
    total += float(row[-1])
    want = potential.complete(state) - start
    return [] if _close(total, want, atol) else [f"Σ logw_next = {total} but complete − prefix(ε) = {want}"]


def check_batch(potential: Potential, states: Sequence[State], atol: float = 1e-6) -> list[str]:
    """batch_prefix / batch_complete / batch_logw_next equal their one-state versions."""
    problems = []
    for name, one, many in (("prefix", potential.prefix, potential.batch_prefix),
                            ("complete", potential.complete, potential.batch_complete)):
        got = np.asarray(many(states), dtype=np.float64)
        want = np.array([one(s) for s in states], dtype=np.float64)
        if got.shape != want.shape or not all(_close(a, b, atol) for a, b in zip(got, want)):
            problems.append(f"batch_{name} {got} != {want}")
    rows = potential.batch_logw_next(states)
    single = [potential.logw_next(s) for s in states]
    if rows is None or any(r is None for r in single):
        if not (rows is None and all(r is None for r in single)):
            problems.append("batch_logw_next and logw_next disagree on being None")
        return problems
    want = np.stack(single) if single else np.zeros((0, potential.vocab.size + 1), np.float32)
    if rows.shape != want.shape:
        problems.append(f"batch_logw_next shape {rows.shape} != {want.shape}")
    elif not np.array_equal(np.isneginf(rows), np.isneginf(want)) or \
            not np.allclose(np.where(np.isfinite(rows), rows, 0), np.where(np.isfinite(want), want, 0), rtol=0, atol=atol):
        problems.append("batch_logw_next differs from stacked logw_next rows")
    return problems


def check_immutable(potential: Potential, state: State, tokens: Iterable[int]) -> list[str]:
    """advance never changes the state it is given: prefix, complete and logw_next of `state`
    are the same before and after advancing it by each token."""
    before = (potential.prefix(state), potential.complete(state))
    row = potential.logw_next(state)
    row = None if row is None else row.copy()
    for t in tokens:
        potential.advance(state, int(t))
    after = (potential.prefix(state), potential.complete(state))
    problems = [] if before == after else [f"advance changed its input state: {before} -> {after}"]
    row2 = potential.logw_next(state)
    if row is not None and not np.array_equal(row, row2):
        problems.append("advance changed its input state's logw_next")
    return problems
