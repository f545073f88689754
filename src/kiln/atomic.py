"""Write-then-rename, so a failed or interrupted export never leaves a half-written artifact.

Temporary entries are named `.NAME.kiln-XXXXXXXX.part` (and a replaced directory briefly
`.NAME.kiln-XXXXXXXX.old`): the `.kiln-` infix is what `sweep_leftovers` matches, so cleaning up
after a crash never touches a user's own dot-files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from kiln.errors import KilnError

TEMP_INFIX = ".kiln-"
_LEFTOVER = re.compile(r"^\..+\.kiln-[A-Za-z0-9_]+(\.[a-z0-9]+)?\.(part|old)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_parent(dest: Path) -> None:
    parent = dest.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KilnError(f"cannot create output directory {parent}: {exc.strerror}") from None
    if not parent.is_dir():
        raise KilnError(f"output directory {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise KilnError(f"output directory {parent} is not writable")


def _os_error(dest: Path, exc: OSError) -> KilnError:
    # numpy's tofile (used by gguf-py's writer) reports a failed fwrite as a bare
    # "N requested and M written" OSError with no errno: on a regular file that is a full disk.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or (exc.errno is None and "requested and" in str(exc)):
        return KilnError(f"disk full while writing {dest}")
    return KilnError(f"cannot write {dest}: {exc.strerror or exc}")


def temp_prefix(dest: Path) -> str:
    """The prefix of every temporary entry kiln makes for `dest` (see the module docstring)."""
    return f".{dest.name}{TEMP_INFIX}"


def _refused(dest: Path) -> KilnError:
    return KilnError(f"{dest}: appeared or changed while kiln was writing and is not a kiln artifact of this "
                     "kind; left as it is (choose a new path, or pass --force to replace it)")


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str], may_replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    `may_replace` (kiln.outputs.may_replace) is asked again at commit time whether an existing
    ``dest`` may be overwritten; None is for kiln's own bookkeeping files (manifests, caches).
    """
    dest = Path(dest)
    _check_parent(dest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest), suffix=".part", dir=dest.parent)
    except OSError as exc:  # e.g. /proc: the check above passes for root, creating fails
        raise _os_error(dest, exc) from None
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get normal permissions
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if may_replace is not None and (dest.exists() or dest.is_symlink()) and not may_replace(dest):
            raise _refused(dest)
        os.replace(tmp_path, dest)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _os_error(dest, exc) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str],
               may_replace: Callable[[Path], bool] = lambda d: False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; it replaces ``dest`` only if the block succeeds.

    An existing ``dest`` is replaced only when it is an empty directory or `may_replace(dest)` says so
    at commit time (kiln.outputs.may_replace: a kiln artifact of the same kind, or --force); the old
    directory is moved aside under a kiln temporary name first and deleted only after the new one is
    in place. Anything else is refused and the new directory discarded: never delete what kiln did
    not write.
    """
    dest = Path(dest)
    if not dest.name or dest.name in (".", ".."):
        raise KilnError(f"{dest}: name a directory to create, not {str(dest)!r}")
    _check_parent(dest)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), suffix=".part", dir=dest.parent))
    except OSError as exc:
        raise _os_error(dest, exc) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if dest.is_dir() and not dest.is_symlink() and next(dest.iterdir(), None) is None:
            os.replace(tmp, dest)  # rename(2) replaces an empty directory in one step
        elif dest.exists() or dest.is_symlink():
            if not may_replace(dest):
                raise _refused(dest)
            old = dest.with_name(f"{temp_prefix(dest)}{secrets.token_hex(4)}.old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            os.replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(dest, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_leftovers(directory: Path) -> list[Path]:
    """Remove what interrupted atomic writes left in `directory` (kiln's `.NAME.kiln-*.part/.old` only)."""
    removed = []
    for path in directory.glob(".*"):
        if _LEFTOVER.match(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() \
                else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
