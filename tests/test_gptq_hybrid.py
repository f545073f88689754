"""GPTQ and the imatrix on the hybrid (Qwen3.5: Gated DeltaNet + gated attention), mixture-of-experts
(Qwen2-MoE with its shared expert, Qwen3-MoE) and hybrid mixture-of-experts (Qwen3.5-MoE: both layer kinds, each
with routed experts and a gated shared expert) fixtures: every linear kind quantized with a lower output error
than round-to-nearest, experts calibrated on their routed tokens only (and rounded to nearest, with a warning,
when too few reach them), the GGUF run by llama.cpp and verified, and imatrix files llama.cpp's quantizer takes
in the layout it indexes (per expert, GGUF column order)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from kiln import families  # noqa: E402
from kiln.checkpoint import load_checkpoint  # noqa: E402
from kiln.compress.gptq import GPTQOptions, gptq_config, quantize_model, rtn_linear, write_gptq_checkpoint  # noqa: E402
from kiln.compress.gptq_grid import choose_grid  # noqa: E402
from kiln.evaluate import heldout_text  # noqa: E402
from kiln.fixtures import build  # noqa: E402

QWEN35, QWEN2_MOE, QWEN3_MOE, QWEN35_MOE = "tiny-qwen3_5", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-qwen3_5-moe"
NAMES = (QWEN35, QWEN2_MOE, QWEN3_MOE, QWEN35_MOE)
FAST = GPTQOptions(seq_len=64, samples=8)  # 512 tokens: every expert of the MoE fixtures gets >= 64 of them
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPERTS = ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj")
SHARED = tuple(f"mlp.shared_expert.{n}" for n in ("gate_proj", "up_proj", "down_proj"))
DELTANET = tuple(f"linear_attn.{n}" for n in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"))
KINDS = {
    QWEN35: (*DELTANET, *ATTENTION, *MLP),
    QWEN2_MOE: (*ATTENTION, *EXPERTS, *SHARED),
    QWEN3_MOE: (*ATTENTION, *EXPERTS),
    QWEN35_MOE: (*DELTANET, *ATTENTION, *EXPERTS, *SHARED),
}
# Qwen3.5-MoE: a DeltaNet layer (5 projections) and an attention layer (4), each with 3 shared + 4 x 3 expert linears
LINEARS = {QWEN35: 3 * 8 + 7, QWEN2_MOE: 2 * (4 + 3 + 4 * 3), QWEN3_MOE: 2 * (4 + 4 * 3),
           QWEN35_MOE: 5 + 4 + 2 * (3 + 4 * 3)}
WITH_SSM_OUT = (QWEN35, QWEN35_MOE)  # a DeltaNet layer 0 whose ssm_out columns the converter tiles
WITH_SHARED = (QWEN2_MOE, QWEN35_MOE)  # a shared expert whose 48-column down_proj is not a multiple of 32

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="running GGUFs needs llama-cpp-python")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Per fixture: GPTQ's linears, report, the transformers model holding the quantized weights, and the
    written GPTQ checkpoint."""
    root = tmp_path_factory.mktemp("gptq-hybrid")
    out = {}
    for name in NAMES:
        linears, report, ckpt, model = quantize_model(build(name, progress=False), heldout_text(), FAST, threads=2)
        write_gptq_checkpoint(ckpt, linears, gptq_config(FAST), root / name)
        out[name] = dict(linears=linears, report=report, model=model, dir=root / name)
    return out


def _float_model(name: str):
    from kiln.checkpoint.hf_model import float_model

    return float_model(build(name, progress=False), attn_implementation="sdpa")


# ------------------------------------------------------------------------------------------------ GPTQ


@pytest.mark.parametrize("name", NAMES)
def test_gptq_beats_round_to_nearest_on_every_linear_kind(runs, name: str) -> None:
    """Per linear kind (DeltaNet projections, gated attention, MLP, routed and shared experts), the relative
    output error ||X(W-Q)ᵀ|| / ||XWᵀ|| on the calibration inputs is below round-to-nearest's on the same grid."""
    report = runs[name]["report"]
    assert report.linears == LINEARS[name] == len(runs[name]["linears"])
    assert report.rtn_fallbacks == 0 and report.warnings == []
    assert sorted(report.kind_errors) == sorted(KINDS[name])
    for kind, e in report.kind_errors.items():
        assert e["gptq"] < 0.95 * e["rtn"], (kind, e)
    assert json.loads(json.dumps(report.to_json()))["kind_errors"] == report.kind_errors


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_holds_the_quantized_model(runs, name: str) -> None:
    """The GPTQ checkpoint dequantizes to exactly the weights the quantized transformers model ended with: per
    expert tensors for the fused experts, ssm_out's groups contiguous in the GGUF's (tiled) column order."""
    ckpt = load_checkpoint(runs[name]["dir"])
    spec = ckpt.spec
    family = families.of(spec)
    params = dict(runs[name]["model"].named_parameters())
    for base in ckpt.tensors.linears:
        w = ckpt.tensors.load(f"{base}.weight")
        parts = base.split(".")
        if parts[3:5] == ["mlp", "experts"]:  # a slice of transformers 5's fused parameter
            suffix, part, n = family.fused_expert(".".join(parts[3:5] + ["{e}"] + parts[6:]))
            fused = params[".".join(parts[:3]) + "." + suffix].detach()[int(parts[5])]
            rows = fused.shape[0] // n
            have = fused[part * rows:(part + 1) * rows]
        else:
            have = params[f"{base}.weight"].detach()
        assert np.array_equal(have.numpy(), w), base
    if name in WITH_SSM_OUT:
        layer = ckpt.tensors.linear("model.layers.0.linear_attn.out_proj")
        order = family.gguf_column_order("model.layers.0.linear_attn.out_proj.weight", spec)
        assert order is not None  # 2 key heads, 4 value heads: the converter tiles the value heads
        assert np.array_equal(layer.g_idx[order], np.arange(order.size) // 32)
        assert not layer.trivial_groups(32)


def test_expert_hessians_sum_only_their_routed_tokens() -> None:
    """GPTQ's per-expert input statistics equal XₑᵀXₑ over the tokens the router sends to expert e (and, for the
    down projection, act(gate)·up of them), recomputed here from the MoE block's own input."""
    from kiln.compress.gptq import _hessian_pass, _layer_call, _targets

    src = build(QWEN2_MOE, progress=False)
    spec = load_checkpoint(src).spec
    family = families.of(spec)
    model = _float_model(QWEN2_MOE)
    inner = model.model
    ids = torch.arange(3, 3 + 96).reshape(2, 48) * 7 % 1000
    pos = torch.arange(48).unsqueeze(0)
    layer = inner.layers[1]
    with torch.no_grad():
        emb = inner.embed_tokens(ids)
        pe = inner.rotary_emb(emb[:1], position_ids=pos)
        hidden = _layer_call(inner.layers[0], emb, pe, pos)
        seen = []
        handle = layer.mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        _layer_call(layer, hidden, pe, pos)
        handle.remove()
        x = seen[0].double()
        top = (x @ layer.mlp.gate.weight.double().T).topk(spec.n_experts_used, dim=-1).indices
        groups = family.gptq_layer_groups(spec, 1)
        sums = {}
        for names in groups[2:]:
            _, hooks = _targets(layer, names, family, spec)
            sums.update(_hessian_pass(layer, hooks, family, [hidden], pe, pos, last=True))
        experts = layer.mlp.experts
        for e in range(spec.n_experts):
            routed = (top == e).any(dim=-1)
            xe = x[routed]
            gate, up = torch.nn.functional.linear(seen[0][routed], experts.gate_up_proj[e]).chunk(2, dim=-1)
            he = (torch.nn.functional.silu(gate) * up).double()  # float32 as the model computes it
            for key, inputs in (("gate_up_proj", xe), ("down_proj", he)):
                total, count = sums[f"mlp.experts.{key}.{e}"]
                assert count == xe.shape[0] > 0
                torch.testing.assert_close(total, inputs.T @ inputs, rtol=1e-5, atol=1e-5)
        total, count = sums["mlp.shared_expert.gate_proj"]  # the shared expert sees every token
        assert count == x.shape[0]
        torch.testing.assert_close(total, x.T @ x, rtol=1e-5, atol=1e-6)


def test_under_routed_expert_is_rounded_to_nearest_with_a_warning(tmp_path: Path) -> None:
    """32 calibration tokens, 2 of 4 experts each: every expert gets fewer tokens than its 64 input columns of
    gate/up. Those fall back to round-to-nearest (bit for bit), and the warning names layer and expert; the
    checkpoint's manifest keeps the warnings, and `kiln quantize gptq` prints each as a note on stderr."""
    from click.testing import CliRunner

    from kiln.cli import cli

    src = build(QWEN3_MOE, progress=False)
    calib = tmp_path / "calib.txt"
    calib.write_text(heldout_text(), encoding="utf-8")
    r = CliRunner().invoke(cli, ["quantize", "gptq", str(src), "-o", str(tmp_path / "q"), "--calib", str(calib),
                                 "--seq-len", "32", "--samples", "1", "--threads", "2", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["rtn_fallbacks"] >= 2 * 4 * 2  # gate and up of every expert in both layers
    line = next(w for w in report["warnings"] if w.startswith("layer 0, expert 1:"))
    assert "gate_proj/up_proj" in line and "rounded to nearest" in line and "\n" not in line
    assert [n for n in r.stderr.splitlines() if n.startswith("note: ")] == [f"note: {w}" for w in report["warnings"]]
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["warnings"] == report["warnings"]
    ckpt = load_checkpoint(src)
    stored = load_checkpoint(tmp_path / "q").tensors.linear("model.layers.0.mlp.experts.1.gate_proj")
    expected, _ = rtn_linear(torch.from_numpy(ckpt.tensors.load("model.layers.0.mlp.experts.1.gate_proj.weight")),
                             choose_grid(4, 32, True), 32)
    assert np.array_equal(stored.q, expected.q) and np.array_equal(stored.scales, expected.scales)


def test_fused_expert_checkpoint_gives_the_same_gptq_checkpoint(runs, tmp_path: Path) -> None:
    """A checkpoint holding transformers 5's fused experts is quantized to the same per-expert linears, and the
    GPTQ checkpoint holds them per expert (the fused tensors are not written twice)."""
    import shutil

    from safetensors.torch import save_file

    src = build(QWEN3_MOE, progress=False)
    fused = tmp_path / "fused"
    shutil.copytree(src, fused, ignore=shutil.ignore_patterns(".kiln-*"))
    state = {k: v.contiguous() for k, v in _float_model(QWEN3_MOE).state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    (fused / "model.safetensors").unlink()
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    linears, _, ckpt, _ = quantize_model(fused, heldout_text(), FAST, threads=2)
    assert sorted(linears) == sorted(runs[QWEN3_MOE]["linears"])
    for base, layer in linears.items():
        assert np.array_equal(layer.q, runs[QWEN3_MOE]["linears"][base].q), base
    write_gptq_checkpoint(ckpt, linears, gptq_config(FAST), tmp_path / "q")
    names = load_checkpoint(tmp_path / "q").tensors.names()
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)


def _q4_0_bytes(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ggml's block_q4_0 written out by hand: per 32 columns of a row, d as float16, then byte j holding
    codes j (low nibble) and j + 16 (high nibble). codes [rows, cols], scales [rows, cols / 32]."""
    rows, cols = codes.shape
    c = codes.astype(np.uint8).reshape(rows, cols // 32, 32)
    d = scales.astype(np.float16).reshape(rows, cols // 32, 1).view(np.uint8)
    return np.concatenate([d, c[..., :16] | (c[..., 16:] << 4)], axis=2).reshape(rows, -1)


def _expected_blocks(family, spec, hf: str, layer) -> np.ndarray:
    """A GPTQ linear as its GGUF tensor's q4_0 bytes: codes and every weight's scale moved by the family's own
    transform (tiled value heads in ssm_out's columns, value rows of attn_qkv/attn_gate), then each block's
    scale read where its 32 columns share one."""
    rows = np.broadcast_to(np.arange(layer.q.shape[0])[:, None], layer.q.shape)
    groups = np.broadcast_to(layer.g_idx[None, :], layer.q.shape)
    codes, rows, groups = (family.to_gguf(hf, np.ascontiguousarray(a), spec) for a in (layer.q, rows, groups))
    blocks = groups.reshape(groups.shape[0], -1, 32)
    assert np.all(blocks == blocks[..., :1]), hf  # one group per GGUF block
    assert np.all(layer.zeros == 8)
    return _q4_0_bytes(codes, layer.scales[blocks[..., 0], rows[:, :1]])


@needs_llama
@pytest.mark.parametrize("name", NAMES)
def test_gguf_runs_in_llama_cpp_and_passes_verification(runs, name: str, tmp_path: Path) -> None:
    """q4_0 from the GPTQ checkpoint, verified against the checkpoint (its per-expert tensors loaded into
    transformers' fused experts) with llama.cpp running it. Every GPTQ linear the GGUF holds is its own blocks,
    byte for byte: ssm_out with its columns tiled and their groups with them, the experts stacked in expert
    order (Qwen3.5-MoE: in both layer kinds). Only the shared expert's 48-column down_proj (not a multiple of 32)
    is requantized, with a warning."""
    from gguf import GGUFReader

    from kiln.pipeline import export_gguf_artifact

    out = tmp_path / "m.q4_0.gguf"
    result = export_gguf_artifact(runs[name]["dir"], out, None, threads=2)
    assert result.record["options"]["quant"] == "q4_0"
    assert result.record["verification"]["passed"], result.record["verification"]["criterion"]
    gptq_notes = [w for w in result.warnings if "GPTQ linears" in w]
    if name in WITH_SHARED:
        assert len(gptq_notes) == 1 and gptq_notes[0].startswith("2 GPTQ linears") and "48 input columns" in gptq_notes[0]
    else:
        assert gptq_notes == []
    ckpt = load_checkpoint(runs[name]["dir"])
    spec = ckpt.spec
    family = families.of(spec)
    linears = set(ckpt.tensors.linears)
    tensors = linears_seen = 0
    for t in GGUFReader(out).tensors:
        hf = family.hf_name(t.name)
        if hf is None:
            continue
        stacked = "{e}" in hf
        names = [hf.format(e=e) for e in range(spec.n_experts)] if stacked else [hf]
        bases = [n[: -len(".weight")] for n in names if n[: -len(".weight")] in linears]
        if not bases or int(t.shape[0]) % 32:
            continue
        assert len(bases) == len(names) and t.tensor_type.name == "Q4_0", t.name
        want = [_expected_blocks(family, spec, n, ckpt.tensors.linear(b)) for n, b in zip(names, bases)]
        want = np.stack(want) if stacked else want[0]  # experts: the first axis, in expert order
        assert bytes(np.asarray(t.data)) == want.tobytes(), t.name
        tensors += 1
        linears_seen += len(bases)
    assert (tensors, linears_seen) == {QWEN35: (31, 31), QWEN2_MOE: (18, 36), QWEN3_MOE: (14, 32),
                                       QWEN35_MOE: (19, 37)}[name]
    assert linears_seen == len(linears) - 2 * (name in WITH_SHARED)


# ------------------------------------------------------------------------------------------------ imatrix


@pytest.fixture(scope="module")
def imatrices(tmp_path_factory) -> dict[str, tuple]:
    from kiln.compress.imatrix import compute_imatrix, save_imatrix

    root = tmp_path_factory.mktemp("imatrix-hybrid")
    out = {}
    for name in NAMES:
        res = compute_imatrix(build(name, progress=False), heldout_text(), ctx=64, chunks=2, threads=2)
        out[name] = (res, save_imatrix(res, root / f"{name}.imatrix.dat", dataset="heldout.txt"))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_imatrix_has_an_entry_per_multiplied_tensor(imatrices, name: str, tmp_path: Path) -> None:
    """Every blk matrix llama.cpp multiplies has an entry of its input width times its experts (llama-quantize
    requires ne0 x ne2 values); conv1d, norms and the other vectors have none."""
    from gguf import GGUFReader

    from kiln.pipeline import export_gguf_artifact

    res, _ = imatrices[name]
    f32 = tmp_path / "m.f32.gguf"
    export_gguf_artifact(build(name, progress=False), f32, "f32", verify=False)
    want = {}
    for t in GGUFReader(f32).tensors:
        shape = [int(d) for d in t.shape]  # ne0 first
        if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name \
                and "conv1d" not in t.name:
            want[t.name] = shape[0] * (shape[2] if len(shape) == 3 else 1)
    assert {n: v.size for n, v in res.values.items()} == want
    assert list(res.values) == sorted(res.values)
    for n, v in res.values.items():
        assert np.all(np.isfinite(v)) and np.all(v > 0), n


@pytest.mark.parametrize("name", [QWEN3_MOE, QWEN35_MOE])
def test_imatrix_experts_are_their_routed_tokens_mean(imatrices, name: str) -> None:
    """ffn_*_exps entries: expert e's slice is the mean of x² over the tokens routed to e (llama-imatrix's
    MUL_MAT_ID counts), recomputed from the MoE block's input and its router (Qwen3.5-MoE: behind a DeltaNet layer
    and behind an attention layer)."""
    from kiln.compress.imatrix import tokenize

    res, _ = imatrices[name]
    src = build(name, progress=False)
    ckpt = load_checkpoint(src)
    spec = ckpt.spec
    ids, _ = tokenize(ckpt, heldout_text())
    model = _float_model(name)
    seen = {i: [] for i in range(spec.n_layers)}
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for k in range(2):
            model.model(input_ids=torch.tensor([ids[k * 64:(k + 1) * 64]]), use_cache=False)
    for h in handles:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        x = torch.cat(seen[i]).double()
        top = (x @ layer.mlp.gate.weight.double().T).topk(spec.n_experts_used, dim=-1).indices
        gate_up = layer.mlp.experts.gate_up_proj.detach().double()
        counts = []
        for e in range(spec.n_experts):
            xe = x[(top == e).any(dim=-1)]
            gate, up = (xe @ gate_up[e].T).chunk(2, dim=-1)
            he = torch.nn.functional.silu(gate) * up
            w = spec.hidden_size
            for entry, inputs, width in (("ffn_gate_exps", xe, w), ("ffn_up_exps", xe, w),
                                         ("ffn_down_exps", he, spec.expert_ff)):
                got = res.values[f"blk.{i}.{entry}.weight"][e * width:(e + 1) * width]
                np.testing.assert_allclose(got, inputs.square().mean(dim=0).numpy(), rtol=1e-4, atol=1e-7)
            counts.append(xe.shape[0])
        assert res.counts[f"blk.{i}.ffn_gate_exps.weight"].tolist() == counts
        assert sum(counts) == 2 * 64 * spec.n_experts_used


def test_imatrix_ssm_out_is_in_the_gguf_column_order(imatrices) -> None:
    """The DeltaNet's out_proj input, per column, reordered as the converter tiles the value heads: the order
    llama.cpp multiplies ssm_out's columns in. The other DeltaNet inputs share the normed hidden state."""
    from kiln.compress.imatrix import tokenize

    res, _ = imatrices[QWEN35]
    ckpt = load_checkpoint(build(QWEN35, progress=False))
    spec = ckpt.spec
    family = families.of(spec)
    ids, _ = tokenize(ckpt, heldout_text())
    model = _float_model(QWEN35)
    seen = []
    attn = model.model.layers[0].linear_attn
    handle = attn.out_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for k in range(2):
            model.model(input_ids=torch.tensor([ids[k * 64:(k + 1) * 64]]), use_cache=False)
    handle.remove()
    mean = torch.cat(seen).double().square().mean(dim=0).numpy()
    order = family.gguf_column_order("model.layers.0.linear_attn.out_proj.weight", spec)
    w = attn.out_proj.weight.detach().numpy()
    assert np.array_equal(family.to_gguf("model.layers.0.linear_attn.out_proj.weight", w, spec), w[:, order])
    np.testing.assert_allclose(res.values["blk.0.ssm_out.weight"], mean[order], rtol=1e-4)
    assert not np.allclose(res.values["blk.0.ssm_out.weight"], mean, rtol=1e-4)
    for t in ("attn_gate", "ssm_alpha", "ssm_beta"):
        np.testing.assert_array_equal(res.values[f"blk.0.{t}.weight"], res.values["blk.0.attn_qkv.weight"])


@needs_llama
@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_quantizer_takes_the_imatrix(imatrices, name: str, tmp_path: Path) -> None:
    """q4_k_m with the imatrix: accepted (llama-quantize refuses an entry of the wrong size), verified, and
    different from the quantization without it. For experts (Qwen3.5-MoE's too), changing one expert's slice changes only that
    expert's rows of the stacked tensor: the quantizer reads expert e's values at offset e x columns."""
    from gguf import GGUFReader

    from kiln.compress.imatrix_file import read_imatrix, write_legacy_imatrix
    from kiln.compress.llama_quant import quant_type, quantize_gguf
    from kiln.pipeline import export_gguf_artifact

    _, path = imatrices[name]
    src = build(name, progress=False)
    result = export_gguf_artifact(src, tmp_path / "imx.gguf", "q4_k_m", imatrix=path, threads=2)
    assert result.record["verification"]["passed"]
    f32 = tmp_path / "m.f32.gguf"
    export_gguf_artifact(src, f32, "f32", verify=False)
    quantize_gguf(f32, tmp_path / "plain.gguf", quant_type("q4_k_m"), threads=2)
    a = {t.name: bytes(t.data) for t in GGUFReader(tmp_path / "imx.gguf").tensors}
    b = {t.name: bytes(t.data) for t in GGUFReader(tmp_path / "plain.gguf").tensors}
    assert any(a[n] != b[n] for n in a if "ssm_out" in n or "_exps" in n)
    if name == QWEN35:
        return
    values = read_imatrix(path)
    tensor, e, width = "blk.0.ffn_gate_exps.weight", 2, 64
    values[tensor] = values[tensor].copy()
    values[tensor][e * width:(e + 1) * width] *= np.random.default_rng(0).uniform(0.01, 100, width)
    changed = write_legacy_imatrix(tmp_path / "changed.dat", values, ncall=1)
    quantize_gguf(f32, tmp_path / "changed.gguf", quant_type("q4_k_m"), imatrix=changed, threads=2)
    quantize_gguf(f32, tmp_path / "again.gguf", quant_type("q4_k_m"), imatrix=path, threads=2)
    rows = {}
    for label in ("changed", "again"):
        t = next(t for t in GGUFReader(tmp_path / f"{label}.gguf").tensors if t.name == tensor)
        rows[label] = np.asarray(t.data).reshape(4, -1)  # experts x (rows x row bytes)
    differs = [not np.array_equal(rows["changed"][i], rows["again"][i]) for i in range(4)]
    assert differs == [i == e for i in range(4)]
