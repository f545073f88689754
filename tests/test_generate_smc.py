"""`kiln generate --particles`: SMC steering from the command line, its cache, and its errors."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("llguidance")

from kiln.fixtures import smollm2_original_gguf  # noqa: E402

KILN = Path(sys.executable).parent / "kiln"
PROMPT = ["--chat", "--prompt", "Is the sky blue? Answer yes or no."]


@pytest.fixture(scope="module")
def gguf(smollm2_dir: Path) -> Path:
    return smollm2_original_gguf()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(KILN), "generate", *args], capture_output=True, text=True, env=env, timeout=600)


def test_regex_steering_json_and_cache(gguf: Path) -> None:
    seed = str(random.randrange(1 << 30))  # a fresh cache key on every test run
    args = [str(gguf), *PROMPT, "-n", "8", "--regex", "(Yes|No)\\.", "--max-tokens", "6", "--seed", seed,
            "--threads", "1", "--json"]
    first = _run(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["cached"] is False and out["n_particles"] == 8
    assert out["posterior"] and abs(sum(r["probability"] for r in out["posterior"]) - 1) < 1e-6
    assert all(re.fullmatch(r"(Yes|No)\.", r["text"]) for r in out["posterior"])
    assert re.fullmatch(r"(Yes|No)\.", out["sample"]) and out["log_ml"] is not None and out["log_ml"] <= 0
    second = _run(*args)
    again = json.loads(second.stdout)
    assert again["cached"] is True and again["posterior"] == out["posterior"] and again["sample"] == out["sample"]
    fresh = json.loads(_run(*args, "--no-cache").stdout)
    assert fresh["cached"] is False and fresh["posterior"] == out["posterior"]  # seeded: same run, same result


def test_plain_output_shows_sample_and_posterior(gguf: Path) -> None:
    r = _run(str(gguf), *PROMPT, "-n", "4", "--regex", "(Yes|No)\\.", "--max-tokens", "6", "--seed", "3",
             "--threads", "1", "--no-cache")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"(Yes|No)\.", r.stdout.strip())
    assert "4 particles" in r.stderr and "log Z" in r.stderr


@pytest.mark.parametrize("extra,message", [
    (["--regex", "(unclosed"], "regex"),
    (["--json-schema", "/nonexistent/schema.json"], "schema"),
    (["--ess-threshold", "2"], "--ess-threshold"),
    (["--particles", "0"], "--particles"),
    (["--potential", "nosuch:thing"], "nosuch"),
    (["-n", "2", "--temperature", "0"], "--temperature"),
])
def test_bad_input_is_one_line(gguf: Path, extra: list[str], message: str) -> None:
    r = _run(str(gguf), "--prompt", "Hi", "--max-tokens", "4", "--threads", "1", "--no-cache", "-n", "2", *extra)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error:") and message in lines[0], r.stderr


def test_readme_python_example_runs(gguf: Path) -> None:
    """The README's embedding example, as written, against a real GGUF."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## SMC steering", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"out/smol.q4_k_m.gguf"', repr(str(gguf))).replace("n_ctx=1024", "n_ctx=1024, threads=1")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    post = scope["result"].posterior
    assert post and abs(sum(post.values()) - 1) < 1e-9
    assert set(post) <= {" Paris.", " Rome.", " Berlin.", " London."}
