"""GGUF export, end to end against real engines: llama.cpp on the artifact vs transformers on the source.

Every artifact is exported once per module (into a tmp dir) and every reference model is built once
per (source, rope) and shared, so the reference logits are computed once for all artifact types.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from gguf import GGUFReader

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from kiln.atomic import sha256_file  # noqa: E402
from kiln.checkpoint import load_checkpoint  # noqa: E402
from kiln.checkpoint.rope import RopeSettings, resolve  # noqa: E402
from kiln.inspect_artifact import inspect_path  # noqa: E402
from kiln.manifest import manifest_path  # noqa: E402
from kiln.pipeline import export_gguf_artifact, modelfile_path  # noqa: E402
from kiln.runtime.generate import chat_prompt, generate  # noqa: E402
from kiln.runtime.llamacpp import LlamaCppEngine  # noqa: E402
from kiln.verify import tolerances  # noqa: E402
from kiln.verify.check import verify_gguf
from kiln.verify.result import Verification  # noqa: E402
from kiln.verify.parity import compare  # noqa: E402
from kiln.verify.reference import Reference  # noqa: E402

THREADS = 2
TEXT_TOKENS = 256
SCALED_TEXT_TOKENS = 64  # the text KL is not what a scaled float check is about: keep its cost down
SMOL = "smollm2-135m"
TINY = ("tiny-qwen2", "tiny-qwen3", "tiny-llama")
ORIGINAL_CONTEXT = {SMOL: 8192, "tiny-qwen2": 512, "tiny-qwen3": 512, "tiny-llama": 512}
GGUF_ARCH = {SMOL: "llama", "tiny-qwen2": "qwen2", "tiny-qwen3": "qwen3", "tiny-llama": "llama"}
# The factor is sized so the baked context stays affordable: 4 x 512 for the tiny models, 2 x 8192 for SmolLM2.
SCALED = {SMOL: ("linear:2", "yarn:2"), **{name: ("linear:4", "yarn:4") for name in TINY}}
SYSTEM = "Answer the question in one short sentence."
QUESTION = "What is the capital of France?"
KILN = Path(sys.executable).parent / "kiln"


def _cases() -> list[tuple[str, str, str]]:
    # Grouped by (fixture, rope) so each reference's logits are computed once and then reused.
    # SmolLM2's scaled variants only at f32 (the tight bound that checks the rope math itself): each extra
    # SmolLM2 artifact costs seconds, and its f16 at the native rope already covers the f16 path.
    cases = []
    for name in (*TINY, SMOL):
        for rope in ("none", *SCALED[name]):
            for quant in ("f32", "f16"):
                if name == SMOL and rope != "none" and quant == "f16":
                    continue
                cases.append((name, rope, quant))
    return cases


def _id(case: tuple[str, str, str]) -> str:
    return "-".join(case).replace(":", "x")


# ------------------------------------------------------------------------------------------ shared artifacts


class Store:
    """Exports (verify=False: verification is the tests' job), references and verifications, each made once."""

    def __init__(self, dirs: dict[str, Path], root: Path):
        self.dirs = dirs
        self.root = root
        self._gguf: dict[tuple[str, str, str], Path] = {}
        self._refs: dict[tuple[str, str], Reference] = {}
        self._ver: dict[tuple[str, str, str], Verification] = {}

    def rope(self, name: str, rope: str) -> RopeSettings:
        native = load_checkpoint(self.dirs[name]).spec.rope
        return resolve(native, None if rope == "none" else rope)

    def gguf(self, name: str, quant: str, rope: str = "none") -> Path:
        key = (name, quant, rope)
        if key not in self._gguf:
            out = self.root / f"{name}.{quant}.{rope.replace(':', 'x')}.gguf"
            export_gguf_artifact(self.dirs[name], out, quant, rope_scaling=None if rope == "none" else rope,
                                 verify=False, threads=THREADS)
            self._gguf[key] = out
        return self._gguf[key]

    def reference(self, name: str, rope: str) -> Reference:
        key = (name, rope)
        if key not in self._refs:
            self._refs[key] = Reference(self.dirs[name], self.rope(name, rope))
        return self._refs[key]

    def verification(self, name: str, quant: str, rope: str = "none") -> Verification:
        key = (name, quant, rope)
        if key not in self._ver:
            self._ver[key] = verify_gguf(self.gguf(name, quant, rope), self.dirs[name], self.rope(name, rope), quant,
                                         threads=THREADS, reference=self.reference(name, rope),
                                         max_text_tokens=TEXT_TOKENS if rope == "none" else SCALED_TEXT_TOKENS)
        return self._ver[key]


@pytest.fixture(scope="module")
def store(fixture_dirs, tmp_path_factory) -> Store:
    return Store(fixture_dirs, tmp_path_factory.mktemp("gguf"))


def _run_kiln(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps long table cells at the default 80 columns
    return subprocess.run([str(KILN), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------ f32 / f16 parity


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_float_export_matches_transformers(store: Store, case: tuple[str, str, str]) -> None:
    """Next-token logits of llama.cpp on the GGUF vs transformers on the source, short and long positions.

    With scaling baked, verify_gguf's long check starts at context_length - n = factor x original - n,
    i.e. beyond the original context, so it also proves the scaling itself matches.
    """
    name, rope, quant = case
    v = store.verification(name, quant, rope)
    settings = store.rope(name, rope)
    assert v.passed, v.summary()
    assert v.bound is not None
    assert v.short.rel <= v.bound, v.summary()
    assert v.long.rel <= v.bound, v.summary()
    assert v.short.positions > 0 and v.long.positions > 0
    assert settings.context_length is not None
    worst = max(v.short.rel, v.long.rel)
    if quant == "f32":
        # independent of verify_gguf's own bookkeeping: within the f32 bound for the last position of the context
        assert worst <= tolerances.f32_bound(settings.context_length), v.summary()
    else:
        # f16 weights round: the artifact cannot beat the measured floor, and stays within the justified multiple
        assert v.floor_rel is not None and v.floor_rel > 0
        assert worst <= tolerances.float_bound(v.floor_rel, settings.context_length), v.summary()
    assert settings.context_length is not None
    assert v.long_start + 1 >= settings.context_length - 32  # the long check really sits at the end of the context
    if rope != "none":
        assert v.long_start > ORIGINAL_CONTEXT[name], "long check must lie beyond the original context"
    print(f"\n{name} {quant} {rope}: short rel {v.short.rel:.2e}, long rel {v.long.rel:.2e} "
          f"(from {v.long_start}), bound {v.bound:.2e}, floor {v.floor_rel}, text KL {v.text_kl:.2e}")


@pytest.mark.parametrize("name", [*TINY, SMOL])
@pytest.mark.parametrize("rope_index", [0, 1], ids=["linear", "yarn"])
def test_baked_scaling_metadata(store: Store, name: str, rope_index: int) -> None:
    rope = SCALED[name][rope_index]
    kind, factor = rope.split(":")
    reader = GGUFReader(store.gguf(name, "f32", rope))
    arch = GGUF_ARCH[name]

    def get(key: str):
        field = reader.fields.get(key)
        assert field is not None, f"GGUF key {key} missing"
        return field.contents()

    original = ORIGINAL_CONTEXT[name]
    assert get("general.architecture") == arch
    assert get(f"{arch}.rope.scaling.type") == kind
    assert get(f"{arch}.rope.scaling.factor") == pytest.approx(float(factor))
    assert get(f"{arch}.rope.scaling.original_context_length") == original
    assert get(f"{arch}.context_length") == int(float(factor)) * original


def test_unscaled_export_has_no_scaling_keys(store: Store) -> None:
    reader = GGUFReader(store.gguf("tiny-qwen2", "f32"))
    assert "qwen2.rope.scaling.type" not in reader.fields
    assert reader.fields["qwen2.context_length"].contents() == 512


def _corpus_ids(engine: LlamaCppEngine, n: int) -> list[int]:
    text = resources.files("kiln").joinpath("fixtures/data/corpus.txt").read_text(encoding="utf-8")
    ids = engine.tokenize(text)
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("rope_index", [0, 1], ids=["linear", "yarn"])
def test_long_sequence_beyond_original_context(store: Store, name: str, rope_index: int) -> None:
    """One real 1200-token sequence (more than twice the original 512) through both engines, every position."""
    rope = SCALED[name][rope_index]
    n = 1200
    engine = LlamaCppEngine(store.gguf(name, "f32", rope), n_ctx=2048, threads=THREADS, flash_attn=False,
                            type_k=0, type_v=0)
    try:
        ids = _corpus_ids(engine, n)
        got = engine.score(ids)
    finally:
        engine.close()
    ref = store.reference(name, rope).logits(ids)
    assert ref.shape == got.shape == (n, got.shape[1])
    p = compare(ref, got)
    bound = tolerances.f32_bound(n)
    print(f"\n{name} f32 {rope} {n} tokens: rel {p.rel:.2e} (bound {bound:.2e}), top-1 {p.top1:.4f}, "
          f"KL {p.mean_kl:.2e}")
    assert p.rel <= bound, p
    # Positions past the original context, on their own: the part only the scaling makes meaningful.
    tail = compare(ref[ORIGINAL_CONTEXT[name]:], got[ORIGINAL_CONTEXT[name]:])
    assert tail.rel <= bound, tail


# ------------------------------------------------------------------------------------------ quantized SmolLM2


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_smollm2_within_kl_bound(store: Store, quant: str) -> None:
    v = store.verification(SMOL, quant)
    print(f"\n{SMOL} {quant}: text KL {v.text_kl:.4f} (bound {tolerances.KL_BOUNDS[quant]}), "
          f"top-1 {v.text_top1:.3f}, short rel {v.short.rel:.2f}, long rel {v.long.rel:.2f}")
    assert v.passed, v.summary()
    # SmolLM2 is a real model: beyond passing its faithfulness criterion, it must meet the published-anchor
    # KL bound for the type (kiln.verify.tolerances.KL_BOUNDS).
    assert 0 < v.text_kl <= tolerances.KL_BOUNDS[quant], v.summary()
    assert v.text_positions == TEXT_TOKENS


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_smollm2_greedy_chat_answers_paris(store: Store, quant: str) -> None:
    """Greedy chat on the artifact answers "Paris".

    A short system message is given on purpose. Without one, SmolLM2's template inserts its default system
    prompt, and there the reference's first answer token is a near-tie (p('The') = 0.150 vs p('L') = 0.141):
    the faithful f16 picks 'The' and answers Paris (checked below), while q8_0 and q4_k_m - whose few
    thousandths to hundredths of KL are enough to flip such a tie - greedily answer in French without naming
    Paris. With "Answer the question in one short sentence." every type answers "The capital of France is Paris."
    """
    engine = LlamaCppEngine(store.gguf(SMOL, quant), n_ctx=512, threads=THREADS)
    try:
        ids = chat_prompt(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
        text = generate(engine, ids, max_tokens=24).text
        print(f"\n{quant}: {text!r}")
        assert "Paris" in text
        if quant == "f16":
            default = generate(engine, chat_prompt(engine, [{"role": "user", "content": QUESTION}]), max_tokens=24)
            print(f"{quant} (template's default system prompt): {default.text!r}")
            assert "Paris" in default.text
    finally:
        engine.close()


def test_cli_generate_chat(store: Store) -> None:
    path = store.gguf(SMOL, "q4_k_m")
    proc = _run_kiln("generate", path, "--chat", "--system", SYSTEM, "--prompt", QUESTION,
                     "--max-tokens", "24", "--threads", str(THREADS))
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


# ------------------------------------------------------------------------------------------ k-quants, manifest


# The manifest tests export q8_0 with verification on and also hold the KL to the published q8_0 anchor
# (0.01): tiny-qwen3 meets it (0.0036). tiny-qwen2 (0.036) and tiny-llama (0.011) do not - their random weights
# are several times more sensitive than a trained model's (rounding their weights alone to q8_0 in transformers
# already gives KL 0.022 and 0.007) - so they are exported faithfully but are not held to that anchor.
Q8_FIXTURE = "tiny-qwen3"


@pytest.fixture(scope="module")
def exported_twice(fixture_dirs, tmp_path_factory) -> tuple[Path, Path]:
    outs = []
    for d in ("first", "second"):
        out = tmp_path_factory.mktemp(d) / "tiny.q8_0.gguf"
        export_gguf_artifact(fixture_dirs[Q8_FIXTURE], out, "q8_0", threads=THREADS)
        outs.append(out)
    return outs[0], outs[1]


def test_manifest_records_source_options_files_and_verification(exported_twice, fixture_dirs) -> None:
    gguf = exported_twice[0]
    path = manifest_path(gguf)
    assert path.name == "tiny.q8_0.gguf.manifest.json" and path.is_file()
    m = json.loads(path.read_text())
    assert m["kind"] == "gguf"
    assert m["source"]["sha256"] == load_checkpoint(fixture_dirs[Q8_FIXTURE]).source_hash()
    assert len(m["source"]["sha256"]) == 64
    assert m["options"]["quant"] == "q8_0"
    assert m["options"]["rope_scaling"] is None
    (record,) = m["files"]
    assert record == {"name": gguf.name, "sha256": sha256_file(gguf), "size": gguf.stat().st_size}
    assert 8 < m["bits_per_weight"] < 10  # q8_0 is 8.5 bits; 1-D norm tensors stay f32
    assert m["bits_per_weight"] == inspect_path(gguf)["bits_per_weight"]
    ver = m["verification"]
    assert ver["passed"] is True and ver["quant"] == "q8_0"
    assert ver["text_mean_kl"] <= tolerances.KL_BOUNDS["q8_0"]
    assert m["rope"]["context_length"] == 512


def test_export_is_deterministic(exported_twice) -> None:
    a, b = exported_twice
    assert sha256_file(a) == sha256_file(b)
    assert sha256_file(manifest_path(a)) == sha256_file(manifest_path(b))


# ------------------------------------------------------------------------------------------ CLI


def test_cli_export_gguf_json_with_modelfile(tiny_qwen2_dir, tmp_path) -> None:
    out = tmp_path / "tiny.q8_0.gguf"
    proc = _run_kiln("export", "gguf", tiny_qwen2_dir, "-o", out, "--quant", "q8_0", "--modelfile",
                     "--json", "--threads", str(THREADS))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["kind"] == "gguf" and record["options"]["quant"] == "q8_0"
    assert record["verification"]["passed"] is True
    mf = tmp_path / "tiny.q8_0.Modelfile"
    assert mf == modelfile_path(out) and mf.is_file()
    assert "FROM ./tiny.q8_0.gguf" in mf.read_text()
    assert [f["name"] for f in record["files"]] == [out.name, mf.name]
    assert record["files"][0]["sha256"] == sha256_file(out)
    on_disk = json.loads(manifest_path(out).read_text())
    assert {k: v for k, v in on_disk.items() if k != "kiln_version"} == record


def _check_info(info: dict, arch: str, n_params: int, context: int, rope: dict) -> None:
    assert info["architecture"] == arch
    assert info["n_params"] == n_params
    assert info["context_length"] == context
    for key, value in rope.items():
        assert info["rope"][key] == pytest.approx(value), (key, info["rope"])
    assert info["tensor_types"] and all(n > 0 for n in info["tensor_types"].values())
    assert info["bits_per_weight"] > 0


def test_cli_inspect_checkpoint(smollm2_dir) -> None:
    res = _run_kiln("inspect", smollm2_dir, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["n_params"] == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    _check_info(info, "LlamaForCausalLM", 134_515_008, 8192, {"theta": 100000.0, "type": "none"})
    assert info["tensor_types"] == {"F32": 272} and info["bits_per_weight"] == 32.0
    assert info == json.loads(json.dumps(inspect_path(smollm2_dir)))

    text = _run_kiln("inspect", smollm2_dir)
    assert text.returncode == 0, text.stderr
    for needle in ("architecture", "LlamaForCausalLM", "n_params", "134515008", "context_length", "8192",
                   "theta=100000.0", "tensor_types", "F32=272", "bits_per_weight", "32.0"):
        assert needle in text.stdout, (needle, text.stdout)


def test_cli_inspect_gguf(store: Store, fixture_dirs) -> None:
    n_params = inspect_path(fixture_dirs["tiny-qwen2"])["n_params"]
    gguf = store.gguf("tiny-qwen2", "f32", "yarn:4")
    res = _run_kiln("inspect", gguf, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    # tied embeddings: no output.weight in the GGUF, so its element count is the checkpoint's parameter count
    _check_info(info, "qwen2", n_params, 2048, {"type": "yarn", "factor": 4.0, "original_context": 512,
                                                "theta": 1e6})
    assert info["tensor_types"] == {"F32": info["tensor_types"]["F32"]} and info["bits_per_weight"] == 32.0

    q = store.gguf("tiny-qwen2", "q4_k_m")
    qinfo = inspect_path(q)
    text = _run_kiln("inspect", q)
    assert text.returncode == 0, text.stderr
    for needle in ("architecture", "qwen2", "n_params", str(n_params), "context_length", "512", "rope",
                   "theta=1000000.0", "tensor_types", "Q4_K=", "bits_per_weight", str(qinfo["bits_per_weight"])):
        assert needle in text.stdout, (needle, text.stdout)


def test_k_quants_apply_on_hidden_256(store: Store) -> None:
    """tiny-qwen2's hidden size is 256, so q4_k_m really writes Q4_K blocks (no fallback for every matrix)."""
    info = inspect_path(store.gguf("tiny-qwen2", "q4_k_m"))
    types = info["tensor_types"]
    assert types.get("Q4_K", 0) > 0, types
    assert 4.5 < info["bits_per_weight"] < 8, info
    print(f"\ntiny-qwen2 q4_k_m: {types}, {info['bits_per_weight']} bits/weight")


def test_smollm2_q4_k_m_reports_real_bits_per_weight(store: Store) -> None:
    """Hidden 576 is not a multiple of 256: most matrices fall back to Q5_0/Q8_0 (DESIGN.md §5)."""
    info = inspect_path(store.gguf(SMOL, "q4_k_m"))
    types = info["tensor_types"]
    assert "Q4_K" in types and types.get("Q5_0", 0) > types["Q4_K"], types
    assert 5 < info["bits_per_weight"] < 8, info
    print(f"\n{SMOL} q4_k_m: {types}, {info['bits_per_weight']} bits/weight")


def test_inspect_reports_tiny_gguf_rope(store: Store) -> None:
    info = inspect_path(store.gguf("tiny-qwen3", "f16", "linear:4"))
    _check_info(info, "qwen3", info["n_params"], 2048, {"type": "linear", "factor": 4.0, "original_context": 512})
    assert "F16" in info["tensor_types"] and 16 < info["bits_per_weight"] < 17
