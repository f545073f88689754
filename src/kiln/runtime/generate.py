"""Plain generation on any engine: greedy or sampled, stopping at end-of-generation tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.formats import require_format
from kiln.runtime.chat import render_chat
from kiln.runtime.engine import Engine
from kiln.runtime.sampling import pick


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    stopped: str  # "eog" or "length"

    def to_json(self) -> dict[str, Any]:
        """What `kiln generate --json` prints for one prompt."""
        return asdict(self)


def chat_prompt(engine: Engine, messages: Sequence[dict[str, str]], thinking: bool | None = None) -> list[int]:
    """Tokens of a chat prompt rendered with the artifact's template (bos handled once). `thinking` sets a
    reasoning template's `enable_thinking` (Qwen3, Qwen3.5); None leaves the template's own default."""
    if not engine.chat_template:
        raise KilnError("this artifact has no chat template; use a plain prompt")
    bos = engine.detokenize([engine.bos_id]) if engine.bos_id is not None else ""
    text = render_chat(engine.chat_template, messages, bos_token=bos, enable_thinking=thinking)
    if engine.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]  # the tokenizer adds it
    return engine.tokenize(text, add_special=True, parse_special=True)


def prompt_ids(engine: Engine, prompt: str, *, chat: bool = False, system: str | None = None,
               thinking: bool | None = None) -> list[int]:
    """Token ids of a prompt: the text as is, or (chat) a user message, after an optional system
    message, rendered with the artifact's own chat template."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return chat_prompt(engine, messages, thinking)
    return engine.tokenize(prompt)


def generate(engine: Engine, prompt: Sequence[int], max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None, on_token: Callable[[int], None] | None = None,
             on_prefill: Callable[[Any], None] | None = None) -> Generation:
    """Greedy (temperature 0) or sampled decoding of up to `max_tokens` after `prompt`. `on_prefill` gets a
    `kiln.runtime.document.PrefillInfo` after each slice of a long prompt's prefill (tokens, tokens/s, ETA).

    Refused before any work: a negative (or NaN) temperature, which would otherwise decode greedily
    without a word, and a prompt plus `max_tokens` that cannot fit the engine's context (rather than
    failing halfway through the answer)."""
    if not temperature >= 0:
        raise KilnError(f"temperature {float(temperature)}: must be >= 0 (0 = greedy)")
    if len(prompt) + max_tokens > engine.n_ctx:
        raise KilnError(f"prompt of {len(prompt)} tokens (+ {max_tokens} to generate) exceeds "
                        f"{engine.context_text()}")
    rng = np.random.default_rng(seed)
    engine.reset()
    if on_prefill is not None:
        from kiln.runtime.document import prefill

        logits = prefill(engine, prompt, seq=0, progress=on_prefill, reserve=max_tokens)
    else:
        logits = engine.prefill_prompt(prompt, seq=0, reserve=max_tokens)
    out: list[int] = []
    stopped = "length"
    for _ in range(max_tokens):
        tok = pick(logits, temperature, 1.0, rng)  # the one sampling rule (kiln.runtime.sampling), as kiln serve
        if tok in engine.eog_ids:
            stopped = "eog"
            break
        out.append(tok)
        if on_token:
            on_token(tok)
        logits = engine.step([tok], [0])[0]
    return Generation(engine.detokenize(out), out, len(prompt), stopped)


SMALL_CONTEXT = 4096  # up to this many cells an engine is sized from the prompt's byte bound, without tokenizing first


def generate_prompts(artifact: str | Path, prompts: Sequence[str], *, chat: bool = False, system: str | None = None,
                     thinking: bool | None = None, max_tokens: int = 128, temperature: float = 0.0, seed: int | None = None,
                     threads: int | None = None, n_ctx: int | None = None,
                     on_prompt: Callable[[int], None] | None = None,
                     on_token: Callable[[int, str], None] | None = None,
                     on_prefill: Callable[[Any], None] | None = None,
                     memory_check: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Plain generation (greedy, or sampled at `temperature`) for each prompt in turn with one engine:
    what `kiln generate` does without SMC. Returns one `Generation.to_json()` per prompt.

    The artifact is opened with the context the prompts need: the longest prompt's tokens + `max_tokens`
    (from its byte count when that is small; otherwise the prompts are tokenized first with a small engine),
    within the artifact's window; `n_ctx` overrides it. `memory_check(n_ctx, n_seq_max)` runs before the
    context is allocated (it raises a one-line KilnError when the machine cannot hold it; kiln's CLI builds one
    from the cost model of `kiln plan`). Every prompt uses the same `seed`. `on_prompt(i)` is called before
    prompt i is tokenized, `on_token(i, text)` with each generated token's text as it comes (a streaming
    display), `on_prefill(PrefillInfo)` during a long prompt's prefill."""
    from kiln.runtime.steering import prompt_bound

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    path = Path(artifact)
    fmt = require_format(path)
    ids: list[list[int]] | None = None
    sized = not n_ctx
    if not n_ctx:
        n_ctx = max((prompt_bound(p, chat, system) for p in prompts), default=0) + max_tokens
        if n_ctx > SMALL_CONTEXT:  # tokenize first: the byte bound may overstate a long prompt several times
            with fmt.open_engine(path, n_ctx=256, threads=threads) as small:
                ids = [prompt_ids(small, p, chat=chat, system=system, thinking=thinking) for p in prompts]
                window = small.context_length
            n_ctx = max(len(x) for x in ids) + max_tokens
            if n_ctx > window:
                raise KilnError(f"prompt of {n_ctx - max_tokens} tokens (+ {max_tokens} to generate) exceeds the "
                                f"artifact's context of {window}")
    if memory_check is not None:
        memory_check(n_ctx, 1)
    outs = []
    with fmt.open_engine(path, n_ctx=n_ctx, threads=threads) as engine:
        for i, prompt in enumerate(prompts):
            if on_prompt is not None:
                on_prompt(i)
            tokens = ids[i] if ids is not None else prompt_ids(engine, prompt, chat=chat, system=system,
                                                                 thinking=thinking)
            if sized and len(tokens) + max_tokens > engine.context_length:  # sized past the window from a bound
                raise KilnError(f"prompt of {len(tokens)} tokens (+ {max_tokens} to generate) exceeds the "
                                f"artifact's context of {engine.context_length}")
            stream = None if on_token is None else (lambda t, i=i: on_token(i, engine.detokenize([t])))
            outs.append(generate(engine, tokens, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                 on_token=stream, on_prefill=on_prefill).to_json())
    return outs
