"""No kiln command loses a user's data (issue 15).

Every command that writes (`export gguf`, `export onnx`, `quantize gptq`, `imatrix`, `modelfile`,
`bench`, `recipe run`) is run, as the real `kiln` console script, against an output path that
already holds unrelated user files, and every one of those files must survive byte for byte:
either the command writes beside them, or it refuses with one `kiln: error:` line naming the
path, before any work and without leaving anything behind. `kiln eval` and `kiln inspect` write
nothing but stdout. Then the other half of the rule: a previous kiln artifact of the same kind
*is* replaced (atomically), a user file is replaced only with `--force`, and `-o .`, `-o ..`,
`-o /` and `-o SRC` are refused even with `--force`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from kiln.atomic import atomic_dir, atomic_file, sweep_leftovers
from kiln.errors import KilnError
from kiln.outputs import may_replace, written_by_kiln
from kiln_cli import kiln, one_line_error

REPO = Path(__file__).resolve().parents[1]

USER_FILES = {
    "notes.txt": b"my notes, not a model\n",
    "my-model.gguf": b"GGUF" + bytes(range(256)) * 4,
    "sub/deep.bin": os.urandom(1000),
    ".hidden.part": b"a user's dot-file that looks like a temp file\n",
    ".cfg.old": b"another one\n",
}


def user_dir(path: Path) -> dict[str, str]:
    """Fill `path` with the user's files; returns their sha256 by relative path."""
    for rel, data in USER_FILES.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return snapshot(path)


def snapshot(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_survived(path: Path, before: dict[str, str]) -> None:
    after = snapshot(path)
    for rel, sha in before.items():
        assert after.get(rel) == sha, f"{rel} was changed or deleted"


def no_temp_left(path: Path, before: dict[str, str]) -> None:
    extra = sorted(set(snapshot(path)) - set(before))
    leftovers = [p for p in extra if ".kiln-" in p and p.endswith((".part", ".old"))]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def small_gguf(tiny_qwen2_f32_gguf: Path) -> Path:
    return tiny_qwen2_f32_gguf


# ----------------------------------------------------------------- every writing command vs user files

@pytest.mark.parametrize("args", [
    ("export", "gguf", "{src}", "-o", "{out}/my-model.gguf", "--quant", "f32", "--no-verify"),
    ("export", "gguf", "{src}", "-o", "{out}/notes.txt", "--quant", "q8_0", "--no-verify"),
    ("export", "onnx", "{src}", "-o", "{out}", "-p", "fp32", "--no-verify"),
    ("export", "onnx", "{src}", "-o", "{out}/sub", "-p", "fp32", "--no-verify"),
    ("quantize", "gptq", "{src}", "-o", "{out}", "--samples", "1", "--seq-len", "16"),
    ("imatrix", "{src}", "-o", "{out}/notes.txt", "--chunks", "1", "--ctx", "32"),
    ("modelfile", "{gguf}", "-o", "{out}/notes.txt"),
    ("bench", "{gguf}", "--contexts", "64", "--tokens", "2", "--no-anchor", "-o", "{out}"),
], ids=["gguf-over-user-gguf", "gguf-over-user-file", "onnx-into-user-dir", "onnx-into-user-subdir",
        "gptq-into-user-dir", "imatrix-over-user-file", "modelfile-over-user-file", "bench-into-user-dir"])
def test_user_files_survive_every_writer(args, tiny_qwen2_dir: Path, small_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    out.mkdir()
    before = user_dir(out)
    filled = [a.format(src=tiny_qwen2_dir, out=out, gguf=small_gguf) for a in args]
    proc = kiln(*filled)
    one_line_error(proc, str(out), "--force")
    assert snapshot(out) == before  # nothing added either: refused before any work
    assert_survived(out, before)


def test_writing_beside_user_files_keeps_them(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """A new name in a directory of user files: written, and the user's files untouched."""
    out = tmp_path / "models"
    out.mkdir()
    before = user_dir(out)
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", out / "tq2.q8_0.gguf", "--quant", "q8_0", "--modelfile",
                "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert (out / "tq2.q8_0.gguf").is_file() and (out / "tq2.q8_0.gguf.manifest.json").is_file()
    assert (out / "tq2.q8_0.Modelfile").is_file()
    assert_survived(out, before)
    no_temp_left(out, before)


def test_user_modelfile_beside_the_gguf_is_refused_before_work(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    out.mkdir()
    (out / "tq2.Modelfile").write_text("FROM ./something-else.gguf\n")
    before = snapshot(out)
    proc = kiln("export", "gguf", tiny_qwen2_dir, "-o", out / "tq2.gguf", "--quant", "f32", "--modelfile",
                "--no-verify")
    one_line_error(proc, "tq2.Modelfile")
    assert snapshot(out) == before


def test_user_manifest_name_beside_the_gguf_is_refused(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    out.mkdir()
    (out / "tq2.gguf.manifest.json").write_text('{"mine": true}\n')
    before = snapshot(out)
    one_line_error(kiln("export", "gguf", tiny_qwen2_dir, "-o", out / "tq2.gguf", "--quant", "f32", "--no-verify"),
                   "tq2.gguf.manifest.json")
    assert snapshot(out) == before


def test_recipe_run_keeps_user_files(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """A recipe's output directory is a container: user files beside its outputs survive, a user file
    where an output goes is refused before any step runs, and a second run replaces its own outputs."""
    out = tmp_path / "recipe-out"
    out.mkdir()
    before = user_dir(out)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: tq2\nsource: {tiny_qwen2_dir}\ntargets:\n  gguf: [f32]\n  modelfile: true\n"
                      f"verify: false\neval:\n  enabled: false\nbench:\n  enabled: false\noutput: {out}\n")
    proc = kiln("recipe", "run", recipe)
    assert proc.returncode == 0, proc.stderr
    assert (out / "tq2.f32.gguf").is_file() and (out / "report.md").is_file()
    assert_survived(out, before)
    proc = kiln("recipe", "run", recipe, "--force")  # its own outputs: replaced
    assert proc.returncode == 0, proc.stderr
    assert_survived(out, before)
    no_temp_left(out, before)

    other = tmp_path / "recipe-out-2"
    other.mkdir()
    (other / "report.md").write_text("# my report\n")
    before2 = snapshot(other)
    recipe.write_text(recipe.read_text().replace(f"output: {out}", f"output: {other}"))
    one_line_error(kiln("recipe", "run", recipe), "report.md", "not written by this recipe")
    assert snapshot(other) == before2


# ----------------------------------------------------------------- kiln's own artifacts are replaced

def test_previous_onnx_directory_is_replaced_but_not_once_a_user_file_is_added(tiny_qwen2_dir: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "tq2-fp32"
    args = ("export", "onnx", tiny_qwen2_dir, "-o", out, "-p", "fp32", "--no-verify")
    assert kiln(*args).returncode == 0
    assert written_by_kiln(out, "onnx")
    proc = kiln(*args)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tq2-fp32"]  # no .old / .part left beside it
    (out / "notes.txt").write_text("mine")
    assert not written_by_kiln(out, "onnx")
    one_line_error(kiln(*args), str(out), "--force")
    assert (out / "notes.txt").read_text() == "mine"
    proc = kiln(*args, "--force")  # the user said so
    assert proc.returncode == 0, proc.stderr
    assert not (out / "notes.txt").exists()


def test_previous_gguf_is_replaced_user_gguf_only_with_force(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    args = ("export", "gguf", tiny_qwen2_dir, "-o", out, "--quant", "f32", "--no-verify")
    assert kiln(*args).returncode == 0
    assert kiln(*args, "--quant", "q8_0").returncode == 0  # kiln's own: replaced
    assert written_by_kiln(out, "gguf")
    out.write_bytes(b"GGUF user bytes")  # the user replaced it with their own file: no longer kiln's
    one_line_error(kiln(*args), str(out))
    assert out.read_bytes() == b"GGUF user bytes"
    assert kiln(*args, "--force").returncode == 0
    assert written_by_kiln(out, "gguf")


def test_gptq_directory_carries_a_manifest_and_is_replaced(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gptq"
    args = ("quantize", "gptq", tiny_qwen2_dir, "-o", out, "--samples", "1", "--seq-len", "16")
    assert kiln(*args).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "gptq" and {f["name"] for f in manifest["files"]} >= {"model.safetensors",
                                                                                       "config.json"}
    proc = kiln(*args)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------- paths refused even with --force

@pytest.mark.parametrize("target", [".", "..", "/", "~", "SRC", "PARENT_OF_SRC"])
@pytest.mark.parametrize("command", ["export-onnx", "export-gguf", "gptq", "imatrix", "bench"])
def test_special_output_paths_refused_before_work(command: str, target: str, tiny_qwen2_dir: Path,
                                                  small_gguf: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    src = work / "src"
    shutil.copytree(tiny_qwen2_dir, src)
    gguf = work / "g.gguf"
    shutil.copyfile(small_gguf, gguf)
    source = gguf if command == "bench" else src
    out = {"~": str(Path.home()), "SRC": str(source), "PARENT_OF_SRC": str(work)}.get(target, target)
    args = {"export-onnx": ("export", "onnx", src, "-o", out, "-p", "fp32", "--no-verify"),
            "export-gguf": ("export", "gguf", src, "-o", out, "--quant", "f32", "--no-verify"),
            "gptq": ("quantize", "gptq", src, "-o", out, "--samples", "1", "--seq-len", "16"),
            "imatrix": ("imatrix", src, "-o", out, "--chunks", "1"),
            "bench": ("bench", gguf, "--contexts", "64", "--no-anchor", "-o", out)}[command]
    before = snapshot(work)
    proc = kiln(*args, "--force", cwd=cwd)
    line = one_line_error(proc)
    assert "-o" in line or "directory" in line, line
    assert snapshot(work) == before


# ----------------------------------------------------------------- the mechanisms themselves

def test_atomic_dir_never_replaces_what_it_may_not(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("keep")
    with pytest.raises(KilnError, match="not a kiln artifact"):
        with atomic_dir(dest) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert (dest / "keep.txt").read_text() == "keep"
    empty = tmp_path / "e"
    empty.mkdir()
    with atomic_dir(empty) as tmp:  # an empty directory has nothing to lose
        (tmp / "new.txt").write_text("new")
    assert (empty / "new.txt").read_text() == "new"
    with pytest.raises(KilnError):
        with atomic_dir(tmp_path / "."):
            pass


def test_atomic_file_commit_check_sees_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    dest = tmp_path / "x.gguf"
    with pytest.raises(KilnError, match="appeared or changed"):
        with atomic_file(dest, may_replace("gguf")) as tmp:
            tmp.write_bytes(b"kiln's")
            dest.write_bytes(b"the user's, written while kiln worked")
    assert dest.read_bytes() == b"the user's, written while kiln worked"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_sweep_removes_only_kiln_leftovers(tmp_path: Path) -> None:
    before = user_dir(tmp_path)
    (tmp_path / ".m.gguf.kiln-ab12cd34.part").write_bytes(b"x")
    (tmp_path / ".m.gguf.kiln-ab12cd34.f32.part").write_bytes(b"x")
    (tmp_path / ".out.kiln-0a1b2c3d.old").mkdir()
    removed = sorted(p.name for p in sweep_leftovers(tmp_path))
    assert removed == [".m.gguf.kiln-ab12cd34.f32.part", ".m.gguf.kiln-ab12cd34.part", ".out.kiln-0a1b2c3d.old"]
    assert snapshot(tmp_path) == before


def test_help_names_force_and_the_output_rule() -> None:
    for cmd in (("export", "gguf"), ("export", "onnx"), ("quantize", "gptq"), ("imatrix",), ("modelfile",),
                ("bench",)):
        out = kiln(*cmd, "--help").stdout
        assert "--force" in out, cmd
