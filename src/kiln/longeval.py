"""`kiln eval --long`: long-range quality of artifacts — NLL by position and passkey retrieval.

Two measurements, on any mix of HF checkpoint directories, GGUF files and ONNX directories, at context
lengths up to each artifact's advertised window:

* **NLL by position.** The long text (below) is tokenized by each artifact's own tokenizer and cut into
  chunks of `length` tokens (BOS first where the tokenizer adds one); each chunk is ONE forward from an
  empty cache (fed in slices of 512 tokens that continue the same KV cache, so the logits are those of a
  single long forward, never a sliding window), and the NLL of every position is averaged over chunks and
  then in position buckets [0, B), [B, 2B), [2B, 4B), … up to `length` (B = 1024, or length/8 for short
  contexts). With a `baseline` artifact (the unscaled model), the same tokens are also scored by the baseline
  in pieces of its own window — what "truncating to the native window" gives — and each artifact's row says
  plainly when it is worse than that.
* **Passkey retrieval** (Mohtashami & Jaggi 2023): synthetic filler ("The grass is green. The sky is
  blue. …"), one line "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth of 10–90 %,
  and "What is the pass key? The pass key is" at the end. Scored by the log-probability of the key's
  tokens (teacher-forced) and by greedy exact match (every key token is the argmax given the previous
  ones, which is what greedy decoding would produce: one forward gives both).

**The text.** Default: the Python language reference that ships with every CPython interpreter
(`pydoc_data.topics`, the text `help()` shows: about 465 000 characters of English technical prose with
code examples, under the PSF licence), its topics concatenated in sorted order, each under its name. It is
natural text long enough for 32K tokens, present on every machine that runs kiln without a download and
without a new dependency. Chosen over kiln's own `data/heldout.txt` (about 3K tokens: too short) and
`data/calibration.txt` (sampled from SmolLM2 itself: a model scores its own samples too kindly), over the
stdlib `.py` sources (code, not prose) and over prose in a PyPI package (a new dependency for one text).
Its content can change between Python releases, so the result records the interpreter version, the topic
list and the text's sha256, and the cache is keyed by that hash: the same interpreter always gives the
same text (`text_record()`). `--text FILE` scores another text.

Every (artifact, measurement, length, depth) cell is cached as one JSON file under `cache_dir`, keyed by
the artifact (path, size, modification time of its files), the text hash and the cell's settings, so an
interrupted run resumes where it stopped and a second run computes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.formats import by_name, format_of

SLICE = 512  # tokens fed per forward call; the KV cache continues, so this is one long forward
BLOCK = 16  # NLL is kept as sums over blocks of 16 positions: every bucket edge is a multiple of it
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"
FINDINGS = Path(__file__).parent / "data" / "rope_findings.json"


# ------------------------------------------------------------------------------------------- the text
def text_record() -> tuple[str, dict[str, Any]]:
    """The default long text and its record (source, interpreter version, topics, sha256)."""
    from pydoc_data import topics as pd

    names = sorted(pd.topics)
    text = "".join(f"{name}\n{'=' * len(name)}\n\n{pd.topics[name].strip()}\n\n" for name in names)
    return text, {"source": "pydoc_data.topics (CPython's language reference, PSF licence)",
                  "python": sys.version.split()[0], "topics": names, "chars": len(text),
                  "sha256": hashlib.sha256(text.encode()).hexdigest()}


def file_text_record(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KilnError(f"{path}: cannot read text ({getattr(exc, 'strerror', None) or exc})") from None
    return text, {"source": str(path), "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


def bucket_edges(length: int, first: int | None = None) -> list[int]:
    """[0, B, 2B, 4B, …, length] with B = min(1024, length // 8) rounded down to a multiple of BLOCK (at
    least BLOCK) unless given: a run uses the B of its shortest length for every length, so the tables'
    columns line up."""
    first = first or max(BLOCK, min(1024, length // 8) // BLOCK * BLOCK)
    edges, e = [0], first
    while e < length:
        edges.append(e)
        e *= 2
    return edges + [length]


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KilnError(f"--depths {text!r}: expected fractions like 0.1,0.5,0.9") from None
    if not depths or any(not 0 <= d <= 1 or not math.isfinite(d) for d in depths):
        raise KilnError(f"--depths {text!r}: expected fractions between 0 and 1, like 0.1,0.5,0.9")
    return sorted(set(depths))


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise KilnError(f"--lengths {text!r}: expected token counts like 1024,4096,8192") from None
    if not lengths or lengths[0] < 64:
        raise KilnError(f"--lengths {text!r}: expected token counts of at least 64")
    return lengths


# --------------------------------------------------------------------------------------- the runners
class _HFStream:
    """A transformers model fed like an engine: `prefill` continues one KV cache (slices of SLICE)."""

    def __init__(self, path: Path, threads: int | None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._past, self._pos = None, 0

    def reset(self) -> None:
        self._past, self._pos = None, 0

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        torch = self._torch
        ids = torch.tensor([list(tokens)])
        pos = torch.arange(self._pos, self._pos + len(tokens)).unsqueeze(0)
        with torch.no_grad():
            out = self.model(input_ids=ids, position_ids=pos, cache=self._past, use_cache=True)
        self._past, self._pos = out.cache, self._pos + len(tokens)
        logits = out.logits[0].float().numpy()
        return logits if all_logits else logits[-1]


@dataclass
class Artifact:
    path: Path
    kind: str  # hf, gguf, onnx
    window: int
    _key: str | None = None

    def key(self) -> str:
        """The sha256 of the artifact's files (names and contents), not of its path or modification time:
        exports are deterministic, so a cell measured on one machine is found again on another for the same
        artifact (bench/longctx.py commits its cells), and a changed exporter invalidates them. kiln's
        manifest inside a directory artifact is not hashed: it records the source's absolute path and the
        verification's figures, which differ from machine to machine for the same model files."""
        if self._key is None:
            manifest = by_name(self.kind).manifest_path(self.path) if self.kind != "hf" else None
            files = [self.path] if self.path.is_file() else sorted(
                p for p in self.path.iterdir() if p.is_file() and p != manifest)
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f.name}\0".encode())
                with f.open("rb") as fh:
                    while block := fh.read(1 << 22):
                        h.update(block)
            self._key = h.hexdigest()[:16]
        return self._key


def describe(path: str | Path | Artifact) -> Artifact:
    """Kind and advertised window of an artifact (one-line KilnError for a bad path). An `Artifact`
    is returned as it is: a caller running several grids over the same files (bench/longctx.py's
    sittings) describes them once, and their content hash is computed once."""
    if isinstance(path, Artifact):
        return path
    path = Path(path)
    if not path.exists():
        raise KilnError(f"{path}: no such file or directory")
    fmt = format_of(path)
    if fmt is not None:
        with fmt.open_engine(path, n_ctx=64, threads=1) as engine:
            return Artifact(path, fmt.name, int(engine.context_length))
    if path.is_dir() and (path / "config.json").exists():
        config = json.loads((path / "config.json").read_text())
        window = config.get("max_position_embeddings") or config.get("n_positions")
        if not window:
            raise KilnError(f"{path}/config.json: no max_position_embeddings")
        return Artifact(path, "hf", int(window))
    raise KilnError(f"{path}: expected an HF checkpoint directory, a .gguf file or an ONNX model directory")


def engine_options(fmt: Any, exact: bool) -> dict[str, Any]:
    """`exact`: the format's verification settings (llama.cpp: flash attention off, f32 KV), as `kiln eval`.
    Otherwise the fast ones users run (llama.cpp: flash attention on): measured on SmolLM2 yarn:4 q8_0 on
    2 cores, 1.4x faster at 4K and 1.8x at 16K; per-position NLL differs by up to 0.8 nats (p99 0.37) but
    the mean over 4K-16K tokens by under 0.002 nats, below the third decimal the tables print
    (docs/long-context.md, "Which engine path")."""
    return dict(fmt.verification_options) if exact else fmt.engine_options(flash_attn=True)


class _Runner:
    """Tokenize and feed one artifact (an engine of kiln.runtime, or transformers for a checkpoint)."""

    def __init__(self, art: Artifact, n_ctx: int, threads: int | None, exact: bool = False):
        self.art = art
        fmt = format_of(art.path)
        if fmt is not None:
            self.engine = fmt.open_engine(art.path, n_ctx=n_ctx, threads=threads, **engine_options(fmt, exact))
            self.hf = None
        else:
            from tokenizers import Tokenizer

            self.engine = None
            self.hf = _HFStream(art.path, threads)
            self._tok = Tokenizer.from_file(str(art.path / "tokenizer.json"))

    def tokenize(self, text: str, special: bool) -> list[int]:
        if self.engine is not None:
            return self.engine.tokenize(text, add_special=special, parse_special=False)
        return list(self._tok.encode(text, add_special_tokens=special).ids)

    def prefix(self) -> list[int]:
        """BOS where the tokenizer adds one."""
        return self.tokenize("", special=True)

    def reset(self) -> None:
        (self.engine or self.hf).reset()

    def prefill(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        if self.engine is not None:
            return self.engine.prefill(list(tokens), seq=0, all_logits=all_logits)
        return self.hf.prefill(tokens, all_logits)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def position_nll(run: _Runner, ids: Sequence[int], tick: Callable[[int], None] | None = None) -> np.ndarray:
    """NLL of tokens 1..n-1 of `ids` (index j: the prediction of ids[j+1]) from one forward, fed in slices."""
    run.reset()
    out = np.empty(len(ids) - 1)
    for lo in range(0, len(ids) - 1, SLICE):
        part = ids[lo:lo + SLICE]
        lp = _log_softmax(run.prefill(part, all_logits=True))
        targets = np.asarray(ids[lo + 1:lo + 1 + len(part)])
        k = len(targets)
        out[lo:lo + k] = -lp[np.arange(k), targets]
        if tick:
            tick(len(part))
    run.reset()
    return out


def passkey_prompt(run: _Runner, length: int, depth: float, key: str) -> tuple[list[int], list[int], int]:
    """(prompt ids, key ids, needle's token offset) of about `length` tokens in all."""
    key_ids = run.tokenize(" " + key, special=False)
    head = run.prefix() + run.tokenize(INTRO, special=False)
    needle = run.tokenize(NEEDLE.format(key=key), special=False)
    question = run.tokenize(QUESTION, special=False)
    unit = run.tokenize(FILLER, special=False)
    room = length - len(head) - len(needle) - len(question) - len(key_ids)
    units = room // len(unit)
    if units < 1:
        raise KilnError(f"a passkey prompt of {length} tokens leaves no room for filler; use a longer length")
    before = round(depth * units)
    ids = head + unit * before
    at = len(ids)
    ids += needle + unit * (units - before) + question
    return ids, key_ids, at


def passkey_cell(run: _Runner, length: int, depth: float, key: str,
                 tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    ids, key_ids, at = passkey_prompt(run, length, depth, key)
    run.reset()
    last = None
    for lo in range(0, len(ids), SLICE):
        last = run.prefill(ids[lo:lo + SLICE])
        if tick:
            tick(len(ids[lo:lo + SLICE]))
    rows = [last]
    if len(key_ids) > 1:
        rows += list(run.prefill(key_ids[:-1], all_logits=True))
    run.reset()
    lp = _log_softmax(np.stack(rows))
    logprob = float(sum(lp[i, t] for i, t in enumerate(key_ids)))
    greedy = [int(r.argmax()) for r in lp]
    return {"tokens": len(ids), "needle_at": at, "key": key, "logprob": logprob,
            "exact": greedy == list(key_ids), "first_token_correct": greedy[0] == key_ids[0]}


def passkey_key(length: int, depth: float, trial: int, seed: int) -> str:
    """A 5-digit key, fixed by (length, depth, trial, seed)."""
    h = hashlib.sha256(f"{seed}:{length}:{depth:.4f}:{trial}".encode()).digest()
    return str(10000 + int.from_bytes(h[:4], "little") % 90000)


# ----------------------------------------------------------------------------------------- the run
@dataclass
class LongProgress:
    """What a progress callback gets: tokens fed so far of all the uncached cells, cells done."""
    done: int
    total: int
    cells_done: int
    cells: int
    elapsed: float
    what: str

    @property
    def eta(self) -> float | None:
        return self.elapsed / self.done * (self.total - self.done) if self.done else None

    def text(self) -> str:
        eta = "—" if self.eta is None else f"{self.eta:.0f} s"
        rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        return (f"{self.what} · cell {self.cells_done}/{self.cells} · {self.done}/{self.total} tokens · "
                f"{rate:.0f} tok/s · ETA {eta}")


class _Cache:
    def __init__(self, root: Path | None):
        self.root = root

    def path(self, art: Artifact, cell: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        name = hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:20]
        return self.root / art.key() / f"{cell['kind']}-{cell['length']}-{name}.json"

    def get(self, art: Artifact, cell: dict[str, Any]) -> dict[str, Any] | None:
        p = self.path(art, cell)
        if p is None or not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            return None  # a damaged entry is recomputed
        return data if data.get("cell") == cell else None

    def put(self, art: Artifact, cell: dict[str, Any], result: dict[str, Any]) -> None:
        p = self.path(art, cell)
        if p is None:
            return
        from kiln.atomic import atomic_file

        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(p) as tmp:
            tmp.write_text(json.dumps({"cell": cell, "artifact": str(art.path), **result}, sort_keys=True))


def long_eval(artifacts: Sequence[str | Path | Artifact], lengths: Sequence[int] | None = None, *,
              depths: Sequence[float] = DEFAULT_DEPTHS, chunks: int = 1, trials: int = 1, seed: int = 0,
              text: str | None = None, text_info: dict[str, Any] | None = None,
              baseline: str | Path | Artifact | None = None,
              retrieval: bool = True, perplexity: bool = True, cache_dir: str | Path | None = None,
              threads: int | None = None, progress: Callable[[LongProgress], None] | None = None,
              exact: bool = False, deadline: float | None = None) -> dict[str, Any]:
    """Run the grid; returns the JSON-able result (see `markdown`, `write_outputs`).

    `artifacts`: paths, or `describe`d artifacts (hashed once across calls).
    `lengths`: token counts (default: each artifact's window only); a length beyond an artifact's window
    is refused before anything runs. `chunks`: chunks of the text per length for the NLL. `baseline`: the
    unscaled model, scored over the same tokens in pieces of its own window (truncation). `exact`: the
    engines' verification settings instead of the fast ones (`engine_options`). `deadline` (a
    `time.monotonic()` value): no cell starts after it; the cells not run are left out of the result and
    counted in its "cells_missing" (a long grid is run in sittings, the cache keeping what each measured).
    """
    depths = list(depths)
    if any(not 0 <= d <= 1 for d in depths) or (retrieval and not depths):
        raise KilnError(f"depths {depths}: expected fractions between 0 and 1")
    if chunks < 1 or trials < 1:
        raise KilnError("chunks and trials must be at least 1")
    if not artifacts:
        raise KilnError("no artifact given")
    arts = [describe(a) for a in artifacts]
    base = describe(baseline) if baseline is not None else None
    plan = {}
    for art in arts:
        ls = sorted(set(lengths)) if lengths else [art.window]
        over = [n for n in ls if n > art.window]
        if over:
            raise KilnError(f"{art.path}: length {over[0]} exceeds its advertised window of {art.window} tokens")
        plan[str(art.path)] = ls
    if text is None:
        text, text_info = text_record()
    text_info = text_info or {"sha256": hashlib.sha256(text.encode()).hexdigest(), "chars": len(text)}
    cache = _Cache(Path(cache_dir) if cache_dir else None)

    # the cells, with the cached ones found first (the progress total counts only what must run)
    todo: list[tuple[Artifact, dict[str, Any]]] = []
    engine = "exact" if exact else "fast"
    # one truncation cell: the baseline's pieces of its window over the longest length measured; a shorter
    # length's verdict uses its first pieces (the same tokens)
    longest = max((n for a in arts if base is not None and a.path != base.path for n in plan[str(a.path)]), default=0)
    covers = longest if base is not None and longest > base.window else 0
    if perplexity and covers:
        todo.append((base, {"kind": "nll", "length": base.window, "chunks": chunks * -(-covers // base.window),
                            "text": text_info["sha256"], "covers": covers, "engine": engine}))
    for art in arts:
        for n in plan[str(art.path)]:
            if perplexity:
                todo.append((art, {"kind": "nll", "length": n, "chunks": chunks, "text": text_info["sha256"],
                                   "engine": engine}))
            if retrieval:
                for d in depths:
                    for t in range(trials):
                        todo.append((art, {"kind": "passkey", "length": n, "depth": round(d, 4), "trial": t,
                                           "seed": seed, "filler": FILLER, "needle": NEEDLE, "engine": engine}))
    unique = {(str(a.path), json.dumps(c, sort_keys=True)): (a, c) for a, c in todo}  # a baseline cell serves
    todo = list(unique.values())  # every artifact of its length: measured once
    results: dict[tuple[str, str], dict[str, Any]] = {}
    pending = []
    for art, cell in todo:
        hit = cache.get(art, cell)
        if hit is not None:
            results[(str(art.path), json.dumps(cell, sort_keys=True))] = {**hit, "cached": True}
        else:
            pending.append((art, cell))
    total = sum(c["length"] * (c["chunks"] if c["kind"] == "nll" else 1) for _, c in pending)
    t0, fed = time.monotonic(), [0]
    state = {"cells_done": 0, "what": ""}

    def tick(n: int) -> None:
        fed[0] += n
        if progress:
            progress(LongProgress(fed[0], total, state["cells_done"], len(pending), time.monotonic() - t0,
                                  state["what"]))

    token_cache: dict[str, list[int]] = {}
    by_art: dict[str, list[dict[str, Any]]] = {}
    for art, cell in pending:
        by_art.setdefault(str(art.path), []).append(cell)
    art_of = {str(a.path): a for a in [*arts, *([base] if base else [])]}
    for key, cells in by_art.items():
        if deadline is not None and time.monotonic() > deadline:
            break
        art = art_of[key]
        run = _Runner(art, max(c["length"] for c in cells), threads, exact)
        try:
            for cell in cells:
                if deadline is not None and time.monotonic() > deadline:
                    break
                state["what"] = f"{art.path.name} {cell['kind']} {cell['length']}" + (
                    f" @{cell['depth']:.0%}" if cell["kind"] == "passkey" else "")
                started = time.monotonic()
                if cell["kind"] == "nll":
                    if key not in token_cache:
                        token_cache[key] = _text_ids(run, text, max(c["length"] * c["chunks"] for c in cells if c["kind"] == "nll"))
                    result = _nll_cell(run, token_cache[key], cell, tick)
                else:
                    result = passkey_cell(run, cell["length"], cell["depth"],
                                          passkey_key(cell["length"], cell["depth"], cell["trial"], cell["seed"]),
                                          tick)
                # wall time of the cell on this machine: the prefill speed of the engine at that length
                result["seconds"] = round(time.monotonic() - started, 1)
                result["threads"] = threads
                cache.put(art, cell, result)
                results[(key, json.dumps(cell, sort_keys=True))] = {**result, "cached": False}
                state["cells_done"] += 1
        finally:
            run.close()
    return _assemble(arts, base, plan, todo, results, text_info, depths, chunks, trials, seed, exact)


def _text_ids(run: _Runner, text: str, need: int) -> list[int]:
    """The first tokens of `text` (at least `need` + 64 where the text has them): a prefix of the text is
    tokenized (8 characters per token, doubled until enough), its last 64 tokens dropped, since the cut
    can split a word; the same text and need always give the same ids."""
    chars = 8 * (need + 64)
    while True:
        ids = run.tokenize(text[:chars], special=False)
        if chars >= len(text):
            return ids
        if len(ids) >= need + 128:
            return ids[:len(ids) - 64]
        chars *= 2


def _nll_cell(run: _Runner, text_ids: list[int], cell: dict[str, Any], tick) -> dict[str, Any]:
    n, k = cell["length"], cell["chunks"]
    prefix = run.prefix()
    body = n - len(prefix)
    need = body * k
    if len(text_ids) < need:
        raise KilnError(f"the text has {len(text_ids)} tokens, fewer than {k} chunk(s) of {n}; give a longer --text")
    total, means = np.zeros(n - 1), []
    for c in range(k):
        one = position_nll(run, prefix + text_ids[c * body:(c + 1) * body], tick)
        total += one
        means.append(float(one.mean()))
    nll = total / k
    return {"sums": block_sums(nll).round(4).tolist(), "mean": float(nll.mean()), "chunk_means": means, "tokens": n,
            "ids_sha256": hashlib.sha256(np.asarray(text_ids[:need], np.int64).tobytes()).hexdigest()}


def block_sums(nll: np.ndarray) -> np.ndarray:
    """Sums of NLL over positions [BLOCK*b, BLOCK*(b+1)) (`nll[j]` is position j+1's; position 0 has none):
    what a cell keeps. Every bucket mean is exact from them, a cell of 32K positions is 2K numbers instead
    of 32K, and the curve is plotted from the block means."""
    pos = np.concatenate([[0.0], np.asarray(nll, np.float64)])
    pad = -len(pos) % BLOCK
    return np.concatenate([pos, np.zeros(pad)]).reshape(-1, BLOCK).sum(axis=1)


def block_counts(length: int) -> np.ndarray:
    """How many positions with an NLL each block of a `length`-token chunk holds."""
    counts = np.full(-(-length // BLOCK), BLOCK, dtype=np.int64)
    counts[0] -= 1
    if length % BLOCK:
        counts[-1] = length % BLOCK - (1 if len(counts) == 1 else 0)
    return counts


def _buckets(sums: Sequence[float], length: int, first: int) -> list[dict[str, Any]]:
    """Mean NLL of positions [lo, hi) for each bucket, from a cell's block sums."""
    sums, counts = np.asarray(sums, np.float64), block_counts(length)
    edges = bucket_edges(length, first)
    out = []
    for lo, hi in zip(edges, edges[1:]):
        b0, b1 = lo // BLOCK, -(-hi // BLOCK)
        n = int(counts[b0:b1].sum())
        out.append({"lo": lo, "hi": hi, "tokens": n, "nll": float(sums[b0:b1].sum() / n) if n else None})
    return out


def _assemble(arts, base, plan, todo, results, text_info, depths, chunks, trials, seed, exact) -> dict[str, Any]:
    rows = []
    shortest = min(n for ls in plan.values() for n in ls)
    first = bucket_edges(shortest)[1] if shortest > 16 else 16

    def get(art, cell):
        return results.get((str(art.path), json.dumps(cell, sort_keys=True)))

    for art in arts:
        row: dict[str, Any] = {"artifact": str(art.path), "kind": art.kind, "window": art.window, "lengths": []}
        for n in plan[str(art.path)]:
            entry: dict[str, Any] = {"length": n}
            mine = [(a, c) for a, c in todo if a is art and c["length"] == n]
            nll_cells = [c for _, c in mine if c["kind"] == "nll" and get(art, c) is not None]
            if nll_cells:
                r = get(art, nll_cells[0])
                entry["buckets"] = _buckets(r["sums"], n, first)
                entry["mean_nll"] = float(r["mean"])
                entry["curve"] = (np.asarray(r["sums"]) / np.maximum(block_counts(n), 1)).round(4).tolist()
                if r.get("seconds") is not None and nll_cells[0]["chunks"] == 1:
                    entry["nll_seconds"] = r["seconds"]  # one forward with every position's logits
                tcell = next((c for a, c in todo if a is base and c.get("covers")), None) if base else None
                if tcell is not None and get(base, tcell) is not None and n > base.window:
                    # the baseline's pieces of its window over the same tokens: position j of the long chunk
                    # is predicted with at most `window` tokens of context; pieces of equal length, so the
                    # mean of the first ones that cover this length
                    pieces = get(base, tcell)["chunk_means"][:chunks * -(-n // base.window)]
                    trunc = float(np.mean(pieces))
                    entry["truncated_nll"] = trunc
                    entry["truncated_by"] = str(base.path)  # a merged result holds several baselines
                    entry["worse_than_truncation"] = entry["mean_nll"] > trunc
            pk = [(c, get(art, c)) for _, c in mine if c["kind"] == "passkey" and get(art, c) is not None]
            if pk:
                grid = {}
                for c, r in pk:
                    g = grid.setdefault(c["depth"], {"exact": 0, "logprob": 0.0, "n": 0})
                    g["exact"] += int(r["exact"])
                    g["logprob"] += r["logprob"]
                    g["n"] += 1
                entry["passkey"] = [{"depth": d, "accuracy": g["exact"] / g["n"], "logprob": g["logprob"] / g["n"],
                                     "trials": g["n"]} for d, g in sorted(grid.items())]
                entry["passkey_accuracy"] = float(np.mean([p["accuracy"] for p in entry["passkey"]]))
                timed = [r["seconds"] for _, r in pk if r.get("seconds") is not None]
                if timed:
                    entry["passkey_seconds"] = float(np.median(timed))  # one prefill of the length, last logits
            row["lengths"].append(entry)
        rows.append(row)
    cached = sum(1 for r in results.values() if r["cached"])
    return {"kind": "longeval", "text": text_info, "depths": depths, "chunks": chunks, "trials": trials,
            "seed": seed, "baseline": str(base.path) if base else None,
            "baseline_window": base.window if base else None, "rows": rows, "engine": "exact" if exact else "fast",
            "cells": len(results), "cells_cached": cached, "cells_missing": len(todo) - len(results)}


# ----------------------------------------------------------------------------------------- outputs
def markdown(result: dict[str, Any]) -> str:
    lines = [f"Text: {result['text'].get('source', 'given text')}, sha256 {result['text']['sha256'][:16]}…"
             + (f", Python {result['text']['python']}" if "python" in result["text"] else "")
             + f"; {result['chunks']} chunk(s) per length; passkey {result['trials']} trial(s) per cell, "
             f"seed {result['seed']}.", ""]
    nll_rows = [(r, e) for r in result["rows"] for e in r["lengths"] if "buckets" in e]
    if nll_rows:
        lines += ["**Mean NLL by position** (nats per token; lower is better)", ""]
        all_edges = sorted({(b["lo"], b["hi"]) for _, e in nll_rows for b in e["buckets"]})
        head = "| artifact | length | " + " | ".join(f"{_k(lo)}–{_k(hi)}" for lo, hi in all_edges) + " | mean |"
        lines += [head, "|---|---:|" + "---:|" * (len(all_edges) + 1)]
        for r, e in nll_rows:
            got = {(b["lo"], b["hi"]): b["nll"] for b in e["buckets"]}
            cells = " | ".join("" if got.get(k) is None else f"{got[k]:.3f}" for k in all_edges)
            lines.append(f"| {Path(r['artifact']).name} | {e['length']} | {cells} | {e['mean_nll']:.3f} |")
        lines.append("")
        verdicts = [(r, e) for r, e in nll_rows if "truncated_nll" in e]
        for r, e in verdicts:
            name = Path(r["artifact"]).name
            if e["worse_than_truncation"]:
                lines.append(f"- **{name} at {e['length']} tokens is worse than truncating to the native window**: "
                             f"mean NLL {e['mean_nll']:.3f} vs {e['truncated_nll']:.3f} for "
                             f"{Path(e.get('truncated_by') or result['baseline']).name} in pieces of "
                             f"{result['baseline_window']} tokens.")
            else:
                lines.append(f"- {name} at {e['length']} tokens beats truncation to the native window: mean NLL "
                             f"{e['mean_nll']:.3f} vs {e['truncated_nll']:.3f}.")
        if verdicts:
            lines.append("")
    pk_rows = [(r, e) for r in result["rows"] for e in r["lengths"] if "passkey" in e]
    if pk_rows:
        depths = sorted({p["depth"] for _, e in pk_rows for p in e["passkey"]})
        lines += ["**Passkey retrieval**: greedy exact match (mean log-probability of the key)", "",
                  "| artifact | length | " + " | ".join(f"{d:.0%}" for d in depths) + " | accuracy |",
                  "|---|---:|" + "---:|" * (len(depths) + 1)]
        for r, e in pk_rows:
            got = {p["depth"]: p for p in e["passkey"]}
            cells = " | ".join(f"{got[d]['accuracy']:.2f} ({got[d]['logprob']:.2f})" if d in got else ""
                               for d in depths)
            lines.append(f"| {Path(r['artifact']).name} | {e['length']} | {cells} | {e['passkey_accuracy']:.2f} |")
    timed = [(r, e) for r in result["rows"] for e in r["lengths"] if "nll_seconds" in e or "passkey_seconds" in e]
    if timed:
        lines += ["", f"**Time per forward** on this machine (engine path: {result.get('engine', 'exact')}): one "
                  "forward with every position's logits (NLL), one prefill of the passkey prompt (median)", "",
                  "| artifact | length | NLL forward s | tok/s | passkey prefill s | tok/s |", "|---|---:|---:|---:|---:|---:|"]
        for r, e in timed:
            n, a, b = e["length"], e.get("nll_seconds"), e.get("passkey_seconds")
            lines.append(f"| {Path(r['artifact']).name} | {n} | {_secs(a)} | {_rate(n, a)} | {_secs(b)} | "
                         f"{_rate(n, b)} |")
    return "\n".join(lines) + "\n"


def _secs(s: float | None) -> str:
    return "" if s is None else f"{s:.1f}" if s < 10 else f"{s:.0f}"


def _rate(n: int, s: float | None) -> str:
    return "" if not s else f"{n / s:.0f}"


def _k(n: int) -> str:
    return f"{n / 1024:g}K" if n >= 1024 and n % 256 == 0 else str(n)


def plot(result: dict[str, Any], out_dir: Path, panel_of: Callable[[str], str] | None = None) -> list[Path]:
    """nll_by_position.png (NLL vs position, one curve per artifact and length, a moving mean over 256
    positions; one panel per `panel_of(artifact name)` when given, e.g. per quantization) and
    passkey_heatmap.png (accuracy by depth × length, one panel per artifact; artifacts × depths in one panel
    when each has one length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kiln.atomic import atomic_file

    written = []
    nll_rows = [(r, e) for r in result["rows"] for e in r["lengths"] if "curve" in e]
    if nll_rows:
        panels: dict[str, list] = {}
        for r, e in nll_rows:
            panels.setdefault(panel_of(Path(r["artifact"]).name) if panel_of else "", []).append((r, e))
        cols = min(2, len(panels))
        rows_ = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows_, cols, figsize=(9 * cols, 5 * rows_), squeeze=False, sharey=True)
        for ax, (title, members) in zip(axes.flat, panels.items()):
            for r, e in members:
                y = np.asarray(e["curve"])  # block means, BLOCK positions each
                w = max(1, min(256 // BLOCK, len(y) // 8))
                smooth = np.convolve(y, np.ones(w) / w, mode="valid")
                ax.plot((np.arange(len(smooth)) + w) * BLOCK, smooth, lw=1,
                        label=f"{Path(r['artifact']).name} ({e['length']})")
            if result.get("baseline_window"):
                ax.axvline(result["baseline_window"], color="grey", ls="--", lw=0.8)
            ax.set_xlabel("position (tokens)")
            ax.set_ylabel("NLL (nats/token, moving mean)")
            ax.set_title(f"NLL by position{' · ' + title if title else ''}")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        dest = out_dir / "nll_by_position.png"
        with atomic_file(dest) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(dest)
    pk = [r for r in result["rows"] if any("passkey" in e for e in r["lengths"])]
    if pk and all(sum("passkey" in e for e in r["lengths"]) == 1 for r in pk) and len(pk) > 1:
        # one length per artifact (a grid of artifacts at their windows): one panel, artifacts x depths
        entries = [next(e for e in r["lengths"] if "passkey" in e) for r in pk]
        depths = sorted({p["depth"] for e in entries for p in e["passkey"]})
        grid = np.full((len(pk), len(depths)), np.nan)
        for i, e in enumerate(entries):
            for p in e["passkey"]:
                grid[i, depths.index(p["depth"])] = p["accuracy"]
        fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(depths), 1.2 + 0.32 * len(pk)))
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(pk)), [f"{Path(r['artifact']).name} @ {_k(e['length'])}" for r, e in zip(pk, entries)],
                      fontsize=7)
        ax.set_xlabel("needle depth")
        ax.set_title("passkey exact match", fontsize=8)
        fig.colorbar(im, ax=ax, label="exact match")
        dest = out_dir / "passkey_heatmap.png"
        with atomic_file(dest) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(dest)
    elif pk:
        fig, axes = plt.subplots(1, len(pk), figsize=(3.2 * len(pk) + 1, 3.4), squeeze=False)
        for ax, r in zip(axes[0], pk):
            entries = [e for e in r["lengths"] if "passkey" in e]
            depths = sorted({p["depth"] for e in entries for p in e["passkey"]})
            grid = np.full((len(depths), len(entries)), np.nan)
            for j, e in enumerate(entries):
                for p in e["passkey"]:
                    grid[depths.index(p["depth"]), j] = p["accuracy"]
            im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
            ax.set_xticks(range(len(entries)), [_k(e["length"]) for e in entries], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_xlabel("context length")
            ax.set_ylabel("needle depth")
            ax.set_title(Path(r["artifact"]).name, fontsize=8)
        fig.colorbar(im, ax=axes[0].tolist(), label="exact match")
        dest = out_dir / "passkey_heatmap.png"
        with atomic_file(dest) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(dest)
    return written


OUTPUT_NAMES = ("longeval.json", "longeval.md", "nll_by_position.png", "passkey_heatmap.png")


def write_outputs(result: dict[str, Any], out_dir: str | Path, force: bool = False,
                  panel_of: Callable[[str], str] | None = None) -> list[Path]:
    """longeval.json, longeval.md and the PNGs into `out_dir`; files of those names are replaced only when
    the directory holds a longeval.json kiln wrote (or with `force`)."""
    from kiln.atomic import atomic_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KilnError(f"{out_dir}: exists and is not a directory")
    ours = False
    try:
        ours = json.loads((out_dir / "longeval.json").read_text()).get("kind") == "longeval"
    except (OSError, ValueError, AttributeError):
        pass
    clash = [n for n in OUTPUT_NAMES if (out_dir / n).exists()]
    if clash and not ours and not force:
        raise KilnError(f"{out_dir / clash[0]}: exists and kiln did not write it; choose another -o or pass --force")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in (("longeval.json", json.dumps(result, indent=1, sort_keys=True)),
                       ("longeval.md", markdown(result))):
        with atomic_file(out_dir / name) as tmp:
            tmp.write_text(data)
        written.append(out_dir / name)
    return written + plot(result, out_dir, panel_of)


# -------------------------------------------------------------------------------- rope findings
def rope_findings(path: Path | None = None) -> list[dict[str, Any]]:
    """Measured harmful rope settings (written by bench/longctx.py); [] when the bench has not run."""
    path = path or FINDINGS
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    return [f for f in data.get("findings", []) if isinstance(f, dict)] if isinstance(data, dict) else []


def rope_warnings(family: str, rope: Any, path: Path | None = None) -> list[str]:
    """Warnings for baking `rope` (a kiln.checkpoint.rope.RopeSettings) on `family`, from measured findings."""
    if rope is None or not getattr(rope, "scaled", False):
        return []
    out = []
    for f in rope_findings(path):
        if (f.get("family") == family and f.get("type") == rope.type and float(f.get("factor", 0)) == float(rope.factor)
                and f.get("harmful")):
            out.append(f"rope scaling {rope.type}:{rope.factor:g} was measured harmful on {family} "
                       f"({f.get('evidence', 'see docs/long-context.md')}); truncating to the native window "
                       "scored better")
    return out


__all__ = ["DEFAULT_DEPTHS", "Artifact", "LongProgress", "bucket_edges", "describe", "long_eval", "markdown",
           "parse_depths", "parse_lengths", "passkey_key", "plot", "rope_findings", "rope_warnings", "text_record",
           "write_outputs"]
