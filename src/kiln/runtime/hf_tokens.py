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


class TokenizersVocab:
    """Engine mixin: `tokenize` / `token_bytes` for engines holding a `tokenizers.Tokenizer` in
    `self._tok` (call `self._pieces = self._byte_table()` once the vocabulary size is known)."""

    _tok: Any
    _pieces: list[bytes]
    vocab_size: int

    def _byte_table(self) -> list[bytes]:
        return byte_table(self._tok, self.vocab_size)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return encode(self._tok, text, add_special, parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token] if 0 <= token < len(self._pieces) else b""
