"""How close an artifact must be to its source, and why.

Figures were measured on SmolLM2-135M and the tiny fixtures with llama.cpp in the
verification configuration (flash attention off, f32 KV cache: both would otherwise
round activations to f16 and blur what the *artifact* contributes):

* f32: 1e-5 of the logits' std at position 0 (float32 noise: transformers itself
  differs from a float64 run by 9e-6), growing with position, because llama.cpp forms
  rope angles in float32 by repeated multiplication (relative angle error up to about
  (head_dim/2) * 2^-24, i.e. ~2e-6 rad per unit of position) where transformers uses one
  multiply. Measured: SmolLM2 2.6e-4 at position 8173 (3e-8 per position), tiny-qwen2
  with yarn x4 9.0e-4 at position 2040 (4.4e-7 per position: random weights with a large
  init amplify attention-angle errors; tiny-llama yarn x4 1.3e-3 at 2040 is the worst,
  1.65x under the bound). Bound: 1e-4 + 1e-6 * position.
* f16 / bf16: the floor is what rounding the weights alone does (measured per model at
  verification time by running the reference with rounded weights). llama.cpp also
  rounds the activations to the weight type inside each matmul, an error of the same
  unit roundoff on the other operand, so about twice the floor is expected; measured
  up to 2.8x. Bound: 4x the floor plus the f32 bound.
* quantized types, faithfulness: the reference is re-run with the GGUF's own weights
  dequantized (gguf-py), which isolates what quantizing the weights costs. llama.cpp
  additionally quantizes activations to 8 bits inside quantized matmuls, so its KL to the
  reference is larger: on SmolLM2 q8_0 0.0055 against 0.0016 from the weights alone (the
  activations add ~0.004), q4_k_m 0.060 against 0.054. Bound: 2x the dequantized-weights
  KL + 0.005 (a wrong tensor layout or scale gives KL of order 1 and fails).
* quantized types, quality: mean KL(reference ‖ artifact) over the parity text. Anchors are set
  from llama.cpp's published KL tables (reference/ecosystem.md §5.3: Llama-3-8B q8_0
  0.0014, q6_K 0.0055, q5_K_M 0.011, q4_K_M 0.031, q4_0 0.072) scaled by 4 for a 135M
  model (small models are several times more sensitive: DESIGN.md §4 measured 0.0044
  for q8_0 and 0.059 for q4_k_m on SmolLM2, 3.2x and 1.9x the 8B figures) and rounded up.
  Types without a published anchor are reported only. The anchors describe real models;
  random-weight fixtures are not held to them.
"""

from __future__ import annotations

F32_BASE = 1e-4
F32_PER_POSITION = 1e-6
FLOAT_FLOOR_MULTIPLE = 4.0

KL_BOUNDS: dict[str, float] = {
    "q8_0": 0.01,
    "q6_k": 0.025,
    "q5_k_m": 0.05,
    "q5_k_s": 0.06,
    "q4_k_m": 0.13,
    "q4_k_s": 0.18,
    "q4_1": 0.4,
    "q4_0": 0.4,
}


QUANT_FLOOR_MULTIPLE = 2.0
QUANT_FLOOR_SLACK = 0.005


def quantized_bound(weights_kl: float) -> float:
    return QUANT_FLOOR_MULTIPLE * weights_kl + QUANT_FLOOR_SLACK


def quantized_verdict(text_kl: float, weights_kl: float, weights: str = "its dequantized weights"
                      ) -> tuple[bool, float, str]:
    """(passed, bound, criterion) of the quantized faithfulness check, worded the same for every format."""
    bound = quantized_bound(weights_kl)
    return text_kl <= bound, bound, (f"mean KL {text_kl:.4f} <= {bound:.4f} "
                                     f"({QUANT_FLOOR_MULTIPLE:g}x the KL of {weights}, {weights_kl:.4f})")


def f32_bound(max_position: int) -> float:
    return F32_BASE + F32_PER_POSITION * max_position


def float_bound(floor_rel: float, max_position: int) -> float:
    return FLOAT_FLOOR_MULTIPLE * floor_rel + f32_bound(max_position)


# ONNX MatMulNBits at the default block size 32 (set from the ONNX measurements of
# docstring): int8 blocks are finer than llama.cpp's q8_0 only in the scale type, so the
# q8_0 anchor applies; symmetric int4 blocks of 32 are q4_0's grid, so q4_0's anchor applies.
ONNX_KL_BOUNDS: dict[str, float] = {
    "int8": KL_BOUNDS["q8_0"],
    "int4": KL_BOUNDS["q4_0"],
}

# Published anchors by artifact format (Format.name), for the quality line of every verification.
KL_ANCHORS: dict[str, dict[str, float]] = {"gguf": KL_BOUNDS, "onnx": ONNX_KL_BOUNDS}
