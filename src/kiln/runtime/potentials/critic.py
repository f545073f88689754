"""A second language model as a potential: Φ(x) = p_ref(x EOS | prompt)^β.

`ReferenceCritic(vocab, engine, beta=1.0, prompt=None)` scores the generated tokens under another
exported model (a kiln engine: GGUF via llama.cpp or an ONNX dir) that shares the proposal
model's vocabulary (a different vocabulary is refused). Used as a critic it steers SMC toward text
the reference model finds likely (product of experts / "prompt intersection" when its prompt
differs); `beta` tempers it. Without `prompt`, the critic conditions on the sampler's prompt
(the sampler calls `set_prompt(prompt_ids)`); with `prompt` (ids or text) it keeps its own.

* prefix(x)   = β · log p_ref(x | prompt)                 (a twist; never −inf)
* complete(x) = β · (log p_ref(x | prompt) + log p_ref(EOS | prompt, x)), EOS = any EOG id
* logw_next(x) = β · log p_ref(· | prompt, x), EOS entry β · log p_ref(EOS | ...): it is
  proposal-capable, so it can also be multiplied into the proposal.

Cost and caching. The critic owns `engine`'s sequences: sequence 0 holds the prompt, the others
hold recently scored token prefixes. The next-token log-probabilities of a prefix ("row",
vocab floats) are kept in an LRU cache keyed by the token tuple. Computing the rows of a batch of
states costs one batched `engine.step` for every state whose parent prefix still sits in some
sequence (the usual SMC case: each step extends the previous step's prefixes by one token;
particles sharing a parent after resampling get a `copy_seq`, which llama.cpp's unified cache
does without copying data), and one `prefill` of its whole prefix (on a copy of the prompt
sequence) for any other state. `batch_prefix` of the states after step t therefore runs the
reference model once over the ≤ N distinct prefixes of step t−1. Give the engine
`n_seq_max` ≥ 2N + 1 (one sequence per live prefix plus the prompt) and an `n_ctx` large
enough for the prompt plus every live tail (llama.cpp's unified cache shares the prompt).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, State, Vocab


class _RefState:
    """Generated tokens so far; `logp` (log p_ref of them) is filled in once the parent's row is known."""

    __slots__ = ("tokens", "parent", "logp", "epoch")

    def __init__(self, tokens: tuple[int, ...], parent: _RefState | None, logp: float | None, epoch: int):
        self.tokens = tokens
        self.parent = parent
        self.logp = logp
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"<critic state: {len(self.tokens)} tokens, logp={self.logp}>"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    lse = m.astype(np.float64) + np.log(np.exp(x - m).sum(axis=-1, keepdims=True, dtype=np.float64))
    return (x - lse).astype(np.float32)


def same_vocabulary(vocab: Vocab, engine: Any) -> str | None:
    """None if `engine` tokenizes like `vocab`, else a one-line reason."""
    size = int(engine.vocab_size)
    if size != vocab.size:
        return f"reference model has {size} tokens, the proposal model {vocab.size}"
    for i in range(min(size, len(vocab.token_bytes))):
        theirs = engine.token_bytes(i)
        if theirs != vocab.token_bytes[i]:
            return f"token {i} is {theirs!r} in the reference model but {vocab.token_bytes[i]!r} in the proposal model"
    return None


class ReferenceCritic(Potential):
    """Reference-LM potential; see the module docstring for semantics and cost."""

    def __init__(self, vocab: Vocab, engine: Any, beta: float = 1.0, prompt: Sequence[int] | str | None = None,
                 cache_rows: int | None = None) -> None:
        super().__init__(vocab)
        try:
            beta = float(beta)
        except (TypeError, ValueError):
            raise KilnError(f"critic beta must be a number, got {beta!r}") from None
        if not (beta > 0 and math.isfinite(beta)):
            raise KilnError(f"critic beta must be finite and > 0, got {beta}")
        reason = same_vocabulary(vocab, engine)
        if reason:
            raise KilnError(f"reference critic needs the proposal model's vocabulary: {reason}")
        if int(engine.n_seq_max) < 2:
            raise KilnError("reference critic needs an engine with n_seq_max >= 2 (the prompt plus work sequences)")
        self.engine = engine
        self.beta = beta
        self._eog = np.array(sorted(vocab.eog_ids), dtype=np.int64)
        self._capacity = cache_rows or max(64, 4 * int(engine.n_seq_max))
        self._rows: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._held: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # work seq -> tokens it holds (LRU)
        self._epoch = 0
        self._prompt: list[int] | None = None
        self.own_prompt = prompt is not None
        if prompt is not None:
            self.condition_on(prompt)

    # --- prompt ----------------------------------------------------------------------------------
    @property
    def prompt_conditioned(self) -> bool:  # type: ignore[override]
        """True unless built with its own `prompt`: `set_prompt` then re-conditions it (and invalidates
        its states), so one critic cannot serve several prompts at once (smc_batch wants one per prompt)."""
        return not self.own_prompt

    def set_prompt(self, prompt_ids: Sequence[int]) -> None:
        """The sampler's hook: condition on the generation prompt, unless this critic was built
        with its own `prompt` (prompt intersection: p_ref conditioned on a different prompt)."""
        if not self.own_prompt:
            self.condition_on(prompt_ids)

    def condition_on(self, prompt: Sequence[int] | str) -> None:
        """Condition on `prompt` (token ids, or text tokenized by the reference engine with its
        special tokens). Resets the engine's sequences; states made before are invalid."""
        if isinstance(prompt, str):
            prompt = self.engine.tokenize(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            if self.vocab.bos_id is None:
                raise KilnError("reference critic needs a non-empty prompt (the model has no BOS token)")
            ids = [self.vocab.bos_id]
        self._prompt = ids
        self._epoch += 1
        self._rows.clear()
        self._claim(force=True)
        self._initial = _RefState((), None, 0.0, self._epoch)

    def _claim(self, force: bool = False) -> None:
        """Make sure the engine holds this critic's prompt in sequence 0. An engine shared by two
        critics (or used for something else in between) is re-prefilled: correct, only slower."""
        owner = getattr(self.engine, "_kiln_potential_owner", None)
        if not force and owner is not None and owner() is self:
            return
        self.engine.reset()
        row = _log_softmax(self.engine.prefill(self._prompt, seq=0))
        self._held.clear()
        self._rows[()] = row
        self._rows.move_to_end(())
        self.engine._kiln_potential_owner = weakref.ref(self)

    @property
    def prompt(self) -> list[int] | None:
        return self._prompt

    # --- states ----------------------------------------------------------------------------------
    def initial_state(self) -> State:
        if self._prompt is None:
            raise KilnError("reference critic has no prompt: call set_prompt(prompt_ids) or condition_on(prompt) first")
        return self._initial

    def advance(self, state: _RefState, token: int) -> _RefState:
        token = int(token)
        logp = None
        if state.logp is not None:
            row = self._rows.get(state.tokens)
            if row is not None:
                logp = state.logp + float(row[token])
        return _RefState(state.tokens + (token,), None if logp is not None else state, logp, state.epoch)

    def _check(self, states: Sequence[_RefState]) -> None:
        for s in states:
            if s.epoch != self._epoch:
                raise KilnError("reference critic state belongs to an earlier prompt (the critic was conditioned anew)")

    def _resolve(self, states: Sequence[_RefState]) -> None:
        """Fill in `logp` of the states (and of their unresolved ancestors)."""
        chain: list[_RefState] = []
        seen: set[int] = set()
        for s in states:
            while s.logp is None and id(s) not in seen:
                seen.add(id(s))
                chain.append(s)
                s = s.parent
        if not chain:
            return
        chain.sort(key=lambda s: len(s.tokens))
        # parents are resolved level by level, shortest first; rows for one level come in one batch
        by_len: dict[int, list[_RefState]] = {}
        for s in chain:
            by_len.setdefault(len(s.tokens), []).append(s)
        for level in sorted(by_len):
            group = by_len[level]
            rows = self._rows_for([s.tokens[:-1] for s in group])
            for s, row in zip(group, rows):
                s.logp = s.parent.logp + float(row[s.tokens[-1]])
                s.parent = None

    def prefix(self, state: _RefState) -> float:
        return float(self.batch_prefix([state])[0])

    def batch_prefix(self, states: Sequence[_RefState]) -> np.ndarray:
        self._check(states)
        self._resolve(states)
        return np.array([self.beta * s.logp for s in states], dtype=np.float64)

    def complete(self, state: _RefState) -> float:
        return float(self.batch_complete([state])[0])

    def batch_complete(self, states: Sequence[_RefState]) -> np.ndarray:
        self._check(states)
        self._resolve(states)
        rows = self._rows_for([s.tokens for s in states])
        return np.array([self.beta * (s.logp + self._eos_logp(r)) for s, r in zip(states, rows)], dtype=np.float64)

    def _eos_logp(self, row: np.ndarray) -> float:
        vals = row[self._eog].astype(np.float64)
        m = vals.max()
        return float(m + np.log(np.exp(vals - m).sum())) if m > -np.inf else -math.inf

    def logw_next(self, state: _RefState) -> np.ndarray:
        return self.batch_logw_next([state])[0]

    def batch_logw_next(self, states: Sequence[_RefState]) -> np.ndarray:
        self._check(states)
        rows = self._rows_for([s.tokens for s in states])
        out = np.empty((len(states), self.vocab.size + 1), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i, :-1] = row
            out[i, -1] = self._eos_logp(row)
        if self.beta != 1.0:
            out *= np.float32(self.beta)
        return out

    # --- rows: next-token log-probabilities of token prefixes ------------------------------------
    def _cache_row(self, key: tuple[int, ...], row: np.ndarray) -> None:
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self._capacity:
            old, _ = next(iter(self._rows.items()))
            if old == ():
                self._rows.move_to_end(old)  # the prompt row stays
                continue
            self._rows.popitem(last=False)

    def _rows_for(self, keys: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
        missing = list(dict.fromkeys(k for k in keys if k not in self._rows))
        computed: dict[tuple[int, ...], np.ndarray] = {}
        while missing:
            chunk, missing = self._plan_chunk(missing)
            computed.update(self._run_chunk(chunk))
        out = []
        for k in keys:
            row = computed.get(k)
            if row is None:
                row = self._rows[k]
                self._rows.move_to_end(k)
            out.append(row)
        return out

    def _work_seqs(self) -> list[int]:
        return list(range(1, int(self.engine.n_seq_max)))

    def _plan_chunk(self, keys: list[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """As many keys as there are work sequences (each needs one)."""
        n = len(self._work_seqs())
        return keys[:n], keys[n:]

    def _run_chunk(self, keys: list[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
        self._claim()
        eng = self.engine
        holder = {toks: seq for seq, toks in self._held.items()}
        holder[()] = 0  # the prompt sequence: only ever copied, never extended in place
        by_parent: dict[int, list[tuple[int, ...]]] = {}
        fresh: list[tuple[int, ...]] = []
        for k in keys:
            seq = holder.get(k[:-1])
            if seq is None:
                fresh.append(k)
            else:
                by_parent.setdefault(seq, []).append(k)
        # sequences we must not overwrite in this chunk: parents being extended
        pinned = set(by_parent) - {0}
        free = [s for s in self._work_seqs() if s not in self._held]
        evictable = [s for s in self._held if s not in pinned]  # LRU order

        def take() -> int:
            if free:
                return free.pop(0)
            seq = evictable.pop(0)  # a chunk never needs more than the work sequences
            del self._held[seq]
            return seq

        step_tokens: list[int] = []
        step_seqs: list[int] = []
        step_keys: list[tuple[int, ...]] = []
        for parent_seq, children in by_parent.items():
            in_place = children[0] if parent_seq != 0 else None
            for child in children:
                if child is in_place:
                    continue
                seq = take()
                eng.copy_seq(parent_seq, seq)
                step_tokens.append(child[-1])
                step_seqs.append(seq)
                step_keys.append(child)
            if in_place is not None:
                step_tokens.append(in_place[-1])
                step_seqs.append(parent_seq)
                step_keys.append(in_place)
        result: dict[tuple[int, ...], np.ndarray] = {}
        if step_seqs:
            logits = eng.step(step_tokens, step_seqs)
            for key, seq, row in zip(step_keys, step_seqs, _log_softmax(logits)):
                result[key] = row
                self._held[seq] = key
                self._held.move_to_end(seq)
        for key in fresh:
            seq = take()
            eng.copy_seq(0, seq)
            row = _log_softmax(eng.prefill(list(key), seq=seq))
            result[key] = row
            self._held[seq] = key
            self._held.move_to_end(seq)
        for key, row in result.items():
            self._cache_row(key, row)
        return result

    def __repr__(self) -> str:
        return f"ReferenceCritic(beta={self.beta}, engine={type(self.engine).__name__})"
