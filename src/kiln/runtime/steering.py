"""Steered generation as the CLI and apps use it: an artifact, prompts, constraints, N particles.

`steer_prompts(artifact, prompts, options, constraints)` is what `kiln generate --particles` runs
(the CLI only parses flags and prints): it sizes the engine for the prompts and particles from the
artifact's format, tokenizes (optionally through the chat template), runs one prompt through
`steer` (with the generation cache) and several through `steer_batch` (one population per prompt,
one engine step for all), and returns one result dict per prompt. `steer` and `steer_batch` do
the same on an engine the caller already holds.

Glue between `kiln.runtime.smc` (the algorithm), `kiln.runtime.potentials` (constraints by spec)
and the generation cache. Role of each potential in the target (reference/smc.md §2.1): hard
constraints that can mask (regex, JSON schema, grammar, and any Boolean spec with `logw_next`)
go into the proposal, where the masked mass enters the weight; everything else (style, length
preferences, critics, Python callables) is a twist, evaluated after each token and replaced by
its complete score at EOS. Each factor is counted exactly once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.formats import open_engine as open_artifact, require_format
from kiln.runtime.engine import Engine
from kiln.runtime.generate import prompt_ids
from kiln.runtime.potentials.base import Potential, Vocab
from kiln.runtime.potentials.registry import EngineOpener
from kiln.runtime.smc import SMCResult, StepInfo, population_rng, smc, smc_batch

# Tokens a prompt can have beyond its UTF-8 bytes (bos/eos and other specials), and what a chat
# template adds around a user message: engines are sized before the prompt is tokenized.
SPECIALS_SLACK = 16
CHAT_TEMPLATE_SLACK = 64


@dataclass
class SteerOptions:
    particles: int = 16
    max_tokens: int = 64
    ess_threshold: float = 0.5
    resampling: str = "systematic"
    temperature: float = 1.0
    seed: int | None = None
    timeout: float | None = None

    def validate(self) -> None:
        if self.particles < 1:
            raise KilnError(f"--particles {self.particles}: need at least one particle")
        if self.max_tokens < 1:
            raise KilnError(f"--max-tokens {self.max_tokens}: must be positive")
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise KilnError(f"--ess-threshold {self.ess_threshold}: must be between 0 and 1")
        if not self.temperature > 0:  # NaN too
            raise KilnError(f"--temperature {self.temperature}: SMC needs a positive temperature (the target is "
                            "the tempered model; greedy decoding has no distribution to correct)")
        if self.timeout is not None and self.timeout <= 0:
            raise KilnError(f"--timeout {self.timeout}: must be positive")


@dataclass
class Constraints:
    """Potential specs (kiln.runtime.potentials.registry) plus the three common shortcuts."""

    regex: str | None = None
    json_schema: str | None = None  # file path or inline JSON
    grammar: str | None = None  # Lark file
    specs: list[str] = field(default_factory=list)

    def all_specs(self) -> list[str]:
        out = []
        if self.regex is not None:
            out.append(f"regex:{self.regex}")
        if self.json_schema is not None:
            out.append(f"json:{self.json_schema}")
        if self.grammar is not None:
            out.append(f"lark:{self.grammar}")
        return out + list(self.specs)

    def cache_identity(self) -> list[str]:
        """Specs with referenced files replaced by their content (a changed schema is a new key)."""
        out = []
        for spec in self.all_specs():
            name, _, arg = spec.partition(":")
            path = Path(arg.split(":")[0]) if arg else None
            if name in ("json", "lark", "lexicon") and path is not None and path.is_file():
                out.append(f"{name}:{path.read_text(encoding='utf-8', errors='replace')}{arg[len(str(path)):]}")
            else:
                out.append(spec)
        return out


def build_potentials(vocab: Vocab, constraints: Constraints,
                     open_engine: EngineOpener | None = None) -> tuple[list[Potential], list[Potential]]:
    """(proposal, critics): Boolean potentials that can mask go into the proposal, the rest are twists.
    `open_engine` opens a `critic:` spec's model (default: by its artifact format, as kiln.runtime.load)."""
    from kiln.runtime.potentials import from_spec

    proposal: list[Potential] = []
    critics: list[Potential] = []
    for spec in constraints.all_specs():
        p = from_spec(vocab, spec, open_engine=open_engine or open_artifact)
        can_mask = p.boolean and p.logw_next(p.initial_state()) is not None
        (proposal if can_mask else critics).append(p)
    return proposal, critics


def result_json(result: SMCResult, vocab: Vocab | None = None, top: int = 20) -> dict[str, Any]:
    posterior = sorted(result.posterior.items(), key=lambda kv: -kv[1])
    return {
        "log_ml": result.log_ml if math.isfinite(result.log_ml) else None,
        "n_particles": result.n_particles,
        "steps": result.steps,
        "wall_time": round(result.wall_time, 4),
        "timed_out": result.timed_out,
        "resample_steps": result.resample_steps,
        "ess_trace": [round(float(e), 3) for e in result.ess_trace],
        "engine_rows": result.engine_rows,
        "posterior": [{"text": t, "probability": p} for t, p in posterior[:top]],
        "distinct": len(posterior),
        "particles": [asdict(p) for p in result.particles],
    }


def _with_sample(result: SMCResult, rng: Any) -> dict[str, Any]:
    """`result_json` plus `sample`: one posterior draw's text (None when no particle finished)."""
    out = result_json(result)
    finished = result.particles and any(p.finished for p in result.particles)
    out["sample"] = result.sample(rng).text if finished else None
    return out


def steer(engine: Engine, prompt_ids: Sequence[int], options: SteerOptions, constraints: Constraints,
          on_step: Callable[[StepInfo], Any] | None = None, cache_key_artifact: str | None = None,
          use_cache: bool = True, open_engine: EngineOpener | None = None) -> tuple[dict[str, Any], bool]:
    """Run SMC (or return the cached result of the identical seeded run); (result json, cache hit).

    The cache is used only for a seeded run with `cache_key_artifact` (the artifact's content hash,
    `kiln.runtime.cache.artifact_hash`); a run that timed out is not stored."""
    from kiln.runtime.cache import GenerationCache

    options.validate()
    cache = GenerationCache() if use_cache and options.seed is not None and cache_key_artifact else None
    key = None
    if cache is not None:
        opts = {k: v for k, v in asdict(options).items() if k not in ("seed", "timeout")}
        key = cache.key(cache_key_artifact, list(prompt_ids), {**opts, "constraints": constraints.cache_identity()},
                        int(options.seed))
        hit = cache.get(key)
        if hit is not None:
            return hit, True
    vocab = Vocab.from_engine(engine)
    proposal, critics = build_potentials(vocab, constraints, open_engine)
    result = smc(engine, list(prompt_ids), options.particles, proposal=proposal or None, critics=critics or None,
                 ess_threshold=options.ess_threshold, max_tokens=options.max_tokens, resampling=options.resampling,
                 temperature=options.temperature, seed=options.seed, timeout=options.timeout, on_step=on_step)
    out = _with_sample(result, population_rng(options.seed, 0))
    if cache is not None and key is not None and not result.timed_out:
        cache.put(key, json.loads(json.dumps(out)))
    return out, False


def steer_batch(engine: Engine, prompts: Sequence[Sequence[int]], options: SteerOptions, constraints: Constraints,
                on_step: Callable[[StepInfo], Any] | None = None,
                open_engine: EngineOpener | None = None) -> list[dict[str, Any]]:
    """`steer` for several tokenized prompts at once through `smc_batch` (one population of
    options.particles per prompt, one engine step for all; no generation cache). Population i and
    its posterior draw use `population_rng(seed, i)`, so prompt 0 is exactly `steer` of it alone.
    Potentials conditioned on the prompt (a `critic:`) are built once per prompt; the others are
    shared. Each dict has `result_json`'s keys plus `sample` and `cached` (False)."""
    options.validate()
    k = len(prompts)
    vocab = Vocab.from_engine(engine)
    first = build_potentials(vocab, constraints, open_engine)
    conditioned = any(p.prompt_conditioned for p in (*first[0], *first[1]))
    per_prompt = [first if i == 0 or not conditioned else build_potentials(vocab, constraints, open_engine)
                  for i in range(k)]
    results = smc_batch(engine, [list(p) for p in prompts], options.particles,
                        proposal=lambda i: per_prompt[i][0] or None, critics=lambda i: per_prompt[i][1] or None,
                        ess_threshold=options.ess_threshold, max_tokens=options.max_tokens,
                        resampling=options.resampling, temperature=options.temperature, seed=options.seed,
                        timeout=options.timeout, on_step=on_step)
    outs = []
    for i, result in enumerate(results):
        out = _with_sample(result, population_rng(options.seed, i))
        out["cached"] = False
        outs.append(out)
    return outs


def prompt_bound(prompt: str, chat: bool = False, system: str | None = None) -> int:
    """At most how many tokens `prompt` becomes (before tokenizing: its bytes, the system message's,
    the chat template's and a few specials), for sizing an engine."""
    return (len((system or "").encode()) + len(prompt.encode()) + (CHAT_TEMPLATE_SLACK if chat else 0)
            + SPECIALS_SLACK)


def steer_prompts(artifact: str | Path, prompts: str | Sequence[str], options: SteerOptions,
                  constraints: Constraints | None = None, *, chat: bool = False, system: str | None = None,
                  thinking: bool | None = None, threads: int | None = None, n_ctx: int | None = None, use_cache: bool = True,
                  on_step: Callable[[StepInfo], Any] | None = None,
                  memory_check: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """SMC steering of the artifact at `artifact` (a .gguf file or an ONNX directory) for one or
    several text prompts: what `kiln generate --particles N` does, as one call.

    * The engine is opened with the n_ctx and n_seq_max the run needs for its format (llama.cpp's
      one KV pool holds every prompt once plus every particle's tail; an ONNX row holds the longest
      prompt plus one tail); `n_ctx` overrides the context, `threads` the engine's threads.
    * `chat`: each prompt is a user message (after `system`, if given) in the artifact's chat template;
      `thinking` turns a reasoning template's thinking block on or off (None: the template's default).
    * One prompt runs through `steer`: a seeded run is cached on disk (`use_cache`) and `cached` says
      whether this result came from there. Several run together through `steer_batch` (never cached);
      prompt i's population and draw are seeded with `population_rng(seed, i)`.
    * `on_step` gets every SMC step's `StepInfo` (`.prompt` says which prompt's population).
    * `memory_check(n_ctx, n_seq_max)` runs before the engine is opened (a one-line KilnError when the
      machine cannot hold that context; kiln's CLI builds it from `kiln plan`'s cost model).

    Returns one dict per prompt, in order, as `kiln generate --json` prints it: `result_json`'s
    keys (log_ml, posterior, particles, ess_trace, ...) plus `sample` (one posterior draw's text, or
    None when no particle finished), `cached` and `prompt_tokens`. Options are validated, and the
    path checked, before any model is opened (one-line KilnErrors)."""
    options.validate()
    constraints = constraints if constraints is not None else Constraints()
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise KilnError("no prompt to steer")
    path = Path(artifact)
    fmt = require_format(path)
    sizes = fmt.engine_sizes([prompt_bound(p, chat, system) for p in texts], options.particles, options.max_tokens)
    if n_ctx:
        sizes["n_ctx"] = n_ctx
    if memory_check is not None:
        memory_check(sizes["n_ctx"], sizes["n_seq_max"])
    with fmt.open_engine(path, threads=threads, **sizes) as engine:
        ids = [prompt_ids(engine, p, chat=chat, system=system, thinking=thinking) for p in texts]
        if len(ids) == 1:
            from kiln.runtime.cache import artifact_hash

            out, hit = steer(engine, ids[0], options, constraints, on_step=on_step,
                             cache_key_artifact=artifact_hash(path) if use_cache else None, use_cache=use_cache)
            out["cached"] = hit
            outs = [out]
        else:
            outs = steer_batch(engine, ids, options, constraints, on_step=on_step)
    for out, tokens in zip(outs, ids):
        out["prompt_tokens"] = len(tokens)
    return outs
