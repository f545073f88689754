"""llama.cpp's engine on a recurrent (hybrid) model: copies, resampling, dropping, the prompt cache, SMC.

tiny-qwen3_5 (three Gated DeltaNet layers and one gated attention layer) as an f32 GGUF. A DeltaNet layer
keeps one state per sequence, the state after its last token, in one of llama.cpp's recurrent cells (one
per sequence id); copying a sequence shares the cell until the next write. Every operation is checked
against running the same tokens afresh:

* a copy is exact: llama.cpp's serialization of the copy equals the original's byte for byte (but for the
  sequence ids), also after both are fed the same tokens;
* after copies, `reorder` (SMC's resampling) and `drop_seq`, every sequence's logits equal those of a fresh
  engine that decoded its tokens (its ancestor's history) directly, to float32 round-off: 1e-5 of the
  logits' spread. (Not bit for bit: the attention layer's shared K/V cells sit at other cell indices than
  a fresh sequence's, which changes float summation order, exactly as on a pure-attention model;
  test_engine_reorder.py allows the same.)
* the prompt cache reuses a cached prompt only whole (a recurrent state cannot be cut back), keeps a
  checkpoint where two prompts part so that a shared system prompt is decoded once, and its hits give a
  fresh prefill's logits, then and on the steps after;
* SMC: test_smc.py's enumerated target through forks equals the one from fresh scoring, and SMC through
  this engine draws, particle for particle, what SMC over fresh prefills draws.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from finite_language import FiniteLanguage, exact_laws  # noqa: E402

from kiln.runtime.engine import Engine  # noqa: E402
from kiln.runtime.llamacpp import LlamaCppEngine  # noqa: E402
from kiln.runtime.potentials.base import Vocab  # noqa: E402
from kiln.runtime.smc import smc, smc_batch  # noqa: E402

PROMPT = list(range(5, 25))


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    from kiln.fixtures import build
    from kiln.pipeline import export_gguf_artifact

    out = tmp_path_factory.mktemp("recurrent") / "tiny-qwen3_5.f32.gguf"
    export_gguf_artifact(build("tiny-qwen3_5", progress=False), out, "f32", verify=False)
    return out


def _engine(gguf: Path, **kw) -> LlamaCppEngine:
    return LlamaCppEngine(gguf, n_ctx=kw.pop("n_ctx", 512), n_seq_max=kw.pop("n_seq_max", 8), threads=1,
                          flash_attn=False, type_k=0, type_v=0, **kw)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(want.std()))


def _state(e: LlamaCppEngine, seq: int) -> bytes:
    """llama.cpp's own serialization of one sequence (its K/V cells and its recurrent state)."""
    lc = e._lc
    n = lc.llama_state_seq_get_size(e._ctx, seq)
    buf = (ctypes.c_uint8 * n)()
    return bytes(buf[:lc.llama_state_seq_get_data(e._ctx, buf, n, seq)])


def _same_but_ids(a: bytes, b: bytes, src: int, dst: int) -> bool:
    """Equal byte for byte except the sequence-id fields (src in one, dst in the other)."""
    return len(a) == len(b) and all((x, y) == (src, dst) for x, y in zip(a, b) if x != y)


def test_a_copy_is_exact(gguf: Path) -> None:
    """The copy's serialized state equals the original's (only the sequence ids differ), and stays so while
    both are fed the same tokens; their logits then differ only by float summation order (see above)."""
    with _engine(gguf) as e:
        assert e.recurrent and e._slots  # hybrids get a prompt cache too
        e.prefill(PROMPT, seq=0)
        e.copy_seq(0, 3)
        assert e.positions() == {0: len(PROMPT), 3: len(PROMPT)}
        assert _same_but_ids(_state(e, 0), _state(e, 3), 0, 3)
        for tok in (30, 31, 32):
            rows = e.step([tok, tok], [0, 3])
            assert _same_but_ids(_state(e, 0), _state(e, 3), 0, 3)
            _close(rows[1], rows[0])
        e.step([40, 41], [0, 3])  # after different tokens each sequence has its own state
        assert not _same_but_ids(_state(e, 0), _state(e, 3), 0, 3)


def test_copies_reorder_and_drops_match_fresh_sequences(gguf: Path) -> None:
    steps = [[30, 31, 32, 33], [40, 41, 42, 43], [50, 51, 52, 53], [60, 61, 62, 63]]
    ancestors = [2, 0, 2, 1]  # rows 0 and 2 are sources that are also overwritten: spares needed
    with _engine(gguf) as e:
        e.prefill(PROMPT, seq=0)
        for d in (1, 2, 3):
            e.copy_seq(0, d)
        got = [e.step(steps[0], [0, 1, 2, 3]), e.step(steps[1], [0, 1, 2, 3])]
        e.reorder(ancestors)
        got.append(e.step(steps[2], [0, 1, 2, 3]))
        e.drop_seq(3)  # its cell is freed: the next copy reuses it
        e.copy_seq(1, 3)
        got.append(e.step(steps[3], [0, 1, 2, 3]))
        assert e.positions() == {s: len(PROMPT) + 4 for s in range(4)}
    # each row's own history: before resampling its own tokens, after it its ancestor's; then row 3 is row 1
    history = [[steps[0][a], steps[1][a], steps[2][r]] for r, a in enumerate(ancestors)]
    with _engine(gguf) as f:
        for s in range(4):
            f.prefill(PROMPT, seq=s)
        want = [f.step(steps[0], [0, 1, 2, 3]), f.step(steps[1], [0, 1, 2, 3])]
        f.reset()
        for s in range(4):
            f.prefill(PROMPT + history[s][:2], seq=s)
        want.append(f.step([h[2] for h in history], [0, 1, 2, 3]))
        f.reset()
        for s, h in enumerate(history[:3] + [history[1]]):
            f.prefill(PROMPT + h, seq=s)
        want.append(f.step(steps[3], [0, 1, 2, 3]))
    for g, w in zip(got, want):
        _close(g, w)


def test_many_forks_never_run_out_of_cells(gguf: Path) -> None:
    """SMC forks and drops all the time: llama.cpp has exactly n_seq_max recurrent cells, so a dropped or
    overwritten sequence must give its cell back."""
    rng = np.random.default_rng(0)
    with _engine(gguf, n_seq_max=4, prompt_cache=0) as e:
        e.prefill(PROMPT, seq=0)
        for i in range(60):
            live = sorted(e.positions())
            src, dst = int(rng.choice(live)), int(rng.integers(4))
            e.copy_seq(src, dst)  # onto a live sequence or a free id
            live = sorted(e.positions())
            e.step(rng.integers(5, 500, len(live)).tolist(), live)
            if i % 3 == 2 and len(live) > 1:
                e.drop_seq(int(rng.choice(live)))
        live = sorted(e.positions())
        e.copy_seq(live[0], 3 if live[0] != 3 else 2)
        assert _same_but_ids(_state(e, live[0]), _state(e, 3 if live[0] != 3 else 2), live[0],
                             3 if live[0] != 3 else 2)


def _fresh(gguf: Path, prompt: list[int], tail: list[int]) -> list[np.ndarray]:
    with _engine(gguf, prompt_cache=0) as e:
        return [e.prefill(prompt, seq=0)] + [e.step([t], [0])[0] for t in tail]


def test_prompt_cache_reuses_whole_prompts_and_checkpoints(gguf: Path) -> None:
    system = list(range(5, 35))
    a, b, c = system + [40, 41, 42], system + [50, 51], system + [60, 61, 62, 63]
    tail = [70, 71, 72]
    with _engine(gguf) as e:
        decoded = []
        for prompt in (a, a, b, c, a + [80, 81], system, b[:-1]):
            before = _decoded(e)
            e.reset()
            got = [e.prefill_prompt(prompt, seq=0)] + [e.step([t], [0])[0] for t in tail]
            decoded.append(_decoded(e) - before - len(tail))
            for g, w in zip(got, _fresh(gguf, prompt, tail)):
                _close(g, w)
        # miss; exact hit; b parts from a after the system prompt: decoded whole, with a checkpoint there;
        # c starts from the checkpoint; a + 2 extends a; the system prompt is the checkpoint; b[:-1] extends it
        assert decoded == [len(a), 0, len(b), 4, 2, 0, 1]
        assert tuple(system) in e.cached_prompts()


def _decoded(e: LlamaCppEngine) -> int:
    """Tokens this engine has handed to llama_decode so far (counted by wrapping its one decode call)."""
    if not hasattr(e, "_counted"):
        e._counted = 0
        decode = e._decode

        def counting(entries):
            e._counted += len(entries)
            decode(entries)

        e._decode = counting
    return e._counted


# --- SMC on the recurrent model -------------------------------------------------------------------
WORDS = (" Paris", " Rome", " Berlin", " London")
SMC_PROMPT = "Q: Name a European capital.\nA:"
MAX_TOKENS = 8


class FreshPrefills(Engine):
    """The reference: every logit row from a fresh prefill of that sequence's whole history, so no state is
    ever copied, reordered or dropped. Same GGUF, same llama.cpp."""

    def __init__(self, inner: LlamaCppEngine) -> None:
        self.inner = inner
        for name in ("vocab_size", "eog_ids", "bos_id", "add_bos", "chat_template", "context_length"):
            setattr(self, name, getattr(inner, name))
        self.n_ctx, self.n_seq_max = inner.n_ctx, 256
        self.history: dict[int, list[int]] = {}

    def tokenize(self, text, add_special=True, parse_special=True):
        return self.inner.tokenize(text, add_special, parse_special)

    def token_bytes(self, token):
        return self.inner.token_bytes(token)

    def _last(self, tokens: list[int]) -> np.ndarray:
        self.inner.reset()
        out = self.inner.prefill(tokens, seq=0)
        self.inner.reset()
        return out

    def prefill(self, tokens, seq=0, all_logits=False, start=None):
        self.history[seq] = self.history.get(seq, []) + list(tokens)
        return self._last(self.history[seq])

    def step(self, tokens, seqs):
        for t, s in zip(tokens, seqs):
            self.history[s].append(int(t))
        return np.stack([self._last(self.history[s]) for s in seqs])

    def copy_seq(self, src, dst):
        self.history[dst] = list(self.history[src])

    def drop_seq(self, seq):
        self.history.pop(seq, None)

    def positions(self):
        return {s: len(h) for s, h in self.history.items()}


def _every_path(pot: FiniteLanguage) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []

    def walk(state: bytes, tokens: tuple[int, ...]) -> None:
        if pot.complete(state) == 0.0:
            out.append(tokens)
        if len(tokens) < MAX_TOKENS:
            for t, nxt in pot.moves[state].items():
                walk(nxt, tokens + (t,))

    walk(b"", ())
    return out


def test_smc_on_a_recurrent_model_is_smc_on_fresh_prefills(gguf: Path) -> None:
    """The exactness checks of test_smc.py on the hybrid model, in the two parts that involve the engine:

    * the exact target π ∝ p(x EOS)·Φ(x), enumerated breadth first through forks and resampling copies of
      recurrent states (finite_language.exact_laws), equals π from scoring every allowed token path afresh;
    * SMC (8 seeds, 32 particles, and one batch of two prompts) through the recurrent engine, with its
      prompt cache, draws the same particles with the same weights and Ẑ as SMC over fresh prefills.

    Whether SMC's posterior approaches π as particles grow is shown on SmolLM2 (test_smc.py): on this
    fixture's random weights the target hides behind one token of incremental weight e^-6.8 against the
    alternatives (Rome's first token, then its second at p = e^-10.9), which a few hundred particles
    only find now and then (seen: one run in four at N = 256, then Ẑ/Z = e^0.8), as SMC should.
    """
    with _engine(gguf, n_ctx=1024, n_seq_max=128) as e, _engine(gguf, n_seq_max=1, prompt_cache=0) as inner:
        vocab = Vocab.from_engine(e)
        pot = FiniteLanguage(vocab, WORDS)
        prompt = e.tokenize(SMC_PROMPT)
        pi, _, log_z = exact_laws(e, prompt, pot, MAX_TOKENS)
        eog = sorted(e.eog_ids)
        gamma: dict[str, float] = {}
        for path in _every_path(pot):
            logp = inner.score(prompt + list(path)).astype(np.float64)
            logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
            lp = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(path)) + np.logaddexp.reduce(logp[-1, eog])
            text = e.detokenize(path)
            gamma[text] = float(np.logaddexp(gamma.get(text, -np.inf), lp))
        fresh_z = float(np.logaddexp.reduce(list(gamma.values())))
        assert abs(fresh_z - log_z) < 1e-4
        assert set(pi) == set(gamma) == set(WORDS)
        for word, p in pi.items():
            assert abs(p - np.exp(gamma[word] - fresh_z)) < 1e-4

        reference = FreshPrefills(inner)
        for seed in range(8):
            got = smc(e, prompt, 32, proposal=pot, max_tokens=MAX_TOKENS, seed=seed)
            want = smc(reference, prompt, 32, proposal=pot, max_tokens=MAX_TOKENS, seed=seed)
            assert [p.tokens for p in got.particles] == [p.tokens for p in want.particles]
            np.testing.assert_allclose([p.log_weight for p in got.particles],
                                       [p.log_weight for p in want.particles], rtol=0, atol=1e-4)
            assert abs(got.log_ml - want.log_ml) < 1e-4
        prompts = [prompt, e.tokenize("Q: Name a city.\nA:")]
        got = smc_batch(e, prompts, 16, proposal=pot, max_tokens=MAX_TOKENS, seed=1)
        want = smc_batch(reference, prompts, 16, proposal=pot, max_tokens=MAX_TOKENS, seed=1)
        for g, w in zip(got, want):
            assert [p.tokens for p in g.particles] == [p.tokens for p in w.particles]
            assert abs(g.log_ml - w.log_ml) < 1e-4
