"""Continuous batching: several generation tasks share one engine, and every step is ONE `engine.step`
over the live sequences of all of them (what llama-server and vLLM do across requests, and what
`smc_batch` does across prompts). Tasks join and leave at step boundaries.

A `Task` is one request's decoding as a state machine over a contiguous block of engine sequence
ids `base .. base + rows - 1`, which the batch gives it on admission:

* `start(engine, base, reserve)`: prefill its prompt (through the engine's prompt cache);
* `propose(plan)`: everything before the engine call (draw tokens, weights, resampling); the engine
  sequence operations go into `plan` (one `SeqPlan` per step for all tasks, applied once); returns
  the `(token, seq)` rows to decode, or None once the task is finished;
* `prefetch(pool)`: optional work for the next step that can run while the engine decodes (SMC's
  proposal masks);
* `absorb(logits)`: this task's rows of the step's logits (None when it decoded no row).

Capacity: a task needs `rows` free sequence ids in one block, and on an engine with one shared KV
pool (llama.cpp) at most `cells` cells (its prompt once plus `rows × max_tokens`); the batch admits a
task only when both fit beside the running ones, so a running task can never run the pool dry. A
task that fails (an exception in its own work) is dropped alone; the others go on.

Batch invariance: llama.cpp's logits for a sequence may differ in the last bits with the batch it is
decoded in (like every batched server), so a seeded task is reproducible when it runs alone or beside
the same tasks; SMC populations remain exact samplers either way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kiln.errors import KilnError
from kiln.runtime.engine import Engine


class SeqPlan:
    """Engine sequence operations of one step, gathered over tasks (disjoint id ranges) and run as:
    drops of prefixes nobody continues, ONE reorder, drops of the sources that moved."""

    def __init__(self) -> None:
        self.drop_first: list[int] = []
        self.src: list[int] = []
        self.dst: list[int] = []
        self.drop_after: list[int] = []

    def extend(self, other: SeqPlan) -> None:
        self.drop_first += other.drop_first
        self.src += other.src
        self.dst += other.dst
        self.drop_after += other.drop_after

    def apply(self, engine: Engine) -> None:
        for s in self.drop_first:
            engine.drop_seq(s)
        if self.src:
            engine.reorder(self.src, self.dst)  # every destination is free: no spare ids needed
        for s in self.drop_after:
            engine.drop_seq(s)


class Task(ABC):
    """One request's decoding (module docstring). Subclasses set `rows`, `cells` and `prompt`."""

    rows: int
    cells: int
    prompt: list[int]

    @abstractmethod
    def start(self, engine: Engine, base: int, reserve: int) -> None: ...

    @abstractmethod
    def propose(self, plan: SeqPlan) -> list[tuple[int, int]] | None: ...

    def prefetch(self, pool: ThreadPoolExecutor) -> None:  # noqa: B027 - optional
        pass

    @abstractmethod
    def absorb(self, logits: np.ndarray | None) -> None: ...


@dataclass
class Failure:
    task: Task
    error: BaseException


class ContinuousBatch:
    """Runs admitted tasks together on `engine` (which it owns: reset on creation and on `close`).

    Single-threaded by design (an engine is not thread-safe): the owner calls `admit`, `step` and
    `cancel` from one thread, between steps."""

    def __init__(self, engine: Engine, rows: int | None = None, overlap: bool = True) -> None:
        self.engine = engine
        self.rows = int(rows or engine.n_seq_max)
        if self.rows > engine.n_seq_max:
            raise KilnError(f"a batch of {self.rows} rows needs an engine with n_seq_max >= {self.rows}")
        self.shared_pool = bool(getattr(engine, "shared_kv_pool", False))
        self.running: dict[Task, int] = {}  # task -> base sequence id, in admission order
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-batch") if overlap else None
        engine.reset()

    # --- capacity -------------------------------------------------------------------------------
    def _free_block(self, rows: int) -> int | None:
        taken = sorted((base, base + t.rows) for t, base in self.running.items())
        at = 0
        for lo, hi in taken:
            if lo - at >= rows:
                return at
            at = max(at, hi)
        return at if self.rows - at >= rows else None

    def cells_in_use(self) -> int:
        """KV cells the running tasks may hold at most (their admission budgets)."""
        return sum(t.cells for t in self.running)

    def fits(self, task: Task) -> bool:
        """Whether `task` can start now beside the running tasks."""
        if self._free_block(task.rows) is None:
            return False
        return not self.shared_pool or self.cells_in_use() + task.cells <= self.engine.n_ctx

    def fits_alone(self, task: Task) -> bool:
        """Whether `task` could ever start (on an empty batch)."""
        return task.rows <= self.rows and (not self.shared_pool or task.cells <= self.engine.n_ctx)

    # --- tasks ----------------------------------------------------------------------------------
    def admit(self, task: Task) -> bool:
        """Start `task` (prefill its prompt) if it fits now; False (nothing done) if it must wait.
        An error of its prefill propagates after its rows are freed."""
        if not self.fits(task):
            return False
        base = self._free_block(task.rows)
        assert base is not None
        held = self.engine.positions()
        # cells still needed after this prompt: this task's tails, and what the running tasks may still add
        others = sum(max(0, t.cells - sum(held.get(s, 0) for s in range(b, b + t.rows)))
                     for t, b in self.running.items())
        reserve = max(0, task.cells - len(task.prompt)) + others
        self.running[task] = base
        try:
            task.start(self.engine, base, reserve)
        except BaseException:
            self._release(task)
            raise
        return True

    def cancel(self, task: Task) -> None:
        """Stop `task` between steps and free its rows."""
        if task in self.running:
            self._release(task)

    def _release(self, task: Task) -> None:
        base = self.running.pop(task)
        held = self.engine.positions()
        for s in range(base, base + task.rows):
            if s in held:
                self.engine.drop_seq(s)

    def step(self) -> tuple[list[Task], list[Failure]]:
        """One step of every running task: (tasks that finished, tasks that failed); both are released."""
        plan = SeqPlan()
        work: list[tuple[Task, list[tuple[int, int]]]] = []
        finished: list[Task] = []
        failed: list[Failure] = []
        for task in list(self.running):
            own = SeqPlan()  # a task that fails halfway leaves no half-planned forks
            try:
                rows = task.propose(own)
            except Exception as exc:  # noqa: BLE001 - one task's failure is its own
                failed.append(Failure(task, exc))
                continue
            if rows is None:
                finished.append(task)
            else:
                plan.extend(own)
                work.append((task, rows))
        for f in failed:
            self._release(f.task)
        for t in finished:
            self._release(t)
        plan.apply(self.engine)
        if self._pool is not None:
            for task, rows in work:
                if rows:
                    task.prefetch(self._pool)
        flat = [r for _, rows in work for r in rows]
        logits = self.engine.step([t for t, _ in flat], [s for _, s in flat]) if flat else None
        at = 0
        for task, rows in work:
            try:
                task.absorb(None if not rows else logits[at:at + len(rows)])
            except Exception as exc:  # noqa: BLE001
                failed.append(Failure(task, exc))
                self._release(task)
            at += len(rows)
        return finished, failed

    def run(self, tasks: Sequence[Task]) -> list[Failure]:
        """Run `tasks` to the end, admitting each as soon as it fits (in order); the failures."""
        waiting = list(tasks)
        for t in waiting:
            if not self.fits_alone(t):
                raise KilnError(f"a task of {t.rows} rows and {t.cells} KV cells cannot fit this batch "
                                f"({self.rows} rows, {self.engine.context_text()})")
        failures: list[Failure] = []
        while waiting or self.running:
            while waiting and self.admit(waiting[0]):
                waiting.pop(0)
            _, failed = self.step()
            failures.extend(failed)
        return failures

    def close(self) -> None:
        for task in list(self.running):
            self._release(task)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.engine.reset()

    def __enter__(self) -> ContinuousBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ContinuousBatch", "Failure", "SeqPlan", "Task"]
