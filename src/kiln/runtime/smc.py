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


def _check_engine(engine: Engine, n: int, n_prompt: int, max_tokens: int) -> None:
    if engine.n_seq_max < n:
        raise KilnError(f"{n} particles need an engine holding {n} sequences, this one holds {engine.n_seq_max}: "
                        f"open it with n_seq_max={n} or more (kiln.runtime.load(path, n_seq_max={n}))")
    need = n_prompt + max_tokens
    if need > engine.n_ctx:
        raise KilnError(f"a {n_prompt}-token prompt plus max_tokens={max_tokens} needs a context of {need}, "
                        f"the engine has {engine.n_ctx}: open it with n_ctx={need} or more")
    try:
        from kiln.runtime.llamacpp import LlamaCppEngine
    except ImportError:  # pragma: no cover - the module itself imports nothing optional
        return
    if isinstance(engine, LlamaCppEngine):
        pool = n_prompt + n * max_tokens  # unified KV cache: the prompt once, then N divergent tails
        if pool > engine.n_ctx:
            raise KilnError(f"llama.cpp keeps all particles in one KV cache of n_ctx={engine.n_ctx} cells; "
                            f"{n} particles x {max_tokens} tokens + {n_prompt} prompt tokens can need {pool}: "
                            f"open it with n_ctx={pool} or more (or lower n_particles / max_tokens)")


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


def _run(engine: Engine, prompt_ids: Sequence[int], n: int, proposal, critics, ess_threshold: float,
         max_tokens: int, resampling: str, temperature: float, seed: int | None, timeout: float | None,
         on_step: Callable[[StepInfo], Any] | None, weighted: bool, overlap: bool = True) -> SMCResult:
    t0 = time.perf_counter()
    prompt = [int(t) for t in prompt_ids]
    props = _as_list(proposal, "proposal")
    crits = _as_list(critics, "critics")
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
    if not prompt:
        raise KilnError("smc needs a non-empty prompt (at least a BOS token)")
    V = int(engine.vocab_size)
    eog = np.array(sorted(i for i in engine.eog_ids if 0 <= i < V), dtype=np.intp)
    if eog.size == 0:
        raise KilnError("the engine reports no end-of-generation token: no string can end")
    for p in (*props, *crits):
        if p.vocab.size != V:
            raise KilnError(f"{type(p).__name__} was built for a vocabulary of {p.vocab.size} tokens, the engine "
                            f"has {V}: build potentials on Vocab.from_engine(engine)")
    _check_engine(engine, n, len(prompt), max_tokens)
    for p in (*props, *crits):
        p.set_prompt(prompt)  # prompt-conditioned potentials (a reference critic) need it
    rng = np.random.default_rng(seed)
    piece_cache: dict[int, bytes] = {}

    def text_of(tokens: Sequence[int]) -> str:
        parts = []
        for t in tokens:
            b = piece_cache.get(t)
            if b is None:
                b = piece_cache[t] = engine.token_bytes(t)
            parts.append(b)
        return b"".join(parts).decode("utf-8", errors="replace")

    result = SMCResult([], -math.inf, n)
    pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-potentials") if props and overlap else None
    pending = None
    engine.reset()
    try:
        logits = engine.prefill_prompt(prompt, seq=0)[None, :]
        pstates = tuple(p.initial_state() for p in props)
        cstates = tuple(c.initial_state() for c in crits)
        psi0 = float(sum(c.prefix(s) for c, s in zip(crits, cstates)))
        lw0 = float(sum(p.prefix(s) for p, s in zip(props, pstates))) + psi0
        root = _Node((), pstates, cstates, psi0)
        root.seq, root.row = 0, 0
        nodes: list[_Node] = [root]
        pnode: list[_Node] = [root] * n
        status = np.full(n, _LIVE, np.int8)
        logw = np.full(n, lw0 if weighted else 0.0)
        if lw0 == -math.inf:
            status[:] = _DEAD
        step = 0
        while True:
            live = np.flatnonzero(status == _LIVE)
            if live.size == 0 or not np.any(logw > -np.inf):
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                result.timed_out = True
                break
            step += 1
            m = len(nodes)
            row_of = np.fromiter((pnode[i].row for i in live), np.intp, live.size)
            forced = np.fromiter((len(nd.tokens) >= max_tokens for nd in nodes), bool, m)
            W = pending.result() if pending is not None else _proposal_weights(props, nodes)
            pending = None
            z = logits if temperature == 1.0 else logits / np.float32(temperature)
            E, blocks, L, u_eos = _proposal_rows(z, W, eog)
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
            if (weighted and total > -math.inf and ess_threshold > 0 and ess < ess_threshold * n
                    and np.any(status == _LIVE)):
                anc = resample(np.exp(logw - total), n, resampling, rng)
                status = status[anc]
                pnode = [pnode[a] for a in anc]
                logw = np.full(n, total - math.log(n))
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
            nodes = _assign_sequences(engine, nodes, kids)
            if pool is not None and kids:
                # next step's masks need only these prefixes: compute them while the engine decodes
                pending = pool.submit(_proposal_weights, props, kids)
            if kids:
                logits = engine.step([nd.token for nd in kids], [nd.seq for nd in kids])
                result.engine_rows += len(kids)
            for r, nd in enumerate(kids):
                nd.row = r
            if on_step is not None:
                on_step(StepInfo(step, int(live.size), ess, resampled, time.perf_counter() - t0, len(kids)))
        result.steps = step
        if weighted:
            result.log_ml = _logsumexp(logw) - math.log(n)
        else:
            result.log_ml = math.nan
        if np.any(logw > -np.inf):
            result.particles = [SMCParticle(list(pnode[i].tokens), text_of(pnode[i].tokens), float(logw[i]),
                                            bool(status[i] == _FINISHED))
                                for i in range(n) if logw[i] > -np.inf and status[i] != _DEAD]
        else:
            result.log_ml = -math.inf
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        engine.reset()
    result.wall_time = time.perf_counter() - t0
    return result


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


def _assign_sequences(engine: Engine, parents: list[_Node], kids: list[_Node]) -> list[_Node]:
    """Give each surviving child a sequence holding its parent's history (the child's own token is
    fed by the next `engine.step`), using ids 0..len(kids)-1; parents nobody continues are dropped.
    Children's `row` still names their parent's row here."""
    m = len(kids)
    by_parent: dict[int, list[_Node]] = {}
    for kid in kids:
        by_parent.setdefault(kid.row, []).append(kid)
    for r, nd in enumerate(parents):
        if r not in by_parent:
            engine.drop_seq(nd.seq)
    used: set[int] = set()
    need: list[tuple[_Node, int]] = []
    moved: list[int] = []
    for r, group in by_parent.items():
        s = parents[r].seq
        if s < m:
            group[0].seq = s
            used.add(s)
            need.extend((kid, s) for kid in group[1:])
        else:
            moved.append(s)
            need.extend((kid, s) for kid in group)
    if need:
        free = iter(i for i in range(m) if i not in used)
        src, dst = [], []
        for kid, s in need:
            kid.seq = next(free)
            src.append(s)
            dst.append(kid.seq)
        engine.reorder(src, dst)  # every destination is free: no spare ids needed
    for s in moved:
        engine.drop_seq(s)
    return kids


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
    len(prompt) + n_particles · max_tokens).
    """
    return _run(engine, prompt_ids, int(n_particles), proposal, critics, float(ess_threshold), int(max_tokens),
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
    return _run(engine, prompt_ids, int(n_samples), proposal, None, 0.0, int(max_tokens), "multinomial",
                float(temperature), seed, timeout, on_step, weighted=False)


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


__all__ = ["RESAMPLERS", "SMCParticle", "SMCResult", "StepInfo", "locally_constrained", "multinomial",
           "pool_posteriors", "resample", "residual", "smc", "stratified", "systematic", "total_variation"]
