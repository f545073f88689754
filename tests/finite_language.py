"""A finite language as an SMC target, and its exact laws by enumeration (shared by the SMC tests).

`FiniteLanguage` accepts exactly the token sequences that spell one of a few words; `exact_laws`
enumerates every token sequence it allows through an engine (siblings fork their parent's sequence with
`Engine.reorder`), giving the exact target π ∝ p(x EOS)·Φ(x), the exact law of mask-only decoding and log Z.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.runtime.engine import Engine
from kiln.runtime.potentials.base import Potential, Vocab


class FiniteLanguage(Potential):
    """Φ(x) = 1 iff the tokens' bytes spell one of `words` exactly (each token non-empty and not EOG).
    States are byte prefixes of the words (None: dead); masks are precomputed per state."""

    boolean = True

    def __init__(self, vocab: Vocab, words) -> None:
        super().__init__(vocab)
        self.words = {w.encode() for w in words}
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(vocab.token_bytes):
            if b and i not in vocab.eog_ids:
                by_bytes.setdefault(b, []).append(i)
        self.moves: dict[bytes, dict[int, bytes]] = {}
        self.rows: dict[bytes, np.ndarray] = {}
        for state in {w[:k] for w in self.words for k in range(len(w) + 1)}:
            moves = {}
            for w in self.words:
                if w.startswith(state):
                    rest = w[len(state):]
                    for k in range(1, len(rest) + 1):
                        for t in by_bytes.get(rest[:k], []):
                            moves[t] = state + rest[:k]
            self.moves[state] = moves
            row = np.full(vocab.size + 1, -np.inf, np.float32)
            row[list(moves)] = 0.0
            row[-1] = 0.0 if state in self.words else -np.inf
            self.rows[state] = row
        self.dead = np.full(vocab.size + 1, -np.inf, np.float32)

    def initial_state(self):
        return b""

    def advance(self, state, token):
        return None if state is None else self.moves[state].get(int(token))

    def prefix(self, state):
        return 0.0 if state is not None else -math.inf

    def complete(self, state):
        return 0.0 if state in self.words else -math.inf

    def logw_next(self, state):
        return self.dead if state is None else self.rows[state]


def exact_laws(engine: Engine, prompt: list[int], pot: FiniteLanguage, max_tokens: int):
    """The exact target π ∝ p(x EOS)·Φ(x) over strings, the exact law of mask-only decoding, and log Z:
    breadth first over every token sequence the mask allows (every tokenization of every word), one
    batched engine.step per depth; siblings fork their parent's sequence."""
    V = engine.vocab_size
    eog = sorted(engine.eog_ids)
    engine.reset()
    level = [((), pot.initial_state(), 0.0, 0.0, 0)]  # tokens, state, log p, log q_lcd, seq
    logits = engine.prefill(prompt, seq=0)[None]
    gamma: dict[str, float] = {}
    lcd: dict[str, float] = {}
    while level:
        logp = logits.astype(np.float64)
        logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
        children = []
        for (toks, state, lg, lq, seq), row in zip(level, logp):
            w = pot.logw_next(state)
            allowed = [t for t in np.flatnonzero(np.isfinite(w[:V])) if t not in engine.eog_ids]
            if len(toks) >= max_tokens:
                allowed = []
            eos = np.logaddexp.reduce(row[eog]) + w[V]
            u = row[allowed] + w[allowed]
            norm = np.logaddexp.reduce(np.append(u, eos))
            if eos > -np.inf:
                text = engine.detokenize(toks)
                gamma[text] = np.logaddexp(gamma.get(text, -np.inf), lg + eos)
                lcd[text] = np.logaddexp(lcd.get(text, -np.inf), lq + eos - norm)
            children += [(toks + (int(t),), pot.advance(state, int(t)), lg + ut, lq + ut - norm, seq)
                         for t, ut in zip(allowed, u)]
        if not children:
            break
        kept: set[int] = set()
        src, dst, level = [], [], []
        for child in children:
            seq = child[4]
            if seq in kept:
                src.append(seq)
                seq = None
            else:
                kept.add(seq)
            level.append(child[:4] + (seq,))
        for seq in {c[4] for c in children} - kept:
            engine.drop_seq(seq)
        free = (i for i in range(engine.n_seq_max) if i not in kept)
        for i, child in enumerate(level):
            if child[4] is None:
                level[i] = child[:4] + (next(free),)
                dst.append(level[i][4])
        if src:
            engine.reorder(src, dst)
        logits = engine.step([c[0][-1] for c in level], [c[4] for c in level])
    engine.reset()
    log_z = float(np.logaddexp.reduce(list(gamma.values())))
    return ({k: float(math.exp(v - log_z)) for k, v in gamma.items()}, {k: float(math.exp(v)) for k, v in lcd.items()},
            log_z)
