"""One chat with one artifact: what `kiln chat` runs, callable without a terminal.

`ChatSession(artifact, ChatOptions(...))` opens the artifact's engine (kiln.formats) and keeps the
conversation (`History`). `ask(text)` answers one user message:

* the prompt is the history rendered with the artifact's own chat template (`chat_prompt`),
  the oldest turns leaving the context when it and `max_tokens` for the answer would not fit;
* plain answers are decoded on engine sequence 0, which keeps its KV cache between turns: when the
  new prompt extends what the sequence holds (the last prompt and the answer as generated), only the
  new part is decoded; otherwise (a trimmed history, a changed system message, a constrained turn
  before) the sequence starts again through the engine's prompt cache (`prefill_prompt`), which
  still reuses the longest cached prefix. Tokens stream to `on_text` as they come; `stop()` is polled
  before each token and ends the answer there (kept in the history, marked interrupted);
* with a constraint set (`set_regex`, `set_json_schema`) the answer is sampled exactly by SMC
  (`kiln.runtime.smc`: the model's distribution restricted to the constraint) with `particles`
  particles, and the reply carries the posterior's effective sample size and log Ẑ.

`command(line)` runs a slash command (/system, /regex, /json-schema, /particles, /reset, /save,
/help, /exit) and returns the lines to show; the terminal loop (kiln.chat.terminal) only reads,
prints and turns Ctrl-C into `stop()`.
"""

from __future__ import annotations

import codecs
import math
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.chat.history import History, Turn, save_transcript
from kiln.errors import KilnError
from kiln.formats import require_format
from kiln.runtime.engine import Engine, longest_prefix_match
from kiln.runtime.generate import chat_prompt
from kiln.runtime.sampling import pick

MAX_PARTICLES = 64  # engine sequences a GGUF chat holds (llama.cpp's one KV pool: cheap to have)
DEFAULT_PARTICLES = 8
DEFAULT_MAX_TOKENS = 256


@dataclass
class ChatOptions:
    system: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS  # per answer; also kept free in the context for it
    temperature: float | None = None  # None: greedy for plain answers, 1 for constrained (SMC) ones
    seed: int | None = None
    ctx: int | None = None  # the context the conversation lives in (default: the engine's)
    threads: int | None = None
    thinking: bool | None = None  # a reasoning template's enable_thinking (None: the template's default)
    particles: int = DEFAULT_PARTICLES

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise KilnError(f"--max-tokens {self.max_tokens}: must be positive")
        if self.temperature is not None and not self.temperature >= 0:  # NaN too
            raise KilnError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if self.ctx is not None and self.ctx < 1:
            raise KilnError(f"--ctx {self.ctx}: must be positive")
        if self.threads is not None and self.threads < 1:
            raise KilnError(f"--threads {self.threads}: must be positive")
        check_particles(self.particles)


def check_particles(n: int) -> None:
    if not 1 <= n <= MAX_PARTICLES:
        raise KilnError(f"{n} particles: choose 1 to {MAX_PARTICLES}")


@dataclass
class Reply:
    text: str
    tokens: int  # tokens generated (plain) or in the drawn answer (SMC)
    stopped: str  # "eog" (the model ended it), "length" (max tokens), "interrupted" (stop())
    prompt_tokens: int
    reused: int  # prompt tokens whose KV was already held (the last turn's sequence or the prompt cache)
    dropped: int  # oldest turns that left the context to make room for this one
    smc: dict[str, Any] | None = None  # a constrained answer's report (ess, log_z, particles, ...)


@dataclass
class Outcome:
    """What a slash command did: lines to show, and whether the chat ends."""

    lines: list[str] = field(default_factory=list)
    exit: bool = False


class _Stopped(Exception):
    """stop() said so between SMC steps."""


HELP = """\
/system TEXT       set the system message (/system alone: remove it)
/regex RE          constrain the next answers to match RE entirely, sampled exactly by SMC (/regex alone: off)
/json-schema FILE  constrain the next answers to compact JSON valid for the schema in FILE (alone: off)
/particles N       SMC particles for constrained answers (now {particles})
/reset             forget the conversation (the system message and constraint stay)
/save FILE         write the conversation as JSON (replaces only a file kiln chat saved)
/help              this list
/exit              leave (also /bye, Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C during an answer stops it; the part written stays in the conversation, marked interrupted.
A message that starts with \"\"\" continues over several lines until a line that ends with \"\"\"."""


class ChatSession:
    def __init__(self, artifact: str | Path, options: ChatOptions | None = None) -> None:
        self.options = options = options or ChatOptions()
        options.validate()
        self.path = Path(artifact)
        self.format = require_format(self.path)
        self.notes: list[str] = []  # said once at the start (the terminal prints them)
        self.particles = options.particles
        trained = int(self.format.inspect(self.path).get("context_length") or 0)
        self.ctx = options.ctx or min(trained or 4096, 4096)
        self._check_room()
        # llama.cpp's one KV pool: the conversation, plus room for the SMC particles' tails; engines with a
        # row per sequence get their SMC rows when a constrained answer first needs them (_ensure_rows)
        shared = self.format.shared_kv_pool
        self._cells = self.ctx + (self.particles * options.max_tokens if shared else 0)
        self.engine: Engine = self._open(MAX_PARTICLES if shared else 1)
        try:
            if not self.engine.chat_template:
                raise KilnError(f"{self.path}: this artifact has no chat template; kiln chat needs one "
                                "(kiln generate runs plain prompts)")
            self.ctx = min(self.ctx, self.engine.n_ctx)  # an engine that caps it (ONNX: the trained context)
            self._check_room()
            if trained and self.ctx > trained:
                self.notes.append(f"the context of {self.ctx} is longer than the {trained} positions this model "
                                  "was trained on: answers may degrade past them")
        except BaseException:
            self.engine.close()
            raise
        self.history = History(system=options.system or None)
        self.constraint: tuple[str, str] | None = None  # ("regex", pattern) or ("json-schema", path)
        self._potential: Any = None
        self._vocab: Any = None
        self._held: list[int] | None = None  # tokens engine sequence 0 holds (None: nothing kept)
        self._rng = np.random.default_rng(options.seed)

    def _check_room(self) -> None:
        if self.options.max_tokens >= self.ctx:
            raise KilnError(f"--max-tokens {self.options.max_tokens} leaves no room for the conversation in the "
                            f"context of {self.ctx} (--ctx)")

    # --- engine ---------------------------------------------------------------------------------
    def _open(self, rows: int) -> Engine:
        return self.format.open_engine(self.path, n_ctx=self._cells, n_seq_max=rows, threads=self.options.threads)

    def _ensure_rows(self, n: int) -> None:
        """An engine with a row per sequence (ONNX) is reopened with `n` rows the first time SMC needs them."""
        if self.engine.n_seq_max >= n:
            return
        engine = self._open(n)  # first: if it cannot be opened, the chat goes on with the old one
        self.engine.close()
        self.engine, self._held = engine, None
        if self._vocab is not None:  # tied to the old engine's tokenizer
            self._vocab = None
            kind, arg = self.constraint or ("", "")
            self._potential = None
            if kind:
                self._potential = self._build(kind, arg)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- settings ---------------------------------------------------------------------------------
    def set_system(self, text: str | None) -> None:
        self.history.system = text or None

    def _build(self, kind: str, arg: str) -> Any:
        from kiln.runtime.potentials.base import Vocab
        from kiln.runtime.potentials.grammar import structure

        if self._vocab is None:
            self._vocab = Vocab.from_engine(self.engine)
        if kind == "regex":
            return structure(self._vocab, "regex", arg)
        return structure(self._vocab, "json", Path(arg).expanduser(), compact=True)  # as kiln serve writes it

    def set_regex(self, pattern: str | None) -> None:
        """Constrain the next answers to match `pattern` entirely (None: no constraint). A pattern
        llguidance rejects is a KilnError and leaves the constraint as it was."""
        self._set_constraint("regex", pattern)

    def set_json_schema(self, path: str | Path | None) -> None:
        """Constrain the next answers to JSON valid for the schema in the file `path` (None: no constraint)."""
        self._set_constraint("json-schema", None if path is None else str(path))

    def _set_constraint(self, kind: str, arg: str | None) -> None:
        if arg is None:
            self.constraint, self._potential = None, None
            return
        self._potential = self._build(kind, arg)
        self.constraint = (kind, arg)

    def set_particles(self, n: int) -> None:
        check_particles(n)
        self.particles = n

    def reset(self) -> None:
        """Forget the conversation (system message, constraint and options stay)."""
        self.history.reset()

    def transcript(self) -> dict[str, Any]:
        opts = {k: v for k, v in asdict(self.options).items() if k not in ("system", "threads")}
        opts.update(ctx=self.ctx, particles=self.particles)
        return self.history.transcript(artifact=str(self.path), options=opts)

    def save(self, path: str | Path) -> Path:
        return save_transcript(self.transcript(), path)

    # --- answering -------------------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt(self.engine, messages, self.options.thinking)

    def ask(self, text: str, on_text: Callable[[str], None] | None = None, stop: Callable[[], bool] | None = None,
            on_step: Callable[[Any], None] | None = None,
            on_note: Callable[[str], None] | None = None) -> Reply:
        """Answer the user's message `text` (module docstring). `on_text` gets the answer as it is written,
        `on_step` each SMC step's StepInfo (constrained answers), `on_note` a line about the context
        (oldest turns dropped). A KilnError (the message does not fit, no particle finished) leaves the
        conversation as it was, but for turns already dropped to make room."""
        if not text.strip():
            raise KilnError("empty message")
        stop = stop or (lambda: False)
        tokens, dropped = self.history.fit(text, self._render, self.ctx, self.options.max_tokens)
        if dropped and on_note is not None:
            kept = len(self.history.live())
            gone = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            on_note(f"the context of {self.ctx} is full: {gone} left it ({_turns(kept)} kept)")
        if self._potential is not None:
            return self._ask_smc(text, tokens, dropped, on_text, stop, on_step)
        return self._ask_plain(text, tokens, dropped, on_text, stop)

    def _prefill(self, tokens: list[int]) -> tuple[np.ndarray, int]:
        """Logits after the prompt on sequence 0, and how many prompt tokens were already held."""
        engine, held = self.engine, self._held
        self._held = None  # until the prompt is in: an error half way leaves nothing to trust
        cached = getattr(engine, "cached_prompts", None)
        cached = list(cached()) if callable(cached) else []
        if held and len(held) < len(tokens) and tokens[:len(held)] == held:
            # cached prompts may hold cells of their own in llama.cpp's one pool: at worst all of them
            if engine.shared_kv_pool and sum(map(len, cached)) + len(tokens) + self.options.max_tokens > engine.n_ctx:
                engine.clear_prompt_cache()
            logits = engine.prefill(tokens[len(held):], seq=0)
            reused = len(held)
        else:
            engine.reset()
            _, reused = longest_prefix_match(enumerate(cached), tokens)
            logits = engine.prefill_prompt(tokens, seq=0, reserve=self.options.max_tokens)
        self._held = list(tokens)
        return logits, reused

    def _ask_plain(self, text: str, tokens: list[int], dropped: int, on_text: Callable[[str], None] | None,
                   stop: Callable[[], bool]) -> Reply:
        engine, max_tokens = self.engine, self.options.max_tokens
        temperature = self.options.temperature or 0.0
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out: list[int] = []
        stopped = "length"
        try:
            logits, reused = self._prefill(tokens)
            for i in range(max_tokens):
                if stop():
                    stopped = "interrupted"
                    break
                tok = pick(logits, temperature, 1.0, self._rng)
                if tok in engine.eog_ids:
                    stopped = "eog"
                    break
                out.append(tok)
                if on_text is not None:
                    piece = decoder.decode(engine.token_bytes(tok))
                    if piece:
                        on_text(piece)
                if i == max_tokens - 1:
                    break
                logits = engine.step([tok], [0])[0]
                self._held.append(tok)
        except BaseException:
            self._held = None
            engine.reset()
            raise
        tail = decoder.decode(b"", final=True)
        if tail and on_text is not None:
            on_text(tail)
        answer = b"".join(engine.token_bytes(t) for t in out).decode("utf-8", errors="replace")
        self.history.turns.append(Turn(text, answer, interrupted=stopped == "interrupted"))
        return Reply(answer, len(out), stopped, len(tokens), reused, dropped)

    def _ask_smc(self, text: str, tokens: list[int], dropped: int, on_text: Callable[[str], None] | None,
                 stop: Callable[[], bool], on_step: Callable[[Any], None] | None) -> Reply:
        from kiln.runtime.smc import smc

        n = self.particles
        self._ensure_rows(n)
        engine = self.engine
        room = engine.n_ctx - len(tokens)
        if engine.shared_kv_pool:
            room //= n  # llama.cpp: the prompt once, then every particle's own tail in one pool
        max_tokens = min(self.options.max_tokens, room)
        if max_tokens < 1:
            raise KilnError(f"no room for {n} particles after a {len(tokens)}-token prompt in the KV cache of "
                            f"{engine.n_ctx} cells: lower /particles, or raise --ctx")
        cached = getattr(engine, "cached_prompts", None)
        _, reused = longest_prefix_match(enumerate(cached()), tokens) if callable(cached) else (None, 0)

        def step(info: Any) -> None:
            if stop():
                raise _Stopped
            if on_step is not None:
                on_step(info)

        self._held = None  # smc owns every sequence while it runs and resets the engine after
        seed = None if self.options.seed is None else int(self._rng.integers(2**31))
        try:
            result = smc(engine, tokens, n, proposal=[self._potential], max_tokens=max_tokens,
                         temperature=self.options.temperature or 1.0, seed=seed, on_step=step)
        except _Stopped:
            return Reply("", 0, "interrupted", len(tokens), reused, dropped)
        done = [p for p in result.particles if p.finished and p.log_weight > -math.inf]
        if not done:
            why = " or the time" if result.timed_out else ""
            raise KilnError(f"no particle finished: all {n} were ruled out by the constraint within {max_tokens} "
                            f"tokens{why} (raise --max-tokens or /particles, or loosen the constraint)")
        pick = result.sample(self._rng)
        report = {"particles": n, "ess": round(_ess([p.log_weight for p in done]), 3),
                  "log_z": round(result.log_ml, 4) if math.isfinite(result.log_ml) else None,
                  "distinct": len(result.posterior), "steps": result.steps,
                  "resamples": len(result.resample_steps), "max_tokens": max_tokens,
                  "seconds": round(result.wall_time, 3)}
        if on_text is not None and pick.text:
            on_text(pick.text)
        kind, arg = self.constraint or ("", "")
        self.history.turns.append(Turn(text, pick.text, info={"constraint": {kind: arg}, "smc": report}))
        return Reply(pick.text, len(pick.tokens), "eog", len(tokens), reused, dropped, smc=report)

    # --- slash commands ----------------------------------------------------------------------------
    def command(self, line: str) -> Outcome:
        """Run one slash command line; a KilnError is the command's one-line complaint."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/exit", "/bye", "/quit"):
            return Outcome(exit=True)
        if name in ("/help", "/?"):
            return Outcome(HELP.format(particles=self.particles).splitlines())
        if name == "/system":
            self.set_system(arg or None)
            return Outcome(["system message set (from the next answer)" if arg else "system message removed"])
        if name == "/regex":
            self.set_regex(arg or None)
            return Outcome([f"answers must match {arg} ({self.particles} particles)" if arg else "constraint off"])
        if name == "/json-schema":
            path = _one_path(arg, "/json-schema FILE") if arg else None
            self.set_json_schema(path)
            return Outcome([f"answers must be JSON valid for {path} ({self.particles} particles)" if path
                            else "constraint off"])
        if name == "/particles":
            try:
                n = int(arg)
            except ValueError:
                raise KilnError(f"/particles needs a number, e.g. /particles 16 (now {self.particles})") from None
            self.set_particles(n)
            return Outcome([f"{n} particles for constrained answers"])
        if name == "/reset":
            self.reset()
            return Outcome(["conversation cleared"])
        if name == "/save":
            if not arg:
                raise KilnError("/save needs a file name, e.g. /save chat.json")
            dest = self.save(_one_path(arg, "/save FILE"))
            return Outcome([f"saved {_turns(len(self.history.turns))} to {dest}"])
        raise KilnError(f"unknown command {name}: /help lists the commands")


def _one_path(arg: str, usage: str) -> str:
    """A file argument: as typed, or one shell-quoted word (for names with spaces)."""
    if arg[:1] in "\"'":
        try:
            words = shlex.split(arg)
        except ValueError as exc:
            raise KilnError(f"{usage}: {exc}") from None
        if len(words) != 1:
            raise KilnError(f"{usage}: one file name, please")
        return words[0]
    return arg


def _turns(n: int) -> str:
    return f"{n} turn" if n == 1 else f"{n} turns"


def _ess(log_weights: list[float]) -> float:
    """Effective sample size of the finished particles' normalized weights (1 / Σ w²)."""
    lw = np.asarray(log_weights, np.float64)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    return float(1.0 / np.sum(w * w))
