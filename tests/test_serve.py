"""`kiln serve`: the real server (a `kiln serve` subprocess on a free loopback port) driven by the real
`openai` client, over the tiny Qwen2 as an f32 GGUF (llama.cpp) and as an fp32 ONNX export (onnxruntime).

Checked against kiln's own runtime in this process: greedy answers equal `kiln.runtime.generate.generate`
on the same tokens, and usage counts equal the engine tokenizer's. Engines run with one thread: on a
busy 2-core machine llama.cpp's spinning thread pool is slower with two.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
jsonschema = pytest.importorskip("jsonschema")

from kiln.runtime import load  # noqa: E402
from kiln.runtime.generate import chat_prompt, generate  # noqa: E402
from kiln.serve.decode import TextStream  # noqa: E402
from kiln_cli import kiln, one_line_error  # noqa: E402
from serve_process import http, start  # noqa: E402

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Tell me about the river."}]
SCHEMA = {"type": "object",
          "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "score"], "additionalProperties": False}


class Server:
    def __init__(self, base: str, proc: subprocess.Popen, log: Path, gguf: Path):
        self.base, self.proc, self.log, self.gguf = base, proc, log, gguf

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def raw(self, path: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict, bytes]:
        """(status, headers, body) of a plain HTTP request (POST when `body` is given)."""
        return http(self.base, path, body, key)

    def health(self) -> dict:
        return json.loads(self.raw("/health", key=None)[2])


@pytest.fixture(scope="module")
def tiny_qwen2_onnx(tiny_qwen2_dir: Path, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from kiln.pipeline import export_onnx_artifact

    out = tmp_path_factory.mktemp("serve-onnx") / "tq2-onnx"
    export_onnx_artifact(tiny_qwen2_dir, out, "fp32", verify=False)
    return out


@pytest.fixture(scope="module")
def server(tiny_qwen2_f32_gguf: Path, tiny_qwen2_onnx: Path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, base = start([f"tq2={tiny_qwen2_f32_gguf}", f"tq2-onnx={tiny_qwen2_onnx}", "--api-key", KEY,
                        "--threads", "1", "--queue-limit", "1", "--log-level", "warning"], log)
    srv = Server(base, proc, log, tiny_qwen2_f32_gguf)
    yield srv
    # SIGTERM drains: a request in flight is still answered, then the server exits (uvicorn re-raises the signal)
    answered: dict[str, int] = {}
    inflight = threading.Thread(target=lambda: answered.update(
        status=srv.raw("/v1/chat/completions", json.dumps(LONG_JOB).encode())[0]))
    inflight.start()
    assert _wait_for(srv, lambda m: m["busy"])
    proc.send_signal(signal.SIGTERM)
    inflight.join()
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()
    assert answered == {"status": 200}
    text = log.read_text()
    assert "Traceback" not in text, text


@pytest.fixture(scope="module")
def engine(tiny_qwen2_f32_gguf: Path):
    with load(tiny_qwen2_f32_gguf, n_ctx=512, threads=1) as e:
        yield e


# --- endpoints ---------------------------------------------------------------------------------
def test_health_needs_no_key_and_models_are_listed(server: Server) -> None:
    idle = {"queued": 0, "running": 0, "busy": False, "admitted": 0}
    assert server.health()["models"] == {"tq2": idle, "tq2-onnx": idle}
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tq2", "tq2-onnx"]
    assert server.client().models.retrieve("tq2-onnx").kiln["format"] == "onnx"


def test_api_key_is_checked_on_every_route_but_health(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as exc:
        server.client(key="wrong").chat.completions.create(model="tq2", messages=MESSAGES, max_tokens=2)
    assert exc.value.status_code == 401
    for path, body in (("/v1/models", None), ("/v1/completions", b"{}")):
        status, _, raw = server.raw(path, body, key=None)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("model", ["tq2", "tq2-onnx"])
def test_greedy_chat_equals_the_runtime_and_usage_counts_the_tokenizers_tokens(server: Server, engine,
                                                                                model: str) -> None:
    ids = chat_prompt(engine, MESSAGES)
    want = generate(engine, ids, max_tokens=12, temperature=0.0)
    out = server.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == ("stop" if want.stopped == "eog" else "length")
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(want.tokens)
    assert out.usage.total_tokens == len(ids) + len(want.tokens)


def test_completions_with_logprobs(server: Server, engine) -> None:
    prompt = "Once upon a time"
    ids = engine.tokenize(prompt)
    want = generate(engine, ids, max_tokens=8, temperature=0.0)
    out = server.client().completions.create(model="tq2", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.text == want.text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want.tokens)
    lp = choice.logprobs
    assert len(lp.tokens) == len(want.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values()))  # greedy picks the top token
    assert lp.text_offset[0] == 0


def test_streaming_chat_matches_the_whole_answer_and_ends_with_done(server: Server) -> None:
    client = server.client()
    args = dict(model="tq2", messages=MESSAGES, max_tokens=16, seed=3, temperature=1.0)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    body = json.dumps({**args, "stream": True}).encode()
    status, headers, raw = server.raw("/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


@pytest.mark.parametrize("model", ["tq2", "tq2-onnx"])
def test_n_choices_are_seeded_and_repeatable(server: Server, model: str) -> None:
    client = server.client()
    args = dict(model=model, messages=MESSAGES, max_tokens=10, n=3, temperature=1.0, logprobs=True)
    a = client.chat.completions.create(**args, seed=11)
    b = client.chat.completions.create(**args, seed=11)
    c = client.chat.completions.create(**args, seed=12)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.message.content for ch in b.choices]
    assert texts != [ch.message.content for ch in c.choices]
    assert len(set(texts)) > 1  # each choice draws from its own stream
    assert a.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in a.choices)


def test_stop_strings_cut_the_answer_streamed_or_not(server: Server, engine) -> None:
    want = generate(engine, chat_prompt(engine, MESSAGES), max_tokens=16, temperature=0.0).text
    stop = want[len(want) // 2:len(want) // 2 + 3]
    assert stop.strip(), want
    client = server.client()
    args = dict(model="tq2", messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop])
    out = client.chat.completions.create(**args)
    assert out.choices[0].message.content == want[:want.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True))
    assert streamed == want[:want.index(stop)]


# --- structured output -------------------------------------------------------------------------
# The tiny Qwen2 has no BOS token, yet its ONNX export reports bos_token_id 1 (the `"` token) and its GGUF 11
# (`,`): grammars must still write those characters (potentials.grammar.special_ids keeps a BOS that is ordinary
# text out of the control tokens), or no JSON string could be written on ONNX.


@pytest.mark.parametrize("model", ["tq2", "tq2-onnx"])
def test_json_schema_is_sampled_by_smc_and_every_choice_validates(server: Server, model: str) -> None:
    out = server.client().chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=40, n=3, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}})
    assert len(out.choices) == 3
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    report = out.kiln
    assert report["sampler"] == "smc" and report["particles"] == 8
    assert 1.0 <= report["ess"] <= 8.0 and report["log_z"] < 0
    assert abs(sum(p["probability"] for p in report["posterior"]) - 1.0) < 1e-6 or len(report["posterior"]) == 5


def test_constrained_streaming_and_the_smc_report(server: Server) -> None:
    chunks = list(server.client().chat.completions.create(
        model="tq2", messages=MESSAGES, max_tokens=40, seed=1, stream=True, extra_body={"kiln": {"particles": 4}},
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1].kiln["particles"] == 4 and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", ["tq2", "tq2-onnx"])
@pytest.mark.parametrize("sampler", ["smc", "mask"])
def test_regex_on_both_engines(server: Server, model: str, sampler: str) -> None:
    out = server.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, n=2, seed=4,
                                                  extra_body={"kiln": {"regex": "(yes|no)!", "sampler": sampler}})
    assert out.kiln["sampler"] == sampler
    assert all(re.fullmatch("(yes|no)!", c.message.content) and c.finish_reason == "stop" for c in out.choices)


def test_mask_sampler_regex_grammar_and_json_object(server: Server) -> None:
    client = server.client()
    out = client.chat.completions.create(model="tq2", messages=MESSAGES, max_tokens=8, n=4, seed=2,
                                         extra_body={"kiln": {"regex": "(yes|no)!", "sampler": "mask"}})
    assert out.kiln["sampler"] == "mask" and out.kiln["failed"] == 0
    assert all(re.fullmatch("(yes|no)!", c.message.content) for c in out.choices)
    out = client.completions.create(model="tq2", prompt="Answer:", max_tokens=8, n=2, seed=2,
                                    extra_body={"kiln": {"grammar": 'start: ("red" | "blue") " " NUM\nNUM: /[0-9]/'}})
    assert all(re.fullmatch("(red|blue) [0-9]", c.text) for c in out.choices) and out.kiln["sampler"] == "smc"
    # any JSON object: a random model rarely closes one within max_tokens, so mask-only samples may fail
    out = client.chat.completions.create(model="tq2", messages=MESSAGES, max_tokens=24, n=4, seed=5,
                                         response_format={"type": "json_object"},
                                         extra_body={"kiln": {"sampler": "mask", "whitespace": "compact"}})
    done = [c for c in out.choices if c.finish_reason == "stop"]
    assert done and out.kiln["failed"] == 4 - len(done)
    assert all(isinstance(json.loads(c.message.content), dict) for c in done)


# --- bad requests ------------------------------------------------------------------------------
LONG = [{"role": "user", "content": "river stone " * 400}]
BAD = {
    "unknown model": ({"model": "nope", "messages": MESSAGES}, "model", "model_not_found"),
    "negative max_tokens": ({"model": "tq2", "messages": MESSAGES, "max_tokens": -1}, "max_tokens", None),
    "schema llguidance rejects": ({"model": "tq2", "messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(["}}}}}}, "response_format", None),
    "bad regex": ({"model": "tq2", "messages": MESSAGES, "kiln": {"regex": "(a"}}, "kiln.regex", None),
    "prompt longer than the context": ({"model": "tq2", "messages": LONG}, "messages", "context_length_exceeded"),
    "max_tokens beyond the context": ({"model": "tq2-onnx", "messages": MESSAGES, "max_tokens": 600}, "max_tokens",
                                      "context_length_exceeded"),
    "too many choices": ({"model": "tq2", "messages": MESSAGES, "n": 17}, "n", None),
    "greedy constrained": ({"model": "tq2", "messages": MESSAGES, "temperature": 0, "kiln": {"regex": "a"}},
                           "temperature", None),
    "unknown kiln key": ({"model": "tq2", "messages": MESSAGES, "kiln": {"particle": 3}}, "kiln.particle", None),
    "no messages": ({"model": "tq2", "messages": []}, "messages", None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_error_json_400(server: Server, case: str) -> None:
    body, param, code = BAD[case]
    for stream in (False, True):
        status, headers, raw = server.raw("/v1/chat/completions", json.dumps({**body, "stream": stream}).encode())
        assert status == 400, raw
        assert headers["content-type"] == "application/json"
        err = json.loads(raw)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["code"] == code and "\n" not in err["message"]


def test_malformed_bodies_and_routes_never_take_the_server_down(server: Server) -> None:
    for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"'):
        status, _, raw = server.raw("/v1/chat/completions", body)
        assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, _, raw = server.raw("/v1/nothing-here")
    assert status == 404 and "error" in json.loads(raw)
    with pytest.raises(openai.BadRequestError) as exc:
        server.client().chat.completions.create(model="tq2", messages=MESSAGES, max_tokens=-5)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "max_tokens"
    assert server.health()["status"] == "ok" and server.proc.poll() is None


# --- concurrency -------------------------------------------------------------------------------
# n = --rows (16): it holds every engine row, so the requests after it wait (continuous batching would
# otherwise run them beside it)
LONG_JOB = {"model": "tq2", "messages": MESSAGES, "max_tokens": 240, "n": 16, "temperature": 1.5, "seed": 0}


def _wait_for(server: Server, check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(server.health()["models"]["tq2"]):
            return True
        time.sleep(0.005)
    return False


def test_concurrent_requests_share_the_engine_steps(server: Server) -> None:
    """Continuous batching: a request that arrives while another runs joins the batch at a step
    boundary (health shows both running) instead of waiting for the engine, and each is answered as it
    would be alone (greedy: the same text). The server's --queue-limit is 1, so each request is sent
    once the previous one is running (health's admitted counter: "running >= 2" alone can hold before
    the request just sent has even arrived)."""
    job = {"model": "tq2", "messages": MESSAGES, "max_tokens": 400, "temperature": 0}
    alone = json.loads(server.raw("/v1/chat/completions", json.dumps(job).encode())[2])
    bodies = [job, job, {**job, "n": 2, "temperature": 1.0, "seed": 3},
              {**job, "max_tokens": 60, "temperature": 1.0, "response_format": {"type": "json_schema",
                                                            "json_schema": {"name": "s", "schema": SCHEMA}}}]
    results: dict[int, tuple[int, bytes]] = {}
    threads = [threading.Thread(target=lambda k=k, b=b: results.__setitem__(
        k, server.raw("/v1/chat/completions", json.dumps(b).encode())[::2])) for k, b in enumerate(bodies)]
    together = []
    base = server.health()["models"]["tq2"]["admitted"]
    for k, t in enumerate(threads):
        t.start()
        together.append(_wait_for(server, lambda m, k=k: m["admitted"] == base + k + 1 and m["queued"] == 0
                                  and m["running"] >= min(k + 1, 2)))
    for t in threads:
        t.join()
    assert all(together), together
    assert [results[k][0] for k in range(4)] == [200] * 4, results
    out = [json.loads(results[k][1]) for k in range(4)]
    assert [o["choices"][0]["message"]["content"] for o in out[:2]] == [alone["choices"][0]["message"]["content"]] * 2
    assert len(out[2]["choices"]) == 2 and out[3]["kiln"]["sampler"] == "smc"


def test_a_full_queue_answers_429_with_retry_after(server: Server) -> None:
    results: dict[str, int] = {}

    def post(name: str, body: dict) -> None:
        results[name] = server.raw("/v1/chat/completions", json.dumps(body).encode())[0]

    running = threading.Thread(target=post, args=("running", LONG_JOB))
    running.start()
    assert _wait_for(server, lambda m: m["busy"])
    waiting = threading.Thread(target=post, args=("waiting", {**LONG_JOB, "max_tokens": 2, "n": 1}))
    waiting.start()
    assert _wait_for(server, lambda m: m["queued"] == 1)  # --queue-limit 1: the next one is refused
    status, headers, raw = server.raw("/v1/chat/completions", json.dumps({**LONG_JOB, "max_tokens": 2}).encode())
    running.join()
    waiting.join()
    assert status == 429 and int(headers["retry-after"]) >= 1, raw
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"
    assert results == {"running": 200, "waiting": 200}


def test_a_client_that_disconnects_mid_stream_frees_the_engine(server: Server) -> None:
    body = json.dumps({**LONG_JOB, "stream": True}).encode()
    t0 = time.monotonic()
    full = server.raw("/v1/chat/completions", json.dumps(LONG_JOB).encode())
    whole = time.monotonic() - t0
    assert full[0] == 200
    req = urllib.request.Request(server.base + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=60)
    assert resp.readline().startswith(b"data: ")
    t0 = time.monotonic()
    resp.close()
    assert _wait_for(server, lambda m: not m["busy"], timeout=whole)
    assert time.monotonic() - t0 < whole / 2  # stopped at a step boundary, not run to the end
    out = server.client().chat.completions.create(model="tq2", messages=MESSAGES, max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_readme_serving_example_runs(server: Server, capsys) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Serving", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = (code.replace('"http://127.0.0.1:8000/v1"', repr(server.base + "/v1")).replace('"unused"', repr(KEY))
            .replace('"smol.q4_k_m"', '"tq2"'))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["reply"].kiln["sampler"] == "smc" and len(scope["reply"].choices) == 2


# --- CLI and packaging -------------------------------------------------------------------------
def test_cli_refuses_a_public_bind_without_api_key(tiny_qwen2_f32_gguf: Path, monkeypatch) -> None:
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    one_line_error(kiln("serve", tiny_qwen2_f32_gguf, "--host", "0.0.0.0"), "--host 0.0.0.0", "--api-key")
    one_line_error(kiln("serve", "a=" + str(tiny_qwen2_f32_gguf), "a=" + str(tiny_qwen2_f32_gguf)), "'a'")
    one_line_error(kiln("serve", tiny_qwen2_f32_gguf, "--particles", "32", "--rows", "16"), "--particles 32")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        one_line_error(kiln("serve", tiny_qwen2_f32_gguf, "--port", port), f"127.0.0.1:{port}")


def test_the_runtime_imports_without_the_serve_extra() -> None:
    code = ("import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
            "import kiln.runtime, kiln.cli, kiln.serve\n"
            "from kiln.errors import KilnError\n"
            "try:\n    kiln.serve.serve(kiln.serve.ServeOptions(artifacts=['x.gguf']))\n"
            "except KilnError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'kiln-llm[serve]'" in out.stdout


# --- streaming text (no server) ----------------------------------------------------------------
def test_text_stream_holds_back_a_possible_stop_and_joins_split_characters() -> None:
    s = TextStream(["END"])
    assert s.push(b"ab") == "ab"
    assert s.push(b"cE") == "c"  # "E" may begin "END"
    assert s.push(b"x") == "Ex"
    assert s.push(b"\xc3") == ""  # half of "é"
    assert s.push(b"\xa9E") == "é"
    assert s.push(b"ND tail") == "" and s.stopped and s.text == "abcExé"
    t = TextStream([])
    assert t.push(b"\xe2\x82") == "" and t.finish() == "\ufffd"
