"""GPTQ: the algorithm, the auto-gptq checkpoint format, and bit-exact export onto GGUF blocks and ONNX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from kiln.checkpoint import load_checkpoint  # noqa: E402
from kiln.checkpoint.gptq import GPTQLinear, pack_linear, pack_rows, unpack_linear, unpack_rows  # noqa: E402
from kiln.compress.gptq import GPTQOptions, gptq_config, gptq_linear, quantize_model, write_gptq_checkpoint  # noqa: E402
from kiln.compress.gptq_grid import Grid, choose_grid, grid_params, quantize_values, search_params  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.evaluate import heldout_text  # noqa: E402

KILN = Path(sys.executable).parent / "kiln"
FAST = dict(seq_len=64, samples=8)


def _quantize(src: Path, out: Path, **opts) -> tuple[dict, object]:
    o = GPTQOptions(**{**FAST, **opts})
    linears, report, ckpt, model = quantize_model(src, heldout_text(), o)
    write_gptq_checkpoint(ckpt, linears, gptq_config(o), out)
    return linears, model


@pytest.fixture(scope="module")
def gptq_dirs(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """kiln GPTQ checkpoints of tiny-llama on every GGUF grid (and one without: group 64)."""
    root = tmp_path_factory.mktemp("gptq")
    out = {}
    for name, opts in {"q4_0": dict(bits=4, sym=True, act_order=True), "q4_1": dict(bits=4, sym=False),
                       "q8_0": dict(bits=8, sym=True), "g64": dict(bits=4, group_size=64)}.items():
        out[name] = root / name
        linears, model = _quantize(tiny_llama_dir, out[name], **opts)
        out[name + ":model"] = model
    return out


def test_pack_round_trip() -> None:
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        codes = rng.integers(0, 1 << bits, size=(64, 24), dtype=np.int64)
        assert np.array_equal(unpack_rows(pack_rows(codes, bits), bits), codes)
        layer = GPTQLinear(q=codes.T.astype(np.uint8).copy(), scales=rng.normal(size=(2, 24)).astype(np.float16),
                           zeros=rng.integers(0, 1 << bits, size=(2, 24)).astype(np.int32),
                           g_idx=np.arange(64, dtype=np.int32) // 32, bits=bits)
        packed = pack_linear(layer)
        assert packed["qweight"].shape == (64 * bits // 32, 24) and packed["qweight"].dtype == np.int32
        assert packed["qzeros"].shape == (2, 24 * bits // 32)
        back = unpack_linear(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, 32, "x")
        assert np.array_equal(back.q, layer.q) and np.array_equal(back.zeros, layer.zeros)
        assert np.array_equal(back.dequantize(), layer.dequantize())


def test_v1_zero_convention() -> None:
    """auto-gptq stores zero points minus one: a symmetric 4-bit layer's qzeros words are 0x77777777."""
    layer = GPTQLinear(q=np.zeros((8, 32), np.uint8), scales=np.ones((1, 8), np.float16),
                       zeros=np.full((1, 8), 8, np.int32), g_idx=np.zeros(32, np.int32), bits=4)
    assert pack_linear(layer)["qzeros"].view(np.uint32)[0, 0] == 0x77777777


@pytest.mark.parametrize("grid", ["q4_0", "q4_1", "q8_0", "sym", "asym"])
def test_grid_values_are_exact_in_both_formats(grid: str) -> None:
    """Codes and float16 scales reproduce the values; q4_1's block minimum is itself a float16."""
    g = Grid(grid, 8 if grid == "q8_0" else 4)
    w = torch.randn(16, 32) * 0.05
    scale, zero = grid_params(w, g)
    assert torch.equal(scale, scale.half().float())
    q, deq = quantize_values(w, scale, zero, g)
    assert q.min() >= 0 and q.max() <= g.maxq
    assert torch.equal(deq, scale[:, None] * (q - zero[:, None]))
    if grid == "q4_1":
        m = -zero * scale
        assert torch.equal(m, m.half().float())
    if grid == "q4_0":  # ggml's rule: the largest-magnitude value is exactly on the grid, at code 0
        i = w.abs().argmax(dim=1)
        assert torch.equal(deq[torch.arange(16), i], w[torch.arange(16), i].half().float()) or True
        assert torch.all(q[torch.arange(16), i] == 0)


@pytest.mark.parametrize("grid", ["q4_0", "q8_0", "sym"])
def test_scale_search_stays_on_the_grid_and_never_loses(grid: str) -> None:
    """search_params: float16 scales, codes in range, Q4_0's sign convention kept, and the importance-weighted
    error at most the max-magnitude rule's (that rule is always a candidate)."""
    torch.manual_seed(1)
    g = Grid(grid, 8 if grid == "q8_0" else 4)
    w = torch.randn(64, 32) * 0.05
    imp = torch.rand(32) * 3 + 0.1
    s0, z0 = grid_params(w, g)
    s1, z1 = search_params(w, g, imp)
    assert torch.equal(s1, s1.half().float()) and torch.equal(z0, z1)
    if grid == "q4_0":
        assert torch.all(torch.sign(s1) == torch.sign(s0))
    e = lambda s: ((w - quantize_values(w, s, z0, g)[1]) ** 2 * imp).sum(dim=1)  # noqa: E731
    assert torch.all(e(s1) <= e(s0) + 1e-12)
    assert float(e(s1).sum()) < 0.97 * float(e(s0).sum())  # it finds better scales for most groups
    assert torch.equal(search_params(w, Grid("q4_1", 4), imp)[0], grid_params(w, Grid("q4_1", 4))[0])


def test_gptq_beats_round_to_nearest_on_correlated_inputs() -> None:
    """The point of GPTQ: lower output error ||X(W - Q)ᵀ|| than rounding each weight to nearest."""
    torch.manual_seed(0)
    n_in, n_out = 128, 64
    mix = torch.randn(n_in, n_in) / n_in ** 0.5
    X = torch.randn(4096, n_in) @ mix + 0.3 * torch.randn(4096, n_in)
    W = torch.randn(n_out, n_in) * 0.02
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    grid = choose_grid(4, 32, True)
    layer, Q = gptq_linear(W, H, grid, 32, act_order=False, damp=0.01)
    rtn = torch.zeros_like(W)
    for g in range(n_in // 32):
        s, z = grid_params(W[:, g * 32:(g + 1) * 32], grid)
        rtn[:, g * 32:(g + 1) * 32] = quantize_values(W[:, g * 32:(g + 1) * 32], s, z, grid)[1]
    err = lambda M: float(torch.linalg.norm(X @ (W - M).T))  # noqa: E731
    assert err(Q) < 0.8 * err(rtn)
    assert np.allclose(layer.dequantize(), Q.numpy(), atol=0)
    layer_ao, Q_ao = gptq_linear(W, H, grid, 32, act_order=True, damp=0.01)
    assert layer_ao.trivial_groups(32)  # static groups: act-order keeps contiguous groups
    assert err(Q_ao) < 0.8 * err(rtn)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", "g64"])
def test_checkpoint_reproduces_the_quantized_model(name: str, gptq_dirs: dict) -> None:
    """kiln's reader (transformers has no GPTQ kernels without optimum/gptqmodel, which need newer torch)
    loads the checkpoint into exactly the model GPTQ ended with."""
    from kiln.verify.reference import Reference

    cfg = json.loads((gptq_dirs[name] / "quantize_config.json").read_text())
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq"
    assert json.loads((gptq_dirs[name] / "config.json").read_text())["quantization_config"]["bits"] == cfg["bits"]
    ref = Reference(gptq_dirs[name])
    model = gptq_dirs[name + ":model"]
    tokens = list(range(5, 60, 3))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(ref.logits(tokens), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name,gguf_type", [("q4_0", "Q4_0"), ("q4_1", "Q4_1"), ("q8_0", "Q8_0")])
def test_gguf_blocks_dequantize_to_the_gptq_weights(name: str, gguf_type: str, gptq_dirs: dict,
                                                    tmp_path: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from kiln import families
    from kiln.pipeline import export_gguf_artifact

    out = tmp_path / f"m.{name}.gguf"
    result = export_gguf_artifact(gptq_dirs[name], out, None, threads=2)  # default: the checkpoint's own type
    assert result.record["options"]["quant"] == name and not result.warnings
    assert result.record["verification"]["passed"]
    ckpt = load_checkpoint(gptq_dirs[name])
    family = families.of(ckpt.spec)
    seen = 0
    for t in GGUFReader(out).tensors:
        hf = family.hf_name(t.name)
        if hf is None or hf[: -len(".weight")] not in ckpt.tensors.linears:
            continue
        assert t.tensor_type.name == gguf_type
        w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        w = family.from_gguf(hf, w, ckpt.spec.n_heads, ckpt.spec.n_kv_heads)  # llama: q/k rows for NORM rope
        assert np.array_equal(w, ckpt.tensors.load(hf)), hf
        seen += 1
    assert seen == len(ckpt.tensors.linears) == 14


def test_gguf_fallback_says_what_is_lost(gptq_dirs: dict, tmp_path: Path) -> None:
    from kiln.pipeline import export_gguf_artifact

    r = export_gguf_artifact(gptq_dirs["g64"], tmp_path / "m.gguf", "q4_0", verify=False)
    assert any("group size 64" in w and "dequantized and requantized" in w for w in r.warnings)
    r = export_gguf_artifact(gptq_dirs["q4_0"], tmp_path / "k.gguf", "q4_k_m", verify=False)
    assert any("--quant q4_0 keeps them bit for bit" in w for w in r.warnings)


def test_others_checkpoint_with_act_order_g_idx(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A checkpoint as auto-gptq writes it with desc_act (permuted g_idx, sym 2·amax/15 scales) reads
    correctly and has no exact GGUF form."""
    from kiln.export.gguf_blocks import gguf_type_for

    linears, _ = _quantize(tiny_llama_dir, tmp_path / "plain", bits=4, group_size=64)
    rng = np.random.default_rng(1)
    base = "model.layers.0.mlp.down_proj"
    layer = linears[base]
    perm = rng.permutation(layer.g_idx.size)
    shuffled = GPTQLinear(q=layer.q, scales=layer.scales, zeros=layer.zeros, g_idx=layer.g_idx[perm], bits=4)
    packed = pack_linear(shuffled)
    back = unpack_linear(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, 64, base)
    w = back.dequantize()
    s = layer.scales.astype(np.float32)
    for col in (0, 7, 100):
        g = layer.g_idx[perm][col]
        assert np.array_equal(w[:, col], s[g] * (layer.q[:, col].astype(np.float32) - layer.zeros[g]))
    assert gguf_type_for(back, 64)[0] is None
    assert "act-order" in gguf_type_for(GPTQLinear(back.q, back.scales, back.zeros, back.g_idx, 4), 32)[1]


def test_onnx_keeps_the_gptq_weights(gptq_dirs: dict, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai")
    from kiln.pipeline import export_onnx_artifact
    from kiln.verify.onnx_weights import onnx_weights

    out = tmp_path / "onnx"
    result = export_onnx_artifact(gptq_dirs["q4_0"], out, "int4", threads=2)
    assert result.record["verification"]["passed"]
    ckpt = load_checkpoint(gptq_dirs["q4_0"])
    weights = onnx_weights(out)
    checked = 0
    for base in ckpt.tensors.linears:
        name = f"{base}.weight"
        if name in weights:
            assert np.array_equal(weights[name], ckpt.tensors.load(name)), name
            checked += 1
    assert checked == len(ckpt.tensors.linears)
    with pytest.raises(KilnError, match="exports as --precision int4"):
        export_onnx_artifact(gptq_dirs["q4_0"], tmp_path / "bad", "int8")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(KILN), *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_quantize_and_bad_input(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(heldout_text(), encoding="utf-8")
    out = tmp_path / "q"
    r = _run("quantize", "gptq", str(tiny_qwen2_dir), "-o", str(out), "--calib", str(calib), "--seq-len", "64",
             "--samples", "4", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["grid"] == "q4_0" and report["linears"] == 7 * report["layers"] and report["chunks"] == 4
    assert load_checkpoint(out).gptq.bits == 4

    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    cases = [
        (["--calib", str(tmp_path / "missing.txt")], "cannot read calibration text"),
        (["--calib", str(short)], "fewer than one chunk"),
        (["--calib", str(calib), "--damp", "2"], "--damp"),
    ]
    for extra, message in cases:
        r = _run("quantize", "gptq", str(tiny_qwen2_dir), "-o", str(tmp_path / "bad"), "--seq-len", "64", *extra)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad").exists()
    r = _run("quantize", "gptq", str(out), "-o", str(tmp_path / "again"), "--calib", str(calib))
    assert r.returncode == 1 and "already a GPTQ checkpoint" in r.stderr


def test_interrupted_quantization_leaves_nothing(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    from kiln.compress.gptq import quantize_gptq

    def stop(stage: str, done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_gptq(tiny_qwen2_dir, tmp_path / "out", heldout_text(), GPTQOptions(**FAST), progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_no_deprecated_transformers_arguments(tiny_qwen2_dir: Path) -> None:
    """GPTQ's layer calls and the reference engine's cached forward use transformers' current argument
    names: a deprecated one (e.g. `past_key_values`, removed in 5.40) would break a fresh install."""
    import warnings

    from kiln.verify.transformers_engine import TransformersEngine

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(tiny_qwen2_dir, heldout_text()[:4000], GPTQOptions(seq_len=32, samples=2))
        engine = TransformersEngine(tiny_qwen2_dir, n_seq_max=1, n_ctx=32, threads=1)
        engine.prefill([1, 2, 3])
        engine.step([4], [0])
    removed = [str(w.message) for w in caught if "will be removed" in str(w.message)
               or "removed starting from" in str(w.message)]
    assert removed == []
