"""`kiln recipe validate|run`: the command-line face of kiln.recipe (no logic the Python API lacks)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from kiln.cli_common import emit_json, progress
from kiln.errors import KilnError

_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
    help="Override a recipe value (YAML), e.g. --set targets.gptq.samples=4 --set eval.ctx=256 (repeatable).")


@click.group("recipe")
def recipe() -> None:
    """Run a whole pipeline from a YAML recipe: merge, quantize, export, verify, evaluate, bench, report.

    \b
    Examples:
      kiln recipe validate recipes/smollm2.yaml
      kiln recipe run recipes/smollm2.yaml --dry-run
      kiln recipe run recipes/smollm2.yaml
      kiln recipe run recipes/smollm2.yaml --only gguf-q4_k_m
      kiln recipe run recipes/smollm2.yaml recipes/qwen1.5-0.5b-chat.yaml --executor ray -o out/sweep
    """


@recipe.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print the validated recipe (or every problem) as JSON.")
def validate_cmd(file: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check FILE against the recipe schema: every problem as FILE:LINE: key.path: what.

    \b
    Examples:
      kiln recipe validate recipes/smollm2.yaml
      kiln recipe validate recipes/qwen2.5-0.5b-instruct-yarn128k.yaml --json
    """
    from kiln.recipe import RecipeError, load_recipe
    from kiln.recipe.plan import build_plan

    try:
        loaded = load_recipe(file, overrides)
    except RecipeError as exc:
        if as_json:
            emit_json({"valid": False, "problems": exc.problems})
            sys.exit(1)
        for line in exc.problems[:-1]:  # every problem, one line each, as main() prints the last
            click.echo(f"kiln: error: {line}", err=True)
        raise KilnError(exc.problems[-1]) from None
    steps = [s.id for s in build_plan(loaded.recipe, loaded.lora is not None)]
    if as_json:
        emit_json({"valid": True, "recipe": loaded.recipe.model_dump(), "source": loaded.source,
                    "source_is_hub_id": loaded.source_is_hub, "output": str(loaded.output), "steps": steps})
        return
    where = f"hub id {loaded.source} (fetched when run)" if loaded.source_is_hub else loaded.source
    click.echo(f"{file}: valid; source {where}; {len(steps)} steps: {', '.join(steps)}")


@recipe.command("run")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the steps and whether each would run or be skipped, and why.")
@click.option("--only", metavar="STEP", help="Run this step (and the steps it needs, unless cached).")
@click.option("--force", is_flag=True, help="Ignore the cache: run every step again (with --only: that step).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output directory (default: the recipe's `output`, relative to the recipe file). With several "
                   "recipes: recipe NAME writes to OUTPUT/NAME and the sweep's report.md goes to OUTPUT.")
@click.option("--executor", type=click.Choice(["local", "ray"]),
              help="local: one step after another in this process (the default); ray: every step a Ray task, "
                   "the step cache in --store (default: the recipe's or sweep file's `executor`).")
@click.option("--address", metavar="ADDR", help="Ray cluster to join (e.g. auto, ray://HOST:10001; default: a local "
                                                "Ray instance on this machine).")
@click.option("--store", metavar="PATH|URL", help="With --executor ray: the step cache every worker reads, a path or "
                                                  "an fsspec URL such as s3://bucket/kiln (default: "
                                                  "$KILN_CACHE/recipe-store).")
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print what each step did as JSON.")
def run_cmd(files: tuple[Path, ...], dry_run: bool, only: str | None, force: bool, output: Path | None,
            executor: str | None, address: str | None, store: str | None, overrides: tuple[str, ...],
            as_json: bool) -> None:
    """Run recipe FILES (or a sweep file): each step is skipped when its inputs and options are unchanged.

    Every artifact appears only when complete; after Ctrl-C or a crash, running again redoes
    just the interrupted step and the ones after it. The output directory gets report.md and
    report.json (every artifact: size, bits/weight, verification, PPL/KL/top-1, bench figures).
    With several recipes (or a sweep file: a YAML with `recipes:`), each recipe also lands in the
    sweep's report.md. --executor ray runs every step as a Ray task with the step cache in a store
    all workers share: a step common to several recipes or concurrent sweeps runs once.

    \b
    Examples:
      kiln recipe run recipes/smollm2.yaml
      kiln recipe run recipes/smollm2.yaml --dry-run
      kiln recipe run recipes/smollm2.yaml --only onnx-int4 --force
      kiln recipe run recipes/smollm2.yaml -o /tmp/smol --set targets.gptq.samples=8 --set bench.enabled=false
      kiln recipe run recipes/smollm2.yaml recipes/qwen1.5-0.5b-chat.yaml --executor ray -o out/sweep
      kiln recipe run sweep.yaml --executor ray --address auto --store s3://bucket/kiln-steps
    """
    from kiln.recipe import Runner, load_recipe
    from kiln.recipe.sweep import Sweep, is_sweep_file, load_sweep

    from_file = len(files) == 1 and is_sweep_file(files[0])
    if from_file:
        sweep = load_sweep(files[0])
        sweep.overrides += list(overrides)
    else:
        sweep = Sweep(list(files), list(overrides))
    several = len(sweep.files) > 1 or from_file
    base = output or sweep.output
    loaded = [load_recipe(f, sweep.overrides) for f in sweep.files]
    if several and base is not None:
        names = [lr.recipe.name for lr in loaded]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise KilnError(f"two recipes named {dup!r} would share {base / dup}: rename one")
        runners = [Runner(lr, base / lr.recipe.name) for lr in loaded]
    else:
        runners = [Runner(lr, output) for lr in loaded]
    chosen = executor or sweep.executor or next((lr.recipe.executor for lr in loaded if lr.recipe.executor), None) \
        or "local"
    if chosen == "ray" and force:
        raise KilnError("--force: not with --executor ray (the store is shared; give a new --store instead)")
    if dry_run:
        plans = [(r, r.plan_status(only, force)) for r in runners]
        if as_json:
            body = [{"output": str(r.output), "steps": [s.to_json() for s in st]} for r, st in plans]
            emit_json(body[0] if not several else {"recipes": body})
            return
        for r, statuses in plans:
            if several:
                click.echo(f"{r.recipe.name} -> {r.output}")
            for s in statuses:
                click.echo(f"{s.action:>12}  {s.id:<20} {s.reason}")
        return

    def log(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    if chosen == "ray":
        from kiln.recipe.ray_executor import run_sweep
        from kiln.recipe.sweep import default_store, progress_line

        url = store or sweep.store or default_store()
        log(f"ray: {len(runners)} recipe(s), step store {url}")
        results = run_sweep(runners, url, address or sweep.address, only,
                            on_progress=lambda counts: log(progress_line(counts)))
    else:
        results = []
        with progress(not as_json) as update:
            for r in runners:
                if several:
                    log(f"{r.recipe.name} -> {r.output}")
                results.append(r.run(only, force, progress=update, log=None if update else log))
    report = None
    if several and base is not None:
        from kiln.recipe.sweep import write_sweep_report

        report = write_sweep_report(base, [(r.recipe.name, r.output) for r in runners])
    if as_json:
        body = [{"output": str(r.output), "steps": [s.to_json() for s in st]} for r, st in zip(runners, results)]
        emit_json(body[0] if not several else {"recipes": body, "report": str(report) if report else None})
        return
    for r, statuses in zip(runners, results):
        ran = sum(s.action == "run" for s in statuses)
        click.echo(f"{r.output}: {ran} step(s) run, {len(statuses) - ran} cached; report in "
                   f"{r.output / 'report.md'}")
    if report is not None:
        click.echo(f"sweep report: {report}")
