"""A short soak of `kiln serve` (issue 19): the soak of bench/serve.py (its `soak` function, imported from there),
48 concurrent clients for 8 s against the tiny Qwen2 as an f32 GGUF on a free loopback port.

Each client loops over streamed and plain greedy chat completions, constrained ones (regex, SMC), streams it
closes after 1 to 4 chunks, and malformed bodies sent as raw HTTP. Checked: no 5xx, every well-formed request
answered with 200, every malformed body a 400 with OpenAI's error JSON, the server idle and the same greedy
completion after the soak as before it (the clients that went away left nothing behind), a request after the soak
served normally, and the server's RSS back within `rss_tolerance` of its level after the warm-up (bench/serve.py
says why that tolerance). No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")  # RSS: psutil where installed (peft brings it), else /proc/PID/status

from serve_process import start, stop  # noqa: E402

BENCH_SERVE = Path(__file__).resolve().parent.parent / "bench" / "serve.py"
CLIENTS = 48
SECONDS = 8.0


def _bench_serve():
    spec = importlib.util.spec_from_file_location("kiln_bench_serve", BENCH_SERVE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def soaked(tiny_qwen2_f32_gguf: Path, tmp_path_factory):
    """(server base URL, the soak's result); the server stops after the module (no traceback in its log)."""
    bench = _bench_serve()
    log = tmp_path_factory.mktemp("soak") / "server.log"
    # a 429 is not an answer: the queue holds every client
    proc, base = start([f"tq2={tiny_qwen2_f32_gguf}", "--threads", "1", "--queue-limit", str(2 * CLIENTS),
                        "--log-level", "warning"], log)
    try:
        result = bench.soak(base, "tq2", proc.pid, SECONDS, CLIENTS, seed=1, settle=2.0, progress=lambda _msg: None)
        yield base, result
    finally:
        stop(proc, log)


def _why(result: dict) -> str:
    keep = ("counts", "statuses", "errors", "malformed_not_400", "greedy_before", "greedy_after", "health_after")
    return repr({k: result[k] for k in keep})


def test_no_request_gets_a_5xx(soaked) -> None:
    _, result = soaked
    assert result["server_errors_5xx"] == 0, _why(result)
    assert set(result["statuses"]) <= {"200", "400"}, _why(result)


def test_every_well_formed_request_is_answered_with_200(soaked) -> None:
    _, result = soaked
    counts = result["counts"]
    assert all(counts[k]["sent"] > 0 for k in counts), _why(result)  # every kind ran
    assert result["well_formed_ok"] == result["well_formed_sent"], _why(result)
    assert result["error_count"] == 0, _why(result)


def test_malformed_bodies_get_400(soaked) -> None:
    _, result = soaked
    assert result["malformed_sent"] > 0
    assert result["malformed_400"] == result["malformed_sent"], _why(result)


def test_disconnecting_clients_do_not_break_later_requests(soaked) -> None:
    base, result = soaked
    assert result["disconnects"] > 0 and result["disconnects_ok"] == result["disconnects"], _why(result)
    assert result["idle_after"], _why(result)  # no request left running or queued
    assert result["same_greedy_answer"], _why(result)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(model="tq2", messages=[{"role": "user", "content": "Tell me more."}],
                                                 max_tokens=12, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_rss_settles_back_to_the_warm_up_level(soaked) -> None:
    _, result = soaked
    mib = 2 ** 20
    assert result["rss_within_tolerance"], (
        f"RSS after warm-up {result['rss_before'] / mib:.1f} MiB, peak {result['rss_peak'] / mib:.1f} MiB, "
        f"{result['rss_after'] / mib:.1f} MiB after the soak and a settle: {result['rss_delta'] / mib:+.1f} MiB, "
        f"tolerance {result['rss_tolerance'] / mib:.1f} MiB")
