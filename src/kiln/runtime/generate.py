"""Plain generation on any engine: greedy or sampled, stopping at end-of-generation tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.chat import render_chat
from kiln.runtime.engine import Engine


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    stopped: str  # "eog" or "length"


def chat_prompt(engine: Engine, messages: Sequence[dict[str, str]]) -> list[int]:
    """Tokens of a chat prompt rendered with the artifact's template (bos handled once)."""
    if not engine.chat_template:
        raise KilnError("this artifact has no chat template; use a plain prompt")
    bos = engine.detokenize([engine.bos_id]) if engine.bos_id is not None else ""
    text = render_chat(engine.chat_template, messages, bos_token=bos)
    if engine.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]  # the tokenizer adds it
    return engine.tokenize(text, add_special=True, parse_special=True)


def generate(engine: Engine, prompt: Sequence[int], max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None, on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy (temperature 0) or sampled decoding of up to `max_tokens` after `prompt`.

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
    logits = engine.prefill_prompt(prompt, seq=0, reserve=max_tokens)
    out: list[int] = []
    stopped = "length"
    for _ in range(max_tokens):
        if temperature <= 0:
            tok = int(np.argmax(logits))
        else:
            z = logits.astype(np.float64) / temperature
            p = np.exp(z - z.max())
            tok = int(rng.choice(len(p), p=p / p.sum()))
        if tok in engine.eog_ids:
            stopped = "eog"
            break
        out.append(tok)
        if on_token:
            on_token(tok)
        logits = engine.step([tok], [0])[0]
    return Generation(engine.detokenize(out), out, len(prompt), stopped)
