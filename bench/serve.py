#!/usr/bin/env python
"""`kiln serve` under load (issue 19): kiln vs llama-cpp-python's own OpenAI server on the same GGUF, exact SMC
vs mask-only JSON output, and a soak.

Part A, serving throughput and latency. One GGUF (default: the SmolLM2-135M fixture exported to q8_0) is served
at the same time, on loopback and free ports, by `kiln serve` and by llama-cpp-python's `python -m
llama_cpp.server`, with the same thread count (--threads: kiln `--threads`, llama-cpp-python `--n_threads` and
`--n_threads_batch`), the same context (--ctx: kiln `--ctx` and `--kv-cells`, llama-cpp-python `--n_ctx`), flash
attention on in both (kiln's engine leaves llama.cpp's "auto", which picks flash attention on the CPU) and
llama-cpp-python's `--interrupt_requests False` (its default True ends a running stream as soon as another
request waits: every stream but the last would be cut short). The load generator is the real `openai` client
(AsyncOpenAI) in this process: C concurrent clients (--concurrency, default 1, 4, 16), each sending --requests
streamed chat completions one after another (default 2, so 2 x C per configuration), max_tokens --max-tokens
(default 64), temperature 0, every request a different question (the same sequence for both servers). llama-cpp-
python gets `repeat_penalty: 1.0` (its server defaults to 1.1, which neither OpenAI nor kiln has), so both
servers decode the same greedy text; the report counts how many answers are identical. Measured per (server,
concurrency): throughput = completion tokens / wall time of the configuration (first request sent to last
answer), time to first token (request sent -> first chunk with text), inter-token latency (gaps between
consecutive text chunks, pooled over requests), requests ok / failed. Completion tokens are counted as text
chunks for both servers (llama-cpp-python sends no usage in a stream; kiln's usage is recorded beside its chunk
count as a check). The two servers take turns per configuration, in ABBA order over --rounds (default 2);
figures pool the rounds, and the ratio kiln / llama-cpp-python of each figure comes from the same run.

Part B, structured output: json_schema requests (response_format json_schema) to kiln with its exact SMC
sampler (the default: --particles particles, default 8) against mask-only decoding (`extra_body={"kiln":
{"sampler": "mask"}}`), one at a time, alternating, temperature 1 and a different seed per request, non-
streaming: wall time per request and the validity rate (the answer parses and validates with `jsonschema`).

Part C, soak (--soak SECONDS; default 60, 0 skips it): a fresh `kiln serve` (queue limit 2 x --soak-clients), 64
concurrent clients for that long, each in a loop choosing at random: a streamed or a plain chat completion
(greedy), a constrained one (regex, 4 SMC particles), a stream it closes after 1 to 4 chunks (mid-stream
disconnect), or a malformed body sent as raw HTTP (broken JSON, negative max_tokens, unknown model, ...: each
must get 400). Reported: the 5xx count (goal 0), every well-formed request answered with 200, the same greedy
answer before and after the soak, and the server's RSS (psutil, sampled every 0.1 s): after a warm-up that runs
every kind of request at full concurrency, its peak under load, and after the load stops and a settle
(--settle, default 5 s), checked against the warm-up level within max(RSS_TOL_MIB, RSS_TOL_FRAC x warm-up)
(see `rss_tolerance` for why that tolerance). tests/test_serve_soak.py runs the same `soak` for ~8 s in CI.

Writes <out>/serve.json, serve.md, serve.png (default bench/results/) and the "## Serving" section of
docs/benchmarks.md (only that section: bench/contexts.py rewrites the rest of the file, and with it drops this
section, so `make bench` runs this script after it; `--docs-only` re-inserts the section from serve.json).
Progress goes to stderr; the Markdown (or --json the JSON) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIXTURE = "smollm2-135m"
QUANT = "q8_0"
MODEL_ID = f"{FIXTURE}.{QUANT}"
SECTION = "## Serving"
MIB = 2 ** 20
# The RSS check of the soak: after the load and a settle, within max(RSS_TOL_MIB, RSS_TOL_FRAC x warm-up RSS)
# of the warm-up level (`rss_tolerance`).
RSS_TOL_MIB = 16
RSS_TOL_FRAC = 0.05

QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "Name three kinds of clouds.",
    "How do bees make honey?", "What is a prime number?", "Describe a lighthouse in two sentences.",
    "What causes the tides?", "Give me a tip for learning to cook.", "What is photosynthesis?",
    "How far is the Moon from the Earth?", "Write a haiku about autumn.", "What does a compiler do?",
    "Why do cats purr?", "Explain what a rainbow is.", "What is the tallest mountain in Europe?",
    "How does a bicycle stay upright?", "What is the boiling point of water?", "Suggest a name for a red boat.",
    "What is gravity?", "How do plants drink water?", "Tell me a fact about octopuses.",
    "What is the largest ocean?", "Why do leaves change colour in autumn?", "What is a volcano?",
    "How do you make a paper plane?", "What is the speed of sound?", "Describe the taste of a lemon.",
    "What is an atom?", "Why is the sea salty?", "What do pandas eat?", "How does a rainbow form?",
    "What is the longest river in Africa?",
]
# Part A's request k asks question(k): QUESTIONS with a prefix per pass, so no prompt repeats within a run (a
# repeated prompt would hit kiln's prompt cache, which keeps several prompts, and llama-cpp-python's, which keeps
# the last one: a measure of the caches, not of serving).
PASSES = ["", "Briefly: ", "In simple words: ", "Quick question: "]
CITIES = ["Lyon", "Kyoto", "Toronto", "Nairobi", "Lisbon", "Oslo", "Lima", "Hanoi"]
JSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                   "founded": {"type": "integer", "minimum": -3000, "maximum": 2030},
                   "is_capital": {"type": "boolean"}},
    "required": ["name", "country", "founded", "is_capital"], "additionalProperties": False,
}
SOAK_REGEX = r"(yes|no)\."
PROBE_PROMPT = "Once upon a time, in a quiet harbour,"

EXAMPLES = """examples:
  .venv/bin/python bench/serve.py                                   # parts A, B, C (60 s soak): about 10 minutes
  .venv/bin/python bench/serve.py --concurrency 1,4 --requests 4 --soak 10 --rounds 1   # a smoke run
  .venv/bin/python bench/serve.py --soak 0 --json-requests 0        # part A only
  .venv/bin/python bench/serve.py --no-anchor --soak 300            # kiln only, a 5-minute soak
  .venv/bin/python bench/serve.py --artifact out/smol.q4_k_m.gguf --threads 2
  .venv/bin/python bench/serve.py --docs-only                       # re-insert docs/benchmarks.md's Serving section
"""


def question(k: int) -> str:
    return PASSES[(k // len(QUESTIONS)) % len(PASSES)] + QUESTIONS[k % len(QUESTIONS)]


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation; with few samples p99 is close to the maximum)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --- the artifact -------------------------------------------------------------------------------

def build_artifact(out: Path) -> dict:
    """The SmolLM2 fixture as q8_0 GGUF: bench/contexts.py's verified export in $KILN_CACHE/bench-artifacts when it
    exists, else exported once (kiln.pipeline.export_gguf_artifact, verify=False) into <out>/artifacts/, reused
    while its manifest names the same source and quant."""
    from kiln.fixtures import build

    src = Path(build(FIXTURE, progress=False))
    shared = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "bench-artifacts" / \
        f"{MODEL_ID}.gguf"
    if shared.is_file():
        return {"path": str(shared), "reused": True, "bytes": shared.stat().st_size, "verified": True}
    dest = out / "artifacts" / f"{MODEL_ID}.gguf"
    manifest = dest.with_name(dest.name + ".manifest.json")
    if dest.is_file() and manifest.is_file():
        try:
            rec = json.loads(manifest.read_text())
            if (rec.get("options", {}).get("quant") == QUANT
                    and Path(rec.get("source", {}).get("path", "")) == src.resolve()):
                return {"path": str(dest), "reused": True, "bytes": dest.stat().st_size, "verified": False}
        except (json.JSONDecodeError, OSError):
            pass
    from kiln.pipeline import export_gguf_artifact

    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"exporting {src} to {QUANT} GGUF -> {dest}")
    export_gguf_artifact(src, dest, QUANT, verify=False, threads=1)
    return {"path": str(dest), "reused": False, "bytes": dest.stat().st_size, "verified": False}


# --- server processes ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def kiln_command() -> list[str]:
    script = Path(sys.executable).parent / "kiln"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kiln.cli"]


class ServerProcess:
    """A server subprocess on a free loopback port, its output in `log_path`; `rss()` reads its resident memory."""

    def __init__(self, name: str, argv: list[str], health: str, log_path: Path, port: int) -> None:
        self.name, self.argv, self.health, self.log_path, self.port = name, argv, health, log_path, port
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if k != "KILN_API_KEY"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as fh:
            self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env)
        deadline = time.monotonic() + timeout
        while True:
            try:
                http_json(self.base + self.health)
                return
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not come up in {timeout:.0f} s: {self.tail()}")
            time.sleep(0.25)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int | None:
        return rss_of(self.pid)

    def tail(self, n: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


def rss_of(pid: int) -> int | None:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    except Exception:  # noqa: BLE001 - the process is gone
        return None
    return None


class RSSSampler:
    """Samples the RSS of `pids` every `interval` seconds on a thread: (seconds since start, {pid: bytes})."""

    def __init__(self, pids: list[int], interval: float = 0.1) -> None:
        self.pids, self.interval = pids, interval
        self.samples: list[tuple[float, dict[int, int | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, {p: rss_of(p) for p in self.pids}))
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, pid: int) -> int | None:
        vals = [s[1].get(pid) for s in self.samples if s[1].get(pid) is not None]
        return max(vals) if vals else None


def start_kiln(gguf: Path, threads: int, ctx: int, particles: int, queue_limit: int, log_path: Path,
               model_id: str = MODEL_ID) -> ServerProcess:
    port = free_port()
    argv = [*kiln_command(), "serve", f"{model_id}={gguf}", "--port", str(port), "--threads", str(threads),
            "--ctx", str(ctx), "--kv-cells", str(ctx), "--particles", str(particles), "--queue-limit",
            str(queue_limit), "--log-level", "warning"]
    srv = ServerProcess("kiln serve", argv, "/health", log_path, port)
    srv.start()
    return srv


def start_llama_cpp(gguf: Path, threads: int, ctx: int, log_path: Path, model_id: str = MODEL_ID) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model_id,
            "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--flash_attn", "True", "--interrupt_requests", "False",
            "--verbose", "False"]
    srv = ServerProcess("llama-cpp-python server", argv, "/v1/models", log_path, port)
    srv.start()
    return srv


def wait_idle(base: str, timeout: float = 300) -> bool:
    """Until kiln's /health says no model is busy or has requests queued (True), or `timeout` (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            models = http_json(base + "/health").get("models", {})
            if all(not m.get("busy") and not m.get("queued") for m in models.values() if isinstance(m, dict)):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def openai_client(base: str, api_key: str | None = None, timeout: float = 600):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=base + "/v1", api_key=api_key or "unused", max_retries=0, timeout=timeout)


# --- part A: throughput and latency -------------------------------------------------------------

async def stream_chat(client, model: str, messages: list[dict], max_tokens: int, extra: dict | None = None,
                      temperature: float = 0.0, seed: int | None = None, close_after: int | None = None) -> dict:
    """One streamed chat completion, timed: TTFT, gaps between text chunks, text, finish reason, usage.
    `close_after`: close the stream after that many text chunks (a client that goes away)."""
    import openai

    rec: dict[str, Any] = {"ok": False, "ttft": None, "gaps": [], "chunks": 0, "usage": None, "text": "",
                           "finish": None, "status": None, "error": None, "closed": False}
    t0 = time.perf_counter()
    last = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed, stream=True,
            stream_options={"include_usage": True}, extra_body=extra or None)
        rec["status"] = stream.response.status_code
        async for ch in stream:
            now = time.perf_counter()
            if ch.usage is not None:
                rec["usage"] = ch.usage.completion_tokens
            if ch.choices:
                c = ch.choices[0]
                if c.delta and c.delta.content:
                    if last is None:
                        rec["ttft"] = now - t0
                    else:
                        rec["gaps"].append(now - last)
                    last = now
                    rec["chunks"] += 1
                    rec["text"] += c.delta.content
                if c.finish_reason:
                    rec["finish"] = c.finish_reason
            if close_after is not None and rec["chunks"] >= close_after:
                await stream.close()
                rec["closed"] = True
                break
        rec["ok"] = rec["closed"] or rec["finish"] is not None
        if not rec["ok"]:
            rec["error"] = "stream ended without a finish_reason"
    except openai.APIStatusError as exc:
        rec["status"], rec["error"] = exc.status_code, f"{exc.status_code}: {str(exc)[:200]}"
    except openai.APIError as exc:  # an error event inside a 200 stream, or a connection failure
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    rec["t0"], rec["t1"] = t0, time.perf_counter()
    return rec


async def run_load(base: str, model: str, concurrency: int, per_client: int, max_tokens: int,
                   extra: dict | None, first: int = 0, warm_up: bool = False) -> dict:
    """`concurrency` clients, each sending `per_client` streamed greedy chat completions one after another;
    request k (client c, turn j: k = j * concurrency + c) asks question(first + k) (`warm_up`: a prompt no
    measured request shares)."""
    client = openai_client(base)
    records: list[dict | None] = [None] * (concurrency * per_client)

    async def worker(c: int) -> None:
        for j in range(per_client):
            k = j * concurrency + c
            text = "Say hello." if warm_up else question(first + k)
            records[k] = await stream_chat(client, model, [{"role": "user", "content": text}], max_tokens, extra)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"wall_s": wall, "records": records}


def summarize(runs: list[dict]) -> dict:
    """Pool the rounds of one (server, concurrency)."""
    recs = [r for run in runs for r in run["records"]]
    wall = sum(run["wall_s"] for run in runs)
    ok = [r for r in recs if r["ok"]]
    tokens = sum(r["chunks"] for r in ok)
    usage = [r["usage"] for r in ok if r["usage"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "requests": len(recs), "ok": len(ok), "failed": len(recs) - len(ok),
        "errors": sorted({r["error"] for r in recs if r["error"]})[:5],
        "tokens": tokens, "usage_tokens": sum(usage) if len(usage) == len(ok) and ok else None,
        "wall_s": wall, "tok_s": tokens / wall if wall else None,
        "tok_s_rounds": [sum(r["chunks"] for r in run["records"] if r["ok"]) / run["wall_s"] for run in runs],
        "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
        "itl_p50_ms": _ms(pct(gaps, 50)), "itl_p99_ms": _ms(pct(gaps, 99)),
        "tokens_per_request_median": statistics.median([r["chunks"] for r in ok]) if ok else None,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def part_a(args, kiln: ServerProcess, anchor: ServerProcess | None) -> dict:
    servers = [("kiln", kiln, None)]
    if anchor is not None:
        servers.append(("llama-cpp-python", anchor, {"repeat_penalty": 1.0}))
    # an untimed request each: the first decode allocates llama.cpp's compute buffers
    for _name, srv, extra in servers:
        asyncio.run(run_load(srv.base, MODEL_ID, 1, 1, 8, extra, warm_up=True))
    runs: dict[tuple[str, int], list[dict]] = {}
    first = 0  # both servers get the same prompts in a round, and no prompt comes twice
    with RSSSampler([s.pid for _, s, _ in servers], interval=0.25) as rss:
        for conc in args.concurrency:
            for rnd in range(args.rounds):
                order = servers if rnd % 2 == 0 else servers[::-1]
                for name, srv, extra in order:
                    log(f"A: {name}, {conc} concurrent clients x {args.requests} requests (round {rnd + 1}/"
                        f"{args.rounds})")
                    run = asyncio.run(run_load(srv.base, MODEL_ID, conc, args.requests, args.max_tokens, extra,
                                               first))
                    runs.setdefault((name, conc), []).append(run)
                    s = summarize([run])
                    log(f"   {s['ok']}/{s['requests']} ok, {s['tok_s']:.1f} tok/s, TTFT p50 "
                        f"{s['ttft_p50_ms'] or math.nan:.0f} ms, ITL p50 {s['itl_p50_ms'] or math.nan:.1f} ms")
                first += conc * args.requests
    rows = []
    for (name, conc), rr in runs.items():
        rows.append({"server": name, "concurrency": conc, **summarize(rr)})
    ratios = []
    same: dict[int, dict[str, int]] = {}
    for conc in args.concurrency:
        k = next((r for r in rows if r["server"] == "kiln" and r["concurrency"] == conc), None)
        a = next((r for r in rows if r["server"] == "llama-cpp-python" and r["concurrency"] == conc), None)
        if k is None or a is None:
            continue
        paired = [x / y for x, y in zip(k["tok_s_rounds"], a["tok_s_rounds"]) if y]
        ratios.append({"concurrency": conc, "tok_s": ratio(k["tok_s"], a["tok_s"]),
                       "tok_s_paired": statistics.median(paired) if paired else None,
                       **{f: ratio(k[f], a[f]) for f in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")}})
        st = same[conc] = {"identical": 0, "compared": 0}
        for rk, ra in zip(runs[("kiln", conc)], runs[("llama-cpp-python", conc)]):
            for x, y in zip(rk["records"], ra["records"]):
                if x and y and x["ok"] and y["ok"]:
                    st["compared"] += 1
                    st["identical"] += x["text"] == y["text"]
    return {"rows": rows, "ratios": ratios, "same_text": same,
            "peak_rss": {name: rss.peak(srv.pid) for name, srv, _ in servers}}


# --- part B: JSON schema, SMC vs mask -----------------------------------------------------------

def part_b(args, kiln: ServerProcess) -> dict:
    import jsonschema
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=kiln.base + "/v1", api_key="unused", max_retries=0, timeout=600)
    recs: dict[str, list[dict]] = {"smc": [], "mask": []}
    for i in range(args.json_requests):
        city = CITIES[i % len(CITIES)]
        msgs = [{"role": "user", "content": f"Describe the city of {city} as JSON with the keys name, country, "
                                            "founded (a year) and is_capital."}]
        for sampler in (("smc", "mask") if i % 2 == 0 else ("mask", "smc")):
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"i": i, "valid": False}
            try:
                out = client.chat.completions.create(
                    model=MODEL_ID, messages=msgs, max_tokens=args.json_max_tokens, temperature=1.0, seed=args.seed + i,
                    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": JSON_SCHEMA}},
                    extra_body={"kiln": {"sampler": sampler}})
                rec["wall_s"] = time.perf_counter() - t0
                choice = out.choices[0]
                rec.update(text=choice.message.content, finish=choice.finish_reason,
                           tokens=out.usage.completion_tokens if out.usage else None,
                           report={k: v for k, v in (getattr(out, "kiln", None) or {}).items() if k != "posterior"})
                try:
                    jsonschema.validate(json.loads(choice.message.content or ""), JSON_SCHEMA)
                    rec["valid"] = True
                except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                    rec["invalid_because"] = str(exc).splitlines()[0][:160]
            except openai.APIError as exc:
                rec["wall_s"] = time.perf_counter() - t0
                rec["error"] = str(exc)[:200]
            recs[sampler].append(rec)
            log(f"B: {sampler:4s} request {i + 1}/{args.json_requests}: {rec['wall_s']:.2f} s, "
                f"{'valid' if rec['valid'] else 'INVALID'}")
    rows = []
    for sampler, rr in recs.items():
        walls = [r["wall_s"] for r in rr]
        ess = [r["report"].get("ess") for r in rr if r.get("report", {}).get("ess") is not None]
        rows.append({"sampler": sampler, "requests": len(rr), "valid": sum(r["valid"] for r in rr),
                     "validity": sum(r["valid"] for r in rr) / len(rr) if rr else None,
                     "errors": sum(1 for r in rr if "error" in r),
                     "wall_p50_s": pct(walls, 50), "wall_mean_s": statistics.mean(walls) if walls else None,
                     "wall_max_s": max(walls) if walls else None,
                     "tokens_median": statistics.median([r["tokens"] for r in rr if r.get("tokens") is not None]
                                                        or [0]),
                     "particles": args.particles if sampler == "smc" else 1,
                     "ess_median": statistics.median(ess) if ess else None})
    by = {r["sampler"]: r for r in rows}
    return {"schema": JSON_SCHEMA, "max_tokens": args.json_max_tokens, "rows": rows,
            "time_ratio_smc_over_mask": ratio(by["smc"]["wall_p50_s"], by["mask"]["wall_p50_s"]),
            "examples": {s: [r.get("text") for r in rr[:3]] for s, rr in recs.items()},
            "records": recs}


# --- part C: soak -------------------------------------------------------------------------------

def malformed_bodies(model: str) -> list[tuple[str, bytes]]:
    msgs = [{"role": "user", "content": "hi"}]

    def js(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    return [
        ("broken JSON", b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "hi"}'),
        ("negative max_tokens", js({"model": model, "messages": msgs, "max_tokens": -3})),
        ("unknown model", js({"model": "no-such-model", "messages": msgs})),
        ("messages not a list", js({"model": model, "messages": "hi"})),
        ("body not an object", b"[1, 2, 3]"),
        ("invalid UTF-8", b"\xff\xfe{"),
        ("temperature out of range", js({"model": model, "messages": msgs, "temperature": 7})),
        ("empty body", b""),
    ]


async def raw_post(base: str, path: str, body: bytes, api_key: str | None = None,
                   timeout: float = 60) -> tuple[int, bytes]:
    """POST `body` over a plain socket (no client library that would refuse or fix it): (status, response body)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                + (f"Authorization: Bearer {api_key}\r\n" if api_key else "") + "\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


SOAK_MIX = {"stream": 0.35, "plain": 0.2, "constrained": 0.1, "disconnect": 0.15, "malformed": 0.2}


def rss_tolerance(baseline: int) -> int:
    """How far above the warm-up level the settled RSS may stay: max(RSS_TOL_MIB, RSS_TOL_FRAC x baseline).

    Why not zero: the baseline is taken after a warm-up that already ran every kind of request at full concurrency,
    so llama.cpp's KV pool and compute buffers, llguidance's tokenizer, uvicorn's and the event loop's per-
    connection structures all exist before it. What can still move afterwards without being a leak is glibc's
    malloc: freed Python objects and per-thread arena chunks stay mapped (malloc returns memory to the OS only from
    the top of a heap, and only above a trim threshold), and a busier moment can leave a few MiB of fragmented
    free space resident. That slack does not grow with the number of requests served. A leak does: at the bench's
    ~300 well-formed requests (and ~1000 malformed ones) per 60 s soak, 16 MiB is 50 KiB per request — far less
    than one leaked KV sequence, prompt-cache entry, SMC particle set or kept response (each tens of KiB to MiB for
    SmolLM2), so any of those leaking shows. 5% of a larger model's RSS covers the same allocator slack where the
    baseline itself is larger."""
    return max(RSS_TOL_MIB * MIB, int(RSS_TOL_FRAC * baseline))


async def _soak(base: str, model: str, pid: int, seconds: float, clients: int, api_key: str | None, seed: int,
                settle: float, max_tokens: tuple[int, int], progress) -> dict:
    import openai

    client = openai_client(base, api_key, timeout=900)
    bad = malformed_bodies(model)
    kinds = list(SOAK_MIX)
    weights = [SOAK_MIX[k] for k in kinds]
    probe = [{"role": "user", "content": "Tell me about the river."}]
    counts: dict[str, dict[str, int]] = {k: {"sent": 0, "ok": 0} for k in kinds}
    statuses: dict[str, int] = {}
    errors: list[str] = []
    malformed_not_400: list[str] = []

    def status(code: int | None) -> None:
        key = str(code) if code is not None else "no response"
        statuses[key] = statuses.get(key, 0) + 1

    async def one(kind: str, rng: random.Random, i: int) -> None:
        counts[kind]["sent"] += 1
        q = [{"role": "user", "content": QUESTIONS[rng.randrange(len(QUESTIONS))]}]
        if kind in ("stream", "disconnect"):
            close_after = rng.randint(1, 4) if kind == "disconnect" else None
            rec = await stream_chat(client, model, q, 48 if close_after else rng.randint(*max_tokens),
                                    close_after=close_after)
            status(rec["status"])
            good = rec["ok"] and (rec["closed"] if close_after else rec["finish"] in ("stop", "length"))
            # a disconnecting client whose answer ended (EOS) before its chunk count is still answered
            good = good or (close_after is not None and rec["ok"] and rec["finish"] is not None)
            if not good:
                errors.append(f"{kind}: {rec['error']}")
        elif kind == "plain":
            try:
                out = await client.chat.completions.create(model=model, messages=q, temperature=0,
                                                           max_tokens=rng.randint(*max_tokens))
                status(200)
                good = out.choices[0].finish_reason in ("stop", "length")
            except openai.APIStatusError as exc:
                status(exc.status_code)
                errors.append(f"plain: {str(exc)[:200]}")
                good = False
            except openai.APIError as exc:
                status(None)
                errors.append(f"plain: {type(exc).__name__}: {str(exc)[:200]}")
                good = False
        elif kind == "constrained":
            try:
                out = await client.chat.completions.create(
                    model=model, messages=q, temperature=1.0, seed=rng.randrange(1 << 30), max_tokens=8,
                    extra_body={"kiln": {"regex": SOAK_REGEX, "particles": 4}})
                status(200)
                good = all(re.fullmatch(SOAK_REGEX, c.message.content or "") for c in out.choices)
                if not good:
                    errors.append(f"constrained: answer {out.choices[0].message.content!r} does not match")
            except openai.APIStatusError as exc:
                status(exc.status_code)
                errors.append(f"constrained: {str(exc)[:200]}")
                good = False
            except openai.APIError as exc:
                status(None)
                errors.append(f"constrained: {type(exc).__name__}: {str(exc)[:200]}")
                good = False
        else:  # malformed: raw HTTP, must be a 400 with OpenAI's error JSON
            name, body = bad[i % len(bad)]
            try:
                code, raw = await raw_post(base, "/v1/chat/completions", body, api_key)
                status(code)
                good = code == 400 and "error" in json.loads(raw)
                if not good:
                    malformed_not_400.append(f"{name}: {code}")
            except (TimeoutError, OSError, ValueError) as exc:
                status(None)
                malformed_not_400.append(f"{name}: {type(exc).__name__}")
                good = False
            await asyncio.sleep(rng.uniform(0.1, 0.5))  # pace: a 400 takes milliseconds
        counts[kind]["ok"] += good

    async def greedy() -> dict[str, str | None]:
        """Greedy answers to two probes: a chat one (its chat-template prefix is shared with every soak request, so
        the prompt cache may reuse K/V that a soak request computed) and a plain completion whose first token no
        soak request shares (nothing but its own earlier run can be reused for it)."""
        got: dict[str, str | None] = {}
        try:
            out = await client.chat.completions.create(model=model, messages=probe, temperature=0, max_tokens=16)
            got["chat"] = out.choices[0].message.content
        except openai.APIError:
            got["chat"] = None
        try:
            out = await client.completions.create(model=model, prompt=PROBE_PROMPT, temperature=0, max_tokens=16)
            got["completion"] = out.choices[0].text
        except openai.APIError:
            got["completion"] = None
        return got

    # warm-up: every kind once in turn, then one burst of `clients` mixed requests
    progress(f"soak: warm-up ({clients} concurrent requests)")
    before_answer = await greedy()
    warm_rng = random.Random(seed - 1)
    for j, kind in enumerate(kinds):
        await one(kind, warm_rng, j)
    await asyncio.gather(*(one(kinds[j % len(kinds)], random.Random(seed - 2 - j), j) for j in range(clients)))
    warm_counts = {k: dict(v) for k, v in counts.items()}
    for v in counts.values():
        v.update(sent=0, ok=0)
    statuses.clear()
    errors.clear()
    malformed_not_400.clear()
    await asyncio.to_thread(wait_idle, base)
    await asyncio.sleep(settle)
    baseline = await asyncio.to_thread(_rss_median, pid)

    sampler = RSSSampler([pid], interval=0.1)
    deadline = time.perf_counter() + seconds
    progress(f"soak: {clients} clients for {seconds:.0f} s (RSS after warm-up {baseline / MIB:.1f} MiB)")

    async def client_loop(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        i = c
        while time.perf_counter() < deadline:
            await one(rng.choices(kinds, weights)[0], rng, i)
            i += clients

    with sampler:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(clients)))
        drained = time.perf_counter() - t0
        idle = await asyncio.to_thread(wait_idle, base)
        after_answer = await greedy()
        await asyncio.sleep(settle)
        after = await asyncio.to_thread(_rss_median, pid)
    await client.close()
    peak = sampler.peak(pid)
    try:
        health = http_json(base + "/health")
    except (OSError, ValueError) as exc:
        health = {"error": str(exc)}
    well = ("stream", "plain", "constrained")
    tol = rss_tolerance(baseline)
    n5 = sum(v for k, v in statuses.items() if k[:1] == "5")
    timeline = [(round(t, 2), s.get(pid)) for t, s in sampler.samples]
    step = max(1, len(timeline) // 600)
    return {
        "seconds": seconds, "clients": clients, "settle_s": settle, "mix": SOAK_MIX, "wall_s": drained,
        "warm_up": warm_counts, "counts": counts, "statuses": dict(sorted(statuses.items())),
        "server_errors_5xx": n5,
        "well_formed_sent": sum(counts[k]["sent"] for k in well),
        "well_formed_ok": sum(counts[k]["ok"] for k in well),
        "disconnects": counts["disconnect"]["sent"], "disconnects_ok": counts["disconnect"]["ok"],
        "malformed_sent": counts["malformed"]["sent"], "malformed_400": counts["malformed"]["ok"],
        "malformed_not_400": malformed_not_400[:10], "errors": errors[:10], "error_count": len(errors),
        "idle_after": idle, "health_after": health,
        "same_greedy_answer": before_answer["completion"] is not None and before_answer["completion"] == after_answer[
            "completion"],
        "same_greedy_chat_answer": before_answer["chat"] is not None and before_answer["chat"] == after_answer["chat"],
        "greedy_before": before_answer, "greedy_after": after_answer,
        "rss_before": baseline, "rss_peak": peak, "rss_after": after, "rss_delta": after - baseline,
        "rss_tolerance": tol, "rss_within_tolerance": after - baseline <= tol,
        "rss_timeline": timeline[::step],
    }


def _rss_median(pid: int, n: int = 5, every: float = 0.2) -> int:
    vals = []
    for _ in range(n):
        v = rss_of(pid)
        if v is not None:
            vals.append(v)
        time.sleep(every)
    return int(statistics.median(vals))


def soak(base: str, model: str, pid: int, seconds: float, clients: int = 64, *, api_key: str | None = None,
         seed: int = 0, settle: float = 5.0, max_tokens: tuple[int, int] = (4, 24), progress=log) -> dict:
    """Soak a running `kiln serve` (module docstring, part C): `clients` concurrent clients for `seconds`, then
    the counts, statuses and RSS (process `pid`) before / peak / after. Give the server a queue limit of at least
    `clients` (a 429 is not an answer). Shared with tests/test_serve_soak.py."""
    return asyncio.run(_soak(base, model, pid, seconds, clients, api_key, seed, settle, max_tokens, progress))


def soak_verdict(s: dict) -> dict[str, bool]:
    return {"zero 5xx": s["server_errors_5xx"] == 0,
            "every well-formed request answered": s["well_formed_ok"] == s["well_formed_sent"],
            "every malformed body got 400": s["malformed_400"] == s["malformed_sent"],
            "disconnects did not break later requests": bool(s["same_greedy_answer"] and s["idle_after"]),
            "RSS back to the warm-up level": bool(s["rss_within_tolerance"])}


def part_c(args, gguf: Path) -> dict:
    log(f"C: starting a fresh kiln serve for the soak (queue limit {2 * args.soak_clients})")
    srv = start_kiln(gguf, args.threads, args.ctx, args.particles, 2 * args.soak_clients,
                     args.out / "logs" / "soak-kiln.log")
    try:
        res = soak(srv.base, MODEL_ID, srv.pid, args.soak, args.soak_clients, seed=args.seed, settle=args.settle)
    finally:
        code = srv.stop()
    text = srv.log_path.read_text(errors="replace")
    res["exit_code"] = code
    res["tracebacks_in_log"] = text.count("Traceback")
    res["verdict"] = soak_verdict(res)
    log(f"C: {res['well_formed_ok']}/{res['well_formed_sent']} well-formed ok, {res['server_errors_5xx']} 5xx, "
        f"RSS {res['rss_before'] / MIB:.1f} -> peak {res['rss_peak'] / MIB:.1f} -> {res['rss_after'] / MIB:.1f} MiB")
    return res


# --- reports ------------------------------------------------------------------------------------

def f(x: Any, d: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:,.{d}f}"


def mib(x: int | None) -> str:
    return "–" if x is None else f"{x / MIB:,.1f}"


def section(rep: dict, level: int = 2) -> list[str]:
    """The report as Markdown: the "## Serving" section of docs/benchmarks.md (level 2) or serve.md's body."""
    h = "#" * level
    m, o = rep["machine"], rep["options"]
    art = rep["artifact"]
    L = [f"{h} Serving" if level == 2 else f"{h} kiln serve benchmark ({rep['timestamp']})", "",
         "Generated by `bench/serve.py` (`make bench`); do not edit by hand. "
         f"Run {rep['timestamp']}: {m['cpu']}, {m['usable_cores']} usable cores, {m['ram_gb']} GB RAM; load average "
         f"{rep['load_start']} at the start, {rep['load_end']} at the end. Model: `{Path(art['path']).name}` "
         f"({art['bytes'] / 1e6:.1f} MB, SmolLM2-135M-Instruct fixture" + (", verified export" if art.get("verified")
                                                                           else ", unverified export") + "). "
         f"Both servers: {o['threads']} thread(s), context {o['ctx']}, flash attention on, on loopback; load from "
         "the `openai` client (AsyncOpenAI) in one process. Versions: "
         + ", ".join(f"{k} {v}" for k, v in rep["versions"].items() if v) + ".", ""]
    if rep.get("non_default"):
        L += [f"**Not the default configuration** (`{' '.join(rep['argv'])}`): a smoke run; `make bench` runs the "
              "defaults.", ""]
    a = rep.get("part_a")
    if a:
        L += [f"{h}# Streaming chat: kiln serve vs llama-cpp-python's server (same GGUF)", "",
              f"C concurrent clients, each sending {o['requests']} streamed chat completions in turn (max_tokens "
              f"{o['max_tokens']}, temperature 0, a different question each), {o['rounds']} round(s) per "
              "configuration, the servers taking turns (ABBA). tok/s = completion tokens (text chunks) / wall time "
              "from the first request to the last answer; TTFT = request sent to first text chunk; ITL = gap "
              "between consecutive text chunks, pooled over requests. llama-cpp-python: `--interrupt_requests "
              "False`, requests with `repeat_penalty: 1.0` (greedy like kiln). "
              + (f"Anchor: {rep['anchor_error']}." if rep.get("anchor_error") else ""), "",
              "| server | clients C | requests | ok | failed | completion tokens | wall s | tok/s | TTFT p50 ms | "
              "TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(a["rows"], key=lambda r: (r["concurrency"], r["server"] != "kiln")):
            L.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {r['failed']} | "
                     f"{r['tokens']} | {f(r['wall_s'])} | {f(r['tok_s'])} | {f(r['ttft_p50_ms'], 0)} | "
                     f"{f(r['ttft_p99_ms'], 0)} | {f(r['itl_p50_ms'])} | {f(r['itl_p99_ms'])} |")
        if a["ratios"]:
            L += ["", "Ratios kiln / llama-cpp-python, same run (tok/s: above 1 is kiln faster; latencies: below 1 is "
                  "kiln faster; paired = median over rounds of the per-round tok/s ratio):", "",
                  "| clients C | tok/s ratio | tok/s paired | TTFT p50 ratio | TTFT p99 ratio | ITL p50 ratio | "
                  "ITL p99 ratio |", "|---|---|---|---|---|---|---|"]
            for r in a["ratios"]:
                L.append(f"| {r['concurrency']} | {f(r['tok_s'], 2)} | {f(r['tok_s_paired'], 2)} | "
                         f"{f(r['ttft_p50_ms'], 2)} | {f(r['ttft_p99_ms'], 2)} | {f(r['itl_p50_ms'], 2)} | "
                         f"{f(r['itl_p99_ms'], 2)} |")
            st = a["same_text"]
            L += ["", "Identical greedy answers from the two servers: " + ", ".join(
                f"C={c}: {x['identical']} of {x['compared']}" for c, x in st.items()) + " (llama.cpp's last bits "
                "depend on the batch a token or a cached prompt prefix was computed in, and a near-tie can then "
                "go the other way). Peak RSS during this part: "
                + ", ".join(f"{k} {mib(v)} MiB" for k, v in a["peak_rss"].items()) + "."]
        kr = [r for r in a["rows"] if r["server"] == "kiln" and r["usage_tokens"] is not None]
        if kr and any(r["usage_tokens"] != r["tokens"] for r in kr):
            L += ["", "kiln's usage counts differ from its text chunks: " + ", ".join(
                f"C={r['concurrency']}: {r['usage_tokens']} vs {r['tokens']}" for r in kr) + "."]
        L.append("")
    b = rep.get("part_b")
    if b:
        L += [f"{h}# Structured output: exact SMC vs mask-only (kiln serve)", "",
              f"`response_format` json_schema (an object with name, country, founded: integer, is_capital: boolean; "
              f"no extra keys), one request at a time, alternating, temperature 1, seeds {o['seed']}.., max_tokens "
              f"{b['max_tokens']}, non-streaming. SMC is kiln's default (`--particles {o['particles']}`); mask-only "
              "is `extra_body={\"kiln\": {\"sampler\": \"mask\"}}` (each token from the masked, renormalised "
              "distribution). Valid = the answer parses and validates with `jsonschema`.", "",
              "| sampler | particles | requests | valid | validity | time p50 s | time mean s | time max s | "
              "completion tokens (median) | ESS (median) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            L.append(f"| {r['sampler']} | {r['particles']} | {r['requests']} | {r['valid']} | "
                     f"{f(100 * r['validity'] if r['validity'] is not None else None, 0)}% | {f(r['wall_p50_s'], 2)} | "
                     f"{f(r['wall_mean_s'], 2)} | {f(r['wall_max_s'], 2)} | {f(r['tokens_median'], 0)} | "
                     f"{f(r['ess_median'], 2)} |")
        L += ["", f"Time per request, SMC / mask-only (p50): {f(b['time_ratio_smc_over_mask'], 2)}.", ""]
    c = rep.get("part_c")
    if c:
        v = c["verdict"]
        L += [f"{h}# Soak: kiln serve under {c['clients']} concurrent clients for {c['seconds']:.0f} s", "",
              f"A fresh `kiln serve` (queue limit {2 * c['clients']}); each client loops over a random mix "
              "(" + ", ".join(f"{k} {int(100 * w)}%" for k, w in c["mix"].items()) + "): streamed and plain greedy "
              f"chat completions (max_tokens 4-24), constrained ones (regex `{SOAK_REGEX}`, 4 SMC particles), "
              "streams closed after 1-4 chunks (disconnect), and malformed bodies as raw HTTP (broken JSON, "
              "negative max_tokens, unknown model, wrong types, invalid UTF-8, empty body). RSS: psutil, every "
              f"0.1 s; 'warm-up' is after every kind ran at full concurrency, 'after' is {c['settle_s']:.0f} s "
              f"after the load stopped; tolerance max({RSS_TOL_MIB} MiB, {int(100 * RSS_TOL_FRAC)}% of warm-up) "
              "(`rss_tolerance` in bench/serve.py: allocator slack that does not grow with requests; a leak does).",
              "", "| requests sent | well-formed ok / sent | disconnects | malformed → 400 | 5xx | other errors | "
              "wall s (drained) | RSS warm-up MiB | RSS peak MiB | RSS after MiB | after − warm-up MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|",
              f"| {sum(x['sent'] for x in c['counts'].values())} | {c['well_formed_ok']} / {c['well_formed_sent']} | "
              f"{c['disconnects_ok']} / {c['disconnects']} | {c['malformed_400']} / {c['malformed_sent']} | "
              f"{c['server_errors_5xx']} | {c['error_count']} | {f(c['wall_s'])} | {mib(c['rss_before'])} | "
              f"{mib(c['rss_peak'])} | {mib(c['rss_after'])} | {c['rss_delta'] / MIB:+.1f} (tolerance "
              f"{c['rss_tolerance'] / MIB:.0f}) |", "",
              "Statuses: " + ", ".join(f"{k}: {n}" for k, n in c["statuses"].items()) + ". Checks: "
              + "; ".join(f"{k}: {'yes' if ok else '**no**'}" for k, ok in v.items())
              + f". Same greedy completion before and after the soak (a prompt no soak request shares): "
              f"{'yes' if c['same_greedy_answer'] else '**no**'}; same greedy chat answer (its chat-template prefix "
              "is every soak request's, so the prompt cache may reuse K/V computed inside a batch, where llama.cpp's "
              f"last bits can differ): {'yes' if c['same_greedy_chat_answer'] else 'no'}. Server exit code "
              f"{c['exit_code']}, {c['tracebacks_in_log']} tracebacks in its log.", ""]
        if c["errors"] or c["malformed_not_400"]:
            L += ["First errors: " + "; ".join((c["errors"] + c["malformed_not_400"])[:5]), ""]
    return L


def render_md(rep: dict) -> str:
    lines = section(rep, level=1)
    lines += [f"Raw figures: `serve.json` beside this file. Total run time {rep['total_s']} s.", ""]
    return "\n".join(lines)


def write_docs(rep: dict, path: Path) -> None:
    """Replace (or append) the "## Serving" section of docs/benchmarks.md; every other line stays as it is."""
    from kiln.atomic import atomic_file

    new = section(rep) + ["![serve](benchmarks/serve.png)", "",
                          "Raw figures: [`benchmarks/serve.json`](benchmarks/serve.json).", ""]
    old = path.read_text().splitlines() if path.is_file() else []
    start = next((i for i, ln in enumerate(old) if ln.strip() == SECTION), None)
    if start is None:
        lines = old + ([""] if old and old[-1].strip() else []) + new
    else:
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        lines = old[:start] + new + old[end:]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines).rstrip("\n") + "\n")


def plot(rep: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no PNG"
    a, c = rep.get("part_a"), rep.get("part_c")
    panels = (3 if a else 0) + (1 if c else 0)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4))
    axes = list(axes) if panels > 1 else [axes]
    if a:
        for name, style in (("kiln", "o-"), ("llama-cpp-python", "s--")):
            rows = sorted((r for r in a["rows"] if r["server"] == name), key=lambda r: r["concurrency"])
            if not rows:
                continue
            cs = [r["concurrency"] for r in rows]
            axes[0].plot(cs, [r["tok_s"] for r in rows], style, label=name)
            for q, alpha in (("p50", 1.0), ("p99", 0.5)):
                axes[1].plot(cs, [r[f"ttft_{q}_ms"] for r in rows], style, alpha=alpha, label=f"{name} {q}")
                axes[2].plot(cs, [r[f"itl_{q}_ms"] for r in rows], style, alpha=alpha, label=f"{name} {q}")
        for ax, title, ylab in ((axes[0], "throughput", "completion tokens/s"), (axes[1], "time to first token", "ms"),
                                (axes[2], "inter-token latency", "ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylab)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
        axes[1].set_yscale("log")
    if c:
        ax = axes[-1]
        tl = [(t, v) for t, v in c["rss_timeline"] if v is not None]
        ax.plot([t for t, _ in tl], [v / MIB for _, v in tl], lw=1, label="RSS")
        ax.axhline(c["rss_before"] / MIB, color="grey", ls=":", label="after warm-up")
        ax.axhline((c["rss_before"] + c["rss_tolerance"]) / MIB, color="red", ls="--", lw=0.8, label="tolerance")
        ax.axvline(c["seconds"], color="black", lw=0.6, label="clients stop")
        ax.set_xlabel("s since the soak started")
        ax.set_ylabel("MiB")
        ax.set_title(f"soak: {c['clients']} clients, kiln serve RSS", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(rep['artifact']['path']).name}, {rep['options']['threads']} thread(s), "
                 f"{rep['machine']['cpu'][:40]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


DEFAULTS = {"concurrency": [1, 4, 16], "requests": 2, "max_tokens": 64, "rounds": 2, "json_requests": 8,
            "soak": 60.0, "soak_clients": 64}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="a GGUF to serve (default: the SmolLM2-135M fixture as q8_0)")
    ap.add_argument("--threads", type=int, default=1,
                    help="engine threads of both servers (default 1: on 2 cores the load generator and the servers' "
                         "event loops need the other one)")
    ap.add_argument("--ctx", type=int, default=2048, help="context of both servers (default 2048)")
    ap.add_argument("--concurrency", type=ints, default=DEFAULTS["concurrency"], metavar="C,C,...",
                    help="concurrent clients of part A (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=DEFAULTS["requests"],
                    help="requests per client per configuration and round (default 2)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"], help="part A max_tokens (default 64)")
    ap.add_argument("--rounds", type=int, default=DEFAULTS["rounds"],
                    help="rounds of part A, servers in ABBA order (default 2)")
    ap.add_argument("--json-requests", type=int, default=DEFAULTS["json_requests"],
                    help="part B requests per sampler (default 8; 0 skips part B)")
    ap.add_argument("--json-max-tokens", type=int, default=96, help="part B max_tokens (default 96)")
    ap.add_argument("--particles", type=int, default=8, help="kiln serve --particles: SMC's default (default 8)")
    ap.add_argument("--soak", type=float, default=DEFAULTS["soak"], metavar="SECONDS",
                    help="part C duration (default 60; 0 skips the soak)")
    ap.add_argument("--soak-clients", type=int, default=DEFAULTS["soak_clients"],
                    help="concurrent clients of the soak (default 64)")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds of quiet before each soak RSS reading (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-anchor", action="store_true", help="part A without llama-cpp-python's server")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md's Serving section")
    ap.add_argument("--docs-only", action="store_true",
                    help="measure nothing: re-insert docs/benchmarks.md's Serving section from <out>/serve.json")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                    help="output directory (default bench/results)")
    ap.add_argument("--json", action="store_true", help="print the JSON instead of the Markdown")
    args = ap.parse_args(argv)
    docs = REPO / "docs" / "benchmarks.md"
    if args.docs_only:
        rep = json.loads((args.out / "serve.json").read_text())
        write_docs(rep, docs)
        log(f"wrote the Serving section of {docs}")
        return 0
    from kiln.bench.machine import machine

    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    argv_list = sys.argv[1:] if argv is None else argv
    rep: dict[str, Any] = {
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "load_start": loadavg(),
        "argv": argv_list, "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "non_default": any(getattr(args, k) != v for k, v in DEFAULTS.items()) or args.no_anchor,
        "versions": {"python": platform.python_version(), "kiln": pkg_version("kiln-llm"),
                     "llama-cpp-python": pkg_version("llama_cpp_python"), "llguidance": pkg_version("llguidance"),
                     "starlette": pkg_version("starlette"), "uvicorn": pkg_version("uvicorn"),
                     "fastapi": pkg_version("fastapi"), "openai": pkg_version("openai")}}
    if args.artifact is not None:
        rep["artifact"] = {"path": str(args.artifact), "reused": True, "bytes": args.artifact.stat().st_size}
    else:
        rep["artifact"] = build_artifact(args.out)
    gguf = Path(rep["artifact"]["path"])
    logs = args.out / "logs"
    if args.concurrency or args.json_requests:
        queue = max(args.concurrency or [1]) * 2
        log(f"starting kiln serve and llama-cpp-python's server on {gguf.name} ({args.threads} thread(s), "
            f"context {args.ctx})")
        kiln = start_kiln(gguf, args.threads, args.ctx, args.particles, queue, logs / "kiln.log")
        anchor = None
        try:
            if not args.no_anchor and args.concurrency:
                try:
                    anchor = start_llama_cpp(gguf, args.threads, args.ctx, logs / "llama-cpp-python.log")
                except RuntimeError as exc:
                    rep["anchor_error"] = (f"llama-cpp-python's server did not start ({str(exc)[:300]}); its `server` "
                                           "extra's packages come with kiln's `bench` extra: pip install -e '.[bench]'")
                    log(rep["anchor_error"])
            if args.concurrency:
                rep["part_a"] = part_a(args, kiln, anchor)
            if args.json_requests:
                rep["part_b"] = part_b(args, kiln)
        finally:
            rep["exit_codes"] = {"kiln": kiln.stop(), "llama-cpp-python": anchor.stop() if anchor else None}
        rep["tracebacks_in_kiln_log"] = kiln.log_path.read_text(errors="replace").count("Traceback")
    if args.soak > 0:
        rep["part_c"] = part_c(args, gguf)
    rep["load_end"] = loadavg()
    rep["total_s"] = round(time.perf_counter() - t_start, 1)
    md = render_md(rep)
    (args.out / "serve.json").write_text(json.dumps(clean(rep), indent=1) + "\n")
    (args.out / "serve.md").write_text(md)
    note = plot(rep, args.out / "serve.png")
    if note:
        log(note)
    if not args.no_docs:
        import shutil

        figures = docs.parent / "benchmarks"  # committed beside the other benchmarks' raw figures
        figures.mkdir(parents=True, exist_ok=True)
        for name in ("serve.json", "serve.png"):
            if (args.out / name).is_file():
                shutil.copyfile(args.out / name, figures / name)
        write_docs(rep, docs)
        log(f"wrote the Serving section of {docs} and {figures}/serve.json, serve.png")
    log(f"wrote {args.out / 'serve.json'}, serve.md, serve.png in {rep['total_s']} s")
    print(json.dumps(clean(rep), indent=1) if args.json else md)
    verdict = rep.get("part_c", {}).get("verdict", {})
    if not all(verdict.values()):
        log("soak check failed: " + ", ".join(k for k, ok in verdict.items() if not ok))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
