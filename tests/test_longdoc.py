"""Long documents in the runtime (issue 18, part 2): kiln.runtime.document and `kiln generate --prompt-file`.

Real engines on the project's fixtures: SmolLM2-135M-Instruct's GGUF (its tokenizer, one short answer) and
tiny-qwen2 as an f32 GGUF (mechanics: map-reduce over batched sequences, progress). Tiny contexts throughout.
"""

from __future__ import annotations

import io
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from kiln.errors import KilnError  # noqa: E402
from kiln.fixtures import smollm2_original_gguf  # noqa: E402
from kiln.runtime import document as D  # noqa: E402
from kiln.runtime import load  # noqa: E402
from kiln_cli import KILN, kiln, one_line_error  # noqa: E402

THREADS = 1
PARA = ("The water cycle moves water between the sea, the air and the land. Rain falls, rivers run and the sun "
        "lifts vapour again. Naïve cafés serve crème brûlée — 東京の天気は晴れ 🌧️☀️.\n\n")


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Path:
    return smollm2_original_gguf()


@pytest.fixture(scope="module")
def tok(smol: Path):
    """SmolLM2's engine with a tiny context: tokenizing only."""
    with load(smol, n_ctx=256, threads=THREADS) as engine:
        yield engine


def _doc(n: int, needle: str | None = None, at: int = 0) -> str:
    paras = [PARA] * n
    if needle is not None:
        paras.insert(at, needle + "\n\n")
    return "".join(paras)


class _Endless(io.RawIOBase):
    """A stream of `total` bytes of text made on the fly (a 10-million-token document without the file);
    counts what was read."""

    def __init__(self, total: int) -> None:
        self.total, self.pos = total, 0
        self.block = (PARA * 200).encode()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = min(n if n >= 0 else self.total, self.total - self.pos)
        out = (self.block * (n // len(self.block) + 2))[self.pos % len(self.block):][:n]
        self.pos += len(out)
        return out


# --- reading ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,message", [
    (b"", "empty document"), (b" \n\t\n", "empty document"),
    (b"abc\x00def", "binary file (NUL byte at offset 3)"),
    (b"caf\xe9 au lait", "not UTF-8 text (byte 0xe9 at offset 3)"),
])
def test_bad_documents_are_one_line_errors(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes(data)
    with pytest.raises(KilnError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(D.read_document(path))
    with pytest.raises(KilnError, match="empty|binary|UTF-8"):
        list(D.read_document(io.BytesIO(data), name="standard input"))


def test_reading_in_pieces_keeps_the_text(tmp_path: Path) -> None:
    text = "\ufeff" + _doc(2000)  # ~460 KB: several pieces, a BOM in front, multi-byte characters across blocks
    path = tmp_path / "doc.txt"
    path.write_bytes(text.encode())
    pieces = list(D.read_document(path))
    assert len(pieces) > 3 and all(len(p) <= D.PIECE_CHARS for p in pieces)
    assert "".join(pieces) == text[1:].rstrip()
    assert "".join(D.read_document(text[1:])) == text[1:].rstrip()


# --- fit: error and truncate ----------------------------------------------------------------------------------
def test_fit_whole_error_and_truncate(tok) -> None:
    short = D.fit(tok, "A short document.", 50)
    assert short.policy == "whole" and short.dropped == 0 and tok.detokenize(short.tokens) == "A short document."
    text = _doc(40)
    with pytest.raises(KilnError, match="more than 200 tokens.*--overflow truncate or chunk"):
        D.fit(tok, text, 200, "error")
    f = D.fit(tok, text, 200, "truncate")
    assert len(f.tokens) <= 200 and f.total > 1000 and f.dropped == f.total - (len(f.tokens) - len(
        D._gap_tokens(tok, f.dropped)))
    out = tok.detokenize(f.tokens)
    assert out.startswith(text[:60]) and out.endswith(text.rstrip()[-40:])
    assert f"[… {f.dropped} tokens omitted …]" in out and "\ufffd" not in out
    assert "dropped" in f.note() and str(f.total) in f.note()


def test_ten_million_tokens_bounded(tok) -> None:
    # ~40 MB of text (about ten million tokens): "error" stops at the first token over the budget
    stream = _Endless(40_000_000)
    with pytest.raises(KilnError, match="more than 1000 tokens"):
        D.fit(tok, stream, 1000, "error", name="big.txt")
    assert stream.pos <= 4 * D.READ_BYTES
    # chunking stops at max_chunks
    stream = _Endless(40_000_000)
    with pytest.raises(KilnError, match="more than 8 chunks"):
        list(D.chunk(tok, stream, 256, 32, max_chunks=8))
    assert stream.pos < 1_000_000
    # truncate reads everything but holds only the budget: 2 MB here (~500K tokens), peak Python memory small
    tracemalloc.start()
    f = D.fit(tok, _Endless(2_000_000), 600, "truncate")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert f.total > 300_000 and len(f.tokens) <= 600
    assert peak < 8 * 2 ** 20, peak  # a 64 KiB piece and its tokens, the head and the ring


# --- chunking -------------------------------------------------------------------------------------------------
def test_chunks_overlap_and_never_cut_a_character(tok) -> None:
    text = _doc(12)
    ids = [t for piece in D.document_tokens(tok, text) for t in piece]
    chunks = list(D.chunk(tok, text, 64, 16))
    assert len(chunks) > 5
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end and a.end - b.start <= 16  # overlapping, at most by `overlap`
        assert len(a.tokens) <= 64
    for c in chunks:
        assert c.tokens == ids[c.start:c.end]
        raw = b"".join(tok.token_bytes(t) for t in c.tokens)
        raw.decode("utf-8")  # strict: no chunk starts or ends inside a character
    assert chunks[-1].end == len(ids)
    # the emoji and CJK really are split across tokens here: a plain cut would land inside a character
    assert any(not D.is_boundary(tok, ids, j) for j in range(1, len(ids)))
    with pytest.raises(KilnError, match="--overlap 64 must be smaller than --chunk-size 64"):
        list(D.chunk(tok, text, 64, 64))


def test_bm25_ranks_the_needle_first_and_select_packs_in_order(tok) -> None:
    needle = "The special magic number for Lisbon is 48213."
    text = _doc(30, needle, at=17)
    chunks = list(D.chunk(tok, text, 128, 16))
    scores = D.rank(chunks, "What is the special magic number for Lisbon?", "bm25")
    best = max(range(len(chunks)), key=lambda i: scores[i])
    assert "48213" in chunks[best].text
    picked = D.select(chunks, scores, 300, tok)
    assert [c.start for c in picked] == sorted(c.start for c in picked) and any("48213" in c.text for c in picked)
    assert len(D.merge_tokens(picked, tok)) <= 300
    # touching chunks are merged without repeating their overlap
    assert D.merge_tokens(chunks[:2]) == chunks[0].tokens + chunks[1].tokens[chunks[0].end - chunks[1].start:]


def test_relevant_packing_keeps_the_opening_and_what_matches(tok) -> None:
    """pack="relevant" (the default; measured in bench/longanswer.py): the opening chunk and the chunks that
    share a word with the question, not the filler around them; "fill" packs up to the budget."""
    needle = "The special magic number for Lisbon is 48213."
    text = "Notes from the archive.\n\n" + _doc(30, needle, at=17)
    chunks = list(D.chunk(tok, text, 128, 16))
    scores = D.rank(chunks, "What is the special magic number for Lisbon?", "bm25")
    relevant = D.select(chunks, scores, 2000, tok, "relevant", 0.0)
    assert relevant[0].index == 0 and all(scores[c.index] > 0 for c in relevant[1:])
    assert any("48213" in c.text for c in relevant) and len(relevant) < len(chunks) // 2
    filled = D.select(chunks, scores, 2000, tok, "fill", 0.0)
    assert len(D.merge_tokens(filled, tok)) <= 2000 and len(filled) > len(relevant)
    # without a floor (the likelihood ranking) or with nothing above it, "relevant" fills like "fill"
    assert D.select(chunks, scores, 2000, tok, "relevant", None) == filled
    assert D.select(chunks, [0.0] * len(chunks), 2000, tok, "relevant", 0.0) == \
        D.select(chunks, [0.0] * len(chunks), 2000, tok, "fill", 0.0)
    with pytest.raises(KilnError, match="--pack 'all'"):
        D.select(chunks, scores, 2000, tok, "all")
    with pytest.raises(KilnError, match="--pack 'all'"):
        D.DocumentOptions(pack="all").validate()


def test_cli_choices_are_the_runtime_policies() -> None:
    """The CLI spells its choices out (fast --help, no runtime import); they must stay the runtime's."""
    from kiln import cli

    assert cli.OVERFLOW_CHOICES == D.OVERFLOW_POLICIES
    assert cli.RANK_CHOICES == D.RANK_METHODS
    assert cli.PACK_CHOICES == D.PACK_POLICIES


def test_likelihood_ranking_runs_on_the_model(smol: Path) -> None:
    with load(smol, n_ctx=128, threads=THREADS) as engine:
        chunks = [D.Chunk(0, 0, engine.tokenize("Bananas are yellow fruit.", add_special=False)),
                  D.Chunk(1, 6, engine.tokenize("The capital of France is Paris.", add_special=False))]
        seen = []
        scores = D.rank(chunks, "What is the capital of France?", "likelihood", engine, progress=seen.append)
    assert scores[1] > scores[0] and len(seen) == 2 and seen[-1].done == seen[-1].total


# --- answering ------------------------------------------------------------------------------------------------
def test_answer_document_sizes_the_context_and_answers(smol: Path) -> None:
    checked = []
    out = D.answer_document(smol, "The quick brown fox jumps over the lazy dog. The capital of France is Paris.",
                            question="What is the capital of France?", chat=True, max_tokens=12, threads=THREADS,
                            memory_check=lambda n_ctx, n_seq: checked.append((n_ctx, n_seq)))
    assert "Paris" in out["text"]
    assert out["document"]["mode"] == "whole"
    assert checked == [(out["prompt_tokens"] + 12, 1)] and out["n_ctx"] == out["prompt_tokens"] + 12


def test_relevant_chunks_size_the_context_to_their_prompt(smol: Path) -> None:
    """BM25 needs no model, so the chunks are packed before the answering engine is opened: its context is the
    packed prompt's (the opening chunk and the needle's), not the whole window."""
    needle = "The special magic number for Lisbon is 48213."
    text = "Notes from the archive.\n\n" + _doc(160, needle, at=90)  # about 2.5 times a window of 4096
    notes: list[str] = []
    out = D.answer_document(smol, text, question="What is the special magic number for Lisbon?", max_tokens=4,
                            options=D.DocumentOptions(overflow="chunk", chunk_size=256, overlap=32), threads=THREADS,
                            n_ctx=4096, on_note=notes.append)
    doc = out["document"]
    assert doc["mode"] == "ranked" and doc["selected"][0] == 0 and len(doc["selected"]) < doc["chunks"] // 4
    assert out["n_ctx"] == 4096  # --ctx: the window the prompt must fit
    assert any("share no word with the question" in n for n in notes) and any("kept" in n for n in notes)
    checked = []
    D.answer_document(smol, text, question="What is the special magic number for Lisbon?", max_tokens=4,
                      options=D.DocumentOptions(overflow="chunk", chunk_size=256, overlap=32), threads=THREADS,
                      memory_check=lambda n_ctx, n_seq: checked.append(n_ctx))
    assert checked and checked[0] < 1024  # the packed prompt + 4, not the artifact's 8192


def test_memory_check_refuses_before_loading(smol: Path) -> None:
    def refuse(n_ctx: int, n_seq: int) -> None:
        raise KilnError(f"a context of {n_ctx} tokens needs more than this machine has")

    with pytest.raises(KilnError, match="a context of"):
        D.answer_document(smol, "Some text.", "Summarize.", max_tokens=8, memory_check=refuse, threads=THREADS)
    from kiln.runtime.generate import generate_prompts

    with pytest.raises(KilnError, match="a context of 2"):
        generate_prompts(smol, ["Hi"], max_tokens=8, memory_check=refuse, threads=THREADS)


def test_map_reduce_batched_with_progress(tiny_qwen2_f32_gguf: Path) -> None:
    seen: list[D.PrefillInfo] = []
    opts = D.DocumentOptions(overflow="chunk", chunk_size=48, overlap=8, batch=3)
    out = D.answer_document(tiny_qwen2_f32_gguf, _doc(3), "Summarize.", max_tokens=4, n_ctx=128, options=opts,
                            threads=THREADS, progress=seen.append)
    doc = out["document"]
    assert doc["mode"] == "map-reduce" and doc["chunks"] > 3 and len(doc["partial"]) == doc["chunks"]
    assert any(i.what.startswith("chunks 1-3/") for i in seen) and len(out["tokens"]) <= 4
    # ranked: with a question the best chunks are packed into the window instead
    ranked = D.answer_document(tiny_qwen2_f32_gguf, _doc(3, "The special magic number for Oslo is 77.", 2),
                               question="What is the special magic number for Oslo?", max_tokens=4, n_ctx=128,
                               options=opts, threads=THREADS)
    assert ranked["document"]["mode"] == "ranked" and ranked["prompt_tokens"] + 4 <= 128


def test_sliced_prefill_equals_one_prefill(tiny_qwen2_f32_gguf: Path) -> None:
    with load(tiny_qwen2_f32_gguf, n_ctx=512, threads=THREADS) as engine:
        ids = engine.tokenize(_doc(4))[:300]
        assert len(ids) == 300
        whole = engine.prefill(ids, seq=0)
        engine.reset()
        engine.clear_prompt_cache()
        seen = []
        sliced = D.prefill(engine, ids, seq=0, progress=seen.append, slice_tokens=64)
        assert [i.done for i in seen] == [64, 128, 192, 256, 300] and seen[-1].eta == 0
        # the slices run as other batch shapes than one prefill: float32 round-off only, not other logits
        np.testing.assert_allclose(sliced, whole, atol=0.05)
        assert int(np.argmax(sliced)) == int(np.argmax(whole))
        engine.reset()
        again = engine.prefill_prompt(ids, seq=0)  # an exact hit of the cache the slices built
        np.testing.assert_array_equal(again, sliced)


# --- the command line ----------------------------------------------------------------------------------------
def test_cli_bad_inputs_are_one_line(smol: Path, tmp_path: Path) -> None:
    cases = {"empty.txt": (b"", "empty document"), "bin.dat": (b"\x89PNG\r\n\x1a\n\x00\x00", "binary file"),
             "latin1.txt": (b"caf\xe9", "not UTF-8")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        one_line_error(kiln("generate", smol, "--prompt-file", tmp_path / name, "--threads", "1"), name, message)
    one_line_error(kiln("generate", smol, "--prompt-file", tmp_path / "latin1.txt", "--overflow", "chunk",
                        "--chunk-size", "64", "--overlap", "64"), "--overlap 64 must be smaller")
    one_line_error(kiln("generate", smol, "--prompt", "Hi", "--max-tokens", "4000", "--memory", "100MiB"),
                   "a context of", "MiB", "--memory is 100.0 MiB")


def test_cli_prompt_file_stdin_and_truncate(smol: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text(_doc(4), encoding="utf-8")
    r = kiln("generate", smol, "--prompt-file", doc, "--overflow", "truncate", "--ctx", "128", "--max-tokens", "2",
             "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["document"]["mode"] == "truncate" and out["prompt_tokens"] + 2 <= 128
    assert "dropped" in out["document"]["notes"][0]
    piped = subprocess.run([KILN, "generate", str(smol), "--prompt-file", "-", "--max-tokens", "2", "--threads", "1",
                            "--json"], input="One line of text.", capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["n_ctx"] == json.loads(piped.stdout)["prompt_tokens"] + 2
