"""Every GPT-2 shaped source in one in-memory form: an HF ``GPT2LMHeadModel`` config + state dict.

GPT-2 shaped checkpoints come in several layouts: Hugging Face's own (``GPT2LMHeadModel``, with or
without the ``transformer.`` prefix), nanoGPT's training ``ckpt.pt`` (nn.Linear weights, optional
biases, ``_orig_mod.`` keys after torch.compile), and native Arbor (kiln.checkpoint.arbor). They are
the same model, so each reader here turns its layout into a `Gpt2Checkpoint` and every exporter
(llama.cpp's ``gpt2`` GGUF, kiln's ONNX GPT-2 graph) and check reads only that form. Transformers'
``GPT2LMHeadModel`` loads the state as it is, which makes it the reference for every layout.

The form is HF's exactly: Conv1D weights stored [in, out], q|k|v packed in ``c_attn``, every bias
present (zeros where the source had none: exact, a zero bias adds nothing), ``lm_head.weight`` only
when the head is not tied to ``wte``, float32 throughout.
"""

from __future__ import annotations

import json
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from kiln.checkpoint.spec import TokenizerSpec
from kiln.checkpoint.tensors import find_weight_files, open_pickle, open_safetensors, torch_load_weights
from kiln.checkpoint.tokenizer import read_tokenizer
from kiln.errors import KilnError
from kiln.jsonfile import read_json_object

HF_ARCHITECTURE = "GPT2LMHeadModel"
WTE, WPE, LM_HEAD = "transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"
LN_F = ("transformer.ln_f.weight", "transformer.ln_f.bias")

# Per-layer HF GPT-2 tensors under ``transformer.h.{i}.``: suffix -> shape from (hidden D, FFN width F).
# c_attn/c_proj/c_fc are Conv1D: weight [in, out].
LAYER_SHAPES: dict[str, Any] = {
    "ln_1.weight": lambda d, f: (d,),
    "ln_1.bias": lambda d, f: (d,),
    "attn.c_attn.weight": lambda d, f: (d, 3 * d),
    "attn.c_attn.bias": lambda d, f: (3 * d,),
    "attn.c_proj.weight": lambda d, f: (d, d),
    "attn.c_proj.bias": lambda d, f: (d,),
    "ln_2.weight": lambda d, f: (d,),
    "ln_2.bias": lambda d, f: (d,),
    "mlp.c_fc.weight": lambda d, f: (d, f),
    "mlp.c_fc.bias": lambda d, f: (f,),
    "mlp.c_proj.weight": lambda d, f: (f, d),
    "mlp.c_proj.bias": lambda d, f: (d,),
}
# Non-persistent attention buffers older transformers saved (the causal mask and its fill value):
# not weights, and llama.cpp's converter drops them too.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
_HF_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")

# nanoGPT's torch.compile'd model keeps its weights under this prefix (its own sample.py strips it).
COMPILED_PREFIX = "_orig_mod."
NANOGPT_SUFFIXES = (".pt", ".pth", ".ckpt")
NANOGPT_FILE = "ckpt.pt"  # what nanoGPT's train.py writes into out_dir
# nanoGPT's model.py: nn.Linear weights [out, in] -> (shape from (D, F), is a Linear weight to transpose).
_NANOGPT_LAYER: dict[str, tuple[Any, bool]] = {
    "ln_1.weight": (lambda d, f: (d,), False),
    "ln_1.bias": (lambda d, f: (d,), False),
    "attn.c_attn.weight": (lambda d, f: (3 * d, d), True),
    "attn.c_attn.bias": (lambda d, f: (3 * d,), False),
    "attn.c_proj.weight": (lambda d, f: (d, d), True),
    "attn.c_proj.bias": (lambda d, f: (d,), False),
    "ln_2.weight": (lambda d, f: (d,), False),
    "ln_2.bias": (lambda d, f: (d,), False),
    "mlp.c_fc.weight": (lambda d, f: (f, d), True),
    "mlp.c_fc.bias": (lambda d, f: (f,), False),
    "mlp.c_proj.weight": (lambda d, f: (d, f), True),
    "mlp.c_proj.bias": (lambda d, f: (d,), False),
}
NANOGPT_EPS = 1e-5  # nanoGPT's LayerNorm passes 1e-5 to F.layer_norm
_PICKLE_SCAN_LIMIT = 64 << 20  # bytes of a checkpoint's pickle stream is_nanogpt reads at most


@dataclass(frozen=True)
class Gpt2Checkpoint:
    """A GPT-2 shaped model in HF ``GPT2LMHeadModel`` form, whatever layout it was read from."""

    config: dict[str, Any]  # HF GPT2Config dict (n_inner always an int, n_ctx = n_positions)
    state: dict[str, np.ndarray]  # float32, HF names and layout; lm_head.weight only when untied
    source: Path
    tokenizer_dir: Path  # directory holding tokenizer.json
    tokenizer: TokenizerSpec  # rows: max(model vocab, tokenizer ids); extra ids padded as [PAD{id}]
    name: str  # general.name
    architecture: str  # for the manifest: "GPT2LMHeadModel", "nanogpt", "arbor"
    layout: str  # "hf", "nanogpt", "nanogpt-compiled", Arbor's "A"/"B"/"C"
    gguf_keys: tuple[tuple[str, Any], ...] = ()  # extra GGUF KV pairs, in write order
    record: dict[str, Any] = field(default_factory=dict)  # extra manifest blocks
    options: dict[str, Any] = field(default_factory=dict)  # reader options to record
    native: Any = None  # the source's own form where a check needs it (Arbor: (ArborSpec, tensors))

    @property
    def n_layers(self) -> int:
        return int(self.config["n_layer"])

    @property
    def hidden(self) -> int:
        return int(self.config["n_embd"])

    @property
    def n_heads(self) -> int:
        return int(self.config["n_head"])

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def vocab(self) -> int:
        """Rows of the model's embedding (may be fewer or more than the tokenizer's ids)."""
        return int(self.config["vocab_size"])

    @property
    def context(self) -> int:
        """Rows of the position table: positions past it do not exist."""
        return int(self.config["n_positions"])

    @property
    def ffn(self) -> int:
        return int(self.config["n_inner"])

    @property
    def tied(self) -> bool:
        return LM_HEAD not in self.state

    @property
    def activation(self) -> str:
        """The HF ACT2FN name: "gelu" is exact erf, "gelu_new" the tanh approximation llama.cpp computes."""
        return str(self.config["activation_function"])

    @property
    def ln_eps(self) -> float:
        return float(self.config["layer_norm_epsilon"])


def gpt2_config(*, vocab: int, positions: int, hidden: int, layers: int, heads: int, inner: int,
                activation: str, eps: float, tied: bool, bos_token_id: int | None = None,
                eos_token_id: int | None = None) -> dict[str, Any]:
    """The common form's config.json dict: what `GPT2Config(**config)` needs to build the same model
    (dropouts off, attention scaled by 1/sqrt(head_dim) only), keys in the order to_gpt2 writes them."""
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": positions,
        "n_ctx": positions,  # llama.cpp's convert_hf_to_gguf reads this key
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": inner,
        "activation_function": activation,
        "layer_norm_epsilon": eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": tied,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
    }


# --- tokenizers ------------------------------------------------------------------------------------


def tokenizer_dir_for(src: str | Path, tokenizer: str | Path | None) -> Path:
    """Where a checkpoint's tokenizer.json lives: `tokenizer` if given, else beside the checkpoint (the
    directory itself, or the file's directory) or in its ``tokenizer/``; Arbor and nanoGPT sources
    often have none of their own, hence the advice to pass one."""
    if tokenizer is not None:
        return Path(tokenizer)
    where = Path(src)
    base = where if where.is_dir() else where.parent
    for cand in (base, base / "tokenizer"):
        if (cand / "tokenizer.json").exists():
            return cand
    raise KilnError(f"{where}: no tokenizer.json beside the checkpoint (nor in tokenizer/): pass --tokenizer DIR")


def tokenizer_size(directory: Path) -> int:
    """Ids the tokenizer uses (llama.cpp needs an embedding row for each: missing rows are zero-padded)."""
    try:
        data = json.loads((Path(directory) / "tokenizer.json").read_text(encoding="utf-8"))
        ids = [*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0  # read_tokenizer reports what is wrong with it
    return max(ids) + 1 if ids else 0


def read_tokenizer_for(tok_dir: Path, vocab: int) -> TokenizerSpec:
    """The tokenizer with one entry per row of the larger of model and tokenizer. Model rows past the
    tokenizer's ids (nanoGPT pads 50257 to 50304) become ``[PAD{id}]`` tokens of type UNUSED, as
    llama.cpp's converter writes them; tokenizer ids past the model's rows get zero embedding rows
    from the GGUF writer."""
    return read_tokenizer(tok_dir, max(vocab, tokenizer_size(tok_dir)))


# --- shared checks ---------------------------------------------------------------------------------


def _positive_int(value: Any, key: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KilnError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def _check_shape(state: dict[str, np.ndarray], name: str, shape: tuple[int, ...], where: Path, why: str,
                 shown: str | None = None) -> None:
    label = shown or name
    if name not in state:
        raise KilnError(f"{where}: tensor {label} is missing")
    actual = tuple(state[name].shape)
    if actual != shape:
        raise KilnError(f"{where}: tensor {label} has shape {list(actual)}, expected {list(shape)} ({why})")


# --- Hugging Face GPT2LMHeadModel ------------------------------------------------------------------


def _hf_name(name: str) -> str:
    """openai-community/gpt2 stores bare ``h.0.*``/``wte.weight``; save_pretrained writes ``transformer.*``."""
    return name if name.startswith("transformer.") or name == LM_HEAD else f"transformer.{name}"


def read_hf_gpt2(directory: str | Path, tokenizer: str | Path | None = None,
                 allow_pickle: bool = False) -> Gpt2Checkpoint:
    """Read an HF ``GPT2LMHeadModel`` checkpoint directory (safetensors, one file or sharded; with
    `allow_pickle`, ``pytorch_model.bin`` through torch's weights_only loader) into the common form.

    Every tensor's shape is checked against config.json; unknown tensors are refused rather than
    dropped (they would be a model this reader does not understand). The head is tied when the
    config ties it (transformers then ignores any stored lm_head) or when lm_head equals wte.
    """
    where = Path(directory)
    if not where.is_dir():
        raise KilnError(f"{where}: expected a GPT-2 checkpoint directory" if where.exists()
                        else f"{where}: no such file or directory")
    config_path = where / "config.json"
    if not config_path.is_file():
        raise KilnError(f"{where}: config.json is missing (expected a Hugging Face checkpoint directory)")
    cfg = read_json_object(config_path)
    if HF_ARCHITECTURE not in (cfg.get("architectures") or []):
        raise KilnError(f"{config_path}: architectures is {cfg.get('architectures')!r}, not [{HF_ARCHITECTURE!r}]")
    # llama.cpp's gpt2 graph scales scores by 1/sqrt(head_dim) only; reorder_and_upcast_attn changes
    # nothing but the precision of a mixed-precision run (same scale, computed in float32), so it is read.
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise KilnError(f"{config_path}: scale_attn_by_inverse_layer_idx is true (scores also divided by the layer "
                        "index + 1), which llama.cpp's gpt2 graph cannot express")
    if cfg.get("scale_attn_weights", True) is False:
        raise KilnError(f"{config_path}: scale_attn_weights is false (unscaled attention scores), which llama.cpp's "
                        "gpt2 graph cannot express")
    if cfg.get("add_cross_attention"):
        raise KilnError(f"{config_path}: add_cross_attention is true (an encoder-decoder GPT-2), not a causal LM")
    hidden = _positive_int(cfg.get("n_embd", 768), "n_embd", config_path)
    layers = _positive_int(cfg.get("n_layer", 12), "n_layer", config_path)
    heads = _positive_int(cfg.get("n_head", 12), "n_head", config_path)
    vocab = _positive_int(cfg.get("vocab_size", 50257), "vocab_size", config_path)
    positions = _positive_int(cfg.get("n_positions", cfg.get("n_ctx", 1024)), "n_positions", config_path)
    inner = cfg.get("n_inner")
    inner = 4 * hidden if inner is None else _positive_int(inner, "n_inner", config_path)
    if hidden % heads:
        raise KilnError(f"{config_path}: n_head {heads} does not divide n_embd {hidden}")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise KilnError(f"{config_path}: 'layer_norm_epsilon' must be a positive number, got {eps!r}")
    activation = cfg.get("activation_function", "gelu_new")
    if not isinstance(activation, str):
        raise KilnError(f"{config_path}: 'activation_function' must be a string, got {activation!r}")

    kind, files = find_weight_files(where, allow_pickle)
    source = open_safetensors(files) if kind == "safetensors" else open_pickle(files)
    state: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for stored in source.names():
        if stored.endswith(_HF_BUFFERS):  # ".attn.bias" is not ".attn.c_attn.bias": the dot decides
            continue
        name = _hf_name(stored)
        if name in state:
            raise KilnError(f"{where}: tensor {stored} and {origin[name]} are the same weight")
        state[name] = source.load(stored)
        origin[name] = stored

    bare = not any(n.startswith("transformer.") for n in origin.values())

    def shown(name: str) -> str:
        """The name as the file spells it (bare ``h.0.*`` in openai-community/gpt2)."""
        return origin.get(name) or (name.removeprefix("transformer.") if bare else name)

    why = f"config.json: n_embd {hidden}, n_inner {inner}, vocab_size {vocab}, n_positions {positions}"
    _check_shape(state, WTE, (vocab, hidden), where, why, shown(WTE))
    _check_shape(state, WPE, (positions, hidden), where, why, shown(WPE))
    for name in LN_F:
        _check_shape(state, name, (hidden,), where, why, shown(name))
    for i in range(layers):
        for suffix, shape in LAYER_SHAPES.items():
            name = f"transformer.h.{i}.{suffix}"
            _check_shape(state, name, shape(hidden, inner), where, why, shown(name))
    tie_cfg = cfg.get("tie_word_embeddings", True)
    if LM_HEAD in state:
        _check_shape(state, LM_HEAD, (vocab, hidden), where, why)
        if tie_cfg or np.array_equal(state[LM_HEAD], state[WTE]):
            del state[LM_HEAD]  # transformers ties it to wte; the GGUF then needs no output.weight
    elif not tie_cfg:
        raise KilnError(f"{where}: tensor {LM_HEAD} is missing (config.json sets tie_word_embeddings false)")
    expected = {WTE, WPE, *LN_F, LM_HEAD}
    expected |= {f"transformer.h.{i}.{s}" for i in range(layers) for s in LAYER_SHAPES}
    extra = sorted(set(state) - expected)
    if extra:
        m = _HF_LAYER_RE.match(extra[0])
        past = m is not None and int(m.group(1)) >= layers
        what = f"config.json's n_layer is {layers}" if past else "not part of GPT2LMHeadModel"
        raise KilnError(f"{where}: unexpected tensor {shown(extra[0])} ({what})")

    tok_dir = tokenizer_dir_for(where, tokenizer)
    tok = read_tokenizer_for(tok_dir, vocab)
    config = gpt2_config(vocab=vocab, positions=positions, hidden=hidden, layers=layers, heads=heads, inner=inner,
                         activation=activation, eps=float(eps), tied=LM_HEAD not in state,
                         bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))
    return Gpt2Checkpoint(
        config=config, state=state, source=where, tokenizer_dir=tok_dir, tokenizer=tok,
        name=cfg.get("_name_or_path") or where.name, architecture=HF_ARCHITECTURE, layout="hf",
        options={"tokenizer": str(tok_dir)})


# --- nanoGPT ---------------------------------------------------------------------------------------


def _pickle_strings(stream: BinaryIO, limit: int) -> set[str]:
    """String constants of one pickle, decoded opcode by opcode (pickletools.genops: nothing is
    executed or imported, unlike unpickling)."""
    out: set[str] = set()
    for count, (op, arg, pos) in enumerate(pickletools.genops(stream)):
        if isinstance(arg, str) and op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            out.add(arg)
        if (pos is not None and pos > limit) or count > 10_000_000:
            break
    return out


def _checkpoint_strings(path: Path) -> set[str]:
    """String constants of torch.save's main pickle: ``data.pkl`` of the zip format, or the fourth
    pickle of the legacy format (magic number, protocol, sys info, then the object)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not names or z.getinfo(names[0]).file_size > _PICKLE_SCAN_LIMIT:
                return set()
            with z.open(names[0]) as f:
                return _pickle_strings(f, _PICKLE_SCAN_LIMIT)
    with open(path, "rb") as f:
        for _ in range(3):
            _pickle_strings(f, 1 << 16)
        return _pickle_strings(f, _PICKLE_SCAN_LIMIT)


def _nanogpt_file(path: Path) -> Path:
    return path / NANOGPT_FILE if path.is_dir() else path


def is_nanogpt(path: str | Path) -> bool:
    """Whether `path` is a nanoGPT training checkpoint: a .pt/.pth/.ckpt file (or a directory holding
    ``ckpt.pt``) whose pickle holds the keys ``model`` and ``model_args``. Decided from the pickle's
    opcodes alone, so nothing from the file runs even without --allow-pickle."""
    where = _nanogpt_file(Path(path))
    if not where.is_file() or where.suffix not in NANOGPT_SUFFIXES:
        return False
    try:
        strings = _checkpoint_strings(where)
    except Exception:  # any damage or foreign format: not ours to claim (a reader reports it properly)
        return False
    return {"model", "model_args"} <= strings


def _refuse_pickle(path: Path) -> KilnError:
    return KilnError(f"{path}: a pickle file; pickle can run code, pass --allow-pickle to load it "
                     "with torch's weights_only loader")


def _nanogpt_state(model: Any, where: Path) -> tuple[dict[str, np.ndarray], bool]:
    """The state dict as float32 numpy under nanoGPT's own names (``_orig_mod.`` stripped)."""
    import torch

    if not isinstance(model, dict):
        raise KilnError(f"{where}: 'model' is not a state dict ({type(model).__name__})")
    compiled = any(isinstance(k, str) and k.startswith(COMPILED_PREFIX) for k in model)
    state: dict[str, np.ndarray] = {}
    for key, value in model.items():
        if not isinstance(key, str):
            raise KilnError(f"{where}: 'model' has a non-string key {key!r}")
        name = key.removeprefix(COMPILED_PREFIX)
        if not isinstance(value, torch.Tensor):
            raise KilnError(f"{where}: 'model' entry {key} is not a tensor ({type(value).__name__})")
        if name in state:
            raise KilnError(f"{where}: tensor {name} appears both with and without the {COMPILED_PREFIX} prefix")
        state[name] = value.detach().float().numpy()
    return state, compiled


def _model_args(obj: dict[str, Any], where: Path) -> dict[str, Any]:
    args = obj.get("model_args")
    if not isinstance(args, dict):
        raise KilnError(f"{where}: not a nanoGPT checkpoint ('model_args' is "
                        f"{'missing' if args is None else type(args).__name__}; nanoGPT's train.py saves it)")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if key not in args:
            raise KilnError(f"{where}: model_args lacks {key!r}")
        _positive_int(args[key], f"model_args.{key}", where)
    if "bias" in args and not isinstance(args["bias"], bool):
        raise KilnError(f"{where}: model_args.bias must be true or false, got {args['bias']!r}")
    if args["n_embd"] % args["n_head"]:
        raise KilnError(f"{where}: model_args.n_head {args['n_head']} does not divide n_embd {args['n_embd']}")
    return args


def read_nanogpt(path: str | Path, tokenizer: str | Path | None = None, allow_pickle: bool = False) -> Gpt2Checkpoint:
    """Read a nanoGPT (karpathy/nanoGPT) ``ckpt.pt`` (or its out_dir) into the common form.

    nanoGPT is GPT-2 with nn.Linear (weights [out, in], transposed here to Conv1D's [in, out]),
    optional biases (``bias=False``: none in Linear or LayerNorm; zeros here, exact), exact-erf GELU
    (``activation_function="gelu"``), eps 1e-5, a 4 x n_embd MLP, and ``lm_head`` sharing wte's storage.
    Only with `allow_pickle`, and then only through torch's weights_only loader. nanoGPT ships no
    tokenizer: one comes from `tokenizer`, or a tokenizer.json beside the file or in ``tokenizer/``.
    """
    where = _nanogpt_file(Path(path))
    if not where.exists():
        raise KilnError(f"{where}: no such file or directory")
    if not allow_pickle:
        raise _refuse_pickle(where)
    try:
        import torch  # noqa: F401 - only to say what is missing
    except ImportError:
        raise KilnError(f"{where}: reading nanoGPT checkpoints needs torch (pip install 'kiln-llm[torch]')") from None
    obj = torch_load_weights(where)
    if not isinstance(obj, dict):
        raise KilnError(f"{where}: expected nanoGPT's checkpoint dict, found {type(obj).__name__}")
    args = _model_args(obj, where)
    if "model" not in obj:
        raise KilnError(f"{where}: not a nanoGPT checkpoint (no 'model' state dict)")
    native, compiled = _nanogpt_state(obj["model"], where)
    d, n_layers, vocab, block = args["n_embd"], args["n_layer"], args["vocab_size"], args["block_size"]
    ffn = 4 * d  # nanoGPT's MLP: nn.Linear(n_embd, 4 * n_embd)
    bias = args.get("bias", "transformer.ln_f.bias" in native)
    why = f"model_args: n_embd {d}, vocab_size {vocab}, block_size {block}"

    # the causal-mask buffer nanoGPT registers when flash attention is unavailable: not a weight
    for i in range(n_layers):
        mask = native.pop(f"transformer.h.{i}.attn.bias", None)
        if mask is not None and mask.shape != (1, 1, block, block):
            raise KilnError(f"{where}: tensor transformer.h.{i}.attn.bias has shape {list(mask.shape)}, expected "
                            f"the causal mask [1, 1, {block}, {block}]")
    _check_shape(native, WTE, (vocab, d), where, why)
    _check_shape(native, WPE, (block, d), where, why)
    state: dict[str, np.ndarray] = {WTE: native[WTE], WPE: native[WPE]}
    used = {WTE, WPE, LM_HEAD, *LN_F[:1 + bias]}  # the native tensors read (LM_HEAD: checked below)
    for i in range(n_layers):
        for suffix, (shape, transpose) in _NANOGPT_LAYER.items():
            name = f"transformer.h.{i}.{suffix}"
            if suffix.endswith(".bias") and not bias:
                state[name] = np.zeros(shape(d, ffn), np.float32)
                continue
            _check_shape(native, name, shape(d, ffn), where, why)
            state[name] = np.ascontiguousarray(native[name].T) if transpose else native[name]
            used.add(name)
    _check_shape(native, LN_F[0], (d,), where, why)
    state[LN_F[0]] = native[LN_F[0]]
    if bias:
        _check_shape(native, LN_F[1], (d,), where, why)
        state[LN_F[1]] = native[LN_F[1]]
    else:
        state[LN_F[1]] = np.zeros((d,), np.float32)
    if LM_HEAD in native:
        _check_shape(native, LM_HEAD, (vocab, d), where, why)
        if not np.array_equal(native[LM_HEAD], native[WTE]):  # a nanoGPT variant that unties the head
            state[LM_HEAD] = native[LM_HEAD]
    extra = sorted(set(native) - used)
    if extra:
        what = "a bias although model_args.bias is false" if not bias and extra[0].endswith(".bias") else \
            "not part of nanoGPT's model"
        raise KilnError(f"{where}: unexpected tensor {extra[0]} ({what})")

    tok_dir = tokenizer_dir_for(where, tokenizer)
    tok = read_tokenizer_for(tok_dir, vocab)
    config = gpt2_config(vocab=vocab, positions=block, hidden=d, layers=n_layers, heads=args["n_head"], inner=ffn,
                         activation="gelu", eps=NANOGPT_EPS, tied=LM_HEAD not in state,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    plain = {k: v for k, v in args.items() if isinstance(v, (bool, int, float, str)) or v is None}
    iter_num = obj.get("iter_num")
    return Gpt2Checkpoint(
        config=config, state=state, source=where, tokenizer_dir=tok_dir, tokenizer=tok,
        # ckpt.pt is always called that: the out_dir names the run
        name=where.parent.name if where.stem == "ckpt" else where.stem,
        architecture="nanogpt", layout="nanogpt-compiled" if compiled else "nanogpt",
        record={"nanogpt": {"model_args": plain, "compiled": compiled,
                            "iter_num": iter_num if isinstance(iter_num, int) else None}},
        options={"tokenizer": str(tok_dir)})
