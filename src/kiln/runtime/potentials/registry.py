"""`from_spec`: potentials by name, for the CLI's `--potential NAME:ARGS`.

=================================  ================================================================
spec                               potential
=================================  ================================================================
``regex:PATTERN``                  `Regex` (the whole text matches PATTERN; everything after the
                                   first colon is the pattern)
``json:FILE`` / ``json:{...}``     `JsonSchema` from a schema file or inline JSON
``lark:FILE``                      `LarkGrammar` from a .lark file
``stop:STR[,STR...]``              `StopSequences` (hard); ``\\n``, ``\\t``, ``\\,`` and ``\\\\`` are
                                   escapes
``sentence[:penalty=X]``           `SentenceEnd` (hard, or soft with a log penalty X)
``length:max=N``                   `Length`, hard; keys ``min``, ``max``, ``unit`` (tokens, chars,
``length:min=A,max=B,unit=words``  words); ``target=T`` or ``penalty=X`` or ``hard=false`` make it
``length:target=T[,penalty=X]``    soft (complete = −X · distance to [min, max])
``style:NAME[:STRENGTH]``          `Lexicon.style` (formal, conversational, technical)
``lexicon:FILE[:STRENGTH]``        `Lexicon.from_file` (.json {word: weight} / [words], or text
                                   lines ``word [weight]``)
``critic:ARTIFACT[:BETA]``         `ReferenceCritic` under another exported model (.gguf or ONNX
                                   dir, same vocabulary), opened with the caller's `open_engine`;
                                   the sampler calls `set_prompt`
``python:MODULE:FUNCTION``         `FromCallable(complete=FUNCTION)`: FUNCTION(text) -> log score
                                   or bool, judged on the finished text only
=================================  ================================================================
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, Vocab

if TYPE_CHECKING:
    from kiln.runtime.engine import Engine

# Opens an artifact as an engine: called as open_engine(path, **engine_options), e.g. kiln.runtime.load.
# Passed in by the caller (the steering API) so potentials never import the runtime package itself.
EngineOpener = Callable[..., "Engine"]

NAMES = ("regex", "json", "lark", "stop", "sentence", "length", "style", "lexicon", "critic", "python")


def _split_escaped(text: str, sep: str = ",") -> list[str]:
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", sep: sep}
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in escapes:
            cur.append(escapes[text[i + 1]])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _keyvals(spec: str, args: str, allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise KilnError(f"potential {spec!r}: expected key=value, got {item!r}")
        if key not in allowed:
            raise KilnError(f"potential {spec!r}: unknown key {key!r} (known: {', '.join(allowed)})")
        out[key] = value.strip()
    return out


def _number(spec: str, key: str, value: str, kind: Callable[[str], Any] = float):
    try:
        return kind(value)
    except ValueError:
        raise KilnError(f"potential {spec!r}: {key} must be {'an integer' if kind is int else 'a number'}, "
                        f"got {value!r}") from None


def _bool(spec: str, key: str, value: str) -> bool:
    low = value.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise KilnError(f"potential {spec!r}: {key} must be true or false, got {value!r}")


def _with_strength(spec: str, args: str) -> tuple[str, float]:
    """'THING[:STRENGTH]' where THING may itself contain colons."""
    head, sep, tail = args.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return args, 1.0


def from_spec(vocab: Vocab, spec: str, *, engine_options: dict[str, Any] | None = None,
              open_engine: EngineOpener | None = None) -> Potential:
    """Build a potential from `NAME[:ARGS]` (table in the module docstring).

    `critic:` needs another model: it is opened with `open_engine(path, **engine_options)` (e.g.
    `kiln.runtime.load` with n_ctx, n_seq_max, threads), which the caller supplies because this
    layer opens no artifact itself; without one a `critic:` spec is refused."""
    if not isinstance(spec, str) or not spec.strip():
        raise KilnError("empty potential spec (expected NAME:ARGS, e.g. regex:[0-9]+)")
    name, _, args = spec.partition(":")
    name = name.strip().lower()
    if name not in NAMES:
        raise KilnError(f"unknown potential {name!r} in {spec!r} (known: {', '.join(NAMES)})")
    needs_args = name not in ("sentence",)
    if needs_args and not args:
        raise KilnError(f"potential {spec!r}: {name} needs arguments ({name}:...)")

    if name in ("regex", "json", "lark"):
        from kiln.runtime.potentials.grammar import structure

        if name == "lark" and not Path(args).is_file():  # a spec names a grammar file, never inline text
            raise KilnError(f"{Path(args)}: no such Lark grammar file")
        return structure(vocab, name, Path(args).read_text(encoding="utf-8") if name == "lark" else args)
    if name == "stop":
        from kiln.runtime.potentials.text import StopSequences

        return StopSequences(vocab, _split_escaped(args))
    if name == "sentence":
        from kiln.runtime.potentials.text import SentenceEnd

        kv = _keyvals(spec, args, ("penalty",))
        return SentenceEnd(vocab, _number(spec, "penalty", kv["penalty"]) if "penalty" in kv else math.inf)
    if name == "length":
        from kiln.runtime.potentials.length import Length

        kv = _keyvals(spec, args, ("min", "max", "target", "unit", "penalty", "hard"))
        ints = {k: _number(spec, k, kv[k], int) for k in ("min", "max", "target") if k in kv}
        soft = "target" in kv or "penalty" in kv
        hard = _bool(spec, "hard", kv["hard"]) if "hard" in kv else not soft
        penalty = _number(spec, "penalty", kv["penalty"]) if "penalty" in kv else 1.0
        return Length(vocab, unit=kv.get("unit", "tokens"), hard=hard, penalty=penalty, **ints)
    if name == "style":
        from kiln.runtime.potentials.lexicon import Lexicon

        style, strength = _with_strength(spec, args)
        return Lexicon.style(vocab, style, strength)
    if name == "lexicon":
        from kiln.runtime.potentials.lexicon import Lexicon

        path, strength = _with_strength(spec, args)
        return Lexicon.from_file(vocab, path, strength)
    if name == "critic":
        from kiln.runtime.potentials.critic import ReferenceCritic

        if open_engine is None:
            raise KilnError(f"potential {spec!r}: a critic needs an engine opener "
                            "(from_spec(..., open_engine=kiln.runtime.load))")
        path, beta = _with_strength(spec, args)
        options = {"n_seq_max": 33, **(engine_options or {})}
        return ReferenceCritic(vocab, open_engine(Path(path), **options), beta=beta)
    # python:MODULE:FUNCTION
    from kiln.runtime.potentials.callable import FromCallable

    module, sep, func = args.rpartition(":")
    if not sep or not module or not func:
        raise KilnError(f"potential {spec!r}: expected python:MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module), func)
    except ImportError as exc:
        raise KilnError(f"potential {spec!r}: cannot import {module} ({exc})") from None
    except AttributeError:
        raise KilnError(f"potential {spec!r}: {module} has no {func}") from None
    if not callable(fn):
        raise KilnError(f"potential {spec!r}: {module}.{func} is not callable")
    return FromCallable(vocab, complete=fn, name=f"{module}.{func}")
