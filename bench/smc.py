#!/usr/bin/env python
"""Benchmark: kiln's SMC steering — cost of one step, and posterior quality per second against genlm-control.

Part A, step cost (SmolLM2-135M q4_k_m through llama.cpp, one run, medians, ratios):

  (a) anchor: one single-sequence decode step (`engine.step` on 1 sequence + argmax) on an engine
      holding only that sequence, at depths prompt+1 .. prompt+S;
  (b) one full SMC step with N = 1, 4, 16, 64 particles: `kiln.runtime.smc.smc` with a regex
      (llguidance mask) and a hard length (both proposal potentials), resampling at every step
      (ess_threshold = 1.0), per-step wall time from `on_step` (steps 2..S: step 1 carries the prefill);
  (c) naive: N sequences decoded one after another = N × (a);
  (d) raw batched decode: `engine.step` over N distinct sequences (what llama.cpp itself costs).

  Each round measures an anchor block before every configuration (and one at the end), N ascending in
  even rounds and descending in odd ones; ratios are given as ratio of medians (all rounds pooled)
  and as the median over rounds of the ratio to the neighbouring anchor blocks (paired). Where the
  time goes: the engine's and potentials' methods and smc's `_proposal_rows`/`_draw` are wrapped with
  timers on the instance / module at run time (nothing is edited); the masks run on smc's worker
  thread while the engine decodes, so their time overlaps decode and is listed apart.

Part B, posterior quality vs wall time on an enumerable target:

  prompt: the model's chat template around "Name a European capital city."; constraint: the regex
  (Paris|London|Rome|Berlin|Madrid|Vienna|Prague|Lisbon)\\. then EOS (EOS = every end-of-generation
  id of the GGUF: <|endoftext|>, <|im_end|>, <reponame>). The exact target π ∝ p(x EOS)·1[x spells an
  allowed string] is enumerated over EVERY token sequence that spells an allowed string (all
  tokenizations), once with the float32 transformers model (the fixture checkpoint: genlm's model)
  and once with the q4_k_m GGUF's own probabilities (kiln's model); the exact law of mask-only
  decoding (LCD) too. At every enumerated node, kiln's Regex mask is checked against the enumeration.
  kiln's Regex (llguidance) admits fewer tokenizations than "every" (forced byte runs get the
  tokenizer's own tokenization), so kiln's exact target is also enumerated over the mask's own token
  language. Then for N in {4, 16, 32}, K replicates each (seeds differ), interleaved in blocks (ABBA):
    kiln SMC   smc(engine, prompt, N, proposal=Regex, ess_threshold, max_tokens=8, systematic), q4_k_m
    kiln LCD   locally_constrained(engine, prompt, Regex, N, max_tokens=8), q4_k_m
    kiln f32   the same smc over kiln's float32 transformers reference engine: the model genlm runs,
               so its TV compares the samplers on one target (its times are not kiln's fast path)
    genlm      bench/smc_genlm.py in its own venv: AWRS and the direct (exact-mask) token sampler,
               float32 transformers backend, same prompt ids, temperature 1, same ess_threshold and
               resampling, max_tokens=9 (genlm counts the final EOS), same N and replicates.
  Metrics: per-run TV to the exact target averaged over replicates (the quality of ONE posterior),
  TV of the pooled (averaged) posterior, median wall time per posterior. Two prompt regimes: warm
  (the default rows: kiln's engine keeps its prompt cache between runs, genlm caches the prompt KV
  before the timed region, as a service sampling repeatedly from one prompt does) and cold (rows
  ending in -cold, kiln SMC and genlm AWRS only: both pay the prompt inside every timed run;
  prompt time listed apart).

genlm-control is installed into ${KILN_CACHE:-~/.cache/kiln}/venvs/genlm (torch==2.13.0 CPU first,
then the `genlm` extra's pin from pyproject.toml), never into kiln's venv; if that fails, the report
says why and part B runs without it.

Writes <out>/smc.json, smc.md, smc.png (matplotlib) and prints the Markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kiln.bench.machine import machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

from kiln.runtime.smc import pool_posteriors, total_variation  # noqa: E402

FIXTURE = "smollm2-135m"
QUANT = "q4_k_m"
CAPITALS = ("Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon")
TV_REGEX = r"(Paris|London|Rome|Berlin|Madrid|Vienna|Prague|Lisbon)\."
TV_STRINGS = tuple(c + "." for c in CAPITALS)
TV_QUESTION = "Name a European capital city."
TV_MAX_TOKENS = 8  # >= the longest spelling of any allowed string (7 bytes): the cap never binds
STEP_QUESTION = ("Write a long story about an old lighthouse keeper who finds a message in a bottle on a "
                 "stormy night. Use simple words and short sentences, and do not use any numbers.")
STEP_REGEX = r"[A-Z][A-Za-z ,;:'.!?-]*"  # sentence-like text: a mask that allows most word tokens
GENLM_PIN_FALLBACK = "genlm-control==0.4.1"
TORCH_PIN_FALLBACK = "torch==2.13.0"

EXAMPLE = """\
examples:
  .venv/bin/python bench/smc.py                        # full run, 1 thread (about 8 minutes here)
  .venv/bin/python bench/smc.py --quick                # short run (under 2 minutes)
  .venv/bin/python bench/smc.py --no-genlm             # kiln only (no genlm-control venv)
  .venv/bin/python bench/smc.py --step-n 1,4,16 --rounds 5 --skip-tv
  .venv/bin/python bench/smc.py --tv-n 8,32 --replicates 40 --genlm-samplers awrs --skip-steps
  .venv/bin/python bench/smc.py --threads 2 --out /tmp/bench
"""


def log(msg: str) -> None:
    print(f"[smc-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def med(xs) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else math.nan


def tv(a: dict, b: dict) -> float:
    """Total variation distance; an empty posterior (every particle died) is at distance 1."""
    if not a or not b:
        return 1.0
    return total_variation(a, b)


def z_pooled(reps: list[dict]) -> dict | None:
    """Posteriors pooled with weights Ẑ (exp log_ml): unbiased for the target at any N, unlike the plain
    average, which keeps self-normalization's O(1/N) bias. None without finite log_ml (LCD)."""
    lz = [r.get("log_ml") for r in reps]
    if not any(v is not None and np.isfinite(v) for v in lz):
        return None
    return pool_posteriors([r["posterior"] for r in reps], lz)


def pooled(posteriors: list[dict]) -> dict:
    return pool_posteriors(posteriors)


# --- artifact -----------------------------------------------------------------------------------

def build_artifact(src: Path, dest: Path) -> dict:
    """Export the fixture to q4_k_m GGUF once (kiln.pipeline.export_gguf_artifact, verify=False);
    reused while its manifest names the same source and quant."""
    manifest = dest.with_name(dest.name + ".manifest.json")
    if dest.is_file() and manifest.is_file():
        try:
            rec = json.loads(manifest.read_text())
            if (rec.get("options", {}).get("quant") == QUANT
                    and Path(rec.get("source", {}).get("path", "")) == src.resolve()):
                return {"path": str(dest), "reused": True, "bytes": dest.stat().st_size,
                        "source_sha256": rec.get("source", {}).get("sha256")}
        except (json.JSONDecodeError, OSError):
            pass
    from kiln.pipeline import export_gguf_artifact

    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"exporting {src} to {QUANT} GGUF -> {dest}")
    t0 = time.perf_counter()
    res = export_gguf_artifact(src, dest, QUANT, verify=False, threads=1)
    return {"path": str(dest), "reused": False, "bytes": dest.stat().st_size, "export_s": round(time.perf_counter() - t0, 1),
            "source_sha256": res.record.get("source", {}).get("sha256")}


def chat_prompt(engine, question: str) -> tuple[str, list[int]]:
    from kiln.runtime.chat import render_chat

    text = render_chat(engine.chat_template, [{"role": "user", "content": question}])
    return text, engine.tokenize(text, add_special=True, parse_special=True)


# --- timers ---------------------------------------------------------------------------------------

class Timers:
    """Wall time and calls per category of wrapped calls. Nested wrapped calls (reorder -> drop_seq)
    count once, per thread (the mask worker thread and the main thread keep separate nesting)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._local = threading.local()
        self._undo: list = []

    def wrap(self, owner, name: str, category: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return
        timers = self
        had_own = isinstance(owner, type) is False and name in getattr(owner, "__dict__", {})

        def timed(*args, **kwargs):
            local = timers._local
            if getattr(local, "depth", 0):
                return fn(*args, **kwargs)
            local.depth = 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.total[category] = timers.total.get(category, 0.0) + time.perf_counter() - t0
                timers.calls[category] = timers.calls.get(category, 0) + 1
                local.depth = 0

        setattr(owner, name, timed)
        self._undo.append((owner, name, fn, had_own))

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)

    def restore(self) -> None:
        for owner, name, fn, had_own in reversed(self._undo):
            if had_own or isinstance(owner, type(sys)):
                setattr(owner, name, fn)
            else:
                try:
                    delattr(owner, name)
                except AttributeError:
                    setattr(owner, name, fn)
        self._undo.clear()


ENGINE_CATS = {"step": "decode", "reorder": "kv_ops", "copy_seq": "kv_ops", "drop_seq": "kv_ops"}
POTENTIAL_CATS = ("batch_logw_next", "batch_mask", "logw_next")
SMC_FUNCS = {"_proposal_rows": "proposal_rows", "_draw": "draws"}


def instrument(timers: Timers, engine, potentials) -> None:
    import importlib

    smc_mod = importlib.import_module("kiln.runtime.smc")  # the module: kiln.runtime re-exports the function smc

    for name, cat in ENGINE_CATS.items():
        timers.wrap(engine, name, cat)
    for p in potentials:
        for name in POTENTIAL_CATS:
            timers.wrap(p, name, "masks")
        timers.wrap(p, "advance", "advance")
    for name, cat in SMC_FUNCS.items():
        if hasattr(smc_mod, name):
            timers.wrap(smc_mod, name, cat)


# --- part A: step cost ----------------------------------------------------------------------------

def anchor_block(engine, prompt: list[int], steps: int) -> list[float]:
    engine.reset()
    logits = engine.prefill(prompt, seq=0)
    tok = int(np.argmax(logits))
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = engine.step([tok], [0])
        tok = int(np.argmax(logits[0]))
        out.append(time.perf_counter() - t0)
    engine.reset()
    return out


def raw_block(engine, prompt: list[int], n: int, steps: int) -> list[float]:
    engine.reset()
    logits = engine.prefill(prompt, seq=0)
    if n > 1:
        engine.reorder([0] * n)
    toks = [int(np.argmax(logits))] * n
    seqs = list(range(n))
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = engine.step(toks, seqs)
        toks = logits.argmax(axis=1).tolist()
        out.append(time.perf_counter() - t0)
    engine.reset()
    return out


def smc_block(engine, vocab, prompt: list[int], n: int, steps: int, seed: int) -> dict:
    from kiln.runtime.potentials import Length, Regex
    from kiln.runtime.smc import smc

    pots = [Regex(vocab, STEP_REGEX), Length(vocab, target=steps)]
    timers = Timers()
    instrument(timers, engine, pots)
    trace: list[tuple] = []

    def on_step(info) -> None:
        trace.append((info.elapsed, info.rows, info.live, info.resampled, timers.snapshot()))

    try:
        res = smc(engine, prompt, n, proposal=pots, ess_threshold=1.0, max_tokens=steps, resampling="systematic",
                  seed=seed, on_step=on_step)
    finally:
        timers.restore()
    per_step, rows, cats = [], [], []
    for k in range(1, len(trace)):
        el, r, live, _, snap = trace[k]
        if r == 0:  # the final forced-EOS step runs no decode
            continue
        prev = trace[k - 1]
        per_step.append(el - prev[0])
        rows.append(r)
        cats.append({c: snap.get(c, 0.0) - prev[4].get(c, 0.0) for c in set(snap) | set(prev[4])})
    return {"step_s": per_step, "rows": rows, "cats": cats, "resampled": sum(1 for t in trace if t[3]),
            "finished": sum(1 for p in res.particles if p.finished), "live_min": min(t[2] for t in trace),
            "text": res.particles[0].text[:120] if res.particles else ""}


def part_a(args, gguf: Path) -> dict:
    from kiln.runtime.llamacpp import LlamaCppEngine
    from kiln.runtime.potentials import Vocab

    S, ns = args.steps, args.step_n
    T = args.threads
    engines = {}
    anchor = None
    try:
        anchor = LlamaCppEngine(gguf, n_ctx=512, n_seq_max=2, threads=T)
        _, prompt = chat_prompt(anchor, STEP_QUESTION)
        P = len(prompt)
        for n in ns:
            ctx = P + n * (S + 1) + 64
            ctx = -(-ctx // 256) * 256
            engines[n] = LlamaCppEngine(gguf, n_ctx=ctx, n_seq_max=2 * n, threads=T)
        vocab = Vocab.from_engine(anchor)
        log(f"part A: prompt {P} tokens, S={S} steps, N={ns}, {args.rounds} round(s), {T} thread(s); warming up")
        anchor_block(anchor, prompt, 4)
        for n in ns:
            raw_block(engines[n], prompt, n, 2)
        smc_block(engines[ns[0]], vocab, prompt, ns[0], 4, seed=999)  # builds the llguidance tokenizer
        anchors: list[list[float]] = []  # every anchor block, in order
        per_round: list[dict] = []
        results = {n: {"raw": [], "smc": [], "rows": [], "cats": [], "paired": [], "paired_raw": [],
                       "resampled": 0, "finished": 0, "live_min": n, "text": ""} for n in ns}
        for r in range(args.rounds):
            order = list(ns) if r % 2 == 0 else list(reversed(ns))
            rec = {"order": order, "blocks": []}
            for n in order:
                a = anchor_block(anchor, prompt, S)
                anchors.append(a)
                raw = raw_block(engines[n], prompt, n, S)
                sb = smc_block(engines[n], vocab, prompt, n, S, seed=1000 * r + n)
                res = results[n]
                res["raw"] += raw
                res["smc"] += sb["step_s"]
                res["rows"] += sb["rows"]
                res["cats"] += sb["cats"]
                res["resampled"] += sb["resampled"]
                res["finished"] += sb["finished"]
                res["live_min"] = min(res["live_min"], sb["live_min"])
                res["text"] = sb["text"]
                rec["blocks"].append({"n": n, "anchor_before_idx": len(anchors) - 1, "smc_med": med(sb["step_s"]),
                                      "raw_med": med(raw)})
                log(f"  round {r + 1} N={n}: anchor {1e3 * med(a):.1f} ms, raw {1e3 * med(raw):.1f} ms, "
                    f"SMC step {1e3 * med(sb['step_s']):.1f} ms ({statistics.mean(sb['rows']):.1f} rows/step)")
            anchors.append(anchor_block(anchor, prompt, S))
            per_round.append(rec)
        # paired ratios: each block against the mean of the anchor blocks before and after it
        for rec in per_round:
            for b in rec["blocks"]:
                i = b["anchor_before_idx"]
                ref = 0.5 * (med(anchors[i]) + med(anchors[i + 1]))
                results[b["n"]]["paired"].append(b["smc_med"] / ref)
                results[b["n"]]["paired_raw"].append(b["raw_med"] / ref)
        all_anchor = [x for a in anchors for x in a]
        a_med = med(all_anchor)
        rows_out = []
        for n in ns:
            res = results[n]
            cats = res["cats"]
            keys = sorted({k for c in cats for k in c})
            mean_cat = {k: statistics.mean(c.get(k, 0.0) for c in cats) for k in keys}
            mean_step = statistics.mean(res["smc"])
            main_thread = sum(v for k, v in mean_cat.items() if k not in ("masks", "advance"))
            # advance runs on the main thread (kids' proposal states), masks on the worker thread
            main_thread += mean_cat.get("advance", 0.0)
            smc_med = med(res["smc"])
            rows_out.append({
                "n": n, "rows_per_step": statistics.mean(res["rows"]), "steps_timed": len(res["smc"]),
                "smc_step_ms": 1e3 * smc_med, "smc_step_ms_min": 1e3 * min(res["smc"]),
                "smc_step_ms_max": 1e3 * max(res["smc"]),
                "smc_x_single": smc_med / a_med, "smc_x_single_paired": med(res["paired"]),
                "naive_ms": 1e3 * n * a_med, "smc_over_naive": smc_med / (n * a_med),
                "raw_step_ms": 1e3 * med(res["raw"]), "raw_x_single": med(res["raw"]) / a_med,
                "raw_x_single_paired": med(res["paired_raw"]),
                "breakdown_mean_ms": {k: 1e3 * v for k, v in mean_cat.items()},
                "mean_step_ms": 1e3 * mean_step, "other_ms": 1e3 * max(0.0, mean_step - main_thread),
                "resampled_steps": res["resampled"], "finished_particles": res["finished"],
                "min_live": res["live_min"], "sample_text": res["text"],
            })
        return {"prompt_tokens": P, "steps": S, "rounds": args.rounds, "threads": T,
                "anchor_ms": 1e3 * a_med, "anchor_ms_min": 1e3 * min(all_anchor), "anchor_ms_max": 1e3 * max(all_anchor),
                "anchor_block_medians_ms": [1e3 * med(a) for a in anchors], "rounds_detail": per_round,
                "anchor_engine": {"n_ctx": anchor.n_ctx, "n_seq_max": 2},
                "engines": {str(n): {"n_ctx": engines[n].n_ctx, "n_seq_max": 2 * n, "kv_unified": True} for n in ns},
                "potentials": [f"Regex({STEP_REGEX!r})", f"Length(target={S}, tokens, hard)"],
                "ess_threshold": 1.0, "resampling": "systematic", "configs": rows_out}
    finally:
        for e in engines.values():
            e.close()
        if anchor is not None:
            anchor.close()


# --- part B: exact target --------------------------------------------------------------------------

def enumerate_exact(engine, prompt: list[int], strings, eog: list[int], max_tokens: int, pot=None) -> dict:
    """Exact target π ∝ p(x EOS)·Φ(x) and the exact law of mask-only decoding, by enumeration.

    Without `pot` the token language is EVERY token sequence that spells an allowed string: a node's
    moves are the tokens (not EOG) whose bytes extend its byte prefix toward an allowed string, and EOS
    (the sum over `eog`) is allowed iff the prefix is an allowed string. With `pot` (kiln's Regex) the
    moves are the tokens its mask allows and EOS iff it accepts, i.e. exactly the language kiln's
    sampler targets; nodes where the mask differs from the byte-level moves are counted.

    Breadth first, one batched engine.step per depth (siblings fork their parent's sequence)."""
    V = engine.vocab_size
    by_bytes: dict[bytes, list[int]] = {}
    eog_set = set(eog)
    pieces = [engine.token_bytes(i) for i in range(V)]
    for i, b in enumerate(pieces):
        if b and i not in eog_set:
            by_bytes.setdefault(b, []).append(i)
    words = [s.encode() for s in strings]
    moves_of: dict[bytes, list[tuple[int, bytes]]] = {}

    def byte_moves(bs: bytes) -> list[tuple[int, bytes]]:
        m = moves_of.get(bs)
        if m is None:
            seen: dict[int, bytes] = {}
            for w in words:
                if w.startswith(bs):
                    rest = w[len(bs):]
                    for k in range(1, len(rest) + 1):
                        for t in by_bytes.get(rest[:k], []):
                            seen[t] = bs + rest[:k]
            m = moves_of[bs] = sorted(seen.items())
        return m

    engine.reset()
    logits = engine.prefill(prompt, seq=0)[None]
    level = [((), b"", 0.0, 0.0, 0, pot.initial_state() if pot is not None else None)]
    gamma: dict[str, float] = {}
    lcd: dict[str, float] = {}
    counts: dict[str, int] = {}
    nodes = widest = differ = 0
    examples: list[dict] = []
    eog_arr = np.array(sorted(eog_set))
    while level:
        lp = logits.astype(np.float64)
        lp -= np.logaddexp.reduce(lp, axis=1, keepdims=True)
        children = []
        for (toks, bs, lg, lq, seq, st), row in zip(level, lp):
            full = byte_moves(bs)
            if pot is None:
                mv, ends = full, bs in words
            else:
                allowed = sorted(set(int(t) for t in pot.allowed(st)) - eog_set)
                mv, ends = [(t, bs + pieces[t]) for t in allowed], pot.complete(st) == 0.0
                if {t for t, _ in full} != set(allowed) or ends != (bs in words):
                    differ += 1
                    if len(examples) < 5:
                        fs = {t for t, _ in full}
                        examples.append({"prefix": bs.decode("utf-8", "replace"),
                                         "tokens": [pieces[t].decode("utf-8", "replace") for t in toks],
                                         "mask_only": [pieces[t].decode("utf-8", "replace") for t in sorted(set(allowed) - fs)][:8],
                                         "bytes_only": [pieces[t].decode("utf-8", "replace") for t in sorted(fs - set(allowed))][:8]})
            if len(toks) >= max_tokens:
                mv = []
            eos = float(np.logaddexp.reduce(row[eog_arr])) if ends else -math.inf
            u = np.array([row[t] for t, _ in mv], dtype=np.float64)
            norm = float(np.logaddexp.reduce(np.append(u, eos)))
            if eos > -math.inf:
                text = bs.decode("utf-8", "replace")
                gamma[text] = float(np.logaddexp(gamma.get(text, -math.inf), lg + eos))
                lcd[text] = float(np.logaddexp(lcd.get(text, -math.inf), lq + eos - norm))
                counts[text] = counts.get(text, 0) + 1
            for (t, nb), ut in zip(mv, u):
                children.append((toks + (t,), nb, lg + ut, lq + ut - norm, seq,
                                 pot.advance(st, t) if pot is not None else None))
        if not children:
            break
        if len(children) > engine.n_seq_max:
            raise RuntimeError(f"enumeration level of {len(children)} prefixes exceeds n_seq_max={engine.n_seq_max}")
        kept: set[int] = set()
        new_level, src, dst = [], [], []
        for c in children:
            if c[4] in kept:
                src.append(c[4])
                new_level.append(c[:4] + (None, c[5]))
            else:
                kept.add(c[4])
                new_level.append(c)
        for s in {c[4] for c in level} - kept:
            engine.drop_seq(s)
        free = (i for i in range(engine.n_seq_max) if i not in kept)
        for i, c in enumerate(new_level):
            if c[4] is None:
                new_level[i] = c[:4] + (next(free), c[5])
                dst.append(new_level[i][4])
        if src:
            engine.reorder(src, dst)
        level = new_level
        nodes += len(level)
        widest = max(widest, len(level))
        logits = engine.step([c[0][-1] for c in level], [c[4] for c in level])
    engine.reset()
    log_z = float(np.logaddexp.reduce(list(gamma.values())))
    return {"language": "every tokenization" if pot is None else "kiln Regex mask (llguidance)",
            "pi": {k: math.exp(v - log_z) for k, v in gamma.items()}, "lcd": {k: math.exp(v) for k, v in lcd.items()},
            "log_z": log_z, "nodes": nodes, "widest": widest, "tokenizations": counts,
            "nodes_where_mask_differs_from_bytes": differ if pot is not None else None, "examples": examples}


# --- part B: genlm worker -------------------------------------------------------------------------

def pyproject_pin(extra: str, prefix: str, fallback: str) -> str:
    try:
        import tomllib

        data = tomllib.loads((REPO / "pyproject.toml").read_text())
        for req in data["project"]["optional-dependencies"].get(extra, []):
            if req.replace("_", "-").lower().startswith(prefix):
                return req
    except Exception:  # noqa: BLE001 - fall back to the pin this script was written against
        pass
    return fallback


def genlm_venv_default() -> Path:
    from kiln.paths import cache_dir

    return cache_dir() / "venvs" / "genlm"


def ensure_genlm(venv: Path, python: Path | None, allow_install: bool) -> tuple[Path | None, dict]:
    """The genlm venv's interpreter, created (python3.11 -m venv; torch CPU pin; genlm-control pin) if
    missing. Returns (None, {"error": ...}) when it cannot be had."""
    info: dict = {"venv": str(venv)}
    py = python or venv / "bin" / "python"
    probe = ("import json, torch, genlm.control; from importlib.metadata import version, distributions; "
             "print(json.dumps({'genlm-control': version('genlm-control'), 'torch': torch.__version__, "
             "'torch_cuda': torch.version.cuda, 'nvidia_packages': sorted({d.metadata['Name'] for d in "
             "distributions() if (d.metadata['Name'] or '').lower().startswith('nvidia')})}))")

    def check() -> dict | None:
        if not Path(py).is_file():
            return None
        r = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            info["probe_error"] = r.stderr.strip().splitlines()[-1:] if r.stderr else ["probe failed"]
            return None
        return json.loads(r.stdout.strip().splitlines()[-1])

    found = check()
    if found is None and python is None and allow_install:
        genlm_pin = pyproject_pin("genlm", "genlm-control", GENLM_PIN_FALLBACK)
        torch_pin = pyproject_pin("torch", "torch", TORCH_PIN_FALLBACK)
        base = shutil.which("python3.11") or sys.executable
        info["installed"] = {"base_python": base, "torch": torch_pin, "genlm": genlm_pin}
        steps = [[base, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", torch_pin],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", genlm_pin]]
        for cmd in steps:
            log("genlm venv: " + " ".join(cmd[-3:] if len(cmd) > 3 else cmd))
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                info["error"] = f"`{' '.join(cmd)}` failed (exit {r.returncode}): {' | '.join(tail)}"
                return None, info
        found = check()
    if found is None:
        info.setdefault("error", f"no usable genlm-control interpreter at {py}"
                        + ("" if allow_install else " (--no-genlm-install)"))
        return None, info
    info.update(found)
    if found.get("torch_cuda") or found.get("nvidia_packages"):
        info["warning"] = "the genlm venv holds a CUDA torch build or nvidia packages"
    return Path(py), info


class GenlmWorker:
    def __init__(self, python: Path, setup: dict, threads: int):
        env = dict(os.environ, KILN_BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([str(python), str(REPO / "bench" / "smc_genlm.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, text=True, env=env)
        self.hello = self._ask(setup)
        if "error" in self.hello:
            raise RuntimeError(self.hello["error"])

    def _ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"genlm worker exited (code {self.proc.poll()})")
        return json.loads(line)

    def run(self, sampler: str, n: int, seeds: list[int], warm_prompt: bool = False) -> list[dict]:
        out = self._ask({"run": {"sampler": sampler, "n": n, "seeds": seeds, "warm_prompt": warm_prompt}})
        if "error" in out:
            raise RuntimeError(out["error"])
        return out["reps"]

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.proc.kill()


# --- part B: runs -----------------------------------------------------------------------------------

def part_b(args, gguf: Path, smol: Path) -> dict:
    from kiln.runtime.llamacpp import LlamaCppEngine
    from kiln.runtime.potentials import Regex, Vocab
    from kiln.runtime.smc import locally_constrained, smc

    T = args.threads
    ns = args.tv_n
    K = args.replicates
    try:
        import torch

        saved_threads = torch.get_num_threads()
    except ImportError:
        saved_threads = None
    out: dict = {"question": TV_QUESTION, "regex": TV_REGEX, "strings": list(TV_STRINGS), "max_tokens_kiln": args.max_tokens,
                 "max_tokens_genlm": args.max_tokens + 1, "ess_threshold": args.ess, "resampling": "systematic",
                 "replicates": K, "n": ns, "threads": T}
    exact: dict[str, dict] = {}
    ref = None  # kiln's float32 transformers reference engine (the model genlm runs)
    enum_engine = LlamaCppEngine(gguf, n_ctx=2048, n_seq_max=256, threads=T)
    try:
        prompt_text, prompt = chat_prompt(enum_engine, TV_QUESTION)
        eog = sorted(int(t) for t in enum_engine.eog_ids)
        eos_texts = [enum_engine.token_bytes(t).decode("utf-8", errors="replace") for t in eog]
        out.update(prompt_tokens=len(prompt), prompt_text=prompt_text, eog_ids=eog, eos_texts=eos_texts)
        regex = Regex(Vocab.from_engine(enum_engine), TV_REGEX)  # token ids are the same for both models
        log(f"part B: exact targets with the q4_k_m GGUF ({len(prompt)}-token prompt, EOS = {eos_texts})")
        for lang, pot in (("bytes", None), ("regex", regex)):
            t0 = time.perf_counter()
            ex = exact[f"q4_k_m/{lang}"] = enumerate_exact(enum_engine, prompt, TV_STRINGS, eog, args.max_tokens, pot)
            ex["seconds"] = round(time.perf_counter() - t0, 1)
            log(f"  {ex['language']}: {ex['nodes']} token prefixes (widest level {ex['widest']}), {ex['seconds']} s")
        log("part B: exact targets with the float32 transformers model")
        try:
            try:
                from kiln.verify.transformers_engine import TransformersEngine
            except ImportError:
                from kiln.runtime.transformers_engine import TransformersEngine  # older layout

            ref = TransformersEngine(smol, n_seq_max=256, n_ctx=len(prompt) + args.max_tokens + 8, threads=T)
            out["prompt_ids_match_float_tokenizer"] = ref.tokenize(prompt_text, add_special=True,
                                                                   parse_special=True) == prompt
            for lang, pot in (("bytes", None), ("regex", regex)):
                t0 = time.perf_counter()
                ex = exact[f"float32/{lang}"] = enumerate_exact(ref, prompt, TV_STRINGS, eog, args.max_tokens, pot)
                ex["seconds"] = round(time.perf_counter() - t0, 1)
                log(f"  {ex['language']}: {ex['nodes']} token prefixes, {ex['seconds']} s")
        except Exception as exc:  # noqa: BLE001 - report and go on with the GGUF targets
            out["float_target_error"] = f"{type(exc).__name__}: {exc}"
            log(f"  float32 target failed: {out['float_target_error']}")
            if ref is not None:
                ref.close()
                ref = None
    finally:
        enum_engine.close()
    out["exact"] = exact
    targets = {k: v["pi"] for k, v in exact.items()}
    out["tv_lcd_law"] = {k: tv(v["lcd"], v["pi"]) for k, v in exact.items()}
    keys = list(targets)
    out["tv_between_exact_targets"] = {f"{a} | {b}": tv(targets[a], targets[b])
                                       for i, a in enumerate(keys) for b in keys[i + 1:]}

    # genlm worker
    worker = None
    genlm_info: dict = {"requested": bool(args.genlm_samplers) and not args.no_genlm}
    samplers = [] if args.no_genlm else list(args.genlm_samplers)
    if samplers:
        py, info = ensure_genlm(args.genlm_venv, args.genlm_python, not args.no_genlm_install)
        genlm_info.update(info)
        if py is not None:
            setup = {"model": str(smol), "prompt_ids": prompt, "prompt_text": prompt_text, "regex": TV_REGEX,
                     "eos": eos_texts, "max_tokens": args.max_tokens + 1, "ess_threshold": args.ess,
                     "resampling": "systematic", "threads": T, "batch_size": max(ns), "batch_timeout": 0.001}
            try:
                log("starting the genlm-control worker")
                worker = GenlmWorker(py, setup, T)
                genlm_info.update(settings=worker.hello["settings"], versions=worker.hello["versions"])
            except Exception as exc:  # noqa: BLE001
                genlm_info["error"] = f"genlm worker failed to start: {exc}"
        if "error" in genlm_info:
            log(f"genlm-control unavailable: {genlm_info['error']}")
            samplers = []
    out["genlm"] = genlm_info

    engine = LlamaCppEngine(gguf, n_ctx=-(-(len(prompt) + max(ns) * args.max_tokens + 64) // 256) * 256,
                            n_seq_max=2 * max(ns), threads=T)
    evocab = Vocab.from_engine(engine)
    Regex(evocab, TV_REGEX)  # builds the llguidance tokenizer once, outside the timed runs
    prefill_t = Timers()
    prefill_t.wrap(engine, "prefill", "prefill")
    if ref is not None:
        prefill_t.wrap(ref, "prefill", "prefill")
    runs: dict[str, list[dict]] = {}

    def kiln_runs(kind: str, n: int, seeds: list[int]) -> list[dict]:
        reps = []
        for seed in seeds:
            pot = Regex(evocab, TV_REGEX)  # a fresh potential per run (no memoized masks carried over)
            if kind.endswith("-cold"):
                engine.clear_prompt_cache()  # not timed: the run then prefills its prompt
            before = prefill_t.total.get("prefill", 0.0)
            t0 = time.perf_counter()
            if kind in ("kiln-smc", "kiln-smc-cold", "kiln-smc-f32"):
                res = smc(ref if kind == "kiln-smc-f32" else engine, prompt, n, proposal=pot, ess_threshold=args.ess,
                          max_tokens=args.max_tokens, resampling="systematic", seed=seed)
            else:
                res = locally_constrained(engine, prompt, pot, n, max_tokens=args.max_tokens, seed=seed)
            wall = time.perf_counter() - t0
            reps.append({"seed": seed, "wall_s": wall, "prompt_s": prefill_t.total.get("prefill", 0.0) - before,
                         "posterior": res.posterior, "log_ml": res.log_ml, "steps": res.steps,
                         "engine_rows": res.engine_rows})
        return reps

    # warm: kiln's engine keeps its prompt cache between runs and genlm caches the prompt KV before the
    # timed region (a service sampling repeatedly from one prompt); cold (-cold): both pay the prompt
    cold = ["kiln-smc-cold"] + [f"genlm-{s}-cold" for s in samplers[:1]] if args.cold_prompt else []
    methods = (["kiln-smc", "kiln-lcd"] + (["kiln-smc-f32"] if ref is not None and not args.no_f32 else [])
               + [f"genlm-{s}" for s in samplers] + cold)
    out["prompt_modes"] = {"warm": "kiln's prompt cache kept between runs (kiln.runtime engine prefill_prompt); "
                                   "genlm's prompt KV cached before the timed region",
                           "cold": "methods ending in -cold: kiln's prompt cache cleared and genlm's prompt KV "
                                   "computed inside the timed region"}
    try:
        warm = kiln_runs("kiln-smc", ns[0], [424242])  # page in, warm caches (not reported)
        del warm
        for n in ns:
            seeds = [args.seed + 1000 * n + r for r in range(K)]
            blocks = [seeds[i:i + max(1, K // 2)] for i in range(0, K, max(1, K // 2))]
            for bi, block in enumerate(blocks):
                order = methods if bi % 2 == 0 else list(reversed(methods))
                for m in order:
                    if m.startswith("genlm-"):
                        try:
                            reps = worker.run(m[len("genlm-"):].removesuffix("-cold"), n, block,
                                              warm_prompt=not m.endswith("-cold"))
                        except Exception as exc:  # noqa: BLE001
                            genlm_info.setdefault("run_errors", []).append(f"{m} N={n}: {exc}")
                            log(f"  {m} N={n} failed: {exc}")
                            continue
                    else:
                        reps = kiln_runs(m, n, block)
                    runs.setdefault(f"{m}:{n}", []).extend(reps)
            summary = ", ".join(f"{m} {med(r['wall_s'] for r in runs.get(f'{m}:{n}', [])):.2f} s"
                                for m in methods if runs.get(f"{m}:{n}"))
            log(f"  N={n}: {K} posteriors each; median wall per posterior: {summary}")
    finally:
        prefill_t.restore()
        engine.close()
        if ref is not None:
            ref.close()
            try:
                import torch

                torch.set_num_threads(saved_threads)
            except Exception:  # noqa: BLE001
                pass
        if worker is not None:
            worker.close()

    # metrics
    table = []
    for m in methods:
        for n in ns:
            reps = runs.get(f"{m}:{n}")
            if not reps:
                continue
            own = {"kiln-smc-f32": "float32/regex"}.get(m, "float32/bytes" if m.startswith("genlm") else "q4_k_m/regex")
            row = {"method": m, "n": n, "runs": len(reps), "model_target": own,
                   "wall_s_median": med(r["wall_s"] for r in reps),
                   "wall_s_p10_p90": [float(np.percentile([r["wall_s"] for r in reps], q)) for q in (10, 90)],
                   "prompt_s_median": med(r["prompt_s"] for r in reps),
                   "sampling_s_median": med(r["wall_s"] - r["prompt_s"] for r in reps),
                   "empty_posteriors": sum(1 for r in reps if not r["posterior"])}
            row["tv"] = {}
            for tname, target in targets.items():
                tvs = [tv(r["posterior"], target) for r in reps]
                row["tv"][tname] = {"mean": statistics.mean(tvs),
                                      "se": statistics.stdev(tvs) / math.sqrt(len(tvs)) if len(tvs) > 1 else math.nan,
                                      "median": med(tvs), "pooled": tv(pooled([r["posterior"] for r in reps]), target)}
                zp = z_pooled(reps)
                row["tv"][tname]["z_pooled"] = tv(zp, target) if zp is not None else None
            table.append(row)
    out["runs"] = runs
    out["table"] = table
    return out


# --- part C: several prompts at once ---------------------------------------------------------------

BATCH_SUBJECTS = ("an old lighthouse keeper", "a young baker in Lyon", "a robot that learns to paint",
                  "two sisters crossing a desert", "a lost dog in Tokyo", "a chess player on a train",
                  "a beekeeper's first winter", "a pilot over the Andes")


def part_c(args, gguf: Path) -> dict:
    """P prompts x N particles: smc_batch (one engine.step per SMC step for all prompts) against the same
    P smc calls one after another, on one engine, alternating order (ABBA), medians over rounds."""
    from kiln.runtime.llamacpp import LlamaCppEngine
    from kiln.runtime.potentials import Length, Regex, Vocab
    from kiln.runtime.smc import smc, smc_batch

    S, T, P = args.steps, args.threads, args.batch_prompts
    out: dict = {"prompts": P, "steps": S, "n": args.batch_n, "rounds": args.rounds, "threads": T,
                 "potentials": [f"Regex({STEP_REGEX!r})", f"Length(target={S}, tokens, hard)"],
                 "ess_threshold": 1.0, "rows": []}
    probe = LlamaCppEngine(gguf, n_ctx=512, n_seq_max=1, threads=T)
    try:
        prompts = [chat_prompt(probe, f"Write a long story about {BATCH_SUBJECTS[i % len(BATCH_SUBJECTS)]}.")[1]
                   for i in range(P)]
    finally:
        probe.close()
    out["prompt_tokens"] = [len(p) for p in prompts]
    log(f"part C: {P} prompts x N={args.batch_n}, S={S} steps, {args.rounds} round(s): smc_batch vs {P} smc calls")
    for n in args.batch_n:
        ctx = -(-(sum(len(p) for p in prompts) + P * n * (S + 1) + 64) // 256) * 256
        engine = LlamaCppEngine(gguf, n_ctx=ctx, n_seq_max=P * n, threads=T, prompt_cache=P)
        vocab = Vocab.from_engine(engine)

        def pots(_i: int = 0) -> list:
            return [Regex(vocab, STEP_REGEX), Length(vocab, target=S)]

        def counting(run):
            """(wall s, engine.step calls, engine rows) of run() -> results."""
            timers = Timers()
            timers.wrap(engine, "step", "decode")
            try:
                t0 = time.perf_counter()
                rs = run()
                wall = time.perf_counter() - t0
            finally:
                timers.restore()
            return wall, timers.calls.get("decode", 0), sum(r.engine_rows for r in rs)

        def sequential(seed: int) -> tuple[float, int, int]:
            return counting(lambda: [smc(engine, p, n, proposal=pots(), ess_threshold=1.0, max_tokens=S, seed=seed + i)
                                     for i, p in enumerate(prompts)])

        def batched(seed: int) -> tuple[float, int, int]:
            return counting(lambda: smc_batch(engine, prompts, n, proposal=pots, ess_threshold=1.0, max_tokens=S,
                                              seed=seed))

        try:
            sequential(7)
            batched(7)  # warm-up: prompt cache filled, pages in (not reported)
            seq_t, bat_t, info = [], [], {}
            for r in range(args.rounds):
                order = (sequential, batched) if r % 2 == 0 else (batched, sequential)
                for fn in order:
                    wall, steps, rows = fn(100 + r)
                    (seq_t if fn is sequential else bat_t).append(wall)
                    info[fn.__name__] = {"engine_steps": steps, "engine_rows": rows}
            row = {"n": n, "sequential_s": med(seq_t), "batched_s": med(bat_t),
                   "speedup": med(seq_t) / med(bat_t), "sequential_runs_s": seq_t, "batched_runs_s": bat_t,
                   "sequential_engine_steps": info["sequential"]["engine_steps"],
                   "batched_engine_steps": info["batched"]["engine_steps"],
                   "sequential_engine_rows": info["sequential"]["engine_rows"],
                   "batched_engine_rows": info["batched"]["engine_rows"]}
            out["rows"].append(row)
            log(f"  N={n}: {P} smc calls {row['sequential_s']:.2f} s, smc_batch {row['batched_s']:.2f} s "
                f"({row['speedup']:.2f}x)")
        finally:
            engine.close()
    return out


# --- verdicts, report -----------------------------------------------------------------------------

def verdicts(report: dict) -> dict:
    v: dict = {}
    a = report.get("part_a")
    if a:
        row = next((c for c in a["configs"] if c["n"] == 16), None)
        if row:
            v["step_cost_n16"] = {"goal": "one SMC step with N=16 costs <= 4x one single-sequence step",
                                  "x_single": row["smc_x_single"], "x_single_paired": row["smc_x_single_paired"],
                                  "met": row["smc_x_single"] <= 4.0}
    b = report.get("part_b")
    if b and b.get("table"):
        rows = {(r["method"], r["n"]): r for r in b["table"]}
        out = []
        for s, suffix in (("awrs", ""), ("direct", ""), ("awrs", "-cold")):
            for n in b["n"]:
                k, g, kf = (rows.get((f"kiln-smc{suffix}", n)), rows.get((f"genlm-{s}{suffix}", n)),
                            rows.get(("kiln-smc-f32", n)))
                if not k or not g:
                    continue
                item = {"genlm_sampler": s, "prompt": "cold" if suffix else "warm", "n": n,
                        "speedup": g["wall_s_median"] / k["wall_s_median"],
                        "speedup_excluding_prompt": g["sampling_s_median"] / k["sampling_s_median"]}
                bases = (("float32", k, "float32/bytes", "float32/bytes"),  # the brief's basis: the float model's target
                         ("own", k, "q4_k_m/regex", "float32/bytes"),
                         ("same_model", kf, "float32/regex", "float32/bytes"))
                for basis, kr, kt, gt in bases:
                    if kr and kt in kr["tv"] and gt in g["tv"]:
                        kk, gg = kr["tv"][kt], g["tv"][gt]
                        slack = 2 * math.sqrt(kk["se"] ** 2 + gg["se"] ** 2)
                        item[basis] = {"kiln_tv": kk["mean"], "genlm_tv": gg["mean"], "noise_2se": slack,
                                       "equal_or_better": kk["mean"] <= gg["mean"] + slack}
                item["met"] = item["speedup"] >= 5.0 and bool(item.get("float32", {}).get("equal_or_better"))
                out.append(item)
        v["vs_genlm"] = {"goal": "kiln >= 5x faster per posterior at equal or better TV",
                         "basis": "speed: kiln's product path (q4_k_m, llama.cpp) vs genlm (float32, transformers), "
                                  "median wall per posterior incl. the prompt, with a warm prompt cache on both "
                                  "sides (and cold, -cold rows); TV: mean per-run TV to the float32 "
                                  "model's exact target for both, equal or better = kiln <= genlm + 2 se of the "
                                  "difference", "rows": out}
    return v


def clean(obj):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def fmt(x, d=1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{d}f}"


def render_md(rep: dict) -> str:
    m = rep["machine"]
    L = [f"# kiln SMC benchmark ({rep['timestamp']})", "",
         f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['ram_gb']} GB RAM, {m['os']}; "
         f"load average at start {rep['load_start']}, at end {rep['load_end']}.  ",
         f"Threads: {rep['threads']} (llama.cpp and torch alike).  ",
         f"Model: {FIXTURE} (SmolLM2-135M-Instruct fixture); artifact `{rep['artifact']['path']}` "
         f"({QUANT}, {rep['artifact']['bytes'] / 1e6:.1f} MB, kv_unified=True).  ",
         f"Versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items() if v) + ".", ""]
    a = rep.get("part_a")
    if a:
        L += ["## A. Cost of one SMC step vs one single-sequence decode step", "",
              f"Prompt: chat template + a story request ({a['prompt_tokens']} tokens); {a['steps']} steps per run, "
              f"{a['rounds']} round(s); SMC proposal: {' × '.join(a['potentials'])}; ess_threshold = 1.0 "
              f"(resampling every step, systematic). Anchor (a) = `engine.step` on 1 sequence + argmax, own engine "
              f"(n_ctx {a['anchor_engine']['n_ctx']}, n_seq_max 2): median **{a['anchor_ms']:.1f} ms** "
              f"(min {a['anchor_ms_min']:.1f}, max {a['anchor_ms_max']:.1f}) over "
              f"{len(a['anchor_block_medians_ms'])} blocks measured between the configurations. "
              "SMC engines: n_seq_max = 2N, n_ctx = prompt + N·(S+1) + slack.", "",
              "| model | quant | threads | test | N | rows/step | ms/step (median) | min–max ms | × single step | × single (paired) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        L.append(f"| {FIXTURE} | {QUANT} | {a['threads']} | (a) single-sequence decode | 1 | 1 | {a['anchor_ms']:.1f} | "
                 f"{a['anchor_ms_min']:.1f}–{a['anchor_ms_max']:.1f} | 1.00 | 1.00 |")
        for c in a["configs"]:
            n = c["n"]
            L.append(f"| {FIXTURE} | {QUANT} | {a['threads']} | (b) SMC step (mask+length, resample every step) | {n} | "
                     f"{c['rows_per_step']:.1f} | {c['smc_step_ms']:.1f} | {c['smc_step_ms_min']:.1f}–{c['smc_step_ms_max']:.1f} | "
                     f"{c['smc_x_single']:.2f} | {c['smc_x_single_paired']:.2f} |")
            L.append(f"| {FIXTURE} | {QUANT} | {a['threads']} | (c) naive: N sequences one after another (N × a) | {n} | "
                     f"{n} | {c['naive_ms']:.1f} | – | {float(n):.2f} | – |")
            L.append(f"| {FIXTURE} | {QUANT} | {a['threads']} | (d) raw llama_decode, N distinct rows | {n} | {n} | "
                     f"{c['raw_step_ms']:.1f} | – | {c['raw_x_single']:.2f} | {c['raw_x_single_paired']:.2f} |")
        L += ["", "SMC step ÷ naive (b ÷ c): " + ", ".join(f"N={c['n']}: {c['smc_over_naive']:.2f}" for c in a["configs"])
              + ".", "",
              "Where an SMC step's time goes (mean ms per step; main thread: decode = `engine.step` = llama_decode "
              "+ logits copy, KV ops = fork/drop of sequences, proposal = `_proposal_rows` (softmax/exp over the "
              "vocabulary per row), draws = `_draw`, advance = potentials' state updates, other = the rest of the "
              "loop (resampling, ESS, bookkeeping, waiting for masks); masks = `batch_logw_next` of the regex and "
              "length on smc's worker thread, overlapping decode):", "",
              "| N | rows/step | mean step ms | decode | KV ops | proposal | draws | advance | other | masks (worker) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in a["configs"]:
            b = c["breakdown_mean_ms"]
            L.append(f"| {c['n']} | {c['rows_per_step']:.1f} | {c['mean_step_ms']:.1f} | {fmt(b.get('decode'))} | "
                     f"{fmt(b.get('kv_ops'), 2)} | {fmt(b.get('proposal_rows'))} | {fmt(b.get('draws'), 2)} | "
                     f"{fmt(b.get('advance'), 2)} | {fmt(c['other_ms'])} | {fmt(b.get('masks'))} |")
        L.append("")
    b = rep.get("part_b")
    if b:
        L += ["## B. Posterior quality and time per posterior: kiln vs genlm-control", "",
              f"Prompt: chat template around {b['question']!r} ({b['prompt_tokens']} tokens); constraint "
              f"`{b['regex']}` then EOS (EOS = {', '.join(b['eos_texts'])}); max_tokens {b['max_tokens_kiln']} for kiln "
              f"(= {b['max_tokens_genlm']} in genlm, which counts the EOS; the cap never binds); ess_threshold "
              f"{b['ess_threshold']}, systematic resampling, temperature 1; {b['replicates']} replicates per N, "
              "interleaved in blocks. Prompt regimes: plain rows are *warm* (kiln's engine keeps its prompt "
              "cache between runs; genlm's `cache_kv` runs before the timed region), rows marked *cold prompt* pay "
              "the prompt inside every timed run (kiln: `engine.prefill` after clearing the cache; genlm: "
              "`cache_kv`), listed apart as prompt s.", ""]
        ex = b["exact"]
        cols = [k for k in ("float32/bytes", "float32/regex", "q4_k_m/bytes", "q4_k_m/regex") if k in ex]
        name = {"float32/bytes": "π float32, every tokenization (genlm's target)",
                "float32/regex": "π float32, kiln mask's tokens",
                "q4_k_m/bytes": "π q4_k_m, every tokenization",
                "q4_k_m/regex": "π q4_k_m, kiln mask's tokens (kiln's target)"}
        L += ["Exact targets, by enumeration of every admissible token sequence (one batched forward per depth): "
              "the model (float32 transformers = the fixture checkpoint genlm runs; q4_k_m = kiln's GGUF) × the "
              "token language: *every tokenization* of the allowed strings (what genlm's byte-level FSA, coerced "
              "to tokens, admits) or *kiln mask's tokens* (what kiln's `Regex` potential admits: llguidance "
              "restricts forced byte runs to the tokenizer's own tokenization, see below).", ""]
        L += ["| string | " + " | ".join(name[c] for c in cols) + " | LCD law (q4_k_m, kiln mask) | tokenizations (every / kiln mask) |",
              "|---|" + "---:|" * len(cols) + "---:|---:|"]
        ref = ex.get("float32/bytes") or ex[cols[0]]
        for st in sorted(ref["pi"], key=lambda x: -ref["pi"][x]):
            cells = " | ".join(f"{ex[c]['pi'].get(st, 0.0):.3f}" for c in cols)
            lcdv = ex.get("q4_k_m/regex", {}).get("lcd", {}).get(st)
            nb = ex.get("q4_k_m/bytes", {}).get("tokenizations", {}).get(st)
            nr = ex.get("q4_k_m/regex", {}).get("tokenizations", {}).get(st)
            L.append(f"| {st} | {cells} | {fmt(lcdv, 3)} | {nb} / {nr} |")
        L += ["", "log Z: " + ", ".join(f"{c} {ex[c]['log_z']:.3f}" for c in cols) + ". TV between exact targets: "
              + "; ".join(f"{k} = {v:.3f}" for k, v in b["tv_between_exact_targets"].items()) + ".  ",
              "TV of the exact mask-only (LCD) law to its target (what LCD converges to): "
              + ", ".join(f"{k}: {v:.3f}" for k, v in b["tv_lcd_law"].items()) + "."]
        rq = ex.get("q4_k_m/regex")
        if rq:
            eg = "; ".join(f"after {'|'.join(e['tokens'])!r} the mask lacks {e['bytes_only']}" for e in rq["examples"][:3])
            L += ["", f"kiln's Regex mask differs from the byte-level moves at {rq['nodes_where_mask_differs_from_bytes']} "
                      f"of the enumerated prefixes ({eg}). This is llguidance's handling of forced byte runs "
                      "(it admits the tokenizer's tokenization of forced text, guidance-ai/guidance#1352), so kiln's "
                      "target is p·Φ over that token language; the strings' probabilities move only by the mass of "
                      "the non-canonical spellings."]
        L += ["", "TV columns: mean over replicates of each run's posterior's TV (± 95% = 1.96·se), the TV of the "
              "pooled (averaged) posterior, and of the posteriors pooled with weights Ẑ (unbiased at any N: it "
              "separates the O(1/N) bias of one self-normalized posterior from sampling noise; with few replicates "
              "both pools are noisy). *own* = the exact target of what the method runs (kiln: q4_k_m, kiln "
              "mask's tokens; genlm: float32, every tokenization); *float32* = the float model's target over every "
              "tokenization, for everyone (for kiln this includes the q4_k_m-vs-float gap).", "",
              "| method | N | runs | TV own: mean ± 95% | TV own: pooled | TV own: Ẑ-pooled | TV float32: mean ± 95% "
              "| TV float32: pooled | wall s / posterior (median) | prompt s | sampling s | genlm ÷ kiln time "
              "| same, excl. prompt |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        kwall = {(r["n"], r["method"].endswith("-cold")): r["wall_s_median"] for r in b["table"]
                 if r["method"] in ("kiln-smc", "kiln-smc-cold")}
        ksamp = {(r["n"], r["method"].endswith("-cold")): r["sampling_s_median"] for r in b["table"]
                 if r["method"] in ("kiln-smc", "kiln-smc-cold")}
        labels = {"kiln-smc": "kiln SMC (q4_k_m, llama.cpp)", "kiln-lcd": "kiln LCD, mask only (q4_k_m)",
                  "kiln-smc-f32": "kiln SMC on the float32 reference engine*", "genlm-awrs": "genlm AWRS (float32)",
                  "genlm-direct": "genlm direct, exact mask (float32)"}
        for r in b["table"]:
            own = r["tv"].get(r["model_target"])
            f32 = r["tv"].get("float32/bytes")
            key = (r["n"], r["method"].endswith("-cold"))
            ratio = r["wall_s_median"] / kwall[key] if r["method"].startswith("genlm") and key in kwall else None
            own_s = f"{own['mean']:.3f} ± {1.96 * own['se']:.3f}" if own else "–"
            f32_s = f"{f32['mean']:.3f} ± {1.96 * f32['se']:.3f}" if f32 else "–"
            ratio2 = r["sampling_s_median"] / ksamp[key] if ratio else None
            base = r["method"].removesuffix("-cold")
            label = labels.get(base, base) + (", cold prompt" if r["method"].endswith("-cold") else "")
            L.append(f"| {label} | {r['n']} | {r['runs']} | {own_s} | {fmt(own['pooled'] if own else None, 3)} | "
                     f"{fmt(own.get('z_pooled') if own else None, 3)} | {f32_s} | {fmt(f32['pooled'] if f32 else None, 3)} | {r['wall_s_median']:.3f} | "
                     f"{r['prompt_s_median']:.3f} | {r['sampling_s_median']:.3f} | {fmt(ratio, 2) if ratio else '–'} | "
                     f"{fmt(ratio2, 2) if ratio2 else '–'} |")
        L += ["", "\\* kiln's SMC loop over `kiln.verify.transformers_engine.TransformersEngine` (float32, the model genlm "
              "runs): the same-model quality comparison; that engine is a test reference, not kiln's fast path, so its "
              "times are not kiln's."]
        g = b["genlm"]
        L += [""]
        if g.get("error"):
            L += [f"**genlm-control did not run:** {g['error']}", ""]
        elif g.get("versions"):
            gv = g["versions"]
            st = g.get("settings", {})
            L += [f"genlm side: genlm-control {gv.get('genlm-control')}, genlm-backend {gv.get('genlm-backend')}, "
                  f"genlm-grammar {gv.get('genlm-grammar')}, torch {gv.get('torch')} (CUDA: {g.get('torch_cuda')}; "
                  f"nvidia packages: {gv.get('nvidia_packages') or 'none'}), transformers {gv.get('transformers')}, "
                  f"Python {gv.get('python')}; venv {g.get('venv')}. Backend {st.get('backend')}, {st.get('dtype')}, "
                  f"{st.get('device')}, {st.get('torch_threads')} torch thread(s); autobatch batch_size "
                  f"{st.get('batch_size')}, timeout {st.get('batch_timeout_s')} s; prompt ids identical to the HF "
                  f"tokenizer's: {st.get('prompt_ids_match_hf_tokenizer')}; coerced FSA vocabulary "
                  f"{st.get('coerced_fsa_vocab')} tokens.", ""]
    c = rep.get("part_c")
    if c and c.get("rows"):
        L += ["", f"## Part C: several prompts at once ({c['prompts']} prompts, {c['steps']} steps each)", "",
              f"`smc_batch` over {c['prompts']} chat prompts (story requests; {', '.join(map(str, c['prompt_tokens']))} "
              f"tokens) against the same {c['prompts']} `smc` calls one after another, on one engine with a warm "
              f"prompt cache; potentials {', '.join(c['potentials'])}, resampling every step; median over "
              f"{c['rounds']} round(s), order alternating.", "",
              "| N per prompt | one after another s | smc_batch s | speedup | engine steps (seq. / batch) "
              "| engine rows (seq. / batch) |", "|---:|---:|---:|---:|---:|---:|"]
        for r in c["rows"]:
            L.append(f"| {r['n']} | {r['sequential_s']:.3f} | {r['batched_s']:.3f} | {r['speedup']:.2f}× | "
                     f"{r['sequential_engine_steps']} / {r['batched_engine_steps']} | "
                     f"{r['sequential_engine_rows']} / {r['batched_engine_rows']} |")
        L.append("")
    v = rep.get("verdicts", {})
    if v:
        L += ["## Goals", ""]
        s = v.get("step_cost_n16")
        if s:
            L.append(f"- N=16 SMC step ≤ 4× one single-sequence step: **{'met' if s['met'] else 'not met'}** "
                     f"({s['x_single']:.2f}× as ratio of medians, {s['x_single_paired']:.2f}× paired).")
        g = v.get("vs_genlm")
        if g:
            L.append(f"- kiln ≥ 5× faster than genlm-control at equal or better TV (basis: {g['basis']}):")
            for it in g["rows"]:
                f32, own, same = it.get("float32", {}), it.get("own", {}), it.get("same_model", {})
                line = (f"  - genlm {it['genlm_sampler']}, {it.get('prompt', 'cold')} prompt, N={it['n']}: "
                        f"**{'met' if it['met'] else 'not met'}** — "
                        f"{it['speedup']:.2f}× faster per posterior ({it['speedup_excluding_prompt']:.2f}× excluding the "
                        f"prompt); TV to the float32 target {fmt(f32.get('kiln_tv'), 3)} (kiln) vs "
                        f"{fmt(f32.get('genlm_tv'), 3)} (genlm), noise ±{fmt(f32.get('noise_2se'), 3)}")
                if own:
                    line += f"; own targets {own['kiln_tv']:.3f} vs {own['genlm_tv']:.3f}"
                if same:
                    line += f"; same float32 model (kiln's SMC on its reference engine) {same['kiln_tv']:.3f} vs {same['genlm_tv']:.3f}"
                L.append(line + ".")
        L.append("")
    return "\n".join(L)


def plot(rep: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no PNG"
    a, b = rep.get("part_a"), rep.get("part_b")
    panels = (1 if a else 0) + (2 if b and b.get("table") else 0)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    axes = np.atleast_1d(axes)
    i = 0
    title = f"{FIXTURE} {QUANT}, {rep['threads']} thread(s), {rep['machine']['cpu'][:40]}"
    if a:
        ax = axes[i]
        i += 1
        ns = [c["n"] for c in a["configs"]]
        ax.plot(ns, [c["smc_step_ms"] for c in a["configs"]], "o-", label="kiln SMC step (mask+length, resample)")
        ax.plot(ns, [c["raw_step_ms"] for c in a["configs"]], "s--", label="raw llama_decode, N rows")
        ax.plot(ns, [c["naive_ms"] for c in a["configs"]], "^:", label="naive: N × single step")
        ax.axhline(a["anchor_ms"], color="grey", lw=0.8, label=f"single step {a['anchor_ms']:.1f} ms")
        ax.axhline(4 * a["anchor_ms"], color="red", lw=0.8, ls="--", label="goal: 4 × single step at N=16")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("particles N")
        ax.set_ylabel("ms per step (median)")
        ax.set_title("A. step cost", fontsize=10)
        ax.legend(fontsize=7)
    if b and b.get("table"):
        ax, ax2 = axes[i], axes[i + 1]
        by: dict = {}
        for r in b["table"]:
            by.setdefault(r["method"], []).append(r)
        for j, (mth, rows) in enumerate(by.items()):
            shift = 1.0 + 0.03 * (j - (len(by) - 1) / 2)  # spread the error bars
            tname = rows[0]["model_target"]
            if tname not in rows[0]["tv"]:
                continue
            ns = [r["n"] for r in rows]
            ax.errorbar([n * shift for n in ns], [r["tv"][tname]["mean"] for r in rows],
                        yerr=[1.96 * r["tv"][tname]["se"] for r in rows], marker="o", capsize=3,
                        label=f"{mth} (vs {tname})")
            ax2.plot(ns, [r["wall_s_median"] for r in rows], "o-", label=mth)
        lcd_law = b.get("tv_lcd_law", {}).get("q4_k_m/regex")
        if lcd_law is not None:
            ax.axhline(lcd_law, color="grey", ls=":", lw=0.8, label="exact LCD law's TV (N → ∞)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("particles N")
        ax.set_ylabel("per-run TV to the exact target (mean)")
        ax.set_title("B. TV vs N (own model's exact target)", fontsize=10)
        ax.legend(fontsize=7)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("particles N")
        ax2.set_ylabel("wall s per posterior (median)")
        ax2.set_title("B. time per posterior", fontsize=10)
        ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Cost of an SMC step vs a single decode step, and kiln vs genlm-control on an enumerable "
                    "target (TV to the exact posterior, wall time per posterior).",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run: 16 steps, 1 round, N=1,4,16; TV at N=4,16 with "
                                                          "5 replicates, genlm AWRS only")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for llama.cpp and torch (default 1: on a small shared machine llama.cpp's spinning "
                         "pool slows down when its threads are preempted; 2 threads ran about 2.5x slower than 1 here "
                         "at load 5-6)")
    ap.add_argument("--steps", type=int, default=32, help="SMC steps per timed run / decode steps per block (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of part A (default 3)")
    ap.add_argument("--step-n", type=ints, default=[1, 4, 16, 64], help="particle counts of part A (default 1,4,16,64)")
    ap.add_argument("--tv-n", type=ints, default=[4, 16, 32], help="particle counts of part B (default 4,16,32)")
    ap.add_argument("--replicates", type=int, default=20, help="posteriors per method and N in part B (default 20)")
    ap.add_argument("--ess", type=float, default=0.5, help="ess_threshold of part B, both libraries (default 0.5)")
    ap.add_argument("--max-tokens", type=int, default=TV_MAX_TOKENS, help=f"part B cap, kiln's count (default {TV_MAX_TOKENS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--genlm-samplers", default="awrs,direct",
                    help="genlm-control token samplers for part B: awrs, direct, or both (default awrs,direct)")
    ap.add_argument("--no-genlm", action="store_true", help="skip genlm-control")
    ap.add_argument("--no-cold-prompt", dest="cold_prompt", action="store_false",
                    help="skip the cold-prompt rows (kiln SMC and genlm AWRS paying the prompt in every run)")
    ap.add_argument("--no-genlm-install", action="store_true", help="do not create the genlm venv if it is missing")
    ap.add_argument("--genlm-venv", type=Path, default=None,
                    help="genlm-control venv (default ${KILN_CACHE:-~/.cache/kiln}/venvs/genlm)")
    ap.add_argument("--genlm-python", type=Path, default=None, help="use this interpreter for genlm-control instead")
    ap.add_argument("--no-f32", action="store_true",
                    help="skip kiln SMC on the float32 reference engine (the same-model TV comparison with genlm)")
    ap.add_argument("--skip-steps", action="store_true", help="skip part A")
    ap.add_argument("--skip-tv", action="store_true", help="skip part B")
    ap.add_argument("--skip-batch", action="store_true", help="skip part C (several prompts at once)")
    ap.add_argument("--batch-prompts", type=int, default=4, help="prompts of part C (default 4)")
    ap.add_argument("--batch-n", type=ints, default=[1, 4, 16], help="particle counts of part C (default 1,4,16)")
    ap.add_argument("--artifact", type=Path, help="an existing SmolLM2 q4_k_m GGUF (default: exported once into "
                                                  "bench/results/artifacts/)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="output directory (default bench/results)")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the Markdown")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = min(args.steps, 16), 1
        args.step_n = [n for n in args.step_n if n <= 16] or [1, 4, 16]
        args.tv_n = [n for n in args.tv_n if n <= 16] or [4, 16]
        args.replicates = min(args.replicates, 5)
        args.batch_n = [n for n in args.batch_n if n <= 4] or [1, 4]
        args.genlm_samplers = "awrs" if args.genlm_samplers == "awrs,direct" else args.genlm_samplers
    args.genlm_samplers = [s.strip() for s in args.genlm_samplers.split(",") if s.strip()]
    bad = [s for s in args.genlm_samplers if s not in ("awrs", "direct")]
    if bad:
        ap.error(f"unknown genlm sampler(s): {', '.join(bad)}")
    if args.genlm_venv is None:
        args.genlm_venv = genlm_venv_default()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    from kiln.fixtures import build

    t_start = time.perf_counter()
    rep: dict = {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                 "load_start": loadavg(), "threads": args.threads, "argv": sys.argv[1:] if argv is None else argv,
                 "versions": {"python": platform.python_version(), "kiln": pkg_version("kiln-llm"),
                              "llama-cpp-python": pkg_version("llama_cpp_python"), "llguidance": pkg_version("llguidance"),
                              "numpy": pkg_version("numpy"), "torch": pkg_version("torch"),
                              "transformers": pkg_version("transformers")}}
    smol = Path(build(FIXTURE))
    gguf = args.artifact or (REPO / "bench" / "results" / "artifacts" / f"{FIXTURE}.{QUANT}.gguf")
    rep["artifact"] = build_artifact(smol, gguf) if args.artifact is None else \
        {"path": str(gguf), "reused": True, "bytes": gguf.stat().st_size}
    rep["source"] = str(smol)
    if not args.skip_steps:
        rep["part_a"] = part_a(args, gguf)
    if not args.skip_tv:
        rep["part_b"] = part_b(args, gguf, smol)
    if not args.skip_batch:
        rep["part_c"] = part_c(args, gguf)
    rep["load_end"] = loadavg()
    rep["total_s"] = round(time.perf_counter() - t_start, 1)
    rep["verdicts"] = verdicts(rep)
    args.out.mkdir(parents=True, exist_ok=True)
    md = render_md(rep) + f"\nTotal run time {rep['total_s']} s.\n"
    (args.out / "smc.json").write_text(json.dumps(clean(rep), indent=1) + "\n")
    (args.out / "smc.md").write_text(md)
    note = plot(rep, args.out / "smc.png")
    if note:
        log(note)
    log(f"wrote {args.out / 'smc.json'}, smc.md, smc.png in {rep['total_s']} s")
    print(json.dumps(clean(rep), indent=1) if args.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
