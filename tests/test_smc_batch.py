"""`smc_batch`: several prompts' SMC populations advanced together, one `engine.step` per step for all.

* a toy Markov-chain LM (batch-invariant by construction): one prompt is exactly `smc`, and every
  population is exactly `smc` of its prompt with its own random stream; the timeout is global;
* prompt-conditioned potentials must not be shared between prompts (the callable form builds one per
  prompt); capacity errors are one line and say what to open the engine with;
* SmolLM2 through llama.cpp (the Q4_1 fixture GGUF): two prompts under a regex, one engine step per
  SMC step for both; the reference critic; the float32 transformers engine (populations equal
  separate runs up to float noise); `kiln generate` with a repeated `--prompt`; the README example.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, Product, Scaled, Vocab
from kiln.runtime.smc import StepInfo, smc, smc_batch
from toy_lm import TOY_T, TOY_VOCAB, OddB, ToyEngine

# --- the toy LM of tests/toy_lm.py (every logit depends on the last token only) ---------------------
TOY_PROMPTS = [[4], [0], [2, 1]]


class Soft(Potential):
    """A soft critic: penalize a's (prefix and complete), reward strings of 3+ tokens at the end."""

    def initial_state(self):
        return ()

    def advance(self, state, token):
        return state + (token,)

    def prefix(self, state):
        return -0.7 * state.count(0)

    def complete(self, state):
        return -0.7 * state.count(0) + (1.0 if len(state) >= 3 else 0.0)


class EchoCritic(Soft):
    """A prompt-conditioned critic: rewards repeating the prompt's last token."""

    prompt_conditioned = True

    def __init__(self, vocab: Vocab) -> None:
        super().__init__(vocab)
        self.prompts: list[list[int]] = []

    def set_prompt(self, prompt_ids):
        self.prompts.append(list(prompt_ids))

    def complete(self, state):
        return 0.5 * state.count(self.prompts[-1][-1])


def _same(a, b) -> bool:
    return (repr([(p.tokens, p.text, p.log_weight, p.finished) for p in a.particles]) ==
            repr([(p.tokens, p.text, p.log_weight, p.finished) for p in b.particles])
            and repr((a.log_ml, a.ess_trace, a.resample_steps, a.steps, a.engine_rows, a.timed_out)) ==
            repr((b.log_ml, b.ess_trace, b.resample_steps, b.steps, b.engine_rows, b.timed_out)))


TOY_CASES = [
    dict(proposal=OddB(TOY_VOCAB), critics=Soft(TOY_VOCAB)),
    dict(proposal=OddB(TOY_VOCAB), critics=Soft(TOY_VOCAB), temperature=0.8, resampling="residual",
         ess_threshold=1.0, overlap_potentials=False),
    dict(),  # the unconstrained model
]


@pytest.mark.parametrize("case", range(len(TOY_CASES)))
def test_one_prompt_is_smc(case: int) -> None:
    engine = ToyEngine()
    for seed in range(12):
        a = smc(engine, TOY_PROMPTS[0], 8, max_tokens=TOY_T, seed=seed, **TOY_CASES[case])
        (b,) = smc_batch(engine, [TOY_PROMPTS[0]], 8, max_tokens=TOY_T, seed=seed, **TOY_CASES[case])
        assert _same(a, b), seed
    assert engine.seqs == {}


@pytest.mark.parametrize("case", range(len(TOY_CASES)))
def test_populations_are_separate_smc_runs(case: int) -> None:
    """Population i is smc of prompt i with the stream default_rng([seed, i]) (seed itself for i = 0),
    while the engine ran one step per SMC step over every population's prefixes."""
    n = 8
    for seed in range(8):
        engine = ToyEngine()
        infos: list[StepInfo] = []
        out = smc_batch(engine, TOY_PROMPTS, n, max_tokens=TOY_T, seed=seed, on_step=infos.append,
                        **TOY_CASES[case])
        assert len(out) == len(TOY_PROMPTS)
        for i, (prompt, res) in enumerate(zip(TOY_PROMPTS, out)):
            alone = smc(ToyEngine(), prompt, n, max_tokens=TOY_T, seed=seed if i == 0 else [seed, i],
                        **TOY_CASES[case])
            assert _same(res, alone), (seed, i)
            assert [info.step for info in infos if info.prompt == i] == list(range(1, res.steps + 1))
        # one engine.step per SMC step for all populations; population i within ids i*n .. i*n+n-1
        steps = max(r.steps for r in out)
        assert steps - 1 <= len(engine.steps) <= steps < sum(r.steps for r in out)
        assert sum(len(s) for s in engine.steps) == sum(r.engine_rows for r in out)
        for t, seqs in enumerate(engine.steps, start=1):
            rows = {info.prompt: info.rows for info in infos if info.step == t}
            for i, r in rows.items():
                assert sorted(s for s in seqs if i * n <= s < (i + 1) * n) == list(range(i * n, i * n + r))
            assert len(seqs) == sum(rows.values())
        assert engine.seqs == {}


def test_seeds_and_timeout() -> None:
    engine = ToyEngine()
    a = smc_batch(engine, TOY_PROMPTS[:2], 8, proposal=OddB(TOY_VOCAB), max_tokens=TOY_T, seed=3)
    b = smc_batch(engine, TOY_PROMPTS[:2], 8, proposal=OddB(TOY_VOCAB), max_tokens=TOY_T, seed=3)
    assert all(_same(x, y) for x, y in zip(a, b))
    # the same prompt twice: different streams, so (almost surely) different particles
    c = smc_batch(engine, [TOY_PROMPTS[0]] * 2, 8, proposal=OddB(TOY_VOCAB), max_tokens=TOY_T, seed=3)
    assert [p.tokens for p in c[0].particles] != [p.tokens for p in c[1].particles]
    assert smc_batch(engine, [], 8) == []
    slow = ToyEngine(delay=0.03)
    res = smc_batch(slow, TOY_PROMPTS[:2], 8, max_tokens=60, timeout=0.1, seed=0)
    assert all(r.timed_out for r in res) and res[0].steps == res[1].steps and 1 <= res[0].steps < 10
    assert all(r.wall_time < 1.0 for r in res) and slow.seqs == {}


def test_prompt_conditioned_potentials_are_not_shared() -> None:
    engine = ToyEngine()
    shared = EchoCritic(TOY_VOCAB)
    for critics in (shared, [Soft(TOY_VOCAB), Scaled(shared, 2.0)], Product([Soft(TOY_VOCAB), shared])):
        with pytest.raises(KilnError, match="pass a callable") as err:
            smc_batch(engine, TOY_PROMPTS[:2], 4, critics=critics, max_tokens=TOY_T, seed=0)
        assert "\n" not in str(err.value)
    with pytest.raises(KilnError, match="pass a callable"):  # a callable that hands out one object
        smc_batch(engine, TOY_PROMPTS[:2], 4, critics=lambda i: shared, max_tokens=TOY_T, seed=0)
    assert Product([Soft(TOY_VOCAB), shared]).prompt_conditioned and not OddB(TOY_VOCAB).prompt_conditioned
    # one prompt: sharing is moot
    smc_batch(engine, TOY_PROMPTS[:1], 4, critics=shared, max_tokens=TOY_T, seed=0)
    # the callable form: each prompt's own critic, conditioned on its own prompt
    own = [EchoCritic(TOY_VOCAB) for _ in TOY_PROMPTS]
    out = smc_batch(engine, TOY_PROMPTS, 4, proposal=OddB(TOY_VOCAB), critics=lambda i: own[i],
                    max_tokens=TOY_T, seed=0)
    assert [c.prompts for c in own] == [[p] for p in TOY_PROMPTS]
    for i, res in enumerate(out):
        alone = smc(ToyEngine(), TOY_PROMPTS[i], 4, proposal=OddB(TOY_VOCAB), critics=EchoCritic(TOY_VOCAB),
                    max_tokens=TOY_T, seed=0 if i == 0 else [0, i])
        assert _same(res, alone)


def test_bad_arguments_are_one_line() -> None:
    cases = [
        (ToyEngine(n_seq_max=6), dict(), "n_seq_max=8"),
        (ToyEngine(n_ctx=8), dict(max_tokens=7), "n_ctx=9"),  # the longest prompt (2) + 7
        (ToyEngine(), dict(critics=lambda i: [object()]), "Potential"),
        (ToyEngine(), dict(resampling="fancy"), "unknown resampling"),
    ]
    for engine, kwargs, message in cases:
        with pytest.raises(KilnError, match=message) as err:
            smc_batch(engine, TOY_PROMPTS[1:], **{"n_particles": 4, "max_tokens": TOY_T, **kwargs})
        assert "\n" not in str(err.value)
    with pytest.raises(KilnError, match="list of prompts"):
        smc_batch(ToyEngine(), [4, 0], 4)
    with pytest.raises(KilnError, match="non-empty prompt"):
        smc_batch(ToyEngine(), [[4], []], 4)


# --- the real model -------------------------------------------------------------------------------
CAPITALS = r" (Paris|Rome|Berlin|London)\."
QUESTIONS = ("Q: Name a European capital.\nA:", "Q: In which city is the Colosseum?\nA:")
N, MAX_TOKENS = 4, 8


@pytest.fixture(scope="module")
def gguf(smollm2_dir: Path) -> Path:
    pytest.importorskip("llama_cpp")
    from kiln.fixtures import smollm2_original_gguf

    return smollm2_original_gguf()


@pytest.fixture(scope="module")
def llama(gguf: Path):
    from kiln.runtime import load

    # one thread: llama.cpp's spinning pool slows down badly when the 2 cores are shared (test_smc.py)
    engine = load(gguf, n_ctx=256, n_seq_max=2 * N, threads=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def regex(llama):
    pytest.importorskip("llguidance")
    from kiln.runtime.potentials import Regex

    return Regex(Vocab.from_engine(llama), CAPITALS)


def test_llamacpp_two_prompts(llama, regex) -> None:
    prompts = [llama.tokenize(q) for q in QUESTIONS]
    (one,) = smc_batch(llama, prompts[:1], N, proposal=regex, max_tokens=MAX_TOKENS, seed=1)
    same = smc(llama, prompts[0], N, proposal=regex, max_tokens=MAX_TOKENS, seed=1)
    assert _same(one, same)  # one prompt: the very same engine calls as smc
    calls: list[list[int]] = []
    step = llama.step

    def counted(tokens, seqs):
        calls.append(list(seqs))
        return step(tokens, seqs)

    llama.step = counted
    try:
        out = smc_batch(llama, prompts, N, proposal=regex, max_tokens=MAX_TOKENS, seed=1)
    finally:
        del llama.step
    for res in out:
        assert res.posterior and set(res.posterior) <= {" Paris.", " Rome.", " Berlin.", " London."}
        assert math.isfinite(res.log_ml) and res.log_ml <= 0 and res.wall_time > 0
    steps = max(r.steps for r in out)
    assert steps - 1 <= len(calls) <= steps < sum(r.steps for r in out)
    assert sum(len(c) for c in calls) == sum(r.engine_rows for r in out)
    assert any(min(c) < N <= max(c) for c in calls)  # both populations in one step
    assert llama.positions() == {}
    # llama.cpp's one KV pool: 2 prompts + 2 x 4 x 40 tokens > 256 cells
    with pytest.raises(KilnError, match=r"n_ctx=\d+") as err:
        smc_batch(llama, prompts, N, proposal=regex, max_tokens=40)
    assert "\n" not in str(err.value) and "2 prompts" in str(err.value)
    with pytest.raises(KilnError, match=f"n_seq_max={3 * N}"):
        smc_batch(llama, prompts + prompts[:1], N, proposal=regex, max_tokens=MAX_TOKENS)


def test_llamacpp_reference_critic(gguf: Path, llama, regex) -> None:
    from kiln.runtime import load
    from kiln.runtime.potentials.critic import ReferenceCritic

    prompts = [llama.tokenize(q) for q in QUESTIONS]
    vocab = Vocab.from_engine(llama)
    with load(gguf, n_ctx=256, n_seq_max=2 * N + 1, threads=1) as ref:
        shared = ReferenceCritic(vocab, ref, beta=0.5)
        assert shared.prompt_conditioned
        with pytest.raises(KilnError, match="ReferenceCritic.*pass a callable"):
            smc_batch(llama, prompts, N, proposal=regex, critics=shared, max_tokens=MAX_TOKENS, seed=0)
        own = [ReferenceCritic(vocab, ref, beta=0.5) for _ in prompts]  # one per prompt, one engine
        out = smc_batch(llama, prompts, N, proposal=regex, critics=lambda i: own[i], max_tokens=MAX_TOKENS, seed=0)
        assert [c.prompt for c in own] == prompts
        assert all(r.posterior and math.isfinite(r.log_ml) for r in out)
        fixed = ReferenceCritic(vocab, ref, beta=0.5, prompt=prompts[0])  # its own prompt: shareable
        assert not fixed.prompt_conditioned
        out = smc_batch(llama, prompts, N, proposal=regex, critics=fixed, max_tokens=MAX_TOKENS, seed=0)
        assert all(r.posterior for r in out)


def test_reference_engine_populations_match_separate_runs(smollm2_dir: Path) -> None:
    """The float32 transformers engine gives the same logits for a prefix whatever else is in the batch
    (up to float noise): population i equals smc of prompt i alone with its stream."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("llguidance")
    from kiln.runtime.potentials import Regex
    from kiln.verify.transformers_engine import TransformersEngine

    threads = torch.get_num_threads()
    try:
        engine = TransformersEngine(smollm2_dir, n_seq_max=2 * N, n_ctx=64, threads=1)
        regex = Regex(Vocab.from_engine(engine), CAPITALS)
        prompts = [engine.tokenize(q) for q in QUESTIONS]
        out = smc_batch(engine, prompts, N, proposal=regex, max_tokens=MAX_TOKENS, seed=5)
        for i, res in enumerate(out):
            alone = smc(engine, prompts[i], N, proposal=regex, max_tokens=MAX_TOKENS, seed=5 if i == 0 else [5, i])
            assert [p.tokens for p in res.particles] == [p.tokens for p in alone.particles]
            np.testing.assert_allclose([p.log_weight for p in res.particles],
                                       [p.log_weight for p in alone.particles], atol=1e-3)
            assert abs(res.log_ml - alone.log_ml) < 1e-3 and res.resample_steps == alone.resample_steps
    finally:
        torch.set_num_threads(threads)


def _kiln(*args: str) -> subprocess.CompletedProcess:
    """`kiln` in a subprocess, as tests/test_generate_smc.py runs it (invoking the click group in-process
    would leave click's cached -h/--help option on the command, which scripts/cli_docs.py then prints)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(Path(sys.executable).parent / "kiln"), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_several_prompts(gguf: Path) -> None:
    pytest.importorskip("llguidance")
    args = ["generate", str(gguf), "--chat", "--prompt", "Is ice cold? Answer yes or no.", "--prompt",
            "Is fire cold? Answer yes or no.", "-n", "4", "--regex", r"(Yes|No)\.", "--max-tokens", "6",
            "--seed", "0", "--threads", "1"]
    r = _kiln(*args, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out, list) and len(out) == 2
    for row in out:
        assert row["n_particles"] == 4 and row["cached"] is False and row["prompt_tokens"] > 0
        assert row["posterior"] and all(re.fullmatch(r"(Yes|No)\.", p["text"]) for p in row["posterior"])
        assert re.fullmatch(r"(Yes|No)\.", row["sample"]) and row["log_ml"] is not None
    text = _kiln(*args)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("== prompt 1/2: Is ice cold?") and re.fullmatch(r"(Yes|No)\.", lines[1])
    assert any(line.startswith("== prompt 2/2: Is fire cold?") for line in lines)
    assert text.stderr.count("4 particles") == 2
    single = _kiln(*args[:5], *args[7:], "--json", "--no-cache")
    assert isinstance(json.loads(single.stdout), dict)  # one prompt: the single-result object, as before


def test_readme_smc_batch_example_runs(gguf: Path) -> None:
    pytest.importorskip("llguidance")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## SMC steering", 1)[1]
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    code = next(block for block in blocks if "smc_batch" in block)
    code = code.replace('"out/smol.q4_k_m.gguf"', repr(str(gguf))).replace("n_ctx=1024", "n_ctx=1024, threads=1")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    results = scope["results"]
    assert len(results) == 2
    for result in results:
        assert set(result.posterior) <= {" Paris.", " Rome.", " Berlin.", " London."}
