"""Refactoring never changes an artifact: every fixture's exports, pinned by sha256.

The exports of every fixture (kiln's fixtures and the native and Llama-style Arbor ones) as
f32 / q8_0 / q4_k_m GGUF and fp32 / int4 ONNX (GPT-2 shaped ones: fp32 only, kiln's own GPT-2 graph; the
mixture-of-experts families: none, onnxruntime-genai's builder has no graph for them) must
hash to the values in tests/artifact_pins.json, written by this test's own code. Exports are
deterministic (same input and options, same bytes, wherever they are written), so a change of any
pin is a change of the artifacts: deliberate ones (a new GGUF key, a fixed graph) update the file
with `KILN_UPDATE_PINS=1 pytest tests/test_artifact_pins.py` and say so in the commit; everything
else is a regression. Manifests are left out (they record absolute source paths); verification is
off (tests elsewhere verify every export).

A few files hold values torch computes with its float32 exp/pow/sin/cos (the ONNX builder's rotary
caches, Qwen3.5's -exp(A_log)), whose last bits follow the CPU's math library: the exports run pinned to
one code path of it (see `exported`), and a failure names a fingerprint of the host's float32 math
(`math_fingerprint`), so a host that computes other bits even so says it is the math, not kiln.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime_genai")

from kiln import families  # noqa: E402
from kiln.fixtures import FIXTURE_NAMES, build  # noqa: E402
from kiln.fixtures.arbor import build_arbor_fixtures  # noqa: E402
from kiln.pinned_math import PINNED_MATH_ENV  # noqa: E402
from kiln.pipeline import export_gguf_artifact, export_onnx_artifact  # noqa: E402

PINS = Path(__file__).with_name("artifact_pins.json")
GGUF_TYPES = ("f32", "q8_0", "q4_k_m")
ONNX_PRECISIONS = ("fp32", "int4")


def _onnx_precisions(family) -> tuple[str, ...]:
    """The pinned ONNX precisions a family exports: those it declares (kiln's own GPT-2 graph: fp32 only),
    every one through onnxruntime-genai's builder, none where neither writes its graph (the MoE families)."""
    if family is None:
        return ONNX_PRECISIONS
    if family.onnx_precisions is not None:
        return tuple(p for p in ONNX_PRECISIONS if p in family.onnx_precisions)
    return ONNX_PRECISIONS


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, str]:
    """The exports run in a child process under `kiln.pinned_math.PINNED_MATH_ENV` (MKL's SSE2 code path),
    where Intel and AMD hosts compute the same float32 bits, so one set of pins holds on both. MKL reads it
    when it loads, hence the child process."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("pins")
    proc = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True,
                          env={**os.environ, **PINNED_MATH_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def math_fingerprint() -> str:
    """A hash of torch's float32 exp/pow/sin/cos over fixed inputs (large tensors and small ones, whose
    tails take other code paths): two hosts with the same fingerprint compute the pinned files alike."""
    import torch

    from kiln.families.qwen3_5 import _exp32  # -exp(A_log)'s exp, as the export computes it

    x = torch.linspace(-20.0, 20.0, 1 << 16, dtype=torch.float32)
    pos = torch.arange(4096, dtype=torch.float32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    angles = torch.outer(pos, inv)
    h = hashlib.sha256()
    for t in (torch.exp(x), torch.exp(x[:7]), torch.pow(x.abs() + 1, 0.37), inv, torch.cos(angles),
              torch.sin(angles), torch.cos(angles[:3, :5]), torch.sin(angles[:3, :5])):
        h.update(t.numpy().tobytes())
    for n in (4, 16, 37):  # A_log-like values, the sizes of small checkpoints' head counts
        h.update(_exp32(np.linspace(-1.0, 3.0, n, dtype=np.float32)).tobytes())
    return h.hexdigest()[:16]


def _export_all(root: Path) -> dict[str, str]:
    sources = {name: (build(name, progress=False), {}) for name in FIXTURE_NAMES if name != "tiny-nanogpt"}
    sources["tiny-nanogpt"] = (build("tiny-nanogpt", progress=False) / "ckpt.pt", {"allow_pickle": True})
    arbor = build_arbor_fixtures(root / "arbor")
    sources["arbor-native"] = (arbor["B"], {"allow_pickle": True})
    sources["arbor-llama-style"] = (arbor["E"], {})
    hashes: dict[str, str] = {}
    for name, (src, kwargs) in sources.items():
        for quant in GGUF_TYPES:
            out = root / f"{name}.{quant}.gguf"
            export_gguf_artifact(src, out, quant, verify=False, **kwargs)
            hashes[out.name] = _sha(out)
        for precision in _onnx_precisions(families.for_source(src)):
            out = root / f"{name}-{precision}"
            export_onnx_artifact(src, out, precision, verify=False, **kwargs)
            for f in sorted(out.iterdir()):
                if f.name != "manifest.json":
                    hashes[f"{out.name}/{f.name}"] = _sha(f)
    return hashes


def test_every_fixture_export_is_byte_identical_to_its_pin(exported: dict) -> None:
    fingerprint, hashes = exported["math"], exported["hashes"]
    if os.environ.get("KILN_UPDATE_PINS") == "1":
        PINS.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    pinned = json.loads(PINS.read_text())
    changed = sorted(k for k in set(pinned) | set(hashes) if pinned.get(k) != hashes.get(k))
    assert not changed, f"artifacts changed (this host's float32 math: {fingerprint}): {changed}"


if __name__ == "__main__":  # the child process of the `exported` fixture
    import sys

    print(json.dumps({"math": math_fingerprint(), "hashes": _export_all(Path(sys.argv[1]))}))
