"""Write an Ollama Modelfile next to an exported GGUF, from the GGUF's own metadata.

Why: Ollama often fails to recognise a GGUF's Jinja chat template (it compares
template *text* with a fixed list) and then falls back to ``{{ .Prompt }}`` with no
stop tokens: the model rambles and never ends its turn. kiln recognises the
template by *rendering* it (see `kiln.export.chat_templates`) and writes:

* ``FROM ./<file>.gguf`` (relative to the Modelfile, so the pair can be moved together);
* ``TEMPLATE`` - an Ollama Go template whose rendering of a conversation equals the
  HF template's (``add_generation_prompt=True``), checked at export time;
* ``PARAMETER stop`` - the family's end-of-turn strings plus the GGUF's eos/eot/eom
  tokens, each only if it is a token of the vocabulary;
* ``PARAMETER num_ctx`` - the context Ollama allocates: ``num_ctx`` when given (``kiln modelfile``
  chooses it for the machine from kiln plan's cost model, or takes ``--num-ctx``), capped at the
  GGUF's ``{arch}.context_length`` (which already includes any baked RoPE scaling; Ollama clamps
  num_ctx to it anyway); without one, that full context;
* ``LICENSE`` - the text of a LICENSE file beside the GGUF, else ``general.license``.

What an Ollama user should know:

* Ollama allocates the KV cache for ``num_ctx`` up front: the full context of a 32k-128k model
  costs more memory than most machines hold, which is why ``kiln modelfile`` sizes it for the
  machine (``--num-ctx`` sets it; ``options.num_ctx`` changes it per request). It cannot be raised
  above context_length.
* The template covers plain chat (system/user/assistant). Tool calls, images and
  "thinking" fields are not rendered; Qwen2.5/Qwen3 tool-use prompts differ from HF.
* A default system prompt baked into the HF template (Qwen2.5's "You are Qwen...",
  SmolLM2's) is kept in TEMPLATE and applies only when the conversation has no system
  message, as in transformers. ``SYSTEM`` in a derived Modelfile replaces it.
* When the GGUF says ``tokenizer.ggml.add_bos_token = true`` the runtime adds bos
  itself, so the template leaves the bos text (e.g. ``<|begin_of_text|>``) out.
* Llama-3 HF templates ``trim`` each message; Go templates cannot, so messages with
  leading/trailing whitespace are sent untrimmed. Llama-3.2's template stamps today's
  date into its system block; the Modelfile freezes the export date.
* If no known family matches, the Modelfile has no TEMPLATE (a comment says why).
  Ollama >= 0.30 then uses the GGUF's own Jinja template through llama-server, older
  versions fall back to ``{{ .Prompt }}``: add a TEMPLATE by hand for those.
* Characters Ollama's Modelfile parser would drop (control characters, non-ASCII
  spaces) are removed from LICENSE text, and a triple double quote anywhere in
  TEMPLATE or LICENSE is refused, since the Modelfile format cannot escape it.
"""

from __future__ import annotations

import logging
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from kiln.atomic import atomic_file
from kiln.errors import KilnError
from kiln.export.chat_templates import go_is_print, match_chat_template_with_reason
from kiln.outputs import MODELFILE_HEADER, check_output, may_replace

log = logging.getLogger(__name__)
_LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


@dataclass(frozen=True)
class ModelfileResult:
    """The Modelfile text and the warnings a user should see (unmatched template, skipped stops)."""

    text: str
    warnings: list[str] = field(default_factory=list)


class _Meta:
    """Lazy view of a GGUF's key/values (kiln.gguf_header): decoding every field (merges!) would cost seconds."""

    def __init__(self, path: pathlib.Path) -> None:
        from kiln.gguf_header import open_gguf  # deferred: importing gguf is slow and only this path needs it

        self.path = path
        if not path.is_file():
            raise KilnError(f"{path}: GGUF file not found")
        self._gguf = open_gguf(path)

    def __contains__(self, key: str) -> bool:
        return key in self._gguf

    def __getitem__(self, key: str) -> Any:
        if key not in self._gguf:
            raise KeyError(key)
        return self._gguf.get(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self._gguf.get(key, default)


def _require(meta: _Meta, path: pathlib.Path, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in meta:
        raise KilnError(f"{path}: missing GGUF key {key}")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise KilnError(f"{path}: GGUF key {key} has an unexpected type ({type(value).__name__})")
    return value


def _token(meta: _Meta, path: pathlib.Path, tokens: list[str], key: str) -> str | None:
    if key not in meta:
        return None
    tid = meta[key]
    if not isinstance(tid, int) or not 0 <= tid < len(tokens):
        raise KilnError(f"{path}: GGUF key {key} = {tid!r} is not a token id (vocabulary has {len(tokens)})")
    return tokens[tid]


def _triple_quoted(what: str, text: str, path: pathlib.Path) -> str:
    if '"""' in text:
        raise KilnError(f"{path}: {what} contains a triple double quote, which a Modelfile cannot hold")
    return f'"""{text}"""'


def _license_text(meta: _Meta, gguf_path: pathlib.Path) -> str | None:
    for name in _LICENSE_FILES:
        f = gguf_path.parent / name
        if f.is_file():
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise KilnError(f"cannot read {f}: {exc.strerror}") from None
            break
    else:
        parts = [meta.get(k) for k in ("general.license", "general.license.name", "general.license.link")]
        text = "\n".join(str(p) for p in parts if isinstance(p, str) and p.strip())
    # Keep what Ollama's parser keeps (it silently drops other non-printable runes).
    text = "".join(c for c in text if go_is_print(c) or c in "\n\t").strip()
    return text or None


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def render_modelfile(gguf_path: str | os.PathLike[str], from_ref: str | None = None,
                     num_ctx: int | None = None) -> ModelfileResult:
    """Build the Modelfile text for ``gguf_path``; ``from_ref`` overrides the ``FROM`` target, ``num_ctx`` the
    context (default: the GGUF's full context; one above it is capped there, with a warning)."""
    path = pathlib.Path(gguf_path)
    meta = _Meta(path)
    warnings: list[str] = []

    arch = _require(meta, path, "general.architecture", str)
    tokens = _require(meta, path, "tokenizer.ggml.tokens", list)
    ctx = _require(meta, path, f"{arch}.context_length", int)
    vocab = set(tokens)
    bos = _token(meta, path, tokens, "tokenizer.ggml.bos_token_id")
    eos = _token(meta, path, tokens, "tokenizer.ggml.eos_token_id")
    eot = _token(meta, path, tokens, "tokenizer.ggml.eot_token_id")
    eom = _token(meta, path, tokens, "tokenizer.ggml.eom_token_id")

    ref = from_ref if from_ref is not None else f"./{path.name}"
    if not ref.strip() or any(c in ref for c in "\r\n"):
        raise KilnError(f"{path}: cannot write FROM {ref!r} in a Modelfile")
    name = _one_line(meta.get("general.name") or path.stem)
    lines = [f"{MODELFILE_HEADER} for {name}", f"FROM {ref}"]

    family_stops: tuple[str, ...] = ()
    jinja = meta.get("tokenizer.chat_template")
    if not isinstance(jinja, str) or not jinja.strip():
        why = "the GGUF has no tokenizer.chat_template"
        match = None
    else:
        match, why = match_chat_template_with_reason(jinja, bos, eos)
    if match is None:
        warnings.append(f"{path.name}: no TEMPLATE written: {why}")
        lines.insert(1, f"# No TEMPLATE: {_one_line(why)}. Ollama will use its default; add one by hand if needed.")
    else:
        include_bos = meta.get("tokenizer.ggml.add_bos_token") is not True
        desc = match.family + (" + default system prompt" if match.default_system is not None else "")
        lines.append(f"# TEMPLATE: {desc}; checked against the GGUF's Jinja chat template")
        lines.extend(f"# note: {_one_line(n)}" for n in match.notes)
        lines.append("TEMPLATE " + _triple_quoted("the TEMPLATE", match.go_template(include_bos), path))
        family_stops = match.stops

    stops: list[str] = []
    for s in dict.fromkeys([*family_stops, *(t for t in (eos, eot, eom) if t)]):
        if s not in vocab:
            continue
        if not all(go_is_print(c) for c in s):
            warnings.append(f"{path.name}: stop token {s!r} skipped: a Modelfile cannot hold it")
            continue
        stops.append(s)
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    if num_ctx is not None:
        if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx < 1:
            raise KilnError(f"num_ctx {num_ctx!r}: must be a positive number of tokens")
        if num_ctx > ctx:
            warnings.append(f"{path.name}: num_ctx {num_ctx} capped at the model's context of {ctx}")
        ctx = min(num_ctx, ctx)
    lines.append(f"PARAMETER num_ctx {ctx}")

    lic = _license_text(meta, path)
    if lic is not None:
        lines.append("LICENSE " + _triple_quoted("the LICENSE text", lic, path))
    return ModelfileResult("\n".join(lines) + "\n", warnings)


def write_modelfile(gguf_path: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None,
                    force: bool = False, num_ctx: int | None = None) -> pathlib.Path:
    """Write the Modelfile (default ``<gguf dir>/Modelfile``) atomically and return its path.

    ``FROM`` is made relative to the Modelfile's directory; ``num_ctx`` as in `render_modelfile`. Warnings go
    to the ``logging``
    module; call `render_modelfile` to get them as data. An existing file there that kiln did not
    write is kept (KilnError) unless `force`.
    """
    gguf_path = pathlib.Path(gguf_path)
    dest = check_output(pathlib.Path(out_path) if out_path is not None else gguf_path.parent / "Modelfile",
                        "modelfile", force=force, sources=(gguf_path,))
    try:
        rel = os.path.relpath(gguf_path.resolve(), dest.resolve().parent)
        ref = rel if rel.startswith("..") or os.path.isabs(rel) else f"./{rel}"
    except ValueError:  # different drives on Windows
        ref = str(gguf_path.resolve())
    result = render_modelfile(gguf_path, from_ref=ref.replace(os.sep, "/"), num_ctx=num_ctx)
    for w in result.warnings:
        log.warning("%s", w)
    with atomic_file(dest, may_replace("modelfile", force)) as tmp:
        tmp.write_text(result.text, encoding="utf-8")
    return dest
