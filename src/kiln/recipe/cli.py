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
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the steps and whether each would run or be skipped, and why.")
@click.option("--only", metavar="STEP", help="Run this step (and the steps it needs, unless cached).")
@click.option("--force", is_flag=True, help="Ignore the cache: run every step again (with --only: that step).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output directory (default: the recipe's `output`, relative to the recipe file).")
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print what each step did as JSON.")
def run_cmd(file: Path, dry_run: bool, only: str | None, force: bool, output: Path | None,
            overrides: tuple[str, ...], as_json: bool) -> None:
    """Run the recipe FILE: each step is skipped when its inputs and options are unchanged.

    Every artifact appears only when complete; after Ctrl-C or a crash, running again redoes
    just the interrupted step and the ones after it. The output directory gets report.md and
    report.json (every artifact: size, bits/weight, verification, PPL/KL/top-1, bench figures).

    \b
    Examples:
      kiln recipe run recipes/smollm2.yaml
      kiln recipe run recipes/smollm2.yaml --dry-run
      kiln recipe run recipes/smollm2.yaml --only onnx-int4 --force
      kiln recipe run recipes/smollm2.yaml -o /tmp/smol --set targets.gptq.samples=8 --set bench.enabled=false
    """
    from kiln.recipe import Runner, load_recipe

    runner = Runner(load_recipe(file, overrides), output)
    if dry_run:
        statuses = runner.plan_status(only, force)
        if as_json:
            emit_json({"output": str(runner.output), "steps": [s.to_json() for s in statuses]})
            return
        for s in statuses:
            click.echo(f"{s.action:>12}  {s.id:<20} {s.reason}")
        return

    def log(line: str) -> None:
        if not as_json:
            click.echo(line, err=True)

    with progress(not as_json) as update:
        statuses = runner.run(only, force, progress=update, log=None if update else log)
    if as_json:
        emit_json({"output": str(runner.output), "steps": [s.to_json() for s in statuses]})
        return
    ran = sum(s.action == "run" for s in statuses)
    click.echo(f"{runner.output}: {ran} step(s) run, {len(statuses) - ran} cached; report in "
               f"{runner.output / 'report.md'}")
