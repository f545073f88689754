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
# The lines where llama.cpp states its buffer sizes (weights, KV cache, compute), kept apart from the
# tail because a model load logs hundreds of lines first: `kiln bench` reports them as measured sizes.
_sizes: collections.deque[str] = collections.deque(maxlen=64)
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
        if "buffer size" in msg or "kv_cache: size" in msg or "memory_recurrent: size" in msg:
            _sizes.append(msg)
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


def buffer_sizes() -> dict[str, float]:
    """MiB llama.cpp reported since the last `clear()`: {"model", "repack", "kv", "state", "compute", "output"}
    ("state": a recurrent or hybrid model's per-sequence state).

    "model" is the mapped weights (file pages), "repack" the weights llama.cpp copied into its CPU layout."""
    out: dict[str, float] = {}
    for line in _sizes:
        try:
            mib = float(line.split("=", 1)[1].split("MiB", 1)[0])
        except (IndexError, ValueError):
            continue
        key = ("kv" if "kv_cache: size" in line else "state" if "memory_recurrent: size" in line
               else "repack" if "REPACK" in line else "model" if "model buffer" in line
               else "compute" if "compute buffer" in line else "output" if "output buffer" in line else None)
        if key and not (key == "kv" and "KV buffer" in line):
            out[key] = out.get(key, 0.0) + mib
    return out


def clear(sizes: bool = True) -> None:
    """Forget what was logged; `sizes=False` keeps the buffer sizes (the model's, across context creation)."""
    _tail.clear()
    if sizes:
        _sizes.clear()
