"""The environment under which kiln's exports are the same bytes on every x86 host.

A few exported values come from torch's float32 exp/pow/cos (the ONNX builder's rotary caches, Qwen3.5's
-exp(A_log)), which go through MKL's vector math, whose last bits follow the code path MKL dispatches to.
`MKL_CBWR=AVX2` is honoured on Intel processors only (an AMD EPYC host kept its own path and wrote other bits
for YaRN int4 exports and six pinned files); `COMPATIBLE`, MKL's SSE2 path, gives on an Intel Xeon exactly the
bits of that AMD host (the same float32 math fingerprint, 923b0794…, and the same bytes of a YaRN int4
export). MKL reads it when it loads, so it is set in the environment of a child process: the artifact pins
(tests/test_artifact_pins.py) and the long-range bench's committed cells (bench/longctx.py, keyed by the
artifacts' bytes) both rest on it. `kiln export` itself does not set it: process-wide it would put every
MKL routine (GPTQ's matrix work too) on the SSE2 path.
"""

PINNED_MATH_ENV: dict[str, str] = {"MKL_CBWR": "COMPATIBLE"}
