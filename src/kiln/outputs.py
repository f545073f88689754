"""May kiln write here? The one place that decides, before any work starts and again at commit time.

The rule (DESIGN.md §1, issue 15): kiln never deletes or overwrites a file or directory it did not
write. An output path is accepted when

- it does not exist, or is an empty directory (a directory artifact then takes its place);
- it is a previous kiln artifact of the same kind: a file with `NAME.manifest.json` beside it naming
  that kind and that file at its current size (GGUF, imatrix), a Modelfile whose first line is the
  header kiln writes, or a directory whose `manifest.json` names the kind and lists every file the
  directory holds (ONNX, GPTQ, bench) — a user's file dropped into an artifact directory makes it
  the user's again;
- or the caller passed `force` (the CLI's `--force`).

Some paths are refused even with `force`: the filesystem root, the home directory, the current
directory or one above it (`-o .`, `-o ..`), and any path that is or contains a source of the
command (`-o SRC`), because replacing them destroys the input or far more than an artifact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from kiln.atomic import temp_prefix
from kiln.errors import KilnError

# Kinds whose artifact is a directory (with manifest.json inside, except a merged LoRA checkpoint,
# which only --force or a recipe's record lets kiln replace); the others are single files.
DIRECTORY_KINDS = frozenset({"onnx", "gptq", "bench", "merged"})
MODELFILE_HEADER = "# Ollama Modelfile written by kiln"  # first line of every Modelfile kiln renders


def sidecar_manifest(path: Path) -> Path:
    """`NAME.manifest.json` beside a single-file artifact (kiln.manifest writes it)."""
    return path.with_name(path.name + ".manifest.json")


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _kiln_manifest(path: Path, kind: str) -> dict | None:
    data = _json_object(path)
    if data is None or "kiln_version" not in data or data.get("kind") != kind:
        return None
    return data


def _listed(manifest: dict) -> dict[str, int]:
    files = manifest.get("files")
    if not isinstance(files, list):
        return {}
    return {f["name"]: f.get("size") for f in files if isinstance(f, dict) and isinstance(f.get("name"), str)}


def is_kiln_manifest(path: Path) -> bool:
    """A JSON record kiln wrote (manifests and reports carry `kiln_version`)."""
    data = _json_object(path)
    return data is not None and "kiln_version" in data


def written_by_kiln(path: Path, kind: str) -> bool:
    """True when `path` is a kiln artifact of `kind` that nobody has added files to since."""
    if kind in DIRECTORY_KINDS:
        if not path.is_dir() or path.is_symlink():
            return False
        manifest = _kiln_manifest(path / "manifest.json", kind)
        if manifest is None:
            return False
        listed = _listed(manifest)
        for entry in path.rglob("*"):
            if entry.is_dir() and not entry.is_symlink():
                continue
            rel = entry.relative_to(path).as_posix()
            if rel != "manifest.json" and rel not in listed:
                return False
        return True
    if not path.is_file() or path.is_symlink():
        return False
    if kind == "modelfile":
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().startswith(MODELFILE_HEADER)
        except (OSError, UnicodeDecodeError):
            return False
    manifest = _kiln_manifest(sidecar_manifest(path), kind)
    return manifest is not None and _listed(manifest).get(path.name) == path.stat().st_size


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def refuse_special_paths(dest: Path, sources: Iterable[str | os.PathLike[str] | None] = ()) -> None:
    """Paths no output may take, `--force` or not (see the module docstring)."""
    resolved = dest.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        raise KilnError(f"-o {dest}: is the filesystem root; name a new path for the output")
    if resolved == Path.home().resolve():
        raise KilnError(f"-o {dest}: is your home directory; name a new path for the output")
    if resolved == cwd or resolved in cwd.parents:
        raise KilnError(f"-o {dest}: is the current directory or one above it; name a new path "
                        f"such as {dest / 'NAME'}")
    for src in sources:
        if src is None:
            continue
        s = Path(src).resolve()
        if resolved == s or resolved in s.parents:
            raise KilnError(f"-o {dest}: would replace the input {src}; name a new path for the output")


def _probe_writable(dest: Path) -> None:
    """Fail now, not after minutes of work, where nothing can be written (creates nothing that stays).

    A real probe in the nearest existing ancestor: os.access says yes to root even where writing
    fails (/proc, read-only mounts)."""
    parent = dest.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise KilnError(f"{dest}: cannot write there: output directory {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(dest), suffix=".part", dir=parent)
    except OSError as exc:
        raise KilnError(f"{dest}: cannot write there: output directory {parent} is not writable "
                        f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_output(dest: str | os.PathLike[str], kind: str, *, force: bool = False,
                 sources: Iterable[str | os.PathLike[str] | None] = (),
                 companions: Callable[[Path], Iterable[tuple[Path, str]]] | None = None) -> Path:
    """Refuse, before any work, an output kiln may not write (one line naming the path and the way out).

    `companions(dest)` names further files the command writes beside `dest` (a manifest, a Modelfile)
    with their kinds ("manifest" for kiln's JSON records); each gets the same rule. Returns `dest`.
    """
    dest = Path(dest)
    refuse_special_paths(dest, sources)
    _probe_writable(dest)
    directory = kind in DIRECTORY_KINDS
    if dest.exists() or dest.is_symlink():
        if directory and not dest.is_dir():
            raise KilnError(f"{dest}: exists and is not a directory; name a new path for the {kind} output")
        if not directory and dest.is_dir():
            raise KilnError(f"{dest}: is a directory; name a file path for the {kind} output")
        if not (force or is_empty_dir(dest) or written_by_kiln(dest, kind)):
            what = "directory holds files that kiln did not write" if directory else "file was not written by kiln"
            raise KilnError(f"{dest}: exists and this {what} as a {kind} artifact; choose a new path, "
                            f"or pass --force to replace it")
    for path, ckind in companions(dest) if companions else ():
        if not (path.exists() or path.is_symlink()) or force:
            continue
        if path.is_dir():
            raise KilnError(f"{path}: is a directory; kiln writes a file there: move it or choose another -o")
        ours = is_kiln_manifest(path) if ckind == "manifest" else written_by_kiln(path, ckind)
        if not ours:
            raise KilnError(f"{path}: exists and was not written by kiln; kiln writes its {ckind} there: "
                            f"move it, choose another -o, or pass --force")
    return dest


def may_replace(kind: str, force: bool = False):
    """The predicate kiln.atomic asks at commit time: may the existing `dest` be replaced?"""
    def check(dest: Path) -> bool:
        return force or is_empty_dir(dest) or written_by_kiln(dest, kind)
    return check
