"""Write an ONNX model directory with onnxruntime-genai's model builder, then make its positions faithful.

The builder writes the fastest ORT graphs for these families (GroupQueryAttention with fused
rotary, MatMulNBits int4/int8) plus `genai_config.json`, so kiln drives it rather than writing
its own graphs. Two things it gets wrong for kiln's purposes are fixed here (DESIGN.md §2):

* its rotary tables come from its own RoPE code, whose YaRN differs from transformers'
  (division by zero without beta_fast/beta_slow, an unrounded correction range). kiln stages
  the config with plain RoPE at the effective context and then overwrites `cos_cache` /
  `sin_cache` with the tables transformers itself computes for the baked settings, so the
  graph's positions and the reference model's can never disagree;
* its graphs derive positions from the attention mask only. kiln adds a `position_ids`
  input wired to every GroupQueryAttention node (and declares it in genai_config.json, so
  onnxruntime-genai feeds it too), which lets an engine place tokens at any position. A graph
  that rotates outside attention (Qwen3.5's MRotaryEmbedding nodes) has a position_ids input
  of its own ([3, batch, seq]), and only its rotary tables are rewritten.

What the builder needs to see differs by family (Qwen3.5: its multimodal config layout, extra
builder options): the family says it (`onnx_builder_config`, `onnx_builder_options`).

It also takes any linear layer whose width equals the vocabulary size for the LM head,
so such checkpoints are refused before building instead of producing a wrong graph.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln import families
from kiln.checkpoint.reader import Checkpoint
from kiln.checkpoint.rope import RopeSettings
from kiln.errors import KilnError
from kiln.jsonfile import read_json_object

PRECISIONS = ("fp32", "fp16", "int4", "int8")
BLOCK_SIZES = (16, 32, 64, 128, 256)
LM_HEAD_CHOICES = ("quant", "int8", "float")
EMBEDDING_CHOICES = ("quant", "float")
QUANT_METHODS = ("default", "rtn", "k_quant")  # the builder's algo_config base methods
MODEL_FILE = "model.onnx"
POSITION_IDS = "position_ids"
GQA = "GroupQueryAttention"
GQA_POSITION_INPUT = 9  # com.microsoft GroupQueryAttention input index of position_ids
GQA_COS, GQA_SIN = 7, 8  # ... and of its rotary tables (used when do_rotary=1)
# Rotary nodes outside attention (com.microsoft RotaryEmbedding / MRotaryEmbedding): their cos / sin tables
ROTARY_NODES = {"RotaryEmbedding": (2, 3), "MRotaryEmbedding": (2, 3)}
# rope_parameters entries that say which dimensions rotate and how (partial rotary, MRoPE sections), not how
# positions scale: kept when kiln restates the rope settings (as kiln.checkpoint.hf_model does)
ROPE_LAYOUT_KEYS = ("partial_rotary_factor", "mrope_section", "mrope_interleaved")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class OnnxOptions:
    """What a user picks; int4/int8 become MatMulNBits nodes with these block settings."""

    precision: str = "int4"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits: 4 = quantize activations to int8 per block (the fast CPU path)
    # int8 by default, as llama.cpp keeps its output tensor at 6+ bits: on SmolLM2 an int4 head
    # costs KL 0.417 against 0.326 with an int8 one (q4_0 GGUF: 0.319), for 1.9 more bits/weight.
    lm_head: str = "int8"  # int8; quant: like the body (smallest file); float: unquantized
    embeddings: str = "quant"  # quant: int4 GatherBlockQuantized where possible; float: unquantized
    execution_provider: str = "cpu"
    method: str = "default"  # builder algo_config: default (C++ blockwise RTN), rtn, k_quant

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise KilnError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.block_size not in BLOCK_SIZES:
            raise KilnError(f"--block-size {self.block_size}: expected one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise KilnError(f"--accuracy-level {self.accuracy_level}: expected 0 (unset), 1 fp32, 2 fp16, 3 bf16 "
                            "or 4 int8")
        if self.lm_head not in LM_HEAD_CHOICES:
            raise KilnError(f"--lm-head {self.lm_head!r}: expected one of {', '.join(LM_HEAD_CHOICES)}")
        if self.embeddings not in EMBEDDING_CHOICES:
            raise KilnError(f"--embeddings {self.embeddings!r}: expected one of {', '.join(EMBEDDING_CHOICES)}")
        if self.method not in QUANT_METHODS:
            raise KilnError(f"--method {self.method!r}: expected one of {', '.join(QUANT_METHODS)}")
        if self.execution_provider not in ("cpu", "cuda"):
            raise KilnError(f"--execution-provider {self.execution_provider!r}: expected cpu or cuda")
        if self.precision == "fp16" and self.execution_provider == "cpu":
            raise KilnError("--precision fp16 targets GPUs (onnxruntime-genai writes no fp16 CPU graph with "
                            "GroupQueryAttention); pass --execution-provider cuda, or use fp32/int8/int4 on CPU")

    @property
    def quantized(self) -> bool:
        return self.precision in ("int4", "int8")

    def builder_options(self, tied_embeddings: bool) -> list[str]:
        """The builder's `--extra_options KEY=VALUE` list for these choices."""
        if not self.quantized:
            return []
        opts = [f"block_size={self.block_size}", f"is_symmetric={str(self.symmetric).lower()}",
                f"accuracy_level={self.accuracy_level}"]
        if self.method != "default":
            opts.append(f"algo_config={self.method}")
        head = "quant" if self.lm_head == "int8" and self.precision == "int8" else self.lm_head
        if tied_embeddings and (not self.symmetric or head == "int8" or self.embeddings == "float"):
            # With tied embeddings the builder (0.18) reads the embedding table out of the LM head's
            # quantized weight, and for these choices it gets that wrong: asymmetric int4 feeds a float
            # matrix to GatherBlockQuantized, an int8 head points at tensor names it never writes
            # (both graphs fail to load), and it ignores a float-embeddings request. Untying them
            # gives a correct graph; the embedding table is then quantized on its own (int4 blocks).
            opts.append("shared_embeddings=false")
            if self.embeddings == "quant" and self.precision == "int4":  # GatherBlockQuantized is 4-bit only
                opts.append("op_types_to_quantize=MatMul/Gather")
        if head == "float":
            opts.append("nodes_to_exclude=/lm_head/MatMul")
        elif head == "int8":
            opts.append("matmul_mixed_precision=last_matmul:int8")
        if self.embeddings == "float":
            opts.append("op_types_to_quantize=MatMul")
        return opts


@dataclass
class OnnxStats:
    files: list[Path]
    weight_bytes: int
    op_counts: dict[str, int]
    bits_per_weight: float


def check_supported(ckpt: Checkpoint) -> None:
    spec = ckpt.spec
    if not families.of(spec).onnx_builder:
        builder = sorted(a for a, f in families.FAMILIES.items() if f.onnx_builder)
        raise KilnError(f"{spec.source}: ONNX export supports {', '.join(builder)}, not {spec.hf_architecture}")
    widths = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
              "q projection": spec.n_heads * spec.head_dim, "k/v projection": spec.n_kv_heads * spec.head_dim}
    clash = [name for name, width in widths.items() if width == spec.vocab_size]
    if clash:
        raise KilnError(f"{spec.source}: {clash[0]} equals vocab_size ({spec.vocab_size}); onnxruntime-genai's "
                        "builder would take that layer for the LM head and write a wrong graph")


def staged_config(spec_config: dict[str, Any], architecture: str, rope: RopeSettings, theta: float,
                  plain: bool) -> dict[str, Any]:
    """config.json with the effective rope settings (or plain RoPE, for the builder) and context."""
    config = dict(spec_config)
    config["architectures"] = [architecture]  # e.g. Arbor's Llama-style layout says ArborForCausalLM
    block = config.pop("rope_parameters", None) or config.get("rope_scaling") or {}
    kept = {k: v for k, v in block.items() if k in ROPE_LAYOUT_KEYS} if isinstance(block, dict) else {}
    config.pop("rope_scaling", None)
    config.pop("rope_theta", None)
    if plain:
        config["rope_parameters"] = {**kept, "rope_type": "default", "rope_theta": theta}
    else:
        config["rope_parameters"] = {**kept, **rope.hf_rope_parameters(theta)}
    context = int(rope.context_length or spec_config.get("max_position_embeddings") or 0)
    config["max_position_embeddings"] = max(context, 1)
    return config


def rotary_tables(source: Path, config: dict[str, Any], length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [length, head_dim/2] exactly as the transformers model computes them (float32).

    Built by the model family's own rotary module from the staged config, so linear, yarn
    and llama3 scaling (inv_freq and attention scaling alike) come from the reference code.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="kiln-rope-") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(config), encoding="utf-8")
        hf_config = AutoConfig.from_pretrained(tmp, trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    rotary_cls = type(skeleton.model.rotary_emb)
    rotary = rotary_cls(config=hf_config)
    x = torch.zeros(1, dtype=torch.float32)
    positions = torch.arange(length, dtype=torch.int64).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(x, positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def _stage_source(spec_source: Path, stage: Path, config: dict[str, Any]) -> None:
    stage.mkdir()
    for item in spec_source.iterdir():
        if item.name == "config.json" or not item.is_file():
            continue
        os.symlink(item.resolve(), stage / item.name)
    (stage / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _run_builder(stage: Path, out: Path, cache: Path, options: OnnxOptions, n_layers: int,
                 tied_embeddings: bool, progress: Progress | None, family_options: tuple[str, ...] = ()) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(stage), "-o", str(out),
           "-p", options.precision, "-e", options.execution_provider, "-c", str(cache)]
    extra = [*family_options, *options.builder_options(tied_embeddings)]
    if extra:
        cmd += ["--extra_options", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    tail: list[str] = []
    layer = re.compile(r"Reading layer (\d+)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        m = layer.search(line)
        if m and progress:
            progress("build", int(m.group(1)) + 1, n_layers)
    if proc.wait() != 0:
        detail = next((t for t in reversed(tail) if re.search(r"(Error|Exception)\b", t)), tail[-1] if tail else "")
        if "No space left" in "\n".join(tail):
            raise KilnError(f"disk full while writing {out}")
        raise KilnError(f"onnxruntime-genai's builder failed: {detail.strip()[:300]}")


def _patch_graph(out: Path, cos: np.ndarray, sin: np.ndarray) -> dict[str, int]:
    """Add `position_ids` to every GQA node (where the graph has no position input of its own) and write
    kiln's rotary tables over the builder's (GQA's own, or those of rotary nodes outside attention)."""
    import onnx

    model_path = out / MODEL_FILE
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    gqa = [n for n in graph.node if n.op_type == GQA]
    if not gqa:
        raise KilnError(f"{model_path}: the builder wrote no {GQA} nodes; kiln cannot place positions in this graph")
    # A graph with its own position_ids (MRoPE: [3, batch, seq]) places positions itself, in rotary nodes
    # before attention; kiln's [batch, seq] input goes to GQA's fused rotary otherwise.
    own_positions = any(i.name == POSITION_IDS for i in graph.input)
    if not own_positions:
        graph.input.append(onnx.helper.make_tensor_value_info(
            POSITION_IDS, onnx.TensorProto.INT64, ["batch_size", "sequence_length"]))
    tables = {}
    for node in gqa:
        rotary = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "do_rotary"), 0)
        if own_positions and not rotary:
            continue
        inputs = list(node.input) + [""] * max(0, GQA_POSITION_INPUT + 1 - len(node.input))
        inputs[GQA_POSITION_INPUT] = POSITION_IDS
        tables[inputs[GQA_COS]] = cos
        tables[inputs[GQA_SIN]] = sin
        del node.input[:]
        node.input.extend(inputs)
    for node in graph.node:
        if node.op_type in ROTARY_NODES:
            c, s = ROTARY_NODES[node.op_type]
            tables[node.input[c]] = cos
            tables[node.input[s]] = sin
    if not tables:
        raise KilnError(f"{model_path}: no rotary tables found (neither in {GQA} nor in rotary nodes); kiln "
                        "cannot make this graph's positions match the source")
    found = set()
    for init in graph.initializer:
        if init.name not in tables:
            continue
        table = tables[init.name]
        if tuple(init.dims) != table.shape:
            raise KilnError(f"{model_path}: rotary table {init.name} has shape {list(init.dims)}, "
                            f"expected {list(table.shape)}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        data = np.ascontiguousarray(table.astype(dtype)).tobytes()
        if init.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in init.external_data}
            offset, length = int(ext.get("offset", 0)), int(ext.get("length", len(data)))
            if length != len(data):
                raise KilnError(f"{model_path}: rotary table {init.name} stores {length} bytes, expected {len(data)}")
            with open(out / ext["location"], "r+b") as f:
                f.seek(offset)
                f.write(data)
        else:
            init.raw_data = data
            del init.float_data[:]
        found.add(init.name)
    if found != set(tables):
        raise KilnError(f"{model_path}: rotary tables {sorted(set(tables) - found)} not found among the initializers")
    model.producer_version = builder_version()
    onnx.save(model, str(model_path))
    counts: dict[str, int] = {}
    for n in graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def builder_version() -> str:
    """onnxruntime-genai's version and commit, as its builder stamps them when installed from a wheel.

    Why kiln stamps it itself: the builder runs `git rev-parse HEAD` five directories above its own
    file and, when that lands inside any git repository (a venv in a project checkout, as `make`
    makes), it records *that* repository's commit, so the same export changed bytes with every kiln
    commit. The package's own `__commit__` is the one that describes the builder."""
    import onnxruntime_genai as og

    commit = getattr(og, "__commit__", None)
    return f"{og.__version__}+{commit[:7]}" if commit else str(og.__version__)


def _patch_genai_config(out: Path, context: int) -> None:
    path = out / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    decoder = config["model"]["decoder"]
    decoder["inputs"][POSITION_IDS] = POSITION_IDS
    config["model"]["context_length"] = context
    config["search"]["max_length"] = context
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def _copy_tokenizer(source: Path, out: Path) -> None:
    """The source's own tokenizer files, byte for byte (the builder re-serialises them through
    transformers, which is not guaranteed to round-trip kiln's rebuilt byte-level vocabularies)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def export_onnx(ckpt: Checkpoint, out: Path, options: OnnxOptions, rope: RopeSettings,
                progress: Progress | None = None) -> OnnxStats:
    """Build the ONNX graph of `ckpt` into the (empty, temporary) directory `out`."""
    options.validate()
    check_supported(ckpt)
    spec = ckpt.spec
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise KilnError("ONNX export needs onnxruntime-genai (pip install 'kiln-llm[onnx]')") from None
    context = int(rope.context_length or spec.context_length)
    # named like kiln.atomic's temporaries, so the recipe runner's sweep clears it after a crash
    family = families.of(spec)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.kiln-", suffix=".onnx.part", dir=out.parent) as work:
        stage = Path(work) / "source"
        plain = staged_config(spec.config, spec.hf_architecture, rope, spec.rope_theta, plain=True)
        plain = family.onnx_builder_config(plain, read_json_object(spec.source / "config.json"))
        _stage_source(spec.source, stage, plain)
        _run_builder(stage, out, Path(work) / "cache", options, spec.n_layers, spec.tie_embeddings, progress,
                     family.onnx_builder_options)
    if progress:
        progress("rotary tables", 0, 1)
    real = staged_config(spec.config, spec.hf_architecture, rope, spec.rope_theta, plain=False)
    cos, sin = rotary_tables(spec.source, real, context)
    counts = _patch_graph(out, cos, sin)
    _patch_genai_config(out, context)
    _copy_tokenizer(spec.source, out)
    if progress:
        progress("rotary tables", 1, 1)
    files = sorted(p for p in out.iterdir() if p.is_file())
    weight_bytes = sum(p.stat().st_size for p in files if p.name.startswith(MODEL_FILE))
    return OnnxStats(files=files, weight_bytes=weight_bytes, op_counts=counts,
                     bits_per_weight=8 * weight_bytes / max(spec.n_params, 1))


def options_json(options: OnnxOptions) -> dict[str, Any]:
    return asdict(options)
