"""Read a Hugging Face byte-level BPE tokenizer into the form GGUF stores.

llama.cpp re-implements pre-tokenization from a *name*, so the name must be derived
from the tokenizer's actual structure (one table below), and the vocabulary must be
complete for byte-level BPE: llama.cpp aborts the whole process on a byte it cannot
map (DESIGN.md §3), so we refuse such vocabularies here instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.bytelevel import describe, essential_missing, missing_bytes
from kiln.checkpoint.spec import TokenizerSpec
from kiln.errors import KilnError
from kiln.jsonfile import read_json_object

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
        return "gpt-2"  # GPT-2's own regex: llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2, spelt with a hyphen
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


# The special-token types gguf-py's SpecialVocab looks for, in its order (`cls` has no GGUF key: never written).
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


@dataclass
class SpecialTokens:
    ids: dict[str, int] = field(default_factory=dict)  # type -> token id (bos, eos, ..., eot, eom)
    add: dict[str, bool] = field(default_factory=dict)  # type -> add it when tokenizing, per the post-processor


def _special_of(entry: dict[str, Any]) -> str | None:
    return (entry.get("SpecialToken") or {}).get("id")


def special_tokens(data: dict[str, Any], cfg: dict[str, Any], config: dict[str, Any], tokens: list[str | None],
                   cfg_path: Path) -> SpecialTokens:
    """Special token ids and add-flags decided the way llama.cpp's converter decides them.

    Why: a GGUF without `tokenizer.ggml.bos_token_id` makes llama.cpp assume its own default (token 11
    for BPE), so kiln must write every id the converter writes, with the same value. This follows
    gguf-py's `SpecialVocab` (gguf/vocab.py as bundled with llama-cpp-python 0.3.36): texts from
    tokenizer_config.json, matched against tokenizer.json's added tokens; then config.json's
    `{type}_token_id` for the types still unset (real Qwen2/2.5/3 checkpoints have `"bos_token": null`
    but a `bos_token_id`); the post-processor decides the add-flags and may name bos/eos/sep itself.
    kiln differs only where gguf-py would write something llama.cpp cannot use: a text that names no
    added token but a base-vocabulary token still gets that id when config.json names none (gguf-py
    leaves the key out), a text in no vocabulary at all is refused, and ids outside the vocabulary are
    skipped (llama.cpp ignores them with a warning).
    """
    n_vocab = len(tokens)
    cfg = dict(cfg)  # the fallbacks below write into it, as SpecialVocab does into its copy
    types = list(SPECIAL_TYPES)
    out = SpecialTokens()
    bos, cls, eos, sep = (_token_text(cfg.get(f"{t}_token")) for t in ("bos", "cls", "eos", "sep"))
    if cfg:
        if not bos and cls:
            cfg["bos_token"] = bos = cls
        if not eos and sep:
            cfg["eos_token"] = eos = sep
    post = data.get("post_processor") or {}
    for proc in post.get("processors", [post]) if post else []:
        kind = proc.get("type")
        if kind == "ByteLevel":
            out.add.setdefault("bos", False)
            out.add.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            out.add.update(bos=True, eos=True, sep=True)
            if not cls and cfg:
                cfg["cls_token"] = cls = proc.get("cls", [bos])[0]
            if not sep and cfg:
                cfg["sep_token"] = sep = proc.get("sep", [eos])[0]
        elif kind == "TemplateProcessing":
            single, pair = proc.get("single", []), proc.get("pair", [])
            first = last = None
            if len(single) > 1:
                if first := _special_of(single[0]):
                    if not cfg:
                        bos = first
                    elif first not in (bos, cls):
                        if not bos:
                            cfg["bos_token"] = bos = first
                        if not cls:
                            cfg["cls_token"] = cls = first
                    out.add["bos"] = first in (bos, cls)
                if last := _special_of(single[-1]):
                    if not cfg:
                        eos = last
                    elif last != eos:  # the template ends with another token: that is the EOS, the old one EOT
                        for extra in ("eot", "eom"):
                            if extra not in types:
                                types.append(extra)
                                cfg[f"{extra}_token"] = eos
                                break
                        cfg["eos_token"] = eos = last
                    out.add["eos"] = last == eos
            if pair:
                start = 1 if first and _special_of(pair[0]) == first else 0
                stop = -1 if last and _special_of(pair[-1]) == last else None
                pair = pair[start:stop]
                if pair and (pair[0].get("Sequence") or {}).get("id") == "A" \
                        and (pair[-1].get("Sequence") or {}).get("id") == "B" and len(pair) > 2:
                    middle = pair[1:-1]  # A [sep] [eos] B
                    entry = _special_of(middle[0])
                    add_sep = bool(entry and entry in (sep, eos) and not last)
                    if len(middle) == 2 and (entry := _special_of(middle[1])) and entry in (sep, eos):
                        add_sep = True
                    out.add["sep"] = add_sep
                    if add_sep and not sep and cfg:
                        cfg["sep_token"] = eos

    def put(typ: str, tid: Any) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n_vocab and typ not in out.ids:
            out.ids[typ] = tid

    added = [t for t in data.get("added_tokens", []) if isinstance(t, dict)]
    texts: dict[str, str] = {}
    if cfg:  # gguf-py reads no tokenizer_config ids (nor add-flags) from an empty or missing file
        for typ in types:
            text = _token_text(cfg.get(f"{typ}_token"))
            if text is not None:
                texts[typ] = text
                put(typ, next((t.get("id") for t in added if t.get("content") == text), None))
    for typ in types:
        tid = config.get(f"{typ}_token_id")
        if tid is None and isinstance(config.get("text_config"), dict):
            tid = config["text_config"].get(f"{typ}_token_id")
        put(typ, tid)
    ids = {text: i for i, text in enumerate(tokens)}
    for typ, text in texts.items():
        if text not in ids:
            raise KilnError(f"{cfg_path}: {typ}_token {text!r} is not in the vocabulary")
        if typ not in out.ids:
            out.ids[typ] = ids[text]
    out.ids.pop("cls", None)  # no GGUF key (gguf-py warns and skips it)
    return out


def _chat_templates(directory: Path, cfg: dict[str, Any]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """The default chat template and the named ones, from where transformers and gguf-py look for them:
    tokenizer_config.json's `chat_template` (a string or a list of {name, template}), else
    chat_template.jinja (plus additional_chat_templates/*.jinja), else chat_template.json."""
    template: Any = cfg.get("chat_template")
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
        extra = sorted((directory / "additional_chat_templates").glob("*.jinja"))
        if extra:
            template = [{"name": "default", "template": template},
                        *({"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra)]
    elif template is None and (directory / "chat_template.json").is_file():
        template = read_json_object(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = tuple((t["name"], t["template"]) for t in template
                      if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str))
        default = next((tpl for name, tpl in named if name == "default"), None)
        return default, tuple((name, tpl) for name, tpl in named if name != "default")
    return (template if isinstance(template, str) else None), ()


def normalizer_flags(normalizer: Any) -> tuple[bool | None, bool | None]:
    """(lowercase, strip_accents) as gguf-py's SpecialVocab._parse_normalizer reads tokenizer.json."""
    lower = strip = None
    if not isinstance(normalizer, dict):
        return lower, strip
    kind = normalizer.get("type")
    if kind == "Lowercase":
        lower = True
    elif kind == "StripAccents":
        strip = True
    elif kind == "BertNormalizer":
        lower = normalizer.get("lowercase", lower)
        strip = normalizer.get("strip_accents", strip)
    elif kind == "Sequence":
        for inner in normalizer.get("normalizers", []):
            a, b = normalizer_flags(inner)
            lower = a if a is not None else lower
            strip = b if b is not None else strip
    return lower, strip


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
    cfg = read_json_object(cfg_path) if cfg_path.is_file() else {}
    # config.json of the same directory: gguf-py's fallback for special ids tokenizer_config.json leaves unset
    config = read_json_object(directory / "config.json") if (directory / "config.json").is_file() else {}
    special = special_tokens(data, cfg, config, tokens, cfg_path)
    ids = {text: i for i, text in enumerate(tokens)}

    template, named = _chat_templates(directory, cfg)
    eot = special.ids.get("eot")
    if eot is None:  # kiln's addition: llama.cpp finds these by text at load time, Ollama's Modelfile needs the id
        eot = next((ids[t] for t in END_OF_TURN if t in ids and types[ids[t]] == CONTROL), None)
    lower, strip = normalizer_flags(data.get("normalizer"))

    def add_flag(typ: str) -> bool:
        # transformers 5 rebuilds the post-processor from an explicit add_{typ}_token (and drops it when
        # the token is unset); gguf-py lets the post-processor win. Both agree unless the two disagree.
        explicit = cfg.get(f"add_{typ}_token")
        if isinstance(explicit, bool):
            return explicit and _token_text(cfg.get(f"{typ}_token")) is not None
        return special.add.get(typ, False)

    return TokenizerSpec(
        tokens=tokens,  # type: ignore[arg-type]
        token_types=types,
        merges=merges,
        pre=pre,
        bos_id=special.ids.get("bos"),
        eos_id=special.ids.get("eos"),
        pad_id=special.ids.get("pad"),
        unk_id=special.ids.get("unk"),
        eot_id=eot,
        add_bos=add_flag("bos"),
        add_eos=add_flag("eos"),
        chat_template=template,
        source=path,
        unrepresentable_bytes=tuple(sorted(missing)),
        sep_id=special.ids.get("sep"),
        mask_id=special.ids.get("mask"),
        eom_id=special.ids.get("eom"),
        add_sep=special.add.get("sep"),
        add_prefix_space=cfg.get("add_prefix_space") if isinstance(cfg.get("add_prefix_space"), bool) else None,
        named_chat_templates=named,
        normalizer_lowercase=lower,
        normalizer_strip_accents=strip,
    )
