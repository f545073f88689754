"""The mixture-of-experts families (Qwen2-MoE with its shared expert, Qwen3-MoE, Qwen3.5-MoE: the Gated DeltaNet
hybrid with routed and shared experts) end to end, on real components.

Each fixture is exported to GGUF at f32, f16, q8_0 and q4_k_m through the one pipeline with verification on
(llama.cpp against transformers); the GGUF's stacked expert tensors are checked against the checkpoint's
per-expert tensors, and the fused layout (transformers 5's `mlp.experts.gate_up_proj` / `down_proj`) against
the per-expert one; a GGUF generates through kiln's own runtime as transformers does; what kiln cannot do
for experts (ONNX) and what llama.cpp cannot run (dense layers mixed in, another top-k
normalisation, a tied Qwen2-MoE head) is refused in one line; a missing expert tensor names its layer and
expert; and `kiln plan` counts every expert's weights (KV from attention alone).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kiln_cli import kiln, one_line_error  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from kiln.checkpoint import load_checkpoint  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from kiln.fixtures import build  # noqa: E402
from kiln.gguf_header import open_gguf  # noqa: E402
from kiln.pipeline import export_gguf_artifact  # noqa: E402

MOE = ("tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-qwen3_5-moe")
SHARED_FF = {"tiny-qwen2-moe": 48, "tiny-qwen3-moe": None, "tiny-qwen3_5-moe": 48}  # shared expert width
# llama.cpp's converter asserts on a Qwen3.5 checkpoint without an MTP head unless told --no-mtp
CONVERTER_ARGS = {"tiny-qwen3_5-moe": ("--no-mtp",)}
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
EXPERT_KINDS = (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict]]:
    """(fixture, type) -> (verified GGUF, its manifest record)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name in MOE:
        src = build(name, progress=False)
        for quant in GGUF_TYPES:
            path = root / f"{name}.{quant}.gguf"
            result = export_gguf_artifact(src, path, quant)
            out[name, quant] = (path, result.record)
    return out


def _copy(name: str, dest: Path) -> Path:
    shutil.copytree(build(name, progress=False), dest, ignore=shutil.ignore_patterns(".kiln-*"))
    return dest


def _edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ fixtures


def test_moe_fixture_build_is_deterministic(tmp_path: Path, monkeypatch) -> None:
    """The router redraws (kiln.fixtures.tiny.separate_routers) are seeded: two builds, and the cached
    fixture the pins were taken from, hold the same bytes."""
    cached = build("tiny-qwen3-moe", progress=False)
    files = ("model.safetensors", "config.json", "tokenizer.json")
    digests = [{f: (cached / f).read_bytes() for f in files}]
    for root in ("a", "b"):
        monkeypatch.setenv("KILN_CACHE", str(tmp_path / root))
        d = build("tiny-qwen3-moe", progress=False)
        assert d == tmp_path / root / "fixtures" / "tiny-qwen3-moe"
        digests.append({f: (d / f).read_bytes() for f in files})
    assert digests[0] == digests[1] == digests[2]


def test_routers_have_no_near_tie_on_the_verification_prompts() -> None:
    from kiln.fixtures.tiny import ROUTER_MARGIN, router_margin
    from kiln.verify.result import SHORT_PROMPTS

    for name in MOE:
        src = build(name, progress=False)
        tok = transformers.AutoTokenizer.from_pretrained(src)
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        prompts = [tok(p, add_special_tokens=False)["input_ids"][:128] for p in SHORT_PROMPTS]
        assert router_margin(model, prompts, 512) >= ROUTER_MARGIN, name


# ------------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("quant", GGUF_TYPES)
@pytest.mark.parametrize("name", MOE)
def test_every_type_passes_verification(exports, name: str, quant: str) -> None:
    """llama.cpp runs each export as transformers runs the checkpoint, judged by the bounds every family
    has (f32: the f32 bound; f16: 4x the weight-rounding floor; quantized: 2x the dequantized-weights KL)."""
    _, record = exports[name, quant]
    verification = record["verification"]
    assert verification["passed"], verification["criterion"]
    if quant == "f32":
        assert "(f32 bound)" in verification["criterion"]
        assert verification["text_top1"] == 1.0


@pytest.mark.parametrize("name", MOE)
def test_expert_tensors_are_the_per_expert_tensors_stacked(exports, name: str) -> None:
    src = build(name, progress=False)
    weights = load_file(src / "model.safetensors")
    spec = load_checkpoint(src).spec
    g = open_gguf(exports[name, "f32"][0])
    for layer in range(spec.n_layers):
        for hf, gguf in EXPERT_KINDS:
            t = g.tensor(f"blk.{layer}.{gguf}.weight")
            stacked = np.stack([weights[f"model.layers.{layer}.mlp.experts.{e}.{hf}.weight"]
                                for e in range(spec.n_experts)])
            assert t.np_shape == stacked.shape
            assert np.array_equal(g.dequantize(t), stacked), (layer, hf)
        router = g.tensor(f"blk.{layer}.ffn_gate_inp.weight")
        assert np.array_equal(g.dequantize(router), weights[f"model.layers.{layer}.mlp.gate.weight"])
    keys = {k: g.get(f"{spec.family}.{k}") for k in ("expert_count", "expert_used_count",
                                                     "expert_feed_forward_length")}
    assert keys == {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32}
    shared = g.get(f"{spec.family}.expert_shared_feed_forward_length")
    assert shared == SHARED_FF[name]


@pytest.mark.parametrize("name", MOE)
def test_routers_stay_f32_at_every_type(exports, name: str) -> None:
    """The converter writes routers (and Qwen2-MoE's shared-expert gate) as F32 whatever the type, and
    llama.cpp's quantizer leaves them so: kiln's f16 and quantized files too."""
    for quant in GGUF_TYPES:
        g = open_gguf(exports[name, quant][0])
        routers = [t for t in g.tensors if "ffn_gate_inp" in t.name]
        assert len(routers) == (4 if SHARED_FF[name] else 2)  # with a shared expert: its gate too, per layer
        assert {t.tensor_type.name for t in routers} == {"F32"}, quant


def test_f16_tensors_equal_llama_cpp_converter(exports, tmp_path) -> None:
    """tests/test_gguf_keys.py compares f32 files; at f16 the converter keeps routers F32, as kiln does."""
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports it: pip install -e '.[dev]'")
    import gguf

    from kiln.fixtures import LLAMA_CPP_PRE
    from kiln.fixtures.llama_converter import convert_many

    jobs = [(build(n, progress=False), tmp_path / f"{n}.f16.gguf", LLAMA_CPP_PRE[n], CONVERTER_ARGS.get(n, ()))
            for n in MOE]
    convert_many(jobs, "f16")
    for name, (_, conv, *_) in zip(MOE, jobs):
        ours = {t.name: t for t in gguf.GGUFReader(exports[name, "f16"][0]).tensors}
        theirs = {t.name: t for t in gguf.GGUFReader(conv).tensors}
        assert sorted(ours) == sorted(theirs)
        for tname, t in ours.items():
            c = theirs[tname]
            assert (t.tensor_type, list(t.shape)) == (c.tensor_type, list(c.shape)), tname
            assert np.array_equal(t.data, c.data), tname


@pytest.mark.parametrize("name", MOE)
def test_fused_expert_layout_exports_the_same_tensors(name: str, tmp_path: Path) -> None:
    """A checkpoint holding transformers 5's fused expert tensors (one [experts, 2 x ff, hidden] gate_up and
    one [experts, hidden, ff] down per layer) gives the same GGUF tensors, verified like the per-expert one."""
    import gguf
    from safetensors.torch import save_file as save_torch

    src = build(name, progress=False)
    fused = _copy(name, tmp_path / "fused")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state and "model.layers.0.mlp.experts.0.up_proj.weight" \
        not in state
    (fused / "model.safetensors").unlink()
    save_torch(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    export_gguf_artifact(fused, tmp_path / "fused.gguf", "f32")  # verified against transformers on the fused files
    export_gguf_artifact(src, tmp_path / "per-expert.gguf", "f32", verify=False)
    a = {t.name: t for t in gguf.GGUFReader(tmp_path / "fused.gguf").tensors}
    b = {t.name: t for t in gguf.GGUFReader(tmp_path / "per-expert.gguf").tensors}
    assert sorted(a) == sorted(b)
    for tname in a:
        assert np.array_equal(a[tname].data, b[tname].data), tname


# ------------------------------------------------------------------------------------------------ runtime


@pytest.mark.parametrize("name", MOE)
def test_generation_follows_transformers(exports, name: str) -> None:
    """Greedy decoding in kiln's llama.cpp engine from a chat prompt gives transformers' greedy tokens.

    With the engine settings verification uses (float32 KV cache: the default f16 cache rounds enough to
    flip a near tie), on a prompt whose greedy path has no near tie in transformers (top-2 logit margin
    at least 0.07 on both fixtures; "Hello there" has 0.002 on tiny-qwen3-moe)."""
    from kiln.formats import open_engine, require_format
    from kiln.runtime.generate import generate, prompt_ids

    src = build(name, progress=False)
    path = exports[name, "f32"][0]
    with open_engine(path, n_ctx=256, **require_format(path).verification_options) as engine:
        ids = prompt_ids(engine, "Write a short poem about bread.", chat=True)
        got = generate(engine, ids, max_tokens=12)
    assert got.prompt_tokens == len(ids) and got.tokens
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=len(got.tokens), do_sample=False,
                              eos_token_id=None)[0, len(ids):].tolist()
    assert got.tokens == want


# ------------------------------------------------------------------------------------------------ refusals


def test_onnx_for_qwen3_moe_is_refused_in_one_line(tmp_path: Path) -> None:
    """onnxruntime-genai's builder has no Qwen2/Qwen3-MoE graph (GPTQ and the imatrix do these families:
    test_gptq_hybrid.py)."""
    out = tmp_path / "out"
    proc = kiln("export", "onnx", build("tiny-qwen3-moe", progress=False), "-o", out, "--precision", "int4")
    one_line_error(proc, "Qwen3-MoE", "no ONNX export")
    assert list(tmp_path.iterdir()) == []


def test_missing_expert_tensor_names_layer_and_expert(tmp_path: Path) -> None:
    src = _copy("tiny-qwen2-moe", tmp_path / "model")
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out_dir = tmp_path / "out"
    proc = kiln("export", "gguf", src, "-o", out_dir / "m.gguf", "--quant", "q8_0")
    one_line_error(proc, "layer 1, expert 2", "model.layers.1.mlp.experts.2.up_proj.weight", "missing")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_expert_with_the_wrong_shape_names_layer_and_expert(tmp_path: Path) -> None:
    src = _copy("tiny-qwen3-moe", tmp_path / "model")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.mlp.experts.3.down_proj.weight"] = np.zeros((64, 16), np.float32)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KilnError, match=r"layer 0, expert 3: tensor model\.layers\.0\.mlp\.experts\.3\.down_proj"
                                        r"\.weight has shape \[64, 16\], config\.json implies \[64, 32\]"):
        load_checkpoint(src)


@pytest.mark.parametrize(("name", "changes", "needle"), [
    ("tiny-qwen2-moe", {"mlp_only_layers": [1]}, "layers [1] have a dense MLP"),
    ("tiny-qwen3-moe", {"decoder_sparse_step": 2}, "layers [0] have a dense MLP"),
    ("tiny-qwen2-moe", {"norm_topk_prob": True}, "never renormalises"),
    ("tiny-qwen3-moe", {"norm_topk_prob": False}, "always renormalises"),
    ("tiny-qwen2-moe", {"tie_word_embeddings": True}, "needs an output.weight of its own"),
    ("tiny-qwen3-moe", {"attention_bias": True}, "no o_proj bias"),
    ("tiny-qwen2-moe", {"num_experts_per_tok": 5}, "exceeds the 4 experts"),
], ids=["mlp-only-layers", "sparse-step", "qwen2-norm-topk", "qwen3-no-norm-topk", "qwen2-tied", "qwen3-bias",
        "top-k"])
def test_configs_llama_cpp_cannot_run_are_refused(name: str, changes: dict, needle: str, tmp_path: Path) -> None:
    """llama.cpp's qwen2moe/qwen3moe graphs route every layer, renormalise the top-k weights never / always,
    and (qwen2moe) need their own output.weight: a GGUF of anything else would compute another model."""
    src = _copy(name, tmp_path / "model")
    _edit_config(src, **changes)
    with pytest.raises(KilnError, match="config.json") as info:
        load_checkpoint(src)
    assert needle in str(info.value)


def test_qwen2_moe_without_qkv_bias_is_verified(tmp_path: Path) -> None:
    """Qwen2MoeConfig.qkv_bias false: no q/k/v biases written, and llama.cpp runs it like transformers."""
    src = _copy("tiny-qwen2-moe", tmp_path / "model")
    _edit_config(src, qkv_bias=False)
    weights = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.endswith("_proj.bias")}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    result = export_gguf_artifact(src, tmp_path / "m.gguf", "f32")
    assert result.record["verification"]["passed"]
    assert not [t.name for t in open_gguf(tmp_path / "m.gguf").tensors if t.name.endswith(".bias")]


# ------------------------------------------------------------------------------------------------ cost model


@pytest.mark.parametrize("name", MOE)
def test_plan_counts_every_expert(exports, name: str) -> None:
    """The cost model's weight bytes per type are the exported files' own (llama.cpp's per-tensor choices for
    stacked experts and F32 routers included); KV per token comes from the attention alone."""
    from kiln import families
    from kiln.bench.cost_model import gguf_weights, hf_tensors
    from kiln.bench.plan import plan

    src = build(name, progress=False)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    spec = load_checkpoint(src).spec
    assert sum(t.n for t in hf_tensors(config)) == spec.n_params
    for quant in ("f16", "q8_0", "q4_k_m"):
        _, n_bytes, n_elements = open_gguf(exports[name, quant][0]).tensor_totals()
        assert gguf_weights(config, quant).bytes == n_bytes, quant
        assert n_elements == spec.n_params
    p = plan(src, 256 << 20)
    assert p.recommended is not None and p.recommended.fits
    kv_layers = families.of(spec).kv_layer_count(config)  # a hybrid's attention layers only
    assert kv_layers == (1 if spec.layer_types else spec.n_layers)
    assert p.recommended.estimate.kv_per_token == 2 * kv_layers * spec.n_kv_heads * spec.head_dim * 2


# The released configs (their architecture keys), for the parameter counts their model cards state.
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                 "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "moe_intermediate_size": 768,
                 "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                 "mlp_only_layers": [], "tie_word_embeddings": False, "max_position_embeddings": 40960,
                 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
QWEN15_MOE_A27B = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
                   "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "num_key_value_heads": 16, "vocab_size": 151936, "moe_intermediate_size": 1408,
                   "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                   "norm_topk_prob": False, "decoder_sparse_step": 1, "tie_word_embeddings": False,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}


@pytest.mark.parametrize(("config", "billions", "kv_per_token"), [
    (QWEN3_30B_A3B, 30.5, 2 * 48 * 4 * 128 * 2),
    (QWEN15_MOE_A27B, 14.3, 2 * 24 * 16 * 128 * 2),
], ids=["qwen3-30b-a3b", "qwen1.5-moe-a2.7b"])
def test_plan_on_released_configs(config: dict, billions: float, kv_per_token: int, tmp_path: Path) -> None:
    from kiln.bench.cost_model import hf_tensors

    assert sum(t.n for t in hf_tensors(config)) / 1e9 == pytest.approx(billions, rel=0.01)
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    proc = kiln("plan", tmp_path, "--memory", "64GiB", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["recommended"] is not None
    assert result["recommended"]["estimate"]["kv_per_token"] == kv_per_token


# ------------------------------------------------------------------------------------------------ Qwen3.5-MoE


def test_qwen3_5_moe_missing_expert_names_layer_and_expert(tmp_path: Path) -> None:
    """tiny-qwen3_5-moe holds one tensor per expert (transformers' save); one of them gone fails in one line."""
    src = _copy("tiny-qwen3_5-moe", tmp_path / "model")
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.experts.2.down_proj.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out_dir = tmp_path / "out"
    proc = kiln("export", "gguf", src, "-o", out_dir / "m.gguf", "--quant", "q8_0")
    one_line_error(proc, "layer 1, expert 2", "model.layers.1.mlp.experts.2.down_proj.weight", "missing")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize("args", [
    ("export", "onnx", "{src}", "-o", "{out}", "--precision", "int4"),
], ids=["onnx-int4"])
def test_what_kiln_cannot_do_for_qwen3_5_moe_is_refused_in_one_line(args, tmp_path: Path) -> None:
    """A quantized ONNX graph (kiln cannot yet read the builder's quantized expert nodes back to verify it);
    GPTQ and the imatrix do run on Qwen3.5-MoE (tests/test_gptq_hybrid.py)."""
    src = build("tiny-qwen3_5-moe", progress=False)
    out = tmp_path / "out"
    proc = kiln(*(a.format(src=src, out=out) for a in args))
    one_line_error(proc, "Qwen3.5-MoE", "fp32 only")
    assert list(tmp_path.iterdir()) == []


def test_qwen3_5_moe_fp32_onnx_is_verified(tmp_path: Path) -> None:
    """onnxruntime-genai's Qwen3.5-MoE graph (its MoE op on the CPU, Gated DeltaNet as for the dense model),
    verified in onnxruntime against transformers at short positions and at the end of the context."""
    pytest.importorskip("onnxruntime_genai")
    from kiln.pipeline import export_onnx_artifact

    result = export_onnx_artifact(build("tiny-qwen3_5-moe", progress=False), tmp_path / "moe-fp32", "fp32")
    v = result.record["verification"]
    assert v["passed"], v["criterion"]
    assert v["short_positions"]["rel"] < 1e-4 and v["long_positions"]["rel"] < 1e-4


def test_qwen3_5_moe_cache_buffers_equal_llama_cpp(exports) -> None:
    """The hybrid MoE's K/V (its one attention layer) and its DeltaNet state per sequence, predicted from
    config.json and from the GGUF, equal the buffers llama.cpp allocates."""
    from kiln import llamacpp_log
    from kiln.bench.geometry import hf_geometry, read_geometry
    from kiln.runtime.llamacpp import LlamaCppEngine

    src = build("tiny-qwen3_5-moe", progress=False)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    path = exports["tiny-qwen3_5-moe", "q8_0"][0]
    hf, art = hf_geometry(config, src), read_geometry(path)
    assert hf.kv_layers == art.kv_layers == 1 and hf.state_bytes == art.state_bytes > 0
    with LlamaCppEngine(path, n_ctx=256, n_seq_max=4, prompt_cache=0):
        reported = llamacpp_log.buffer_sizes()  # MiB, printed to two decimals
    assert abs(reported["state"] - 4 * art.state_bytes / 2**20) <= 0.006
    assert abs(reported["kv"] - art.kv_bytes(256, "f16") / 2**20) <= 0.006
