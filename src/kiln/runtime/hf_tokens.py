"""Token bytes and encoding for engines that run a Hugging Face `tokenizers` tokenizer (ONNX,
the transformers reference): one implementation, so both report identical bytes per token."""

from __future__ import annotations

from typing import Any


def byte_table(tok: Any, vocab_size: int) -> list[bytes]:
    """The bytes each token id stands for (b"" for ids the tokenizer does not define).

    Byte-level BPE pieces map back through GPT-2's byte alphabet; added (special) tokens are
    their text; other schemes (SentencePiece) fall back to the tokenizer's own decode.
    """
    from kiln.bytelevel import char_to_byte

    decode = char_to_byte()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    table: list[bytes] = []
    for i in range(vocab_size):
        piece = tok.id_to_token(i)
        if piece is None:
            table.append(b"")
        elif piece in special:
            table.append(piece.encode("utf-8"))
        elif any(c not in decode for c in piece):  # not byte-level BPE
            table.append(tok.decode([i]).encode("utf-8"))
        else:
            table.append(bytes(decode[c] for c in piece))
    return table


def encode(tok: Any, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """Token ids of `text`; with parse_special=False, special-token text is encoded as plain text."""
    tok.encode_special_tokens = not parse_special
    try:
        return list(tok.encode(text, add_special_tokens=add_special).ids)
    finally:
        tok.encode_special_tokens = False
