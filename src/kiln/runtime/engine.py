"""The engine contract every backend implements (llama.cpp, onnxruntime, transformers).

Sequences are identified by small integers. An engine keeps each sequence's KV cache
and next position; `step` feeds one token to each listed sequence in one batched
forward pass, which is what SMC particles and batched decoding need.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from kiln.errors import KilnError


def default_threads() -> int:
    """Physical-core-ish default: decode is bandwidth-bound, more threads than cores only hurt."""
    return max(1, min(os.cpu_count() or 1, 8))


def longest_prefix_match(cached: Iterable[tuple[Hashable, Sequence[int]]],
                         tokens: Sequence[int]) -> tuple[Hashable | None, int]:
    """(key, length) of the cached token list sharing the longest prefix with `tokens` ((None, 0) when
    none shares a token): what a prompt cache reuses."""
    best, k = None, 0
    for key, held in cached:
        n = min(len(held), len(tokens))
        j = 0
        while j < n and held[j] == tokens[j]:
            j += 1
        if j > k:
            best, k = key, j
    return best, k


class Engine(ABC):
    vocab_size: int
    eog_ids: frozenset[int]  # end-of-generation ids (eos, eot, ...)
    bos_id: int | None
    add_bos: bool
    chat_template: str | None
    context_length: int  # what the artifact advertises
    n_ctx: int  # what this engine instance allocated
    # True when all sequences share ONE pool of n_ctx cells (llama.cpp's unified KV cache: a shared
    # prompt is held once, each sequence adds its own tail); False when each has n_ctx of its own.
    shared_kv_pool: bool = False

    @abstractmethod
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    @abstractmethod
    def token_bytes(self, token: int) -> bytes: ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def context_text(self) -> str:
        """How messages name this engine's context: engines that allocate another size than the one
        asked for (llama.cpp rounds up to a multiple of 256) name both."""
        return f"the context of {self.n_ctx}"

    @abstractmethod
    def prefill(self, tokens: Sequence[int], seq: int = 0, all_logits: bool = False,
                start: int | None = None) -> np.ndarray:
        """Append `tokens` to sequence `seq`; logits of the last position ([vocab]) or all ([n, vocab]).

        `start` places the first token at that absolute position in an empty sequence
        (rope at long positions can then be checked without a long prefix).
        """

    def prefill_prompt(self, tokens: Sequence[int], seq: int = 0, reserve: int = 0) -> np.ndarray:
        """`prefill` of a prompt into the empty sequence `seq` (logits of its last position), allowed to
        reuse the KV of an earlier prompt's longest common prefix: SMC and batched sampling call
        this, so repeated calls with one system prompt or one question pay for the prompt once.
        `reserve`: KV cells the caller will still need after the prompt (an engine with a shared
        cell pool evicts cached prompts to keep them free). Engines without a prompt cache simply
        prefill."""
        return self.prefill(tokens, seq=seq)

    def clear_prompt_cache(self) -> None:  # noqa: B027 - optional
        """Forget every cached prompt (engines with a prompt cache)."""

    @abstractmethod
    def step(self, tokens: Sequence[int], seqs: Sequence[int]) -> np.ndarray:
        """Append one token to each sequence in one forward pass; returns [len(seqs), vocab] logits."""

    @abstractmethod
    def copy_seq(self, src: int, dst: int) -> None:
        """Make `dst` an exact copy of `src` (cache and position); `dst`'s old contents are dropped."""

    @abstractmethod
    def drop_seq(self, seq: int) -> None: ...

    n_seq_max: int

    def reorder(self, ancestors: Sequence[int], seqs: Sequence[int] | None = None) -> None:
        """Resampling: afterwards `seqs[i]` (default: i) holds what `ancestors[i]` held before.

        All copies happen "at once", as if from a snapshot. This generic version copies
        through spare sequence ids (so an engine needs free ids when a source is also
        overwritten: SMC uses n_seq_max = 2N); engines with a cheaper gather override it.
        """
        seqs = list(range(len(ancestors))) if seqs is None else [int(s) for s in seqs]
        if len(seqs) != len(ancestors):
            raise KilnError(f"reorder: {len(ancestors)} ancestors for {len(seqs)} sequences")
        pending = [(int(a), d) for a, d in zip(ancestors, seqs) if int(a) != d]
        overwritten = {d for _, d in pending}
        busy = set(self.positions()) | set(seqs) | {a for a, _ in pending}
        free = (i for i in range(self.n_seq_max) if i not in busy)
        saved: dict[int, int] = {}
        for src in sorted({a for a, _ in pending if a in overwritten}):
            spare = next(free, None)
            if spare is None:
                raise KilnError(f"reorder needs spare sequence ids: create the engine with n_seq_max > "
                                f"{self.n_seq_max}")
            self.copy_seq(src, spare)
            saved[src] = spare
        for src, dst in pending:
            self.copy_seq(saved.get(src, src), dst)
        for spare in saved.values():
            self.drop_seq(spare)

    def reset(self) -> None:
        for seq in list(self.positions()):
            self.drop_seq(seq)

    @abstractmethod
    def positions(self) -> dict[int, int]:
        """Sequence id -> number of tokens it holds."""

    def score(self, tokens: Sequence[int], start: int = 0) -> np.ndarray:
        """Logits at every position of `tokens` from an empty cache ([n, vocab], float32)."""
        self.reset()
        out = self.prefill(tokens, seq=0, all_logits=True, start=start)
        self.reset()
        return out

    def close(self) -> None:  # noqa: B027 - optional
        pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
