"""kiln.runtime.steer_prompts / generate_prompts: `kiln generate` as a Python API.

The CLI only parses flags and prints what these return, so a seeded run gives the same result
objects through the API as through `kiln generate --json`, for one prompt and for several.
Runs on SmolLM2's original Q4_1 GGUF (a real chat template; no export needed), one thread.
"""

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

from kiln.errors import KilnError  # noqa: E402
from kiln.runtime import Constraints, SteerOptions, generate_prompts, steer_prompts  # noqa: E402

QUESTIONS = ["Is ice cold? Answer yes or no.", "Is fire cold? Answer yes or no."]
ANSWER = r"(Yes|No)\."
RUN_DEPENDENT = ("wall_time",)  # seconds: the only field two identical seeded runs may differ in


@pytest.fixture(scope="module")
def gguf(smollm2_dir: Path) -> Path:
    from kiln.fixtures import smollm2_original_gguf

    return smollm2_original_gguf()


def _kiln_json(*args: str):
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([str(Path(sys.executable).parent / "kiln"), "generate", *args, "--json"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _same(a: dict, b: dict) -> None:
    strip = lambda d: {k: v for k, v in d.items() if k not in RUN_DEPENDENT}  # noqa: E731
    assert strip(a) == strip(b)


@pytest.mark.parametrize("k", [1, 2])
def test_api_equals_cli(gguf: Path, k: int) -> None:
    prompts = QUESTIONS[:k]
    options = SteerOptions(particles=4, max_tokens=6, seed=7)
    outs = steer_prompts(gguf, prompts, options, Constraints(regex=ANSWER), chat=True, threads=1, use_cache=False)
    assert len(outs) == k
    for out in outs:
        assert out["n_particles"] == 4 and out["cached"] is False and out["prompt_tokens"] > 0
        assert re.fullmatch(ANSWER, out["sample"]) and out["posterior"]
        assert all(re.fullmatch(ANSWER, row["text"]) for row in out["posterior"])
    flags = [a for q in prompts for a in ("--prompt", q)]
    cli = _kiln_json(str(gguf), "--chat", *flags, "-n", "4", "--regex", ANSWER, "--max-tokens", "6", "--seed", "7",
                     "--threads", "1", "--no-cache")
    for api_out, cli_out in zip(outs, [cli] if k == 1 else cli):
        _same(api_out, cli_out)


def test_one_prompt_uses_the_generation_cache(gguf: Path) -> None:
    seed = random.randrange(1 << 30)  # a fresh cache key on every test run
    options = SteerOptions(particles=2, max_tokens=4, seed=seed)
    (first,) = steer_prompts(gguf, "Is the sky blue? Answer yes or no.", options, Constraints(regex=ANSWER),
                             chat=True, threads=1)
    (again,) = steer_prompts(gguf, ["Is the sky blue? Answer yes or no."], options, Constraints(regex=ANSWER),
                             chat=True, threads=1)
    assert first["cached"] is False and again["cached"] is True
    assert again["posterior"] == first["posterior"] and again["sample"] == first["sample"]
    assert again["prompt_tokens"] == first["prompt_tokens"]


def test_prompt_conditioned_critic_per_prompt(gguf: Path) -> None:
    """A critic: spec is opened by the API (kiln.runtime.potentials gets the opener passed in) and built
    once per prompt, since it conditions on each prompt."""
    options = SteerOptions(particles=2, max_tokens=4, seed=1)
    outs = steer_prompts(gguf, QUESTIONS, options, Constraints(regex=ANSWER, specs=[f"critic:{gguf}:0.5"]),
                         chat=True, threads=1)
    assert len(outs) == 2 and all(o["posterior"] and o["cached"] is False for o in outs)


def test_plain_generation_equals_cli(gguf: Path) -> None:
    seen: list[tuple[int, str]] = []
    started: list[int] = []
    outs = generate_prompts(gguf, QUESTIONS, chat=True, max_tokens=5, threads=1, on_prompt=started.append,
                            on_token=lambda i, text: seen.append((i, text)))
    assert started == [0, 1] and {i for i, _ in seen} <= {0, 1}
    for i, out in enumerate(outs):
        assert "".join(t for j, t in seen if j == i) == out["text"]
        assert set(out) == {"text", "tokens", "prompt_tokens", "stopped"} and out["prompt_tokens"] > 0
    flags = [a for q in QUESTIONS for a in ("--prompt", q)]
    assert _kiln_json(str(gguf), "--chat", *flags, "--max-tokens", "5", "--threads", "1") == outs


def test_refusals_come_before_any_model_is_opened(tmp_path: Path, gguf: Path) -> None:
    with pytest.raises(KilnError, match="--particles 0"):
        steer_prompts(tmp_path / "missing.gguf", ["x"], SteerOptions(particles=0))
    with pytest.raises(KilnError, match="no such file or directory"):
        steer_prompts(tmp_path / "missing.gguf", ["x"], SteerOptions())
    with pytest.raises(KilnError, match="not a GGUF file or an ONNX model directory"):
        steer_prompts(tmp_path, ["x"], SteerOptions())
    with pytest.raises(KilnError, match="no prompt"):
        steer_prompts(gguf, [], SteerOptions())
