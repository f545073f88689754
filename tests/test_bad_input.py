"""Bad input never produces a traceback or a half-written artifact.

Every case runs the real `kiln` console script in a subprocess on a broken copy of a tiny
fixture and checks the contract: non-zero exit, exactly one stderr line starting with
"kiln: error:" that names the file/key/flag at fault, no "Traceback", and nothing (no
GGUF, no manifest, no `*.part` temp) left in the output directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

KILN = str(Path(sys.executable).parent / "kiln")
FIXTURES = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "fixtures"


# ----------------------------------------------------------------------------- helpers

def kiln(*args: str | os.PathLike[str], timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_COLOR="1")
    return subprocess.run([KILN, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, a single `kiln: error:` line containing every needle, no traceback."""
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both, both
    assert proc.returncode != 0, both
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.strip(), proc.stderr
    assert line.startswith("kiln: error:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def assert_no_artifacts(out_dir: Path) -> None:
    """The output directory holds nothing: no GGUF, no manifest, no `.part` temp file."""
    if out_dir.exists():
        left = sorted(p.name for p in out_dir.iterdir())
        assert left == [], f"left behind in {out_dir}: {left}"


def export_fails(src: Path, tmp_path: Path, *needles: str, extra: tuple[str, ...] = (),
                 quant: str = "f16") -> str:
    out_dir = tmp_path / "out"
    proc = kiln("export", "gguf", src, "-o", out_dir / "out.gguf", "--quant", quant, *extra)
    line = assert_one_line_error(proc, *needles)
    assert_no_artifacts(out_dir)
    return line


def copy_fixture(tiny_dir: Path, tmp_path: Path, name: str = "model") -> Path:
    dest = tmp_path / name
    shutil.copytree(tiny_dir, dest)
    return dest


def header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def qwen2(tiny_qwen2_dir: Path, tmp_path: Path) -> Path:
    return copy_fixture(tiny_qwen2_dir, tmp_path)


@pytest.fixture
def llama(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    return copy_fixture(tiny_llama_dir, tmp_path)


@pytest.fixture(scope="module")
def small_gguf(tiny_qwen2_dir: Path, tmp_path_factory) -> Path:
    """A real, complete GGUF written by `kiln export gguf` (unverified to stay fast)."""
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", out, "--quant", "f16", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    return out


# ----------------------------------------------------------------------------- weights

def test_truncated_safetensors_in_data(qwen2: Path, tmp_path: Path) -> None:
    st = qwen2 / "model.safetensors"
    size = st.stat().st_size
    data_start = 8 + header_len(st)
    with open(st, "r+b") as f:
        f.truncate(data_start + (size - data_start) // 2)
    export_fails(qwen2, tmp_path, "model.safetensors", "truncated")


@pytest.mark.parametrize("cut", ["inside-header", "inside-length"])
def test_truncated_safetensors_in_header(qwen2: Path, tmp_path: Path, cut: str) -> None:
    st = qwen2 / "model.safetensors"
    keep = 8 + header_len(st) // 2 if cut == "inside-header" else 5
    with open(st, "r+b") as f:
        f.truncate(keep)
    export_fails(qwen2, tmp_path, "model.safetensors", "safetensors")


def test_corrupt_safetensors_header_json(qwen2: Path, tmp_path: Path) -> None:
    st = qwen2 / "model.safetensors"
    with open(st, "r+b") as f:
        f.seek(8)
        f.write(b"#!garbage{")  # same length: offsets stay plausible, JSON does not
    export_fails(qwen2, tmp_path, "model.safetensors", "not valid JSON")


def test_safetensors_header_not_an_object(qwen2: Path, tmp_path: Path) -> None:
    st = qwen2 / "model.safetensors"
    n = header_len(st)
    with open(st, "r+b") as f:
        f.seek(8)
        f.write(b"[]" + b" " * (n - 2))  # valid JSON, wrong shape
    export_fails(qwen2, tmp_path, "model.safetensors", "header")


def _rewrite_header(st: Path, fn) -> None:
    n = header_len(st)
    raw = st.read_bytes()
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


ENTRY = "model.norm.weight"


@pytest.mark.parametrize("breakage", [
    pytest.param(lambda h: h[ENTRY].update(data_offsets=["0", "4"]), id="offsets-strings"),
    pytest.param(lambda h: h[ENTRY].update(data_offsets=[8, 4]), id="offsets-reversed"),
    pytest.param(lambda h: h[ENTRY].update(shape=[-256]), id="negative-shape"),
    pytest.param(lambda h: h[ENTRY].update(dtype=["F32"]), id="dtype-list"),
    pytest.param(lambda h: h[ENTRY].update(dtype="F8_E9M9"), id="dtype-unknown"),
    pytest.param(lambda h: h[ENTRY].pop("data_offsets"), id="no-offsets"),
    pytest.param(lambda h: h.update({ENTRY: 7}), id="entry-not-object"),
    pytest.param(lambda h: h[ENTRY].update(shape=[257]), id="size-mismatch"),
])
def test_corrupt_safetensors_entry(qwen2: Path, tmp_path: Path, breakage) -> None:
    _rewrite_header(qwen2 / "model.safetensors", breakage)
    export_fails(qwen2, tmp_path, "model.safetensors", ENTRY)


def test_missing_tensor(qwen2: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    st = qwen2 / "model.safetensors"
    tensors = load_file(st)
    victim = "model.layers.1.mlp.down_proj.weight"
    del tensors[victim]
    save_file(tensors, st, metadata={"format": "pt"})
    export_fails(qwen2, tmp_path, victim, "missing")


def test_tensor_shape_disagrees_with_config(qwen2: Path, tmp_path: Path) -> None:
    edit_json(qwen2 / "config.json", lambda c: c.update(intermediate_size=768))
    line = export_fails(qwen2, tmp_path, "shape", "config.json")
    assert "mlp" in line  # names the offending tensor


def test_no_weights_at_all(qwen2: Path, tmp_path: Path) -> None:
    (qwen2 / "model.safetensors").unlink()
    export_fails(qwen2, tmp_path, "no weights")


# ----------------------------------------------------------------------------- config

def test_missing_config(qwen2: Path, tmp_path: Path) -> None:
    (qwen2 / "config.json").unlink()
    export_fails(qwen2, tmp_path, "config.json", "missing")


def test_config_not_json(qwen2: Path, tmp_path: Path) -> None:
    (qwen2 / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], hidden_size: 256', encoding="utf-8")
    export_fails(qwen2, tmp_path, "config.json", "not valid JSON")


def test_config_not_an_object(qwen2: Path, tmp_path: Path) -> None:
    (qwen2 / "config.json").write_text("[1, 2, 3]", encoding="utf-8")
    export_fails(qwen2, tmp_path, "config.json", "object")


@pytest.mark.parametrize("key", ["hidden_size", "rms_norm_eps", "num_hidden_layers", "vocab_size"])
def test_missing_required_key(qwen2: Path, tmp_path: Path, key: str) -> None:
    edit_json(qwen2 / "config.json", lambda c: c.pop(key))
    export_fails(qwen2, tmp_path, "config.json", key)


@pytest.mark.parametrize("value", ["256", -4, 0, True])
def test_bad_hidden_size_value(qwen2: Path, tmp_path: Path, value) -> None:
    edit_json(qwen2 / "config.json", lambda c: c.update(hidden_size=value))
    export_fails(qwen2, tmp_path, "config.json", "hidden_size")


def test_unknown_architecture(qwen2: Path, tmp_path: Path) -> None:
    edit_json(qwen2 / "config.json", lambda c: c.update(architectures=["FalconForCausalLM"], model_type="falcon"))
    export_fails(qwen2, tmp_path, "config.json", "unknown architecture", "FalconForCausalLM")


def test_config_naming_a_family_the_tensors_are_not(qwen2: Path, tmp_path: Path) -> None:
    """config.json says GPT-2, the tensors are Qwen2's: the first GPT-2 tensor that is missing is named."""
    edit_json(qwen2 / "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    export_fails(qwen2, tmp_path, "wte.weight", "missing")


def test_model_type_only_config(qwen2: Path, tmp_path: Path) -> None:
    def strip(c):
        c.pop("architectures")
        c["model_type"] = "gpt2"
    edit_json(qwen2 / "config.json", strip)
    export_fails(qwen2, tmp_path, "config.json", "unknown architecture", "gpt2")


def test_bad_rope_scaling_in_config(qwen2: Path, tmp_path: Path) -> None:
    edit_json(qwen2 / "config.json", lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    export_fails(qwen2, tmp_path, "config.json", "dynamic")


def test_source_is_missing(tmp_path: Path) -> None:
    export_fails(tmp_path / "nope", tmp_path, "nope", "no such file")


def test_source_is_a_file(qwen2: Path, tmp_path: Path) -> None:
    export_fails(qwen2 / "config.json", tmp_path, "config.json", "directory")


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_missing(llama: Path, tmp_path: Path) -> None:
    (llama / "tokenizer.json").unlink()
    export_fails(llama, tmp_path, "tokenizer.json", "missing")


def test_tokenizer_not_json(llama: Path, tmp_path: Path) -> None:
    (llama / "tokenizer.json").write_text("{not json", encoding="utf-8")
    export_fails(llama, tmp_path, "tokenizer.json", "not valid JSON")


def test_vocabulary_missing_essential_byte_tokens(qwen2: Path, tmp_path: Path) -> None:
    """Without the byte tokens for 'a' and ' ' llama.cpp would abort on ordinary text: refuse up front."""
    removed = {"a", "\u0120"}  # 'a' and 'Ġ' (the byte-level stand-in for a space)

    def drop(tok):
        model = tok["model"]
        assert removed <= set(model["vocab"]), "fixture vocabulary lacks the byte tokens under test"
        for t in removed:
            del model["vocab"][t]
        kept = []
        for m in model["merges"]:
            a, b = m if isinstance(m, list) else m.split(" ", 1)
            if a in removed or b in removed or a + b in removed:
                continue
            kept.append(m)
        model["merges"] = kept
    edit_json(qwen2 / "tokenizer.json", drop)
    line = export_fails(qwen2, tmp_path, "tokenizer.json", "byte tokens", "0x20", "0x61")
    assert "llama.cpp" in line


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("value", ["foo:2", "linear:0", "linear:-1", "yarn:abc", "linear", "linear:nan",
                                   "linear:0.5", "llama3:8"])
def test_bad_rope_scaling_flag(tiny_qwen2_dir: Path, tmp_path: Path, value: str) -> None:
    export_fails(tiny_qwen2_dir, tmp_path, "--rope-scaling", repr(value), extra=("--rope-scaling", value))


def test_context_below_original_needs_flag(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    export_fails(tiny_qwen2_dir, tmp_path, "--context 256", "--allow-shorter-context", extra=("--context", "256"))


def test_context_above_unscaled_limit(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    line = export_fails(tiny_qwen2_dir, tmp_path, "--context 4096", "512", extra=("--context", "4096"))
    assert "--rope-scaling" in line  # says how to get there


def test_context_above_scaled_limit(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    export_fails(tiny_qwen2_dir, tmp_path, "--context 4096", "1024",
                 extra=("--rope-scaling", "linear:2", "--context", "4096"))


@pytest.mark.parametrize("value", ["0", "-512"])
def test_original_context_not_positive(tiny_qwen2_dir: Path, tmp_path: Path, value: str) -> None:
    export_fails(tiny_qwen2_dir, tmp_path, "--original-context",
                 extra=("--rope-scaling", "yarn:2", "--original-context", value))


def test_original_context_without_scaling(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    export_fails(tiny_qwen2_dir, tmp_path, "--original-context", "--rope-scaling",
                 extra=("--original-context", "256"))


def test_context_not_an_integer(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """click's own usage errors are also one line and non-zero (2), never a traceback."""
    out_dir = tmp_path / "out"
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", out_dir / "out.gguf", "--context", "lots")
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both and proc.returncode == 2, both
    assert "--context" in proc.stderr
    assert_no_artifacts(out_dir)


def test_unknown_option(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", tmp_path / "out" / "o.gguf", "--qaunt", "f16")
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "--qaunt" in proc.stderr
    assert_no_artifacts(tmp_path / "out")


def test_unknown_quant(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    export_fails(tiny_qwen2_dir, tmp_path, "q9_9", "quantization type", quant="q9_9")


def test_imatrix_missing_file(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.imatrix"
    export_fails(tiny_qwen2_dir, tmp_path, str(missing), "imatrix", quant="q4_k_m", extra=("--imatrix", missing))


def test_imatrix_with_direct_type(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    imat = tmp_path / "x.imatrix"
    imat.write_bytes(b"\x00" * 16)
    export_fails(tiny_qwen2_dir, tmp_path, "--imatrix", "f16", extra=("--imatrix", imat))


def test_imatrix_corrupt_file(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    imat = tmp_path / "bad.imatrix"
    imat.write_bytes(b"\x05\x00\x00\x00\x10\x00\x00\x00short")
    export_fails(tiny_qwen2_dir, tmp_path, "bad.imatrix", quant="q4_k_m", extra=("--imatrix", imat))


# ----------------------------------------------------------------------------- output path

def test_output_parent_is_a_file(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", afile / "out.gguf", "--quant", "f16")
    line = assert_one_line_error(proc, "afile", "not a directory")
    assert ".part" not in line  # names the user's path, not kiln's temp file
    assert afile.read_text() == "not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_output_parent_under_a_file(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", afile / "sub" / "out.gguf", "--quant", "f16")
    line = assert_one_line_error(proc, "afile", "not a directory")
    assert ".part" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_output_in_proc(tiny_qwen2_dir: Path) -> None:
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", "/proc/kiln-test-out.gguf", "--quant", "f16")
    line = assert_one_line_error(proc, "/proc/kiln-test-out.gguf")
    assert ".part" not in line
    assert not Path("/proc/kiln-test-out.gguf").exists()
    assert not list(Path("/proc").glob(".kiln-test-out.gguf.*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_dir_not_writable(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", locked / "out.gguf", "--quant", "f16")
        assert_one_line_error(proc, "locked", "not writable")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_output_is_existing_directory(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "out.gguf"
    target.mkdir(parents=True)
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", target, "--quant", "f16")
    assert_one_line_error(proc, "out.gguf", "directory")
    assert target.is_dir() and list(target.iterdir()) == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.gguf"]


def test_disk_full(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """A real ENOSPC: export onto a 64 KiB tmpfs (the tiny GGUF is ~4 MB)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount binary to create a small tmpfs")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to simulate a full disk: {res.stderr.strip()}")
    try:
        proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", mnt / "out.gguf", "--quant", "f16")
        assert_one_line_error(proc, "disk full", "out.gguf")
        assert_no_artifacts(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------- pickle

def _state_dict_to_bin(model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(model_dir / "model.safetensors")
    torch.save(state, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()


def test_pickle_only_needs_allow_pickle(qwen2: Path, tmp_path: Path) -> None:
    _state_dict_to_bin(qwen2)
    export_fails(qwen2, tmp_path, "pytorch_model.bin", "--allow-pickle")


def test_pickle_with_allow_pickle_works(qwen2: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    _state_dict_to_bin(qwen2)
    out = tmp_path / "out" / "out.gguf"
    proc = kiln("export", "gguf", qwen2, "-o", out, "--quant", "f16", "--allow-pickle", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    reader = GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert len(reader.tensors) > 0
    assert not list(out.parent.glob("*.part"))


class _Payload:
    """A pickled object whose unpickling would create `marker` (stands in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_with_code_is_never_executed(qwen2: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(qwen2 / "model.safetensors")
    (qwen2 / "model.safetensors").unlink()

    # The payload is real: an unsafe load of the same construction does run it.
    control_marker = tmp_path / "control-marker"
    control = tmp_path / "control.bin"
    torch.save({"x": _Payload(control_marker)}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "pwned-marker"
    state["model.embed_tokens.weight"] = _Payload(marker)  # type: ignore[assignment]
    torch.save(state, qwen2 / "pytorch_model.bin")
    export_fails(qwen2, tmp_path, "pytorch_model.bin", "weights_only", extra=("--allow-pickle",))
    assert not marker.exists(), "kiln executed code from a pickle"


def test_pickle_corrupt(qwen2: Path, tmp_path: Path) -> None:
    (qwen2 / "model.safetensors").unlink()
    (qwen2 / "pytorch_model.bin").write_bytes(b"\x80\x02this is not a pickle")
    export_fails(qwen2, tmp_path, "pytorch_model.bin", extra=("--allow-pickle",))


def test_pickle_not_a_state_dict(qwen2: Path, tmp_path: Path) -> None:
    import torch

    (qwen2 / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], qwen2 / "pytorch_model.bin")
    export_fails(qwen2, tmp_path, "pytorch_model.bin", "state dict", extra=("--allow-pickle",))


# ----------------------------------------------------------------------------- inspect / generate / modelfile

def test_inspect_missing_path(tmp_path: Path) -> None:
    assert_one_line_error(kiln("inspect", tmp_path / "missing.gguf"), "missing.gguf", "no such file")


def test_inspect_broken_checkpoint(qwen2: Path) -> None:
    (qwen2 / "config.json").write_text("{", encoding="utf-8")
    assert_one_line_error(kiln("inspect", qwen2), "config.json", "not valid JSON")


def _truncated_copy(gguf: Path, dest: Path, keep: int) -> Path:
    data = gguf.read_bytes()
    assert keep < len(data)
    dest.write_bytes(data[:keep])
    return dest


@pytest.mark.parametrize("where", ["data", "header"])
def test_inspect_truncated_gguf(small_gguf: Path, tmp_path: Path, where: str) -> None:
    keep = small_gguf.stat().st_size // 2 if where == "data" else 200
    bad = _truncated_copy(small_gguf, tmp_path / "cut.gguf", keep)
    assert_one_line_error(kiln("inspect", bad), "cut.gguf", "not a valid GGUF")
    assert_one_line_error(kiln("inspect", bad, "--json"), "cut.gguf", "not a valid GGUF")


def test_inspect_good_gguf_still_works(small_gguf: Path) -> None:
    proc = kiln("inspect", small_gguf, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["architecture"] == "qwen2"


@pytest.mark.parametrize("where", ["data", "header"])
def test_generate_truncated_gguf(small_gguf: Path, tmp_path: Path, where: str) -> None:
    keep = small_gguf.stat().st_size // 2 if where == "data" else 200
    bad = _truncated_copy(small_gguf, tmp_path / "cut.gguf", keep)
    assert_one_line_error(kiln("generate", bad, "--prompt", "hello", "--max-tokens", "2"), "cut.gguf")


def test_generate_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(kiln("generate", tmp_path / "none.gguf", "--prompt", "hi"), "none.gguf")


def test_modelfile_on_non_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text("this is a text file, not a GGUF\n" * 4)
    assert_one_line_error(kiln("modelfile", bogus), "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_modelfile_on_truncated_gguf(small_gguf: Path, tmp_path: Path) -> None:
    bad = _truncated_copy(small_gguf, tmp_path / "cut.gguf", 200)
    assert_one_line_error(kiln("modelfile", bad), "cut.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_modelfile_missing(tmp_path: Path) -> None:
    assert_one_line_error(kiln("modelfile", tmp_path / "x.gguf"), "x.gguf")


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    """SIGINT mid-export: exit 130, no traceback, no partial GGUF or `.part` temp."""
    src = FIXTURES / "smollm2-135m"
    if not (src / "model.safetensors").exists():
        pytest.skip("smollm2-135m fixture not built (run `kiln fixtures smollm2-135m`)")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([KILN, "export", "gguf", str(src), "-o", str(out_dir / "smol.gguf"), "--quant", "f32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            # a shell's background job inherits SIGINT ignored, and Python keeps it so:
                            # give the child the default disposition, as a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Interrupt while the temp file is being written (~1.5 s in, on a typical machine): waiting
        # for the `.part` file rather than a fixed delay makes sure the write really is under way.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out_dir.glob("*.part")):
                time.sleep(0.2)
                break
            time.sleep(0.02)
        assert proc.poll() is None, "export finished before it could be interrupted"
        saw_part = bool(list(out_dir.glob("*.part")))
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert saw_part, "the export never started writing its temp file"
    assert "Traceback" not in stdout + stderr, stderr
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert stderr.strip().splitlines()[-1] == "kiln: interrupted"
    assert_no_artifacts(out_dir)


# ----------------------------------------------------------------------------- pickle refusal, context, temperature

class _Opaque:
    """A custom class inside a checkpoint: torch's weights_only loader refuses it, and kiln says so."""

    def __init__(self) -> None:
        self.note = "not a tensor"


def test_pickle_refusal_says_what_and_why(qwen2: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = load_file(qwen2 / "model.safetensors")
    (qwen2 / "model.safetensors").unlink()
    state["extra"] = _Opaque()  # type: ignore[assignment]
    torch.save(state, qwen2 / "pytorch_model.bin")
    out_dir = tmp_path / "out"
    proc = kiln("export", "gguf", qwen2, "-o", out_dir / "out.gguf", "--quant", "f16", "--allow-pickle")
    assert_one_line_error(proc, "pytorch_model.bin: refused: the pickle holds objects other than tensors and "
                          "plain containers", "GLOBAL", "_Opaque", "weights_only loader",
                          "never runs code from a checkpoint")
    assert "weights_only=False" not in proc.stderr and "can still be loaded" not in proc.stderr
    assert_no_artifacts(out_dir)


@pytest.fixture(scope="module")
def small_onnx(tiny_qwen2_dir: Path, tmp_path_factory) -> Path:
    """A real ONNX directory written by `kiln export onnx` (int8, unverified to stay fast)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny-int8"
    proc = kiln("export", "onnx", tiny_qwen2_dir, "-o", out, "-p", "int8", "--no-verify", timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out


LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 60  # several hundred tokens


def test_generate_context_gguf_names_what_was_asked(small_gguf: Path) -> None:
    """llama.cpp rounds --ctx 16 up to 256: the message names both, not only llama.cpp's figure."""
    proc = kiln("generate", small_gguf, "--ctx", "16", "--prompt", LONG_PROMPT, "--max-tokens", "4")
    line = assert_one_line_error(proc, "prompt of", "(+ 4 to generate) exceeds the context of 16 asked for "
                                 "(llama.cpp allocates 256)")
    assert "exceed the context of 256" not in line


@pytest.mark.parametrize("ctx,expected", [
    ("16", "(+ 4 to generate) exceeds the context of 16"),
    ("100000", "(+ 4 to generate) exceeds the context of 100000 asked for (onnxruntime allocates 512, "
               "the model's context length)"),
])
def test_generate_context_onnx_names_what_was_asked(small_onnx: Path, ctx: str, expected: str) -> None:
    prompt = LONG_PROMPT if ctx == "16" else LONG_PROMPT * 4
    proc = kiln("generate", small_onnx, "--ctx", ctx, "--prompt", prompt, "--max-tokens", "4")
    assert_one_line_error(proc, "prompt of", expected)


@pytest.mark.parametrize("smc", [False, True])
def test_negative_temperature_is_refused(small_gguf: Path, smc: bool) -> None:
    """Without particles -1 used to decode greedily without a word; with them SMC refused it already."""
    extra = ("--particles", "2") if smc else ()
    proc = kiln("generate", small_gguf, "--prompt", "hello", "--temperature=-1", "--max-tokens", "2", *extra)
    if smc:
        assert_one_line_error(proc, "--temperature -1.0", "positive temperature")
    else:
        assert_one_line_error(proc, "temperature -1.0: must be >= 0 (0 = greedy)")
