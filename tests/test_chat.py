"""`kiln chat`: the real program in a real terminal (tmux: the test types with send-keys and reads the
screen with capture-pane), on the tiny Qwen2 GGUF (ChatML template, random weights: answers are
noise, but their mechanics are not); and kiln.chat's logic called directly (history trimming at a
tiny context, the KV kept between turns, /save's rules).

Threads=1 throughout: llama.cpp spins badly with 2 threads on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from kiln.chat import ChatOptions, ChatSession, History, Turn
from kiln.errors import KilnError
from kiln_cli import KILN, kiln, one_line_error

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


# --- the logic, called directly ------------------------------------------------------------------
def _chars(messages):
    """A real (if simple) tokenizer for History.fit: one token per character of the contents."""
    return [ord(c) for m in messages for c in m["content"]]


def test_fit_drops_the_oldest_turns_until_the_prompt_and_answer_fit():
    h = History(system="S" * 10, turns=[Turn("u" * 20, "a" * 20) for _ in range(3)])
    tokens, dropped = h.fit("q" * 5, _chars, ctx=200, reserve=50)  # 10 + 3·40 + 5 = 135 <= 150
    assert (len(tokens), dropped) == (135, 0) and not any(t.dropped for t in h.turns)
    tokens, dropped = h.fit("q" * 5, _chars, ctx=120, reserve=30)  # budget 90: two turns must go
    assert (len(tokens), dropped) == (55, 2)
    assert [t.dropped for t in h.turns] == [True, True, False]
    assert h.messages()[0] == {"role": "system", "content": "S" * 10}  # the system message always stays
    # dropped turns stay out (the window only moves forward) but stay in the transcript, marked
    assert len(h.messages()) == 3
    saved = h.transcript()["messages"]
    assert [m.get("dropped", False) for m in saved] == [False, True, True, True, True, False, False]


def test_fit_refuses_a_message_that_cannot_fit_even_alone():
    h = History(turns=[Turn("u", "a")])
    with pytest.raises(KilnError) as exc:
        h.fit("q" * 100, _chars, ctx=64, reserve=16)
    assert "\n" not in str(exc.value) and "context of 64" in str(exc.value)
    assert not h.turns[0].dropped  # nothing changed


@pytest.fixture
def session(tiny_qwen2_f32_gguf: Path):
    with ChatSession(tiny_qwen2_f32_gguf, ChatOptions(ctx=160, max_tokens=16, temperature=0, threads=1)) as s:
        yield s


def test_history_is_trimmed_at_a_tiny_context(session: ChatSession):
    notes: list[str] = []
    replies = [session.ask(f"message number {i}", on_note=notes.append) for i in range(8)]
    assert all(r.prompt_tokens + 16 <= 160 for r in replies)
    assert sum(r.dropped for r in replies) >= 3 and len(notes) == sum(1 for r in replies if r.dropped)
    assert all("oldest" in n and "context of 160" in n for n in notes)
    live = session.history.live()
    assert live and live[-1].user == "message number 7"
    assert [t.user for t in session.history.turns] == [f"message number {i}" for i in range(8)]
    # the prompt holds exactly the live turns: the first user message in it is the oldest live one
    first_user = next(m for m in session.history.messages() if m["role"] == "user")
    assert first_user["content"] == live[0].user


def test_each_turn_reuses_the_kv_of_the_last(session: ChatSession):
    chunks: list[str] = []
    first = session.ask("hello", on_text=chunks.append)
    assert first.stopped in ("eog", "length") and "".join(chunks) == first.text and first.tokens > 0
    second = session.ask("and again")
    # the first prompt (and, where the answer re-tokenizes as generated, the answer too) is not decoded again
    assert second.reused >= first.prompt_tokens and second.prompt_tokens > second.reused


def test_stop_keeps_the_partial_answer_marked(session: ChatSession):
    seen: list[str] = []
    reply = session.ask("hello", on_text=seen.append, stop=lambda: len(seen) >= 3)
    assert reply.stopped == "interrupted" and reply.tokens == 3
    turn = session.history.turns[-1]
    assert turn.interrupted and turn.assistant == reply.text
    assert session.transcript()["messages"][-1]["interrupted"] is True


def test_json_schema_answers_are_sampled_by_smc(session: ChatSession, tmp_path: Path):
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA))
    session.command(f"/json-schema {schema}")
    reply = session.ask("yes or no?")
    assert json.loads(reply.text)["answer"] in ("yes", "no")
    assert reply.smc is not None and 1.0 <= reply.smc["ess"] <= 8.0 and reply.smc["particles"] == 8
    assert session.command("/json-schema").lines == ["constraint off"] and session.constraint is None


def test_commands_complain_in_one_line(session: ChatSession):
    for line, needle in [("/frobnicate", "/help"), ("/particles many", "/particles 16"),
                         ("/particles 0", "1 to 64"), ("/regex (", "bad regex"), ("/save", "file name"),
                         ("/json-schema /no/such.json", "no such JSON schema file")]:
        with pytest.raises(KilnError) as exc:
            session.command(line)
        assert needle in str(exc.value) and "\n" not in str(exc.value), line
    assert session.constraint is None and session.particles == 8  # nothing changed
    assert session.command("/bye").exit and session.command("/exit").exit


def test_save_replaces_only_its_own_files_and_never_half_writes(session: ChatSession, tmp_path: Path):
    session.set_system("Be brief.")
    session.ask("hello")
    mine = tmp_path / "chat.json"
    session.save(mine)
    data = json.loads(mine.read_text())
    assert data["kind"] == "chat" and data["turns"] == 1 and data["messages"][0]["content"] == "Be brief."
    session.reset()
    session.save(mine)  # a conversation kiln chat saved may be replaced
    assert json.loads(mine.read_text())["turns"] == 0
    theirs = tmp_path / "notes.json"
    theirs.write_text('{"mine": true}\n')
    with pytest.raises(KilnError, match="not a conversation kiln chat saved"):
        session.command(f"/save {theirs}")
    assert theirs.read_text() == '{"mine": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "notes.json"]  # no temporary left


def test_bad_options_and_paths_are_one_line_errors(tiny_qwen2_f32_gguf: Path, tmp_path: Path):
    one_line_error(kiln("chat", tmp_path / "nothing.gguf"), "nothing.gguf")
    one_line_error(kiln("chat", tiny_qwen2_f32_gguf, "--max-tokens", "600"), "--max-tokens 600", "context of 512")
    one_line_error(kiln("chat", tiny_qwen2_f32_gguf, "--particles", "0"), "1 to 64")


def test_piped_messages_answer_in_order(tiny_qwen2_f32_gguf: Path, tmp_path: Path):
    """Without a terminal kiln chat reads messages and commands line by line (no prompts in the output)."""
    env = dict(os.environ, NO_COLOR="1")
    proc = subprocess.run([KILN, "chat", str(tiny_qwen2_f32_gguf), "--threads", "1", "--max-tokens", "8",
                           "--temperature", "0"], input="/regex (yes|no)\nIs it?\n/save piped.json\n",
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() in (["yes"], ["no"]) and "saved 1 turn to piped.json" in proc.stderr
    assert json.loads((tmp_path / "piped.json").read_text())["messages"][1]["content"] == proc.stdout.strip()


# --- the program in a terminal -------------------------------------------------------------------
class Terminal:
    """`kiln chat ...` in a detached tmux session on a private server: keys in, screen out."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self._dir = tempfile.mkdtemp(prefix="kiln-tmux-")  # a private server, its socket removed after
        self.sock = os.path.join(self._dir, "sock")
        cmd = " ".join(shlex.quote(a) for a in ["env", "NO_COLOR=1", KILN, "chat", *map(str, args)])
        cmd += '; echo "[kiln chat exited: $?]"'
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", "chat", "-x", "160", "-y", "50", "-c", str(cwd),
                   cmd, ";", "set-option", "-g", "remain-on-exit", "on", ";",
                   "set-option", "-g", "history-limit", "20000")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.sock, *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def type(self, text: str, enter: bool = True) -> None:
        self._tmux("send-keys", "-t", "chat", "-l", text)
        if enter:
            self._tmux("send-keys", "-t", "chat", "Enter")

    def key(self, name: str) -> None:
        self._tmux("send-keys", "-t", "chat", name)

    def screen(self) -> list[str]:
        """Every line so far (scrollback included, wrapped lines joined), trailing blanks removed."""
        lines = [ln.rstrip() for ln in self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def wait(self, done, what: str, timeout: float = 60) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if done(lines):
                return lines
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n" + "\n".join(lines[-30:]))
            time.sleep(0.1)

    def prompts(self) -> int:
        return sum(1 for ln in self.screen() if ln.startswith(">>>"))

    def ask(self, text: str) -> list[str]:
        """Type a line and wait for the next prompt; the lines written in between."""
        n = self.prompts()
        self.type(text)
        lines = self.wait(lambda s: sum(1 for ln in s if ln.startswith(">>>")) > n and s[-1] == ">>>",
                          f"the prompt after {text!r}")
        start = max(i for i, ln in enumerate(lines) if ln == f">>> {text}")
        return lines[start + 1:-1]

    def exit_status(self, timeout: float = 30) -> int:
        """kiln chat's exit status, as the shell around it writes it on the screen."""
        lines = self.wait(lambda s: any(ln.startswith("[kiln chat exited: ") for ln in s), "kiln chat to exit",
                          timeout)
        return int(next(ln for ln in lines if ln.startswith("[kiln chat exited: "))[19:-1])

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=30)
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def terminal(tmp_path: Path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux): the terminal tests drive kiln chat through it")
    opened: list[Terminal] = []

    def start(*args: str | Path) -> Terminal:
        t = Terminal([str(a) for a in args], tmp_path)
        opened.append(t)
        t.wait(lambda s: bool(s) and s[-1] == ">>>", "kiln chat's first prompt")
        return t

    yield start
    for t in opened:
        t.close()


def test_chat_in_a_terminal(terminal, tiny_qwen2_f32_gguf: Path, tmp_path: Path):
    t = terminal(tiny_qwen2_f32_gguf, "--threads", "1", "--max-tokens", "24", "--temperature", "0")
    banner = t.screen()[0]
    assert banner.startswith("kiln chat · tq2.f32.gguf · context 512")

    out = t.ask("Hello, who are you?")  # a plain turn: the answer, then why it stopped
    assert out[-1] == "[stopped at 24 tokens (--max-tokens)]" and "".join(out[:-1]).strip()

    assert t.ask("/system You answer in one word.") == ["system message set (from the next answer)"]
    assert t.ask("/regex (yes|no)") == ["answers must match (yes|no) (8 particles)"]
    out = t.ask("Is the sky blue?")
    assert re.fullmatch("yes|no", out[0]), out
    status = r"\[SMC · 8 particles · ESS \d+\.\d · log Z -?\d+\.\d\d · [12] distinct · .*\]"
    assert re.fullmatch(status, out[1]), out

    assert t.ask("/frobnicate") == ["error: unknown command /frobnicate: /help lists the commands"]
    assert t.ask("/save chat.json") == ["saved 2 turns to chat.json"]
    data = json.loads((tmp_path / "chat.json").read_text())
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert data["system"] == "You answer in one word." and data["messages"][3]["content"] == "Is the sky blue?"
    assert data["messages"][4]["content"] == out[0] and data["messages"][4]["constraint"] == {"regex": "(yes|no)"}
    assert 1.0 <= data["messages"][4]["smc"]["ess"] <= 8.0

    assert t.ask("/reset") == ["conversation cleared"]
    assert t.ask("/save chat.json") == ["saved 0 turns to chat.json"]  # its own file: replaced
    assert json.loads((tmp_path / "chat.json").read_text())["messages"] == [
        {"role": "system", "content": "You answer in one word."}]
    t.type("/exit")
    assert t.exit_status() == 0


def test_ctrl_c_stops_the_answer_not_the_chat(terminal, tiny_qwen2_f32_gguf: Path, tmp_path: Path):
    # a context beyond the 512 positions the model was trained on: room for an answer that takes a while
    t = terminal(tiny_qwen2_f32_gguf, "--threads", "1", "--ctx", "16384", "--max-tokens", "16000",
                 "--temperature", "0")
    assert any("longer than the 512 positions" in ln for ln in t.screen())
    t.type("Tell me a long story.")
    # streamed: text is on the screen while the answer is still being written (no prompt yet)
    def streaming(s: list[str]) -> bool:
        asked = [i for i, ln in enumerate(s) if ln == ">>> Tell me a long story."]
        return bool(asked) and len("".join(s[asked[0] + 1:])) > 200

    lines = t.wait(streaming, "the answer to stream")
    assert lines[-1] != ">>>"
    t.key("C-c")
    lines = t.wait(lambda s: s[-1] == ">>>", "the prompt after Ctrl-C")
    assert lines[-2] == "[interrupted: the partial answer stays in the conversation]"
    assert t.ask("/save story.json") == ["saved 1 turn to story.json"]
    answer = json.loads((tmp_path / "story.json").read_text())["messages"][-1]
    assert answer["role"] == "assistant" and answer["interrupted"] is True and len(answer["content"]) > 100
    t.key("C-c")  # at the prompt: a clean exit
    assert t.exit_status() == 0
