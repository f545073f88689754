"""Native Arbor checkpoints (Noema-Research/Arbor), read by tensor names and re-expressed as HF GPT-2.

Arbor's runnable model is a GPT-2 style decoder (reference/arbor.md §0, §2): sinusoidal absolute
positions added once, pre-LayerNorm with bias, fused QKV with bias, exact-erf GELU MLP, tied head.
Its code writes three containers, all with the same native tensor names (§1.1):

* A: a trainer ``.pt`` dict (``model_state_dict`` + ``model_config``; or ``state_dict`` + ``config``);
* B: a ``save_pretrained`` directory (``config.json`` = ``ArborConfig.__dict__`` + ``pytorch_model.bin``);
* C: a bare state dict (``model.safetensors`` or ``pytorch_model.bin``) with no config at all.

Dimensions always come from tensor shapes: growth leaves ``ffn_dim`` and sometimes ``num_layers``
stale in the config (§3). Only the number of heads and the LayerNorm eps cannot be seen in shapes.
The Llama-style ``arbor-500m-1b-hf`` layout (flavour E) is a Llama model and is read by
``kiln.checkpoint.load_checkpoint`` (families.BY_TENSORS), not here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.checkpoint.gpt2 import (LAYER_SHAPES, Gpt2Checkpoint, gpt2_config, is_nanogpt, read_tokenizer_for,
                                 tokenizer_dir_for)
from kiln.checkpoint.tensors import find_weight_files, open_pickle, open_safetensors, torch_load_weights
from kiln.errors import KilnError
from kiln.jsonfile import read_json_object

EMBED = "token_embedding.embedding.weight"
POS = "pos_encoding.pe"
FINAL_NORM = ("final_norm.weight", "final_norm.bias")
LM_HEAD = "lm_head.weight"

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

# Tensor names that identify what a checkpoint is, checked in order (reference/arbor.md §1.1, §2.5).
# Only the first row is read here; the others are refused with the reason.
LAYOUT_MARKERS: tuple[tuple[str, str | None], ...] = (
    (EMBED, None),
    ("transformer.h.0.mlp.expandable_ffn.fc1.weight",
     "is Arbor's HF-wrapper layout (GPT-2 names + expandable_ffn), which kiln does not read yet"),
    ("layers.0.attention.q_proj.weight",
     "is Arbor's 'enterprise' variant, whose attention module is never called by its own forward"),
    ("model.layers.0.self_attn.q_proj.weight",
     "has Llama tensor names: read it with kiln.checkpoint.load_checkpoint (a Llama-style Arbor config)"),
)

# Activation names of ArborConfig -> HF ACT2FN names (GPT2Config.activation_function).
ACTIVATIONS: dict[str, str] = {"gelu": "gelu", "relu": "relu", "swish": "silu"}

# Config files that can name the head count of a bare state dict (layout C): Arbor's YAML trainer config.
SIDECARS: tuple[str, ...] = ("training_config.yaml", "config.yaml", "training_config.yml", "config.yml")


@dataclass(frozen=True)
class ArborSpec:
    """What a native Arbor checkpoint is, all sizes from tensor shapes except heads and eps."""

    n_layers: int
    hidden: int
    n_heads: int
    vocab: int
    max_positions: int  # rows of the sinusoidal table: positions past it do not exist
    ffn_widths: tuple[int, ...]  # true per-layer widths (tensors are padded to max(ffn_widths))
    ln_eps: float
    tied: bool
    activation: str  # ArborConfig.activation: gelu (exact erf), relu or swish
    source: Path
    layout: str  # "A" trainer .pt, "B" save_pretrained dir, "C" bare state dict

    @property
    def ffn_max(self) -> int:
        return max(self.ffn_widths)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


def sinusoid_table(positions: int, dim: int) -> np.ndarray:
    """Arbor's PositionalEncoding buffer [positions, dim]: interleaved sin/cos (arbor.md §2.2), float32."""
    pos = np.arange(positions, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
    table = np.zeros((positions, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * div)
    table[:, 1::2] = np.cos(pos * div)[:, : dim // 2]
    return table.astype(np.float32)


def _refuse_pickle(path: Path) -> KilnError:
    return KilnError(f"{path}: a pickle file; pickle can run code, pass --allow-pickle to load it "
                     "with torch's weights_only loader")


def _torch_load(path: Path) -> Any:
    try:
        import torch  # noqa: F401 - only to say what is missing
    except ImportError:
        raise KilnError(f"{path}: reading .pt checkpoints needs torch (pip install 'kiln-llm[torch]')") from None
    return torch_load_weights(path)


def _to_numpy(state: dict[str, Any], path: Path, key: str) -> dict[str, np.ndarray]:
    import torch

    if not isinstance(state, dict):
        raise KilnError(f"{path}: {key!r} is not a state dict ({type(state).__name__})")
    return {k: v.float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_trainer_file(path: Path, allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Layout A: ``save_checkpoint``'s dict or ``best_model.pt``'s; a plain state dict (a lone .bin) also works."""
    if not allow_pickle:
        raise _refuse_pickle(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise KilnError(f"{path}: expected a dict, found {type(obj).__name__}")
    for weights_key, config_key in (("model_state_dict", "model_config"), ("state_dict", "config")):
        if weights_key in obj:
            config = obj.get(config_key)
            if config is not None and not isinstance(config, dict):
                raise KilnError(f"{path}: {config_key!r} is not a dict ({type(config).__name__})")
            return _to_numpy(obj[weights_key], path, weights_key), config
    return _to_numpy(obj, path, "state dict"), None


def _read_directory(directory: Path, allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """Layouts B and C: weights beside an optional native ``config.json``."""
    kind, files = find_weight_files(directory, allow_pickle)
    source = open_safetensors(files) if kind == "safetensors" else open_pickle(files)
    tensors = {name: source.load(name) for name in source.names()}
    path = directory / "config.json"
    if not path.exists():
        return tensors, None
    return tensors, read_json_object(path)


def _sidecar(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The ``model:`` block of Arbor's YAML trainer config next to a bare state dict, if any."""
    import yaml

    for name in SIDECARS:
        path = directory / name
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise KilnError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
            block = data.get("model", data) if isinstance(data, dict) else None
            if not isinstance(block, dict):
                raise KilnError(f"{path}: expected a mapping with a 'model' block")
            return path, block
    return None


def _identify(names: list[str], where: Path, config: dict[str, Any] | None) -> None:
    present = set(names)
    for marker, refusal in LAYOUT_MARKERS:
        if marker in present:
            if refusal is None:
                return
            raise KilnError(f"{where}: {refusal} (found {marker})")
    claim = f"model_type {config.get('model_type')!r}, " if config and config.get("model_type") else ""
    first = sorted(present)[0] if present else "none"
    raise KilnError(f"{where}: not a native Arbor checkpoint ({claim}no {EMBED}; tensors such as {first!r})")


def _heads(config: dict[str, Any] | None, config_path: Path, n_heads: int | None, where: Path) -> int:
    found = config.get("num_heads") if config else None
    if found is not None and (isinstance(found, bool) or not isinstance(found, int) or found <= 0):
        raise KilnError(f"{config_path}: 'num_heads' must be a positive integer, got {found!r}")
    if n_heads is not None:
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0:
            raise KilnError(f"{where}: n_heads must be a positive integer, got {n_heads!r}")
        if found is not None and found != n_heads:
            raise KilnError(f"{config_path}: 'num_heads' is {found}, but n_heads={n_heads} was passed")
        return n_heads
    if found is None:
        raise KilnError(f"{where}: the number of attention heads cannot be read from tensor shapes and no "
                        f"config names it; pass n_heads (Arbor's YAML model.num_heads) or add {SIDECARS[0]}")
    return found


def _check(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...], where: Path, why: str) -> None:
    if name not in tensors:
        raise KilnError(f"{where}: tensor {name} is missing")
    actual = tuple(tensors[name].shape)
    if actual != shape:
        raise KilnError(f"{where}: tensor {name} has shape {list(actual)}, expected {list(shape)} ({why})")


def _layer_count(names: list[str], where: Path) -> int:
    indices = sorted({int(m.group(1)) for n in names if (m := _LAYER_RE.match(n))})
    if not indices:
        raise KilnError(f"{where}: no layers.N.* tensors")
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise KilnError(f"{where}: layer indices are not contiguous (layers.{missing[0]}.* is missing)")
    return len(indices)


def pad_ffn(tensors: dict[str, np.ndarray], n_layers: int, width: int) -> dict[str, np.ndarray]:
    """Zero-pad every layer's FFN to ``width`` (fc1 rows + bias entries, fc2 columns).

    Exact: a padded hidden unit has zero input weights and bias, so its pre-activation is 0;
    act(0) = 0 for gelu, relu and silu; and its zero fc2 column adds nothing to the output.
    """
    out = dict(tensors)
    for i in range(n_layers):
        w1, b1, w2 = (out[f"layers.{i}.ffn.{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight"))
        extra = width - w1.shape[0]
        if extra:
            out[f"layers.{i}.ffn.fc1.weight"] = np.pad(w1, ((0, extra), (0, 0)))
            out[f"layers.{i}.ffn.fc1.bias"] = np.pad(b1, (0, extra))
            out[f"layers.{i}.ffn.fc2.weight"] = np.pad(w2, ((0, 0), (0, extra)))
    return out


def _source_layout(path: Path) -> str:
    if path.is_file():  # a lone state-dict file is C; any other pickle is a trainer dict
        return "C" if path.suffix in (".safetensors", ".bin") else "A"
    return "B" if (path / "config.json").exists() else "C"


def _safetensors_names(path: Path) -> set[str]:
    """Tensor names from a safetensors header alone (8-byte length + JSON), without reading weights."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < (100 << 20) else {}
    except (OSError, ValueError, RecursionError):
        return set()
    return set(header) if isinstance(header, dict) else set()


def is_native_arbor(path: str | Path) -> bool:
    """Whether `path` should be read here rather than by load_checkpoint: a single weights file, a
    directory without config.json, or one whose config.json is an ArborConfig (`dim`, `num_heads`,
    no `architectures`). read_arbor then decides by tensor names and refuses anything else clearly."""
    where = Path(path)
    if where.is_file():
        # a nanoGPT ckpt.pt is a .pt too: told apart by its pickle's opcodes, nothing unpickled
        return where.suffix in (".pt", ".pth", ".bin", ".safetensors") and not is_nanogpt(where)
    config = where / "config.json"
    if not where.is_dir():
        return False
    if not config.exists():
        shards = sorted(where.glob("*.safetensors"))
        if shards:
            return EMBED in _safetensors_names(shards[0])
        return any(where.glob("*.bin"))
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "dim" in data and "num_heads" in data and not data.get("architectures")


def read_arbor(
    path: str | Path, n_heads: int | None = None, allow_pickle: bool = False
) -> tuple[ArborSpec, dict[str, np.ndarray]]:
    """Read a native Arbor checkpoint: its spec and float32 tensors under the native names.

    ``path`` is a trainer ``.pt`` file (A), a ``save_pretrained`` directory (B), or a directory or
    ``.safetensors`` file holding a bare state dict (C). ``n_heads`` is needed for C unless a YAML
    trainer config lies beside it. Grown FFNs come back zero-padded to the widest layer (`pad_ffn`);
    ``spec.ffn_widths`` keeps the true widths. Every tensor's shape is checked before returning.
    """
    where = Path(path)
    if not where.exists():
        raise KilnError(f"{where}: no such file or directory")
    layout = _source_layout(where)
    config_path = where
    if where.is_file() and where.suffix == ".safetensors":
        tensors, config = {n: a for n, a in open_safetensors([where]).items()}, None
    elif where.is_file():
        tensors, config = _read_trainer_file(where, allow_pickle)
    else:
        tensors, config = _read_directory(where, allow_pickle)
        config_path = where / "config.json"
    if config is None:
        side = _sidecar(where if where.is_dir() else where.parent)
        if side is not None:
            config_path, config = side
    names = sorted(tensors)
    _identify(names, where, config)

    vocab, hidden = tensors[EMBED].shape if tensors[EMBED].ndim == 2 else (0, 0)
    if not vocab or not hidden:
        raise KilnError(f"{where}: tensor {EMBED} has shape {list(tensors[EMBED].shape)}, expected [vocab, dim]")
    heads = _heads(config, config_path, n_heads, where)
    if hidden % heads:
        raise KilnError(f"{config_path}: 'num_heads' {heads} does not divide the hidden size {hidden}")
    cfg = config or {}
    if cfg.get("dim") not in (None, hidden):
        raise KilnError(f"{config_path}: 'dim' is {cfg['dim']}, but {EMBED} has width {hidden}")
    activation = cfg.get("activation", "gelu")
    if activation not in ACTIVATIONS:
        raise KilnError(f"{config_path}: 'activation' {activation!r} is not one Arbor has ({', '.join(ACTIVATIONS)})")
    eps = cfg.get("layer_norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise KilnError(f"{config_path}: 'layer_norm_eps' must be a positive number, got {eps!r}")

    if POS not in tensors or tensors[POS].ndim != 3 or tensors[POS].shape[0] != 1 or tensors[POS].shape[2] != hidden:
        shape = list(tensors[POS].shape) if POS in tensors else "missing"
        raise KilnError(f"{where}: tensor {POS} is {shape}, expected [1, max_seq_length, {hidden}]")
    positions = tensors[POS].shape[1]
    head = min(positions, 2048)  # enough rows to tell the table apart from any other
    if not np.allclose(tensors[POS][0, :head], sinusoid_table(head, hidden), atol=2e-2):
        raise KilnError(f"{where}: tensor {POS} is not Arbor's interleaved sin/cos table")

    n_layers = _layer_count(names, where)
    widths = []
    for i in range(n_layers):
        fc1 = tensors.get(f"layers.{i}.ffn.fc1.weight")
        if fc1 is None or fc1.ndim != 2:
            raise KilnError(f"{where}: tensor layers.{i}.ffn.fc1.weight is missing or not a matrix")
        widths.append(fc1.shape[0])
        for suffix, shape in _LAYER.items():
            _check(tensors, f"layers.{i}.{suffix}", shape(hidden, widths[-1]), where,
                   f"hidden {hidden} from {EMBED}, FFN width {widths[-1]} from fc1")
    for name in FINAL_NORM:
        _check(tensors, name, (hidden,), where, f"hidden {hidden} from {EMBED}")
    tied = LM_HEAD not in tensors
    if not tied:
        _check(tensors, LM_HEAD, (vocab, hidden), where, f"vocab and hidden from {EMBED}")
    expected = {EMBED, POS, *FINAL_NORM, *([] if tied else [LM_HEAD])}
    expected |= {f"layers.{i}.{s}" for i in range(n_layers) for s in _LAYER}
    extra = sorted(set(names) - expected)
    if extra:
        raise KilnError(f"{where}: unexpected tensor {extra[0]} (not part of Arbor's native model)")

    spec = ArborSpec(n_layers=n_layers, hidden=hidden, n_heads=heads, vocab=vocab, max_positions=positions,
                     ffn_widths=tuple(widths), ln_eps=float(eps), tied=tied, activation=activation,
                     source=where, layout=layout)
    return spec, pad_ffn(tensors, n_layers, spec.ffn_max)


# Native -> HF GPT-2 names, per layer: (GPT-2 suffix under transformer.h.{i}., native suffix, transpose).
# GPT-2's Conv1D stores weights in x out, the transpose of torch Linear / in_proj (arbor.md §5.1).
GPT2_LAYER: tuple[tuple[str, str, bool], ...] = (
    ("ln_1.weight", "norm1.weight", False),
    ("ln_1.bias", "norm1.bias", False),
    ("attn.c_attn.weight", "self_attn.in_proj_weight", True),
    ("attn.c_attn.bias", "self_attn.in_proj_bias", False),
    ("attn.c_proj.weight", "self_attn.out_proj.weight", True),
    ("attn.c_proj.bias", "self_attn.out_proj.bias", False),
    ("ln_2.weight", "norm2.weight", False),
    ("ln_2.bias", "norm2.bias", False),
    ("mlp.c_fc.weight", "ffn.fc1.weight", True),
    ("mlp.c_fc.bias", "ffn.fc1.bias", False),
    ("mlp.c_proj.weight", "ffn.fc2.weight", True),
    ("mlp.c_proj.bias", "ffn.fc2.bias", False),
)


# Per-layer native tensors: suffix under ``layers.{i}.`` -> shape from (D, F_i), read off GPT-2's table
# (one table): a transposed Conv1D weight [in, out] is torch's [out, in].
_LAYER: dict[str, Any] = {
    native: (lambda d, f, g=gpt2, t=transpose: LAYER_SHAPES[g](d, f)[::-1] if t else LAYER_SHAPES[g](d, f))
    for gpt2, native, transpose in GPT2_LAYER
}


def to_gpt2(spec: ArborSpec, tensors: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The same model as an HF ``GPT2LMHeadModel``: its config.json dict and state dict (float32 numpy).

    Exact, not approximate (arbor.md §5.1): GPT-2 adds a position table at the input (here the
    sinusoid, as ``wpe``), packs q|k|v the way ``in_proj_weight`` does, uses pre-LN with bias,
    scale 1/sqrt(head_dim), and ``activation_function="gelu"`` is the exact erf GELU Arbor uses
    (GPT-2's default ``gelu_new`` is the tanh one). ``tensors`` must be padded to ``spec.ffn_max``
    (as `read_arbor` returns them); ``arbor_ffn_widths`` records the true widths.
    """
    state: dict[str, np.ndarray] = {
        "transformer.wte.weight": tensors[EMBED],
        "transformer.wpe.weight": tensors[POS][0],
        "transformer.ln_f.weight": tensors["final_norm.weight"],
        "transformer.ln_f.bias": tensors["final_norm.bias"],
    }
    for i in range(spec.n_layers):
        for gpt2, native, transpose in GPT2_LAYER:
            value = tensors[f"layers.{i}.{native}"]
            state[f"transformer.h.{i}.{gpt2}"] = np.ascontiguousarray(value.T) if transpose else value
    if not spec.tied:
        state["lm_head.weight"] = tensors[LM_HEAD]
    config = gpt2_config(vocab=spec.vocab, positions=spec.max_positions, hidden=spec.hidden, layers=spec.n_layers,
                         heads=spec.n_heads, inner=spec.ffn_max, activation=ACTIVATIONS[spec.activation],
                         eps=spec.ln_eps, tied=spec.tied)
    config["arbor_ffn_widths"] = list(spec.ffn_widths)
    return config, state


def read_arbor_gpt2(path: str | Path, n_heads: int | None = None, tokenizer: str | Path | None = None,
                    allow_pickle: bool = False) -> Gpt2Checkpoint:
    """A native Arbor checkpoint in the common GPT-2 form (kiln.checkpoint.gpt2), with what its exports
    record besides: the true FFN widths and the erf GELU as GGUF keys and a manifest block, and the
    native spec and tensors (``native``) for checks that run Arbor's own forward."""
    src = Path(path)
    spec, tensors = read_arbor(src, n_heads=n_heads, allow_pickle=allow_pickle)
    tok_dir = tokenizer_dir_for(src, tokenizer)
    tok = read_tokenizer_for(tok_dir, spec.vocab)
    config, state = to_gpt2(spec, tensors)
    return Gpt2Checkpoint(
        config=config, state=state, source=src, tokenizer_dir=tok_dir, tokenizer=tok,
        name=src.stem if src.is_file() else src.name, architecture="arbor", layout=spec.layout,
        gguf_keys=(("arbor.ffn_dims", list(spec.ffn_widths)), ("arbor.activation", "gelu_erf"),
                   ("arbor.source_format", f"native-{spec.layout}")),
        record={"arbor": {"ffn_widths": list(spec.ffn_widths), "max_positions": spec.max_positions,
                          "activation": spec.activation}},
        options={"n_heads": n_heads, "tokenizer": str(tok_dir)},
        native=(spec, tensors))
