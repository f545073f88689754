"""Steered generation as the CLI and apps use it: an artifact, a prompt, constraints, N particles.

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
from kiln.runtime.engine import Engine
from kiln.runtime.potentials.base import Potential, Vocab
from kiln.runtime.smc import SMCResult, StepInfo, smc


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


def build_potentials(vocab: Vocab, constraints: Constraints) -> tuple[list[Potential], list[Potential]]:
    """(proposal, critics): Boolean potentials that can mask go into the proposal, the rest are twists."""
    from kiln.runtime.potentials import from_spec

    proposal: list[Potential] = []
    critics: list[Potential] = []
    for spec in constraints.all_specs():
        p = from_spec(vocab, spec)
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


def steer(engine: Engine, prompt_ids: Sequence[int], options: SteerOptions, constraints: Constraints,
          on_step: Callable[[StepInfo], Any] | None = None, cache_key_artifact: str | None = None,
          use_cache: bool = True) -> tuple[dict[str, Any], bool]:
    """Run SMC (or return the cached result of the identical seeded run); (result json, cache hit)."""
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
    proposal, critics = build_potentials(vocab, constraints)
    result = smc(engine, list(prompt_ids), options.particles, proposal=proposal or None, critics=critics or None,
                 ess_threshold=options.ess_threshold, max_tokens=options.max_tokens, resampling=options.resampling,
                 temperature=options.temperature, seed=options.seed, timeout=options.timeout, on_step=on_step)
    out = result_json(result)
    if result.particles and any(p.finished for p in result.particles):
        out["sample"] = result.sample(options.seed).text
    else:
        out["sample"] = None
    if cache is not None and key is not None and not result.timed_out:
        cache.put(key, json.loads(json.dumps(out)))
    return out, False


def engine_sizes(prompt_bytes: int, options: SteerOptions, artifact: Path) -> dict[str, int]:
    """n_ctx and n_seq_max an engine needs for this run (before the prompt is tokenized: a
    prompt never has more tokens than bytes plus a few specials)."""
    prompt = prompt_bytes + 16
    if artifact.suffix == ".gguf":  # one unified KV pool: the prompt once, then N divergent tails
        return {"n_ctx": prompt + options.particles * options.max_tokens, "n_seq_max": options.particles}
    return {"n_ctx": prompt + options.max_tokens, "n_seq_max": options.particles}
