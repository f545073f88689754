"""One worker per engine: requests wait in an asyncio queue and run one at a time on the engine's own
thread (an engine is not thread-safe, and its forward pass releases the GIL, so the event loop keeps
serving other requests, /health and streams meanwhile).

A `Job` is the thread-side function of one request plus the channel back to the event loop: the
function `emit`s events (tuples), the handler `await`s them with `next()`. `cancel()` (a client that
went away) is polled by the decoding loop at every step, and a job cancelled while still queued
never runs. Beyond `queue_limit` waiting requests, `submit` answers 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kiln.serve.errors import APIError


class Job:
    def __init__(self, fn: Callable[[Job], None]) -> None:
        self.fn = fn
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()

    def emit(self, *event: Any) -> None:
        """Called on the worker thread: hand an event to the request's handler."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> tuple:
        return await self._events.get()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class EngineWorker:
    def __init__(self, name: str, queue_limit: int) -> None:
        self.name = name
        self.queue_limit = queue_limit
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"kiln-serve-{name}")
        self.waiting = 0
        self.busy = False
        self._durations: list[float] = []  # recent job wall times, for Retry-After
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kiln-worker-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._thread.shutdown(wait=True, cancel_futures=True)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free (at least 1)."""
        recent = self._durations[-16:]
        mean = sum(recent) / len(recent) if recent else 1.0
        return max(1, math.ceil(mean * (self.waiting + 1) / max(self.queue_limit, 1)))

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise a 429 APIError when `queue_limit` requests are already waiting."""
        if self.waiting >= self.queue_limit and (self.busy or self.waiting):
            seconds = self.retry_after()
            raise APIError(429, f"model {self.name!r} has {self.waiting} requests waiting (the limit): retry in "
                                f"{seconds} s", code="rate_limit_exceeded", type="rate_limit_error",
                           headers={"Retry-After": str(seconds)})
        self.waiting += 1
        self._queue.put_nowait(job)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            self.waiting -= 1
            if job.cancelled:
                continue
            self.busy = True
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self._thread, job.fn, job)
            except Exception as exc:  # noqa: BLE001 - job.fn reports its own errors; this is a last guard
                job.emit("error", APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
            finally:
                self.busy = False
                self._durations = (self._durations + [time.perf_counter() - t0])[-16:]

    def status(self) -> dict[str, Any]:
        return {"queued": self.waiting, "busy": self.busy}
