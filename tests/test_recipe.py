"""Recipes: every shipped recipe validates, broken ones fail at their line and key, and the default
recipe runs on the real SmolLM2 fixture with caching and resumption.

The pipeline test runs `kiln recipe run recipes/smollm2.yaml` as a user would (a subprocess each
time), with the expensive knobs turned down through `--set` (GPTQ samples and chunk length, eval
context and a short eval text, a one-context bench grid, no per-export verification: the export
tests cover that). Targets and step graph are the recipe's own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DEFAULT = REPO / "recipes" / "smollm2.yaml"


def _kiln(*args: str, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(recipe: Path, smollm2_dir: Path) -> None:
    loaded = load_recipe(recipe)
    assert loaded.recipe.name
    proc = _kiln("recipe", "validate", str(recipe), "--json", check=True)
    assert json.loads(proc.stdout)["valid"] is True


def test_shipped_recipes_cover_the_model_table() -> None:
    names = {p.stem for p in RECIPES}
    assert {"smollm2", "qwen1.5-0.5b-chat", "qwen1.5-1.8b-chat", "qwen1.5-7b-chat",
            "qwen2.5-0.5b-instruct-yarn128k", "arbor-500m-1b", "qwen3.5-0.8b", "qwen3.5-2b", "qwen3-30b-a3b"} <= names
    yarn = load_recipe(REPO / "recipes" / "qwen2.5-0.5b-instruct-yarn128k.yaml").recipe.rope
    assert (yarn.flag(), yarn.original_context) == ("yarn:4", 32768)
    assert load_recipe(REPO / "recipes" / "qwen1.5-7b-chat.yaml").recipe.rope.context == 32768


def test_qwen35_and_moe_recipes_name_what_their_family_can_do() -> None:
    """The Qwen3.5 recipes carry every route kiln has for that family (GGUF, GPTQ q4_0, int4 ONNX); the MoE one
    leaves ONNX out (the builder has no Qwen3-MoE graph) and says so in a comment, since validation cannot
    see the family of a hub id."""
    for stem, source, onnx in (("qwen3.5-0.8b", "Qwen/Qwen3.5-0.8B", ["int4"]), ("qwen3.5-2b", "Qwen/Qwen3.5-2B", ["int4"]),
                               ("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", [])):
        path = REPO / "recipes" / f"{stem}.yaml"
        loaded = load_recipe(path)
        recipe = loaded.recipe
        assert (loaded.source, loaded.source_is_hub) == (source, True)
        assert recipe.targets.gguf == ["q8_0", "q4_k_m"] and recipe.targets.modelfile
        assert recipe.targets.gptq is not None and recipe.targets.gptq.gguf == ["q4_0"]
        assert recipe.targets.onnx == onnx
        assert recipe.eval.enabled and recipe.bench.enabled
        assert ("#   onnx" in path.read_text(encoding="utf-8")) == (not onnx)
    assert load_recipe(REPO / "recipes" / "qwen3.5-0.8b.yaml").recipe.bench.contexts == [4096, 32768, 131072]


GOOD = """\
name: broken
source: {source}
targets:
  gguf: [q8_0]
  onnx: [int4]
output: out
"""


def _write(tmp_path: Path, text: str, source: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text.format(source=source), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, line, message", [
    (lambda t: t.replace("  onnx: [int4]\n", "  onnx: [int4]\n  quant: q8_0\n"), 6,
     "targets.quant: unknown key 'quant' (known: gguf, modelfile, onnx, gptq)"),
    (lambda t: t.replace("gguf: [q8_0]", "gguf:\n    - q8_0\n    - q4_x"), 6,
     "targets.gguf[1]: unknown quantization type 'q4_x' (known: f32, f16"),
    (lambda t: t.replace("output: out", "lora: no-such-adapter\noutput: out"), 6,
     "lora: 'no-such-adapter': no such directory"),
    (lambda t: t.replace("output: out", "eval:\n  text: missing.txt\noutput: out"), 7,
     "eval.text: 'missing.txt': no such file"),
    (lambda t: t.replace("onnx: [int4]", "onnx: [int3]"), 5, "targets.onnx[0]: 'int3': input should be"),
    (lambda t: t.replace("output: out", "bench:\n  contexts: [512, 8]\noutput: out"), 7,
     "bench.contexts: must be at least 64, got 8"),
    (lambda t: t.replace("name: broken\n", ""), None, "name: missing (required)"),
])
def test_broken_recipe_names_line_and_key(tmp_path: Path, tiny_llama_dir: Path, edit, line: int | None,
                                           message: str) -> None:
    path = _write(tmp_path, edit(GOOD), tiny_llama_dir)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    where = f"{path}:{line}: " if line else f"{path}:1: "
    assert str(err.value).startswith(where + message), str(err.value)
    proc = _kiln("recipe", "validate", str(path))
    assert proc.returncode == 1
    assert proc.stderr.startswith("kiln: error: " + where + message)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_missing_source_and_every_problem_listed(tmp_path: Path) -> None:
    text = GOOD.replace("gguf: [q8_0]", "gguf: [q8_0, nope]").replace("output: out", "calibration: c.txt\noutput: out")
    path = _write(tmp_path, text, "./no/such/dir")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.problems[0].startswith(f"{path}:4: targets.gguf[1]: unknown quantization type 'nope'")
    # path problems are reported once the schema holds: fix the type and they show up, at their lines
    path = _write(tmp_path, text.replace(", nope", ""), "./no/such/dir")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.problems[0].startswith(f"{path}:2: source: './no/such/dir': no such file or directory")
    assert err.value.problems[1].startswith(f"{path}:6: calibration: 'c.txt': no such file")
    proc = _kiln("recipe", "run", str(path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "and 1 more problem" in proc.stderr


def test_set_override_is_named_in_errors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = _write(tmp_path, GOOD, tiny_llama_dir)
    proc = _kiln("recipe", "validate", str(path), "--set", "eval.ctx=8")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"kiln: error: {path}: --set eval.ctx: Input should be greater than or equal to 16"


def test_hub_id_validates_but_fails_in_one_line_at_run_time(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD, "no-such-org/no-such-model")
    assert load_recipe(path).source_is_hub
    proc = _kiln("recipe", "run", str(path), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("kiln: error: source no-such-org/no-such-model: checkpoint not found locally")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- the default recipe, run for real -----------------------------------------------------------

def _overrides(tmp: Path) -> list[str]:
    text = (REPO / "src" / "kiln" / "data" / "heldout.txt").read_text(encoding="utf-8")[:3000]
    short = tmp / "eval-short.txt"
    short.write_text(text, encoding="utf-8")
    sets = ["targets.gptq.samples=4", "targets.gptq.seq_len=128", "eval.ctx=128", f"eval.text={short}",
            "bench.contexts=[128]", "bench.anchors=false", "verify=false"]
    return [arg for s in sets for arg in ("--set", s)]


def _artifacts(out: Path) -> dict[str, str]:
    """sha256 of every artifact file; manifests with the output directory's path masked (they record it)."""
    import hashlib

    found = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel.startswith((".", "bench/", "report.")) or "/." in rel:
            continue
        data = path.read_bytes()
        if path.name.endswith("manifest.json"):
            data = data.replace(str(out).encode(), b"<out>")
        found[rel] = hashlib.sha256(data).hexdigest()
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_dir: Path) -> dict:
    """An uninterrupted run in A; a run in B killed (SIGKILL) mid-GPTQ, then resumed."""
    tmp = tmp_path_factory.mktemp("recipe")
    sets = _overrides(tmp)
    t0 = time.perf_counter()
    a = tmp / "A"
    first = _kiln("recipe", "run", str(DEFAULT), "-o", str(a), *sets, check=True)
    seconds = time.perf_counter() - t0

    b = tmp / "B"
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "recipe", "run", str(DEFAULT), "-o", str(b), *sets],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if "gptq: running" in line:
            time.sleep(8)  # model loaded, calibration under way
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    killed = {"stderr": "".join(seen), "files": sorted(p.name for p in b.iterdir()), "returncode": proc.returncode}
    resumed = _kiln("recipe", "run", str(DEFAULT), "-o", str(b), *sets, check=True)
    return {"a": a, "b": b, "sets": sets, "first": first, "killed": killed, "resumed": resumed, "seconds": seconds}


@pytest.mark.slow
def test_default_recipe_writes_every_artifact_and_a_report(runs: dict) -> None:
    a = runs["a"]
    for name in ("smollm2-135m.q8_0.gguf", "smollm2-135m.q4_k_m.gguf", "smollm2-135m.q8_0.Modelfile",
                 "smollm2-135m-gptq-w4g32.q4_0.gguf", "smollm2-135m-gptq-w4g32.q4_0.Modelfile",
                 "smollm2-135m-int4-onnx/model.onnx", "smollm2-135m-gptq-w4g32/model.safetensors", "eval.json",
                 "report.md", "report.json"):
        assert (a / name).is_file(), name
    report = json.loads((a / "report.json").read_text())
    rows = {r["step"]: r for r in report["artifacts"]}
    assert set(rows) == {"gguf-q8_0", "gguf-q4_k_m", "gptq-gguf-q4_0", "onnx-int4"}
    for r in rows.values():
        assert r["size"] > 10e6 and 4 < r["bits_per_weight"] < 9
        assert r["perplexity"] > 1 and 0 <= r["mean_kl"] <= r["p99_kl"] and 0 < r["top1"] <= 1
    assert rows["gguf-q8_0"]["mean_kl"] < rows["gguf-q4_k_m"]["mean_kl"]  # 8 bits beat 4 on the same text
    assert report["bench"]["rows"] and report["gptq"]["grid"] == "q4_0"
    md = (a / "report.md").read_text()
    assert "smollm2-135m.q4_k_m.gguf" in md and "mean KL" in md and "Cost (kiln bench)" in md


@pytest.mark.slow
def test_second_run_skips_every_step(runs: dict) -> None:
    proc = _kiln("recipe", "run", str(DEFAULT), "-o", str(runs["a"]), *runs["sets"], "--json", check=True)
    steps = json.loads(proc.stdout)["steps"]
    assert len(steps) == 8 and all(s["action"] == "skip" for s in steps), steps
    dry = _kiln("recipe", "run", str(DEFAULT), "-o", str(runs["a"]), *runs["sets"], "--dry-run", check=True)
    assert dry.stdout.count("skip") == 8


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_artifacts(runs: dict) -> None:
    killed = runs["killed"]
    assert killed["returncode"] == -signal.SIGKILL
    assert "gguf-q4_k_m: done" in killed["stderr"]
    # no partial artifact: the GPTQ checkpoint is absent (at most a hidden .part), its step unrecorded
    assert "smollm2-135m-gptq-w4g32" not in killed["files"] and ".gptq.step.json" not in killed["files"]
    resumed = runs["resumed"].stderr
    assert "gguf-q8_0: skipped (cached)" in resumed and "gguf-q4_k_m: skipped (cached)" in resumed
    assert "gptq: running" in resumed and "onnx-int4: running" in resumed
    assert not [p for p in runs["b"].iterdir() if p.name.endswith(".part")]
    a, b = _artifacts(runs["a"]), _artifacts(runs["b"])
    assert len(a) > 15 and a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.mark.slow
def test_changed_option_reruns_only_what_depends_on_it(runs: dict) -> None:
    sets = [s.replace("eval.ctx=128", "eval.ctx=64") for s in runs["sets"]]
    dry = _kiln("recipe", "run", str(DEFAULT), "-o", str(runs["b"]), *sets, "--dry-run", "--json", check=True)
    actions = {s["id"]: (s["action"], s["reason"]) for s in json.loads(dry.stdout)["steps"]}
    assert actions["eval"] == ("run", "options or inputs changed")
    assert actions["report"][0] == "run" and actions["bench"][0] == "skip" and actions["gptq"][0] == "skip"
    only = _kiln("recipe", "run", str(DEFAULT), "-o", str(runs["b"]), *runs["sets"], "--only", "gguf-q8_0",
                 "--force", "--json", check=True)
    assert [(s["id"], s["action"]) for s in json.loads(only.stdout)["steps"]] == [("gguf-q8_0", "run")]
    again = _kiln("recipe", "run", str(DEFAULT), "-o", str(runs["b"]), *runs["sets"], "--dry-run", check=True)
    assert again.stdout.count("skip") == 8  # the forced re-export was byte-identical: nothing downstream reruns


def test_lora_recipe_merges_first_and_caches_on_the_adapter(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A LoRA recipe on the tiny Llama: merge, export, eval against the merged model; editing the adapter
    reruns the merge and what follows, nothing else is touched."""
    import numpy as np
    from safetensors.numpy import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}))
    rng = np.random.default_rng(0)

    def weights(scale: float) -> None:
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                   rng.standard_normal((2, 192)).astype(np.float32),
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                   (scale * rng.standard_normal((192, 2))).astype(np.float32)},
                  str(adapter / "adapter_model.safetensors"))

    weights(0.1)
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(f"name: tiny\nsource: {tiny_llama_dir}\nlora: adapter\ntargets:\n  gguf: [f16]\n"
                      "eval:\n  ctx: 64\nbench:\n  enabled: false\noutput: out\n")
    first = json.loads(_kiln("recipe", "run", str(recipe), "--json", check=True).stdout)["steps"]
    assert [(s["id"], s["action"]) for s in first] == [("merge-lora", "run"), ("gguf-f16", "run"), ("eval", "run"),
                                                       ("report", "run")]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["merge_lora"]["adapted"] == 1 and report["artifacts"][0]["verified"] is True
    assert report["eval"]["reference"]["artifact"] == "tiny-merged"  # the merged model is the reference
    weights(0.2)
    dry = json.loads(_kiln("recipe", "run", str(recipe), "--dry-run", "--json", check=True).stdout)["steps"]
    assert [(s["id"], s["action"]) for s in dry][:1] == [("merge-lora", "run")]
    assert dry[0]["reason"] == "options or inputs changed"


def test_arbor_recipe_runs_on_a_native_checkpoint(tmp_path: Path) -> None:
    """The shipped Arbor recipe, pointed at a tiny native trainer checkpoint (.pt): gpt2 GGUFs, the exact
    fp32 ONNX graph, and eval against that graph (transformers cannot load the native layout)."""
    from kiln.fixtures.arbor import build_arbor_fixtures

    arbor = build_arbor_fixtures(tmp_path / "arbor")
    sets = ["source=" + str(arbor["A"]), "source_options.tokenizer=" + str(arbor["B"] / "tokenizer"),
            "eval.ctx=64", "bench.enabled=false"]
    args = [arg for s in sets for arg in ("--set", s)]
    proc = _kiln("recipe", "run", str(REPO / "recipes" / "arbor-500m-1b.yaml"), "-o", str(tmp_path / "out"), *args,
                 "--json", check=True)
    assert [s["action"] for s in json.loads(proc.stdout)["steps"]] == ["run"] * 6
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {r["step"]: r for r in report["artifacts"]}
    assert set(rows) == {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32"}
    assert all(r["verified"] for r in rows.values())
    assert report["eval"]["reference"]["step"] == "onnx-fp32" and rows["gguf-q8_0"]["mean_kl"] is not None
