"""ONNX export, end to end against real engines: onnxruntime on the artifact vs transformers on the source.

Each artifact is exported once per module and each reference built once per (source, rope).
Verification (kiln.verify.check) already runs the four short prompts as four batch rows
of different lengths that then step together; the tests below add real long sequences,
reordering, generation, onnxruntime-genai interop and the bad-input behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")
pytest.importorskip("torch")

from kiln.checkpoint import load_checkpoint  # noqa: E402
from kiln.checkpoint.rope import RopeSettings, resolve  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.fixtures.tiny import corpus_text  # noqa: E402
from kiln.pipeline import ONNX_MANIFEST, export_onnx_artifact  # noqa: E402
from kiln.runtime import load  # noqa: E402
from kiln.runtime.generate import chat_prompt, generate  # noqa: E402
from kiln.runtime.onnx_engine import OnnxEngine  # noqa: E402
from kiln.verify import tolerances  # noqa: E402
from kiln.verify.check import verify_onnx  # noqa: E402
from kiln.verify.parity import compare  # noqa: E402
from kiln.verify.reference import Reference  # noqa: E402
from kiln.verify.result import Verification  # noqa: E402

THREADS = 2
TEXT_TOKENS = 256
SMOL = "smollm2-135m"
TINY = ("tiny-qwen2", "tiny-qwen3", "tiny-llama")
SCALED = {SMOL: ("yarn:2",), **{name: ("linear:4", "yarn:4") for name in TINY}}
SYSTEM = "Answer the question in one short sentence."
QUESTION = "What is the capital of France?"
KILN = Path(sys.executable).parent / "kiln"


class Store:
    """Exports (verify=False: verification is the tests' job), references and verifications, each made once."""

    def __init__(self, dirs: dict[str, Path], root: Path):
        self.dirs = dirs
        self.root = root
        self._out: dict[tuple[str, str, str], Path] = {}
        self._refs: dict[tuple[str, str], Reference] = {}
        self._ver: dict[tuple[str, str, str], Verification] = {}

    def rope(self, name: str, rope: str) -> RopeSettings:
        return resolve(load_checkpoint(self.dirs[name]).spec.rope, None if rope == "none" else rope)

    def onnx(self, name: str, precision: str, rope: str = "none") -> Path:
        key = (name, precision, rope)
        if key not in self._out:
            out = self.root / f"{name}.{precision}.{rope.replace(':', 'x')}"
            export_onnx_artifact(self.dirs[name], out, precision, rope_scaling=None if rope == "none" else rope,
                                 verify=False)
            self._out[key] = out
        return self._out[key]

    def reference(self, name: str, rope: str = "none") -> Reference:
        key = (name, rope)
        if key not in self._refs:
            self._refs[key] = Reference(self.dirs[name], self.rope(name, rope))
        return self._refs[key]

    def verification(self, name: str, precision: str, rope: str = "none") -> Verification:
        key = (name, precision, rope)
        if key not in self._ver:
            self._ver[key] = verify_onnx(self.onnx(name, precision, rope), self.dirs[name], self.rope(name, rope),
                                         precision, threads=THREADS, reference=self.reference(name, rope),
                                         max_text_tokens=TEXT_TOKENS if rope == "none" else 64)
        return self._ver[key]


@pytest.fixture(scope="module")
def store(fixture_dirs, tmp_path_factory) -> Store:
    return Store(fixture_dirs, tmp_path_factory.mktemp("onnx"))


def _run_kiln(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def _fp32_cases() -> list[tuple[str, str]]:
    return [(name, rope) for name in (*TINY, SMOL) for rope in ("none", *SCALED[name])]


# ------------------------------------------------------------------------------------------ fp32 parity


@pytest.mark.parametrize("case", _fp32_cases(), ids=lambda c: "-".join(c).replace(":", "x"))
def test_fp32_export_matches_transformers(store: Store, case: tuple[str, str]) -> None:
    """Four rows of different lengths (prefilled, then one batched step) and the same prompts placed
    just below the baked context: logits within the flat f32 bound at short and long positions,
    with linear and yarn scaling baked into the graph's rotary tables."""
    name, rope = case
    v = store.verification(name, "fp32", rope)
    assert v.passed, v.summary()
    assert v.short.rel <= tolerances.F32_BASE and v.long.rel <= tolerances.F32_BASE, v.summary()
    assert v.long_start + 1 >= store.rope(name, rope).context_length - 32
    assert v.text_top1 == 1.0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_fp32_real_long_sequence_with_yarn(store: Store, name: str) -> None:
    """Not just a start offset: a 2000-token sequence attends over its whole cache, beyond the
    original 512-token context, with yarn x4 baked in; fed in prefill chunks, then stepped."""
    out = store.onnx(name, "fp32", "yarn:4")
    ref = store.reference(name, "yarn:4")
    with OnnxEngine(out, n_ctx=2048, threads=THREADS, n_batch=512) as engine:
        ids = (engine.tokenize(corpus_text()) * 8)[:2000]
        got = engine.prefill(ids[:1990], all_logits=True)
        steps = [engine.step([t], [0])[0] for t in ids[1990:]]
    want = ref.logits(ids)
    # Attention sums over up to 2000 keys here, and float32 rounding in those sums grows with their
    # length (measured 1.1e-4 on tiny-qwen2), so the bound is the f32 bound at that length, as for GGUF.
    bound = tolerances.f32_bound(len(ids))
    assert compare(want[:1990], got).rel <= bound
    assert compare(want[1990:], np.stack(steps)).rel <= bound


# ------------------------------------------------------------------------------------------ int8 / int4


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_smollm2_kl_is_bounded(store: Store, precision: str) -> None:
    """Faithful (KL within 2x what its own dequantized weights cost + 0.005) and within the quality
    anchor of the matching llama.cpp type (int8 ~ q8_0, symmetric int4 blocks of 32 ~ q4_0)."""
    v = store.verification(SMOL, precision)
    assert v.passed, v.summary()
    assert v.quality is not None and v.quality["within"], (v.text_kl, v.quality)
    assert v.text_kl > 0  # a quantized graph that matched exactly would mean the weights were not quantized
    print(f"{precision}: {v.summary()}")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_smollm2_answers_paris(store: Store, precision: str) -> None:
    with load(store.onnx(SMOL, precision), threads=THREADS) as engine:
        ids = chat_prompt(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
        out = generate(engine, ids, max_tokens=24)
    assert "Paris" in out.text, out.text


def test_sampled_generation_is_seeded(store: Store) -> None:
    with load(store.onnx("tiny-qwen2", "int4"), threads=THREADS) as engine:
        ids = engine.tokenize("hello there")
        runs = [generate(engine, ids, max_tokens=12, temperature=0.8, seed=s).tokens for s in (1, 1, 2)]
    assert runs[0] == runs[1] and len(runs[0]) > 0
    assert runs[0] != runs[2]


def test_reorder_rows_gives_the_logits_of_the_reordered_sequences(store: Store) -> None:
    """Resampling mid-generation: after reorder(ancestors), every row continues exactly as the
    ancestor's sequence does when run again from scratch with the same schedule."""
    out = store.onnx(SMOL, "int4")
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,"]
    rng = np.random.default_rng(0)
    with OnnxEngine(out, n_seq_max=4, n_ctx=256, threads=THREADS) as engine:
        toks = [engine.tokenize(p) for p in prompts]
        for row, ids in enumerate(toks):
            engine.prefill(ids, seq=row)
        history = [list(t) for t in toks]
        for _ in range(3):
            nxt = rng.integers(100, 20000, size=4).tolist()
            engine.step(nxt, [0, 1, 2, 3])
            for row in range(4):
                history[row].append(nxt[row])
        ancestors = [2, 0, 2, 1]
        engine.reorder(ancestors)
        assert engine.positions() == {row: len(history[a]) for row, a in enumerate(ancestors)}
        tail = rng.integers(100, 20000, size=(3, 4)).tolist()
        after = [engine.step(t, [0, 1, 2, 3]) for t in tail]

        # The same sequences from scratch: prefill the prompt, then the same steps, same batch.
        engine.reset()
        for row, a in enumerate(ancestors):
            engine.prefill(toks[a], seq=row)
        for k in range(3):
            engine.step([history[a][len(toks[a]) + k] for a in ancestors], [0, 1, 2, 3])
        again = [engine.step(t, [0, 1, 2, 3]) for t in tail]
    for a, b in zip(after, again):
        np.testing.assert_array_equal(a, b)


def test_copy_drop_and_subset_steps(store: Store) -> None:
    """copy_seq forks a row; stepping a non-contiguous subset leaves the other rows untouched."""
    out = store.onnx("tiny-qwen2", "fp32")
    ref = store.reference("tiny-qwen2")
    with OnnxEngine(out, n_seq_max=3, n_ctx=128, threads=THREADS) as engine:
        ids = engine.tokenize("hello there, general")
        engine.prefill(ids, seq=0)
        engine.copy_seq(0, 2)
        got = engine.step([5, 7], [0, 2])
        assert compare(ref.logits(ids + [5])[-1:], got[:1]).rel <= tolerances.F32_BASE
        assert compare(ref.logits(ids + [7])[-1:], got[1:]).rel <= tolerances.F32_BASE
        engine.prefill(ids[:3], seq=1)
        got = engine.step([9], [2])  # rows 0..2 run together; 0 and 1 must not advance
        assert engine.positions() == {0: len(ids) + 1, 1: 3, 2: len(ids) + 2}
        assert compare(ref.logits(ids + [7, 9])[-1:], got).rel <= tolerances.F32_BASE
        got = engine.step([11], [1])
        assert compare(ref.logits(ids[:3] + [11])[-1:], got).rel <= tolerances.F32_BASE
        engine.drop_seq(1)
        assert 1 not in engine.positions()
        with pytest.raises(KilnError, match="holds no tokens"):
            engine.step([1], [1])


def test_onnxruntime_genai_runs_the_artifact_identically(store: Store) -> None:
    """The directory is a valid onnxruntime-genai model: same tokenizer ids and the same greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    out = store.onnx(SMOL, "int4")
    with OnnxEngine(out, threads=THREADS) as engine:
        ids = chat_prompt(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
        ours = generate(engine, ids, max_tokens=16).tokens
    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    text = engine.detokenize(ids)
    assert list(tok.encode(text)) == ids
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 16, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    theirs = []
    while not gen.is_done() and len(theirs) < len(ours):
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert theirs == ours[:len(theirs)] and len(theirs) == len(ours)


def test_score_matches_prefill_logits(store: Store) -> None:
    """The evaluation hook: log-probs of every position, from an empty cache."""
    out = store.onnx("tiny-qwen3", "fp32")
    ref = store.reference("tiny-qwen3")
    with OnnxEngine(out, threads=THREADS) as engine:
        ids = engine.tokenize(corpus_text())[:100]
        scores = engine.score(ids)
        assert engine.positions() == {}
    assert scores.shape == (100, engine.vocab_size)
    assert compare(ref.logits(ids), scores).rel <= tolerances.F32_BASE


# ------------------------------------------------------------------------------------------ CLI, manifest


def test_cli_export_onnx_json_manifest_and_generate(fixture_dirs, tmp_path: Path) -> None:
    out = tmp_path / "tq2-int4"
    res = _run_kiln("export", "onnx", fixture_dirs["tiny-qwen2"], "-o", out, "-p", "int4", "--block-size", "64",
                    "--asymmetric", "--lm-head", "float", "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert record["verification"]["passed"] and record["options"]["block_size"] == 64
    assert record["options"]["symmetric"] is False and record["options"]["lm_head"] == "float"
    on_disk = json.loads((out / ONNX_MANIFEST).read_text())
    assert on_disk == {**record, "kiln_version": on_disk["kiln_version"]}
    names = {f["name"] for f in record["files"]}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= names
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    res = _run_kiln("inspect", out, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "onnx" and info["precision"] == "int4" and info["position_ids_input"] is True
    res = _run_kiln("generate", out, "--prompt", "hello", "--max-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["prompt_tokens"] > 0


def test_cli_generate_chat_on_onnx_dir(store: Store) -> None:
    res = _run_kiln("generate", store.onnx(SMOL, "int4"), "--chat", "--system", SYSTEM, "--prompt", QUESTION,
                    "--max-tokens", "24")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_export_is_deterministic(fixture_dirs, tmp_path: Path) -> None:
    a = export_onnx_artifact(fixture_dirs["tiny-llama"], tmp_path / "a", "int8", verify=False)
    b = export_onnx_artifact(fixture_dirs["tiny-llama"], tmp_path / "b", "int8", verify=False)
    assert a.record["files"] == b.record["files"]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16"], "targets GPUs"),
    (["--precision", "fp16", "-e", "cuda"], "pass --no-verify"),
    (["--block-size", "48"], "--block-size 48"),
    (["--accuracy-level", "7"], "--accuracy-level 7"),
    (["--original-context", "100"], "only makes sense with --rope-scaling"),
    (["--rope-scaling", "cubic:2"], "--rope-scaling"),
    (["--context", "999999"], "exceeds"),
])
def test_bad_flags_one_line_error_no_output(fixture_dirs, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    res = _run_kiln("export", "onnx", fixture_dirs["tiny-qwen2"], "-o", out, *args)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_sources(tmp_path: Path, fixture_dirs) -> None:
    res = _run_kiln("export", "onnx", tmp_path / "nope", "-o", tmp_path / "o")
    assert res.returncode == 1 and "no such file" in res.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    res = _run_kiln("export", "onnx", bad, "-o", tmp_path / "o")
    assert res.returncode == 1 and "unknown architecture" in res.stderr and "Traceback" not in res.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _run_kiln("export", "onnx", fixture_dirs["tiny-qwen2"], "-o", blocker)
    assert res.returncode == 1 and "not a directory" in res.stderr
    assert not (tmp_path / "o").exists()


def test_unwritable_output(fixture_dirs, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/proc/kiln-onnx-out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    res = _run_kiln("export", "onnx", fixture_dirs["tiny-qwen2"], "-o", target)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_width_equal_to_vocab_is_refused(tmp_path: Path) -> None:
    """The builder would take a 1024-wide MLP projection for the LM head: refuse instead."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.fixtures import fixture_path

    src = tmp_path / "clash"
    cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=1024, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(src)
    tiny = fixture_path("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(KilnError, match="equals vocab_size"):
        export_onnx_artifact(src, tmp_path / "o", "fp32", verify=False)
    assert not (tmp_path / "o").exists()


def test_missing_genai_config_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "genai_config.json").write_text("{not json")
    with pytest.raises(KilnError, match="not valid JSON"):
        load(tmp_path / "d")
    res = _run_kiln("generate", tmp_path / "d", "--prompt", "x")
    assert res.returncode == 1 and "not valid JSON" in res.stderr
