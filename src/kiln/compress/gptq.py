"""GPTQ (Frantar et al. 2022) in torch on the CPU, writing the auto-gptq/GPTQModel checkpoint format.

Own implementation because the maintained libraries cannot run here (DESIGN.md §2: auto-gptq
is abandoned and does not build against current torch; GPTQModel needs a newer torch and
targets GPUs). The algorithm is the paper's, as auto-gptq implements it:

* layer by layer on real calibration activations: the inputs of decoder layer i are the
  outputs of layers < i *already quantized*, so each layer corrects the error upstream;
* within a layer, "true sequential" groups (q/k/v, then o, then gate/up, then down), each
  seeing the outputs of the groups quantized before it;
* per linear, H = 2·XᵀX/n over the calibration tokens, dampened by `damp`·mean(diag H),
  inverted through Cholesky; columns quantized left to right (or by decreasing diag H with
  act-order), each column's rounding error spread over the columns not yet quantized via
  the upper Cholesky factor of H⁻¹, in lazy blocks of 128 columns.

Group scales (symmetric grids, `scale_search`, on by default): instead of the max-magnitude rule,
each group's scale is the candidate with the least rounding error weighted by diag(H) (the
input channels' mean squared activations), as llama.cpp's `make_qx_quants` does with an imatrix;
kiln.compress.gptq_grid.search_params. Measured on SmolLM2-135M, q4_0 grid, act-order, shipped
calibration text (bench/quality.py): mean KL 0.618 -> 0.431 against llama.cpp's RTN q4_0 at 0.829.

With act-order kiln uses static groups (GPTQModel's `static_groups`): group parameters come
from the original weights of contiguous column groups, so g_idx stays trivial and the result
still maps onto GGUF blocks. See kiln.compress.gptq_grid for the grids.

What a layer holds comes from its family (kiln.families.base): the groups per layer kind of a hybrid
decoder (Qwen3.5's Gated DeltaNet layers: q/k/v, z, b, a; then out_proj; then the MLP), and for a
mixture of experts each expert's linears ("mlp.experts.{e}.gate_proj"), whose Hessian sums only the
calibration tokens the (already upstream-quantized) router sends to that expert. An expert that
receives fewer tokens than a matrix's input width gets round-to-nearest for that matrix, with a
warning naming layer and expert: below that count H = XᵀX is singular, and GPTQ would fit those few
tokens exactly while moving its rounding error into input directions no calibration token
exercised (only the damping holds them). Where the GGUF reorders a linear's input columns
(`Family.gguf_column_order`: Qwen3.5's ssm_out), the groups are contiguous in the GGUF's order, the
order llama.cpp's blocks see; g_idx then records them in the checkpoint's column order.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln import families
from kiln.atomic import atomic_dir
from kiln.checkpoint import load_checkpoint
from kiln.checkpoint.gptq import GPTQConfig, GPTQLinear, pack_linear
from kiln.compress.gptq_grid import Grid, choose_grid, grid_params, quantize_values, search_params
from kiln.errors import KilnError

Progress = Callable[[str, int, int], None]



def _supported(capability: str) -> str:
    """The architectures whose family declares a calibration capability (for refusal messages)."""
    return "/".join(sorted(a for a, f in families.FAMILIES.items() if getattr(f, capability) is not None))

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                "tokenizer.model", "generation_config.json", "chat_template.jinja", "chat_template.json",
                "added_tokens.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "README.md")


@dataclass(frozen=True)
class GPTQOptions:
    bits: int = 4
    group_size: int = 32
    sym: bool = True
    act_order: bool = False
    damp: float = 0.01
    seq_len: int = 512
    samples: int = 128  # at most this many calibration chunks of seq_len tokens
    block_size: int = 128
    true_sequential: bool = True
    scale_search: bool = True  # importance-weighted choice of each group's scale (symmetric grids)

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise KilnError(f"--bits {self.bits}: GPTQ here writes 4 or 8 bits")
        if self.group_size not in (32, 64, 128):
            raise KilnError(f"--group-size {self.group_size}: choose 32, 64 or 128")
        if not 0 < self.damp < 1:
            raise KilnError(f"--damp {self.damp}: must be between 0 and 1")
        if self.seq_len < 16:
            raise KilnError(f"--seq-len {self.seq_len}: too short for calibration (at least 16 tokens)")


@dataclass
class GPTQReport:
    out: Path
    grid: str
    layers: int
    linears: int
    chunks: int
    tokens: int
    seconds: float
    mean_rel_error: float  # mean over linears of ||W−Q||_F / ||W||_F (weights only)
    output_error: float  # mean over layers of relative error of the quantized layer's output
    # Per linear kind (the family's group entry, e.g. "linear_attn.out_proj", "mlp.experts.{e}.down_proj"): mean over
    # its linears of the relative output error ||X(W−Q)ᵀ||_F / ||XWᵀ||_F on the calibration inputs X, for GPTQ
    # and for round-to-nearest on the same grid ({"gptq": .., "rtn": .., "linears": n}); RTN fallbacks left out.
    kind_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    rtn_fallbacks: int = 0  # expert matrices rounded to nearest: too few calibration tokens routed to them
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def gptq_linear(weight, hessian, grid: Grid, group_size: int, act_order: bool, damp: float,
                block_size: int = 128, scale_search: bool = False) -> tuple[GPTQLinear, Any]:
    """Quantize one weight [out, in] given H [in, in]; returns (codes and parameters, dequantized weight).

    Runs on one thread: the column loop is thousands of small ops, for which torch's thread pool
    costs more than it gives (measured on a busy 2-core machine: 0.75 s on one thread vs 5.8 s on two
    for a 576x1536 down_proj).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq_linear(weight, hessian, grid, group_size, act_order, damp, block_size, scale_search)
    finally:
        torch.set_num_threads(threads)


def _gptq_linear(weight, hessian, grid: Grid, group_size: int, act_order: bool, damp: float,
                 block_size: int, scale_search: bool = False) -> tuple[GPTQLinear, Any]:
    import torch

    W = weight.detach().clone().float()
    H = hessian.detach().clone().double()
    n_out, n_in = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = math.ceil(n_in / group_size)
    scales = torch.zeros(n_out, n_groups)
    zeros = torch.zeros(n_out, n_groups)
    static = act_order
    importance = torch.diag(H).float()  # mean squared input activation per column (before damping)

    def params(w, cols: slice):
        if scale_search:
            return search_params(w, grid, importance[cols])
        return grid_params(w, grid)

    if static:  # group parameters from the original weights of contiguous groups
        for g in range(n_groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            scales[:, g], zeros[:, g] = params(W[:, cols], cols)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n_in)
    W = W[:, perm]
    H = H[perm][:, perm]
    diag_mean = torch.mean(torch.diag(H))
    for attempt in range(6):
        try:
            Hd = H + torch.eye(n_in, dtype=H.dtype) * (damp * (10 ** attempt)) * diag_mean
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
            break
        except RuntimeError:  # not positive definite: dampen harder (GPTQModel's auto-increment)
            continue
    else:
        raise KilnError("GPTQ: the calibration Hessian is singular even with heavy damping")
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    group_of = (perm // group_size) if static else torch.arange(n_in) // group_size
    maxq = float(grid.maxq)
    scale = zero = inv = None
    current = -1
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not static and col % group_size == 0:  # parameters from the current (error-updated) group
                scales[:, g], zeros[:, g] = params(W1[:, i:i + group_size], slice(col, col + group_size))
            if g != current:  # the per-column hot loop below stays branch- and allocation-light
                scale, zero = scales[:, g].contiguous(), zeros[:, g].contiguous()
                inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)  # scale 0: code = zero
                current = g
            w = W1[:, i]
            q = torch.clamp_(torch.round_(w * inv).add_(zero), 0.0, maxq)
            deq = (q - zero).mul_(scale)
            C1[:, i] = q
            Q1[:, i] = deq
            err = (w - deq).div_(Hinv1[i, i])
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    Q = Q[:, inv]
    codes = codes[:, inv]
    g_idx = np.arange(n_in, dtype=np.int32) // group_size
    layer = GPTQLinear(q=codes.numpy().astype(np.uint8), scales=scales.T.numpy().astype(np.float16),
                       zeros=zeros.T.numpy().astype(np.int32), g_idx=g_idx, bits=grid.bits)
    return layer, Q


def calibration_chunks(tokens: list[int], seq_len: int, samples: int, bos_id: int | None) -> list[list[int]]:
    """Consecutive chunks of `seq_len` tokens, each starting with BOS where the model has one."""
    n = len(tokens) // seq_len
    if n == 0:
        raise KilnError(f"calibration text has {len(tokens)} tokens, fewer than one chunk of {seq_len}; "
                        "use a longer text or a smaller --seq-len")
    out = []
    for i in range(min(n, samples)):
        chunk = list(tokens[i * seq_len:(i + 1) * seq_len])
        if bos_id is not None:
            chunk[0] = bos_id
        out.append(chunk)
    return out


def _load_float_model(src: Path):
    from transformers import AutoTokenizer

    from kiln.checkpoint.hf_model import float_model

    claimed = families.for_source(src)
    if claimed is not None and claimed.gptq_groups is None:
        raise KilnError(f"{src}: {claimed.description}; GPTQ supports {_supported('gptq_groups')} layouts")
    ckpt = load_checkpoint(src)
    if ckpt.gptq is not None:
        raise KilnError(f"{src}: already a GPTQ checkpoint; quantize its float original instead")
    if families.of(ckpt.spec).gptq_groups is None:
        raise KilnError(f"{src}: GPTQ supports {_supported('gptq_groups')} layouts, not {ckpt.spec.hf_architecture}")
    model = float_model(src, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    return ckpt, model, tok


def rtn_linear(weight, grid: Grid, group_size: int) -> tuple[GPTQLinear, Any]:
    """Round-to-nearest on the same grid and groups (each group's parameters by the grid's own rule):
    the baseline GPTQ is measured against, and the fallback for an expert with too few tokens."""
    import torch

    W = weight.detach().float()
    n_out, n_in = W.shape
    n_groups = math.ceil(n_in / group_size)
    scales = torch.zeros(n_out, n_groups)
    zeros = torch.zeros(n_out, n_groups)
    codes = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    if n_in % group_size == 0:  # every group at once (rows of [out * groups, group_size]): the same numbers
        flat = W.reshape(n_out * n_groups, group_size)
        s, z = grid_params(flat, grid)
        c, q = quantize_values(flat, s, z, grid)
        scales, zeros = s.reshape(n_out, n_groups), z.reshape(n_out, n_groups)
        codes, Q = c.reshape(n_out, n_in), q.reshape(n_out, n_in)
    else:
        for g in range(n_groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            scales[:, g], zeros[:, g] = grid_params(W[:, cols], grid)
            codes[:, cols], Q[:, cols] = quantize_values(W[:, cols], scales[:, g], zeros[:, g], grid)
    layer = GPTQLinear(q=codes.numpy().astype(np.uint8), scales=scales.T.numpy().astype(np.float16),
                       zeros=zeros.T.numpy().astype(np.int32),
                       g_idx=np.arange(n_in, dtype=np.int32) // group_size, bits=grid.bits)
    return layer, Q


def _in_column_order(order, fn, weight, hessian=None) -> tuple[GPTQLinear, Any]:
    """Run `fn` (weight[, hessian]) -> (GPTQLinear, Q) with the input columns in `order` (groups contiguous in
    that order), and give the result back in the weight's own column order (g_idx then names each column's group)."""
    if order is None:
        return fn(weight) if hessian is None else fn(weight, hessian)
    import torch

    perm = torch.as_tensor(order)
    w = weight.detach()[:, perm]
    layer, Q = fn(w) if hessian is None else fn(w, hessian[perm][:, perm])
    inv = np.argsort(order)
    out = GPTQLinear(q=np.ascontiguousarray(layer.q[:, inv]), scales=layer.scales, zeros=layer.zeros,
                     g_idx=np.ascontiguousarray(layer.g_idx[inv]), bits=layer.bits)
    return out, Q[:, torch.as_tensor(inv)]


def _output_error(W, Q, H) -> float:
    """||X(W−Q)ᵀ||_F / ||XWᵀ||_F for H ∝ XᵀX (a report figure: float32 matrix products, sums in float64;
    float64 products cost GPTQ a fifth of its time for digits nobody reads)."""
    import torch

    W = W.detach().float()
    H = H.float()
    D = W - Q.float()
    num = float(torch.sum(((D @ H) * D).double()))
    den = float(torch.sum(((W @ H) * W).double()))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


BATCH = 8  # calibration chunks per layer call


class _Enough(Exception):
    """Raised from a hook once every input a pass needs is captured: the rest of the layer is skipped."""


@dataclass
class _Target:
    """One linear GPTQ quantizes: `weight` is the live [out, in] tensor (for a fused expert, a view into the fused
    parameter), `key` the accumulated input it reads (linears sharing an input share it)."""

    name: str  # under the layer, as the checkpoint names it ("mlp.experts.3.gate_proj")
    kind: str  # the family's group entry it comes from ("mlp.experts.{e}.gate_proj")
    key: str
    weight: Any
    expert: int | None = None


@dataclass
class _Hooks:
    """Where a group's inputs are read: plain modules (their input, as the model calls them) and fused experts
    modules (each expert's inputs, from the family's `expert_inputs`)."""

    modules: dict[str, str] = field(default_factory=dict)  # module name -> key
    fused: dict[str, set[str]] = field(default_factory=dict)  # experts module -> fused parameter names wanted


def _targets(layer, names: tuple[str, ...], family, spec) -> tuple[list[_Target], _Hooks]:
    """The linears of one group in one layer, experts expanded, and the hooks that read their inputs."""
    targets: list[_Target] = []
    hooks = _Hooks()
    for entry in names:
        if "{e}" not in entry:
            targets.append(_Target(entry, entry, entry, layer.get_submodule(entry).weight))
            hooks.modules[entry] = entry
            continue
        n = spec.n_experts
        try:  # one module per expert (their own linears: each called on its routed tokens only)
            layer.get_submodule(entry.format(e=0))
            per_expert = True
        except AttributeError:
            per_expert = False
        if per_expert:
            for e in range(n):
                name = entry.format(e=e)
                targets.append(_Target(name, entry, name, layer.get_submodule(name).weight, e))
                hooks.modules[name] = name
            continue
        fused = family.fused_expert(entry)
        if fused is None:
            raise KilnError(f"{spec.source}: the transformers model holds neither {entry.format(e=0)} nor a fused "
                            "experts tensor for it")
        suffix, part, parts = fused
        path, _, attr = suffix.rpartition(".")
        param = getattr(layer.get_submodule(path), attr)
        if param.shape[0] != n:
            raise KilnError(f"{spec.source}: {suffix} holds {param.shape[0]} experts, the config says {n}")
        rows = param.shape[1] // parts
        for e in range(n):
            targets.append(_Target(entry.format(e=e), entry, f"{path}.{attr}.{e}",
                                   param.data[e, part * rows:(part + 1) * rows], e))
        hooks.fused.setdefault(path, set()).add(attr)
    return targets, hooks


def _hessian_pass(layer, hooks: _Hooks, family, hidden: list, pe, pos, last: bool,
                  outputs: list | None = None) -> dict[str, tuple[Any, int]]:
    """Σ XᵀX and the token count for every input `hooks` names, over all calibration batches through `layer`.

    Modules sharing an input (q/k/v, gate/up) are accumulated once. Unless `last` (the pass must run the
    whole layer, e.g. to record `outputs`), the layer call stops once every hooked module has run, which
    skips the MLP when only attention inputs are wanted.
    """
    import torch

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    seen: dict[int, tuple[Any, str]] = {}  # id of an input this batch -> (that input, kept alive; its key)
    fired: set[str] = set()
    everything = set(hooks.modules) | set(hooks.fused)

    def add(key: str, a) -> None:
        flat = a.reshape(-1, a.shape[-1]).double()
        sums[key] = sums.get(key, 0) + flat.T @ flat
        counts[key] = counts.get(key, 0) + flat.shape[0]

    def done(name: str) -> None:
        fired.add(name)
        if not last and fired >= everything:
            raise _Enough

    def module_hook(name: str, key: str):
        def fn(_mod, inputs, _out):
            a = inputs[0]
            first = seen.get(id(a), (None, key))[1]
            if first != key:  # the same input as a module hooked before (q/k/v, gate/up)
                sums[key] = sums[first]
                counts[key] = counts[first]
            else:
                add(key, a)
                seen[id(a)] = (a, key)
            done(name)
        return fn

    def fused_hook(path: str, wanted: set[str]):
        def fn(mod, inputs, _out):
            x, index = inputs[0], inputs[1]
            for e, ins in family.expert_inputs(mod, x.reshape(-1, x.shape[-1]), index, wanted):
                for attr in wanted:
                    add(f"{path}.{attr}.{e}", ins[attr])
            done(path)
        return fn

    handles = [layer.get_submodule(n).register_forward_hook(module_hook(n, k)) for n, k in hooks.modules.items()]
    handles += [layer.get_submodule(p).register_forward_hook(fused_hook(p, w)) for p, w in hooks.fused.items()]
    try:
        for h in hidden:
            seen.clear()
            fired.clear()
            try:
                out = _layer_call(layer, h, pe, pos)
                if outputs is not None:
                    outputs.append(out)
            except _Enough:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {k: (sums[k], counts[k]) for k in sums}


def _layer_call(layer, hidden, pe, pos):
    out = layer(hidden, attention_mask=None, position_embeddings=pe, position_ids=pos,
                cache=None, use_cache=False)
    return out[0] if isinstance(out, tuple) else out


def _fallback_warning(layer: int, expert: int, tokens: int, matrices: list[tuple[str, int]]) -> str:
    names = "/".join(n.rsplit(".", 1)[-1] for n, _ in matrices)
    width = min(w for _, w in matrices)
    return (f"layer {layer}, expert {expert}: {tokens} calibration token{'s' * (tokens != 1)} routed to it, fewer "
            f"than the {width} input columns of its {names}; rounded to nearest instead of GPTQ (a longer "
            "calibration text routes more tokens to it)")


def quantize_model(src: str | Path, text: str, opts: GPTQOptions, threads: int | None = None,
                   progress: Progress | None = None) -> tuple[dict[str, GPTQLinear], GPTQReport, Any, Any]:
    """Run GPTQ over every decoder linear: (quantized linears by name, report, checkpoint, and the
    transformers model now holding the quantized weights, which the written checkpoint must reproduce)."""
    import time

    import torch

    opts.validate()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    src = Path(src)
    ckpt, model, tok = _load_float_model(src)
    spec = ckpt.spec
    family = families.of(spec)
    grid = choose_grid(opts.bits, opts.group_size, opts.sym)
    tok.model_max_length = 1 << 62  # the text is cut into chunks below; silence the length notice
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = spec.tokenizer.bos_id if spec.tokenizer and spec.tokenizer.add_bos else None
    chunks = calibration_chunks(ids, opts.seq_len, opts.samples, bos)
    inner = model.model
    inner = getattr(inner, "language_model", inner)  # a multimodal wrapper's text model
    results: dict[str, GPTQLinear] = {}
    rel_errors: list[float] = []
    out_errors: list[float] = []
    kind_errors: dict[str, list[tuple[float, float]]] = {}
    warnings: list[str] = []
    fallbacks = 0
    with torch.no_grad():
        x = torch.tensor(chunks)
        pos = torch.arange(opts.seq_len).unsqueeze(0)
        # batches of chunks: one layer call per batch keeps the matrix products large
        hidden = [inner.embed_tokens(x[i:i + BATCH]) for i in range(0, len(chunks), BATCH)]
        pe = inner.rotary_emb(hidden[0][:1], position_ids=pos)
        n_layers = len(inner.layers)
        for li, layer in enumerate(inner.layers):
            if progress:
                progress("gptq", li, n_layers)
            sequential = family.gptq_layer_groups(spec, li)  # each group sees the outputs of those before it
            groups = list(sequential) if opts.true_sequential else [tuple(n for g in sequential for n in g)]
            float_out: list[Any] = []
            under: dict[int, tuple[int, list[tuple[str, int]]]] = {}  # expert -> (tokens, matrices rounded)
            for gi, names in enumerate(groups):
                targets, hooks = _targets(layer, names, family, spec)
                sums = _hessian_pass(layer, hooks, family, hidden, pe, pos, last=gi == len(groups) - 1 or gi == 0,
                                     outputs=float_out if gi == 0 else None)
                for t in targets:
                    total, count = sums.get(t.key, (None, 0))
                    if total is None and t.expert is None:
                        raise KilnError(f"{src}: layer {li}: {t.name} was not called on the calibration tokens")
                    W = t.weight
                    base = family.checkpoint_name(f"model.layers.{li}.{t.name}.weight", spec)[: -len(".weight")]
                    order = family.gguf_column_order(f"model.layers.{li}.{t.name}.weight", spec)
                    if t.expert is not None and count < W.shape[1]:
                        q_layer, deq = _in_column_order(
                            order, lambda w: rtn_linear(w, grid, opts.group_size), W)
                        under.setdefault(t.expert, (count, []))[1].append((t.name, W.shape[1]))
                        fallbacks += 1
                    else:
                        H = 2.0 * total / max(count, 1)
                        q_layer, deq = _in_column_order(
                            order, lambda w, h: gptq_linear(w, h, grid, opts.group_size, opts.act_order, opts.damp,
                                                            opts.block_size, opts.scale_search), W, H)
                        _, rtn = _in_column_order(order, lambda w: rtn_linear(w, grid, opts.group_size), W)
                        kind_errors.setdefault(t.kind, []).append((_output_error(W, deq, H), _output_error(W, rtn, H)))
                    rel_errors.append(float(torch.linalg.norm(W - deq) / torch.linalg.norm(W)))
                    W.copy_(deq)
                    results[base] = q_layer
            warnings += [_fallback_warning(li, e, n, m) for e, (n, m) in sorted(under.items())]
            hidden = [_layer_call(layer, h, pe, pos) for h in hidden]
            num = sum(float(torch.linalg.norm(a - b)) for a, b in zip(hidden, float_out))
            den = sum(float(torch.linalg.norm(b)) for b in float_out)
            out_errors.append(num / max(den, 1e-30))
        if progress:
            progress("gptq", n_layers, n_layers)
    kinds = {k: {"gptq": float(np.mean([g for g, _ in v])), "rtn": float(np.mean([r for _, r in v])),
                 "linears": len(v)} for k, v in kind_errors.items()}
    report = GPTQReport(out=src, grid=grid.name, layers=len(inner.layers), linears=len(results), chunks=len(chunks),
                        tokens=len(chunks) * opts.seq_len, seconds=time.perf_counter() - t0,
                        mean_rel_error=float(np.mean(rel_errors)), output_error=float(np.mean(out_errors)),
                        kind_errors=kinds, rtn_fallbacks=fallbacks, warnings=warnings)
    return results, report, ckpt, model


def gptq_config(opts: GPTQOptions) -> GPTQConfig:
    grid = choose_grid(opts.bits, opts.group_size, opts.sym)
    # desc_act stays false even with act-order: static groups leave g_idx trivial, and loaders read
    # desc_act as "g_idx permutes the groups" (onnxruntime-genai then adds a g_idx input per MatMulNBits).
    return GPTQConfig(bits=opts.bits, group_size=opts.group_size, sym=opts.sym, desc_act=False,
                      static_groups=opts.act_order, damp_percent=opts.damp, true_sequential=opts.true_sequential,
                      grid=grid.gguf_type, act_order=opts.act_order,
                      scale_search=opts.scale_search and grid.symmetric)


def _packable(layer: GPTQLinear) -> GPTQLinear:
    """qzeros packs the outputs 32/bits to a word: a linear with fewer or ragged outputs (Qwen3.5's in_proj_a /
    in_proj_b have one row per value head, 4 in the tiny fixture) gets its last word padded with zero points,
    which a reader drops (it keeps the first `scales.shape[1]` outputs: kiln.checkpoint.gptq.unpack_linear).
    The published Qwen3.5 sizes (16 to 64 value heads) need no padding."""
    per = 32 // layer.bits
    n_out = layer.zeros.shape[1]
    if n_out % per == 0:
        return layer
    pad = np.zeros((layer.zeros.shape[0], per - n_out % per), dtype=layer.zeros.dtype)
    return GPTQLinear(q=layer.q, scales=layer.scales, zeros=np.concatenate([layer.zeros, pad], axis=1),
                      g_idx=layer.g_idx, bits=layer.bits)


def _fused_replaced(ckpt, linears: dict[str, GPTQLinear]) -> set[str]:
    """The checkpoint's fused experts tensors (mlp.experts.gate_up_proj ...) whose every per-expert part is a
    quantized linear: the GPTQ checkpoint holds those parts instead (GPTQModel's per-expert layout)."""
    spec = ckpt.spec
    family = families.of(spec)
    parts: dict[str, list[str]] = {}
    for hf, _, shape, row in family.tensors(spec):
        if row.experts and row.fused:
            fused = family.checkpoint_name(hf[: len(hf) - len(row.hf)] + row.fused[0], spec)
            parts.setdefault(fused, []).extend(
                family.checkpoint_name(hf.format(e=e), spec)[: -len(".weight")] for e in range(shape[0]))
    return {f for f, bases in parts.items() if f in ckpt.tensors and all(b in linears for b in bases)}


def write_gptq_checkpoint(ckpt, linears: dict[str, GPTQLinear], config: GPTQConfig, out: Path,
                          record: dict[str, Any] | None = None, force: bool = False) -> None:
    """A GPTQ checkpoint directory (atomically): packed linears, every other tensor in its source dtype,
    and kiln's manifest.json (`record` + the files), which marks the directory as kiln's to replace later;
    an existing `out` is replaced only if it is such a directory holding nothing else, or with `force`."""
    import torch
    from safetensors.torch import save_file

    from kiln.manifest import file_record, write_manifest_file
    from kiln.outputs import may_replace

    src = ckpt.spec.source
    raw = ckpt.tensors
    tensors: dict[str, torch.Tensor] = {}

    def put(base: str) -> None:
        for suffix, arr in pack_linear(_packable(linears[base])).items():
            tensors[f"{base}.{suffix}"] = torch.from_numpy(np.ascontiguousarray(arr))

    replaced = _fused_replaced(ckpt, linears)
    for name in raw.names():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base in linears:
            put(base)
            continue
        if name in replaced:  # fused experts: written one linear per expert, as GPTQ checkpoints hold them
            continue
        arr = raw.load_raw(name)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if raw.dtype(name) == "BF16":
            t = t.view(torch.bfloat16)
        tensors[name] = t
    for base in linears:
        if f"{base}.qweight" not in tensors:
            put(base)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["quantization_config"] = config.to_json()
    with atomic_dir(out, may_replace("gptq", force)) as tmp:
        # One metadata key: safetensors writes __metadata__ from a Rust HashMap, whose order changes
        # from process to process, so two keys made the same checkpoint differ byte for byte.
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        (tmp / "quantize_config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n", encoding="utf-8")
        for name in COPIED_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        files = [file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()]
        write_manifest_file(tmp / "manifest.json", {"kind": "gptq", **(record or {}), "files": files})


def quantize_gptq(src: str | Path, out: str | Path, text: str, opts: GPTQOptions, threads: int | None = None,
                  progress: Progress | None = None, force: bool = False) -> GPTQReport:
    """`kiln quantize gptq`: calibrate, quantize and write the checkpoint; nothing is left at `out` on failure,
    and a path holding anything kiln did not write is refused before calibration starts (unless `force`)."""
    import hashlib

    from kiln.outputs import check_output

    out = check_output(out, "gptq", force=force, sources=(src,))
    linears, report, ckpt, _ = quantize_model(src, text, opts, threads=threads, progress=progress)
    record = {"source": {"path": str(Path(src).resolve()), "sha256": ckpt.source_hash(),
                         "architecture": ckpt.spec.hf_architecture, "family": ckpt.spec.family},
              "options": {**opts.__dict__, "calibration_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}}
    if report.warnings:
        record["warnings"] = list(report.warnings)
    write_gptq_checkpoint(ckpt, linears, gptq_config(opts), out, record, force=force)
    report.out = out
    return report
