"""Long documents in the runtime: fit a document into a window, chunk it, rank the chunks, answer over it.

`kiln generate --prompt-file FILE` runs `answer_document`; the pieces are usable on their own:

* `read_document(source)`: the document's text in pieces (a path, a binary stream such as stdin, or a str),
  checked as it is read: an empty document, a binary file (a NUL byte) and bytes that are not UTF-8 are
  one-line KilnErrors. Nothing reads the whole file at once.
* `document_tokens(engine, source)`: its token ids, piece by piece (parse_special off: a document that
  contains "<|im_end|>" stays text; it cannot end the user's turn).
* `fit(engine, source, budget, overflow)`: the tokens when the document fits `budget`; otherwise `error`
  (a one-line KilnError, reading stops at the first token over) or `truncate` (the start and the end kept,
  the middle replaced by a marker saying how many tokens went). Memory is bounded by the budget: the head
  is kept and the tail is a ring of `budget` tokens, whatever the document's length.
* `chunk(engine, source, chunk_size, overlap)`: overlapping chunks of at most `chunk_size` tokens,
  streamed; no boundary falls inside a UTF-8 character (a byte-level token can hold part of one).
* `rank(chunks, question, method)`: one relevance score per chunk, BM25 (the `bm25s` package) or the
  model's own log-likelihood of the question after the chunk; `select` packs the best into a budget and
  returns them in document order: the opening chunk and the relevant ones (`pack="relevant"`, the default)
  or as many as fit (`pack="fill"`).
* `answer(engine, source, instruction, ...)`: the whole policy on an open engine: the document if it fits,
  else the overflow policy; `chunk` with a question ranks and packs, without one maps the instruction over
  the chunks (several chunks decoded together as sequences of the engine) and reduces the partial answers
  in a final pass. The final pass can be steered (SMC potentials on the final answer).
* `answer_document(artifact, source, ...)`: the same from a path, with the engine's context sized from the
  token counts (`context_plan`) instead of a fixed 4096, checked against the machine's memory first (a
  `memory_check` callable: kiln's CLI passes one built on `kiln plan`'s cost model).

Long prefills report progress through a `PrefillProgress` callback (`PrefillInfo`: tokens done, total,
tokens/s, ETA). The engine interface has no progress hook; `prefill` feeds the prompt in slices through
the engine's public `prefill_prompt` (its prompt cache continues each slice from the previous one, so
nothing is decoded twice, and the later full-prompt call is an exact cache hit) or `prefill`.
"""

from __future__ import annotations

import codecs
import io
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.batching import ContinuousBatch
from kiln.runtime.engine import Engine
from kiln.runtime.sampling import SamplingParams, SampleTask

PIECE_CHARS = 1 << 16  # text tokenized at once: documents are read and tokenized in pieces this size
READ_BYTES = 1 << 16
OVERFLOW_POLICIES = ("error", "truncate", "chunk")


@dataclass(frozen=True)
class RankMethod:
    """What the rest of the module needs to know of a ranking, in one place: whether it scores without the
    model (then the chunks are packed in `prepare`, before an engine is sized for the prompt) and which score
    means "unrelated to the question" (`--pack relevant` leaves those out; None: no such score, so it fills)."""

    model_free: bool
    floor: float | None


# BM25 needs no model and scores 0 exactly when no word of the question is in the chunk; the model's likelihood
# of the question is never that clear-cut
RANKINGS = {"bm25": RankMethod(model_free=True, floor=0.0), "likelihood": RankMethod(model_free=False, floor=None)}
RANK_METHODS = tuple(RANKINGS)
# What is packed into the window after ranking. "relevant": the document's opening chunk (where its title and framing
# usually are) and the chunks the ranking finds relevant, best first while they fit; "fill": the best-ranked chunks
# until the window is full, relevant or not. Measured by bench/longanswer.py (SmolLM2-135M-Instruct q8_0, 9 passkey
# documents of 2x/4x/8x its 8K window, chunks of 1024 ranked by BM25): "relevant" found the key 9/9 in prompts of
# about 2K tokens (5.7 s per answer); "fill" 1/9 in prompts of 7.4-8K (the needle's chunk was packed every time,
# buried among filler chunks that share no word with the question; 38-44 s per answer). A ranking without a floor
# (RankMethod.floor None: the likelihood) always fills.
PACK_POLICIES = ("relevant", "fill")
# The ranking default, measured by bench/longdoc.py (SmolLM2-135M-Instruct Q4_1 GGUF, 1 thread on a shared 2-core
# machine; 12 synthetic needle-in-a-haystack documents of ~1K and ~2K tokens: filler paragraphs of
# kiln/data/calibration.txt, one "special magic number for CITY" needle at 10-90 % depth and three distractor needles
# for other cities; chunks of 256 tokens, 32 overlap). Top-1 chunk holds the needle: BM25 12/12, likelihood 12/12;
# chunks packed into 1024 tokens hold it: 12/12 and 12/12. Time to rank all 12: BM25 0.14 s, likelihood 410 s (a
# prefill of every chunk). Equal hit rates: the default is the one that costs nothing (docs/long-context.md).
DEFAULT_RANK = "bm25"
DEFAULT_PACK = "relevant"
DEFAULT_CHUNK = 1024
DEFAULT_OVERLAP = 128
DEFAULT_MAX_CHUNKS = 256
DOC_MARK = "\u27e6kiln-document\u27e7"  # where the document goes in a rendered chat template
GAP = "\n\n[…]\n\n"  # between packed chunks that are not contiguous in the document
MAP_INSTRUCTION = "Summarize this part of the document."


def _not_one_of(flag: str, value: str, allowed: Sequence[str]) -> str:
    """The one-line error for an option outside its choices, worded alike wherever the API checks one."""
    return f"{flag} {value!r}: one of {', '.join(allowed)}"


# --- progress -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefillInfo:
    """One progress report of a prefill: `done` of `total` tokens, after `elapsed` seconds."""

    done: int
    total: int
    elapsed: float
    what: str = "prompt"  # "prompt", "chunk 3/12", "rank 3/12", ...

    @property
    def tokens_per_s(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before the first slice)."""
        rate = self.tokens_per_s
        return (self.total - self.done) / rate if rate > 0 else None

    def text(self) -> str:
        eta = self.eta
        return (f"{self.what}: prefill {self.done}/{self.total} tokens · {self.tokens_per_s:.0f} tok/s"
                + (f" · ETA {eta:.0f} s" if eta is not None and self.done < self.total else ""))


PrefillProgress = Callable[[PrefillInfo], None]
PREFILL_SLICE = 512


def _has_prompt_cache(engine: Engine) -> bool:
    return type(engine).prefill_prompt is not Engine.prefill_prompt


def prefill(engine: Engine, tokens: Sequence[int], seq: int = 0, progress: PrefillProgress | None = None,
            what: str = "prompt", slice_tokens: int = PREFILL_SLICE, reserve: int = 0) -> np.ndarray:
    """Prefill `tokens` into the empty sequence `seq` (logits of the last position), reporting progress after
    every slice of `slice_tokens`. Through the engine's prompt cache where it has one (each slice continues
    the cached previous one; a later `prefill_prompt` of the same tokens is an exact hit), else slice by
    slice with `engine.prefill`, which continues the sequence."""
    tokens = [int(t) for t in tokens]
    if progress is None or len(tokens) <= slice_tokens:
        logits = engine.prefill_prompt(tokens, seq=seq, reserve=reserve)
        if progress is not None:
            progress(PrefillInfo(len(tokens), len(tokens), 0.0, what))
        return logits
    t0 = time.perf_counter()
    cached = _has_prompt_cache(engine)
    logits = None
    for lo in range(0, len(tokens), slice_tokens):
        hi = min(lo + slice_tokens, len(tokens))
        if not cached:
            logits = engine.prefill(tokens[lo:hi], seq=seq)
        elif hi < len(tokens):
            engine.prefill_prompt(tokens[:hi], seq=seq, reserve=reserve + len(tokens) - hi)
            engine.drop_seq(seq)
        else:
            logits = engine.prefill_prompt(tokens, seq=seq, reserve=reserve)
        progress(PrefillInfo(hi, len(tokens), time.perf_counter() - t0, what))
    return logits


# --- reading --------------------------------------------------------------------------------------------
def read_document(source: str | Path | BinaryIO, name: str | None = None) -> Iterator[str]:
    """The text of a document in pieces of about PIECE_CHARS, each ending at a line break where there is one
    (tokenizers split there anyway). `source`: a str (the text itself), a Path, or a binary stream (stdin).
    One-line KilnErrors: no such file, a binary file (a NUL byte), bytes that are not UTF-8, an empty or
    blank document. A leading byte-order mark is dropped."""
    if isinstance(source, str):
        label = name or "document"
        yield from _pieces(iter([source]), label)
        return
    if isinstance(source, Path):
        label = name or str(source)
        if source.is_dir():
            raise KilnError(f"{source}: a directory, not a text file")
        try:
            fh = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise KilnError(f"{source}: cannot read ({exc.strerror or exc})") from None
        with fh:
            yield from _pieces(_decoded(fh, label), label)
        return
    label = name or getattr(source, "name", None) or "document"
    if label == "<stdin>":
        label = "standard input"
    yield from _pieces(_decoded(source, str(label)), str(label))


def _decoded(fh: BinaryIO, name: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    first = True
    while True:
        try:
            block = fh.read(READ_BYTES)
        except OSError as exc:
            raise KilnError(f"{name}: cannot read ({exc.strerror or exc})") from None
        final = not block
        if block:
            nul = block.find(b"\0")
            if nul >= 0:
                raise KilnError(f"{name}: a binary file (NUL byte at offset {offset + nul}), not text")
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(block, final=final)
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start:exc.start + 1]
            raise KilnError(f"{name}: not UTF-8 text (byte 0x{bad.hex()} at offset {offset - pending + exc.start})") \
                from None
        if first and text:
            text = text.removeprefix("\ufeff")
            first = False
        if text:
            yield text
        if final:
            return
        offset += len(block)


def _pieces(texts: Iterator[str], name: str) -> Iterator[str]:
    buf = ""
    seen = False
    for text in texts:
        buf += text
        while len(buf) >= PIECE_CHARS:
            cut = buf.rfind("\n", 0, PIECE_CHARS) + 1 or buf.rfind(" ", 0, PIECE_CHARS) + 1 or PIECE_CHARS
            piece, buf = buf[:cut], buf[cut:]
            seen = seen or not piece.isspace()
            yield piece
    if buf:
        seen = seen or not buf.isspace()
    if not seen:
        raise KilnError(f"{name}: empty document")
    buf = buf.rstrip()  # a file's final newline would only widen the gap before the instruction
    if buf:
        yield buf


def document_tokens(engine: Engine, source: str | Path | BinaryIO, name: str | None = None) -> Iterator[list[int]]:
    """Token ids of the document, one list per piece of `read_document` (special-token text stays text)."""
    for piece in read_document(source, name):
        ids = engine.tokenize(piece, add_special=False, parse_special=False)
        if ids:
            yield ids


# --- UTF-8 boundaries -------------------------------------------------------------------------------------
def _utf8_complete(tail: bytes) -> bool:
    """Whether bytes ending in `tail` (its last <= 4 bytes suffice) end on a character boundary."""
    i = len(tail) - 1
    while i >= 0 and tail[i] & 0xC0 == 0x80:
        i -= 1
    if i < 0:
        return len(tail) == 0
    lead = tail[i]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return len(tail) - i >= need


def is_boundary(engine: Engine, tokens: Sequence[int], j: int) -> bool:
    """Whether tokens[:j] ends on a UTF-8 character boundary (j = 0 counts as one)."""
    tail = b""
    k = j
    while k > 0 and len(tail) < 4:
        k -= 1
        tail = engine.token_bytes(tokens[k]) + tail
    return not tail or _utf8_complete(tail[-4:])


def char_boundary(engine: Engine, tokens: Sequence[int], i: int, lo: int = 0) -> int:
    """The largest j in (lo, i] such that tokens[:j] ends on a UTF-8 character boundary (i itself when there
    is none: a run of tokens that never completes a character)."""
    for j in range(i, lo, -1):
        if is_boundary(engine, tokens, j):
            return j
    return i


# --- fitting ----------------------------------------------------------------------------------------------
@dataclass
class Fitted:
    """The document's tokens as they go into the prompt."""

    tokens: list[int]
    total: int  # tokens of the whole document
    dropped: int = 0  # tokens cut from the middle (truncate)
    policy: str = "whole"  # "whole" or "truncate"

    def note(self) -> str | None:
        if not self.dropped:
            return None
        return (f"document truncated: kept {self.total - self.dropped} of its {self.total} tokens (the start and "
                f"the end), dropped {self.dropped} from the middle ({100 * self.dropped / self.total:.0f}%)")


def _gap_tokens(engine: Engine, dropped: int) -> list[int]:
    return engine.tokenize(f"\n\n[… {dropped} tokens omitted …]\n\n", add_special=False, parse_special=False)


def fit(engine: Engine, source: str | Path | BinaryIO | Iterable[list[int]], budget: int, overflow: str = "error",
        name: str | None = None, what: str = "the document's budget") -> Fitted:
    """The document's tokens if it fits `budget` tokens; otherwise by `overflow`: "error" raises a one-line
    KilnError as soon as the budget is passed (the rest is not read), "truncate" keeps the start and the end
    (half the budget each, minus a marker naming how many tokens went), cut on UTF-8 character boundaries.
    Memory stays within about twice the budget whatever the document's length."""
    if overflow not in ("error", "truncate"):
        raise KilnError(f"fit: overflow must be error or truncate (chunking: use chunk), got {overflow!r}")
    if budget < 1:
        raise KilnError(f"no room for the document: {what} is {budget} tokens")
    pieces = source if not isinstance(source, (str, Path)) and not hasattr(source, "read") else \
        document_tokens(engine, source, name)
    head: list[int] = []
    tail: deque[int] = deque(maxlen=budget)
    total = 0
    for ids in pieces:
        total += len(ids)
        room = budget - len(head)
        if room > 0:
            head.extend(ids[:room])
        if total > budget and overflow == "error":
            raise KilnError(f"{name or 'the document'} has more than {budget} tokens ({what}): use --overflow "
                            "truncate or chunk")
        tail.extend(ids)
    if total == 0:
        raise KilnError(f"{name or 'document'}: empty document")
    if total <= budget:
        return Fitted(head, total)
    marker = _gap_tokens(engine, total)  # sized for the largest count: the real one is no longer
    keep = budget - len(marker)
    if keep < 2:
        raise KilnError(f"no room to truncate the document into {budget} tokens")
    n_head = char_boundary(engine, head, (keep + 1) // 2)
    ring = list(tail)
    n_tail = keep - n_head
    start = len(ring) - n_tail
    # move the tail's start forward to a character boundary
    while 0 < start < len(ring) and not is_boundary(engine, ring, start):
        start += 1
    kept_tail = ring[start:]
    dropped = total - n_head - len(kept_tail)
    return Fitted(head[:n_head] + _gap_tokens(engine, dropped) + kept_tail, total, dropped, "truncate")


# --- chunking ---------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    index: int
    start: int  # offset of its first token in the document
    tokens: list[int]
    text: str = ""

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def check_chunking(chunk_size: int, overlap: int) -> None:
    if chunk_size < 16:
        raise KilnError(f"--chunk-size {chunk_size}: at least 16 tokens")
    if overlap < 0:
        raise KilnError(f"--overlap {overlap}: must be >= 0")
    if overlap >= chunk_size:
        raise KilnError(f"--overlap {overlap} must be smaller than --chunk-size {chunk_size}")


def chunk(engine: Engine, source: str | Path | BinaryIO | Iterable[list[int]], chunk_size: int = DEFAULT_CHUNK,
          overlap: int = DEFAULT_OVERLAP, max_chunks: int | None = None, name: str | None = None) -> Iterator[Chunk]:
    """Overlapping chunks of at most `chunk_size` tokens (each starts `overlap` tokens before the previous
    one's end), streamed as the document is read; no boundary cuts a UTF-8 character. More than
    `max_chunks` is a one-line KilnError raised when the next one would start (the rest is not read)."""
    check_chunking(chunk_size, overlap)
    pieces = source if not isinstance(source, (str, Path)) and not hasattr(source, "read") else \
        document_tokens(engine, source, name)
    buf: list[int] = []
    base = 0  # document offset of buf[0]
    emitted = 0  # document offset where the last chunk ended
    index = 0

    def make(tokens: list[int], start: int) -> Chunk:
        nonlocal index
        if max_chunks is not None and index >= max_chunks:
            raise KilnError(f"{name or 'the document'} needs more than {max_chunks} chunks of {chunk_size} tokens "
                            f"(at least {start + len(tokens)} tokens): raise --max-chunks or --chunk-size, or use "
                            "--overflow truncate")
        c = Chunk(index, start, tokens, engine.detokenize(tokens))
        index += 1
        return c

    for ids in pieces:
        buf.extend(ids)
        while len(buf) > chunk_size:
            end = char_boundary(engine, buf, chunk_size)
            yield make(buf[:end], base)
            emitted = base + end
            nxt = max(end - overlap, 1)  # the next chunk starts on a character boundary, overlapping <= overlap
            while nxt < end and not is_boundary(engine, buf, nxt):
                nxt += 1
            buf = buf[nxt:]
            base += nxt
    if base + len(buf) > emitted and buf:
        yield make(buf, base)
    elif index == 0:
        raise KilnError(f"{name or 'document'}: empty document")


# --- ranking ----------------------------------------------------------------------------------------------
def rank(chunks: Sequence[Chunk], question: str, method: str = DEFAULT_RANK, engine: Engine | None = None,
         progress: PrefillProgress | None = None) -> list[float]:
    """A relevance score per chunk for `question` (higher: more relevant). "bm25": Okapi BM25 over the chunks
    (the `bm25s` package; English stop words, lower-cased words); "likelihood": the model's log-probability
    of the question's tokens after the chunk (needs `engine`; one prefill per chunk)."""
    if method not in RANK_METHODS:
        raise KilnError(_not_one_of("--rank", method, RANK_METHODS))
    if not question or not question.strip():
        raise KilnError("ranking needs a question")
    if not chunks:
        return []
    if method == "bm25":
        return _bm25(chunks, question)
    if engine is None:
        raise KilnError("likelihood ranking needs an engine")
    return _likelihood(engine, chunks, question, progress)


def _bm25(chunks: Sequence[Chunk], question: str) -> list[float]:
    try:
        import bm25s
    except ImportError:
        raise KilnError("BM25 ranking needs the bm25s package (pip install bm25s), or use --rank likelihood") from None
    corpus = bm25s.tokenize([c.text for c in chunks], stopwords="en", return_ids=False, show_progress=False)
    query = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)[0]
    if not query:
        query = bm25s.tokenize([question], return_ids=False, show_progress=False)[0]
    if not query or not any(corpus):
        return [0.0] * len(chunks)
    retriever = bm25s.BM25()
    retriever.index([doc or [""] for doc in corpus], show_progress=False)
    return [float(s) for s in retriever.get_scores(query)]


def _likelihood(engine: Engine, chunks: Sequence[Chunk], question: str,
                progress: PrefillProgress | None) -> list[float]:
    bos = [engine.bos_id] if engine.add_bos and engine.bos_id is not None else []
    cue = engine.tokenize("\n\nQuestion:", add_special=False, parse_special=False)
    target = engine.tokenize(" " + question.strip(), add_special=False, parse_special=False)
    scores = []
    t0 = time.perf_counter()
    done = 0
    total = sum(len(c.tokens) for c in chunks)
    for c in chunks:
        engine.reset()
        first = engine.prefill(bos + c.tokens + cue, seq=0)
        rest = engine.prefill(target, seq=0, all_logits=True) if len(target) > 1 else None
        rows = [first] + ([] if rest is None else list(rest[:-1]))
        lp = 0.0
        for logits, tok in zip(rows, target):
            z = logits.astype(np.float64)
            m = z.max()
            lp += float(z[tok] - m - math.log(np.exp(z - m).sum()))
        scores.append(lp)
        done += len(c.tokens)
        if progress is not None:
            progress(PrefillInfo(done, total, time.perf_counter() - t0, f"rank {c.index + 1}/{len(chunks)}"))
    engine.reset()
    return scores


def merge_tokens(chunks: Sequence[Chunk], engine: Engine | None = None) -> list[int]:
    """The tokens of chunks in document order: overlapping or touching chunks joined without repeating
    their overlap, gaps marked by GAP."""
    out: list[int] = []
    end = None
    gap = None
    for c in sorted(chunks, key=lambda c: c.start):
        if end is None:
            out.extend(c.tokens)
        elif c.start <= end:
            out.extend(c.tokens[end - c.start:])
        else:
            if gap is None:
                gap = engine.tokenize(GAP, add_special=False, parse_special=False) if engine else []
            out.extend(gap + c.tokens)
        end = c.end if end is None else max(end, c.end)
    return out


def select(chunks: Sequence[Chunk], scores: Sequence[float], budget: int, engine: Engine | None = None,
           pack: str = DEFAULT_PACK, floor: float | None = None) -> list[Chunk]:
    """The best-scoring chunks whose merged tokens (`merge_tokens`) fit `budget`, in document order (the first
    chunk that would not fit is skipped and smaller ones are still tried). pack="relevant" with a `floor`
    (BM25: 0): only the document's opening chunk and the chunks scoring above the floor; when none does, the
    window is filled as with pack="fill" (nothing to go on but the order)."""
    if pack not in PACK_POLICIES:
        raise KilnError(_not_one_of("--pack", pack, PACK_POLICIES))
    order = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    if pack == "relevant" and floor is not None and chunks and any(scores[i] > floor for i in order):
        opening = min(range(len(chunks)), key=lambda i: chunks[i].start)
        order = [opening] + [i for i in order if i != opening and scores[i] > floor]
    chosen: list[Chunk] = []
    for i in order:
        trial = chosen + [chunks[i]]
        if len(merge_tokens(trial, engine)) <= budget:
            chosen = trial
    return sorted(chosen, key=lambda c: c.start)


# --- prompts ----------------------------------------------------------------------------------------------
@dataclass
class PromptFrame:
    """The tokens around a document: prefix + document + suffix is the prompt (chat template, instruction)."""

    prefix: list[int]
    suffix: list[int]

    @property
    def overhead(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def build(self, doc_tokens: Sequence[int]) -> list[int]:
        return self.prefix + list(doc_tokens) + self.suffix


def frame(engine: Engine, instruction: str | None = None, *, chat: bool = False, system: str | None = None,
          thinking: bool | None = None, before: str = "") -> PromptFrame:
    """Tokens before and after the document for a prompt "[before]DOCUMENT\\n\\nINSTRUCTION": plain text, or
    (chat) one user message in the artifact's template after an optional system message. The document's own
    tokens are made apart (parse_special off), so text in it never becomes a control token."""
    after = f"\n\n{instruction.strip()}" if instruction and instruction.strip() else ""
    if not chat:
        bos = [engine.bos_id] if engine.add_bos and engine.bos_id is not None else []
        pre = engine.tokenize(before, add_special=False, parse_special=False) if before else []
        return PromptFrame(bos + pre, engine.tokenize(after, add_special=False, parse_special=False) if after else [])
    from kiln.runtime.chat import render_chat

    if not engine.chat_template:
        raise KilnError("this artifact has no chat template; use a plain prompt")
    bos = engine.detokenize([engine.bos_id]) if engine.bos_id is not None else ""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": f"{before}{DOC_MARK}{after}"}]
    text = render_chat(engine.chat_template, messages, bos_token=bos, enable_thinking=thinking)
    if engine.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    if text.count(DOC_MARK) != 1:
        raise KilnError("the chat template does not pass the message through unchanged; use a plain prompt")
    pre, post = text.split(DOC_MARK)
    return PromptFrame(engine.tokenize(pre, add_special=True, parse_special=True),
                       engine.tokenize(post, add_special=False, parse_special=True))


# --- context sizing ---------------------------------------------------------------------------------------
MemoryCheck = Callable[[int, int], None]  # (n_ctx, n_seq_max) -> None, or a one-line KilnError with the figure


def context_plan(shared_kv_pool: bool, prompts: Sequence[int], max_tokens: int, particles: int = 1) -> dict[str, int]:
    """`n_ctx` and `n_seq_max` for prompts of these token counts decoded together, each by `particles`
    sequences of up to `max_tokens`: llama.cpp's one pool holds every prompt once plus every sequence's
    tail; an onnxruntime row holds the longest prompt plus one tail. (kiln.formats' engine_sizes, by count.)"""
    k = max(len(prompts), 1)
    if shared_kv_pool:
        n_ctx = sum(prompts) + k * particles * max_tokens
    else:
        n_ctx = max(prompts, default=0) + max_tokens
    return {"n_ctx": int(n_ctx), "n_seq_max": int(k * particles)}


# --- generation -------------------------------------------------------------------------------------------
class _GreedyTask(SampleTask):
    """One greedy answer whose (long) prompt prefill reports progress."""

    def __init__(self, engine: Engine, prompt: Sequence[int], max_tokens: int, progress: PrefillProgress | None,
                 what: str) -> None:
        super().__init__(engine, prompt, SamplingParams(temperature=0.0), max_tokens)
        self._progress, self._what = progress, what

    def prefill(self, engine: Engine, base: int, reserve: int) -> np.ndarray:
        return prefill(engine, self.prompt, seq=base, progress=self._progress, what=self._what, reserve=reserve)


def generate_batch(engine: Engine, prompts: Sequence[Sequence[int]], max_tokens: int,
                   progress: PrefillProgress | None = None, what: str = "chunk") -> list[str]:
    """Greedy answers to several prompts decoded together (one `engine.step` for all live sequences per
    token, kiln.runtime.batching's continuous batch, as kiln serve runs requests): the map step over
    chunks. The engine needs n_seq_max >= len(prompts); prompts that do not fit its KV pool together
    start as earlier ones finish."""
    tasks = [_GreedyTask(engine, p, max_tokens, progress, f"{what} {i + 1}/{len(prompts)}")
             for i, p in enumerate(prompts)]
    with ContinuousBatch(engine) as batch:
        failures = batch.run(tasks)
    if failures:
        raise failures[0].error
    return [t.choices[0].text.strip() for t in tasks]


@dataclass
class DocumentOptions:
    """How `answer` treats a document that does not fit, and how chunks are made and chosen."""

    overflow: str = "error"
    chunk_size: int = DEFAULT_CHUNK
    overlap: int = DEFAULT_OVERLAP
    rank: str = DEFAULT_RANK
    pack: str = DEFAULT_PACK
    max_chunks: int = DEFAULT_MAX_CHUNKS
    batch: int = 4  # chunks decoded together in the map step (sequences of one engine)

    def validate(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise KilnError(_not_one_of("--overflow", self.overflow, OVERFLOW_POLICIES))
        if self.rank not in RANK_METHODS:
            raise KilnError(_not_one_of("--rank", self.rank, RANK_METHODS))
        if self.pack not in PACK_POLICIES:
            raise KilnError(_not_one_of("--pack", self.pack, PACK_POLICIES))
        check_chunking(self.chunk_size, self.overlap)
        if self.max_chunks < 1:
            raise KilnError(f"--max-chunks {self.max_chunks}: must be positive")
        if self.batch < 1:
            raise KilnError(f"batch {self.batch}: must be positive")


@dataclass
class DocumentAnswer:
    """What `answer` did: the final prompt's tokens and how the document got there."""

    mode: str  # "whole", "truncate", "ranked", "map-reduce"
    prompt: list[int]
    document_tokens: int
    notes: list[str] = field(default_factory=list)
    chunks: int = 0
    selected: list[int] = field(default_factory=list)  # ranked: chosen chunk indices, document order
    partial: list[str] = field(default_factory=list)  # map-reduce: the answer per chunk

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "document_tokens": self.document_tokens, "prompt_tokens": len(self.prompt),
                "notes": self.notes, "chunks": self.chunks, "selected": self.selected, "partial": self.partial}


@dataclass
class Prepared:
    """A document read and tokenized with a small engine (no KV beyond a few cells), before the engine that
    answers is sized: what `context_plan` and the memory check need."""

    mode: str
    window: int
    frame: PromptFrame
    fitted: Fitted | None = None
    chunks: list[Chunk] = field(default_factory=list)
    question: str | None = None
    instruction: str | None = None
    notes: list[str] = field(default_factory=list)
    total: int = 0
    chosen: list[Chunk] | None = None  # ranked: the packed chunks, when the ranking needs no model (BM25)
    packed: list[int] = field(default_factory=list)  # ranked: their merged tokens


def prepare(engine: Engine, source: str | Path | BinaryIO, instruction: str | None, *, question: str | None = None,
            window: int | None = None, max_tokens: int = 128, options: DocumentOptions | None = None,
            chat: bool = False, system: str | None = None, thinking: bool | None = None,
            name: str | None = None) -> Prepared:
    """Read and tokenize the document against `window` (default: the artifact's context) and choose the mode:
    "whole" when the prompt fits, else the overflow policy ("error" raises; "truncate"; "chunk" -> "ranked"
    with a question, "map-reduce" without). Reading stops early where the policy allows (error; a chunk
    count over max_chunks)."""
    options = options or DocumentOptions()
    options.validate()
    window = int(window or engine.context_length)
    fr = frame(engine, instruction, chat=chat, system=system, thinking=thinking)
    budget = window - fr.overhead - max_tokens
    what = (f"the window of {window} leaves {max(budget, 0)} for it ({fr.overhead} for the prompt around it, "
            f"{max_tokens} to generate)")
    if budget < 1:
        raise KilnError(f"no room for the document: {what}")
    pieces = document_tokens(engine, source, name)
    if options.overflow != "chunk":
        fitted = fit(engine, pieces, budget, options.overflow, name=name, what=what)
        notes = [fitted.note()] if fitted.dropped else []
        return Prepared(fitted.policy, window, fr, fitted, notes=notes, total=fitted.total,
                        instruction=instruction)
    # chunk: whole if it fits, else chunks from what was read so far plus the rest of the stream
    head: list[list[int]] = []
    count = 0
    for ids in pieces:
        head.append(ids)
        count += len(ids)
        if count > budget:
            break
    if count <= budget:
        tokens = [t for ids in head for t in ids]
        return Prepared("whole", window, fr, Fitted(tokens, len(tokens)), total=len(tokens), instruction=instruction)

    def stream() -> Iterator[list[int]]:
        yield from head
        yield from pieces

    chunks = list(chunk(engine, stream(), options.chunk_size, options.overlap, options.max_chunks, name=name))
    total = chunks[-1].end
    mode = "ranked" if question else "map-reduce"
    prep = Prepared(mode, window, fr, None, chunks, question, instruction, total=total,
                    notes=[f"document of {total} tokens over the window's {budget}: {len(chunks)} chunks of "
                           f"{options.chunk_size} tokens ({options.overlap} overlap), "
                           + (f"ranked by {options.rank}" if question else "map-reduce")])
    if mode == "ranked" and RANKINGS[options.rank].model_free:  # pack now, so the context is sized to it
        pack_chunks(engine, prep, options, budget)
    return prep


def pack_chunks(engine: Engine, prep: Prepared, options: DocumentOptions, budget: int,
                progress: PrefillProgress | None = None) -> None:
    """Rank a prepared document's chunks and choose what goes into the window (`select`), into
    `prep.chosen` / `prep.packed`, with notes naming them."""
    scores = rank(prep.chunks, prep.question or "", options.rank, engine, progress)
    floor = RANKINGS[options.rank].floor
    chosen = select(prep.chunks, scores, budget, engine, options.pack, floor)
    if not chosen:
        raise KilnError(f"no chunk of {options.chunk_size} tokens fits the window's {budget}: lower --chunk-size")
    prep.notes.append(f"kept {len(chosen)} of {len(prep.chunks)} chunks: "
                      + ", ".join(str(c.index + 1) for c in chosen))
    if options.pack == "relevant" and floor is not None:
        unrelated = sum(x <= floor for x in scores)
        if unrelated == len(scores):
            prep.notes.append("no chunk shares a word with the question: the window is filled in document order")
        elif unrelated:
            prep.notes.append(f"{unrelated} chunk(s) share no word with the question and were left out "
                              "(--pack fill packs them)")
    prep.chosen, prep.packed = chosen, merge_tokens(chosen, engine)


def _map_frame(engine: Engine, prep: Prepared, i: int, n: int, chat: bool, system: str | None,
               thinking: bool | None) -> PromptFrame:
    return frame(engine, prep.instruction or MAP_INSTRUCTION, chat=chat, system=system, thinking=thinking,
                 before=f"Part {i + 1} of {n} of a long document:\n\n")


def _reduce_prompt(engine: Engine, answers: Sequence[str], instruction: str | None, chat: bool,
                   system: str | None, thinking: bool | None) -> list[int]:
    parts = "\n\n".join(f"Part {i + 1}: {a}" for i, a in enumerate(answers))
    task = instruction or "Summarize the document."
    fr = frame(engine, f"These are answers for each part of a long document, in order. Combine them into one "
                       f"answer to: {task}", chat=chat, system=system, thinking=thinking)
    return fr.build(engine.tokenize(parts, add_special=False, parse_special=False))


MAP_SLACK = 64  # tokens a chunk's prompt adds to the document's frame ("Part i of n ..."; the map instruction)


def plan_sizes(prep: Prepared, shared_kv_pool: bool, max_tokens: int, particles: int = 1,
               options: DocumentOptions | None = None) -> dict[str, int]:
    """`n_ctx` / `n_seq_max` for answering a prepared document: the final prompt (at most the window less
    max_tokens, or exactly the document's prompt when it fits) with `particles` sequences, and in map-reduce
    the chunk prompts decoded `options.batch` at a time."""
    options = options or DocumentOptions()
    options.validate()
    if prep.mode in ("whole", "truncate"):
        final = prep.frame.overhead + len(prep.fitted.tokens)
        return context_plan(shared_kv_pool, [final], max_tokens, particles)
    final = prep.window - max_tokens
    if prep.mode == "ranked":
        if prep.chosen is not None:  # packed in prepare (a model-free ranking): exactly its prompt
            return context_plan(shared_kv_pool, [prep.frame.overhead + len(prep.packed)], max_tokens, particles)
        final = min(final, prep.frame.overhead + sum(len(c.tokens) for c in prep.chunks) + 16)
        if not RANKINGS[options.rank].model_free:  # the model scores each chunk alone: chunk + cue + question
            final = max(final, max(len(c.tokens) for c in prep.chunks) + MAP_SLACK + len((prep.question or "").encode()))
        return context_plan(shared_kv_pool, [final], max_tokens, particles)
    longest = max(len(c.tokens) for c in prep.chunks) + prep.frame.overhead + MAP_SLACK
    batch = min(options.batch, len(prep.chunks))
    maps = context_plan(shared_kv_pool, [longest] * batch, max_tokens, 1)
    reduce_bound = min(final, prep.frame.overhead + MAP_SLACK + len(prep.chunks) * (max_tokens + 8))
    fin = context_plan(shared_kv_pool, [reduce_bound], max_tokens, particles)
    return {"n_ctx": max(maps["n_ctx"], fin["n_ctx"]), "n_seq_max": max(maps["n_seq_max"], fin["n_seq_max"])}


def run_prepared(engine: Engine, prep: Prepared, *, max_tokens: int = 128, options: DocumentOptions | None = None,
                 chat: bool = False, system: str | None = None, thinking: bool | None = None,
                 progress: PrefillProgress | None = None,
                 on_partial: Callable[[int, str], None] | None = None) -> DocumentAnswer:
    """Everything before the final pass, on the engine that answers: rank and pack (ranked), or the map step
    and the reductions down to one prompt (map-reduce). Returns the final prompt's tokens to generate from."""
    options = options or DocumentOptions()
    budget = prep.window - prep.frame.overhead - max_tokens
    if prep.mode in ("whole", "truncate"):
        return DocumentAnswer(prep.mode, prep.frame.build(prep.fitted.tokens), prep.total, list(prep.notes))
    if prep.mode == "ranked":
        if prep.chosen is None:
            pack_chunks(engine, prep, options, budget, progress)
        return DocumentAnswer("ranked", prep.frame.build(prep.packed), prep.total, list(prep.notes),
                              len(prep.chunks), [c.index for c in prep.chosen])
    # map-reduce
    n = len(prep.chunks)
    answers: list[str] = [""] * n
    batch = max(1, min(options.batch, n, engine.n_seq_max))
    if engine.shared_kv_pool:  # every sequence's cells come from one pool
        longest = max(len(c.tokens) for c in prep.chunks) + prep.frame.overhead + MAP_SLACK
        batch = max(1, min(batch, engine.n_ctx // (longest + max_tokens)))
    for lo in range(0, n, batch):
        group = prep.chunks[lo:lo + batch]
        prompts = [_map_frame(engine, prep, c.index, n, chat, system, thinking).build(c.tokens) for c in group]
        outs = generate_batch(engine, prompts, max_tokens, progress, what=f"chunks {lo + 1}-{lo + len(group)}/{n}")
        for c, a in zip(group, outs):
            answers[c.index] = a
            if on_partial:
                on_partial(c.index, a)
    notes = list(prep.notes)
    level = answers
    rounds = 0
    while True:
        prompt = _reduce_prompt(engine, level, prep.instruction, chat, system, thinking)
        if len(prompt) + max_tokens <= prep.window or len(level) == 1:
            if len(prompt) + max_tokens > prep.window:
                raise KilnError("one partial answer does not fit the window: lower --max-tokens")
            break
        # too many partial answers for one prompt: reduce them in groups that fit, then again
        groups, cur = [], []
        for a in level:
            if cur and len(_reduce_prompt(engine, cur + [a], prep.instruction, chat, system, thinking)) + max_tokens \
                    > prep.window:
                groups.append(cur)
                cur = []
            cur.append(a)
        groups.append(cur)
        if len(groups) == len(level):
            raise KilnError("the window cannot hold two partial answers: lower --max-tokens or raise --chunk-size")
        level = []
        for g in groups:
            level += generate_batch(engine, [_reduce_prompt(engine, g, prep.instruction, chat, system, thinking)],
                                    max_tokens, progress, what="reduce")
        rounds += 1
    if rounds:
        notes.append(f"partial answers reduced in {rounds + 1} rounds")
    return DocumentAnswer("map-reduce", prompt, prep.total, notes, n, partial=answers)


def answer(engine: Engine, source: str | Path | BinaryIO, instruction: str | None = None, *,
           question: str | None = None, max_tokens: int = 128, options: DocumentOptions | None = None,
           chat: bool = False, system: str | None = None, thinking: bool | None = None,
           temperature: float = 0.0, seed: int | None = None, steer: tuple[Any, Any] | None = None,
           progress: PrefillProgress | None = None, on_token: Callable[[int], None] | None = None,
           name: str | None = None) -> dict[str, Any]:
    """Answer `instruction` (and/or `question`) over a document on an open engine, by `options.overflow` when
    it does not fit the engine's context. The final pass is plain generation (`temperature`, `seed`) or, with
    `steer=(SteerOptions, Constraints)`, SMC steering with those potentials (the engine then needs the
    particles' sequences). Returns the generation's json (`text`, ... or SMC's result json) plus `document`
    (`DocumentAnswer.to_json()`)."""
    options = options or DocumentOptions()
    instruction = instruction if instruction is not None else question
    prep = prepare(engine, source, instruction, question=question, window=engine.n_ctx, max_tokens=max_tokens,
                   options=options, chat=chat, system=system, thinking=thinking, name=name)
    return final_pass(engine, prep, max_tokens=max_tokens, options=options, chat=chat, system=system,
                      thinking=thinking, temperature=temperature, seed=seed, steer=steer, progress=progress,
                      on_token=on_token)


def final_pass(engine: Engine, prep: Prepared, *, max_tokens: int, options: DocumentOptions, chat: bool,
               system: str | None, thinking: bool | None, temperature: float, seed: int | None,
               steer: tuple[Any, Any] | None, progress: PrefillProgress | None,
               on_token: Callable[[int], None] | None, cache_key_artifact: str | None = None,
               on_step: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    doc = run_prepared(engine, prep, max_tokens=max_tokens, options=options, chat=chat, system=system,
                       thinking=thinking, progress=progress)
    if steer is not None:
        from kiln.runtime.steering import steer as run_steer

        steer_options, constraints = steer
        engine.reset()
        prefill(engine, doc.prompt, seq=0, progress=progress, what="prompt",
                reserve=steer_options.particles * max_tokens)
        engine.drop_seq(0)
        out, hit = run_steer(engine, doc.prompt, steer_options, constraints, on_step=on_step,
                             cache_key_artifact=cache_key_artifact, use_cache=cache_key_artifact is not None)
        out["cached"] = hit
        out["prompt_tokens"] = len(doc.prompt)
    else:
        from kiln.runtime.generate import generate

        out = generate(engine, doc.prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                       on_token=on_token, on_prefill=progress).to_json()
    out["document"] = doc.to_json()
    return out


def answer_document(artifact: str | Path, source: str | Path | BinaryIO, instruction: str | None = None, *,
                    question: str | None = None, max_tokens: int = 128, options: DocumentOptions | None = None,
                    chat: bool = False, system: str | None = None, thinking: bool | None = None,
                    temperature: float = 0.0, seed: int | None = None, steer: tuple[Any, Any] | None = None,
                    threads: int | None = None, n_ctx: int | None = None, memory_check: MemoryCheck | None = None,
                    progress: PrefillProgress | None = None, on_token: Callable[[str], None] | None = None,
                    on_step: Callable[[Any], Any] | None = None, on_note: Callable[[str], None] | None = None,
                    use_cache: bool = True, name: str | None = None) -> dict[str, Any]:
    """`kiln generate --prompt-file` as one call: read and tokenize the document with a small engine, choose
    the mode (whole, truncate, ranked chunks, map-reduce), size the answering engine's context from the token
    counts (`n_ctx` overrides the window), check it with `memory_check(n_ctx, n_seq_max)` before it is
    allocated, then answer. `on_note` gets each line a user should read (what was truncated, chunks chosen);
    `on_token` each generated token's text as it comes (plain generation)."""
    from kiln.formats import require_format

    options = options or DocumentOptions()
    options.validate()
    if steer is not None:
        steer[0].validate()
    path = Path(artifact)
    fmt = require_format(path)
    instruction = instruction if instruction is not None else question
    particles = steer[0].particles if steer is not None else 1
    with fmt.open_engine(path, n_ctx=256, threads=threads) as small:
        window = n_ctx or small.context_length
        prep = prepare(small, source, instruction, question=question, window=window, max_tokens=max_tokens,
                       options=options, chat=chat, system=system, thinking=thinking, name=name)
    sizes = plan_sizes(prep, fmt.shared_kv_pool, max_tokens, particles, options)
    if n_ctx:  # the window each sequence may fill; one shared pool still holds the batch's or the particles' cells
        sizes["n_ctx"] = max(sizes["n_ctx"], n_ctx) if fmt.shared_kv_pool else n_ctx
    if memory_check is not None:
        memory_check(sizes["n_ctx"], sizes["n_seq_max"])
    told = len(prep.notes)
    for note in prep.notes:
        if on_note:
            on_note(note)
    with fmt.open_engine(path, threads=threads, **sizes) as engine:
        prep.window = min(prep.window, engine.n_ctx)
        key = None
        if steer is not None and use_cache and steer[0].seed is not None:
            from kiln.runtime.cache import artifact_hash

            key = artifact_hash(path)
        stream = None if on_token is None else (lambda t: on_token(engine.detokenize([t])))
        out = final_pass(engine, prep, max_tokens=max_tokens, options=options, chat=chat, system=system,
                         thinking=thinking, temperature=temperature, seed=seed, steer=steer, progress=progress,
                         on_token=stream, cache_key_artifact=key, on_step=on_step)
    out["n_ctx"] = sizes["n_ctx"]
    for note in out["document"]["notes"][told:]:
        if on_note:
            on_note(note)
    return out


def stdin_source() -> BinaryIO:
    """Standard input as a binary stream (`--prompt-file -`)."""
    import sys

    return getattr(sys.stdin, "buffer", None) or io.BytesIO(sys.stdin.read().encode())
