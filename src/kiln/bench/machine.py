"""What every benchmark figure is tied to: the machine, the versions, and this machine's memory bandwidth.

Token generation on a CPU streams every weight once per token, so decode speed is reported as a
fraction of bandwidth / bytes read per token (DESIGN.md §8); the bandwidth is measured here, once
per run, with a plain streaming copy rather than taken from a spec sheet.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "ram_gb": ram_gb,
            "os": platform.platform(), "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def versions(*packages: str) -> dict[str, str | None]:
    out = {}
    for name in packages or ("kiln-llm", "llama-cpp-python", "onnxruntime", "onnxruntime-genai", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def copy_bandwidth(threads: int, mb_per_thread: int = 128, rounds: int = 5) -> float:
    """Bytes/s of a numpy copy on `threads` threads at once (read + write counted), best of `rounds`."""
    n = mb_per_thread * (1 << 20) // 8
    srcs = [np.ones(n) for _ in range(threads)]
    dsts = [np.empty(n) for _ in range(threads)]
    best = float("inf")
    for _ in range(rounds):
        barrier = threading.Barrier(threads + 1)

        def work(i: int) -> None:
            barrier.wait()
            np.copyto(dsts[i], srcs[i])  # releases the GIL

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * threads * n * 8 / best
