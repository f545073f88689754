"""Native Arbor checkpoints as kiln-written GPT-2 ONNX graphs, run by kiln's own OnnxEngine.

The graph (kiln.export.onnx_gpt2) is checked against the independent float64 Arbor forward
(kiln.verify.arbor_reference) on the native tensors as written (unpadded FFNs included): full-prompt
scoring, ragged rows prefilled then stepped together, chunked prefill, reordering, positions placed
with `start`, and the end of the position table. float32 vs float64 must agree to max|Δ|/std ≤ 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.checkpoint.arbor import read_arbor, to_gpt2
from kiln.errors import KilnError
from kiln.export.onnx_gpt2 import write_gpt2_onnx
from kiln.fixtures.arbor import POSITIONS, build_arbor_fixtures
from kiln.runtime.onnx_engine import OnnxEngine
from kiln.verify.arbor_reference import arbor_forward

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

PROMPTS = ("The quick brown fox jumps over the lazy dog.", "Arbor grows wider and deeper over time.",
           "1 2 3 4 5 6 7 8 9 10, and then some more numbers: 11 12 13")
TOL = 1e-4  # float32 ONNX vs float64 reference, relative to the logits' std (~2.5)
VARIANTS = ("B", "ffn_grown", "layer_grown")


def raw_state(path: Path) -> dict[str, np.ndarray]:
    """The native tensors exactly as written (grown FFNs unpadded), read without kiln."""
    import torch
    from safetensors.numpy import load_file

    if path.is_dir() and (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    obj = torch.load(path if path.is_file() else path / "pytorch_model.bin", weights_only=True)
    obj = obj.get("model_state_dict", obj)
    return {k: v.numpy() for k, v in obj.items()}


class Built:
    def __init__(self, path: Path, native: Path, tok_dir: Path):
        self.spec, tensors = read_arbor(native, allow_pickle=True)
        self.config, self.state = to_gpt2(self.spec, tensors)
        self.raw = raw_state(native)
        self.tok_dir = tok_dir
        self.path = path
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        self.bos, self.eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
        self.counts = write_gpt2_onnx(self.config, self.state, path, tokenizer_dir=tok_dir,
                                      eos_token_id=self.eos, bos_token_id=self.bos)

    def ref(self, ids: list[int], raw: dict[str, np.ndarray] | None = None, activation: str | None = None,
            start: int = 0) -> np.ndarray:
        tensors = dict(raw or self.raw)
        if start:
            tensors["pos_encoding.pe"] = tensors["pos_encoding.pe"][:, start:]
        return arbor_forward(tensors, np.asarray(ids)[None], self.spec.n_heads, self.spec.ln_eps,
                             activation or self.spec.activation)[0]


def rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / ref.std())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("arbor_onnx")
    paths = build_arbor_fixtures(root / "fixtures")
    tok_dir = paths["B"] / "tokenizer"
    return {name: Built(root / "onnx" / name, paths[name], tok_dir) for name in VARIANTS}


@pytest.fixture(scope="module")
def engines(built: dict[str, Built]):
    opened = {name: OnnxEngine(b.path, n_seq_max=4, threads=2) for name, b in built.items()}
    yield opened
    for engine in opened.values():
        engine.close()


def test_files_and_config(built: dict[str, Built]) -> None:
    b = built["layer_grown"]
    names = sorted(p.name for p in b.path.iterdir())
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(names)
    genai = json.loads((b.path / "genai_config.json").read_text())
    model, dec = genai["model"], genai["model"]["decoder"]
    assert model["type"] == "gpt2" and model["context_length"] == POSITIONS == genai["search"]["max_length"]
    assert model["vocab_size"] == b.spec.vocab and (model["eos_token_id"], model["bos_token_id"]) == (b.eos, b.bos)
    assert genai["search"]["past_present_share_buffer"] is True
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (4, 4, 16)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["inputs"]["position_ids"] == "position_ids"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert b.counts["GroupQueryAttention"] == 4 and b.counts["Gelu"] == 4 and b.counts["LayerNormalization"] == 9
    assert "Erf" not in b.counts and "Tanh" not in b.counts


def test_deterministic(built: dict[str, Built], tmp_path: Path) -> None:
    b = built["B"]
    for _ in range(2):  # the second write replaces the first (onnx would append to an existing data file)
        write_gpt2_onnx(b.config, b.state, tmp_path, tokenizer_dir=b.tok_dir, eos_token_id=b.eos, bos_token_id=b.bos)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (tmp_path / name).read_bytes() == (b.path / name).read_bytes(), name


@pytest.mark.parametrize("name", VARIANTS)
def test_score_matches_reference(built: dict[str, Built], engines, name: str) -> None:
    b, engine = built[name], engines[name]
    for prompt in PROMPTS:
        ids = engine.tokenize(prompt)
        assert ids[0] == engine.bos_id == b.bos and len(ids) > 8
        assert b.eos in engine.eog_ids
        got, ref = engine.score(ids), b.ref(ids)
        assert got.shape == ref.shape == (len(ids), b.spec.vocab)
        assert rel(got, ref) <= TOL, (name, prompt, rel(got, ref))


@pytest.mark.parametrize("name", VARIANTS)
def test_ragged_step_and_reorder(built: dict[str, Built], engines, name: str) -> None:
    b, engine = built[name], engines[name]
    engine.reset()
    rows = [engine.tokenize(p) for p in PROMPTS] + [engine.tokenize("Hi")]
    assert len({len(r) for r in rows}) == 4
    for seq, ids in enumerate(rows):
        last = engine.prefill(ids, seq=seq)
        assert rel(last, b.ref(ids)[-1]) <= TOL
    nxt = [5, 77, 200, 383]
    got = engine.step(nxt, [0, 1, 2, 3])  # rows of four lengths in one batch
    for seq in range(4):
        rows[seq] = rows[seq] + [nxt[seq]]
        assert rel(got[seq], b.ref(rows[seq])[-1]) <= TOL, (name, seq)
    got = engine.step([9, 11], [3, 1])  # non-contiguous rows, given out of order
    rows[3].append(9)
    rows[1].append(11)
    for i, seq in enumerate((3, 1)):
        assert rel(got[i], b.ref(rows[seq])[-1]) <= TOL, (name, seq)
    assert engine.positions() == {s: len(r) for s, r in enumerate(rows)}

    engine.reorder([2, 2, 0, 1])  # all at once: row 0 <- 2, 1 <- 2, 2 <- 0, 3 <- 1
    rows = [list(rows[2]), list(rows[2]), list(rows[0]), list(rows[1])]
    assert engine.positions() == {s: len(r) for s, r in enumerate(rows)}
    nxt = [1, 2, 3, 4]
    got = engine.step(nxt, [0, 1, 2, 3])
    for seq in range(4):
        rows[seq].append(nxt[seq])
        assert rel(got[seq], b.ref(rows[seq])[-1]) <= TOL, (name, seq)
    assert not np.allclose(got[0], got[1])  # same history, different last token
    engine.reset()


def test_chunked_prefill_and_start(built: dict[str, Built]) -> None:
    b = built["ffn_grown"]
    ids = np.random.default_rng(3).integers(0, b.spec.vocab, 40).tolist()
    with OnnxEngine(b.path, n_seq_max=2, threads=2, n_batch=7) as engine:  # prefill in chunks past a filled cache
        assert rel(engine.score(ids), b.ref(ids)) <= TOL
        start = 90
        assert rel(engine.score(ids[:30], start=start), b.ref(ids[:30], start=start)) <= TOL


def test_position_table_end(built: dict[str, Built]) -> None:
    b = built["B"]
    ids = np.random.default_rng(4).integers(0, b.spec.vocab, POSITIONS).tolist()
    with OnnxEngine(b.path, n_seq_max=2, threads=2) as engine:
        assert engine.context_length == engine.n_ctx == POSITIONS
        assert rel(engine.score(ids), b.ref(ids)) <= TOL  # every row of the table, last one included
        engine.prefill(ids[:-1], seq=0)
        last = engine.step([ids[-1]], [0])[0]
        assert rel(last, b.ref(ids)[-1]) <= TOL
        with pytest.raises(KilnError, match="context"):
            engine.step([1], [0])
        engine.reset()
        with pytest.raises(KilnError, match="context"):
            engine.prefill(ids[:10], seq=1, start=POSITIONS - 5)
        with pytest.raises(KilnError, match="context"):
            engine.prefill(ids + [1], seq=1)


@pytest.mark.parametrize("activation", ["relu", "swish"])
def test_other_activations_and_untied_head(built: dict[str, Built], tmp_path: Path, activation: str) -> None:
    b = built["B"]
    config = dict(b.config, activation_function={"relu": "relu", "swish": "silu"}[activation])
    head = np.random.default_rng(5).standard_normal((b.spec.vocab, b.spec.hidden)).astype(np.float32) * 0.3
    state = dict(b.state, **{"lm_head.weight": head})
    config["tie_word_embeddings"] = False
    counts = write_gpt2_onnx(config, state, tmp_path, tokenizer_dir=b.tok_dir)
    assert "Gelu" not in counts and "Transpose" not in counts
    ids = np.random.default_rng(6).integers(0, b.spec.vocab, 24).tolist()
    with OnnxEngine(tmp_path, n_seq_max=1, threads=2) as engine:
        got = engine.score(ids)
    ref = b.ref(ids, raw=dict(b.raw, **{"lm_head.weight": head}), activation=activation)
    assert rel(got, ref) <= TOL


def test_refusals(built: dict[str, Built], tmp_path: Path) -> None:
    b = built["B"]
    with pytest.raises(KilnError, match="activation_function 'quick_gelu'"):
        write_gpt2_onnx(dict(b.config, activation_function="quick_gelu"), b.state, tmp_path)
    state = dict(b.state)
    del state["transformer.h.1.attn.c_proj.bias"]
    with pytest.raises(KilnError, match="transformer.h.1.attn.c_proj.bias is missing"):
        write_gpt2_onnx(b.config, state, tmp_path)
    with pytest.raises(KilnError, match="shape"):
        write_gpt2_onnx(dict(b.config, n_positions=64), b.state, tmp_path)
    with pytest.raises(KilnError, match="no tokenizer.json"):
        write_gpt2_onnx(b.config, b.state, tmp_path, tokenizer_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["A", "C", "layer_grown"])
def test_pipeline_exports_native_arbor_to_onnx_verified(tmp_path: Path, name: str) -> None:
    """`kiln export onnx` on native Arbor: written atomically, verified exactly against Arbor's forward."""
    from kiln.fixtures.arbor import build_arbor_fixtures
    from kiln.pipeline import ONNX_MANIFEST, export_onnx_artifact

    fx = build_arbor_fixtures(tmp_path / "fx")
    result = export_onnx_artifact(fx[name], tmp_path / "out", "fp32", allow_pickle=True,
                                  tokenizer=fx["B"] / "tokenizer", n_heads=4 if name == "C" else None, threads=2)
    ver = result.record["verification"]
    assert ver["passed"] and ver["short_positions"]["rel"] <= 1e-4, ver["criterion"]
    assert (tmp_path / "out" / ONNX_MANIFEST).exists()
    with pytest.raises(KilnError, match="fp32 only"):
        export_onnx_artifact(fx[name], tmp_path / "q", "int4", allow_pickle=True)
    assert not (tmp_path / "q").exists()
