#!/usr/bin/env python
"""Benchmark: which chunk ranking finds the needle more often, BM25 or the model's likelihood of the question.

`kiln generate --prompt-file --overflow chunk --question Q` ranks a document's chunks by relevance to the
question and packs the best into the window (kiln.runtime.document). This measures the two rankings on a
deterministic synthetic needle-in-a-haystack set:

* haystack: consecutive paragraphs of kiln/data/calibration.txt (prose, poems, code; shipped with kiln);
* needle: "The special magic number for CITY is NNNNN." at a depth of 10 %..90 % of the document;
* distractors: the same sentence for three other cities at other depths (so a ranking that only
  matches "special magic number" picks the wrong chunk three times out of four);
* question: "What is the special magic number for CITY?".

For each document: chunks of --chunk-size tokens with --overlap (kiln.runtime.document.chunk on the
artifact's own tokens), both rankings (kiln.runtime.document.rank), and two hit rates: the top-ranked chunk
holds the needle's number, and the chunks packed into a --window token budget (document.select) hold it.
Writes JSON (machine) and Markdown (people) into -o. Single run; the rankings run on the same chunks.

    .venv/bin/python bench/longdoc.py --threads 1 -o bench/results/longdoc
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dakar", "Tbilisi", "Perth", "Bergen",
          "Cusco", "Tunis", "Riga", "Kyoto", "Accra", "Porto"]


def filler_paragraphs() -> list[str]:
    from importlib.resources import files

    text = (files("kiln") / "data" / "calibration.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def make_document(index: int, approx_tokens: int, depth: float, paragraphs: list[str]) -> dict:
    """One document: ~approx_tokens of filler (4 characters a token), the needle at `depth`, three distractors."""
    rng = random.Random(1000 + index)
    cities = rng.sample(CITIES, 4)
    numbers = [rng.randrange(10000, 100000) for _ in cities]
    start = rng.randrange(len(paragraphs))
    body: list[str] = []
    chars = 0
    i = start
    while chars < approx_tokens * 4:
        body.append(paragraphs[i % len(paragraphs)])
        chars += len(body[-1]) + 2
        i += 1
    depths = [depth] + [d for d in (0.05, 0.35, 0.65, 0.95) if abs(d - depth) > 0.15][:3]
    inserts = sorted(zip(depths, cities, numbers), key=lambda x: -x[0])  # insert from the end: indices stay valid
    for d, city, num in inserts:
        body.insert(int(d * len(body)), f"The special magic number for {city} is {num}.")
    return {"text": "\n\n".join(body), "city": cities[0], "number": str(numbers[0]), "depth": depth,
            "question": f"What is the special magic number for {cities[0]}?", "approx_tokens": approx_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", help="GGUF (default: the SmolLM2-135M-Instruct Q4_1 fixture)")
    ap.add_argument("--sizes", default="1024,2048", help="approximate document sizes in tokens")
    ap.add_argument("--depths", default="0.1,0.25,0.5,0.75,0.9,0.6")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--window", type=int, default=1024, help="token budget the best chunks are packed into")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", default="bench/results/longdoc")
    args = ap.parse_args()

    from kiln.runtime import load
    from kiln.runtime import document as D

    if args.artifact:
        artifact = Path(args.artifact)
    else:
        from kiln.fixtures import smollm2_original_gguf

        artifact = smollm2_original_gguf()
    paragraphs = filler_paragraphs()
    sizes = [int(s) for s in args.sizes.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    docs = [make_document(i, size, depth, paragraphs) for i, (size, depth) in
            enumerate((s, d) for s in sizes for d in depths)]
    rows = []
    times = {m: 0.0 for m in D.RANK_METHODS}
    with load(artifact, n_ctx=args.chunk_size + 128, threads=args.threads) as engine:
        for doc in docs:
            chunks = list(D.chunk(engine, doc["text"], args.chunk_size, args.overlap))
            holds = [doc["number"] in c.text for c in chunks]
            row = {"approx_tokens": doc["approx_tokens"], "depth": doc["depth"], "tokens": chunks[-1].end,
                   "chunks": len(chunks), "needle_chunks": [i for i, h in enumerate(holds) if h]}
            for method in D.RANK_METHODS:
                t0 = time.perf_counter()
                scores = D.rank(chunks, doc["question"], method, engine)
                times[method] += time.perf_counter() - t0
                top = max(range(len(chunks)), key=lambda i: (scores[i], -i))
                packed = D.select(chunks, scores, args.window, engine)
                row[method] = {"top1": holds[top], "packed": any(holds[c.index] for c in packed),
                               "top": top, "packed_chunks": [c.index for c in packed]}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("approx_tokens", "depth", "chunks")}),
                  {m: (row[m]["top1"], row[m]["packed"]) for m in D.RANK_METHODS}, flush=True)
    summary = {m: {"top1": sum(r[m]["top1"] for r in rows), "packed": sum(r[m]["packed"] for r in rows),
                   "n": len(rows), "seconds": round(times[m], 2)} for m in D.RANK_METHODS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"artifact": str(artifact), "machine": platform.platform(), "threads": args.threads,
              "chunk_size": args.chunk_size, "overlap": args.overlap, "window": args.window,
              "summary": summary, "rows": rows}
    (out / "longdoc.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    lines = ["# Chunk ranking: BM25 vs model likelihood (needle in a haystack)", "",
             f"{artifact.name}, {args.threads} thread(s), {len(rows)} documents of about {args.sizes} tokens, "
             f"chunks of {args.chunk_size} ({args.overlap} overlap), packed window {args.window} tokens; "
             "one needle and three distractor needles per document.", "",
             "| ranking | top-1 chunk holds the needle | packed window holds it | seconds (all documents) |",
             "|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {m} | {s['top1']}/{s['n']} ({s['top1'] / s['n']:.2f}) | {s['packed']}/{s['n']} "
                     f"({s['packed'] / s['n']:.2f}) | {s['seconds']} |")
    (out / "longdoc.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
