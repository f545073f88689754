"""Grammar potentials (regex, JSON Schema, Lark) with llguidance token masks.

Boolean potentials: prefix(x) = 0 iff x is a viable prefix (llguidance's matcher is not in
error after consuming x), complete(x) = 0 iff the matcher accepts x. `logw_next` is the
matcher's token mask (0 allowed / −inf not) plus, in the EOS entry, 0 iff accepting.

The llguidance tokenizer is built from kiln's `Vocab` (the model's own token bytes, its
end-of-generation ids and its own `tokenize`), so masks come from the model's vocabulary
whatever engine serves it (GGUF or ONNX). Building one takes 0.15-0.3 s for a 49k vocabulary;
it is cached per `Vocab`.

Measured here (SmolLM2-135M vocabulary, 49152 tokens, 2 cores, llguidance 1.9.1): see
`tests/test_potentials.py::test_mask_cost` and the module docstring of `potentials/__init__.py`.
"""

from __future__ import annotations

import json
import math
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.potentials.base import Potential, State, Vocab

# byte value -> its 8 bits as log weights (bit set = allowed = 0.0, else -inf), little-endian
_LUT = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
                np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401 - fill_next_token_bitmask(_par)
    except ImportError:
        raise KilnError("grammar potentials need llguidance (pip install 'llguidance>=1.9')") from None
    return llguidance


# --- vocabulary-derived tables, cached per Vocab ------------------------------------------------

_CACHE: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}
_CACHE_LOCK = threading.Lock()


def vocab_cache(vocab: Vocab) -> dict[str, Any]:
    """A dict of derived tables living as long as this `vocab` object. Keyed by identity, not
    equality: the llguidance tokenizer calls the vocab's own `tokenize` (its engine), so two equal
    vocabularies from two engines must not share it."""
    key = id(vocab)
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry[0]() is vocab:
            return entry[1]
        tables: dict[str, Any] = {}

        def forget(ref: weakref.ref, key: int = key) -> None:
            with _CACHE_LOCK:
                if key in _CACHE and _CACHE[key][0] is ref:
                    del _CACHE[key]

        _CACHE[key] = (weakref.ref(vocab, forget), tables)
        return tables


def special_ids(vocab: Vocab) -> frozenset[int]:
    """Control tokens: EOG ids, BOS, and tokens spelled like `<...>` that the model's tokenizer
    does not produce from their text (`<|im_start|>`, `<file_sep>`, ...). Grammars match text,
    so these never match a grammar's characters."""
    cache = vocab_cache(vocab)
    found = cache.get("special_ids")
    if found is None:
        ids = set(vocab.eog_ids)

        def control(i: int, piece: bytes) -> bool:  # its text does not tokenize back to it
            try:
                return vocab.tokenize(piece.decode("utf-8")) != [i]
            except (UnicodeDecodeError, KilnError):
                return True

        # A BOS id is a control token unless it is an ordinary piece of text: a checkpoint without a BOS token
        # still gets a default id in some exports (llama.cpp's converter, onnxruntime-genai's config), and a
        # grammar must still be able to produce that token's text (a quote, a comma).
        bos = vocab.bos_id
        if bos is not None and (vocab.tokenize is None or control(bos, vocab.token_bytes[bos])):
            ids.add(bos)
        for i, piece in enumerate(vocab.token_bytes):
            if len(piece) > 2 and piece[:1] == b"<" and piece[-1:] == b">":
                if vocab.tokenize is None:
                    special = piece[:2] == b"<|"
                else:
                    special = control(i, piece)
                if special:
                    ids.add(i)
        found = cache["special_ids"] = frozenset(ids)
    return found


class _TokenizerSource:
    """What llguidance's TokenizerWrapper reads: token bytes (specials marked with 0xFF),
    eos/bos ids, and a bytes -> ids tokenizer (the model's own when the Vocab has one)."""

    def __init__(self, vocab: Vocab) -> None:
        specials = special_ids(vocab)
        pieces = list(vocab.token_bytes) + [b""] * (vocab.size - len(vocab.token_bytes))
        self.tokens = [b"\xff" + p if i in specials else p for i, p in enumerate(pieces)]
        self.special_token_ids = sorted(specials)
        self.eos_token_id = min(vocab.eog_ids) if vocab.eog_ids else None
        self.bos_token_id = vocab.bos_id
        self._tokenize = vocab.tokenize
        self._greedy: dict[bytes, int] | None = None

    def __call__(self, data: bytes) -> list[int]:
        if self._tokenize is not None:
            return list(self._tokenize(data.decode("utf-8", errors="replace")))
        return self._greedy_tokenize(data)

    def _greedy_tokenize(self, data: bytes) -> list[int]:
        if self._greedy is None:
            self._greedy = {}
            for i, p in enumerate(self.tokens):
                if p and p[:1] != b"\xff":
                    self._greedy.setdefault(p, i)
        longest = max(map(len, self._greedy))
        out, pos = [], 0
        while pos < len(data):
            for n in range(min(longest, len(data) - pos), 0, -1):
                tid = self._greedy.get(data[pos:pos + n])
                if tid is not None:
                    out.append(tid)
                    pos += n
                    break
            else:
                raise KilnError(f"vocabulary has no token for byte 0x{data[pos]:02x}")
        return out


def ll_tokenizer(vocab: Vocab):
    """The llguidance `LLTokenizer` of `vocab` (built once per Vocab, then cached)."""
    cache = vocab_cache(vocab)
    tok = cache.get("lltokenizer")
    if tok is None:
        llg = _llguidance()
        if not vocab.eog_ids:
            raise KilnError("grammar potentials need the model's end-of-generation token ids (Vocab.eog_ids is empty)")
        tok = cache["lltokenizer"] = llg.LLTokenizer(llg.TokenizerWrapper(_TokenizerSource(vocab)),
                                                     n_vocab=vocab.size, eos_token=sorted(vocab.eog_ids))
    return tok


_EXECUTOR: list[Any] = []
#: llguidance's parallel mask fill (LLExecutor) only pays with cores to spare; on 2 cores it was
#: no faster than a loop (and sometimes slower), so small machines fill masks one by one.
PARALLEL = (os.cpu_count() or 1) >= 4


def _executor():
    if not _EXECUTOR:
        _EXECUTOR.append(_llguidance().LLExecutor())
    return _EXECUTOR[0]


def _one_line(message: str) -> str:
    """llguidance errors are multi-line (caret diagrams); keep the gist on one line."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return "invalid grammar"
    head = lines[0]
    extra = [ln[len("error:"):].strip() for ln in lines[1:] if ln.lower().startswith("error:")]
    if extra and head.endswith(":"):
        return f"{head} {'; '.join(extra)}"
    return "; ".join([head] + extra)


def bits_to_logw(bitmask: np.ndarray, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """[B, ceil(V/32)] int32 llguidance bitmask -> [B, size] float32 (0 allowed, −inf not)."""
    b = bitmask.shape[0]
    nbytes = bitmask.shape[1] * 4
    if out is None:
        return _LUT[bitmask.view(np.uint8)].reshape(b, -1)[:, :size]
    if size == nbytes * 8:  # write straight into out (a [B, size/8, 8] view of its first columns)
        np.take(_LUT, bitmask.view(np.uint8), axis=0, out=out[:, :size].reshape(b, nbytes, 8), mode="clip")
    else:
        out[:, :size] = _LUT[bitmask.view(np.uint8)].reshape(b, -1)[:, :size]
    return out


class _LLState:
    """An immutable llguidance state: the matcher is never advanced after creation (advance copies
    it), so particles can share the object. The mask and acceptance are memoized."""

    __slots__ = ("matcher", "n_tokens", "mask", "_accepting", "__weakref__")

    def __init__(self, matcher: Any, n_tokens: int) -> None:
        self.matcher = matcher
        self.n_tokens = n_tokens
        self.mask: np.ndarray | None = None  # [ceil(V/32)] int32 once computed
        self._accepting: bool | None = None

    @property
    def error(self) -> bool:
        return self.matcher.is_error()

    @property
    def accepting(self) -> bool:
        if self._accepting is None:
            self._accepting = (not self.matcher.is_error()) and self.matcher.is_accepting()
        return self._accepting

    def __repr__(self) -> str:
        status = "error" if self.error else "accepting" if self.accepting else "open"
        return f"<grammar state after {self.n_tokens} tokens: {status}>"


class LLGuidancePotential(Potential):
    """Boolean potential from an llguidance grammar string (what `llguidance.grammar_from` returns)."""

    boolean = True
    kind = "grammar"

    def __init__(self, vocab: Vocab, grammar: str, *, what: str | None = None) -> None:
        super().__init__(vocab)
        llg = _llguidance()
        self._tok = ll_tokenizer(vocab)
        what = what or self.kind
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self._tok)
        if is_error:
            raise KilnError(f"bad {what}: {_one_line(messages[0] if messages else '')}")
        self.warnings = list(messages)
        self.grammar = grammar
        matcher = llg.LLMatcher(self._tok, grammar, log_level=0)
        if matcher.is_error():
            raise KilnError(f"bad {what}: {_one_line(matcher.get_error())}")
        self._initial = _LLState(matcher, 0)
        self._words = (vocab.size + 31) // 32
        eos = min(vocab.eog_ids)
        self._eos_word, self._eos_bit = eos // 32, eos % 32

    def initial_state(self) -> State:
        return self._initial

    def advance(self, state: _LLState, token: int) -> _LLState:
        if state.matcher.is_error():
            return state  # dead stays dead
        matcher = state.matcher.deep_copy()
        matcher.consume_token(int(token))
        return _LLState(matcher, state.n_tokens + 1)

    def prefix(self, state: _LLState) -> float:
        return -math.inf if state.matcher.is_error() else 0.0

    def complete(self, state: _LLState) -> float:
        return 0.0 if state.accepting else -math.inf

    # --- masks ---------------------------------------------------------------------------------
    def _fill_masks(self, states: Sequence[_LLState]) -> None:
        """Compute the masks of the states that lack one (one parallel llguidance call where
        PARALLEL); a state shared by several particles is computed once."""
        todo: dict[int, _LLState] = {}
        for s in states:
            if s.mask is None and not s.matcher.is_error():
                todo.setdefault(id(s), s)  # shared states (after resampling) are computed once
        if not todo:
            return
        pending = list(todo.values())
        masks = np.zeros((len(pending), self._words), dtype=np.int32)
        from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

        if len(pending) > 1 and PARALLEL:
            fill_next_token_bitmask_par(_executor(), [(s.matcher, i) for i, s in enumerate(pending)], masks)
        else:
            for i, s in enumerate(pending):
                fill_next_token_bitmask(s.matcher, masks, i)
        eos = self._eos_word, self._eos_bit
        for i, s in enumerate(pending):
            s.mask = masks[i]
            # llguidance allows the EOS token exactly when the matcher accepts (cheaper than
            # is_accepting(); tests check that both agree)
            s._accepting = bool((int(masks[i, eos[0]]) >> eos[1]) & 1)

    def allowed(self, state: _LLState) -> np.ndarray:
        """Token ids the mask allows next (EOG ids included when accepting)."""
        self._fill_masks([state])
        if state.mask is None:
            return np.zeros(0, dtype=np.int64)
        bits = np.unpackbits(state.mask.view(np.uint8), bitorder="little")[:self.vocab.size]
        return np.flatnonzero(bits)

    def batch_mask(self, states: Sequence[_LLState]) -> tuple[np.ndarray, np.ndarray]:
        """The compact form of `batch_logw_next` for samplers that can use it: llguidance bitmasks
        [B, ceil(V/32)] int32 (bit t % 32 of word t // 32 set = token t allowed; all zero for a dead
        state) and [B] bool "EOS allowed" (accepting). 6 KB per row instead of 196 KB of floats."""
        states = list(states)
        self._fill_masks(states)
        masks = np.zeros((len(states), self._words), dtype=np.int32)
        accepting = np.zeros(len(states), dtype=bool)
        for i, s in enumerate(states):
            if s.mask is not None:
                masks[i] = s.mask
                accepting[i] = s.accepting
        return masks, accepting

    def logw_next(self, state: _LLState) -> np.ndarray:
        return self.batch_logw_next([state])[0]

    def batch_logw_next(self, states: Sequence[_LLState]) -> np.ndarray:
        states = list(states)
        v = self.vocab.size
        out = np.empty((len(states), v + 1), dtype=np.float32)
        if not states:
            return out
        self._fill_masks(states)
        live = [i for i, s in enumerate(states) if s.mask is not None]
        if len(live) == len(states):
            bits_to_logw(np.stack([s.mask for s in states]), v, out)
        else:
            out[:] = -np.inf  # dead states (matcher in error): nothing allowed
            if live:
                out[live, :v] = bits_to_logw(np.stack([states[i].mask for i in live]), v)
        out[live, v] = [0.0 if states[i].accepting else -np.inf for i in live]
        return out

    def batch_prefix(self, states: Sequence[_LLState]) -> np.ndarray:
        return np.array([self.prefix(s) for s in states], dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    def _describe(self) -> str:
        return ""


class Regex(LLGuidancePotential):
    """The generated text must match `pattern` entirely (Rust `regex` syntax, anchored at both ends)."""

    kind = "regex"

    def __init__(self, vocab: Vocab, pattern: str) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise KilnError("bad regex: empty pattern")
        self.pattern = pattern
        super().__init__(vocab, _llguidance().LLMatcher.grammar_from_regex(pattern), what=f"regex {pattern!r}")

    def _describe(self) -> str:
        return repr(self.pattern)


class JsonSchema(LLGuidancePotential):
    """The generated text must be a JSON document valid under `schema` (a dict, a JSON string, or a
    path to a .json file). `options` are llguidance JSON compile options (e.g.
    `{"whitespace_flexible": False}` for compact JSON, `{"lenient": True}` to ignore unsupported
    keywords)."""

    kind = "JSON schema"

    def __init__(self, vocab: Vocab, schema: dict | str | Path, options: dict | None = None) -> None:
        self.schema = load_schema(schema)
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(self.schema), overrides=options)
        except (ValueError, TypeError) as exc:
            raise KilnError(f"bad JSON schema: {_one_line(str(exc))}") from None
        super().__init__(vocab, grammar)

    def _describe(self) -> str:
        text = json.dumps(self.schema)
        return text if len(text) < 60 else text[:57] + "..."


def load_schema(schema: dict | str | Path) -> dict:
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, Path) or (isinstance(schema, str) and not schema.lstrip().startswith(("{", "["))):
        path = Path(schema)
        if not path.is_file():
            raise KilnError(f"{path}: no such JSON schema file")
        text, where = path.read_text(encoding="utf-8"), str(path)
    elif isinstance(schema, str):
        text, where = schema, "JSON schema"
    else:
        raise KilnError(f"bad JSON schema: expected a dict, a JSON string or a file, got {type(schema).__name__}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KilnError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(value, (dict, bool)):
        raise KilnError(f"{where}: a JSON schema must be an object")
    return {} if value is True else value if isinstance(value, dict) else {"not": {}}


class LarkGrammar(LLGuidancePotential):
    """The generated text must be derivable from a Lark grammar (llguidance's Lark dialect: rule
    `start`, terminals in UPPER case or /regex/ and "literal" inline; see llguidance docs/syntax.md).
    `grammar` is the grammar text or a path to a .lark file."""

    kind = "Lark grammar"

    def __init__(self, vocab: Vocab, grammar: str | Path) -> None:
        text = grammar
        if isinstance(grammar, Path) or (isinstance(grammar, str) and "\n" not in grammar
                                         and len(grammar) < 1024 and Path(grammar).is_file()):
            text = Path(grammar).read_text(encoding="utf-8")
        if not isinstance(text, str) or not text.strip():
            raise KilnError("bad Lark grammar: empty")
        self.source = text
        super().__init__(vocab, _llguidance().LLMatcher.grammar_from_lark(text))



STRUCTURES = ("regex", "json", "lark")


def structure(vocab: Vocab, kind: str, value: Any, *, compact: bool | None = None) -> LLGuidancePotential:
    """The llguidance potential of one structural constraint, wherever it was asked for (a `regex:`/`json:`/
    `lark:` spec, a server request's response_format, a chat slash command): the one place that maps a kind
    to its class. `value`: the pattern, the schema (dict, JSON text or file path), the grammar (text or file
    path). `compact`: JSON without free whitespace (what kiln serve and kiln chat write by default: free
    whitespace lets a weak model ramble in it); None keeps llguidance's default."""
    if kind == "regex":
        return Regex(vocab, value)
    if kind == "json":
        return JsonSchema(vocab, value, options=None if compact is None else {"whitespace_flexible": not compact})
    if kind in ("lark", "grammar"):
        return LarkGrammar(vocab, value)
    raise KilnError(f"unknown structural constraint {kind!r} (known: {', '.join(STRUCTURES)})")