"""Known chat-template families: HF Jinja template -> Ollama Go template + stop strings.

Ollama recognises a GGUF's Jinja ``tokenizer.chat_template`` only by fuzzy text
distance against a fixed list, and misses most real ones (Qwen2.5/Qwen3, anything
edited); the model then gets ``{{ .Prompt }}`` and never stops. kiln therefore
writes an explicit ``TEMPLATE`` into the Modelfile. To know *which* template, we do
not compare template source text: we render the HF template the way transformers
does on fixed probe conversations and pick the family whose output is identical
on every probe. Each family carries:

* a Go ``text/template`` for Ollama (the ``.Messages`` form, which Ollama executes
  once over the whole conversation), parameterised where models differ
  (ChatML's default system prompt, Llama-3.1's system preamble, the eos string,
  Qwen3.5's thinking default);
* a Python twin that produces byte-for-byte what Ollama's Go execution of that
  template produces (including Ollama's merging of consecutive same-role
  messages), so the match can be checked at export time without Go;
* the stop strings that end a turn.

The Python twins render from the point of view of Ollama, not of HF: where the
two disagree (HF templates that ``trim`` message content, which Go templates
cannot do) the probes avoid the difference and the match carries a note.

Reasoning models: an Ollama message's ``thinking`` is HF's ``reasoning_content``,
and Ollama's request-level ``think`` (``.Think``/``.IsThinkSet``) is HF's
``enable_thinking`` (unset in both unless the caller sets it). Families that render
a thinking block are also checked on `THINK_PROBES`, which carry both.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, str]
Params = Mapping[str, Any]

# --------------------------------------------------------------------------- HF rendering


class _GenerationTag(Extension):
    """Accept transformers' ``{% generation %}`` block (assistant-mask marker) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_hf_template(jinja_source: str) -> jinja2.Template:
    """Compile a chat template in the same environment transformers uses (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(jinja_source)


def render_hf(template: jinja2.Template, messages: Sequence[Message], bos_token: str | None,
              eos_token: str | None, enable_thinking: bool | None = None) -> str:
    """Render like ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.

    `enable_thinking` is passed only when set: templates test ``enable_thinking is defined``."""
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return template.render(
        messages=[dict(m) for m in messages], add_generation_prompt=True,
        bos_token=bos_token or "", eos_token=eos_token or "", **extra,
    )


def to_hf(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Ollama messages as HF templates read them: ``thinking`` becomes ``reasoning_content``."""
    out = []
    for m in messages:
        d = {k: v for k, v in m.items() if k != "thinking"}
        if "thinking" in m:
            d["reasoning_content"] = m["thinking"]
        out.append(d)
    return out


# --------------------------------------------------------------------------- Ollama semantics


def collate(messages: Sequence[Message]) -> tuple[str, list[dict[str, str]]]:
    """Ollama's pre-processing: ``.System`` is all system contents joined by a blank line, and
    consecutive messages of the same role (except tool) are merged with a blank line (only the
    contents: a merged message keeps the first one's ``thinking``)."""
    systems: list[str] = []
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            systems.append(content)
        if out and out[-1]["role"] == role and role != "tool":
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content, "thinking": m.get("thinking", "")})
    return "\n\n".join(systems), out


def go_is_print(ch: str) -> bool:
    """Go's ``strconv.IsPrint``: what Ollama's Modelfile parser keeps (plus space/tab/newlines)."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def go_text(text: str) -> str:
    """Put literal ``text`` into a Go template so it renders verbatim and survives the Modelfile parser.

    Plain text is emitted as-is; text containing ``{{``, a triple double quote or characters the
    Modelfile parser drops is emitted as a quoted Go string action instead.
    """
    unsafe = "{{" in text or '"""' in text or any(
        not go_is_print(c) and c not in "\n\t" for c in text)
    if not unsafe:
        return text
    parts = []
    for c in text:
        if c == '"':
            parts.append('\\"')
        elif c == "\\":
            parts.append("\\\\")
        elif c == "\n":
            parts.append("\\n")
        elif c == "\t":
            parts.append("\\t")
        elif not go_is_print(c):
            parts.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        else:
            parts.append(c)
    return '{{ "' + "".join(parts) + '" }}'


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """One chat format. ``candidates`` guesses parameters from probe renders of the HF template.

    ``render_body(system, messages, params, think)`` gets Ollama's request-level ``think`` (None:
    not set); ``thinking`` says the family renders reasoning, so matches are also held to `THINK_PROBES`.
    """

    name: str
    go_body: Callable[[Params], str]
    render_body: Callable[[str, list[dict[str, str]], Params, bool | None], str]
    stops: Callable[[Params], tuple[str, ...]]
    candidates: Callable[[Callable[[Sequence[Message]], str], str, str | None], list[dict[str, Any]]]
    note: str = ""
    thinking: bool = False


def _first_is_system(msgs: list[dict[str, str]]) -> bool:
    return bool(msgs) and msgs[0]["role"] == "system"


# ChatML (Qwen 1.5/2/2.5/3, SmolLM2, Hermes, ...) ------------------------------------------
def _chatml_go(p: Params) -> str:
    head = ""
    if p["default_system"] is not None:
        head = ('{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}<|im_start|>system\n'
                + go_text(p["default_system"]) + "<|im_end|>\n{{ end }}")
    return (head + "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
            "{{ end }}<|im_start|>assistant\n")


def _chatml_render(system: str, msgs: list[dict[str, str]], p: Params, think: bool | None) -> str:
    out = ""
    if p["default_system"] is not None and not _first_is_system(msgs):
        out += f"<|im_start|>system\n{p['default_system']}<|im_end|>\n"
    for m in msgs:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def _chatml_candidates(hf: Callable[[Sequence[Message]], str], lead: str, eos: str | None) -> list[dict[str, Any]]:
    out = hf([{"role": "user", "content": "Hi"}])[len(lead):]
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", out, re.S)
    return [{"default_system": m.group(1) if m else None}]


# Llama 3 / 3.1 / 3.2 / 3.3 ----------------------------------------------------------------
_L3_TURN = "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}"
_L3_GEN = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _llama3_go(p: Params) -> str:
    if p["preamble"] is None:
        return "{{- range .Messages }}" + _L3_TURN + _L3_GEN
    return ("<|start_header_id|>system<|end_header_id|>\n\n" + go_text(p["preamble"])
            + '{{ if and .Messages (eq (index .Messages 0).Role "system") }}{{ (index .Messages 0).Content }}'
            "{{ end }}<|eot_id|>\n"
            '{{- range $i, $m := .Messages }}{{ if or $i (ne .Role "system") }}' + _L3_TURN + "{{ end }}" + _L3_GEN)


def _llama3_render(system: str, msgs: list[dict[str, str]], p: Params, think: bool | None) -> str:
    out = ""
    if p["preamble"] is not None:
        sys_text = msgs[0]["content"] if _first_is_system(msgs) else ""
        out += f"<|start_header_id|>system<|end_header_id|>\n\n{p['preamble']}{sys_text}<|eot_id|>"
        msgs = msgs[1:] if _first_is_system(msgs) else msgs
    for m in msgs:
        out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
    return out + _L3_GEN


def _llama3_candidates(hf: Callable[[Sequence[Message]], str], lead: str, eos: str | None) -> list[dict[str, Any]]:
    out = hf([{"role": "user", "content": "Hi"}])[len(lead):]
    m = re.match(r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", out, re.S)
    cands: list[dict[str, Any]] = [{"preamble": None}]
    if m:
        cands.append({"preamble": m.group(1)})
    return cands


# Zephyr -----------------------------------------------------------------------------------
def _zephyr_go(p: Params) -> str:
    return ("{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}" + go_text(p["eos"])
            + "\n{{ end }}<|assistant|>\n")


def _zephyr_render(system: str, msgs: list[dict[str, str]], p: Params, think: bool | None) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}{p['eos']}\n" for m in msgs) + "<|assistant|>\n"


# Mistral [INST] (v0.1/v0.2 style: no system role in HF; Ollama puts .System before the first user turn)
def _mistral_go(p: Params) -> str:
    return ('{{ $sys := .System }}{{ range .Messages }}{{ if eq .Role "user" }}[INST] '
            '{{ if $sys }}{{ $sys }}\n\n{{ $sys = "" }}{{ end }}{{ .Content }} [/INST]'
            '{{ else if eq .Role "assistant" }}{{ .Content }}' + go_text(p["eos"] + p["sep"]) + "{{ end }}{{ end }}")


def _mistral_render(system: str, msgs: list[dict[str, str]], p: Params, think: bool | None) -> str:
    out, sys_left = "", system
    for m in msgs:
        if m["role"] == "user":
            out += "[INST] "
            if sys_left:
                out += sys_left + "\n\n"
                sys_left = ""
            out += m["content"] + " [/INST]"
        elif m["role"] == "assistant":
            out += m["content"] + p["eos"] + p["sep"]
    return out


# Qwen3.5 (ChatML turns, a <think> block on assistant turns after the last user turn, and a generation
# prompt that opens a thinking block (27B and up) or closes an empty one (small ones: 0.8B, 2B, 4B) unless
# enable_thinking says otherwise) -----------------------------------------------------------------
_THINK_OPEN = "<think>\n"
_THINK_SKIP = "<think>\n\n</think>\n\n"


def _qwen35_go(p: Params) -> str:
    default = _THINK_OPEN if p["thinking"] else _THINK_SKIP
    return ('{{ $lastUser := -1 }}{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}{{ $lastUser = $i }}'
            "{{ end }}{{ end }}"
            "{{ range $i, $m := .Messages }}<|im_start|>{{ .Role }}\n"
            '{{ if and (eq .Role "assistant") (gt $i $lastUser) }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}'
            "{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
            "{{ if .IsThinkSet }}{{ if .Think }}" + _THINK_OPEN + "{{ else }}" + _THINK_SKIP + "{{ end }}"
            "{{ else }}" + default + "{{ end }}")


def _qwen35_render(system: str, msgs: list[dict[str, str]], p: Params, think: bool | None) -> str:
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    out = ""
    for i, m in enumerate(msgs):
        out += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant" and i > last_user:
            out += f"<think>\n{m['thinking']}\n</think>\n\n"
        out += f"{m['content']}<|im_end|>\n"
    opened = p["thinking"] if think is None else think
    return out + "<|im_start|>assistant\n" + (_THINK_OPEN if opened else _THINK_SKIP)


def _qwen35_candidates(hf: Callable[[Sequence[Message]], str], lead: str, eos: str | None) -> list[dict[str, Any]]:
    out = hf([{"role": "user", "content": "Hi"}])[len(lead):]
    return [{"thinking": out.endswith(_THINK_OPEN)}] if out.endswith((_THINK_OPEN, _THINK_SKIP)) else []


def _eos_candidates(seps: tuple[str, ...]) -> Callable[..., list[dict[str, Any]]]:
    def cands(hf: Callable[[Sequence[Message]], str], lead: str, eos: str | None) -> list[dict[str, Any]]:
        return [{"eos": eos, "sep": s} for s in seps] if eos else []
    return cands


FAMILIES: tuple[Family, ...] = (
    Family("chatml", _chatml_go, _chatml_render, lambda p: ("<|im_end|>", "<|im_start|>"), _chatml_candidates),
    Family("llama3", _llama3_go, _llama3_render,
           lambda p: ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"), _llama3_candidates,
           note="the HF template trims whitespace around each message; Ollama's Go template cannot"),
    Family("zephyr", _zephyr_go, _zephyr_render,
           lambda p: (p["eos"], "<|user|>", "<|system|>", "<|assistant|>"), _eos_candidates(("",))),
    Family("mistral-instruct", _mistral_go, _mistral_render,
           lambda p: (p["eos"], "[INST]", "[/INST]"), _eos_candidates(("", " ")),
           note="the HF template rejects system messages; Ollama puts the system text before the first user turn"),
    Family("qwen3.5", _qwen35_go, _qwen35_render, lambda p: ("<|im_end|>", "<|im_start|>"), _qwen35_candidates,
           note="the HF template trims whitespace around each message and splits <think>...</think> out of assistant "
                "content; Ollama's Go template does neither (Ollama passes reasoning as a message's thinking)",
           thinking=True),
)


# --------------------------------------------------------------------------- probes and matching

# Conversations end with a user turn (add_generation_prompt=True). Contents carry no
# leading/trailing whitespace: some HF templates trim and Go cannot (see _SOFT_PROBES).
PROBES: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "Hello!"},),
    ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}),
    ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}),
    ({"role": "system", "content": "Rules:\n1. be kind\n\n2. be brief"},
     {"role": "user", "content": "multi\nline\n\ncontent"},
     {"role": "assistant", "content": "Sure:\n- a\n- b"}, {"role": "user", "content": "thanks"}),
    ({"role": "user", "content": "unicode: héllo — 日本語 🙂 ✓ ß Ω"},
     {"role": "assistant", "content": "Ça va? ünïcödé"}, {"role": "user", "content": "ok"}),
    ({"role": "user", "content": 'braces {x} {{ .Content }} {{- end }} {% raw %} "q" \'s\' <b> \\n $'},),
    ({"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"}),
)
_SOFT_PROBES: tuple[tuple[Message, ...], ...] = (
    ({"role": "user", "content": "  padded \n"},),
)
# For families with a thinking block: Ollama-form conversations (``thinking`` = HF's reasoning_content)
# and the request's think / enable_thinking (None: unset). Reasoning shows only after the last user turn.
THINK_PROBES: tuple[tuple[tuple[Message, ...], bool | None], ...] = (
    (({"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "4", "thinking": "Two and two make four."}), None),
    (({"role": "user", "content": "Hi"},), True),
    (({"role": "user", "content": "Hi"},), False),
    (({"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
      {"role": "assistant", "content": "a1", "thinking": "t1"}, {"role": "user", "content": "u2"},
      {"role": "assistant", "content": "a2", "thinking": "t2"}), None),
    (({"role": "user", "content": "u"}, {"role": "assistant", "content": "no reasoning"}), False),
)


@dataclass(frozen=True)
class TemplateMatch:
    """A recognised chat template: family, its recovered parameters, and what Ollama needs."""

    family: str
    params: Mapping[str, Any]
    bos_prefix: str = ""  # text the HF template puts first (the bos token), "" if none
    notes: tuple[str, ...] = field(default=())

    @property
    def _family(self) -> Family:
        return next(f for f in FAMILIES if f.name == self.family)

    @property
    def default_system(self) -> str | None:
        return self.params.get("default_system")

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for s in self._family.stops(self.params) if s))

    def go_template(self, include_bos: bool = True) -> str:
        """The Ollama TEMPLATE. Leave the bos text out when the runtime adds bos itself (add_bos_token)."""
        return (go_text(self.bos_prefix) if include_bos else "") + self._family.go_body(self.params)

    def render(self, messages: Sequence[Message], include_bos: bool = True, think: bool | None = None) -> str:
        """Python twin: exactly what Ollama's Go execution of ``go_template(include_bos)`` produces
        (`think`: the request's think setting, None when unset)."""
        system, msgs = collate(messages)
        return (self.bos_prefix if include_bos else "") + self._family.render_body(system, msgs, self.params, think)


def match_chat_template_with_reason(jinja_source: str, bos_token: str | None,
                                    eos_token: str | None) -> tuple[TemplateMatch | None, str]:
    """Like `match_chat_template`, also saying why nothing matched (for the Modelfile comment)."""
    try:
        tmpl = compile_hf_template(jinja_source)
    except jinja2.TemplateError as exc:
        return None, f"chat template does not compile: {exc}"

    def hf(msgs: Sequence[Message], enable_thinking: bool | None = None) -> str:
        return render_hf(tmpl, to_hf(msgs), bos_token, eos_token, enable_thinking)

    renders: list[tuple[tuple[Message, ...], str]] = []
    for probe in PROBES:
        try:
            renders.append((probe, hf(probe)))
        except Exception:  # raise_exception() or a template bug: that probe cannot be compared
            continue
    if not renders or renders[0][0] is not PROBES[0] or len(renders) < 3:
        return None, "chat template fails on basic conversations"
    leads = [""] + ([bos_token] if bos_token and renders[0][1].startswith(bos_token) else [])
    for fam in FAMILIES:
        for lead in leads:
            try:
                cands = fam.candidates(hf, lead, eos_token)
            except Exception:
                continue
            for params in cands:
                m = TemplateMatch(fam.name, params, lead)
                if all(m.render(probe) == out for probe, out in renders) and (
                        not fam.thinking or _renders_thinking_like_hf(m, hf)):
                    return _with_notes(m, hf, len(renders)), ""
    return None, f"chat template matches no known family ({', '.join(f.name for f in FAMILIES)})"


def _renders_thinking_like_hf(m: TemplateMatch, hf: Callable[..., str]) -> bool:
    """Every THINK_PROBES conversation renders as the HF template does with the same reasoning and setting."""
    try:
        return all(m.render(msgs, think=think) == hf(msgs, think) for msgs, think in THINK_PROBES)
    except Exception:  # the HF template rejects a probe: it is not this family
        return False


def _with_notes(m: TemplateMatch, hf: Callable[[Sequence[Message]], str], n_ok: int) -> TemplateMatch:
    notes = []
    if n_ok < len(PROBES):
        notes.append(f"the HF template rejects {len(PROBES) - n_ok} of {len(PROBES)} probe conversations")
    for probe in _SOFT_PROBES:
        try:
            same = m.render(probe) == hf(probe)
        except Exception:
            same = True
        if not same and m._family.note:
            notes.append(m._family.note)
    if m._family.name == "mistral-instruct" and m._family.note not in notes:
        notes.append(m._family.note)
    today = _strftime_now("%d %b %Y")
    if any(isinstance(v, str) and today in v for v in m.params.values()):
        notes.append(f"the HF template stamps today's date ({today}); the Modelfile freezes it")
    return TemplateMatch(m.family, m.params, m.bos_prefix, tuple(dict.fromkeys(notes)))


def match_chat_template(jinja_source: str, bos_token: str | None, eos_token: str | None) -> TemplateMatch | None:
    """Return the first family whose Python twin renders every probe exactly as the HF template does."""
    return match_chat_template_with_reason(jinja_source, bos_token, eos_token)[0]
