"""Running the real `kiln` console script from tests, and the one-line error contract its failures keep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KILN = str(Path(sys.executable).parent / "kiln")


def kiln(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_COLOR="1")
    return subprocess.run([KILN, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one stderr line `kiln: error: ...` holding every needle."""
    both = proc.stdout + proc.stderr
    assert proc.returncode != 0, both
    assert "Traceback" not in both, both
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]
