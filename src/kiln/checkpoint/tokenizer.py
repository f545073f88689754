"""Read a Hugging Face byte-level BPE tokenizer into the form GGUF stores.

llama.cpp re-implements pre-tokenization from a *name*, so the name must be derived
from the tokenizer's actual structure (one table below), and the vocabulary must be
complete for byte-level BPE: llama.cpp aborts the whole process on a byte it cannot
map (DESIGN.md §3), so we refuse such vocabularies here instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.bytelevel import describe, essential_missing, missing_bytes
from kiln.checkpoint.spec import TokenizerSpec
from kiln.errors import KilnError

# gguf.TokenType values (kept literal so this module does not need gguf).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

_QWEN2 = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CASE_INSENSITIVE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CASE_EXPANDED = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# Split regex (as in tokenizer.json, either spelling of the contraction group) -> llama.cpp pre name.
SPLIT_PRE_NAMES: dict[str, str] = {
    _QWEN2: "qwen2",
    _QWEN2.replace(_CASE_EXPANDED, _CASE_INSENSITIVE): "qwen2",
    _LLAMA3: "llama-bpe",
    _LLAMA3.replace(_CASE_EXPANDED, _CASE_INSENSITIVE): "llama-bpe",
}

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _pre_name(pre: dict[str, Any] | None, path: Path) -> str:
    if pre is None:
        raise KilnError(f"{path}: tokenizer has no pre_tokenizer; only byte-level BPE tokenizers are supported")
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if kind == "Sequence":
        parts = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            pattern = parts[0].get("pattern", {})
            regex = pattern.get("Regex") or pattern.get("String")
            if regex in SPLIT_PRE_NAMES:
                return SPLIT_PRE_NAMES[regex]
            raise KilnError(f"{path}: pre-tokenizer regex is not one llama.cpp knows: {regex!r}")
    raise KilnError(f"{path}: unsupported pre_tokenizer structure {json.dumps(pre)[:120]}")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(directory: Path, vocab_size: int) -> TokenizerSpec:
    path = directory / "tokenizer.json"
    if not path.exists():
        raise KilnError(f"{directory}: tokenizer.json is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KilnError(f"{path}: not valid JSON ({exc})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise KilnError(f"{path}: model type {model.get('type')!r} is not supported (byte-level BPE only)")
    vocab: dict[str, int] = model.get("vocab") or {}
    pre = _pre_name(data.get("pre_tokenizer"), path)

    added = {tok["id"]: tok for tok in data.get("added_tokens", [])}
    size = max([vocab_size, *(i + 1 for i in vocab.values()), *(i + 1 for i in added)])
    if size > vocab_size:
        raise KilnError(f"{path}: tokenizer has {size} ids but config.json vocab_size is {vocab_size}")
    tokens: list[str | None] = [None] * size
    types = [NORMAL] * size
    for text, idx in vocab.items():
        tokens[idx] = text
    for idx, tok in added.items():
        tokens[idx] = tok["content"]
        types[idx] = CONTROL if tok.get("special") else USER_DEFINED
    for idx, text in enumerate(tokens):
        if text is None:  # a hole below vocab_size: llama.cpp expects a placeholder
            tokens[idx] = f"[PAD{idx}]"
            types[idx] = UNUSED
    missing = missing_bytes(vocab)
    essential = essential_missing(missing)
    if essential:
        raise KilnError(f"{path}: byte-level vocabulary lacks byte tokens for {describe(essential)}; "
                        "llama.cpp would abort on ordinary text")

    merges = []
    token_set = set(vocab)
    for merge in model.get("merges", []):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        if a not in token_set or b not in token_set or a + b not in token_set:
            raise KilnError(f"{path}: merge {a!r} + {b!r} refers to a token missing from the vocabulary")
        merges.append(f"{a} {b}")

    cfg_path = directory / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise KilnError(f"{cfg_path}: not valid JSON ({exc})") from None
    ids = {text: i for i, text in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        text = _token_text(cfg.get(key))
        if text is None:
            return None
        if text not in ids:
            raise KilnError(f"{cfg_path}: {key} {text!r} is not in the vocabulary")
        return ids[text]

    template = cfg.get("chat_template")
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eot = next((ids[t] for t in END_OF_TURN if t in ids and types[ids[t]] == CONTROL), None)
    return TokenizerSpec(
        tokens=tokens,  # type: ignore[arg-type]
        token_types=types,
        merges=merges,
        pre=pre,
        bos_id=special_id("bos_token"),
        eos_id=special_id("eos_token"),
        pad_id=special_id("pad_token"),
        unk_id=special_id("unk_token"),
        eot_id=eot,
        add_bos=bool(cfg.get("add_bos_token", False)),
        add_eos=bool(cfg.get("add_eos_token", False)),
        chat_template=template,
        source=path,
        unrepresentable_bytes=tuple(sorted(missing)),
    )
