"""kiln.formats: one class per artifact format decides what every caller used to decide with a suffix test.

Detection, refusals, manifests, engine sizing and inspect on real files (the SmolLM2 GGUF kiln ships
as a fixture; ONNX directories made by hand where only the layout matters), and the import rules
that come with it: the runtime and the formats embed without torch, potentials never import the
runtime package, and no sub-command imports kiln.cli.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.formats import GGUF, ONNX, by_name, format_of, formats, require_format

SRC = Path(__file__).resolve().parent.parent / "src" / "kiln"


@pytest.fixture(scope="module")
def gguf(smollm2_dir: Path) -> Path:
    from kiln.fixtures import smollm2_original_gguf

    return smollm2_original_gguf()


def _onnx_dir(root: Path, name: str = "m-int4") -> Path:
    d = root / name
    d.mkdir()
    (d / "genai_config.json").write_text("{}", encoding="utf-8")
    return d


# --- registry and detection ----------------------------------------------------------------------------

def test_registry() -> None:
    assert [f.name for f in formats()] == ["gguf", "onnx"]
    assert isinstance(by_name("gguf"), GGUF) and isinstance(by_name("onnx"), ONNX)
    with pytest.raises(KilnError, match="unknown artifact format 'safetensors'"):
        by_name("safetensors")


def test_detection(tmp_path: Path) -> None:
    named = tmp_path / "broken.gguf"
    named.write_bytes(b"not a gguf at all")  # the suffix decides: the reader then says what is wrong
    magic = tmp_path / "model.bin"
    magic.write_bytes(b"GGUF\x03\x00\x00\x00")
    other = tmp_path / "notes.txt"
    other.write_text("GGML? no")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    onnx = _onnx_dir(tmp_path)
    plain_dir = tmp_path / "ckpt"
    plain_dir.mkdir()
    (plain_dir / "config.json").write_text("{}")
    dir_named_gguf = tmp_path / "odd.gguf"
    dir_named_gguf.mkdir()
    assert format_of(named).name == "gguf" and format_of(magic).name == "gguf"
    assert format_of(onnx).name == "onnx" and format_of(str(onnx)).name == "onnx"
    for path in (other, empty, plain_dir, dir_named_gguf, tmp_path / "missing.gguf", tmp_path / "missing"):
        assert format_of(path) is None, path


def test_require_format_refusals_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(KilnError) as err:
        require_format(tmp_path / "missing.gguf")
    assert str(err.value) == f"{tmp_path / 'missing.gguf'}: no such file or directory"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(KilnError) as err:
        require_format(ckpt, what="critic")
    msg = str(err.value)
    assert msg.startswith(f"{ckpt}: not a GGUF file or an ONNX model directory (the critic must be")
    assert "genai_config.json" in msg and ".gguf" in msg and "\n" not in msg


# --- manifests, sizes, engine sizing ------------------------------------------------------------------

def test_manifest_locations(tmp_path: Path) -> None:
    g = tmp_path / "m.q8_0.gguf"
    g.write_bytes(b"GGUF")
    d = _onnx_dir(tmp_path)
    assert GGUF().manifest_path(g) == tmp_path / "m.q8_0.gguf.manifest.json"
    assert ONNX().manifest_path(d) == d / "manifest.json"
    assert format_of(g).manifest(g) is None and format_of(d).manifest(d) is None
    (tmp_path / "m.q8_0.gguf.manifest.json").write_text(json.dumps({"kind": "gguf"}))
    (d / "manifest.json").write_text(json.dumps({"kind": "onnx"}))
    assert format_of(g).manifest(g) == {"kind": "gguf"} and format_of(d).manifest(d) == {"kind": "onnx"}
    (d / "model.onnx").write_bytes(b"x" * 10)
    (d / "model.onnx.data").write_bytes(b"x" * 100)
    assert ONNX().weights_bytes(d) == 110 and GGUF().weights_bytes(g) == 4


def test_engine_sizes() -> None:
    """llama.cpp's one pool holds every prompt once and every particle's tail; an ONNX row holds the
    longest prompt and one tail (the figures kiln generate has always opened engines with)."""
    assert GGUF.shared_kv_pool and not ONNX.shared_kv_pool
    assert GGUF().engine_sizes([40], 8, 10) == {"n_ctx": 40 + 8 * 10, "n_seq_max": 8}
    assert GGUF().engine_sizes([40, 30], 8, 10) == {"n_ctx": 70 + 2 * 8 * 10, "n_seq_max": 16}
    assert ONNX().engine_sizes([40], 8, 10) == {"n_ctx": 50, "n_seq_max": 8}
    assert ONNX().engine_sizes([40, 30], 8, 10) == {"n_ctx": 50, "n_seq_max": 16}


def test_engine_options() -> None:
    assert ONNX().engine_options(kv_type="q8_0", flash_attn=True) == {} and ONNX.verification_options == {}
    assert GGUF.verification_options == {"flash_attn": False, "type_k": 0, "type_v": 0}
    pytest.importorskip("llama_cpp")
    opts = GGUF().engine_options(kv_type="q8_0", flash_attn=True)
    assert opts["flash_attn"] is True and opts["type_k"] == opts["type_v"] == 8  # GGML_TYPE_Q8_0
    assert GGUF().engine_options(kv_type="f32")["type_k"] == 0
    with pytest.raises(KilnError, match="unknown KV-cache type"):
        GGUF().engine_options(kv_type="q9_9")


# --- real artifacts ------------------------------------------------------------------------------------

def test_gguf_open_and_inspect(gguf: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    fmt = require_format(gguf)
    info = fmt.inspect(gguf)
    assert info["format"] == "gguf" and info["architecture"] == "llama" and info["layers"] == 30
    assert info["vocab_size"] == 49152 and info["file_size"] == gguf.stat().st_size
    with fmt.open_engine(gguf, n_ctx=64, threads=1) as engine:
        assert engine.shared_kv_pool and engine.vocab_size == 49152
    renamed = tmp_path / "smol.bin"  # a GGUF under another name is found by its magic
    renamed.symlink_to(gguf)
    assert format_of(renamed).name == "gguf"
    from kiln.runtime import load

    with load(renamed, n_ctx=64, threads=1) as a, load(gguf, n_ctx=64, threads=1) as b:
        assert a.tokenize(" Paris.") == b.tokenize(" Paris.")
    from kiln.inspect_artifact import inspect_path

    assert inspect_path(gguf) == info


def test_load_refuses_what_is_no_artifact(tmp_path: Path) -> None:
    from kiln.runtime import load

    with pytest.raises(KilnError, match="no such file or directory"):
        load(tmp_path / "nope.gguf")
    with pytest.raises(KilnError, match="not a GGUF file or an ONNX model directory"):
        load(tmp_path)


# --- import rules --------------------------------------------------------------------------------------

def test_runtime_and_formats_import_without_torch() -> None:
    code = ("import sys, kiln.formats, kiln.runtime, kiln.runtime.steering, kiln.runtime.potentials\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, those inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.lineno, node.module)]
    return out


def test_potentials_never_import_the_runtime_package() -> None:
    bad = [(p.name, line) for p in sorted((SRC / "runtime" / "potentials").glob("*.py"))
           for line, mod in _imports(p) if mod == "kiln.runtime"]
    assert not bad, bad


def test_nothing_imports_the_cli_module() -> None:
    bad = [(str(p.relative_to(SRC)), line) for p in sorted(SRC.rglob("*.py"))
           for line, mod in _imports(p) if mod == "kiln.cli"]
    assert not bad, bad


def test_formats_import_no_engine_at_module_level() -> None:
    for p in sorted((SRC / "formats").glob("*.py")):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in top]
        assert not [m for m in mods if m and (m.startswith("kiln.runtime") or m in ("torch", "llama_cpp"))], p


DISPATCH_SITES = ["runtime/__init__.py", "runtime/steering.py", "evaluate.py", "inspect_artifact.py",
                  "recipe/report.py", "cli.py", "bench/geometry.py", "bench/probe.py", "manifest.py"]


def test_dispatch_sites_ask_the_formats() -> None:
    """The sites that used to decide "GGUF file or ONNX directory" themselves no longer test suffixes or
    look for genai_config.json (a checkpoint's config.json is a source, not an artifact format)."""
    for rel in DISPATCH_SITES:
        code = "\n".join(line for line in (SRC / rel).read_text(encoding="utf-8").splitlines()
                         if not line.lstrip().startswith("#"))
        tree = ast.parse(code)
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        docs = {ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))}
        assert not [s for s in strings if s not in docs and (s == ".gguf" or s == "genai_config.json")], rel
        assert ".suffix" not in code, rel
