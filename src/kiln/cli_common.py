"""What every `kiln` sub-command shares: JSON output, the progress bar, the stderr console, reading
a text file given by a flag, declaring shared options once.

Its own module so that kiln.cli and the sub-command modules (kiln.bench.commands, kiln.recipe.cli)
all import it and none imports another's private helpers (kiln.cli imports the sub-commands to
register them; they must not import kiln.cli back).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from kiln.errors import KilnError

T = TypeVar("T")
Progress = Callable[[str, int, int], None]


def emit_json(data: Any) -> None:
    """`data` on stdout as indented JSON with sorted keys (paths and other objects as strings)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def stderr_console():
    """A rich console on stderr (stdout stays machine-readable)."""
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def progress(enabled: bool) -> Iterator[Progress | None]:
    """A rich progress bar fed by `(stage, done, total)` callbacks from the API (None when disabled
    or when stderr is not a terminal)."""
    console = stderr_console() if enabled else None
    if console is None or not console.is_interactive:
        # No bar when stderr is not a terminal: rich's Progress.stop() would print a blank
        # line there, so a failing export's stderr would not be the single error line.
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=console) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield update


def read_text(path: Path | None, what: str, default: Callable[[], str]) -> str:
    """The text of a --text/--calib file, or `default()` when none was given (one-line error if unreadable)."""
    if path is None:
        return default()
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise KilnError(f"{path}: cannot read {what} ({why})") from None


def options(*decorators: Callable[[T], T]) -> Callable[[T], T]:
    """Options several commands share, declared once (applied in the order listed)."""
    def apply(fn: T) -> T:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply
