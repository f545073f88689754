"""Recipes on Ray with the step cache in a shared store (kiln.recipe.ray_executor, kiln.recipe.store).

A local Ray instance (2 CPUs, loopback, no dashboard) is started once for the module. The recipes are
tiny (random Llama and Qwen2 fixtures: two GGUF types, eval on a short text; GPTQ and its GGUF), run
once with the local runner as the reference. Shown here: Ray and local give byte-identical artifacts
(manifests record the path they read a GPTQ checkpoint from, the output directory or the store, so
that path is masked, as tests/test_recipe.py masks the output directory between two local runs); a
worker SIGKILLed mid-step is retried and the sweep completes with nothing lost, duplicated or ever
partially visible in the store; two sweeps at once over overlapping recipes run each shared step once
(counted from the store's lease records); the lease itself; atomic publication on memory:// and file://.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's switch: a local instance on loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'kiln-llm[ray]'); the Ray executor "
                                        "tests need it")
pytest.importorskip("fsspec", reason="fsspec is not installed (pip install 'kiln-llm[ray]')")

from kiln.recipe import Runner, load_recipe  # noqa: E402
from kiln.recipe.ray_executor import run_sweep  # noqa: E402
from kiln.recipe.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    if started:
        ray.shutdown()


def _recipes(d: Path, llama: Path, qwen2: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    text = (REPO / "src" / "kiln" / "data" / "heldout.txt").read_text(encoding="utf-8")[:1500]
    (d / "eval.txt").write_text(text, encoding="utf-8")
    common = "bench:\n  enabled: false\nverify: false\nthreads: 1\noutput: out\n"
    files = {
        "a": f"name: tiny-a\nsource: {llama}\ntargets:\n  gguf: [f16, q8_0]\neval:\n  ctx: 64\n  text: eval.txt\n",
        "b": f"name: tiny-b\nsource: {qwen2}\ntargets:\n  gguf: [q8_0]\n  gptq:\n    samples: 4\n    seq_len: 64\n"
             "    gguf: [q4_0]\neval:\n  enabled: false\n",
        "c": f"name: tiny-c\nsource: {llama}\ntargets:\n  gguf: [q8_0, q4_0]\neval:\n  enabled: false\n",
    }
    out = {}
    for k, body in files.items():
        out[k] = d / f"{k}.yaml"
        out[k].write_text(body + common, encoding="utf-8")
    return out


def _artifacts(out: Path, mask: list[str]) -> dict[str, str]:
    """sha256 of every artifact and report file; manifests with the directories they record masked."""
    found = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel.startswith(".") or "/." in rel:
            continue
        data = path.read_bytes()
        if path.name.endswith("manifest.json"):
            for m in mask:
                data = data.replace(m.encode(), b"<dir>")
        found[rel] = hashlib.sha256(data).hexdigest()
    return found


def _mask_paths(out: Path, store: Path) -> list[str]:
    """The directories a GPTQ export's manifest may name as its source's parent: the output, or a store entry."""
    return sorted({str(out), *[str(p) for p in (store / "steps").glob("*/files")]}, key=len, reverse=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> dict:
    """The recipes, and what the local runner writes for a and b (the reference)."""
    tmp = tmp_path_factory.mktemp("recipe-ray")
    recipes = _recipes(tmp / "recipes", tiny_llama_dir, tiny_qwen2_dir)
    local = {}
    for k in ("a", "b"):
        runner = Runner(load_recipe(recipes[k]), tmp / "local" / k)
        runner.run()
        local[k] = runner.output
    return {"tmp": tmp, "recipes": recipes, "local": local}


def _runners(recipes: dict[str, Path], keys: str, base: Path) -> list[Runner]:
    return [Runner(load_recipe(recipes[k]), base / k) for k in keys]


def _compare(local: Path, ray_out: Path, store: Path) -> None:
    a = _artifacts(local, [str(local)])
    b = _artifacts(ray_out, _mask_paths(ray_out, store))
    assert len(a) >= 4 and a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_ray_and_local_give_identical_artifacts(ray_local, setup: dict) -> None:
    tmp, store = setup["tmp"], setup["tmp"] / "store-identical"
    runners = _runners(setup["recipes"], "ab", tmp / "ray1")
    seen: list[dict] = []
    statuses = run_sweep(runners, str(store), on_progress=seen.append)
    for k, runner in zip("ab", runners):
        _compare(setup["local"][k], runner.output, store)
    a_steps = {s.id: s.action for s in statuses[0]}
    assert a_steps == {"gguf-f16": "run", "gguf-q8_0": "run", "eval": "run", "report": "run"}
    assert seen and all(c["failed"] == 0 for c in seen[-1].values())
    assert seen[-1]["tiny-b"]["done"] == 3  # gguf-q8_0, gptq, gptq-gguf-q4_0
    # a later local run finds every step cached in the output directory the Ray run wrote
    again = Runner(load_recipe(setup["recipes"]["a"]), runners[0].output).run()
    assert all(s.action == "skip" for s in again), again
    # and a second Ray sweep finds every step published: nothing runs
    second = run_sweep(_runners(setup["recipes"], "ab", tmp / "ray1b"), str(store))
    assert all(s.action == "skip" for st in second for s in st if s.id != "report"), second


def _watch_store(store: Path, stop: threading.Event, problems: list[str]) -> None:
    """Every entry under steps/ must be complete whenever it is visible."""
    import json

    while not stop.is_set():
        steps = store / "steps"
        for entry in (steps.iterdir() if steps.is_dir() else []):
            try:
                rec = json.loads((entry / "record.json").read_text())
            except FileNotFoundError:
                problems.append(f"{entry.name}: visible without a record")
                continue
            for rel, meta in rec["files"].items():
                f = entry / "files" / rel
                if not f.is_file() or f.stat().st_size != meta["size"]:
                    problems.append(f"{entry.name}/{rel}: visible but incomplete")
        time.sleep(0.01)


def test_worker_killed_mid_step_is_retried_and_nothing_is_lost(ray_local, setup: dict) -> None:
    import json

    tmp, store = setup["tmp"], setup["tmp"] / "store-fault"
    runners = _runners(setup["recipes"], "b", tmp / "ray-fault")
    box: dict = {}
    stop, problems = threading.Event(), []
    watcher = threading.Thread(target=_watch_store, args=(store, stop, problems), daemon=True)

    def sweep() -> None:
        try:
            box["statuses"] = run_sweep(runners, str(store))
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    th = threading.Thread(target=sweep)
    th.start()
    watcher.start()
    killed = None
    deadline = time.time() + 60
    while killed is None and time.time() < deadline and th.is_alive():
        for lease in (store / "leases").glob("*/*.json"):
            try:
                body = json.loads(lease.read_text())
            except (OSError, ValueError):
                continue
            if body.get("step") == "gptq" and body.get("state") == "running":
                assert body["pid"] != os.getpid()  # a Ray worker, not this process
                os.kill(body["pid"], signal.SIGKILL)
                killed = body
                break
        time.sleep(0.01)
    th.join(timeout=120)
    stop.set()
    watcher.join()
    assert killed is not None, "never saw the gptq step running"
    assert "error" not in box, box.get("error")
    assert not problems, problems[:5]
    st = Store(store)
    attempts = st.attempts(killed["key"])
    assert [a["state"] for a in attempts] == ["running", "done"], attempts  # the killed one never finished
    assert attempts[1]["took_over"] == {"epoch": 1, "why": "dead"}
    assert st.record(killed["key"])["epoch"] == 2
    assert not list((store / "tmp").iterdir()), "the killed attempt's scratch is left over"
    for key in st.published():  # every other step ran exactly once
        assert sum(a["state"] == "done" for a in st.attempts(key)) == 1
    _compare(setup["local"]["b"], runners[0].output, store)


def test_two_sweeps_at_once_run_each_shared_step_once(ray_local, setup: dict) -> None:
    tmp, store = setup["tmp"], setup["tmp"] / "store-concurrent"
    sweeps = [_runners(setup["recipes"], "ab", tmp / "s1"), _runners(setup["recipes"], "ac", tmp / "s2")]
    errors: list[BaseException] = []

    def go(runners) -> None:
        try:
            run_sweep(runners, str(store))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(r,)) for r in sweeps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    st = Store(store)
    published = st.published()
    # a: 3 steps, b: 3, a again: the same 3, c: 2 (report steps run in each output directory)
    assert len(published) == 8, published
    for key in published:
        attempts = st.attempts(key)
        assert [a["state"] for a in attempts] == ["done"], (key, attempts)
    _compare(sweeps[0][0].output, sweeps[1][0].output, store)  # both sweeps' copies of recipe a


def test_lease_excludes_expires_and_fences(tmp_path: Path) -> None:
    st = Store(tmp_path / "s", ttl=0.5)
    first = st.acquire("k", {"step": "x"}, wait=False)
    assert first is not None and first.epoch == 1
    assert st.acquire("k", wait=False) is None  # held: nobody else gets it
    assert st.holder("k")["token"] == first.body["token"]
    first.renew()
    time.sleep(0.7)  # no heartbeat: it expires
    second = st.acquire("k", wait=False)
    assert second is not None and second.epoch == 2 and second.body["took_over"]["why"] == "expired"
    assert not first.valid() and second.valid()  # the first holder would not publish
    second.release("done")
    # a dead holder on this host is taken over at once, whatever its expiry
    st2 = Store(tmp_path / "s2", ttl=3600)
    proc = subprocess.Popen(["sleep", "60"])
    lease = st2.acquire("k", wait=False)
    lease.body["pid"] = proc.pid
    lease.renew()
    proc.kill()
    proc.wait()
    taken = st2.acquire("k", wait=False)
    assert taken is not None and taken.body["took_over"]["why"] == "dead"
    # many contenders at once: exactly one wins each epoch
    st3 = Store(tmp_path / "s3", ttl=3600)
    won: list = []
    barrier = threading.Barrier(8)

    def contend() -> None:
        barrier.wait()
        if (got := st3.acquire("k", wait=False)) is not None:
            won.append(got)

    ts = [threading.Thread(target=contend) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(won) == 1 and [a["epoch"] for a in st3.attempts("k")] == [1]


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_store_publishes_atomically(tmp_path: Path, kind: str, monkeypatch) -> None:
    url = f"memory://kiln-test-{os.getpid()}-{time.time_ns()}" if kind == "memory" else f"file://{tmp_path}/store"
    st = Store(url, cache=tmp_path / "cache")

    def scratch() -> Path:
        s = st.scratch("k")
        (s / "files" / "m.gguf").write_bytes(b"x" * 1000)
        (s / "files" / "dir").mkdir()
        (s / "files" / "dir" / "model.onnx").write_bytes(b"y" * 10)
        return s

    files = {"m.gguf": {"sha256": hashlib.sha256(b"x" * 1000).hexdigest(), "size": 1000},
             "dir/model.onnx": {"sha256": hashlib.sha256(b"y" * 10).hexdigest(), "size": 10}}
    if kind == "memory":  # an upload that dies half way commits nothing
        real = st.fs.copy
        calls = []

        def flaky(src, dst, **kw):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError("connection reset")
            return real(src, dst, **kw)

        monkeypatch.setattr(st.fs, "copy", flaky)
        with pytest.raises(OSError):
            st.publish("k", scratch(), {"digest": "d", "files": files, "result": {}})
        assert st.record("k") is None and st.published() == []
        monkeypatch.setattr(st.fs, "copy", real)
    else:  # on a path the whole entry is one rename: before it, nothing under steps/
        s = scratch()
        assert st.record("k") is None and not (tmp_path / "store" / "steps" / "k").exists()
    rec = st.publish("k", scratch(), {"digest": "d", "files": files, "result": {"a": 1}})
    assert rec["result"] == {"a": 1} and st.published() == ["k"]
    local = st.files("k")
    assert (local / "m.gguf").read_bytes() == b"x" * 1000 and (local / "dir" / "model.onnx").read_bytes() == b"y" * 10
    # a second attempt publishing the same key finds the first one's record and leaves it
    again = st.publish("k", scratch(), {"digest": "other", "files": files, "result": {}})
    assert again["digest"] == "d"
    if kind == "file":  # the losing attempt's directory is gone; only the never-published scratch is left
        assert list((tmp_path / "store" / "tmp").iterdir()) == [s]


def test_cli_sweep_file_on_the_cluster_with_progress_and_report(ray_local, setup: dict) -> None:
    """`kiln recipe run SWEEP.yaml` joining the fixture's Ray instance (--address), on the store the
    identical-artifacts test filled: nothing runs again, progress is printed per recipe, and the sweep's
    report.md has one row per artifact of both recipes."""
    import json
    import sys

    if not (setup["tmp"] / "store-identical" / "steps").is_dir():
        pytest.skip("needs the store test_ray_and_local_give_identical_artifacts fills")
    tmp = setup["tmp"]
    sweep = tmp / "recipes" / "sweep.yaml"
    sweep.write_text(f"recipes: [a.yaml, b.yaml]\nexecutor: ray\nstore: {tmp / 'store-identical'}\n"
                     f"output: {tmp / 'cli-sweep'}\n", encoding="utf-8")
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "recipe", "run", str(sweep), "--address", address],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tiny-a 3/3 done (3 cached), 0 running, 0 failed | tiny-b 3/3 done (3 cached)" in proc.stderr, proc.stderr
    assert "sweep report:" in proc.stdout
    report = json.loads((tmp / "cli-sweep" / "report.json").read_text())
    assert [(r["recipe"], r["step"]) for r in report["artifacts"]] == [
        ("tiny-a", "gguf-f16"), ("tiny-a", "gguf-q8_0"), ("tiny-b", "gguf-q8_0"), ("tiny-b", "gptq-gguf-q4_0")]
    assert report["artifacts"][1]["mean_kl"] is not None and report["artifacts"][0]["bits_per_weight"] > 15
    md = (tmp / "cli-sweep" / "report.md").read_text()
    assert md.startswith("# Sweep report") and "tiny-b.q8_0.gguf" in md
    _compare(setup["local"]["a"], tmp / "cli-sweep" / "tiny-a", tmp / "store-identical")


def test_steps_declare_cpus_and_memory_from_the_cost_model(setup: dict, tiny_llama_dir: Path) -> None:
    from kiln.recipe.ray_executor import BASE_MEMORY, source_weights_bytes, step_resources

    runner = Runner(load_recipe(setup["recipes"]["a"]), setup["tmp"] / "unused")
    weights = source_weights_bytes(tiny_llama_dir)
    assert weights and weights > 1e6  # float32 bytes of the fixture's tensors, from its config
    by_id = {s.id: step_resources(s, runner.recipe.threads, weights, None) for s in runner.steps if s.kind != "report"}
    assert all(r["num_cpus"] == 1 and r["num_gpus"] == 0 for r in by_id.values())
    # unverified exports stream (a quarter of W); eval holds the reference and an artifact (1.5 W)
    assert by_id["gguf-f16"]["memory"] == BASE_MEMORY + int(0.25 * weights)
    assert by_id["eval"]["memory"] == BASE_MEMORY + int(1.5 * weights)
    assert step_resources(runner.steps[0], 4, weights, cap=BASE_MEMORY)["memory"] == BASE_MEMORY  # capped
    assert step_resources(runner.steps[0], 4, None, None) == {"num_cpus": 4, "num_gpus": 0}
