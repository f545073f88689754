"""Plain sampling of `n` choices after one prompt, as a continuous-batching task (kiln.runtime.batching).

The prompt is prefilled once (through the engine's prompt cache) and copied to the n choices' rows;
each step every live choice draws its token: greedy at temperature 0, else from softmax(logits / T),
optionally cut to the top_p nucleus. Choice i draws from its own stream (`population_rng(seed, i)`),
so a seeded request is repeatable. Stop strings end a choice (the text is cut before them; text that
could be the start of one is held back while streaming); end-of-generation tokens end it without
being part of it. Log-probabilities are the model's own (log-softmax of the logits at temperature 1,
before top_p), as OpenAI reports them. `kiln serve` runs one `SampleTask` per plain request.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kiln.runtime.batching import SeqPlan, Task
from kiln.runtime.engine import Engine
from kiln.runtime.smc import population_rng


@dataclass
class TokenLogprob:
    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]] = field(default_factory=list)


@dataclass
class Choice:
    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of generation, a stop string, a complete constrained
    # output) or "length" (max_tokens reached, or no constrained sample completed)
    logprobs: list[TokenLogprob] | None = None


# (choice index, new text, logprobs of the tokens since the last call (or None))
Emit = Callable[[int, str, list[TokenLogprob] | None], None]


class TextStream:
    """A choice's text as tokens arrive: bytes decoded incrementally (a character split over tokens is
    emitted whole), cut at the first stop string, with any tail that could begin a stop string held
    back until it is decided."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = list(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; the text that is now safe to send."""
        before = len(self.text)
        self.text += self._dec.decode(piece)
        if self.stops:
            lo = max(0, before - self._longest + 1)
            hits = [i for i in (self.text.find(s, lo) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            return self._take(len(self.text) - hold)
        return self._take(len(self.text))

    def finish(self) -> str:
        """The rest (held-back text, an incomplete character as U+FFFD)."""
        if not self.stopped:
            self.text += self._dec.decode(b"", final=True)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    m = z.max()
    return z - (m + math.log(np.exp(z - m).sum()))


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        c = np.cumsum(p[order])
        keep = int(np.searchsorted(c, top_p * c[-1])) + 1  # the smallest set holding top_p of the mass
        c = c[:keep]
        return int(order[min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), keep - 1)])
    c = np.cumsum(p)
    return int(min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), len(c) - 1))


def token_text(engine: Engine, token: int) -> tuple[str, list[int]]:
    b = engine.token_bytes(token)
    return b.decode("utf-8", errors="replace"), list(b)


def token_logprob(engine: Engine, logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    lp = log_softmax(logits)
    text, raw = token_text(engine, token)
    alts: list[tuple[str, list[int], float]] = []
    if top:
        idx = np.argpartition(-lp, top - 1)[:top] if top < lp.size else np.arange(lp.size)
        for t in idx[np.argsort(-lp[idx], kind="stable")]:
            alts.append((*token_text(engine, int(t)), float(lp[t])))
    return TokenLogprob(text, raw, float(lp[token]), alts)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0


class SampleTask(Task):
    """`params.n` choices of at most `max_tokens` tokens after `prompt` (module docstring). `emit(i, text,
    logprobs)` streams each choice's new text as it is decided; `choices` is final once the batch reports
    the task finished. KV budget (`cells`): the prompt once plus n × max_tokens."""

    def __init__(self, engine: Engine, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
                 emit: Emit | None = None) -> None:
        self.engine = engine
        self.prompt = [int(t) for t in prompt]
        self.params = p = params
        self.max_tokens = int(max_tokens)
        self.emit = emit
        self.rows = int(p.n)
        self.cells = len(self.prompt) + self.rows * self.max_tokens
        self.choices = [Choice(i, logprobs=[] if p.logprobs else None) for i in range(p.n)]
        self.streams = [TextStream(p.stop) for _ in range(p.n)]
        self.rngs = [population_rng(p.seed, i) for i in range(p.n)]
        self.eog = engine.eog_ids
        self.step_no = 0

    def prefill(self, engine: Engine, base: int, reserve: int) -> np.ndarray:
        """The prompt's last logits in sequence `base` (through the engine's prompt cache); a subclass
        may report progress here (kiln.runtime.document's long chunks)."""
        return engine.prefill_prompt(self.prompt, seq=base, reserve=reserve)

    def start(self, engine: Engine, base: int, reserve: int) -> None:
        self.base = base
        first = self.prefill(engine, base, reserve)
        for i in range(1, self.rows):
            engine.copy_seq(base, base + i)
        self.logits = np.repeat(first[None, :], self.rows, axis=0)
        self.live = list(range(self.rows))

    def propose(self, plan: SeqPlan) -> list[tuple[int, int]] | None:
        if not self.live or self.step_no >= self.max_tokens:
            self._finish()
            return None
        p, engine, emit = self.params, self.engine, self.emit
        last = self.step_no == self.max_tokens - 1
        self.step_no += 1
        going, rows = [], []
        for r, i in enumerate(self.live):
            c, st = self.choices[i], self.streams[i]
            tok = pick(self.logits[r], p.temperature, p.top_p, self.rngs[i])
            if tok in self.eog:
                c.finish_reason = "stop"
                if emit is not None:
                    emit(i, st.finish(), None)
                continue
            c.tokens.append(tok)
            lp = None
            if c.logprobs is not None:
                lp = [token_logprob(engine, self.logits[r], tok, p.top_logprobs)]
                c.logprobs.extend(lp)
            delta = st.push(engine.token_bytes(tok))
            if st.stopped:
                c.finish_reason = "stop"
            elif last:
                c.finish_reason = "length"
                delta += st.finish()
            if emit is not None and (delta or lp):
                emit(i, delta, lp)
            if c.finish_reason is None:
                going.append(i)
                rows.append((tok, self.base + i))
            else:
                engine.drop_seq(self.base + i)  # its cells are free for the others now
        self.live = going
        if not going:
            self._finish()
            return None
        return rows

    def absorb(self, logits: np.ndarray | None) -> None:
        if logits is not None:
            self.logits = logits

    def _finish(self) -> None:
        self.live = []
        for c, st in zip(self.choices, self.streams):
            if not st.stopped:
                st.finish()
            c.text = st.text


def sample(engine: Engine, prompt: Sequence[int], params: SamplingParams, max_tokens: int,
           emit: Emit | None = None) -> list[Choice]:
    """One `SampleTask` run alone on `engine` (reset before and after)."""
    from kiln.runtime.batching import ContinuousBatch

    task = SampleTask(engine, prompt, params, max_tokens, emit)
    with ContinuousBatch(engine, rows=max(task.rows, 1)) as batch:
        failures = batch.run([task])
    if failures:
        raise failures[0].error
    return task.choices


__all__ = ["Choice", "SampleTask", "SamplingParams", "TextStream", "TokenLogprob", "pick", "sample",
           "token_logprob"]
