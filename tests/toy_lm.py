"""The toy LM of the SMC tests: a first-order Markov chain over tokens a b c d e and EOS (id 5),
behind the Engine contract, where every law is computable; and OddB, a Boolean constraint on it.

The next-token law depends on the last token only. The constraint: strings over {a, b} with an odd
number of b's. After "a" most mass goes to c/d (masked), so mask-only decoding over-weights
prefixes with a's.
"""

from __future__ import annotations

import math
import time

import numpy as np

from kiln.runtime.engine import Engine
from kiln.runtime.potentials.base import Potential, Vocab

TOY_P = np.array([
    # a     b     c     d     e     EOS    after ...
    [0.15, 0.10, 0.40, 0.25, 0.05, 0.05],  # a
    [0.30, 0.25, 0.05, 0.05, 0.05, 0.30],  # b
    [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],  # c
    [0.25, 0.25, 0.20, 0.10, 0.10, 0.10],  # d
    [0.45, 0.15, 0.15, 0.10, 0.05, 0.10],  # e
    [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],  # EOS (never fed)
])
TOY_LOGITS = np.log(TOY_P) + 1.7  # unnormalized on purpose
TOY_T = 6  # max_tokens


class ToyEngine(Engine):
    """The Markov chain above behind the Engine contract (sequences are token lists)."""

    def __init__(self, n_seq_max: int = 64, n_ctx: int = 64, delay: float = 0.0):
        self.vocab_size = 6
        self.eog_ids = frozenset({5})
        self.bos_id = None
        self.add_bos = False
        self.chat_template = None
        self.context_length = self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.delay = delay
        self.seqs: dict[int, list[int]] = {}
        self.prefills: list[tuple[int, list[int]]] = []
        self.steps: list[list[int]] = []  # the sequence ids of every step call

    def tokenize(self, text, add_special=True, parse_special=True):
        return ["abcde".index(c) for c in text]

    def token_bytes(self, token):
        return b"abcde"[token:token + 1] if token < 5 else b""

    def prefill(self, tokens, seq=0, all_logits=False, start=None):
        self.prefills.append((seq, list(tokens)))
        self.seqs.setdefault(seq, []).extend(int(t) for t in tokens)
        rows = TOY_LOGITS[np.asarray(tokens)].astype(np.float32)
        return rows if all_logits else rows[-1]

    def step(self, tokens, seqs):
        assert len(set(seqs)) == len(seqs) and all(s in self.seqs for s in seqs)
        assert all(0 <= s < self.n_seq_max for s in seqs)
        time.sleep(self.delay)
        self.steps.append(list(seqs))
        for t, s in zip(tokens, seqs):
            self.seqs[s].append(int(t))
        return TOY_LOGITS[np.asarray(tokens, np.intp)].astype(np.float32)

    def copy_seq(self, src, dst):
        self.seqs[dst] = list(self.seqs[src])

    def drop_seq(self, seq):
        self.seqs.pop(seq, None)

    def positions(self):
        return {s: len(t) for s, t in self.seqs.items()}


TOY_VOCAB = Vocab((b"a", b"b", b"c", b"d", b"e", b""), frozenset({5}), 6)


class OddB(Potential):
    """Boolean: only a/b tokens, and EOS only after an odd number of b's. State: parity, None = dead."""

    boolean = True

    def initial_state(self):
        return 0

    def advance(self, state, token):
        if state is None or token > 1:
            return None
        return state ^ token

    def prefix(self, state):
        return 0.0 if state is not None else -math.inf

    def complete(self, state):
        return 0.0 if state == 1 else -math.inf

    def logw_next(self, state):
        w = np.full(7, -np.inf, np.float32)
        if state is not None:
            w[:2] = 0.0
            w[6] = 0.0 if state == 1 else -np.inf
        return w
