"""A conversation and the part of it that fits the context.

A `History` is the system message plus the turns (a user message and the answer to it). The
prompt of the next answer is the system message, the turns still in the context and the new user
message, rendered with the artifact's chat template; when that prompt and the room kept for the
answer exceed the context, the oldest turns leave the context (`fit`), for good: they stay in the
transcript (`/save`, marked `dropped`) but the window only moves forward, so the prompt cache
keeps matching what the engine holds.

`transcript()` is what `/save` writes: OpenAI-style messages with kiln's marks on them, and the
keys (`kind: "chat"`, `kiln_version`) by which `is_saved_chat` recognises a file kiln may replace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

TRANSCRIPT_KIND = "chat"


@dataclass
class Turn:
    user: str
    assistant: str = ""
    interrupted: bool = False  # Ctrl-C stopped the answer: `assistant` is the part written until then
    dropped: bool = False  # left the context to make room (kept in the transcript only)
    info: dict[str, Any] = field(default_factory=dict)  # a constrained answer: constraint and SMC report

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.user}, {"role": "assistant", "content": self.assistant}]


@dataclass
class History:
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def live(self) -> list[Turn]:
        """The turns still in the context, oldest first."""
        return [t for t in self.turns if not t.dropped]

    def messages(self, user: str | None = None, skip: int = 0) -> list[dict[str, str]]:
        """Chat-template messages: the system message, the live turns but the `skip` oldest, then `user`."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.live()[skip:]:
            out.extend(turn.messages())
        if user is not None:
            out.append({"role": "user", "content": user})
        return out

    def fit(self, user: str, render: Callable[[list[dict[str, str]]], Sequence[int]], ctx: int,
            reserve: int) -> tuple[list[int], int]:
        """Tokens of the prompt for `user`'s message after the live turns, and how many of the oldest
        live turns had to leave the context (they are marked dropped) so that the prompt plus `reserve`
        tokens for the answer fit `ctx`. `render(messages)` is the prompt's tokens. A message that does
        not fit even alone (after the system message) is a KilnError and changes nothing."""
        live = self.live()
        budget = ctx - reserve
        tokens: list[int] = []
        for skip in range(len(live) + 1):
            tokens = list(render(self.messages(user, skip)))
            if len(tokens) <= budget:
                for turn in live[:skip]:
                    turn.dropped = True
                return tokens, skip
        alone = "this message" + (" and the system message" if self.system else "")
        raise KilnError(f"{alone} take {len(tokens)} tokens: with {reserve} kept for the answer (--max-tokens) "
                        f"that exceeds the context of {ctx} (--ctx)")

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.turns.clear()

    def transcript(self, **extra: Any) -> dict[str, Any]:
        """The conversation as JSON: `extra` (artifact, options), the system message and every message,
        with `interrupted`, `dropped` and a constrained answer's `constraint` / `smc` marks."""
        from kiln import __version__

        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            user, answer = turn.messages()
            marks: dict[str, Any] = {"dropped": True} if turn.dropped else {}
            messages.append({**user, **marks})
            answer = {**answer, **marks, **turn.info}
            if turn.interrupted:
                answer["interrupted"] = True
            messages.append(answer)
        return {"kind": TRANSCRIPT_KIND, "kiln_version": __version__, **extra, "system": self.system,
                "turns": len(self.turns), "messages": messages}


def is_saved_chat(path: Path) -> bool:
    """True when `path` is a conversation `kiln chat` saved (the only kind of file /save replaces)."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == TRANSCRIPT_KIND and "kiln_version" in data


def save_transcript(data: dict[str, Any], path: str | Path) -> Path:
    """Write `data` to `path` atomically (a temporary file renamed into place: never half a file). An
    existing file is replaced only when it is a conversation kiln chat saved."""
    from kiln.atomic import atomic_file

    dest = Path(path).expanduser()
    if dest.is_dir():
        raise KilnError(f"{dest}: is a directory; name a file to save the conversation in")
    if (dest.exists() or dest.is_symlink()) and not is_saved_chat(dest):
        raise KilnError(f"{dest}: exists and is not a conversation kiln chat saved; choose another name")
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    with atomic_file(dest, may_replace=is_saved_chat) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return dest
