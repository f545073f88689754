"""Sequential Monte Carlo steering over any `Engine` (llama.cpp, onnxruntime, transformers).

The target is a distribution over complete strings (tokens after the prompt, ended by EOS):

    π(x) ∝ γ(x) = p_τ(x EOS | prompt) · Π_k Φ_k(x),    |x| <= max_tokens

where p_τ is the model's next-token distribution at temperature τ (softmax(logits / τ), renormalized
at every position: with τ != 1 the target *is* the tempered model, not a corrected proposal),
EOS is the union of the engine's end-of-generation ids (p(EOS) = Σ over them), and Φ is the product
of every potential's `complete` score (proposal potentials and critics alike). Strings are capped at
`max_tokens` tokens: after that many tokens EOS is forced and weighted by its probability
u(EOS), so the target is γ restricted to |x| <= max_tokens (not truncated strings).

Algorithm (docs: reference/smc.md §2): N particles with log weights. Each step, for every live
particle the proposal is q(v) ∝ p_τ(v) · Π_{proposal} φ(v | x) over V ∪ {EOS}; the particle draws
v ~ q and its weight gains the local log normalizer L = log Σ_v p_τ(v) φ(v | x) (the mass the
masks allowed). Critics are twists: their prefix score is added after each token and removed
before the next one, and replaced by their `complete` score at EOS, so they change which particles
survive resampling but never the target. When ESS < ess_threshold · N the population is
resampled and every weight is reset to the average, so log Ẑ = logsumexp(log w) − log N at any
time, and Ẑ is an unbiased estimate of Z = Σ_x γ(x). Finished particles stay in the population
with their weights (and compete in resampling); their engine sequence is released.

Engine use: the prompt is prefilled once into sequence 0. Particles with the same token history
share one engine sequence (at the start all N share the prompt; after resampling duplicates share
their ancestor's), so a step runs ONE `engine.step` over the *distinct* live prefixes, which is
also what merging identical (ancestor, token) rows amounts to. When particles that shared a
prefix draw different tokens, the prefix is forked with one `engine.reorder(sources, free ids)`
(llama.cpp's unified cache relabels cells, onnxruntime copies rows); prefixes no particle holds any
more are dropped. Live prefixes always occupy sequence ids 0..m−1 (contiguous batch rows for
onnxruntime), so an engine needs n_seq_max >= N (no spare ids are ever needed for reorder).

Several prompts (`smc_batch`): one population per prompt, each the same state machine
(`_Population`: propose up to the engine call, then absorb the logits). Population i owns sequence
ids i·N .. i·N+N−1 (its live prefixes occupy i·N .. i·N+m_i−1); every step gathers all populations'
forks into one `reorder` and their live prefixes into ONE `engine.step`. `smc` is the one-prompt case.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.batching import SeqPlan, Task
from kiln.runtime.engine import Engine
from kiln.runtime.potentials.base import Potential

RESAMPLERS = ("systematic", "multinomial", "stratified", "residual")

_LIVE, _FINISHED, _DEAD = 0, 1, 2


# --- resampling -------------------------------------------------------------------------------
def _cdf(weights: np.ndarray) -> np.ndarray:
    """Normalized cumulative weights; entries after the last positive weight are exactly 1, so a
    uniform in [0, 1) never lands on a zero-weight tail through round-off."""
    w = np.asarray(weights, np.float64)
    total = w.sum()
    if not total > 0 or not np.isfinite(total):
        raise KilnError("resampling needs weights with a positive, finite sum")
    c = np.cumsum(w / total)
    c[np.flatnonzero(w > 0)[-1]:] = 1.0
    return c


def _pick(c: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(c, u, side="right"), len(c) - 1)


def multinomial(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n iid draws from the normalized weights."""
    return _pick(_cdf(weights), rng.random(n))


def stratified(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform in each of the n strata [j/n, (j+1)/n)."""
    return _pick(_cdf(weights), (np.arange(n) + rng.random(n)) / n)


def systematic(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform shared by the n strata: counts are floor(n·w) or ceil(n·w)."""
    return _pick(_cdf(weights), (np.arange(n) + rng.random()) / n)


def residual(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """floor(n·w_i) copies of each i, the rest drawn multinomially from the remainders."""
    w = np.asarray(weights, np.float64)
    nw = n * w / w.sum()
    counts = np.floor(nw).astype(np.int64)
    rest = n - int(counts.sum())
    if rest > 0:
        extra = multinomial(np.maximum(nw - counts, 0.0), rest, rng)
        counts += np.bincount(extra, minlength=len(w))
    return np.repeat(np.arange(len(w)), counts)


def resample(weights: np.ndarray, n: int, scheme: str, rng: np.random.Generator) -> np.ndarray:
    """n ancestor indices drawn from `weights` (non-negative, not necessarily normalized)."""
    fn = {"systematic": systematic, "multinomial": multinomial, "stratified": stratified,
          "residual": residual}.get(scheme)
    if fn is None:
        raise KilnError(f"unknown resampling scheme {scheme!r} (choose from {', '.join(RESAMPLERS)})")
    return fn(weights, n, rng)


def _logsumexp(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return -math.inf
    m = float(x.max())
    if m == -math.inf:
        return -math.inf
    return m + math.log(float(np.exp(x - m).sum()))


# --- results ----------------------------------------------------------------------------------
@dataclass
class StepInfo:
    """What `on_step` receives after every SMC step."""

    step: int
    live: int  # particles neither finished nor dead
    ess: float  # effective sample size before resampling
    resampled: bool
    elapsed: float  # seconds since the start of the run
    rows: int  # engine rows run this step (distinct live prefixes)
    prompt: int = 0  # smc_batch: which prompt's population this step belongs to


@dataclass
class SMCParticle:
    tokens: list[int]
    text: str  # the tokens' bytes decoded as UTF-8 (errors="replace")
    log_weight: float
    finished: bool  # ended by EOS (a complete string); False only after a timeout


@dataclass
class SMCResult:
    """The weighted particle set. Particles whose weight is 0 (a constraint ruled them out) are
    omitted; an empty list with log_ml = −inf means every particle died."""

    particles: list[SMCParticle]
    log_ml: float  # log Ẑ (nan for locally constrained decoding, which has no weights)
    n_particles: int
    ess_trace: list[float] = field(default_factory=list)
    resample_steps: list[int] = field(default_factory=list)
    steps: int = 0
    wall_time: float = 0.0
    timed_out: bool = False
    engine_rows: int = 0  # token rows the engine ran after the prompt (all steps)

    def _finished(self) -> tuple[list[SMCParticle], np.ndarray]:
        done = [p for p in self.particles if p.finished and p.log_weight > -math.inf]
        if not done:
            return [], np.zeros(0)
        lw = np.array([p.log_weight for p in done], np.float64)
        w = np.exp(lw - lw.max())
        return done, w / w.sum()

    @property
    def posterior(self) -> dict[str, float]:
        """Text -> probability over the finished particles (equal texts merged), normalized."""
        out: dict[str, float] = {}
        done, w = self._finished()
        for p, wi in zip(done, w):
            out[p.text] = out.get(p.text, 0.0) + float(wi)
        return out

    def sample(self, rng: np.random.Generator | int | None = None) -> SMCParticle:
        """One posterior draw: a finished particle chosen with probability proportional to its weight."""
        done, w = self._finished()
        if not done:
            raise KilnError("no finished particle to sample from (every particle died or the run timed out)")
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return done[int(_pick(_cdf(w), rng.random(1))[0])]


# --- the particle system ----------------------------------------------------------------------
class _Node:
    """A distinct token history: its engine sequence, logits row and potential states."""

    __slots__ = ("tokens", "token", "pstates", "cstates", "psi", "seq", "row")

    def __init__(self, tokens: tuple[int, ...], pstates: tuple | None, cstates: tuple, psi: float = 0.0):
        self.tokens = tokens
        self.token = tokens[-1] if tokens else -1
        self.pstates = pstates  # None until the node survives resampling (then advanced from its parent's)
        self.cstates = cstates
        self.psi = psi  # Σ critics' log prefix (the twist every particle on this node carries)
        self.seq = -1
        self.row = -1


def _as_list(potentials: Potential | Sequence[Potential] | None, what: str) -> list[Potential]:
    if potentials is None:
        return []
    items = [potentials] if isinstance(potentials, Potential) else list(potentials)
    for p in items:
        if not isinstance(p, Potential):
            raise KilnError(f"{what}: expected kiln.runtime.potentials Potential objects, got {type(p).__name__}")
    return items


def _check_engine(engine: Engine, n: int, prompt_lens: Sequence[int], max_tokens: int) -> None:
    """Capacity for len(prompt_lens) populations of n particles each (one-line errors that say what
    to open the engine with)."""
    k = len(prompt_lens)
    total = k * n
    if engine.n_seq_max < total:
        what = f"{n} particles" if k == 1 else f"{k} prompts x {n} particles"
        raise KilnError(f"{what} need an engine holding {total} sequences, this one holds {engine.n_seq_max}: "
                        f"open it with n_seq_max={total} or more (kiln.runtime.load(path, n_seq_max={total}))")
    longest = max(prompt_lens)
    need = longest + max_tokens
    if need > engine.n_ctx:
        what = f"a {longest}-token prompt" if k == 1 else f"the longest prompt ({longest} tokens)"
        raise KilnError(f"{what} plus max_tokens={max_tokens} needs a context of {need}, "
                        f"more than {engine.context_text()}: open it with n_ctx={need} or more")
    if getattr(engine, "shared_kv_pool", False):
        # unified KV cache (llama.cpp): each prompt once, then every particle's divergent tail
        prompts = sum(prompt_lens)
        pool = prompts + total * max_tokens
        if pool > engine.n_ctx:
            if k == 1:
                what = f"{n} particles x {max_tokens} tokens + {prompts} prompt tokens"
            else:
                what = f"{k} prompts x {n} particles x {max_tokens} tokens + {prompts} prompt tokens"
            raise KilnError(f"llama.cpp keeps all particles in one KV cache of n_ctx={engine.n_ctx} cells; "
                            f"{what} can need {pool}: "
                            f"open it with n_ctx={pool} or more (or lower n_particles / max_tokens"
                            + (")" if k == 1 else " / the number of prompts)"))


_BLOCK = 512  # sampling: pick a block of the vocabulary by its mass, then a token inside it


def _proposal_rows(z: np.ndarray, W: np.ndarray | None, eog: np.ndarray):
    """Per row of logits z [m, V] (already tempered) and proposal log weights W [m, V+1] or None:

    * E [m, nb·_BLOCK] float32: unnormalized proposal masses, EOS at column V, zeros after it
      (scaled by each row's own maximum, so the largest allowed entry is 1 and nothing that
      matters underflows);
    * blocks [m, nb] float64: sums of E over blocks of _BLOCK columns (inverse-CDF sampling);
    * L [m]: the local log normalizer log Σ_v p_τ(v) φ(v) (exactly 0 without potentials);
    * u_eos [m]: log p_τ(EOS) + log φ(EOS), the weight of a forced EOS.

    Vectorized over rows; two exp passes over [m, V] with potentials, one without."""
    m, V = z.shape
    nb = -(-(V + 1) // _BLOCK)
    E = np.empty((m, nb * _BLOCK), np.float32)
    E[:, V:] = 0.0
    body = E[:, :V]
    zmax = z.max(axis=1)
    np.subtract(z, zmax[:, None], out=body)
    np.exp(body, out=body)
    lse = zmax.astype(np.float64) + np.log(body.sum(axis=1).astype(np.float64))
    ze = z[:, eog].astype(np.float64)
    eos_logit = np.logaddexp.reduce(ze, axis=1)
    if W is None:
        body[:, eog] = 0.0
        E[:, V] = np.exp(eos_logit - zmax)
        L = np.zeros(m)
        u_eos = eos_logit - lse
    else:
        if W.shape != (m, V + 1):
            raise KilnError(f"a proposal potential returned next-token weights of shape {W.shape}, expected "
                            f"{(m, V + 1)} (vocab.size + 1 entries, EOS last): build it on Vocab.from_engine(engine)")
        np.add(z, W[:, :V], out=body)
        body[:, eog] = -np.inf
        t_eos = eos_logit + W[:, V].astype(np.float64)
        top = np.maximum(body.max(axis=1).astype(np.float64), t_eos)
        ok = top > -np.inf
        safe = np.where(ok, top, 0.0)
        np.subtract(body, safe[:, None].astype(np.float32), out=body)
        np.exp(body, out=body)
        E[:, V] = np.exp(t_eos - safe)
        E[~ok] = 0.0
        u_eos = t_eos - lse
    blocks = E.reshape(m, nb, _BLOCK).sum(axis=2).astype(np.float64)
    if W is not None:
        with np.errstate(divide="ignore"):
            L = np.where(ok, safe + np.log(blocks.sum(axis=1)) - lse, -np.inf)
    return E, blocks, L, u_eos


def _draw(E_row: np.ndarray, blocks_row: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k iid indices with probabilities E_row / sum(E_row): inverse CDF over block sums, then inside the
    block (the full float64 cumsum over 49k entries would cost 10x more)."""
    cb = np.cumsum(blocks_row)
    u = rng.random(k) * cb[-1]
    b = np.searchsorted(cb, u, side="right")
    last = int(np.flatnonzero(blocks_row > 0)[-1])
    b = np.minimum(b, last)  # u·total rounded up to the total
    out = np.empty(k, np.intp)
    for j in range(k):
        bj = int(b[j])
        rem = u[j] - (cb[bj - 1] if bj else 0.0)
        seg = E_row[bj * _BLOCK:(bj + 1) * _BLOCK]
        c = np.cumsum(seg, dtype=np.float64)
        i = int(np.searchsorted(c, rem, side="right"))
        if i >= _BLOCK:  # rounding between the block sum and this cumsum
            i = int(np.flatnonzero(seg > 0)[-1])
        out[j] = bj * _BLOCK + i
    return out


class _Population:
    """One prompt's particle system, advanced step by step by `_run` (so several prompts can share
    each `engine.step`). Its sequences are seq_base..seq_base+n−1.

    Per step: `active` (the loop head: stop when nothing is live, or on timeout), `propose(W, plan)`
    (everything before the engine call: draws, weights, resampling, forks; it returns the prefixes
    to decode, each `(node.token, node.seq)`), then `absorb(logits)` with those rows' logits."""

    def __init__(self, engine: Engine, index: int, prompt_ids: Sequence[int], n: int, props: list[Potential],
                 crits: list[Potential], ess_threshold: float, max_tokens: int, resampling: str,
                 temperature: float, rng: np.random.Generator, weighted: bool,
                 text_of: Callable[[Sequence[int]], str]) -> None:
        self.engine = engine
        self.index = index
        self.prompt = [int(t) for t in prompt_ids]
        self.n = n
        self.props = props
        self.crits = crits
        self.ess_threshold = ess_threshold
        self.max_tokens = max_tokens
        self.resampling = resampling
        self.temperature = temperature
        self.rng = rng
        self.weighted = weighted
        self.text_of = text_of
        if n < 1:
            raise KilnError(f"n_particles must be at least 1, got {n}")
        if not 0.0 <= ess_threshold <= 1.0:
            raise KilnError(f"ess_threshold must lie in [0, 1], got {ess_threshold}")
        if max_tokens < 0:
            raise KilnError(f"max_tokens must be >= 0, got {max_tokens}")
        if not temperature > 0:
            raise KilnError(f"temperature must be > 0, got {temperature}")
        if resampling not in RESAMPLERS:
            raise KilnError(f"unknown resampling scheme {resampling!r} (choose from {', '.join(RESAMPLERS)})")
        if not self.prompt:
            what = "smc" if index == 0 else f"prompt {index}"
            raise KilnError(f"{what} needs a non-empty prompt (at least a BOS token)")
        self.V = V = int(engine.vocab_size)
        self.eog = np.array(sorted(i for i in engine.eog_ids if 0 <= i < V), dtype=np.intp)
        if self.eog.size == 0:
            raise KilnError("the engine reports no end-of-generation token: no string can end")
        for p in (*props, *crits):
            if p.vocab.size != V:
                raise KilnError(f"{type(p).__name__} was built for a vocabulary of {p.vocab.size} tokens, the engine "
                                f"has {V}: build potentials on Vocab.from_engine(engine)")
        self.result = SMCResult([], -math.inf, n)
        self.done = False
        self.kids: list[_Node] = []

    def start(self, seq_base: int, t0: float, reserve: int = 0) -> None:
        """Prefill the prompt into sequence `seq_base`; every particle starts on it."""
        self.base = seq_base
        self.t0 = t0
        props, crits = self.props, self.crits
        self.logits = self.engine.prefill_prompt(self.prompt, seq=seq_base, reserve=reserve)[None, :]
        pstates = tuple(p.initial_state() for p in props)
        cstates = tuple(c.initial_state() for c in crits)
        psi0 = float(sum(c.prefix(s) for c, s in zip(crits, cstates)))
        lw0 = float(sum(p.prefix(s) for p, s in zip(props, pstates))) + psi0
        root = _Node((), pstates, cstates, psi0)
        root.seq, root.row = seq_base, 0
        self.nodes: list[_Node] = [root]
        self.pnode: list[_Node] = [root] * self.n
        self.status = np.full(self.n, _LIVE, np.int8)
        self.logw = np.full(self.n, lw0 if self.weighted else 0.0)
        if lw0 == -math.inf:
            self.status[:] = _DEAD
        self.step = 0

    def active(self, timed_out: bool) -> bool:
        """The loop head: False once this population has stopped (its result is then final)."""
        if self.done:
            return False
        if not np.any(self.status == _LIVE) or not np.any(self.logw > -np.inf):
            self._finish()
            return False
        if timed_out:
            self.result.timed_out = True
            self._finish()
            return False
        return True

    def propose(self, W: np.ndarray | None, plan: SeqPlan) -> list[_Node]:
        """One step up to the engine call: draw every live particle's token, update weights, resample
        if needed, and plan the sequence forks (into `plan`). Returns the prefixes to decode next."""
        n, V, rng, weighted = self.n, self.V, self.rng, self.weighted
        crits, props = self.crits, self.props
        nodes, pnode, status, logw = self.nodes, self.pnode, self.status, self.logw
        result = self.result
        live = np.flatnonzero(status == _LIVE)
        self.step += 1
        step = self.step
        m = len(nodes)
        row_of = np.fromiter((pnode[i].row for i in live), np.intp, live.size)
        forced = np.fromiter((len(nd.tokens) >= self.max_tokens for nd in nodes), bool, m)
        z = self.logits if self.temperature == 1.0 else self.logits / np.float32(self.temperature)
        E, blocks, L, u_eos = _proposal_rows(z, W, self.eog)
        # Draw every live particle's token from its prefix's proposal (index V = EOS).
        tok = np.full(live.size, V, np.intp)
        order = np.argsort(row_of, kind="stable")
        bounds = np.searchsorted(row_of[order], np.arange(m + 1))
        for r in range(m):
            members = order[bounds[r]:bounds[r + 1]]
            if members.size and not forced[r] and L[r] > -np.inf:
                tok[members] = _draw(E[r], blocks[r], members.size, rng)
        inc = np.where(forced[row_of], u_eos[row_of], L[row_of])
        dead = inc == -np.inf
        if weighted:
            logw[live] += inc
        # EOS: finish (critics: untwist, then their complete score).
        is_eos = (tok == V) & ~dead
        if is_eos.any():
            ends = live[is_eos]
            if weighted and crits:
                rows_e = np.unique(row_of[is_eos])
                comp = np.zeros(m)
                for k, c in enumerate(crits):
                    comp[rows_e] += c.batch_complete([nodes[r].cstates[k] for r in rows_e])
                psi = np.fromiter((nd.psi for nd in nodes), np.float64, m)
                logw[ends] += comp[row_of[is_eos]] - psi[row_of[is_eos]]
            status[ends] = _FINISHED
        # Tokens: one child node per distinct (prefix, token); critics re-twist.
        grow = np.flatnonzero((tok < V) & ~dead)
        children: list[_Node] = []
        child_of = np.empty(grow.size, np.intp)
        index: dict[tuple[int, int], int] = {}
        for j, g in enumerate(grow):
            key = (int(row_of[g]), int(tok[g]))
            ci = index.get(key)
            if ci is None:
                parent = nodes[key[0]]
                t = key[1]
                child = _Node(parent.tokens + (t,), None,
                              tuple(c.advance(s, t) for c, s in zip(crits, parent.cstates)))
                child.row = key[0]  # parent row until the engine step
                ci = index[key] = len(children)
                children.append(child)
            child_of[j] = ci
        if crits and children:
            psi_c = np.zeros(len(children))
            for k, c in enumerate(crits):
                psi_c += c.batch_prefix([ch.cstates[k] for ch in children])
            for ch, v in zip(children, psi_c):
                ch.psi = float(v)
            if weighted:
                parent_psi = np.fromiter((nodes[ch.row].psi for ch in children), np.float64, len(children))
                logw[live[grow]] += (psi_c - parent_psi)[child_of]
            killed = psi_c[child_of] == -np.inf
            logw[live[grow[killed]]] = -np.inf
            dead[grow[killed]] = True
        for j, g in enumerate(grow):
            pnode[live[g]] = children[child_of[j]]
        if dead.any():
            status[live[dead]] = _DEAD
            logw[live[dead]] = -np.inf
        # Weights: ESS, resampling (finished particles take part).
        total = _logsumexp(logw)
        ess = 0.0 if total == -math.inf else float(1.0 / np.sum(np.exp(2.0 * (logw - total))))
        result.ess_trace.append(ess)
        resampled = False
        if (weighted and total > -math.inf and self.ess_threshold > 0 and ess < self.ess_threshold * n
                and np.any(status == _LIVE)):
            anc = resample(np.exp(logw - total), n, self.resampling, rng)
            self.status = status = status[anc]
            self.pnode = pnode = [pnode[a] for a in anc]
            self.logw = np.full(n, total - math.log(n))
            result.resample_steps.append(step)
            resampled = True
        # Engine: fork shared prefixes that drew different tokens, drop the ones nobody holds.
        live = np.flatnonzero(status == _LIVE)
        kids: list[_Node] = []
        seen: set[int] = set()
        for i in live:
            nd = pnode[i]
            if id(nd) not in seen:
                seen.add(id(nd))
                kids.append(nd)
        for kid in kids:  # proposal states only for prefixes that go on
            parent = nodes[kid.row]
            kid.pstates = tuple(p.advance(s, kid.token) for p, s in zip(props, parent.pstates))
        self.nodes = _assign_sequences(plan, nodes, kids, self.base)
        self.kids = kids
        self._info = (step, int(live.size), ess, resampled)
        return kids

    def absorb(self, logits: np.ndarray | None, on_step: Callable[[StepInfo], Any] | None) -> None:
        """The engine's logits for the prefixes `propose` returned (in that order)."""
        kids = self.kids
        if kids:
            self.logits = logits
            self.result.engine_rows += len(kids)
        for r, nd in enumerate(kids):
            nd.row = r
        if on_step is not None:
            step, live, ess, resampled = self._info
            on_step(StepInfo(step, live, ess, resampled, time.perf_counter() - self.t0, len(kids), self.index))

    def _finish(self) -> None:
        result, logw, status, pnode, n = self.result, self.logw, self.status, self.pnode, self.n
        result.steps = self.step
        if self.weighted:
            result.log_ml = _logsumexp(logw) - math.log(n)
        else:
            result.log_ml = math.nan
        if np.any(logw > -np.inf):
            result.particles = [SMCParticle(list(pnode[i].tokens), self.text_of(pnode[i].tokens), float(logw[i]),
                                            bool(status[i] == _FINISHED))
                                for i in range(n) if logw[i] > -np.inf and status[i] != _DEAD]
        else:
            result.log_ml = -math.inf
        result.wall_time = time.perf_counter() - self.t0
        self.done = True
        self.kids = []


def _resolve_potentials(spec, i: int, what: str) -> list[Potential]:
    """`proposal` / `critics` of smc_batch: potentials shared by every prompt, or `i -> potentials`."""
    if callable(spec) and not isinstance(spec, Potential):
        return _as_list(spec(i), f"{what} (built for prompt {i})")
    return _as_list(spec, what)


def _check_shared(pops: list[_Population]) -> None:
    """A prompt-conditioned potential (set_prompt changes its scores) cannot serve two prompts at once."""
    if len(pops) < 2:
        return
    owner: dict[int, int] = {}
    for pop in pops:
        for p in (*pop.props, *pop.crits):
            for part in p.prompt_conditioned_parts():
                first = owner.setdefault(id(part), pop.index)
                if first != pop.index:
                    raise KilnError(f"{type(part).__name__} conditions on the prompt (set_prompt), so one object "
                                    f"cannot serve prompts {first} and {pop.index}: pass a callable "
                                    "(i -> potentials) that builds each prompt's own")


def population_rng(seed: int | None, i: int) -> np.random.Generator:
    """Population i's random stream: `seed` itself for the first (so one prompt in `smc_batch` is
    exactly `smc`), `[seed, i]` for the others (independent streams from one seed), fresh entropy
    when `seed` is None. A batch's posterior draws use the same streams, freshly seeded."""
    return np.random.default_rng(seed if i == 0 or seed is None else [int(seed), i])


def _text_reader(engine: Engine) -> Callable[[Sequence[int]], str]:
    """Tokens -> text, with each token's bytes fetched from the engine once."""
    pieces: dict[int, bytes] = {}

    def text_of(tokens: Sequence[int]) -> str:
        parts = []
        for t in tokens:
            b = pieces.get(t)
            if b is None:
                b = pieces[t] = engine.token_bytes(t)
            parts.append(b)
        return b"".join(parts).decode("utf-8", errors="replace")

    return text_of


def _run(engine: Engine, prompts: Sequence[Sequence[int]], n: int, proposal, critics, ess_threshold: float,
         max_tokens: int, resampling: str, temperature: float, seed, timeout: float | None,
         on_step: Callable[[StepInfo], Any] | None, weighted: bool, overlap: bool = True) -> list[SMCResult]:
    """SMC over one population per prompt; every step runs ONE engine.step over all populations'
    live prefixes (population i holds sequences i·n .. i·n + n − 1)."""
    t0 = time.perf_counter()
    text_of = _text_reader(engine)
    pops: list[_Population] = []
    for i, prompt in enumerate(prompts):
        props = _resolve_potentials(proposal, i, "proposal")
        crits = _resolve_potentials(critics, i, "critics")
        rng = population_rng(seed, i)
        pops.append(_Population(engine, i, prompt, n, props, crits, ess_threshold, max_tokens, resampling,
                                temperature, rng, weighted, text_of))
    if not pops:
        return []
    _check_engine(engine, n, [len(p.prompt) for p in pops], max_tokens)
    _check_shared(pops)
    for pop in pops:
        for p in (*pop.props, *pop.crits):
            p.set_prompt(pop.prompt)  # prompt-conditioned potentials (a reference critic) need it
    pool = (ThreadPoolExecutor(1, thread_name_prefix="kiln-potentials")
            if overlap and any(pop.props for pop in pops) else None)
    pending = None  # (populations, future of their next-step proposal weights)
    engine.reset()
    try:
        for i, pop in enumerate(pops):
            # cells still needed after this prompt: later prompts and every particle's tail (an engine
            # with a prompt cache evicts cached prompts to keep them free)
            reserve = sum(len(p.prompt) for p in pops[i + 1:]) + len(pops) * n * max_tokens
            pop.start(i * n, t0, reserve)
        while True:
            timed_out = timeout is not None and time.perf_counter() - t0 > timeout
            active = [pop for pop in pops if pop.active(timed_out)]
            if not active:
                break
            weights: dict[int, np.ndarray | None] = {}
            if pending is not None:
                weights = dict(zip((id(p) for p in pending[0]), pending[1].result()))
                pending = None
            missing = [pop for pop in active if id(pop) not in weights]
            if missing:
                weights.update(zip((id(p) for p in missing), _batch_weights(missing, [p.nodes for p in missing])))
            plan = SeqPlan()
            kids = [pop.propose(weights[id(pop)], plan) for pop in active]
            plan.apply(engine)
            stepping = [pop for pop, k in zip(active, kids) if k]
            if pool is not None and stepping:
                # next step's masks need only these prefixes: compute them while the engine decodes
                pending = (stepping, pool.submit(_batch_weights, stepping, [pop.kids for pop in stepping]))
            logits = None
            if stepping:
                rows = [nd for k in kids for nd in k]
                logits = engine.step([nd.token for nd in rows], [nd.seq for nd in rows])
            at = 0
            for pop, k in zip(active, kids):
                pop.absorb(None if logits is None else logits[at:at + len(k)], on_step)
                at += len(k)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        engine.reset()
    return [pop.result for pop in pops]


def _batch_weights(pops: list[_Population], node_lists: list[list[_Node]]) -> list[np.ndarray | None]:
    """Next-token proposal weights for several populations' prefixes: populations that share their
    proposal potentials (the same objects) are scored in one batched call."""
    out: list[np.ndarray | None] = [None] * len(pops)
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, pop in enumerate(pops):
        if pop.props:
            groups.setdefault(tuple(id(p) for p in pop.props), []).append(j)
    for members in groups.values():
        props = pops[members[0]].props
        if len(members) == 1:
            out[members[0]] = _proposal_weights(props, node_lists[members[0]])
            continue
        W = _proposal_weights(props, [nd for j in members for nd in node_lists[j]])
        at = 0
        for j in members:
            k = len(node_lists[j])
            out[j] = W[at:at + k]
            at += k
    return out


def _proposal_weights(props: list[Potential], nodes: list[_Node]) -> np.ndarray | None:
    """Σ_k logw_next of the proposal potentials for every prefix ([len(nodes), V+1]), or None."""
    W = None
    for k, p in enumerate(props):
        rows = p.batch_logw_next([nd.pstates[k] for nd in nodes])
        if rows is None:
            raise KilnError(f"{type(p).__name__} has no logw_next, so it cannot be part of the proposal: "
                            "pass it as a critic")
        W = np.asarray(rows, np.float32) if W is None else W + rows
    return W


def _assign_sequences(plan: SeqPlan, parents: list[_Node], kids: list[_Node], base: int = 0) -> list[_Node]:
    """Give each surviving child a sequence holding its parent's history (the child's own token is
    fed by the next `engine.step`), using ids base..base+len(kids)-1; parents nobody continues are
    dropped. Children's `row` still names their parent's row here. The engine calls go into `plan`."""
    m = len(kids)
    by_parent: dict[int, list[_Node]] = {}
    for kid in kids:
        by_parent.setdefault(kid.row, []).append(kid)
    for r, nd in enumerate(parents):
        if r not in by_parent:
            plan.drop_first.append(nd.seq)
    used: set[int] = set()
    need: list[tuple[_Node, int]] = []
    moved: list[int] = []
    for r, group in by_parent.items():
        s = parents[r].seq
        if base <= s < base + m:
            group[0].seq = s
            used.add(s)
            need.extend((kid, s) for kid in group[1:])
        else:
            moved.append(s)
            need.extend((kid, s) for kid in group)
    if need:
        free = iter(i for i in range(base, base + m) if i not in used)
        for kid, s in need:
            kid.seq = next(free)
            plan.src.append(s)
            plan.dst.append(kid.seq)
    plan.drop_after.extend(moved)
    return kids


class SMCTask(Task):
    """One SMC population (or, `weighted=False`, the mask-only baseline) as a continuous-batching task
    (kiln.runtime.batching): `ContinuousBatch` runs it beside other requests' tasks, every step one
    `engine.step` for all. Alone, it draws exactly what `smc` (or `locally_constrained`) draws with the
    same arguments and seed: it is the same population machinery, stepped from outside. `result` is
    final once the batch reports the task finished.

    Arguments as `smc`; `timeout` counts from `start`. KV budget (`cells`): the prompt once plus
    `n_particles × max_tokens` cells, what llama.cpp's single pool needs at most."""

    def __init__(self, engine: Engine, prompt_ids: Sequence[int], n_particles: int = 16, *,
                 proposal: Potential | Sequence[Potential] | None = None,
                 critics: Potential | Sequence[Potential] | None = None,
                 ess_threshold: float = 0.5, max_tokens: int = 64, resampling: str = "systematic",
                 temperature: float = 1.0, seed: int | None = None, timeout: float | None = None,
                 on_step: Callable[[StepInfo], Any] | None = None, weighted: bool = True) -> None:
        props, crits = _as_list(proposal, "proposal"), _as_list(critics, "critics")
        text_of = _text_reader(engine)  # a closure, not a bound method: no task <-> population reference cycle
        self.pop = _Population(engine, 0, prompt_ids, int(n_particles), props, crits, float(ess_threshold),
                               int(max_tokens), resampling, float(temperature), population_rng(seed, 0), weighted,
                               text_of)
        self.engine = engine
        self.prompt = self.pop.prompt
        self.rows = self.pop.n
        self.cells = len(self.prompt) + self.pop.n * self.pop.max_tokens
        self.timeout = timeout
        self.on_step = on_step
        self._pending = None
        for p in (*props, *crits):
            p.set_prompt(self.prompt)

    @property
    def result(self) -> SMCResult:
        return self.pop.result

    def start(self, engine: Engine, base: int, reserve: int) -> None:
        self.pop.start(base, time.perf_counter(), reserve)

    def propose(self, plan: SeqPlan) -> list[tuple[int, int]] | None:
        pop = self.pop
        timed_out = self.timeout is not None and time.perf_counter() - pop.t0 > self.timeout
        if not pop.active(timed_out):
            return None
        if self._pending is not None:
            W = self._pending.result()[0]
            self._pending = None
        else:
            W = _batch_weights([pop], [pop.nodes])[0]
        return [(nd.token, nd.seq) for nd in pop.propose(W, plan)]

    def prefetch(self, pool: ThreadPoolExecutor) -> None:
        if self.pop.props and self.pop.kids:
            self._pending = pool.submit(_batch_weights, [self.pop], [self.pop.kids])

    def absorb(self, logits: np.ndarray | None) -> None:
        self.pop.absorb(logits, self.on_step)


# --- public API -------------------------------------------------------------------------------
def smc(engine: Engine, prompt_ids: Sequence[int], n_particles: int = 16, *,
        proposal: Potential | Sequence[Potential] | None = None,
        critics: Potential | Sequence[Potential] | None = None,
        ess_threshold: float = 0.5, max_tokens: int = 64, resampling: str = "systematic",
        temperature: float = 1.0, seed: int | None = None, timeout: float | None = None,
        on_step: Callable[[StepInfo], Any] | None = None, overlap_potentials: bool = True) -> SMCResult:
    """Sequential Monte Carlo steering of `engine` from `prompt_ids` (module docstring: the target).

    * `proposal`: potentials multiplied into the next-token distribution (masks, token boosts); they
      must implement `logw_next`. Their prefix and complete scores are part of the target.
    * `critics`: potentials used as twists (prefix after every token, complete at EOS).
    * Target: p_τ(x EOS) · Π Φ(x) over strings of at most `max_tokens` tokens, where p_τ is the
      tempered, locally renormalized model softmax(logits / temperature); EOS is forced after
      `max_tokens` tokens with weight u(EOS).
    * `ess_threshold`: resample when ESS < ess_threshold · N (0: never, importance sampling;
      1: every step). `resampling`: systematic | multinomial | stratified | residual.
    * `timeout` (seconds): stop between steps and return the current weighted set with
      `timed_out=True`; unfinished particles are returned with finished=False and left out of the
      posterior, and log_ml then estimates the normalizer of the partial (twisted) target only.
    * `on_step`: called with a `StepInfo` after every step.
    * `overlap_potentials`: compute the proposal potentials' masks for step t+1 on a worker
      thread while the engine decodes step t (both engines release the GIL in their forward
      pass); the result is identical either way.

    The engine is reset first and after (smc owns all its sequences while it runs) and needs
    n_seq_max >= n_particles and n_ctx >= len(prompt) + max_tokens (llama.cpp's single KV pool:
    len(prompt) + n_particles · max_tokens). Several prompts at once: `smc_batch`.
    """
    return _run(engine, [prompt_ids], int(n_particles), _as_list(proposal, "proposal"),
                _as_list(critics, "critics"), float(ess_threshold), int(max_tokens), resampling,
                float(temperature), seed, timeout, on_step, weighted=True, overlap=overlap_potentials)[0]


PotentialsFor = Callable[[int], "Potential | Sequence[Potential] | None"]


def smc_batch(engine: Engine, prompts: Sequence[Sequence[int]], n_particles: int = 16, *,
              proposal: Potential | Sequence[Potential] | PotentialsFor | None = None,
              critics: Potential | Sequence[Potential] | PotentialsFor | None = None,
              ess_threshold: float = 0.5, max_tokens: int = 64, resampling: str = "systematic",
              temperature: float = 1.0, seed: int | None = None, timeout: float | None = None,
              on_step: Callable[[StepInfo], Any] | None = None,
              overlap_potentials: bool = True) -> list[SMCResult]:
    """`smc` for several prompts at once: one population of `n_particles` per prompt, advanced
    together so that every step runs ONE `engine.step` over the live prefixes of all populations
    (a fuller batch: the per-decode overhead is paid once per step, not once per prompt). Returns
    one `SMCResult` per prompt, in order; each population is exactly the `smc` run of its prompt
    with its own random stream (population 0: `seed`, population i > 0: `np.random.default_rng([seed, i])`;
    fresh entropy when seed is None), so `smc_batch(e, [p], seed=s)[0]` equals `smc(e, p, seed=s)`
    on a batch-invariant engine.

    * `proposal`, `critics`: potentials shared by every prompt (their states are per population
      anyway), or a callable `i -> potentials` building prompt i's own. Prompt-conditioned potentials
      (a `ReferenceCritic` without its own prompt: `set_prompt` changes its scores) need the callable
      form; sharing one object between prompts is refused with a KilnError.
    * `timeout` is global: every population still running stops at the same step boundary.
    * `on_step` gets one `StepInfo` per population per step (`StepInfo.prompt` says which).
    * `overlap_potentials`: all populations' next-step proposal weights are computed in one job on
      the worker thread while the engine decodes (populations sharing the same proposal objects in
      one batched `batch_logw_next` call).
    * Each result has its own steps, wall_time (until that population finished), engine_rows, ESS trace.

    The engine needs n_seq_max >= len(prompts) · n_particles (population i holds sequences
    i·n_particles ..), n_ctx >= the longest prompt + max_tokens, and for llama.cpp's single KV pool
    n_ctx >= sum of the prompt lengths + len(prompts) · n_particles · max_tokens.
    """
    prompts = None if isinstance(prompts, (str, bytes)) else list(prompts)
    if prompts is None or any(isinstance(p, (int, np.integer, str, bytes)) for p in prompts):
        raise KilnError("smc_batch takes a list of prompts, each a list of token ids (tokenize text first; "
                        "for one prompt: smc, or smc_batch(engine, [prompt_ids]))")
    return _run(engine, prompts, int(n_particles), proposal, critics, float(ess_threshold), int(max_tokens),
                resampling, float(temperature), seed, timeout, on_step, weighted=True, overlap=overlap_potentials)


def locally_constrained(engine: Engine, prompt_ids: Sequence[int],
                        proposal: Potential | Sequence[Potential] | None = None, n_samples: int = 16, *,
                        max_tokens: int = 64, temperature: float = 1.0, seed: int | None = None,
                        timeout: float | None = None,
                        on_step: Callable[[StepInfo], Any] | None = None) -> SMCResult:
    """The mask-only baseline (what llama.cpp grammars, Outlines, llguidance decoding do):
    `n_samples` independent draws, each token from the model's distribution multiplied by the
    proposal potentials and renormalized at every step; no weights, no resampling. After
    `max_tokens` tokens EOS is taken if the proposal allows it, else the sample fails. Every
    returned particle has log_weight 0, so `posterior` is the empirical law of the samples,
    which is *not* the target p·Φ in general; log_ml is nan. Samples run batched like SMC particles."""
    return _run(engine, [prompt_ids], int(n_samples), _as_list(proposal, "proposal"), None, 0.0, int(max_tokens),
                "multinomial", float(temperature), seed, timeout, on_step, weighted=False)[0]


def total_variation(a: dict[str, float], b: dict[str, float]) -> float:
    """TV distance between two laws over strings (missing keys have probability 0)."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def pool_posteriors(posteriors: Sequence[dict[str, float]], log_ml: Sequence[float] | None = None) -> dict[str, float]:
    """Several runs' posteriors as one law: a plain average, or weighted by Ẑ = exp(log_ml) (runs
    without a finite log_ml get weight 0), which stays unbiased for the target at any N."""
    if log_ml is None:
        w = np.full(len(posteriors), 1.0 / max(len(posteriors), 1))
    else:
        lz = np.array([np.nan if v is None else v for v in log_ml], np.float64)
        ok = np.isfinite(lz)
        w = np.where(ok, np.exp(lz - (lz[ok].max() if ok.any() else 0.0)), 0.0)
        w = w / w.sum() if w.sum() > 0 else w
    out: dict[str, float] = {}
    for post, wi in zip(posteriors, w):
        for k, v in post.items():
            out[k] = out.get(k, 0.0) + float(v * wi)
    return out


__all__ = ["RESAMPLERS", "SMCParticle", "SMCResult", "SMCTask", "StepInfo", "locally_constrained", "multinomial",
           "pool_posteriors", "resample", "residual", "smc", "smc_batch", "stratified", "systematic",
           "total_variation"]
