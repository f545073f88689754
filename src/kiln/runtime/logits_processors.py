"""Local masking with kiln potentials inside other libraries' samplers.

For users who want constrained decoding only (the mask, not SMC's weights and resampling): the
next-token weights of a proposal-capable potential (`logw_next`) are added to the model's logits.
This is *locally* constrained decoding: outputs satisfy a hard constraint, but their distribution
is the renormalized-per-step one, not p(x | constraint) (SMC corrects that; see smc.py).

* `llama_cpp_logits_processor(potential)`: a callable for `llama_cpp.LogitsProcessorList`
  (`Llama.create_completion(..., logits_processor=LogitsProcessorList([proc]))`).
* `transformers_logits_processor(potential)`: a `transformers.LogitsProcessor` for
  `model.generate(..., logits_processor=[proc], eos_token_id=sorted(vocab.eog_ids))` (torch is
  imported only inside this function). Pass every EOG id as `eos_token_id`: the processor lets
  the model end through any of them, and generate only stops on the ids it is told.

Both track the generated suffix incrementally: the prompt is whatever the first call of a
generation sees (or `prompt_len` tokens when given), later calls advance the potential's state by
the new tokens only (a suffix that does not extend a known one is rebuilt from the prompt). A
call whose input is not exactly one token longer than the previous call's starts a new
generation (so one processor can serve several generate calls); with an explicit `prompt_len`,
call `reset(prompt_len)` between generations. The EOS entry of `logw_next` is applied to every
end-of-generation id of the potential's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, State


class _Tracker:
    """Maps generated suffixes (token tuples) to potential states, extending them incrementally."""

    def __init__(self, potential: Potential, prompt_len: int | None) -> None:
        if not isinstance(potential, Potential):
            raise KilnError(f"expected a kiln potential, got {type(potential).__name__}")
        if potential.logw_next(potential.initial_state()) is None:
            raise KilnError(f"{potential!r} has no logw_next (it is a critic, not a mask): it cannot be "
                            "a logits processor")
        self.potential = potential
        self.vocab = potential.vocab
        self.eog = np.array(sorted(potential.vocab.eog_ids), dtype=np.int64)
        self._eog_set = potential.vocab.eog_ids
        self.reset(prompt_len)

    def reset(self, prompt_len: int | None = None) -> None:
        self.prompt_len = prompt_len
        self._inferred = prompt_len is None
        self._last_len: int | None = None
        self._states: dict[tuple[int, ...], State] = {(): self.potential.initial_state()}

    def start(self, length: int) -> int:
        """Called with the length of `input_ids` on every call; returns the prompt length. Within
        one generation each call sees one token more than the previous one; any other length
        means a new generation, whose prompt is what this call sees (when it was inferred)."""
        if self.prompt_len is None or (self._inferred and self._last_len is not None
                                       and length != self._last_len + 1):
            self.prompt_len = length
            self._states = {(): self.potential.initial_state()}
        self._last_len = length
        return self.prompt_len

    def state(self, suffix: tuple[int, ...]) -> State:
        state = self._states.get(suffix)
        if state is not None:
            return state
        # longest known prefix of this suffix, then advance token by token
        n = len(suffix)
        while n > 0 and suffix[:n] not in self._states:
            n -= 1
        state = self._states[suffix[:n]]
        for k in range(n, len(suffix)):
            state = self.potential.advance(state, suffix[k])
        self._states[suffix] = state
        return state

    def prune(self, keep: Sequence[tuple[int, ...]]) -> None:
        keep_set = set(keep)
        self._states = {k: s for k, s in self._states.items() if k in keep_set or k == ()}

    def weights(self, suffixes: Sequence[tuple[int, ...]]) -> np.ndarray:
        """[B, vocab.size] additive log weights (EOS entry copied onto every EOG id)."""
        states = [self.state(s) for s in suffixes]
        rows = self.potential.batch_logw_next(states)
        v = self.vocab.size
        out = rows[:, :v].astype(np.float32, copy=True)
        if len(self.eog):
            out[:, self.eog] = rows[:, v:v + 1]
        self.prune(suffixes)
        return out


class LlamaCppLogitsProcessor:
    """`(input_ids, scores) -> scores` for llama-cpp-python's `LogitsProcessorList`."""

    def __init__(self, potential: Potential, prompt_len: int | None = None) -> None:
        self._t = _Tracker(potential, prompt_len)

    @property
    def prompt_len(self) -> int | None:
        return self._t.prompt_len

    def reset(self, prompt_len: int | None = None) -> None:
        self._t.reset(prompt_len)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        prompt_len = self._t.start(len(ids))
        suffix = tuple(int(t) for t in ids[prompt_len:])
        out = np.array(scores, dtype=np.float32)
        w = self._t.weights([suffix])[0]
        n = min(len(out), len(w))
        out[:n] += w[:n]
        out[n:] = -np.inf  # logits beyond the potential's vocabulary: padding rows
        return out


def llama_cpp_logits_processor(potential: Potential, prompt_len: int | None = None) -> LlamaCppLogitsProcessor:
    """A llama-cpp-python logits processor applying `potential`'s next-token weights.

    `prompt_len`: number of prompt tokens in `input_ids` (default: the length seen on the first
    call, when nothing has been generated yet)."""
    return LlamaCppLogitsProcessor(potential, prompt_len)


def transformers_logits_processor(potential: Potential, prompt_len: int | None = None) -> Any:
    """A `transformers.LogitsProcessor` applying `potential`'s next-token weights to every row of
    a (batched, possibly beam-searched) `generate` call. `prompt_len`: the (padded) prompt length,
    i.e. `input_ids.shape[1]` of the inputs (default: the length seen on the first call). Rows
    that already produced an end-of-generation token are left alone."""
    try:
        import torch
        from transformers import LogitsProcessor
    except ImportError:
        raise KilnError("transformers_logits_processor needs torch and transformers "
                        "(pip install 'kiln-llm[torch]')") from None

    class KilnLogitsProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self._t = _Tracker(potential, prompt_len)

        def reset(self, prompt_len: int | None = None) -> None:
            self._t.reset(prompt_len)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            prompt_len = self._t.start(int(input_ids.shape[1]))
            gen = input_ids[:, prompt_len:].tolist()
            live = [i for i, row in enumerate(gen) if not self._t._eog_set.intersection(row)]
            if not live:
                return scores
            w = torch.from_numpy(self._t.weights([tuple(gen[i]) for i in live])).to(scores.device, scores.dtype)
            out = scores.clone()
            n = min(out.shape[1], w.shape[1])
            idx = torch.tensor(live, device=scores.device)
            out[idx, :n] += w[:, :n]
            if out.shape[1] > n:
                out[idx, n:] = -float("inf")
            return out

    return KilnLogitsProcessor()
