"""Continuous batching (kiln.runtime.batching): tasks join and leave one batch at step boundaries, every
step ONE engine.step for all of them.

* the toy LM of tests/toy_lm.py (batch-invariant by construction): SMC populations, mask-only samples
  and plain sampling tasks, admitted at different steps beside each other, each draw exactly what it
  draws alone (SMCTask alone is `smc` / `locally_constrained` draw for draw); the batch runs as many
  engine steps as its longest member needs, not their sum;
* admission: a task waits for a free block of rows and, on a shared KV pool, for its cells; `cancel`
  frees them; a task that fails (its potential raises) is dropped alone, the others finish;
* llama.cpp (the tiny Qwen2 f32 GGUF): greedy plain tasks beside other requests' SMC particles give the
  tokens they give alone, and the KV pool never overflows.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.runtime.batching import ContinuousBatch
from kiln.runtime.potentials.base import Potential
from kiln.runtime.sampling import SampleTask, SamplingParams, sample
from kiln.runtime.smc import SMCTask, locally_constrained, smc
from toy_lm import TOY_T, TOY_VOCAB, OddB, ToyEngine


def _particles(result):
    return [(p.tokens, p.text, p.log_weight, p.finished) for p in result.particles]


def _same(a, b) -> bool:
    return (repr(_particles(a)) == repr(_particles(b))
            and repr((a.log_ml, a.ess_trace, a.resample_steps, a.steps, a.engine_rows)) ==
            repr((b.log_ml, b.ess_trace, b.resample_steps, b.steps, b.engine_rows)))


class CountingBatch(ContinuousBatch):
    """Counts the engine steps the batch runs (instrumentation of kiln's own loop, not of an engine)."""

    steps = 0

    def step(self):
        if any(True for _ in self.running):
            self.steps += 1
        return super().step()


def _smc_task(engine, seed, prompt=(4,), n=8, **kw):
    return SMCTask(engine, list(prompt), n, proposal=OddB(TOY_VOCAB), max_tokens=TOY_T, seed=seed, **kw)


def test_an_smc_task_alone_is_smc_draw_for_draw() -> None:
    for seed in range(4):
        engine = ToyEngine()
        task = _smc_task(engine, seed)
        with ContinuousBatch(engine) as batch:
            assert batch.run([task]) == []
        ref = smc(ToyEngine(), [4], 8, proposal=OddB(TOY_VOCAB), max_tokens=TOY_T, seed=seed)
        assert _same(task.result, ref)
        mask = SMCTask(engine, [0], 6, proposal=OddB(TOY_VOCAB), ess_threshold=0.0, max_tokens=TOY_T,
                       resampling="multinomial", seed=seed, weighted=False)
        with ContinuousBatch(engine) as batch:
            batch.run([mask])
        ref = locally_constrained(ToyEngine(), [0], OddB(TOY_VOCAB), 6, max_tokens=TOY_T, seed=seed)
        assert repr(_particles(mask.result)) == repr(_particles(ref))


def test_tasks_joining_at_different_steps_draw_what_they_draw_alone() -> None:
    """Three SMC populations, a mask-only set and two sampling tasks admitted one per step into a batch
    of 40 rows: each result equals its solo run, and the batch runs max(steps), not their sum."""

    def build(engine):
        return [_smc_task(engine, 0), _smc_task(engine, 1, prompt=(0, 2), n=12),
                SampleTask(engine, [2, 1], SamplingParams(n=3, temperature=1.0, seed=7), TOY_T),
                _smc_task(engine, 2, prompt=(1,), n=6, ess_threshold=1.0, resampling="residual"),
                SampleTask(engine, [4], SamplingParams(n=2, temperature=0.0), TOY_T),
                SMCTask(engine, [3], 5, proposal=OddB(TOY_VOCAB), ess_threshold=0.0, max_tokens=TOY_T,
                        resampling="multinomial", seed=3, weighted=False)]

    solo = []
    for k in range(6):
        engine = ToyEngine()
        t = build(engine)[k]
        with CountingBatch(engine) as b:
            b.run([t])
        solo.append((t, b.steps))
    engine = ToyEngine(n_seq_max=40)
    tasks = build(engine)
    with CountingBatch(engine) as batch:
        waiting = list(tasks)
        while waiting or batch.running:
            if waiting:
                assert batch.admit(waiting.pop(0))  # one joins at every step boundary
            finished, failed = batch.step()
            assert failed == []
    for (ref, _), got in zip(solo, tasks):
        if isinstance(got, SMCTask):
            assert _same(got.result, ref.result)
        else:
            assert [(c.tokens, c.text, c.finish_reason) for c in got.choices] == \
                   [(c.tokens, c.text, c.finish_reason) for c in ref.choices]
    assert batch.steps < sum(s for _, s in solo)
    assert batch.steps <= max(k + s for k, (_, s) in enumerate(solo)) + 1
    assert engine.positions() == {}  # every row was freed


def test_admission_waits_for_rows_and_cells_and_cancel_frees_them() -> None:
    engine = ToyEngine(n_seq_max=10, n_ctx=64)
    engine.shared_kv_pool = True  # count cells like llama.cpp's single pool
    with ContinuousBatch(engine) as batch:
        a = _smc_task(engine, 0, n=6)  # 1 + 6·6 = 37 cells
        b = _smc_task(engine, 1, n=4)  # 37 + 25 = 62 cells: fits
        c = SampleTask(engine, [4], SamplingParams(n=1, seed=0), TOY_T)  # rows: none left
        assert batch.admit(a) and batch.admit(b)
        assert not batch.fits(c) and batch.fits_alone(c) and not batch.admit(c)
        batch.cancel(b)
        assert batch.admit(c)  # b's rows are free again
        d = _smc_task(engine, 2, prompt=(0, 2, 1), n=3)  # rows 7..9 are free, but 37 + 7 + 21 cells > 64
        assert batch._free_block(3) is not None and not batch.fits(d)
        big = _smc_task(engine, 3, n=11)
        assert not batch.fits_alone(big)
        with pytest.raises(KilnError, match="cannot fit"):
            batch.run([big])
        while batch.running:
            batch.step()
        assert batch.admit(d)
        batch.cancel(d)
        assert engine.positions() == {}


class Broken(OddB):
    """A proposal potential that fails at its third prefix (a bug in user code)."""

    calls = 0

    def logw_next(self, state):
        Broken.calls += 1
        if Broken.calls > 3:
            raise RuntimeError("broken potential")
        return super().logw_next(state)


def test_a_failing_task_is_dropped_alone() -> None:
    engine = ToyEngine()
    bad = SMCTask(engine, [4], 4, proposal=Broken(TOY_VOCAB), max_tokens=TOY_T, seed=0)
    good = _smc_task(engine, 5)
    with ContinuousBatch(engine, overlap=False) as batch:
        failures = batch.run([bad, good])
    assert [f.task for f in failures] == [bad] and "broken potential" in str(failures[0].error)
    assert _same(good.result, smc(ToyEngine(), [4], 8, proposal=OddB(TOY_VOCAB), max_tokens=TOY_T, seed=5))
    assert engine.positions() == {}


def test_sample_alone_matches_a_manual_decoding_loop() -> None:
    """`sample` (one SampleTask) draws each choice from its own stream, as the reference loop does."""
    from kiln.runtime.sampling import pick
    from kiln.runtime.smc import population_rng

    engine = ToyEngine()
    choices = sample(engine, [2], SamplingParams(n=3, temperature=0.9, seed=11), TOY_T)
    for i, c in enumerate(choices):
        rng, logits, toks = population_rng(11, i), engine.prefill([2], seq=60), []
        for _ in range(TOY_T):
            t = pick(logits, 0.9, 1.0, rng)
            if t in engine.eog_ids:
                break
            toks.append(t)
            logits = engine.step([t], [60])[0]
        engine.drop_seq(60)
        assert c.tokens == toks


# --- llama.cpp -----------------------------------------------------------------------------------------
class FirstTokenA(Potential):
    """Only strings whose every token's first byte is a lowercase letter (a cheap proposal mask)."""

    def initial_state(self):
        return ()

    def advance(self, state, token):
        return state

    def prefix(self, state):
        return 0.0

    def complete(self, state):
        return 0.0

    def logw_next(self, state):
        return self._mask

    @classmethod
    def on(cls, vocab):
        p = cls(vocab)
        ok = np.array([bool(b) and 97 <= b[0] <= 122 for b in vocab.token_bytes] + [True])
        ok[list(vocab.eog_ids)] = True
        p._mask = np.where(ok, 0.0, -np.inf).astype(np.float32)
        return p


def test_llamacpp_greedy_tasks_beside_smc_particles_give_their_solo_tokens(tiny_qwen2_f32_gguf) -> None:
    pytest.importorskip("llama_cpp")
    from kiln.runtime import load
    from kiln.runtime.potentials.base import Vocab

    with load(tiny_qwen2_f32_gguf, n_ctx=1024, n_seq_max=24, threads=1) as engine:
        prompts = [engine.tokenize(t) for t in ("The river", "Once upon a time there", "A")]
        greedy = SamplingParams(n=1, temperature=0.0)
        alone = [sample(engine, p, greedy, 24)[0].tokens for p in prompts]
        vocab = Vocab.from_engine(engine)
        with CountingBatch(engine) as batch:
            tasks = [SampleTask(engine, p, greedy, 24) for p in prompts]
            smcs = [SMCTask(engine, prompts[0], 8, proposal=FirstTokenA.on(vocab), max_tokens=24, seed=s)
                    for s in range(2)]
            assert batch.run([tasks[0], smcs[0], tasks[1], smcs[1], tasks[2]]) == []
            assert batch.cells_in_use() == 0 and engine.positions() == {}
        # batch variance in llama.cpp is float noise: greedy tokens agree (the fixture has no near-ties here)
        assert [t.choices[0].tokens for t in tasks] == alone
        assert batch.steps <= 24 + 2  # 24 tokens, the forced end, the step that reports it: not 5 runs
        for t in smcs:
            assert t.result.particles and all(p.finished for p in t.result.particles)
