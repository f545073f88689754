"""GPT-2 byte-level BPE alphabet, shared by the checkpoint reader, the GGUF checks and the runtime.

llama.cpp maps every input byte to its byte token with `std::map::at`, so a byte whose
token is missing aborts the whole process (DESIGN.md §3). Real vocabularies do lack
some: SmolLM2's has no token for 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xf1, 0xf2 (nor the
bytes UTF-8 never uses). kiln therefore refuses vocabularies missing an *essential*
byte (printable ASCII, tab/newline/CR, or a UTF-8 byte of any character below
U+40000) and, for the rest, exports but guards at run time: the runtime refuses text
containing an unrepresentable byte with a clear error instead of letting llama.cpp abort.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache


@cache
def _byte_to_char() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@cache
def char_to_byte() -> dict[str, int]:
    """Stand-in character -> raw byte: turns a byte-level token string back into its bytes."""
    return {c: b for b, c in _byte_to_char().items()}


def byte_alphabet() -> frozenset[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes."""
    return frozenset(_byte_to_char().values())


NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])
ESSENTIAL_BYTES = frozenset([0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *range(0x80, 0xC0), *range(0xC2, 0xF1)])


def missing_bytes(tokens: Iterable[str]) -> frozenset[int]:
    """The byte values with no byte token in a vocabulary."""
    vocab = set(tokens)
    return frozenset(b for b, ch in _byte_to_char().items() if ch not in vocab)


def reachable_missing(missing: Iterable[int]) -> list[int]:
    """Missing bytes that valid UTF-8 text can actually contain (the ones worth warning about)."""
    return sorted(set(missing) - NEVER_IN_UTF8)


def essential_missing(missing: Iterable[int]) -> list[int]:
    return sorted(set(missing) & ESSENTIAL_BYTES)


def describe(byte_values: Iterable[int]) -> str:
    return ", ".join(f"0x{b:02x}" for b in sorted(byte_values))
