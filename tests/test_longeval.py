"""`kiln longeval`: NLL by position and passkey retrieval, on tiny fixtures and SmolLM2 at tiny contexts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from kiln import longeval as L  # noqa: E402
from kiln.checkpoint.rope import RopeSettings  # noqa: E402
from kiln.errors import KilnError  # noqa: E402

KILN = Path(sys.executable).parent / "kiln"


def test_buckets_add_up() -> None:
    for n in (64, 256, 1000, 8192, 32768):
        edges = L.bucket_edges(n)
        assert edges[0] == 0 and edges[-1] == n and edges == sorted(set(edges))
        nll = np.random.default_rng(n).random(n - 1)
        buckets = L._buckets(L.block_sums(nll), n, edges[1])  # a cell keeps block sums, not every position
        assert sum(b["tokens"] for b in buckets) == n - 1
        weighted = sum(b["nll"] * b["tokens"] for b in buckets) / (n - 1)
        assert weighted == pytest.approx(nll.mean())
        for b in buckets:  # exact: position j+1's NLL is nll[j]
            assert b["nll"] == pytest.approx(nll[max(b["lo"] - 1, 0):b["hi"] - 1].mean())
    for n in (17, 100, 1000):
        assert L.block_counts(n).sum() == n - 1
    assert L.bucket_edges(32768)[:4] == [0, 1024, 2048, 4096]


def test_text_is_deterministic() -> None:
    a, ra = L.text_record()
    b, rb = L.text_record()
    assert a == b and ra == rb and ra["sha256"] == L.hashlib.sha256(a.encode()).hexdigest()
    assert ra["chars"] > 200_000 and ra["topics"] == sorted(ra["topics"]) and ra["python"]


def test_parse_errors() -> None:
    for bad in ("", "0.5,x", "1.5", "-0.1"):
        with pytest.raises(KilnError, match="--depths"):
            L.parse_depths(bad)
    with pytest.raises(KilnError, match="--lengths"):
        L.parse_lengths("32")
    assert L.parse_depths("0.9,0.1,0.1") == [0.1, 0.9]


def test_grid_resumes_from_cache_and_writes_outputs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kw = dict(depths=[0.1, 0.9], cache_dir=cache, threads=1)
    first = L.long_eval([tiny_llama_dir], [256, 384], **kw)
    assert first["cells"] == 6 and first["cells_cached"] == 0  # 2 NLL + 2 x 2 passkey cells
    entry = first["rows"][0]["lengths"][1]
    assert entry["length"] == 384 and len(entry["curve"]) == 24  # blocks of 16 positions
    assert sum(b["tokens"] for b in entry["buckets"]) == 383
    assert {p["depth"] for p in entry["passkey"]} == {0.1, 0.9}
    again = L.long_eval([tiny_llama_dir], [256, 384], **kw)
    assert again["cells_cached"] == 6 and again["rows"] == first["rows"]
    # an interrupted run: one cell lost, only that one is computed again
    files = sorted(cache.rglob("passkey-384-*.json"))
    files[0].unlink()
    resumed = L.long_eval([tiny_llama_dir], [256, 384], **kw)
    assert resumed["cells_cached"] == 5 and resumed["rows"] == first["rows"]
    written = L.write_outputs(resumed, tmp_path / "out")
    names = {p.name for p in written}
    assert names == set(L.OUTPUT_NAMES)
    for png in ("nll_by_position.png", "passkey_heatmap.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Passkey retrieval" in (tmp_path / "out" / "longeval.md").read_text()
    # a file of the same name that kiln did not write is refused
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "longeval.md").write_text("mine")
    with pytest.raises(KilnError, match="did not write"):
        L.write_outputs(resumed, tmp_path / "user")
    assert (tmp_path / "user" / "longeval.md").read_text() == "mine"


def test_truncation_verdict(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A baseline with a shorter window is scored in pieces of it; each row gets a plain verdict."""
    short = tmp_path / "short"
    short.mkdir()
    for p in tiny_llama_dir.iterdir():
        if p.is_file():
            (short / p.name).symlink_to(p)
    (short / "config.json").unlink()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    res = L.long_eval([tiny_llama_dir], [256], baseline=short, retrieval=False, threads=1)
    entry = res["rows"][0]["lengths"][0]
    assert isinstance(entry["worse_than_truncation"], bool) and entry["truncated_nll"] > 0
    assert "truncat" in L.markdown(res)


def test_smollm2_passkey_at_256() -> None:
    """The real model finds a passkey in a 256-token haystack (greedy exact match and a high logprob)."""
    gguf = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "fixtures" / "smollm2-135m.Q4_1.gguf"
    if not gguf.exists():
        pytest.skip("SmolLM2 fixture GGUF not built (kiln fixtures smollm2-135m)")
    res = L.long_eval([gguf], [256], depths=[0.5], perplexity=False, threads=1)
    cell = res["rows"][0]["lengths"][0]["passkey"][0]
    assert cell["accuracy"] == 1.0 and cell["logprob"] > -3


def test_cli_bad_input_is_one_line(tiny_llama_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    for args, message in (([tmp_path / "missing.gguf"], "no such file"),
                          ([tiny_llama_dir, "--lengths", "4096"], "exceeds its advertised window of 512"),
                          ([tiny_llama_dir, "--depths", "0.5,2"], "--depths")):
        res = subprocess.run([KILN, "longeval", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 1, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_rope_warning_from_measured_findings(tmp_path: Path) -> None:
    findings = tmp_path / "rope_findings.json"
    assert L.rope_warnings("llama", RopeSettings("linear", 4.0, 8192, 32768), findings) == []  # no file: no warning
    findings.write_text(json.dumps({"findings": [
        {"family": "llama", "type": "linear", "factor": 4.0, "harmful": True, "evidence": "SmolLM2-135M q8_0 at 32768"},
        {"family": "llama", "type": "yarn", "factor": 2.0, "harmful": False}]}))
    warn = L.rope_warnings("llama", RopeSettings("linear", 4.0, 8192, 32768), findings)
    assert len(warn) == 1 and "harmful" in warn[0] and "SmolLM2" in warn[0]
    assert L.rope_warnings("llama", RopeSettings("yarn", 2.0, 8192, 16384), findings) == []
    assert L.rope_warnings("qwen2", RopeSettings("linear", 4.0, 8192, 32768), findings) == []
    assert L.rope_warnings("llama", RopeSettings(), findings) == []


def test_export_warns_on_a_setting_measured_harmful(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from kiln.pipeline import export_gguf_artifact

    findings = tmp_path / "rope_findings.json"
    findings.write_text(json.dumps({"findings": [
        {"family": "llama", "type": "linear", "factor": 2.0, "harmful": True, "evidence": "a test's own data"}]}))
    monkeypatch.setattr(L, "FINDINGS", findings)
    res = export_gguf_artifact(tiny_llama_dir, tmp_path / "t.gguf", "f32", verify=False, rope_scaling="linear:2")
    assert any("measured harmful" in w and "a test's own data" in w for w in res.warnings), res.warnings
    res = export_gguf_artifact(tiny_llama_dir, tmp_path / "u.gguf", "f32", verify=False, rope_scaling="yarn:2")
    assert not any("measured harmful" in w for w in res.warnings)


def test_cells_follow_the_artifact_content_and_engine_path(tiny_qwen2_f32_gguf: Path, tmp_path: Path) -> None:
    """A copy of an artifact elsewhere finds its cells (keys are content hashes, so committed cells serve
    another machine); the exact and fast engine paths keep cells of their own and agree on bucket means."""
    cache = tmp_path / "cache"
    kw = dict(retrieval=False, cache_dir=cache, threads=1)
    fast = L.long_eval([tiny_qwen2_f32_gguf], [256], **kw)
    copy = tmp_path / "elsewhere" / tiny_qwen2_f32_gguf.name
    copy.parent.mkdir()
    copy.write_bytes(tiny_qwen2_f32_gguf.read_bytes())
    again = L.long_eval([copy], [256], **kw)
    assert again["cells_cached"] == 1 and again["rows"][0]["lengths"] == fast["rows"][0]["lengths"]
    exact = L.long_eval([tiny_qwen2_f32_gguf], [256], exact=True, **kw)
    assert exact["cells_cached"] == 0 and exact["engine"] == "exact" and fast["engine"] == "fast"
    for a, b in zip(fast["rows"][0]["lengths"][0]["buckets"], exact["rows"][0]["lengths"][0]["buckets"]):
        assert abs(a["nll"] - b["nll"]) < 0.01


def test_deadline_leaves_cells_missing_not_wrong(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A sitting that runs out of time measures nothing more; the result counts what is missing and shows
    only measured rows (bench/longctx.py fills the grid over several sittings)."""
    import time

    res = L.long_eval([tiny_llama_dir], [256], depths=[0.5], cache_dir=tmp_path / "c", threads=1,
                      deadline=time.monotonic() - 1)
    assert res["cells"] == 0 and res["cells_missing"] == 2
    assert "buckets" not in res["rows"][0]["lengths"][0] and "passkey" not in res["rows"][0]["lengths"][0]
    L.markdown(res)  # renders without the missing cells
