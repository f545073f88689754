"""The Ray executor: every step of every recipe in a sweep is one Ray task, run against a shared store.

The driver plans each recipe exactly as the local runner does (kiln.recipe.plan), then submits the
whole DAG at once: a step's task receives its upstream steps' results (Ray object refs, resolved
before it starts), computes its own cache key from their digests (the same key the local runner
computes), and either finds the step published in the store (kiln.recipe.store) or takes the
step's lease, runs the step's kiln API call in a scratch directory and publishes its outputs
atomically. Several recipes, and several sweeps, share one scheduler and one store: a step
shared by two recipes (same source, options and inputs: the same key) runs once, and a task whose
worker dies is retried by Ray (`max_retries`), resuming from the store on whichever node it lands.

When every task has finished, the driver copies each recipe's outputs from the store into the
recipe's output directory (atomically, each with the local runner's `.STEP.step.json` record) and
lets the local runner write `report.md`, so the output directory is what `--executor local` writes
(a later local run finds every step cached). Each task declares its resources: the recipe's
`threads` CPUs (1 when 0), memory estimated from the source's config with kiln's cost model
(kiln.bench.cost_model), and no GPU (no step kiln runs today uses one). ray is imported here only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.recipe.plan import LORA, SOURCE, Step, needed
from kiln.recipe.run import Runner, StepStatus, _is_ours, _locked
from kiln.recipe.state import (describe_outputs, digest, invalidate_state, read_state, recorded_outputs,
                               write_state)
from kiln.recipe.store import Store, holding

Counts = dict[str, dict[str, int]]  # recipe label -> {waiting, running, done, cached, failed}
OnProgress = Callable[[Counts], None]

MAX_RETRIES = 3  # Ray reruns a task whose worker process died this many times
GIB = 1 << 30
# Peak memory of a step as a multiple of the source's float32 weights W, on top of BASE_MEMORY for the
# interpreter, torch and the engines: a GGUF export streams tensors but verifies against the float32
# reference (W) with the artifact loaded beside it; ONNX's builder holds the model and the graph it writes;
# GPTQ the model, its quantized copy and one layer's Hessians; eval the reference and one artifact at a time;
# bench one artifact (at most W / 2 for 16-bit types).
MEMORY_FACTOR = {"merge-lora": 1.0, "gguf": 1.5, "onnx": 2.0, "gptq": 2.0, "eval": 1.5, "bench": 0.5}
STREAMING_FACTOR = 0.25
BASE_MEMORY = GIB // 2


@dataclass
class StepJob:
    """Everything a worker needs to run one step (paths are absolute: the workers share them or the store)."""

    recipe: str
    step: Step
    source: str
    lora: str | None
    texts: dict[str, str | None]
    threads: int
    digests: dict[str, str]  # SOURCE (and LORA) content hashes
    text_hashes: dict[str, str]


def _set_threads(threads: int) -> None:
    """Ray limits a worker's OpenMP pool to the task's CPUs; give torch what the local runner gets."""
    import sys

    if "torch" in sys.modules or threads:
        with contextlib.suppress(ImportError):
            import torch

            torch.set_num_threads(threads or os.cpu_count() or 1)


def _run_in(job: StepJob, out: Path, paths: dict[str, Path], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from kiln.recipe.steps import RUNNERS, StepContext

    _set_threads(job.threads)
    texts = {role: (Path(p) if p else None) for role, p in job.texts.items()}
    ctx = StepContext(out, paths, texts, Path(job.lora) if job.lora else None, job.threads, results, None)
    return RUNNERS[job.step.kind](job.step, ctx)


def address(key: str, outputs: list[str]) -> str:
    """A step's name in the store: its cache key and the names of its outputs (the key alone does not
    name them: two recipes with different names run the same computation into differently named files)."""
    return hashlib.sha256(json.dumps([key, outputs]).encode()).hexdigest()


def execute_step(store: Store, job: StepJob, *upstream: dict[str, Any]) -> dict[str, Any]:
    """One step against the store: cached, or run under its lease and published. The body of a Ray task
    (plain Python: the tests call it without Ray too)."""
    step = job.step
    digests, paths, results = dict(job.digests), {SOURCE: Path(job.source)}, {}
    for up in upstream:
        digests[up["id"]] = up["digest"]
        paths[up["id"]] = store.files(up["address"]) / up["main"]
        results[up["id"]] = up["result"]
    key = step.key(digests, job.text_hashes)
    addr = address(key, step.outputs)
    t0 = time.perf_counter()
    ran, attempt = False, None
    rec = store.record(addr)
    while rec is None:
        with holding(store, addr, {"recipe": job.recipe, "step": step.id, "cache_key": key}) as lease:
            if lease is None:  # published by the attempt we waited for
                rec = store.record(addr)
                continue
            scratch = store.scratch(addr, lease)  # recorded in the lease before it exists
            try:
                result = _run_in(job, scratch / "files", paths, results)
                files = describe_outputs(scratch / "files", step.outputs)
                if files is None:
                    raise KilnError(f"step {step.id} finished without writing {', '.join(step.outputs)}")
                if not lease.valid():  # took too long without a heartbeat: another attempt owns the key now
                    store.discard(scratch)
                    lease.release("failed", error="lease lost")
                    continue
                record = {"step": step.id, "recipe": job.recipe, "epoch": lease.epoch, "cache_key": key,
                          "outputs": step.outputs, "digest": digest(files),
                          "files": {k: {"sha256": v["sha256"], "size": v["size"]} for k, v in files.items()},
                          "result": result, "seconds": time.perf_counter() - t0}
                rec = store.publish(addr, scratch, record)
                ran, attempt = rec.get("epoch") == lease.epoch, lease.epoch
            except BaseException:
                store.discard(scratch)
                raise
    return {"id": step.id, "key": key, "address": addr, "main": step.outputs[0], "digest": rec["digest"],
            "files": rec["files"], "result": rec.get("result", {}), "ran": ran, "attempt": attempt,
            "seconds": time.perf_counter() - t0}


# --- resources --------------------------------------------------------------------------------------

def source_weights_bytes(source: Path) -> int | None:
    """float32 bytes of the source's weights from its config (kiln's cost model), or None if unknown."""
    config = source / "config.json" if source.is_dir() else None
    if config is None or not config.is_file():
        return None
    try:
        from kiln.bench.cost_model import gguf_weights

        return 2 * gguf_weights(json.loads(config.read_text(encoding="utf-8")), "f16").bytes  # f16 plan, x2
    except Exception:  # noqa: BLE001 - a config the cost model cannot read: declare no memory
        return None


def step_resources(step: Step, threads: int, weights: int | None, cap: int | None) -> dict[str, Any]:
    """Ray options for one step: CPUs, memory (bytes), GPUs."""
    cpus = step.options.get("threads") if step.kind == "bench" else threads
    opts: dict[str, Any] = {"num_cpus": max(1, int(cpus or 1)), "num_gpus": 0}
    if weights is not None:
        factor = MEMORY_FACTOR.get(step.kind, 1.0)
        if step.kind == "gguf" and not step.options.get("verify", True):
            factor = STREAMING_FACTOR  # without the reference, a GGUF export streams the source tensor by tensor
        mem = int(BASE_MEMORY + factor * weights)
        opts["memory"] = min(mem, cap) if cap else mem
    return opts


# --- the driver ---------------------------------------------------------------------------------------

@dataclass
class _Recipe:
    label: str
    runner: Runner
    steps: list[Step]  # what runs on Ray (every needed step but the report)
    refs: dict[str, Any] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        c = dict.fromkeys(("waiting", "running", "done", "cached", "failed"), 0)
        for s in self.state.values():
            c[s] += 1
        return c


def connect(address: str | None) -> bool:
    """Connect to Ray (an address, or a local instance when None); True if this call started it.

    A local instance listens on loopback only (Ray's own switch for single-machine instances) and sends
    no usage statistics."""
    import sys

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported
    try:
        import ray
    except ImportError:
        raise KilnError("--executor ray needs ray (pip install 'kiln-llm[ray]')") from None
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ...
        raise KilnError(f"cannot start or reach Ray{' at ' + address if address else ''}: {exc}") from None
    return True


def _job(rr: _Recipe, step: Step) -> StepJob:
    r = rr.runner
    digests = {k: v for k, v in r.digests.items() if k in (SOURCE, LORA)}
    return StepJob(rr.label, step, str(r._source()), str(r.loaded.lora) if r.loaded.lora else None,
                   {k: (str(v) if v else None) for k, v in r.texts.items()}, r.recipe.threads, digests,
                   r.text_hashes())


def _copy_in(src: Path, dest: Path, may: Callable[[Path], bool]) -> None:
    from kiln.atomic import atomic_dir, atomic_file

    if src.is_dir():
        with atomic_dir(dest, may) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    else:
        with atomic_file(dest, may) as tmp:
            shutil.copyfile(src, tmp)


def materialise(runner: Runner, store: Store, steps: list[Step], results: dict[str, dict[str, Any]]) -> None:
    """Copy each step's published outputs into the recipe's output directory, with the local runner's records."""
    out = runner.output
    with _locked(out):
        from kiln.atomic import sweep_leftovers

        sweep_leftovers(out)
        recorded = recorded_outputs(out)
        for step in steps:
            res = results[step.id]
            state = read_state(out, step.id)
            if state is not None and state.get("key") == res["key"] and state.get("digest") == res["digest"]:
                files = describe_outputs(out, step.outputs, state["files"])
                if files is not None and digest(files) == res["digest"]:
                    continue  # already here, unchanged
            invalidate_state(out, step.id)
            src = store.files(res["address"])
            for name in step.outputs:
                _copy_in(src / name, out / name, lambda d, n=name, k=step.kind: _is_ours(out, n, k, recorded))
            files = describe_outputs(out, step.outputs)
            if files is None or digest(files) != res["digest"]:
                raise KilnError(f"step {step.id}: the copy in {out} does not match the store's record")
            write_state(out, step.id, {"step": step.id, "key": res["key"], "files": files, "digest": res["digest"],
                                       "result": res["result"]})


def run_sweep(runners: list[Runner], store_url: str, address: str | None = None, only: str | None = None,
              on_progress: OnProgress | None = None, ttl: float = 30.0,
              poll: float = 0.5) -> list[list[StepStatus]]:
    """Run every recipe's steps as Ray tasks against the store at `store_url`, then copy each recipe's
    outputs into its output directory and write its report. Returns each recipe's step statuses."""
    from kiln.outputs import refuse_special_paths

    started = connect(address)
    import ray

    try:
        store = Store(store_url, ttl=ttl)
        task = ray.remote(execute_step)
        cap = int(max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")),
                      default=0)) or None
        recipes: list[_Recipe] = []
        labels: dict[str, int] = {}
        for runner in runners:
            label = runner.recipe.name
            labels[label] = labels.get(label, 0) + 1
            if labels[label] > 1:
                label = f"{label}#{labels[label]}"
            todo = needed(runner.steps, runner._only(only))
            refuse_special_paths(runner.output, [runner._source()])
            runner._check_outputs(todo)
            runner._input_digests()
            rr = _Recipe(label, runner, [s for s in todo if s.kind != "report"])
            weights = source_weights_bytes(runner._source())
            for step in rr.steps:
                ups = [rr.refs[i] for i in step.inputs if i in rr.refs]
                opts = step_resources(step, runner.recipe.threads, weights, cap)
                rr.refs[step.id] = task.options(max_retries=MAX_RETRIES, retry_exceptions=False,
                                                name=f"kiln:{label}:{step.id}", **opts).remote(store, _job(rr, step),
                                                                                                *ups)
                rr.state[step.id] = "waiting"
            recipes.append(rr)
        _wait(ray, recipes, store, on_progress, poll)
        failed = [f"{rr.label}/{sid}: {err}" for rr in recipes for sid, err in rr.errors.items()]
        statuses = []
        for rr in recipes:
            if rr.errors:
                statuses.append([StepStatus(sid, "failed" if sid in rr.errors else "not-run", rr.errors.get(sid, ""))
                                 for sid in rr.state])
                continue
            materialise(rr.runner, store, rr.steps, rr.results)
            ran = {sid for sid, st in rr.state.items() if st == "done"}
            local = {s.id: s for s in rr.runner.run(only)}  # every step cached but the report
            statuses.append([StepStatus(sid, "run" if sid in ran else "skip",
                                        "ran on ray" if sid in ran else "cached in the store",
                                        rr.results[sid].get("seconds")) if sid in rr.results else local[sid]
                             for sid in local])
        if failed:
            raise KilnError(f"{len(failed)} step(s) failed: " + "; ".join(failed))
        return statuses
    finally:
        if started:
            ray.shutdown()


def _wait(ray: Any, recipes: list[_Recipe], store: Store, on_progress: OnProgress | None, poll: float) -> None:
    owner = {ref: (rr, sid) for rr in recipes for sid, ref in rr.refs.items()}
    pending = list(owner)
    last: Counts | None = None
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=poll)
        for ref in done:
            rr, sid = owner[ref]
            try:
                res = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a step's error, or its input's
                cause = getattr(exc, "cause", None) or exc
                first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
                rr.errors[sid] = first[:300]
                rr.state[sid] = "failed"
                continue
            rr.results[sid] = res
            rr.state[sid] = "done" if res["ran"] else "cached"
        for rr in recipes:  # running: a live lease on the key a waiting step will have
            for step in rr.steps:
                if rr.state[step.id] not in ("waiting", "running"):
                    continue
                deps = [i for i in step.inputs if i in rr.refs]
                if all(i in rr.results for i in deps):
                    digests = {**rr.runner.digests, **{i: rr.results[i]["digest"] for i in deps}}
                    addr = address(step.key(digests, rr.runner.text_hashes()), step.outputs)
                    rr.state[step.id] = "running" if store.holder(addr) else "waiting"
        counts = {rr.label: rr.counts() for rr in recipes}
        if on_progress and counts != last:
            on_progress(counts)
        last = counts
