"""Route llama.cpp's C logging into a buffer.

llama.cpp prints hundreds of lines per load; kiln shows them only with KILN_LLAMA_VERBOSE=1
and otherwise keeps the tail so an error message can quote what llama.cpp said.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys

_tail: collections.deque[str] = collections.deque(maxlen=200)
_installed = False
_callback = None


def install() -> None:
    """Install the buffering logger once per process (llama_cpp must be importable)."""
    global _installed, _callback
    if _installed:
        return
    import llama_cpp

    verbose = os.environ.get("KILN_LLAMA_VERBOSE") == "1"

    @llama_cpp.llama_log_callback
    def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        msg = text.decode("utf-8", errors="replace")
        _tail.append(msg)
        if verbose:
            print(msg, end="", file=sys.stderr, flush=True)

    _callback = _cb  # keep a reference: ctypes callbacks die with their Python object
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
    _installed = True


def last_error() -> str:
    """The most recent line llama.cpp logged that looks like an error, for one-line messages."""
    for line in reversed(_tail):
        text = line.strip()
        if text and ("error" in text.lower() or "failed" in text.lower()):
            return text
    return next((line.strip() for line in reversed(_tail) if line.strip()), "")


def clear() -> None:
    _tail.clear()
