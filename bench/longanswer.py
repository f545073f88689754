#!/usr/bin/env python
"""A document longer than the window: chunk + rank, truncate, or bake a larger rope factor? Accuracy and time.

The comparison of docs/long-context.md ("Which policy for a long document"). SmolLM2-135M-Instruct (native
window W = 8192) reads documents of about 2x, 4x and 8x W tokens from the retrieval set of `kiln longeval`
(kiln.longeval: synthetic filler "The grass is green. …", one line "The pass key is NNNNN. Remember it." at a
depth of 20/50/80 %) and completes "What is the pass key? The pass key is", four ways, each through
`kiln.runtime.document.answer_document` as `kiln generate --prompt-file F --prompt "…" --question "What is
the pass key?"` runs it (no chat template: the completion form the passkey test uses, which this model
answers at 100 % within its window):

* chunk:    the unscaled q8_0 GGUF, `--overflow chunk`: chunks of 1024 tokens (128 overlap) ranked by BM25
            against the question; the document's opening chunk and the chunks that share a word with the
            question packed in document order (`--pack relevant`, the default);
* chunk-fill: the same with `--pack fill`: the best-ranked chunks until the window is full;
* truncate: the unscaled q8_0 GGUF, `--overflow truncate`: the start and the end, the middle dropped;
* rope:     a q8_0 GGUF baked with yarn:k (k = 2, 4, 8: a window of k x W) reading the whole document.

Greedy decoding, 12 new tokens; an answer is right when it contains the key. The time per answer
is the wall time of the call (tokenizing, ranking, prefill, decoding) on this machine's cores. Documents are a
little under k x W tokens (512 below), so the yarn:k artifact reads them whole.

Every (method, k, document) answer is one JSON file under CELLS (default docs/long-context/answers, committed),
keyed by the artifact's content hash (exports are deterministic), so sittings of `--budget MINUTES` fill the
grid: the cheap chunk and truncate answers first, then rope by growing k (reading 64K tokens takes about 35
minutes on 2 cores). Writes docs/long-context/answers.{json,md} and the section between the markers in
docs/long-context.md.

    .venv/bin/python bench/longanswer.py --budget 60                   # a sitting: what is missing
    .venv/bin/python bench/longanswer.py --factors 2 --docs 1 --window 1024 --cells /tmp/la --smoke   # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from kiln import longeval as L  # noqa: E402

NATIVE = 8192
DEPTHS = (0.2, 0.5, 0.8)
METHODS = ("chunk", "chunk-fill", "truncate", "rope")
DOCS = REPO / "docs" / "long-context"
BEGIN, END = "<!-- longanswer:begin -->", "<!-- longanswer:end -->"


def artifact(src: Path, factor: int | None) -> Path:
    from kiln.pipeline import export_gguf_artifact

    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench-artifacts"
    tag = f"-yarn{factor}" if factor else ""
    out = cache / f"longctx-smollm2-135m{tag}.q8_0.gguf"  # the same files bench/longctx.py measures
    if not out.exists():
        print(f"exporting {out.name} (once; cached in {cache})", file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        rope = {"rope_scaling": f"yarn:{factor}", "original_context": NATIVE} if factor else {}
        export_gguf_artifact(src, out, "q8_0", threads=2, **rope)
    return out


def document(index: int, tokens: int, depth: float, tok) -> dict:
    """A passkey haystack of at most `tokens` tokens (the model's own tokenizer counts them)."""
    key = L.passkey_key(tokens, depth, index, seed=1)
    unit = len(tok.encode(L.FILLER, add_special_tokens=False).ids)
    units = (tokens - 64) // unit
    for _ in range(8):
        before = round(depth * units)
        text = L.INTRO + L.FILLER * before + L.NEEDLE.format(key=key) + L.FILLER * (units - before)
        n = len(tok.encode(text, add_special_tokens=False).ids)
        if n <= tokens:
            return {"text": text, "number": key, "depth": depth, "tokens": n}
        units -= -(-(n - tokens) // unit)
    raise SystemExit(f"could not make a document of at most {tokens} tokens")


def answer(path: Path, doc: dict, method: str, window: int, threads: int) -> dict:
    from kiln.runtime import DocumentOptions, answer_document

    size = min(1024, window // 4)  # chunks well under the window, so the best ones can be packed into it
    overflow = {"rope": "error", "chunk-fill": "chunk"}.get(method, method)
    options = DocumentOptions(overflow=overflow, chunk_size=size, overlap=size // 8,
                              pack="fill" if method == "chunk-fill" else "relevant")
    notes: list[str] = []
    t0 = time.perf_counter()
    out = answer_document(path, doc["text"], L.QUESTION.strip(), question="What is the pass key?", max_tokens=12,
                          options=options,
                          threads=threads, n_ctx=None if method == "rope" else window, on_note=notes.append)
    seconds = time.perf_counter() - t0
    text, how = out["text"], out.get("document", {})
    return {"answer": text, "correct": doc["number"] in text, "seconds": round(seconds, 2), "mode": how.get("mode"),
            "prompt_tokens": how.get("prompt_tokens"), "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factors", default="2,4,8", help="document length / window")
    ap.add_argument("--docs", type=int, default=3, help="documents per length (needle depths 20/50/80 %%)")
    ap.add_argument("--window", type=int, default=NATIVE,
                    help="the window chunk and truncate fit (default: the model's native 8192)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, help="start no answer after this many minutes")
    ap.add_argument("--cells", type=Path, default=DOCS / "answers")
    ap.add_argument("--smoke", action="store_true", help="print the table only; write nothing under docs/")
    args = ap.parse_args()
    deadline = time.monotonic() + 60 * args.budget if args.budget is not None else None

    from tokenizers import Tokenizer

    from kiln.atomic import atomic_file
    from kiln.fixtures import build

    src = build("smollm2-135m", progress=False)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    factors = [int(f) for f in args.factors.split(",")]
    methods = args.methods.split(",")
    docs = {k: [document(i, k * args.window - 512, DEPTHS[i % len(DEPTHS)], tok)
                for i in range(args.docs)] for k in factors}
    # cheap answers first (chunk and truncate read one window), then rope by growing k
    plan = [(m, k, i) for m in methods if m != "rope" for k in factors for i in range(args.docs)]
    plan += [("rope", k, i) for k in factors for i in range(args.docs) if "rope" in methods]
    paths: dict[int | None, tuple[Path, str]] = {}  # factor -> (artifact, content hash), each hashed once
    results: dict[tuple[str, int, int], dict] = {}
    for method, k, i in plan:
        factor = k if method == "rope" else None
        if factor not in paths:
            path = artifact(src, factor)
            paths[factor] = (path, L.describe(path).key())
        path, key = paths[factor]
        cell = args.cells / key / f"{method}-{k}x{args.window}-{i}.json"
        doc = docs[k][i]
        if cell.is_file():
            data = json.loads(cell.read_text())
            if data.get("document_sha") == _sha(doc["text"]):
                results[(method, k, i)] = data
                continue
        if deadline is not None and time.monotonic() > deadline:
            continue
        print(f"{method} k={k} doc {i} ({doc['tokens']} tokens, needle at {doc['depth']:.0%})", file=sys.stderr,
              flush=True)
        res = answer(path, doc, method, args.window, args.threads)
        res.update(method=method, factor=k, doc=i, tokens=doc["tokens"], depth=doc["depth"], number=doc["number"],
                   artifact=path.name, window=args.window, threads=args.threads, cores=os.cpu_count(),
                   document_sha=_sha(doc["text"]))
        print(f"  -> {res['answer']!r} correct={res['correct']} {res['seconds']} s", file=sys.stderr, flush=True)
        cell.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cell) as tmp:
            tmp.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        results[(method, k, i)] = res
    md = table(results, methods, factors, args.docs, args.window, len(plan) - len(results))
    print(md)
    if args.smoke:
        return
    with atomic_file(DOCS / "answers.json") as tmp:
        tmp.write_text(json.dumps([results[k] for k in sorted(results)], indent=1, sort_keys=True) + "\n")
    with atomic_file(DOCS / "answers.md") as tmp:
        tmp.write_text(md)
    doc_path = REPO / "docs" / "long-context.md"
    text = doc_path.read_text()
    if BEGIN in text and END in text:
        section = f"{BEGIN}\n{md}{END}"
        doc_path.write_text(text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):])


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table(results: dict, methods: list[str], factors: list[int], n: int, window: int, missing: int) -> str:
    head = (f"_Produced by `bench/longanswer.py` on {os.cpu_count()} cores; window {window} tokens; {n} document(s) "
            f"per length; greedy, 12 new tokens; cells in `docs/long-context/answers`._\n\n")
    if missing:
        head += (f"**{missing} answer(s) not measured yet** (`bench/longanswer.py --budget MINUTES` runs the "
                 "missing ones).\n\n")
    lines = [head + "| document | method | right | median s / answer | median prompt tokens |",
             "|---|---|---:|---:|---:|"]
    for k in factors:
        for m in methods:
            got = [results[(m, k, i)] for i in range(n) if (m, k, i) in results]
            if not got:
                lines.append(f"| {k}x window | {_label(m, k)} | not measured | | |")
                continue
            right = sum(r["correct"] for r in got)
            prompts = [r["prompt_tokens"] for r in got if r.get("prompt_tokens")]
            read = f"{statistics.median(prompts):.0f}" if prompts else ""
            lines.append(f"| {k}x window (~{statistics.median(r['tokens'] for r in got) / 1024:.0f}K tokens) | "
                         f"{_label(m, k)} | {right}/{len(got)} | {statistics.median(r['seconds'] for r in got):.0f} "
                         f"| {read} |")
    return "\n".join(lines) + "\n"


def _label(method: str, k: int) -> str:
    return {"chunk": "chunk + BM25, relevant chunks", "chunk-fill": "chunk + BM25, window filled",
            "truncate": "truncate (start + end)"}.get(method, f"rope yarn:{k}, whole")


if __name__ == "__main__":
    main()
