"""Potentials on the real SmolLM2 vocabulary: one conformance suite for every shipped potential,
then specific behaviour per potential.

Conformance (genlm-control's PotentialTests, via kiln.runtime.potentials.checks): (a) soundness —
every prefix of an accepted string has prefix > −inf; (b) logw_next[v] = prefix(s v) − prefix(s)
and logw_next[EOS] = complete(s) − prefix(s); (c) autoregressive factorization over whole accepted
strings; (d) advance never mutates its input; (e) batch_* equal their loops; (f) products follow
from their factors. Accepted strings come from given examples (tokenized by the model), random
walks over the potential's own logw_next, and for grammars the model's greedy completion under
the mask.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("llguidance")

from kiln.errors import KilnError  # noqa: E402
from kiln.fixtures import smollm2_original_gguf  # noqa: E402
from kiln.runtime.llamacpp import LlamaCppEngine  # noqa: E402
from kiln.runtime.potentials import (  # noqa: E402
    FromCallable, JsonSchema, LarkGrammar, Length, Lexicon, Product, ReferenceCritic, Regex, Scaled, SentenceEnd,
    StopSequences, Vocab, checks, from_spec,
)
from kiln.runtime.potentials.grammar import bits_to_logw, ll_tokenizer, special_ids  # noqa: E402

NEG = -math.inf


@pytest.fixture(scope="module")
def gguf(smollm2_dir: Path) -> Path:
    """SmolLM2's original Q4_1 GGUF, kept beside the fixture checkpoint (no export needed)."""
    return smollm2_original_gguf()


@pytest.fixture(scope="module")
def engine(gguf: Path):
    with LlamaCppEngine(gguf, n_ctx=512, n_seq_max=1, threads=1) as eng:
        yield eng


@pytest.fixture(scope="module")
def vocab(engine) -> Vocab:
    return Vocab.from_engine(engine)


@pytest.fixture(scope="module")
def critic_engine(gguf: Path):
    # 9 sequences = the prompt + 8 work sequences: small enough that the tests below evict
    with LlamaCppEngine(gguf, n_ctx=1024, n_seq_max=9, threads=1) as eng:
        yield eng


LARK = 'start: "(" expr ")"\nexpr: NUM | expr "+" expr\nNUM: /[0-9]+/'
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
          "required": ["a"], "additionalProperties": False}
CRITIC_PROMPT = "Write a short sentence about cats."


def _critic(v, ce):
    c = ReferenceCritic(v, ce, beta=0.5)
    c.set_prompt(ce.tokenize(CRITIC_PROMPT))
    return c


# name -> (factory(vocab, critic_engine), example texts, prompt for a masked greedy sample or None)
CASES = {
    "regex": (lambda v, ce: Regex(v, r"[0-9]{3}-[0-9]{4}( ext [0-9]+)?"),
              ["555-1234", "555-1234 ext 12"], "Call me at "),
    "json": (lambda v, ce: JsonSchema(v, SCHEMA), ['{"a": 1}', '{"a": 12, "b": "x y"}'], "JSON: "),
    "lark": (lambda v, ce: LarkGrammar(v, LARK), ["(1+2)", "(10+20+3)"], "Sum: "),
    "stop": (lambda v, ce: StopSequences(v, ["THE END", "\n\n"]), ["Once upon a time. THE END", "a\n\n"], None),
    "stop_soft": (lambda v, ce: StopSequences(v, ["THE END"], penalty=2.0), ["no end here", "THE END"], None),
    "sentence": (lambda v, ce: SentenceEnd(v), ['He said "hi."', "Really?!  ", "Done.\n\n\n"], None),
    "length_tokens": (lambda v, ce: Length(v, min=2, max=12), ["Hello there world"], None),
    "length_chars": (lambda v, ce: Length(v, min=3, max=40, unit="chars"), ["café au lait"], None),
    "length_words": (lambda v, ce: Length(v, min=2, max=6, unit="words"), ["one two  three\nfour"], None),
    "length_soft": (lambda v, ce: Length(v, target=5, unit="words", hard=False, penalty=0.7),
                    ["a b c", "one two three four five six seven"], None),
    "style": (lambda v, ce: Lexicon.style(v, "formal", 1.5),
              ["However, the results therefore indicate a trend.", "yeah gonna be cool"], None),
    "lexicon": (lambda v, ce: Lexicon(v, {"cat": 1.0, "category": 2.0, "dog": -1.5, "café": 0.5}),
                ["The cat sat near the category of dogs, and a dog", "CAT café cat"], None),
    "callable": (lambda v, ce: FromCallable(v, complete=lambda s: s.rstrip().endswith("!"),
                                            prefix=lambda s: "zz" not in s.lower()),
                 ["Wow!", "buzz!"], None),
    "critic": (_critic, [" Cats sleep a lot.", " The cat"], None),
    "product": (lambda v, ce: Regex(v, r"[a-z ]+") * Length(v, max=30, unit="chars")
                * Lexicon(v, {"cat": 1.0, "dog": -1.0}), ["the cat and the dog", "cat"], "Animals: "),
    "scaled": (lambda v, ce: Scaled(Lexicon(v, {"cat": 1.0, "dog": -2.0}), 0.5), ["cat dog cat"], None),
}


@pytest.fixture(scope="module")
def built(vocab, critic_engine) -> dict:
    return {}


def _potential(name, built, vocab, critic_engine):
    if name not in built:
        built[name] = CASES[name][0](vocab, critic_engine)
    return built[name]


def _walk(p, rng, max_tokens=16):
    """Random token-by-token walk through the potential's own logw_next (uniform over allowed
    tokens; EOS taken with probability 0.3 when allowed)."""
    eog = np.array(sorted(p.vocab.eog_ids))
    state, tokens = p.initial_state(), []
    for _ in range(max_tokens):
        row = p.logw_next(state)
        if row is None:
            t = int(rng.integers(17, p.vocab.size))
        else:
            if np.isfinite(row[-1]) and rng.random() < 0.3:
                break
            ok = np.flatnonzero(np.isfinite(row[:-1]))
            ok = ok[~np.isin(ok, eog)]
            if not len(ok):
                break
            t = int(rng.choice(ok))
        tokens.append(t)
        state = p.advance(state, t)
    return tokens


def _greedy(p, engine, prompt, max_tokens=20):
    """The model's greedy completion of `prompt` under the potential's mask (None if it did not end)."""
    eog = np.array(sorted(p.vocab.eog_ids))
    engine.reset()
    logits = engine.prefill(engine.tokenize(prompt), seq=0)
    state, tokens = p.initial_state(), []
    for _ in range(max_tokens):
        row = p.logw_next(state)
        scores = logits + row[:-1]
        eos = float(np.logaddexp.reduce(logits[eog].astype(np.float64))) + float(row[-1])
        scores[eog] = -np.inf
        best = int(np.argmax(scores))
        if eos >= scores[best]:
            return tokens
        if not np.isfinite(scores[best]):
            return None
        tokens.append(best)
        state = p.advance(state, best)
        logits = engine.step([best], [0])[0]
    return None


@pytest.fixture(scope="module")
def samples(built, vocab, engine, critic_engine) -> dict:
    """name -> token lists: examples, two random walks, the greedy masked sample."""
    out = {}

    def get(name):
        if name not in out:
            p = _potential(name, built, vocab, critic_engine)
            _, examples, prompt = CASES[name]
            rng = np.random.default_rng(len(name))
            seqs = [vocab.tokenize(t) for t in examples] + [_walk(p, rng) for _ in range(2)]
            if prompt is not None:
                g = _greedy(p, engine, prompt)
                if g is not None:
                    seqs.append(g)
            out[name] = seqs
        return out[name]

    return get


def _states(p, seqs, limit=8):
    """Distinct states along the sample token lists (prefix > −inf ones first)."""
    live, dead = [], []
    for toks in seqs:
        s = p.initial_state()
        for k, t in enumerate([None] + list(toks)):
            if t is not None:
                s = p.advance(s, t)
            (live if p.prefix(s) > NEG else dead).append(s)
            if k >= 6:
                break
    return live[:limit], dead[:2]


# --- conformance ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_soundness(name, built, vocab, critic_engine, samples):
    p = _potential(name, built, vocab, critic_engine)
    seqs = samples(name)
    accepted = [s for s in seqs if p.complete_of(s) > NEG]
    assert accepted, f"{name}: no accepted sample among {len(seqs)}"
    assert checks.check_soundness(p, accepted) == []


@pytest.mark.parametrize("name", CASES)
def test_logw_next_consistency(name, built, vocab, critic_engine, samples):
    p = _potential(name, built, vocab, critic_engine)
    if p.logw_next(p.initial_state()) is None:
        pytest.skip(f"{name} is not proposal-capable")
    rng = np.random.default_rng(7)
    eog = np.array(sorted(vocab.eog_ids))
    live, _ = _states(p, samples(name))
    for s in live[::2][:4]:
        row = p.logw_next(s)
        allowed = np.flatnonzero(np.isfinite(row[:-1]))
        allowed = allowed[~np.isin(allowed, eog)]
        toks = list(rng.choice(allowed, min(25, len(allowed)), replace=False)) if len(allowed) else []
        toks += [t for t in rng.integers(17, vocab.size, 25) if t not in vocab.eog_ids]
        assert checks.check_logw_next(p, s, toks) == [], name


@pytest.mark.parametrize("name", CASES)
def test_autoregressive_factorization(name, built, vocab, critic_engine, samples):
    p = _potential(name, built, vocab, critic_engine)
    if p.logw_next(p.initial_state()) is None:
        pytest.skip(f"{name} is not proposal-capable")
    accepted = [s for s in samples(name) if p.complete_of(s) > NEG]
    for toks in accepted[:3]:
        assert checks.check_autoreg(p, toks) == [], (name, vocab.text(toks))


@pytest.mark.parametrize("name", CASES)
def test_advance_does_not_mutate(name, built, vocab, critic_engine, samples):
    p = _potential(name, built, vocab, critic_engine)
    live, dead = _states(p, samples(name))
    rng = np.random.default_rng(3)
    for s in live[:3] + dead[:1]:
        toks = [int(t) for t in rng.integers(17, vocab.size, 4)] + samples(name)[0][:2]
        assert checks.check_immutable(p, s, toks) == [], name


@pytest.mark.parametrize("name", CASES)
def test_batch_equals_loop(name, built, vocab, critic_engine, samples):
    p = _potential(name, built, vocab, critic_engine)
    live, dead = _states(p, samples(name))
    states = live + dead + live[:2]  # shared state objects, as after resampling
    assert checks.check_batch(p, states) == [], name
    assert p.batch_prefix([]).shape == (0,)


def test_products_follow_from_factors(built, vocab, critic_engine, samples):
    prod = _potential("product", built, vocab, critic_engine)
    assert isinstance(prod, Product) and len(prod.factors) == 3
    nested = Product([prod, Scaled(Lexicon(vocab, ["cat"]), 2.0)])
    assert len(nested.factors) == 4  # flattened
    for p in (prod, nested):
        for toks in samples("product")[:3]:
            s = p.state_of(toks)
            parts = [f.state_of(toks) for f in p.factors]
            assert p.prefix(s) == pytest.approx(sum(f.prefix(x) for f, x in zip(p.factors, parts)))
            assert p.complete(s) == pytest.approx(sum(f.complete(x) for f, x in zip(p.factors, parts)))
            want = np.sum([f.logw_next(x) for f, x in zip(p.factors, parts)], axis=0)
            got = p.logw_next(s)
            assert np.array_equal(np.isneginf(got), np.isneginf(want))
            fin = np.isfinite(want)
            np.testing.assert_allclose(got[fin], want[fin], atol=1e-5)
    assert prod.boolean is False and (Regex(vocab, "a") * Length(vocab, max=3)).boolean is True
    with_critic = prod * FromCallable(vocab, complete=lambda s: True)
    assert with_critic.logw_next(with_critic.initial_state()) is None  # a critic factor: not a proposal
    scaled = Scaled(Length(vocab, target=3, hard=False, penalty=1.0), 0.5)
    assert scaled.complete(scaled.state_of([100, 200])) == pytest.approx(-0.5)  # |2 − 3| tokens, times 0.5
    with pytest.raises(ValueError):
        Scaled(prod, 0.0)


# --- grammars -----------------------------------------------------------------------------------------

def test_regex_accepts_and_rejects(vocab):
    r = Regex(vocab, r"[0-9]{3}-[0-9]{4}")
    assert r.complete_of(vocab.tokenize("555-1234")) == 0.0
    assert r.complete_of(vocab.tokenize("555-12345")) == NEG
    assert r.prefix_of(vocab.tokenize("555-12")) == 0.0
    assert r.complete_of(vocab.tokenize("555-12")) == NEG
    assert r.prefix_of(vocab.tokenize("55a")) == NEG
    assert r.boolean
    # masks come from the model's own vocabulary; control tokens never match grammar text
    any_text = Regex(vocab, r"(.|\n)*")
    row = any_text.logw_next(any_text.initial_state())
    im_start = [i for i, b in enumerate(vocab.token_bytes) if b == b"<|im_start|>"]
    assert im_start and row[im_start[0]] == NEG
    assert row[vocab.tokenize(" hello")[0]] == 0.0 and row[-1] == 0.0
    assert special_ids(vocab) >= set(vocab.eog_ids)
    assert ll_tokenizer(vocab) is ll_tokenizer(vocab)  # built once per vocabulary


def test_grammar_eos_agrees_with_matcher(vocab, samples, built, critic_engine):
    """The EOS entry comes from the mask's EOS bit; it must equal llguidance's is_accepting()."""
    for name in ("regex", "json", "lark"):
        p = _potential(name, built, vocab, critic_engine)
        for toks in samples(name):
            s = p.initial_state()
            for t in toks:
                s = p.advance(s, t)
                if p.prefix(s) == NEG:
                    break
                row = p.logw_next(s)
                assert (row[-1] == 0.0) == s.matcher.is_accepting()


def test_json_schema_viable_prefixes(vocab):
    j = JsonSchema(vocab, SCHEMA)
    toks = vocab.tokenize('{"a": 1}')
    assert len(toks) >= 4
    for n in range(len(toks)):
        assert j.prefix_of(toks[:n]) == 0.0
        assert j.complete_of(toks[:n]) == NEG
    assert j.complete_of(toks) == 0.0
    assert j.prefix_of(vocab.tokenize('{"a": "x"}')) == NEG  # a must be an integer
    assert j.prefix_of(vocab.tokenize('{"c": 1}')) == NEG  # no additional properties
    assert JsonSchema(vocab, json.dumps(SCHEMA)).complete_of(toks) == 0.0  # str schema
    for bad, msg in (('{"type": "nonsense"}', "Invalid type"), ("{not json", "not valid JSON"),
                     ({"properties": {"a": {"$ref": "#/nope"}}}, "nope")):
        with pytest.raises(KilnError, match=msg) as err:
            JsonSchema(vocab, bad)
        assert "\n" not in str(err.value)


def test_lark_grammar(vocab, tmp_path):
    g = LarkGrammar(vocab, LARK)
    assert g.complete_of(vocab.tokenize("(1+22+3)")) == 0.0
    assert g.complete_of(vocab.tokenize("(1+)")) == NEG and g.prefix_of(vocab.tokenize("(1+")) == 0.0
    assert g.prefix_of(vocab.tokenize("(1++")) == NEG
    path = tmp_path / "sum.lark"
    path.write_text(LARK)
    assert from_spec(vocab, f"lark:{path}").complete_of(vocab.tokenize("(7)")) == 0.0
    for bad in ("start: foo", "start: 'a'", ""):
        with pytest.raises(KilnError, match="Lark grammar") as err:
            LarkGrammar(vocab, bad)
        assert "\n" not in str(err.value)


def test_bad_regex_is_one_line(vocab):
    for bad, msg in (("(a", "unclosed group"), ("a{2,1}", "repetition"), ("", "empty")):
        with pytest.raises(KilnError, match=msg) as err:
            Regex(vocab, bad)
        assert "\n" not in str(err.value) and "regex" in str(err.value)


def test_mask_cost(vocab, capsys):
    """Measures llguidance on the 49152-token vocabulary with fresh matchers along a random accepted
    path of a regex that allows most words (printed even without -s; bounds are loose: this
    machine is shared)."""
    from llguidance import LLMatcher

    from kiln.runtime.potentials.grammar import _LLState

    p = Regex(vocab, r"[A-Z][a-z]+( [a-z]+)*\.")
    tok = ll_tokenizer(vocab)
    rng = np.random.default_rng(0)
    paths, toks, s = [[]], [], p.initial_state()
    for _ in range(12):
        ok = np.flatnonzero(np.isfinite(p.logw_next(s)[:-1]))
        ok = ok[~np.isin(ok, list(vocab.eog_ids))]
        toks = toks + [int(rng.choice(ok))]
        s = p.advance(s, toks[-1])
        paths.append(toks)

    def fresh(n, start=0):
        out = []
        for k in range(start, start + n):
            m = LLMatcher(tok, p.grammar, log_level=0)
            if paths[k % len(paths)]:
                m.consume_tokens(paths[k % len(paths)])
            out.append(_LLState(m, 0))
        return out

    def timed(fn, n, start=0):
        sts = fresh(n, start)
        t0 = time.perf_counter()
        result = fn(sts)
        return time.perf_counter() - t0, result

    one = [timed(p.batch_mask, 1, k)[0] for k in range(len(paths))]
    cost = {(name, n): timed(fn, n) for n in (16, 64)
            for name, fn in (("batch_mask", p.batch_mask), ("batch_logw_next", p.batch_logw_next))}
    (masks, accepting), rows = cost[("batch_mask", 64)][1], cost[("batch_logw_next", 64)][1]
    assert rows.shape == (64, vocab.size + 1)
    np.testing.assert_array_equal(bits_to_logw(masks, vocab.size), rows[:, :-1])
    np.testing.assert_array_equal(accepting, rows[:, -1] == 0)
    with capsys.disabled():
        print(f"\n[mask cost] one mask median {np.median(one) * 1e3:.2f} ms; "
              + "; ".join(f"{name} {n}: {t * 1e3:.1f} ms" for (name, n), (t, _) in cost.items()))
    assert np.median(one) < 0.02 and cost[("batch_logw_next", 64)][0] < 10


# --- end conditions, length, lexicon, callable ----------------------------------------------------------

def test_stop_string_spanning_tokens(vocab):
    stop = StopSequences(vocab, ["THE END"])
    toks = vocab.tokenize("And so it ends. THE END")
    assert [vocab.token_bytes[t] for t in toks[-2:]] == [b" THE", b" END"]  # split across two tokens
    assert stop.complete_of(toks) == 0.0 and stop.complete_of(toks[:-1]) == NEG
    assert all(stop.prefix_of(toks[:n]) == 0.0 for n in range(len(toks) + 1))
    assert stop.logw_next(stop.state_of(toks))[-1] == 0.0
    assert stop.logw_next(stop.state_of(toks[:-1]))[-1] == NEG
    assert stop.boolean
    soft = StopSequences(vocab, "THE END", penalty=3.0)
    assert soft.complete_of(toks[:-1]) == -3.0 and not soft.boolean
    assert from_spec(vocab, "stop:a\\,b,\\n\\n").stops == ["a,b", "\n\n"]
    with pytest.raises(KilnError):
        StopSequences(vocab, [""])


def test_sentence_end(vocab):
    s = SentenceEnd(vocab)
    for text, ends in (('He said "hi."', True), ("Really?!  ", True), ("Wait…", True), ("(Yes.)", True),
                       ("Done." + "\n" * 40, True), ("no end", False), ("3.5 apples", False), ("", False)):
        assert (s.complete_of(vocab.tokenize(text)) == 0.0) is ends, text
    assert SentenceEnd(vocab, penalty=1.5).complete_of(vocab.tokenize("no end")) == -1.5
    assert from_spec(vocab, "sentence").complete_of(vocab.tokenize("ok.")) == 0.0
    assert from_spec(vocab, "sentence:penalty=2").complete_of(vocab.tokenize("ok")) == -2.0


def test_length_units(vocab):
    text = "café au lait"
    toks = vocab.tokenize(text)
    assert Length(vocab, min=12, max=12, unit="chars").complete_of(toks) == 0.0  # é is one character
    assert Length(vocab, min=3, max=3, unit="words").complete_of(toks) == 0.0
    assert Length(vocab, min=len(toks), max=len(toks)).complete_of(toks) == 0.0
    words = Length(vocab, min=3, max=3, unit="words")
    long_word = vocab.tokenize("unbelievably")
    assert len(long_word) > 1 and words.complete_of(vocab.tokenize("a b unbelievably")) == 0.0  # counts once
    assert words.complete_of(vocab.tokenize("a b")) == NEG and words.prefix_of(vocab.tokenize("a b")) == 0.0
    assert words.prefix_of(vocab.tokenize("a b c d")) == NEG  # over the max: dead prefix
    assert words.complete_of(vocab.tokenize("  a\n\nb   c  ")) == 0.0
    soft = Length(vocab, target=5, unit="words", hard=False, penalty=0.5)
    assert soft.complete_of(vocab.tokenize("a b c")) == -1.0 and soft.prefix_of(vocab.tokenize("a b c d e f g")) == 0.0
    assert from_spec(vocab, "length:max=40").max == 40
    lw = from_spec(vocab, "length:min=5,max=40,unit=words")
    assert (lw.min, lw.max, lw.unit, lw.hard) == (5, 40, "words", True)
    ls = from_spec(vocab, "length:target=30,penalty=0.5,unit=chars")
    assert (ls.min, ls.max, ls.hard, ls.penalty) == (30, 30, False, 0.5)
    for bad in ("length:max=x", "length:foo=1", "length:unit=lines,max=3", "length:min=5,max=2", "length:"):
        with pytest.raises(KilnError):
            from_spec(vocab, bad)


def test_lexicon_counts(vocab):
    lex = Lexicon(vocab, {"cat": 1.0, "category": 2.0, "dog": -1.5})
    toks = vocab.tokenize("The cat sat near the category of dogs, and a dog")
    s = lex.state_of(toks)
    assert lex.prefix(s) == pytest.approx(3.0)  # cat + category; "dogs" is another word; the last dog unfinished
    assert lex.complete(s) == pytest.approx(1.5)  # ... the final "dog" counts at complete
    assert lex.complete_of(vocab.tokenize("CAT. Concatenate cats")) == pytest.approx(1.0)  # case-insensitive, whole words
    assert Lexicon(vocab, ["cat"], strength=2.0).complete_of(vocab.tokenize("cat cat")) == pytest.approx(4.0)
    formal = Lexicon.style(vocab, "formal", 2.0)
    assert formal.complete_of(vocab.tokenize("However, we therefore proceed.")) == pytest.approx(4.0)
    assert formal.complete_of(vocab.tokenize("yeah gonna")) == pytest.approx(-4.0)
    assert from_spec(vocab, "style:technical:0.5").complete_of(vocab.tokenize("the cache")) == pytest.approx(0.5)
    with pytest.raises(KilnError, match="single word"):
        Lexicon(vocab, ["two words"])
    with pytest.raises(KilnError, match="unknown style"):
        Lexicon.style(vocab, "pirate")


def test_lexicon_from_file(vocab, tmp_path):
    (tmp_path / "w.txt").write_text("# my words\ncat 2\ndog -1  # comment\nbird\n")
    (tmp_path / "w.json").write_text('{"cat": 2, "dog": -1}')
    text = vocab.tokenize("cat dog bird")
    assert from_spec(vocab, f"lexicon:{tmp_path / 'w.txt'}").complete_of(text) == pytest.approx(2.0)
    assert from_spec(vocab, f"lexicon:{tmp_path / 'w.json'}:3").complete_of(text) == pytest.approx(3.0)
    (tmp_path / "bad.txt").write_text("cat two\n")
    with pytest.raises(KilnError, match="not a number"):
        Lexicon.from_file(vocab, tmp_path / "bad.txt")


def test_callable_results(vocab):
    toks = vocab.tokenize("hello world")
    assert FromCallable(vocab, complete=lambda s: True).complete_of(toks) == 0.0
    assert FromCallable(vocab, complete=lambda s: np.bool_(False)).complete_of(toks) == NEG
    assert FromCallable(vocab, complete=lambda s: -len(s)).complete_of(toks) == -11.0
    p = FromCallable(vocab, complete=lambda s: 0.0)
    assert p.prefix_of(toks) == 0.0 and p.logw_next(p.initial_state()) is None  # prefix None -> 0; a critic
    banned = FromCallable(vocab, complete=lambda s: True, prefix=lambda s: "world" not in s)
    assert banned.prefix_of(toks[:1]) == 0.0 and banned.prefix_of(toks) == NEG
    assert banned.complete_of(toks) == NEG  # complete respects a dead prefix
    seen = []
    partial = FromCallable(vocab, complete=lambda s: True, prefix=lambda s: seen.append(s) or True)
    byte = {b: i for i, b in reversed(list(enumerate(vocab.token_bytes)))}
    c, lead, cont = byte[b"c"], byte[b"\xc3"], byte[b"\xa9"]  # "é" = C3 A9, one byte per token
    partial.prefix_of([c, lead])
    partial.prefix_of([c, lead, cont])
    assert seen == ["c", "cé"]  # the incomplete character is held back, not replaced
    for bad in (float("nan"), "yes", None, math.inf):
        with pytest.raises(KilnError):
            FromCallable(vocab, complete=lambda s, b=bad: b).complete_of(toks)
    assert from_spec(vocab, "python:os.path:isabs").complete_of(vocab.tokenize("/x")) == 0.0


# --- reference critic -------------------------------------------------------------------------------------

def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def test_critic_equals_engine_log_prob(vocab, engine, critic_engine):
    prompt = engine.tokenize("The capital of France is")
    x = vocab.tokenize(" Paris, and the capital of Italy is Rome.")
    c = ReferenceCritic(vocab, critic_engine, beta=0.5, prompt=prompt)
    lp = _log_softmax(engine.score(prompt + x))
    direct = sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(x))
    eos = np.logaddexp.reduce(lp[-1, sorted(vocab.eog_ids)])
    s = c.state_of(x)
    assert c.prefix(s) == pytest.approx(0.5 * direct, abs=1e-3)
    assert c.complete(s) == pytest.approx(0.5 * (direct + eos), abs=1e-3)
    row = c.logw_next(c.state_of(x[:3]))
    np.testing.assert_allclose(row[:-1], 0.5 * lp[len(prompt) + 2], atol=1e-3)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_qwen2_f32_gguf: Path) -> Path:
    return tiny_qwen2_f32_gguf


def test_critic_batches_and_evicts(tiny_gguf):
    """SMC-like use: 8 particles, shared parents after resampling, more live prefixes than work
    sequences (eviction). Every score equals the engine's own log-probability of the path.

    Run on the tiny f32 model with an f32 cache and no flash attention: there the batched steps
    agree with a one-sequence `score` to ~1e-5. On quantized GGUFs llama.cpp's logits depend on the
    batch composition and KV-cell layout at the 0.1-0.5 nat level (8-bit activation rounding
    amplifies summation-order differences), so exact checks there are meaningless."""
    opts = dict(threads=1, flash_attn=False, type_k=0, type_v=0)
    with LlamaCppEngine(tiny_gguf, n_ctx=256, n_seq_max=1, **opts) as ref, \
            LlamaCppEngine(tiny_gguf, n_ctx=512, n_seq_max=6, **opts) as eng:
        v = Vocab.from_engine(eng)
        prompt = eng.tokenize("hello there")
        c = ReferenceCritic(v, eng, beta=0.7, prompt=prompt)
        rng = np.random.default_rng(0)
        frontier, seen = [c.initial_state()], []
        for _ in range(5):
            parents = [frontier[i] for i in rng.integers(0, len(frontier), 8)]  # "resampling"
            frontier = [c.advance(s, int(t)) for s, t in zip(parents, rng.integers(5, v.size - 5, 8))]
            seen += list(zip(frontier, c.batch_prefix(frontier)))
        ends = c.batch_complete(frontier)
        for state, value in seen[::3] + seen[-4:]:
            lp = _log_softmax(ref.score(prompt + list(state.tokens)))
            direct = sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(state.tokens))
            assert value == pytest.approx(0.7 * direct, abs=1e-4)
        lp = _log_softmax(ref.score(prompt + list(frontier[-1].tokens)))
        eos = np.logaddexp.reduce(lp[-1, sorted(v.eog_ids)])
        direct = sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(frontier[-1].tokens))
        assert ends[-1] == pytest.approx(0.7 * (direct + eos), abs=1e-4)
        c.set_prompt([1, 2])  # built with its own prompt: the sampler's prompt does not replace it
        assert c.prompt == prompt and c.prefix(frontier[0]) == seen[-8][1]
        with pytest.raises(KilnError, match="earlier prompt"):
            c.condition_on(prompt)
            c.prefix(frontier[0])


def test_critic_refuses_other_vocabulary(vocab, tiny_gguf):
    with LlamaCppEngine(tiny_gguf, n_ctx=64, n_seq_max=2, threads=1) as eng:
        with pytest.raises(KilnError, match="vocabulary") as err:
            ReferenceCritic(vocab, eng, prompt=[1])
        assert "\n" not in str(err.value)


# --- registry -----------------------------------------------------------------------------------------------

def test_from_spec(vocab, gguf, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    kinds = {"regex:[0-9]+": Regex, f"json:{schema}": JsonSchema, 'json:{"type": "integer"}': JsonSchema,
             "stop:END": StopSequences, "sentence": SentenceEnd, "length:max=4": Length, "style:formal": Lexicon,
             "python:os.path:isabs": FromCallable}
    for spec, kind in kinds.items():
        assert isinstance(from_spec(vocab, spec), kind), spec
    assert from_spec(vocab, "regex:a:b").pattern == "a:b"
    assert from_spec(vocab, "style:formal:2.5").strength == 2.5
    critic = from_spec(vocab, f"critic:{gguf}:0.25", engine_options={"n_ctx": 128, "n_seq_max": 3, "threads": 1},
                       open_engine=LlamaCppEngine)
    assert isinstance(critic, ReferenceCritic) and critic.beta == 0.25
    critic.set_prompt([1, 2, 3])
    assert critic.prefix(critic.state_of(vocab.tokenize(" hi"))) < 0
    critic.engine.close()
    for bad, msg in (("nope:1", "unknown potential"), ("critic:x.gguf", "engine opener"), ("regex:(a", "unclosed"), ("json:/no/file.json", "no such"),
                     ("lark:/no/file.lark", "no such"), ("style:pirate", "unknown style"), ("stop", "needs arguments"),
                     ("python:os.path", "MODULE:FUNCTION"), ("python:no_such_mod_x:f", "cannot import"),
                     ("sentence:penalty=abc", "number"), ("", "empty"), ("length:max", "key=value")):
        with pytest.raises(KilnError, match=msg) as err:
            from_spec(vocab, bad)
        assert "\n" not in str(err.value), bad
