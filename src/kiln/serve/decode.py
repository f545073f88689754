"""What a request runs on its model's engine: a continuous-batching task (kiln.runtime.batching).

* `plain_task`: plain decoding of `n` choices (kiln.runtime.sampling.SampleTask: greedy or sampled,
  top_p, stop strings, logprobs, each choice with its own seeded stream).
* `constrained_task`: the output restricted to a JSON schema, regex or Lark grammar (llguidance
  masks). "smc" samples the model's distribution restricted to the constraint exactly, by
  Sequential Monte Carlo (kiln.runtime.smc.SMCTask): the n choices are independent draws from the
  weighted particle set (`constrained_choices`), and the report carries its effective sample size
  and log Ẑ. "mask" is the mask-only decoding other servers do (the same task unweighted: n
  independent masked samples, what `locally_constrained` draws).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.engine import Engine
from kiln.runtime.sampling import Choice, Emit, SampleTask, SamplingParams, TextStream
from kiln.runtime.smc import SMCResult, SMCTask
from kiln.serve.parse import Constraint, Sampling

__all__ = ["Choice", "TextStream", "build_potential", "check_prompt_ids", "constrained_choices",
           "constrained_task", "plain_task"]


def build_potential(vocab: Any, c: Constraint):
    """The llguidance potential of a constraint (KilnError for a pattern, schema or grammar it rejects)."""
    from kiln.runtime.potentials.grammar import structure

    return structure(vocab, c.kind, c.value, compact=c.compact)


def _ess(result: SMCResult) -> float:
    lw = np.array([p.log_weight for p in result.particles if p.finished and p.log_weight > -math.inf])
    if lw.size == 0:
        return 0.0
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return float(1.0 / np.sum(w * w))


def plain_task(engine: Engine, prompt: Sequence[int], s: Sampling, max_tokens: int,
               emit: Emit | None = None) -> SampleTask:
    """The task of a plain request (n choices)."""
    params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop=s.stop,
                            logprobs=s.logprobs, top_logprobs=s.top_logprobs)
    return SampleTask(engine, prompt, params, max_tokens, emit)


def constrained_task(engine: Engine, prompt: Sequence[int], potential: Any, c: Constraint, s: Sampling,
                     max_tokens: int, particles: int) -> SMCTask:
    """The task of a constrained request: an SMC population of `particles` ("smc"), or n mask-only samples."""
    if c.sampler == "smc":
        return SMCTask(engine, list(prompt), particles, proposal=[potential], max_tokens=max_tokens,
                       temperature=s.temperature, seed=s.seed)
    return SMCTask(engine, list(prompt), s.n, proposal=[potential], ess_threshold=0.0, max_tokens=max_tokens,
                   resampling="multinomial", temperature=s.temperature, seed=s.seed, weighted=False)


def constrained_choices(task: SMCTask, c: Constraint, s: Sampling) -> tuple[list[Choice], dict[str, Any]]:
    """n constrained choices of a finished task (module docstring) and the kiln report of the run."""
    result = task.result
    done = [p for p in result.particles if p.finished]
    if c.sampler == "smc":
        rng = np.random.default_rng(None if s.seed is None else [int(s.seed), 1 << 20])
        choices = []
        for i in range(s.n):
            if done:
                p = result.sample(rng)
                choices.append(Choice(i, p.text, list(p.tokens), "stop"))
            else:
                choices.append(Choice(i, "", [], "length"))
        posterior = sorted(result.posterior.items(), key=lambda kv: -kv[1])[:5]
        report = {"sampler": "smc", "particles": task.rows, "ess": round(_ess(result), 4),
                  "log_z": result.log_ml if math.isfinite(result.log_ml) else None, "steps": result.steps,
                  "resample_steps": len(result.resample_steps), "engine_rows": result.engine_rows,
                  "posterior": [{"text": t, "probability": p} for t, p in posterior]}
        return choices, report
    choices = [Choice(i, p.text, list(p.tokens), "stop") for i, p in enumerate(done)]
    choices += [Choice(i, "", [], "length") for i in range(len(done), s.n)]
    return choices, {"sampler": "mask", "samples": s.n, "failed": s.n - len(done), "steps": result.steps}


def check_prompt_ids(engine: Engine, ids: Sequence[int]) -> list[int]:
    """Token ids given as a completions prompt, checked against the vocabulary."""
    bad = [t for t in ids if not 0 <= int(t) < engine.vocab_size]
    if bad:
        raise KilnError(f"prompt token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})")
    return [int(t) for t in ids]
