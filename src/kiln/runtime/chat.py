"""Render a conversation with the artifact's own chat template, as transformers does.

Runs the Jinja template in jinja2's immutable sandbox (the template comes from a
model file: it must not reach Python objects), with the variables HF templates expect.
Reasoning models' templates (Qwen3, Qwen3.5) read `enable_thinking` only when it is
defined, so it is passed only when the caller sets it: unset, the template's own
default holds (small Qwen3.5 models such as 0.8B answer without thinking, 27B and up think first).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kiln.errors import KilnError


def render_chat(template: str, messages: Sequence[dict[str, str]], bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, enable_thinking: bool | None = None) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    try:
        return env.from_string(template).render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.exceptions.TemplateError as exc:
        raise KilnError(f"chat template failed: {exc}") from None
