"""A sweep of fixture recipes (models x GGUF types) with the local executor and with Ray, on this machine.

Each executor runs as a user would run it: `kiln recipe run R1 R2 ... -o DIR --json` in a fresh process
(so both pay their imports; Ray also pays starting a local instance and its workers), on fresh output
directories and, for Ray, a fresh step store. Figures: wall time of each, the ratio Ray/local (the
executor's overhead where there is no second machine to gain from), and every step's own seconds
(what docs/scaling.md builds its N models x K types on M nodes estimate from). Then the Ray sweep is run
again on the same store: every step is found published, which is the cost of the scheduler and the
store alone.

    .venv/bin/python bench/sweep.py                                  # tiny-llama, tiny-qwen2 x f16, q8_0, q4_0
    .venv/bin/python bench/sweep.py --fixtures smollm2-135m --types q8_0,q4_k_m --eval

Writes bench/results/sweep.json and prints a Markdown table. Noise here is about +-20% between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _recipes(d: Path, fixtures: list[str], types: list[str], evaluate: bool, threads: int) -> list[Path]:
    from kiln.fixtures import build

    files = []
    for name in fixtures:
        src = build(name, progress=False)
        ev = "eval:\n  ctx: 128\n" if evaluate else "eval:\n  enabled: false\n"
        body = (f"name: {name}\nsource: {src}\ntargets:\n  gguf: [{', '.join(types)}]\n{ev}"
                f"bench:\n  enabled: false\nverify: false\nthreads: {threads}\noutput: out\n")
        path = d / f"{name}.yaml"
        path.write_text(body, encoding="utf-8")
        files.append(path)
    return files


def _run(args: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "recipe", "run", *args, "--json"], capture_output=True,
                          text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"kiln recipe run {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    body = json.loads(proc.stdout)
    return wall, body if "recipes" in body else {"recipes": [body]}  # one recipe: its own report only


def _steps(body: dict) -> list[dict]:
    return [{"recipe": Path(r["output"]).name, **s} for r in body["recipes"] for s in r["steps"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="tiny-llama,tiny-qwen2")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--eval", action="store_true", help="also evaluate every artifact (transformers reference)")
    ap.add_argument("--threads", type=int, default=1, help="per step (Ray reserves this many CPUs per task)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sweep.json")
    a = ap.parse_args()
    fixtures, types = a.fixtures.split(","), a.types.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="kiln-sweep-bench-"))
    try:
        files = [str(p) for p in _recipes(tmp, fixtures, types, a.eval, a.threads)]

        def out(name: str) -> str:  # several recipes: OUT/NAME each; one recipe: OUT is its output
            return str(tmp / name if len(files) > 1 else tmp / name / fixtures[0])

        local_wall, local = _run([*files, "-o", out("local"), "--executor", "local"])
        store = tmp / "store"
        ray_wall, ray = _run([*files, "-o", out("ray"), "--executor", "ray", "--store", str(store)])
        again_wall, _ = _run([*files, "-o", out("ray2"), "--executor", "ray", "--store", str(store)])
        same = all((tmp / "local" / f / n).read_bytes() == (tmp / "ray" / f / n).read_bytes()
                   for f in fixtures for n in os.listdir(tmp / "local" / f) if n.endswith(".gguf"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps_local, steps_ray = _steps(local), _steps(ray)
    busy = sum(s["seconds"] or 0 for s in steps_local)
    result = {
        "machine": {"cpus": os.cpu_count()}, "fixtures": fixtures, "types": types, "eval": a.eval, "threads": a.threads,
        "local_wall_s": local_wall, "ray_wall_s": ray_wall, "ratio_ray_over_local": ray_wall / local_wall,
        "ray_all_cached_wall_s": again_wall, "local_step_seconds_sum": busy, "gguf_identical": same,
        "steps_local": steps_local, "steps_ray": steps_ray,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| sweep | local wall s | ray wall s | ray / local | ray, all cached, s | sum of local step s | "
          "GGUFs identical |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(f"| {len(fixtures)} models x {len(types)} types{' + eval' if a.eval else ''} | {local_wall:.1f} | "
          f"{ray_wall:.1f} | {ray_wall / local_wall:.2f} | {again_wall:.1f} | {busy:.1f} | {same} |")
    print()
    print("| recipe | step | local s | ray s |")
    print("|---|---|---:|---:|")
    by = {(s["recipe"], s["id"]): s for s in steps_ray}
    for s in steps_local:
        r = by.get((s["recipe"], s["id"]), {})
        print(f"| {s['recipe']} | {s['id']} | {s['seconds'] or 0:.2f} | {(r.get('seconds') or 0):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
