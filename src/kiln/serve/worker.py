"""One worker per model: a thread that owns the engine and runs every admitted request in one
continuous batch (kiln.runtime.batching): each step is ONE `engine.step` over the live sequences of
all running requests, and new requests join at step boundaries as soon as their rows (and, on
llama.cpp's shared KV pool, their cells) are free. An engine is not thread-safe, so everything that
touches it (tokenizing, sizing, prefill, steps) runs on this thread; its forward pass releases the
GIL, so the event loop keeps serving other requests, /health and streams meanwhile.

A `Job` is one request: `prepare` (run on the worker thread) tokenizes and checks it and returns
its `Prepared` task (or reports an error and returns None); the handler `await`s the job's events
(`next()`), which the thread `emit`s. `cancel()` (a client that went away) is checked at every step:
a running job's rows are freed at the next step boundary, a waiting job never runs. Requests are
admitted in arrival order (a large request is not starved by small ones behind it). Beyond
`queue_limit` requests waiting to run, `submit` answers 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.errors import KilnError
from kiln.runtime.batching import ContinuousBatch, Task
from kiln.runtime.engine import Engine
from kiln.serve.errors import APIError

log = logging.getLogger("kiln.serve")


@dataclass
class Prepared:
    task: Task
    finish: Callable[[], None]  # emits the job's final event once the task is done


class Job:
    def __init__(self, prepare: Callable[[Job], Prepared | None]) -> None:
        self.prepare = prepare
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self.t0 = time.perf_counter()
        self._on_leave: Callable[[], None] | None = None  # the worker's count of waiting jobs, once

    def leave_queue(self) -> None:
        """Stop counting this job as waiting (admitted, refused or cancelled); idempotent. A job
        counts as waiting from `submit` until then with no gap (its preparation included), so the
        queue limit holds while the worker tokenizes it."""
        leave, self._on_leave = self._on_leave, None
        if leave is not None:
            leave()

    def emit(self, *event: Any) -> None:
        """Called on the worker thread: hand an event to the request's handler. A final event
        leaves the queue first, so a client that has its answer never sees itself still queued."""
        if event[0] in ("error", "cancelled", "done"):
            self.leave_queue()
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next(self) -> tuple:
        return await self._events.get()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class EngineWorker:
    def __init__(self, name: str, engine: Engine, queue_limit: int) -> None:
        self.name = name
        self.engine = engine
        self.queue_limit = queue_limit
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet running (in the inbox, being prepared, or waiting for room)
        self.running = 0
        self.admitted = 0  # requests admitted to the batch since start (monotonic; /health shows it)
        self._durations: deque[float] = deque(maxlen=16)  # recent request wall times, for Retry-After
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"kiln-serve-{name}", daemon=True)

    @property
    def waiting(self) -> int:
        return self._waiting

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free (at least 1)."""
        recent = list(self._durations)
        mean = sum(recent) / len(recent) if recent else 1.0
        return max(1, math.ceil(mean * (self._waiting + 1) / max(self.queue_limit, 1)))

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise a 429 APIError when `queue_limit` requests are already waiting."""
        with self._lock:
            if self._waiting >= self.queue_limit and (self.running or self._waiting):
                seconds = self.retry_after()
                raise APIError(429, f"model {self.name!r} has {self._waiting} requests waiting (the limit): retry "
                                    f"in {seconds} s", code="rate_limit_exceeded", type="rate_limit_error",
                               headers={"Retry-After": str(seconds)})
            self._waiting += 1
            job._on_leave = self._left_queue
        self._inbox.put(job)

    def _left_queue(self) -> None:
        with self._lock:
            self._waiting -= 1

    def status(self) -> dict[str, Any]:
        return {"queued": self._waiting, "running": self.running, "busy": self.running > 0,
                "admitted": self.admitted}

    # --- the worker thread ----------------------------------------------------------------------
    def _main(self) -> None:
        batch = ContinuousBatch(self.engine)
        pending: deque[tuple[Job, Prepared]] = deque()  # prepared, waiting for room (arrival order)
        jobs: dict[Task, tuple[Job, Prepared]] = {}
        try:
            while not self._stop.is_set():
                self._take(batch, pending, block=not batch.running and not pending)
                self._admit(batch, pending, jobs)
                for task, (job, _) in list(jobs.items()):
                    if job.cancelled:
                        batch.cancel(task)
                        del jobs[task]
                        job.emit("cancelled")
                self.running = len(batch.running)
                if not batch.running:
                    continue
                finished, failed = batch.step()
                for task in finished:
                    job, prep = jobs.pop(task)
                    self._durations.append(time.perf_counter() - job.t0)
                    self._guard(job, prep.finish)
                for f in failed:
                    job, _ = jobs.pop(f.task)
                    self._fail(job, f.error)
                self.running = len(batch.running)
        except Exception as exc:  # noqa: BLE001 - the engine itself failed: every request gets a 500
            log.exception("model %s: the batch failed", self.name)
            for job, _ in [*jobs.values(), *pending]:
                self._fail(job, exc)
            self.running = 0
        finally:
            batch.close()

    def _take(self, batch: ContinuousBatch, pending: deque, block: bool) -> None:
        """Prepare the jobs that arrived (waiting up to 0.2 s for one when there is nothing to do)."""
        while True:
            try:
                job = self._inbox.get(timeout=0.2) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.cancelled:
                job.leave_queue()
                continue
            prep = self._guard(job, job.prepare, job)  # still counted as waiting meanwhile
            if prep is None:  # answered with its error (which left the queue)
                continue
            if not batch.fits_alone(prep.task):
                job.emit("error", APIError(400, f"the request needs {prep.task.rows} sequences and "
                                                f"{prep.task.cells} KV cells: more than this server holds"))
                continue
            pending.append((job, prep))

    def _admit(self, batch: ContinuousBatch, pending: deque, jobs: dict) -> None:
        while pending:
            job, prep = pending[0]
            if job.cancelled:
                pending.popleft()
                job.leave_queue()
                continue
            try:
                if not batch.admit(prep.task):
                    return
            except Exception as exc:  # noqa: BLE001 - its prefill failed: its own error
                pending.popleft()
                self._fail(job, exc)  # its error leaves the queue
                continue
            pending.popleft()
            job.leave_queue()
            self.admitted += 1
            jobs[prep.task] = (job, prep)

    def _guard(self, job: Job, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - a bug: answered as a 500, the server keeps serving
            self._fail(job, exc)
            return None

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        if isinstance(exc, APIError):
            job.emit("error", exc)
            return
        if isinstance(exc, KilnError):
            log.error("request failed: %s", exc)
            job.emit("error", APIError(500, str(exc)))
            return
        log.error("request failed", exc_info=exc)
        job.emit("error", APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
