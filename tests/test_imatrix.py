"""`kiln imatrix`: importance matrices as llama-imatrix computes them, read by llama.cpp's quantizer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from kiln.compress.imatrix import (  # noqa: E402
    calibration_text,
    compute_imatrix,
    save_imatrix,
)
from kiln.compress.imatrix_file import read_imatrix  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.evaluate import heldout_text  # noqa: E402

from kiln_cli import kiln, one_line_error  # noqa: E402

CTX = 64


def gguf_matrices(src: Path, tmp: Path) -> dict[str, int]:
    """Name -> input width (ne0) of every 2-D tensor of the f32 GGUF kiln writes for `src`."""
    from gguf import GGUFReader

    from kiln.pipeline import export_gguf_artifact

    out = tmp / f"{src.name}.f32.gguf"
    if not out.exists():
        export_gguf_artifact(src, out, "f32", verify=False)
    return {t.name: int(t.shape[0]) for t in GGUFReader(out).tensors if len(t.shape) == 2}


def test_calibration_text_is_shipped_and_distinct() -> None:
    text = calibration_text()
    assert 60_000 <= len(text.encode("utf-8")) <= 100_000
    assert not text.startswith(("#", "\ufeff"))
    held = heldout_text()
    assert held[:200] not in text and text[:200] not in held


def test_values_equal_an_independent_computation(tiny_llama_dir: Path) -> None:
    """q/k/v input = RMSNorm(hidden state entering the layer); LM head input = the final hidden state
    (transformers' last hidden_states entry is already normed). Chunks tokenized by transformers'
    own tokenizer (which adds BOS for this fixture), first token of each chunk replaced by BOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = heldout_text()
    res = compute_imatrix(tiny_llama_dir, text, ctx=CTX, chunks=3, process_output=True)
    assert (res.chunks, res.ctx, res.tokens) == (3, CTX, 3 * CTX)

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and res.text_tokens == len(ids)
    n_layers = model.config.num_hidden_layers
    sums = {i: 0.0 for i in range(n_layers)}
    head = 0.0
    for k in range(3):
        part = [tok.bos_token_id] + ids[k * CTX + 1:(k + 1) * CTX]
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([part]), output_hidden_states=True).hidden_states
            for i, layer in enumerate(model.model.layers):
                h = hs[i][0].double()
                eps = layer.input_layernorm.variance_epsilon
                x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * layer.input_layernorm.weight.double()
                sums[i] = sums[i] + x.pow(2).sum(0)
            head = head + hs[-1][0].double().pow(2).sum(0)
    for i in range(n_layers):
        expect = (sums[i] / (3 * CTX)).numpy()
        for t in ("attn_q", "attn_k", "attn_v"):
            np.testing.assert_allclose(res.values[f"blk.{i}.{t}.weight"], expect, rtol=2e-5)
        np.testing.assert_array_equal(res.values[f"blk.{i}.ffn_gate.weight"], res.values[f"blk.{i}.ffn_up.weight"])
        assert np.all(res.values[f"blk.{i}.ffn_down.weight"] > 0)
        assert np.all(res.values[f"blk.{i}.attn_output.weight"] > 0)
    np.testing.assert_allclose(res.values["output.weight"], (head / (3 * CTX)).numpy(), rtol=2e-5)


@pytest.mark.parametrize("fixture", ["tiny_qwen2_dir", "tiny_qwen3_dir", "tiny_llama_dir"])
def test_one_entry_per_quantizable_block_tensor(fixture: str, request, tmp_path_factory) -> None:
    src = request.getfixturevalue(fixture)
    mats = gguf_matrices(src, tmp_path_factory.getbasetemp())
    res = compute_imatrix(src, heldout_text(), ctx=CTX, chunks=2, threads=2)
    blk = {n: w for n, w in mats.items() if n.startswith("blk.")}
    assert {n: v.size for n, v in res.values.items()} == blk
    assert list(res.values) == sorted(res.values)  # llama.cpp's order
    res_out = compute_imatrix(src, heldout_text(), ctx=CTX, chunks=1, process_output=True)
    if "output.weight" in mats:
        assert res_out.values["output.weight"].size == mats["output.weight"]
    else:  # tied: llama.cpp multiplies by token_embd.weight, which llama-imatrix does not collect
        assert "output.weight" not in res_out.values and res_out.notes


def test_file_round_trips_and_counts(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    res = compute_imatrix(tiny_qwen2_dir, heldout_text(), ctx=CTX, chunks=4)
    path = save_imatrix(res, tmp_path / "imatrix.dat", dataset="heldout.txt")
    back = read_imatrix(path)
    assert list(back) == list(res.values)
    for name, vals in res.values.items():
        np.testing.assert_allclose(back[name], vals, rtol=1e-6)
    # the legacy layout as llama-imatrix writes it: per entry ncall = chunks and sums * ncall;
    # then the chunk count and the dataset name
    data = path.read_bytes()
    (n,) = struct.unpack_from("<i", data, 0)
    pos = 4
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + length].decode()
        pos += 4 + length
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        stored = np.frombuffer(data, "<f4", nval, pos)
        pos += 4 * nval
        assert ncall == 4
        np.testing.assert_allclose(stored, res.values[name] * 4, rtol=1e-6)
    chunks, length = struct.unpack_from("<ii", data, pos)
    assert chunks == 4 and data[pos + 8:] == b"heldout.txt" and length == len(b"heldout.txt")


def test_chunks_are_capped_by_the_text(tiny_qwen2_dir: Path) -> None:
    res = compute_imatrix(tiny_qwen2_dir, heldout_text()[:1500], ctx=CTX, chunks=1000)
    assert res.chunks == res.text_tokens // CTX > 1 and res.tokens == res.chunks * CTX


def test_smollm2_on_the_shipped_text(smollm2_dir: Path) -> None:
    res = compute_imatrix(smollm2_dir, calibration_text(), ctx=CTX, chunks=2, threads=2, process_output=True)
    assert len(res.values) == 30 * 7 and "output.weight" not in res.values  # tied embeddings
    assert all(v.shape == ((1536,) if ".ffn_down." in n else (576,)) for n, v in res.values.items())
    assert all(np.all(np.isfinite(v)) and np.all(v >= 0) for v in res.values.values())


def test_refuses_short_text_and_bad_options(tiny_qwen2_dir: Path) -> None:
    with pytest.raises(KilnError, match="fewer than one chunk"):
        compute_imatrix(tiny_qwen2_dir, "Too short.", ctx=CTX)
    with pytest.raises(KilnError, match="--ctx"):
        compute_imatrix(tiny_qwen2_dir, heldout_text(), ctx=8)
    with pytest.raises(KilnError, match="--chunks"):
        compute_imatrix(tiny_qwen2_dir, heldout_text(), ctx=CTX, chunks=0)


def test_refuses_native_arbor(tmp_path: Path) -> None:
    pt = tmp_path / "latest_checkpoint.pt"
    pt.write_bytes(b"not really")
    with pytest.raises(KilnError, match="imatrix supports llama/qwen2/qwen3"):
        compute_imatrix(pt, heldout_text(), ctx=CTX)


# ----------------------------------------------------------------------------- CLI end to end

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="exporting quantized GGUFs needs llama-cpp-python")


@pytest.fixture(scope="module")
def cli_imatrix(tiny_qwen2_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imx") / "imatrix.dat"
    proc = kiln("imatrix", tiny_qwen2_dir, "-o", out, "--ctx", CTX, "--chunks", 4, "--threads", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["chunks"] == 4 and info["tokens"] == 4 * CTX and info["dataset"] == "kiln/data/calibration.txt"
    manifest = json.loads(Path(info["manifest"]).read_text())
    assert manifest["kind"] == "imatrix" and manifest["files"][0]["name"] == "imatrix.dat"
    return out


@needs_llama
def test_cli_imatrix_feeds_the_quantizer(tiny_qwen2_dir: Path, cli_imatrix: Path, tmp_path: Path) -> None:
    plain, with_imx = tmp_path / "plain.q4_k_m.gguf", tmp_path / "imx.q4_k_m.gguf"
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", with_imx, "--quant", "q4_k_m", "--threads", 2,
                "--imatrix", cli_imatrix)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", plain, "--quant", "q4_k_m", "--threads", 2, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert plain.read_bytes() != with_imx.read_bytes()  # the quantizer used it


@needs_llama
def test_cli_imatrix_enables_an_imatrix_only_type(tiny_qwen2_dir: Path, cli_imatrix: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.iq2_xxs.gguf"
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", out, "--quant", "iq2_xxs", "--threads", 2)
    one_line_error(proc, "imatrix")
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", out, "--quant", "iq2_xxs", "--imatrix", cli_imatrix,
                "--threads", 2, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(out).tensors if t.name.startswith("blk.")}
    assert "IQ2_XXS" in types
    from kiln.runtime.llamacpp import LlamaCppEngine

    with LlamaCppEngine(out, n_ctx=64, threads=2) as engine:  # llama.cpp runs it
        assert np.all(np.isfinite(engine.score(engine.tokenize("The quick brown fox"))))


def test_cli_missing_calib_file(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    proc = kiln("imatrix", tiny_qwen2_dir, "--calib", tmp_path / "nope.txt", "-o", out_dir / "i.dat")
    one_line_error(proc, "nope.txt")
    assert not out_dir.exists()


def test_cli_text_shorter_than_one_chunk(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "short.txt"
    calib.write_text("Only a few words here.", encoding="utf-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = kiln("imatrix", tiny_qwen2_dir, "--calib", calib, "-o", out_dir / "i.dat", "--ctx", CTX)
    one_line_error(proc, "fewer than one chunk")
    assert list(out_dir.iterdir()) == []


def test_cli_unwritable_output(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    # a file where the directory should be: fails for root too (chmod does not stop root)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    proc = kiln("imatrix", tiny_qwen2_dir, "-o", blocker / "i.dat", "--ctx", CTX, "--chunks", 1)
    one_line_error(proc, "blocker")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        target = Path("/proc/kiln-imatrix.dat") if os.geteuid() == 0 else ro / "i.dat"
        proc = kiln("imatrix", tiny_qwen2_dir, "-o", target, "--ctx", CTX, "--chunks", 1)
        one_line_error(proc, "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_cli_refuses_unsupported_source(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    proc = kiln("imatrix", src, "-o", tmp_path / "i.dat", "--ctx", CTX)
    one_line_error(proc, "unknown architecture")
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    proc = kiln("imatrix", src, "-o", tmp_path / "i.dat", "--ctx", CTX)
    one_line_error(proc, "GPT-2 checkpoint", "imatrix supports")
    assert not (tmp_path / "i.dat").exists()
