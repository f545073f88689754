"""Run a recipe: plan, skip what is cached, run the rest in order, record each step when it is complete.

Resumable by construction: a step's record is removed before it starts and written only after
all its outputs are in place (each written to a temporary name and renamed), so after a Ctrl-C
or a crash the next run finds every finished step cached and redoes only the interrupted one
and those after it. One run per output directory at a time (a lock file says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.atomic import sha256_file, sweep_leftovers
from kiln.errors import KilnError
from kiln.outputs import is_empty_dir, is_kiln_manifest, refuse_special_paths, written_by_kiln
from kiln.recipe.load import LoadedRecipe
from kiln.recipe.plan import LORA, SOURCE, Step, build_plan, needed
from kiln.recipe.state import (describe_outputs, digest, dir_digest, invalidate_state, read_state,
                               recorded_outputs, write_state)
from kiln.recipe.steps import RUNNERS, StepContext, text_for

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


@dataclass
class StepStatus:
    id: str
    action: str  # run, skip, not-selected
    reason: str
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_hub(repo: str) -> Path:
    """A hub id ORG/NAME[/PATH] as a local path: the Hugging Face cache first, then a download if online."""
    parts = repo.split("/")
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise KilnError(f"source {repo}: a hub id needs huggingface_hub (pip install 'kiln-llm[torch]')") from None
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - the hub client raises many types for "not cached"
        try:
            path = Path(snapshot_download(repo_id))
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KilnError(f"source {repo_id}: checkpoint not found locally and not downloadable (no network? "
                            f"{first[:120]}); set source: to a local checkpoint directory") from None
    return path / inner if inner else path


@contextlib.contextmanager
def _locked(output: Path) -> Iterator[None]:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / ".kiln-recipe.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KilnError(f"{output}: another `kiln recipe run` is writing there") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# Steps whose main output carries its own kiln manifest (kiln.outputs can tell it is kiln's without a record).
_ARTIFACT_KINDS = {"gguf": "gguf", "onnx": "onnx", "gptq": "gptq", "bench": "bench"}


def _is_ours(output: Path, name: str, kind: str, recorded: set[str]) -> bool:
    """May the recipe replace `output/name`? Yes if a step record names it, or it is a kiln artifact."""
    if name in recorded or any(r.startswith(name + "/") for r in recorded):
        return True
    path = output / name
    if name.endswith(".manifest.json"):
        return is_kiln_manifest(path)
    if name.endswith(".Modelfile"):
        return written_by_kiln(path, "modelfile")
    return kind in _ARTIFACT_KINDS and (is_empty_dir(path) or written_by_kiln(path, _ARTIFACT_KINDS[kind]))


class Runner:
    """Holds the plan and the digests known so far; `plan_status` explains, `run` executes."""

    def __init__(self, loaded: LoadedRecipe, output: Path | None = None):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.output = (output or loaded.output).absolute()
        self.steps = build_plan(self.recipe, loaded.lora is not None, loaded.calibration, loaded.eval_text,
                                loaded.tokenizer)
        self.by_id = {s.id: s for s in self.steps}
        self.paths: dict[str, Path] = {s.id: self.output / s.outputs[0] for s in self.steps}
        self.digests: dict[str, str] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.texts = {"calibration": loaded.calibration, "eval": loaded.eval_text}
        self._text_hashes: dict[str, str] | None = None

    def _source(self) -> Path:
        if SOURCE not in self.paths:
            self.paths[SOURCE] = resolve_hub(self.loaded.source) if self.loaded.source_is_hub \
                else Path(self.loaded.source)
            if not self.paths[SOURCE].exists():
                raise KilnError(f"source {self.loaded.source}: no such file or directory")
        return self.paths[SOURCE]

    def _input_digests(self) -> None:
        src = self._source()
        if SOURCE not in self.digests:
            from kiln.checkpoint import source_hash

            self.digests[SOURCE] = source_hash(src) if src.is_dir() else sha256_file(src)
        if self.loaded.lora is not None and LORA not in self.digests:
            self.digests[LORA] = dir_digest(self.loaded.lora)

    def text_hashes(self) -> dict[str, str]:
        if self._text_hashes is None:
            self._text_hashes = {role: hashlib.sha256(text_for(role, path).encode()).hexdigest()
                                 for role, path in self.texts.items()}
        return self._text_hashes

    def check(self, step: Step) -> tuple[bool, str, dict[str, Any] | None]:
        """(cached?, why, state) for `step`, given the digests of its inputs."""
        key = step.key(self.digests, self.text_hashes())
        state = read_state(self.output, step.id)
        if state is None:
            return False, "no record of a finished run", None
        if state["key"] != key:
            return False, "options or inputs changed", state
        files = describe_outputs(self.output, step.outputs, state["files"])
        if files is None or digest(files) != state["digest"]:
            return False, "output missing or modified", state
        return True, "cached", state

    def plan_status(self, only: str | None = None, force: bool = False) -> list[StepStatus]:
        """What `run` would do, without running anything (a step after one that runs is assumed to run)."""
        self._input_digests()
        selected = {s.id for s in needed(self.steps, self._only(only))}
        out: list[StepStatus] = []
        rerun: set[str] = set()
        for step in self.steps:
            if step.id not in selected:
                out.append(StepStatus(step.id, "not-selected", f"not needed by --only {only}"))
                continue
            stale = [i for i in step.inputs if i in rerun]
            if force and (only is None or step.id == only):
                action, why = "run", "--force"
            elif stale:
                action, why = "run", f"input {stale[0]} runs first"
            else:
                cached, why, state = self.check(step)
                action = "skip" if cached else "run"
                if cached and state:
                    self.digests[step.id] = state["digest"]
            if action == "run":
                rerun.add(step.id)
            out.append(StepStatus(step.id, action, why))
        return out

    def _only(self, only: str | None) -> str | None:
        if only is not None and only not in self.by_id:
            raise KilnError(f"--only {only}: no such step in this recipe (steps: {', '.join(self.by_id)})")
        return only

    def run(self, only: str | None = None, force: bool = False, progress: Progress | None = None,
            log: Log | None = None) -> list[StepStatus]:
        """Run the selected steps in order; returns what happened to each.

        With `only`, `force` applies to that step alone: what it needs still comes from the cache."""
        todo = needed(self.steps, self._only(only))
        statuses: list[StepStatus] = []
        refuse_special_paths(self.output, [self._source()])  # a missing hub checkpoint fails before anything
        self._check_outputs(todo)
        with _locked(self.output):
            sweep_leftovers(self.output)
            self._input_digests()
            ctx = StepContext(self.output, self.paths, self.texts, self.loaded.lora, self.recipe.threads,
                              self.results, None)
            for n, step in enumerate(todo):
                if progress:
                    progress("recipe steps", n, len(todo))
                forced = force and (only is None or step.id == only)
                cached, why, state = (False, "--force", None) if forced else self.check(step)
                if cached and state is not None:
                    self.digests[step.id] = state["digest"]
                    self.results[step.id] = state.get("result", {})
                    statuses.append(StepStatus(step.id, "skip", why))
                    if log:
                        log(f"[{n + 1}/{len(todo)}] {step.id}: skipped ({why})")
                    continue
                if log:
                    log(f"[{n + 1}/{len(todo)}] {step.id}: running ({why})")
                t0 = time.perf_counter()
                statuses.append(StepStatus(step.id, "run", why, self._execute(step, ctx, progress)))
                if log:
                    log(f"[{n + 1}/{len(todo)}] {step.id}: done in {time.perf_counter() - t0:.1f} s")
            if progress:
                progress("recipe steps", len(todo), len(todo))
        return statuses

    def _check_outputs(self, steps: list[Step]) -> None:
        """Before anything runs: refuse an output directory where a step would replace a user's file."""
        if not self.output.is_dir():
            return
        recorded = recorded_outputs(self.output)
        for step in steps:
            for name in step.outputs:
                path = self.output / name
                if (path.exists() or path.is_symlink()) and not _is_ours(self.output, name, step.kind, recorded):
                    raise KilnError(f"{path}: exists and was not written by this recipe; step {step.id} writes "
                                    "there: move it away or choose another --output")

    def _execute(self, step: Step, ctx: StepContext, progress: Progress | None) -> float:
        key = step.key(self.digests, self.text_hashes())
        # outputs named by a record were checked as kiln's: the step's API may replace them
        recorded = recorded_outputs(self.output)
        ctx.force = all(_is_ours(self.output, n, "", recorded) for n in step.outputs
                        if (self.output / n).exists())
        invalidate_state(self.output, step.id)
        ctx.progress = (lambda stage, done, total: progress(f"{step.id}: {stage}", done, total)) if progress else None
        t0 = time.perf_counter()
        result = RUNNERS[step.kind](step, ctx)
        files = describe_outputs(self.output, step.outputs)
        if files is None:
            raise KilnError(f"step {step.id} finished without writing {', '.join(step.outputs)}")
        self.digests[step.id] = digest(files)
        self.results[step.id] = result
        write_state(self.output, step.id, {"step": step.id, "key": key, "files": files,
                                           "digest": self.digests[step.id], "result": result})
        return time.perf_counter() - t0
