"""GPTQ linears written as GGUF blocks directly, so llama.cpp runs the calibrated weights bit for bit.

A GGUF Q4_0/Q4_1/Q8_0 block covers 32 consecutive input columns of one row with a float16
scale (and Q4_1 a float16 minimum). A GPTQ linear with group size 32, contiguous groups and
the right zero points is the same thing in another packing:

* 4-bit, zero point 8 everywhere            -> Q4_0 (d = scale, codes as stored);
* 4-bit, any zero points                    -> Q4_1 (d = scale, m = −zero·scale; exact only
  when that product is a float16, which kiln's own q4_1 grid guarantees);
* 8-bit, zero point 128 everywhere          -> Q8_0 (d = scale, int8 = code − 128).

Anything else (other group sizes, act-order g_idx permutations, 2-bit) has no exact GGUF
form and is reported with the reason, so the exporter can fall back to dequantize and
requantize and say what is lost.

Where the GGUF stores a tensor with its rows or input columns reordered (a family's row transform,
llama's q/k row interleave, Qwen3.5's value heads tiled in ssm_out's columns) or stacks experts
(`TensorRow.experts`), the linear is first moved into the GGUF's layout as codes and groups
(`gguf_moves`, `GPTQLinear.reordered`), and only then packed: a permutation applied to packed
bytes would scramble the blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q

from kiln.checkpoint.gptq import GPTQLinear

BLOCK = 32


def block_groups(layer: GPTQLinear) -> np.ndarray | None:
    """The GPTQ group of every GGUF block of 32 columns, or None where a block's columns are in several groups
    (act-order g_idx without static groups)."""
    n_in = layer.g_idx.size
    if n_in % BLOCK:
        return None
    g = layer.g_idx.reshape(n_in // BLOCK, BLOCK)
    return g[:, 0].copy() if np.all(g == g[:, :1]) else None


def gguf_type_for(layer: GPTQLinear, group_size: int) -> tuple[Q | None, str]:
    """The GGUF type that holds this linear (in the GGUF's layout: `GPTQLinear.reordered`) exactly, or
    (None, why not)."""
    n_out, n_in = layer.q.shape
    if group_size != BLOCK:
        return None, f"group size {group_size} is not GGUF's block of {BLOCK}"
    if n_in % BLOCK:
        return None, f"{n_in} input columns are not a multiple of {BLOCK}"
    if block_groups(layer) is None:
        return None, "act-order g_idx scatters the groups' columns (GGUF blocks are contiguous)"
    if layer.bits == 4:
        if np.all(layer.zeros == 8):
            return Q.Q4_0, ""
        return Q.Q4_1, ""
    if layer.bits == 8:
        if np.all(layer.zeros == 128):
            return Q.Q8_0, ""
        return None, "8-bit with zero points other than 128 has no GGUF block (Q8_0 is symmetric)"
    return None, f"{layer.bits}-bit GPTQ has no GGUF block type"


def gguf_moves(to_gguf: Callable[[np.ndarray], np.ndarray],
               shape: tuple[int, ...]) -> list[np.ndarray | None] | None:
    """Per axis of a tensor of `shape`, the checkpoint index each GGUF index holds (None: unmoved), found by
    sending indices through the family's `to_gguf`; None where it does anything but move whole slices along
    each axis (a value transform, an axis mixed with another)."""
    probe = np.broadcast_to(np.zeros((), np.int32), shape)  # no memory: an untransformed row returns it as is
    if to_gguf(probe) is probe:
        return [None] * len(shape)
    moves: list[np.ndarray | None] = []
    for axis, n in enumerate(shape):
        along = [-1 if a == axis else 1 for a in range(len(shape))]
        idx = np.broadcast_to(np.arange(n, dtype=np.int32).reshape(along), shape)
        moved = np.asarray(to_gguf(idx))
        if moved.shape != tuple(shape):
            return None
        order = moved[tuple(slice(None) if a == axis else 0 for a in range(len(shape)))].astype(np.int64)
        if not np.array_equal(moved, np.broadcast_to(order.reshape(along), shape)) \
                or not np.array_equal(np.sort(order), np.arange(n)):
            return None
        moves.append(None if np.array_equal(order, np.arange(n)) else order)
    return moves


def q4_1_min_error(layer: GPTQLinear) -> float:
    """Largest |Δw| from storing Q4_1's minimum −zero·scale as float16 (0 for kiln's q4_1 grid)."""
    s = layer.scales.astype(np.float32)
    m = -layer.zeros.astype(np.float32) * s
    return float(np.max(np.abs(m.astype(np.float16).astype(np.float32) - m), initial=0.0))


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[rows, blocks, 32] codes 0..15 -> [rows, blocks, 16] bytes, ggml's order (j | j+16 << 4)."""
    lo = codes[..., :16].astype(np.uint8)
    hi = codes[..., 16:].astype(np.uint8)
    return lo | (hi << 4)


def gguf_blocks(layer: GPTQLinear, qtype: Q) -> np.ndarray:
    """Raw GGUF bytes [out, n_blocks·block_bytes] of this linear as `qtype` (rows = output features)."""
    n_out, n_in = layer.q.shape
    nb = n_in // BLOCK
    groups = block_groups(layer)
    if groups is None:
        raise ValueError("a GGUF block's columns are in several GPTQ groups")
    codes = layer.q.reshape(n_out, nb, BLOCK)
    scales, zeros = layer.scales[groups].T, layer.zeros[groups].T  # [out, blocks]
    d = np.ascontiguousarray(scales).astype(np.float16).reshape(n_out, nb, 1).view(np.uint8)
    if qtype == Q.Q4_0:
        parts = [d, _nibbles(codes)]
    elif qtype == Q.Q4_1:
        m = (-zeros.astype(np.float32) * scales.astype(np.float32)).astype(np.float16)
        parts = [d, m.reshape(n_out, nb, 1).view(np.uint8), _nibbles(codes)]
    elif qtype == Q.Q8_0:
        parts = [d, (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    else:
        raise ValueError(f"no GPTQ packing for {qtype.name}")
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(n_out, -1))
