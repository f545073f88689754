"""Qwen3.5 (dense Gated DeltaNet hybrid) end to end, on real components.

tiny-qwen3_5 (3 linear-attention layers + 1 full-attention layer, 2 key heads and 4 value heads, so the
converter's value-head reorder applies) is exported at f32 and q8_0 with verification on (llama.cpp's
qwen35 graph against transformers' torch implementation, short positions and the end of the context);
its tensors equal llama.cpp's converter's (`--no-mtp`: transformers does not save the MTP head); a
layer_types entry that contradicts the tensors fails in one line naming the layer and leaves no file;
the published multimodal layout (Qwen3_5ForConditionalGeneration: text_config, `model.language_model.`
tensors, a vision tower) reads to the same GGUF tensors, with the vision tower left out in a warning;
and llama.cpp's engine scores and steps a recurrent model, and samples it with SMC from the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import gguf  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from kiln.errors import KilnError  # noqa: E402
from kiln.fixtures import LLAMA_CPP_PRE, build  # noqa: E402
from kiln.pipeline import export_gguf_artifact  # noqa: E402
from qwen35_layouts import multimodal  # noqa: E402

NAME = "tiny-qwen3_5"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("qwen35")
    out = {}
    for quant in ("f32", "q8_0"):
        path = root / f"{NAME}.{quant}.gguf"
        result = export_gguf_artifact(build(NAME, progress=False), path, quant)
        out[quant] = (path, result.record)
    return out


def _copy(dest: Path) -> Path:
    shutil.copytree(build(NAME, progress=False), dest, ignore=shutil.ignore_patterns(".kiln-*"))
    return dest


def _tensors(path: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape], np.array(t.data))
            for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_export_is_verified_against_transformers(exports, quant: str) -> None:
    _, record = exports[quant]
    v = record["verification"]
    assert v["passed"], v["criterion"]
    assert record["source"]["family"] == "qwen35"
    assert v["short_positions"]["top1"] == 1.0 or quant != "f32"


def test_tensors_equal_llama_cpp_converter(exports, tmp_path: Path) -> None:
    from kiln.fixtures.llama_converter import convert_many

    conv = tmp_path / "conv.gguf"
    convert_many([(build(NAME, progress=False), conv, LLAMA_CPP_PRE[NAME], ["--no-mtp"])], "f32")
    ours, theirs = _tensors(exports["f32"][0]), _tensors(conv)
    assert sorted(ours) == sorted(theirs)
    for name, (t, shape, data) in ours.items():
        assert (t, shape) == theirs[name][:2], name
        assert np.array_equal(data, theirs[name][2]), name


def test_layer_types_contradicting_the_tensors_name_the_layer(tmp_path: Path) -> None:
    src = _copy(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["layer_types"] = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.gguf"
    with pytest.raises(KilnError) as err:
        export_gguf_artifact(src, out, "f32", verify=False)
    msg = str(err.value)
    assert "\n" not in msg and "layer 1:" in msg and "'full_attention'" in msg, msg
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_layer_types_of_the_wrong_length_are_refused(tmp_path: Path) -> None:
    src = _copy(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["layer_types"] = ["linear_attention", "full_attention"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(KilnError, match="layer_types has 2 entries, num_hidden_layers is 4"):
        export_gguf_artifact(src, tmp_path / "out.gguf", "f32", verify=False)


def test_multimodal_layout_reads_to_the_same_tensors(exports, tmp_path: Path) -> None:
    """Same GGUF tensors as the Qwen3_5ForCausalLM layout, and verified (transformers reads the nested
    config and the prefixed tensors as Qwen3_5ForCausalLM)."""
    src = multimodal(tmp_path / "mm")
    out = tmp_path / "mm.gguf"
    result = export_gguf_artifact(src, out, "f32")
    assert result.record["source"]["family"] == "qwen35"
    assert result.record["source"]["architecture"] == "Qwen3_5ForConditionalGeneration"
    assert result.record["verification"]["passed"], result.record["verification"]["criterion"]
    ours, causal = _tensors(out), _tensors(exports["f32"][0])
    assert sorted(ours) == sorted(causal)
    for name, (t, shape, data) in ours.items():
        assert (t, shape) == causal[name][:2] and np.array_equal(data, causal[name][2]), name
    vision = [w for w in result.warnings if "vision tower" in w]
    assert len(vision) == 1 and "\n" not in vision[0], result.warnings


def test_engine_scores_a_recurrent_model_from_fresh_sequences(exports) -> None:
    """Scoring, prefill and step on fresh sequences agree with each other, and a shorter prompt after a
    longer one is decoded afresh (a recurrent state cannot be cut back to a prefix)."""
    from kiln.runtime.llamacpp import LlamaCppEngine

    with LlamaCppEngine(exports["f32"][0], n_ctx=512, n_seq_max=2) as e:
        assert e.recurrent
        ids = list(range(5, 60))
        full = e.score(ids)
        assert np.array_equal(full, e.score(ids))
        scale = float(full.std())
        e.reset()
        last = e.prefill_prompt(ids[:30])
        assert np.abs(last - full[29]).max() < 1e-4 * scale
        for i, t in enumerate(ids[30:40]):
            assert np.abs(e.step([t], [0])[0] - full[30 + i]).max() < 1e-3 * scale
        e.reset()
        again = e.prefill_prompt(ids[:20])  # a shorter prompt after a longer one: nothing reused
        assert np.abs(again - full[19]).max() < 1e-4 * scale
        e.reset()
        e.prefill(ids[:10], seq=0)
        e.prefill(ids[:20], seq=1)
        both = e.step([ids[10], ids[20]], [0, 1])
        assert np.abs(both[0] - full[10]).max() < 1e-4 * scale
        assert np.abs(both[1] - full[20]).max() < 1e-4 * scale


def test_tied_embeddings_are_verified(tmp_path: Path) -> None:
    """Qwen3.5's small releases tie the LM head to the embeddings: no output.weight, and llama.cpp's qwen35
    falls back to token_embd as transformers does."""
    src = _copy(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(config))
    weights = load_file(src / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "tied.gguf"
    result = export_gguf_artifact(src, out, "f32")
    assert result.record["verification"]["passed"], result.record["verification"]["criterion"]
    assert "output.weight" not in _tensors(out)


def test_generate_with_particles_from_the_cli(exports) -> None:
    """SMC through `kiln generate --particles` on a recurrent model (the engine's copies, resampling and
    prompt cache are checked against fresh prefills in test_recurrent_engine.py)."""
    from kiln_cli import kiln

    proc = kiln("generate", exports["f32"][0], "--prompt", "Hello", "--particles", "4", "--max-tokens", "4",
                "--seed", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n_particles"] == 4 and out["particles"] and np.isfinite(out["log_ml"])


def test_cost_model_counts_kv_on_attention_layers_and_the_recurrent_state(exports) -> None:
    """`kiln plan` and `kiln bench`'s cost model: K/V only in the gated attention layers, plus a fixed f32
    state per sequence in each DeltaNet layer, the same from config.json and from the GGUF, equal to the
    state buffer llama.cpp itself allocates; weight bytes equal the file's."""
    from kiln import llamacpp_log
    from kiln.bench.cost_model import engine_sequences, gguf_weights
    from kiln.bench.geometry import hf_geometry, read_geometry
    from kiln.bench.plan import plan
    from kiln.gguf_header import open_gguf
    from kiln.runtime.llamacpp import PROMPT_CACHE_SLOTS, LlamaCppEngine

    src = build(NAME, progress=False)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    gguf_path = exports["q8_0"][0]
    hf, art = hf_geometry(config, src), read_geometry(gguf_path)
    assert hf.kv_layers == art.kv_layers == config["layer_types"].count("full_attention") == 1
    assert hf.state_bytes == art.state_bytes > 0
    assert art.kv_bytes_per_token("f16") == 2 * 1 * config["num_key_value_heads"] * config["head_dim"] * 2
    with LlamaCppEngine(gguf_path, n_ctx=256, n_seq_max=4):
        reported = llamacpp_log.buffer_sizes()["state"]  # MiB, printed to two decimals
    # one state per sequence id: the caller's 4 and the prompt cache's slots (engine_sequences)
    assert engine_sequences(4) == 4 + PROMPT_CACHE_SLOTS
    assert abs(reported - engine_sequences(4) * art.state_bytes / 2**20) <= 0.006
    assert gguf_weights(config, "q8_0").bytes == open_gguf(gguf_path).tensor_totals()[1]
    p = plan(src, 256 << 20, particles=4)
    assert p.recommended is not None and p.recommended.fits


# --------------------------------------------------------------- the multi-token prediction head (MTP)
# tiny-qwen3_5-mtp is tiny-qwen3_5 (same weights) with the mtp.* tensors published Qwen3.5 checkpoints carry:
# kiln writes them as llama.cpp's converter does by default (one more block, tests/test_gguf_keys.py compares
# the files), llama.cpp loads the file and decodes without the block, and verification (transformers ignores
# mtp.*) passes as for the plain fixture.
MTP = "tiny-qwen3_5-mtp"


@pytest.fixture(scope="module")
def mtp_exports(tmp_path_factory) -> dict[str, tuple[Path, dict, list[str]]]:
    root = tmp_path_factory.mktemp("qwen35-mtp")
    out = {}
    for quant in ("f32", "q8_0"):
        path = root / f"{MTP}.{quant}.gguf"
        result = export_gguf_artifact(build(MTP, progress=False), path, quant)
        out[quant] = (path, result.record, result.warnings)
    return out


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_mtp_export_loads_and_is_verified(mtp_exports, exports, quant: str) -> None:
    """The file with the MTP block runs in llama.cpp as the plain one does: verified against transformers, the
    decoder's tensors identical to tiny-qwen3_5's, and no warning (nothing in the checkpoint is left out)."""
    path, record, warnings = mtp_exports[quant]
    v = record["verification"]
    assert v["passed"], v["criterion"]
    assert warnings == []
    g = gguf.GGUFReader(path)
    assert int(g.fields["qwen35.block_count"].contents()) == 5
    assert int(g.fields["qwen35.nextn_predict_layers"].contents()) == 1
    ours, plain = _tensors(path), _tensors(exports[quant][0])
    assert sorted(set(ours) - set(plain)) == sorted(n for n in ours if n.startswith("blk.4."))
    for name, (t, shape, data) in plain.items():
        assert (t, shape) == ours[name][:2] and np.array_equal(data, ours[name][2]), name
    if quant == "f32":
        assert v["text_top1"] == 1.0 and v["short_positions"]["top1"] == 1.0


def test_mtp_cost_model_counts_the_block_in_the_file_not_in_the_cache(mtp_exports) -> None:
    """llama.cpp keeps no K/V and no recurrent state for an MTP block and does not even load its weights for
    plain decoding: the KV and state buffers it allocates equal the prediction (one attention layer, three
    DeltaNet states per sequence), as for the plain fixture; the predicted weight bytes are the file's (the
    block included: it is in the artifact `kiln plan` sizes)."""
    from kiln import llamacpp_log
    from kiln.bench.cost_model import gguf_weights
    from kiln.bench.geometry import hf_geometry, read_geometry
    from kiln.gguf_header import open_gguf
    from kiln.runtime.llamacpp import LlamaCppEngine

    src = build(MTP, progress=False)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    path = mtp_exports["q8_0"][0]
    hf, art = hf_geometry(config, src), read_geometry(path)
    assert art.n_layers == 5 and hf.kv_layers == art.kv_layers == 1
    assert hf.state_bytes == art.state_bytes > 0
    with LlamaCppEngine(path, n_ctx=256, n_seq_max=4, prompt_cache=0):
        reported = llamacpp_log.buffer_sizes()  # MiB, printed to two decimals
    assert abs(reported["state"] - 4 * art.state_bytes / 2**20) <= 0.006
    assert abs(reported["kv"] - art.kv_bytes(256, "f16") / 2**20) <= 0.006
    assert gguf_weights(config, "q8_0").bytes == open_gguf(path).tensor_totals()[1]


def test_checkpoint_without_mtp_tensors_writes_no_block(exports, tmp_path: Path) -> None:
    """A checkpoint saved by transformers (its config may still state mtp_num_hidden_layers, its weights hold no
    mtp.*) gets the converter's --no-mtp file: tiny-qwen3_5's tensors exactly, four blocks."""
    src = tmp_path / "src"
    shutil.copytree(build(MTP, progress=False), src, ignore=shutil.ignore_patterns(".kiln-*"))
    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("mtp.")}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    result = export_gguf_artifact(src, out, "f32", verify=False)
    assert result.warnings == []
    g = gguf.GGUFReader(out)
    assert int(g.fields["qwen35.block_count"].contents()) == 4 and "qwen35.nextn_predict_layers" not in g.fields
    ours, plain = _tensors(out), _tensors(exports["f32"][0])
    assert sorted(ours) == sorted(plain)


def test_missing_mtp_tensor_is_named_in_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(build(MTP, progress=False), src, ignore=shutil.ignore_patterns(".kiln-*"))
    weights = load_file(src / "model.safetensors")
    del weights["mtp.layers.0.self_attn.k_norm.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    with pytest.raises(KilnError) as err:
        export_gguf_artifact(src, out, "f32", verify=False)
    msg = str(err.value)
    assert "\n" not in msg and "mtp.layers.0.self_attn.k_norm.weight is missing" in msg, msg
    assert not out.exists()
