"""The terminal loop of `kiln chat`: read a line, run a slash command or ask the session, print the
answer as it streams. Everything else is kiln.chat.session's.

Line editing and in-session history come from GNU readline (the standard library's `readline`,
which `input()` then uses). Answers go to stdout, notes, status lines and errors to stderr (dimmed
on a colour terminal unless NO_COLOR is set). Ctrl-C during an answer sets a flag the session polls
before each token (or SMC step), so the engine is never interrupted half way through a step; at the
prompt Ctrl-C, like Ctrl-D, ends the chat with exit status 0. Control characters a model writes are
shown as Unicode control pictures, so an answer cannot drive the terminal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kiln.chat.session import ChatOptions, ChatSession, Reply
from kiln.errors import KilnError

PROMPT = ">>> "
MORE = "... "

# C0 controls (but tab and newline), DEL and C1 controls -> a visible stand-in
_SHOWN = {c: chr(0x2400 + c) for c in range(32) if c not in (9, 10)}
_SHOWN.update({0x7F: "\u2421", **{c: "\ufffd" for c in range(0x80, 0xA0)}})


def _dim(text: str) -> str:
    if os.environ.get("NO_COLOR") or not sys.stderr.isatty():
        return text
    return f"\033[2m{text}\033[0m"


def note(text: str) -> None:
    sys.stdout.flush()
    print(_dim(text), file=sys.stderr, flush=True)


def show(text: str) -> None:
    sys.stdout.write(text.translate(_SHOWN))
    sys.stdout.flush()


class _CtrlC:
    """While answering: SIGINT sets a flag instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.flag = threading.Event()

    def __enter__(self) -> _CtrlC:
        self._old = signal.signal(signal.SIGINT, lambda *_: self.flag.set())
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._old)


class _StepLine:
    """A live SMC status line on an interactive stderr (at most ~10 updates a second), erased after."""

    def __init__(self, particles: int) -> None:
        self.particles = particles
        self.live = sys.stderr.isatty()
        self.shown = False
        self._last = 0.0

    def __call__(self, info: Any) -> None:
        now = time.monotonic()
        if not self.live or now - self._last < 0.1:
            return
        self._last = now
        line = f"SMC step {info.step} · live {info.live}/{self.particles} · ESS {info.ess:.1f}"
        sys.stderr.write(f"\r\033[K{_dim(line)}")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def read_message() -> str:
    """One line, or (a first line starting with \"\"\") the lines up to one ending with \"\"\"."""
    tty = sys.stdin.isatty()  # piped input (a script of messages) gets no prompts in the output
    line = input(PROMPT if tty else "")
    if not line.lstrip().startswith('"""'):
        return line
    text = line.lstrip()[3:]
    lines = [text]
    while not (lines[-1].rstrip().endswith('"""') and (len(lines) > 1 or lines[-1].strip() != "")):
        lines.append(input(MORE if tty else ""))
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines).strip("\n")


def _status(session: ChatSession, reply: Reply) -> str | None:
    if reply.smc is not None:
        s = reply.smc
        log_z = "—" if s["log_z"] is None else f"{s['log_z']:.2f}"
        capped = f" · at most {s['max_tokens']} tokens each" if s["max_tokens"] < session.options.max_tokens else ""
        return (f"[SMC · {s['particles']} particles · ESS {s['ess']:.1f} · log Z {log_z} · "
                f"{s['distinct']} distinct · {s['seconds']:.2f} s{capped}]")
    if reply.stopped == "interrupted":
        return "[interrupted: the partial answer stays in the conversation]"
    if reply.stopped == "length":
        return f"[stopped at {session.options.max_tokens} tokens (--max-tokens)]"
    return None


def answer(session: ChatSession, text: str) -> None:
    """Ask and show: the answer streams to stdout, then a status line where there is something to say."""
    constrained = session.constraint is not None
    steps = _StepLine(session.particles)
    wrote = [False]

    def on_text(piece: str) -> None:
        steps.clear()
        wrote[0] = True
        show(piece)

    with _CtrlC() as ctrl_c:
        try:
            reply = session.ask(text, on_text=on_text, stop=ctrl_c.flag.is_set, on_step=steps, on_note=note)
        except KilnError as exc:
            steps.clear()
            if wrote[0]:
                show("\n")
            note(f"error: {exc}")
            return
        finally:
            steps.clear()
    if constrained and reply.stopped == "interrupted":
        note("[interrupted: no answer was drawn; the message is not kept]")
        return
    show("\n")
    status = _status(session, reply)
    if status:
        note(status)


def run_chat(artifact: str | Path, options: ChatOptions) -> None:
    """`kiln chat`: open the artifact, then read messages and commands until /exit, Ctrl-D or Ctrl-C."""
    try:
        import readline  # noqa: F401 - gives input() line editing and history
    except ImportError:  # a Python built without it: plain input()
        pass
    path = Path(artifact)
    with ChatSession(path, options) as session:
        system = " · system message set" if session.history.system else ""
        note(f"kiln chat · {path.name} · context {session.ctx}{system} · /help for commands, /exit or Ctrl-D "
             "to leave")
        for line in session.notes:
            note(f"note: {line}")
        while True:
            try:
                text = read_message()
            except (EOFError, KeyboardInterrupt):
                if sys.stdin.isatty():
                    show("\n")  # the shell's prompt starts on a line of its own
                return
            if not text.strip():
                continue
            if text.startswith("/"):
                try:
                    outcome = session.command(text)
                except KilnError as exc:
                    note(f"error: {exc}")
                    continue
                for line in outcome.lines:
                    note(line)
                if outcome.exit:
                    return
                continue
            answer(session, text)
