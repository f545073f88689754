#!/usr/bin/env python
"""Generate kiln's shipped calibration text, src/kiln/data/calibration.txt (run once; the file is committed).

How the file was made: the real SmolLM2-135M-Instruct fixture (`kiln.fixtures.build("smollm2-135m")`)
is exported to a q8_0 GGUF in a temporary directory (`export_gguf_artifact(..., verify=False)`) and run
in llama.cpp through kiln's runtime with 16 sequences decoded together (`engine.step(tokens, seqs)`,
one batched forward pass per token; a split KV cache, so a sequence attends over its own cells only). Each sequence answers one of the PROMPTS below (rendered with the
model's ChatML template) by sampling at temperature 1.0 from the full distribution (no top-k/top-p)
with numpy's default_rng(SEED), up to MAX_TOKENS tokens or the end-of-turn token; a finished slot takes
the next prompt at once, cycling through the list with fresh samples until the text reaches
TARGET_BYTES. A sample containing a word of BLOCKLIST is dropped (a 135M model at temperature 1.0
now and then produces one). Samples are joined by blank lines, with no header, so the file is pure text.
Decoding uses one llama.cpp thread; rerunning gives the same file with the same llama.cpp build. The prompts
cover history, science, recipes, letters, dialogue, instructions, lists, poetry and a little code, so
the activations it produces exercise more than one register of English.

Licence: the text is machine-generated from the prompts below and is dedicated to the public domain
(CC0-1.0); it is distinct from src/kiln/data/heldout.txt, which `kiln eval` uses and which this
script never reads.

    .venv/bin/python bench/make_calibration.py            # writes src/kiln/data/calibration.txt
    .venv/bin/python bench/make_calibration.py --out /tmp/calib.txt --target-kb 20
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SEED = 20240611
SLOTS = 16
MAX_TOKENS = 448
TARGET_BYTES = 80_000
LIMIT_BYTES = 100_000

BLOCKLIST = re.compile(r"\b(bitch\w*|fuck\w*|shit\w*|cunt\w*|whore\w*|slut\w*|porn\w*|nigg\w*|"
                       r"rape[ds]?|raping|dick\w*|cock\w*|pussy|asshole\w*)\b", re.IGNORECASE)

PROMPTS = [
    "Write a few paragraphs about daily life in ancient Rome.",
    "Explain how photosynthesis works, as a science teacher would.",
    "Give me a recipe for a simple vegetable soup, with a list of ingredients and numbered steps.",
    "Write a friendly letter to a grandmother describing a summer trip to the seaside.",
    "Write a dialogue between two friends planning a camping weekend.",
    "Write step-by-step instructions for changing a flat bicycle tire.",
    "Write a short poem about autumn leaves.",
    "Write a Python function that counts the words in a text file, and explain it.",
    "Tell a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the causes of the French Revolution.",
    "Explain what black holes are and how astronomers detect them.",
    "List ten tips for studying effectively, with a sentence on each.",
    "Write a product review of a pair of hiking boots.",
    "Write a short news report about a town opening a new public library.",
    "Explain the water cycle to a ten-year-old.",
    "Write an email to a colleague asking to move a meeting to Thursday.",
    "Write a conversation between a customer and a baker in a small shop.",
    "Explain how a bill becomes a law, in plain words.",
    "Write a fairy tale about a fox and a clever crow.",
    "Give a beginner's guide to growing tomatoes in a garden.",
    "Write a short biography of a nineteenth-century inventor.",
    "Explain the difference between weather and climate.",
    "Write a JavaScript function that reverses a string, and show how to use it.",
    "Describe a busy market in a port city at dawn.",
    "Write the minutes of a school parents' committee meeting.",
    "Explain supply and demand with an everyday example.",
    "Write a sonnet about the sea.",
    "Write an interview with a marathon runner about training.",
    "Explain how vaccines train the immune system.",
    "Write a SQL query that finds the five best-selling products, and explain each clause.",
    "Give travel advice for a first visit to a mountain village in winter.",
    "Write a diary entry of a sailor on a long voyage in the 1700s.",
]


def build_gguf(tmp: Path) -> Path:
    from kiln.fixtures import build
    from kiln.pipeline import export_gguf_artifact

    src = build("smollm2-135m")
    gguf = tmp / "smollm2.q8_0.gguf"
    export_gguf_artifact(src, gguf, "q8_0", verify=False)
    return gguf


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float) -> int:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def clean(text: str) -> str:
    """Drop what decoding a cut-off sample can leave: replacement characters, stray special tokens."""
    lines = [ln.rstrip() for ln in text.replace("\ufffd", "").splitlines() if "<|" not in ln]
    return "\n".join(lines).strip()


def generate(gguf: Path, target: int, temperature: float, seed: int) -> list[str]:
    from kiln.runtime import load
    from kiln.runtime.generate import chat_prompt

    rng = np.random.default_rng(seed)
    # split cache: 640 cells per sequence (> prompt + MAX_TOKENS); a unified one makes every token
    # attend over all sequences' cells and grew to 1.5 s per step here
    # one thread: fixed for reproducibility, and on a shared machine llama.cpp's spinning threads were
    # 10x slower with two (4.1 s against 0.4 s per step measured here while another job ran)
    with load(gguf, n_ctx=SLOTS * 640, n_seq_max=SLOTS, kv_unified=False, threads=1) as engine:
        prompts = [chat_prompt(engine, [{"role": "user", "content": p}]) for p in PROMPTS]
        samples: list[str] = []
        size = 0
        next_prompt = 0
        slots: dict[int, list[int]] = {}  # seq -> generated tokens
        logits: dict[int, np.ndarray] = {}

        def start(seq: int) -> None:
            nonlocal next_prompt
            engine.drop_seq(seq)
            logits[seq] = engine.prefill(prompts[next_prompt % len(prompts)], seq=seq)
            slots[seq] = []
            next_prompt += 1

        for seq in range(SLOTS):
            start(seq)
        t0 = time.perf_counter()
        steps = 0
        while size < target:
            seqs = sorted(slots)
            toks = []
            for seq in seqs:
                tok = sample(logits[seq], rng, temperature)
                if tok in engine.eog_ids or len(slots[seq]) >= MAX_TOKENS:
                    text = clean(engine.detokenize(slots[seq]))
                    if text and not BLOCKLIST.search(text):
                        samples.append(text)
                        size += len(text.encode("utf-8")) + 2
                    start(seq)
                    tok = sample(logits[seq], rng, temperature)
                slots[seq].append(tok)
                toks.append(tok)
            out = engine.step(toks, seqs)
            for i, seq in enumerate(seqs):
                logits[seq] = out[i]
            steps += 1
            if steps % 100 == 0:
                print(f"{steps} steps, {len(samples)} samples, {size} bytes, "
                      f"{(time.perf_counter() - t0) / steps * 1e3:.0f} ms/step", file=sys.stderr)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "src/kiln/data/calibration.txt")
    ap.add_argument("--target-kb", type=float, default=TARGET_BYTES / 1000)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    target = int(args.target_kb * 1000)
    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp:
        gguf = build_gguf(Path(tmp))
        samples = generate(gguf, target, args.temperature, args.seed)
    text, size = [], 0
    for s in samples:  # whole samples only, never past LIMIT_BYTES
        n = len(s.encode("utf-8")) + 2
        if size + n > max(LIMIT_BYTES, target):
            break
        text.append(s)
        size += n
    args.out.write_text("\n\n".join(text) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(text)} samples, {args.out.stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
