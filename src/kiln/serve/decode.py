"""Generation on one engine for one request (runs on the model's worker thread).

* `sample`: plain decoding of `n` choices as `n` engine sequences stepped together (the prompt is
  prefilled once, through the engine's prompt cache, and copied): greedy at temperature 0, else
  sampled from softmax(logits / T), optionally cut to the top_p nucleus. Choice i draws from its own
  stream (`population_rng(seed, i)`), so a seeded request is repeatable. Stop strings end a choice
  (the text is cut before them; text that could be the start of one is held back while streaming),
  end-of-generation tokens end it without being part of it. Log-probabilities are the model's own
  (log-softmax of the logits at temperature 1, before top_p), as OpenAI reports them.
* `constrained`: the output restricted to a JSON schema, regex or Lark grammar (llguidance masks).
  "smc" samples the model's distribution restricted to the constraint exactly, by Sequential Monte
  Carlo (kiln.runtime.smc): the n choices are independent draws from the weighted particle set, and
  the report carries its effective sample size and log Ẑ. "mask" is the mask-only decoding other
  servers do (kiln.runtime.smc.locally_constrained): n independent masked samples, no weights.

`stop_now()` is polled between steps: a client that went away frees the engine at the next step.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.engine import Engine
from kiln.runtime.smc import SMCResult, locally_constrained, population_rng, smc
from kiln.serve.parse import Constraint, Sampling


class Cancelled(Exception):
    """The client went away: the request's work stops at the next step."""


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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    m = z.max()
    return z - (m + math.log(np.exp(z - m).sum()))


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
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


def _token_text(engine: Engine, token: int) -> tuple[str, list[int]]:
    b = engine.token_bytes(token)
    return b.decode("utf-8", errors="replace"), list(b)


def _logprob(engine: Engine, logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    lp = _log_softmax(logits)
    text, raw = _token_text(engine, token)
    alts: list[tuple[str, list[int], float]] = []
    if top:
        idx = np.argpartition(-lp, top - 1)[:top] if top < lp.size else np.arange(lp.size)
        for t in idx[np.argsort(-lp[idx], kind="stable")]:
            alts.append((*_token_text(engine, int(t)), float(lp[t])))
    return TokenLogprob(text, raw, float(lp[token]), alts)


def sample(engine: Engine, prompt: Sequence[int], s: Sampling, max_tokens: int, emit: Emit | None = None,
           stop_now: Callable[[], bool] = lambda: False) -> list[Choice]:
    """Plain decoding of `s.n` choices (module docstring). Raises `Cancelled` when `stop_now()`."""
    n = s.n
    choices = [Choice(i, logprobs=[] if s.logprobs else None) for i in range(n)]
    streams = [TextStream(s.stop) for _ in range(n)]
    rngs = [population_rng(s.seed, i) for i in range(n)]
    eog = engine.eog_ids
    engine.reset()
    try:
        first = engine.prefill_prompt(list(prompt), seq=0, reserve=n * max_tokens)
        for i in range(1, n):
            engine.copy_seq(0, i)
        logits = np.repeat(first[None, :], n, axis=0)
        live = list(range(n))
        for step in range(max_tokens):
            if stop_now():
                raise Cancelled
            going, tokens = [], []
            for r, i in enumerate(live):
                c = choices[i]
                tok = _pick(logits[r], s.temperature, s.top_p, rngs[i])
                if tok in eog:
                    c.finish_reason = "stop"
                    if emit is not None:
                        emit(i, streams[i].finish(), None)
                    continue
                c.tokens.append(tok)
                lp = None
                if c.logprobs is not None:
                    lp = [_logprob(engine, logits[r], tok, s.top_logprobs)]
                    c.logprobs.extend(lp)
                delta = streams[i].push(engine.token_bytes(tok))
                if streams[i].stopped:
                    c.finish_reason = "stop"
                elif step == max_tokens - 1:
                    c.finish_reason = "length"
                    delta += streams[i].finish()
                if emit is not None and (delta or lp):
                    emit(i, delta, lp)
                if c.finish_reason is None:
                    going.append(i)
                    tokens.append(tok)
            live = going
            if not live:
                break
            logits = engine.step(tokens, live)
    finally:
        engine.reset()
    for c, st in zip(choices, streams):
        if not st.stopped:
            st.finish()
        c.text = st.text
    return choices


def build_potential(vocab: Any, c: Constraint):
    """The llguidance potential of a constraint (KilnError for a pattern, schema or grammar it rejects)."""
    from kiln.runtime.potentials.grammar import JsonSchema, LarkGrammar, Regex

    if c.kind == "json":
        return JsonSchema(vocab, c.value, options={"whitespace_flexible": not c.compact})
    if c.kind == "regex":
        return Regex(vocab, c.value)
    return LarkGrammar(vocab, c.value)


def _ess(result: SMCResult) -> float:
    lw = np.array([p.log_weight for p in result.particles if p.finished and p.log_weight > -math.inf])
    if lw.size == 0:
        return 0.0
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return float(1.0 / np.sum(w * w))


def constrained(engine: Engine, prompt: Sequence[int], potential: Any, c: Constraint, s: Sampling,
                max_tokens: int, particles: int,
                stop_now: Callable[[], bool] = lambda: False) -> tuple[list[Choice], dict[str, Any]]:
    """n constrained choices (module docstring) and the kiln report of the run."""

    def on_step(_info: Any) -> None:
        if stop_now():
            raise Cancelled

    if c.sampler == "smc":
        result = smc(engine, list(prompt), particles, proposal=[potential], max_tokens=max_tokens,
                     temperature=s.temperature, seed=s.seed, on_step=on_step)
        done = [p for p in result.particles if p.finished]
        rng = np.random.default_rng(None if s.seed is None else [int(s.seed), 1 << 20])
        choices = []
        for i in range(s.n):
            if done:
                p = result.sample(rng)
                choices.append(Choice(i, p.text, list(p.tokens), "stop"))
            else:
                choices.append(Choice(i, "", [], "length"))
        posterior = sorted(result.posterior.items(), key=lambda kv: -kv[1])[:5]
        report = {"sampler": "smc", "particles": particles, "ess": round(_ess(result), 4),
                  "log_z": result.log_ml if math.isfinite(result.log_ml) else None, "steps": result.steps,
                  "resample_steps": len(result.resample_steps), "engine_rows": result.engine_rows,
                  "posterior": [{"text": t, "probability": p} for t, p in posterior]}
        return choices, report
    result = locally_constrained(engine, list(prompt), [potential], n_samples=s.n, max_tokens=max_tokens,
                                 temperature=s.temperature, seed=s.seed, on_step=on_step)
    done = [p for p in result.particles if p.finished]
    choices = [Choice(i, p.text, list(p.tokens), "stop") for i, p in enumerate(done)]
    choices += [Choice(i, "", [], "length") for i in range(len(done), s.n)]
    return choices, {"sampler": "mask", "samples": s.n, "failed": s.n - len(done), "steps": result.steps}


def check_prompt_ids(engine: Engine, ids: Sequence[int]) -> list[int]:
    """Token ids given as a completions prompt, checked against the vocabulary."""
    bad = [t for t in ids if not 0 <= int(t) < engine.vocab_size]
    if bad:
        raise KilnError(f"prompt token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})")
    return [int(t) for t in ids]
