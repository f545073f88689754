"""Request bodies of /v1/chat/completions and /v1/completions -> a validated `GenRequest`.

Everything that can be checked without the engine is checked here, so a bad field is a 400 naming
its `param` before the request queues. Fields kiln cannot honour (tools, logit_bias, penalties, ...)
are refused when set to anything but their neutral value rather than silently ignored.

The kiln extension is a top-level object `"kiln"` (the openai client sends it with
`extra_body={"kiln": {...}}`):

    regex       the output matches this regular expression (whole string)
    grammar     the output derives from this Lark grammar (llguidance's dialect, rule `start`)
    sampler     "smc" (default: exact sampling of the model restricted to the constraint) or "mask"
                (mask-only decoding: each token from the masked, renormalised distribution)
    particles   SMC particles (default: the server's --particles, at least n)
    whitespace  JSON output: "compact" (default) or "flexible" (llguidance's free whitespace)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from kiln.serve.errors import bad_request

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
_KILN_KEYS = ("regex", "grammar", "sampler", "particles", "whitespace")


@dataclass
class Sampling:
    max_tokens: int | None  # None: the server default, or what still fits
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Constraint:
    kind: str  # "json", "regex" or "grammar"
    value: Any  # schema dict, pattern or grammar text
    param: str  # the request field it came from (for errors)
    sampler: str = "smc"  # "smc" or "mask"
    particles: int | None = None
    compact: bool = True  # JSON without free whitespace


@dataclass
class GenRequest:
    kind: str  # "chat" or "completion"
    model: str
    sampling: Sampling
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    stream: bool = False
    include_usage: bool = False
    constraint: Constraint | None = None


def _int(body: dict, key: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{key}' must be an integer, got {json.dumps(value)[:40]}", key)
    if low is not None and value < low:
        raise bad_request(f"'{key}' is {value}: must be at least {low}", key)
    if high is not None and value > high:
        raise bad_request(f"'{key}' is {value}: must be at most {high}", key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"'{key}' must be a number, got {json.dumps(value)[:40]}", key)
    if not low <= value <= high:
        raise bad_request(f"'{key}' is {value}: must be between {low} and {high}", key)
    return float(value)


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{key}' must be true or false", key)
    return value


def _refuse_unsupported(body: dict) -> None:
    for key in ("tools", "functions", "logit_bias"):
        if body.get(key):
            raise bad_request(f"'{key}' is not supported by kiln serve", key)
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none", "auto"):
            raise bad_request(f"'{key}' is not supported by kiln serve", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise bad_request(f"'{key}' is not supported by kiln serve (only 0)", key)
    if body.get("echo"):
        raise bad_request("'echo' is not supported by kiln serve", "echo")
    if body.get("suffix"):
        raise bad_request("'suffix' is not supported by kiln serve", "suffix")
    if body.get("best_of") not in (None, 1):
        raise bad_request("'best_of' is not supported by kiln serve (only 1)", "best_of")


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' has {len(stops)} strings: at most {MAX_STOP}", "stop")
    return list(stops)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts can be rendered
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> list[dict[str, str]]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def _prompt(body: dict) -> str | list[int]:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # one prompt given as a batch of one
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise bad_request("one prompt per request: kiln serve does not take a batch of prompts", "prompt")
    raise bad_request("'prompt' must be a string or a list of token ids", "prompt")


def _constraint(body: dict) -> Constraint | None:
    ext = body.get("kiln")
    if ext is None:
        ext = {}
    if not isinstance(ext, dict):
        raise bad_request("'kiln' must be an object", "kiln")
    unknown = sorted(set(ext) - set(_KILN_KEYS))
    if unknown:
        raise bad_request(f"unknown key kiln.{unknown[0]} (known: {', '.join(_KILN_KEYS)})", f"kiln.{unknown[0]}")
    found: list[Constraint] = []
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise bad_request("'response_format.type' must be text, json_object or json_schema", "response_format")
        if rf["type"] == "json_object":
            found.append(Constraint("json", {"type": "object"}, "response_format"))
        elif rf["type"] == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict):
                raise bad_request("'response_format.json_schema' must be an object with a 'schema'",
                                  "response_format.json_schema")
            schema = spec.get("schema", {})
            if not isinstance(schema, dict):
                raise bad_request("'response_format.json_schema.schema' must be a JSON schema object",
                                  "response_format.json_schema.schema")
            found.append(Constraint("json", schema, "response_format"))
    for key in ("regex", "grammar"):
        if ext.get(key) is not None:
            if not isinstance(ext[key], str) or not ext[key]:
                raise bad_request(f"'kiln.{key}' must be a non-empty string", f"kiln.{key}")
            found.append(Constraint(key, ext[key], f"kiln.{key}"))
    if len(found) > 1:
        raise bad_request(f"one constraint per request: got {' and '.join(c.param for c in found)}", found[1].param)
    sampler = ext.get("sampler", "smc")
    if sampler not in ("smc", "mask"):
        raise bad_request("'kiln.sampler' must be \"smc\" or \"mask\"", "kiln.sampler")
    particles = _int(ext, "particles", None, 1)
    whitespace = ext.get("whitespace", "compact")
    if whitespace not in ("compact", "flexible"):
        raise bad_request("'kiln.whitespace' must be \"compact\" or \"flexible\"", "kiln.whitespace")
    if not found:
        if "sampler" in ext or "particles" in ext:
            raise bad_request("'kiln.sampler' and 'kiln.particles' need a constraint (response_format json_schema "
                              "or json_object, kiln.regex, kiln.grammar)", "kiln")
        return None
    c = found[0]
    c.sampler, c.particles, c.compact = sampler, particles, whitespace == "compact"
    return c


def parse_request(body: Any, kind: str) -> GenRequest:
    """A chat ("chat") or text ("completion") request body -> GenRequest, or a 400 APIError."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required (GET /v1/models lists them)", "model")
    _refuse_unsupported(body)
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, max_key, None, 1)
    if kind == "chat":
        logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:  # completions: logprobs is the number of top alternatives (0: only the chosen token's)
        top = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        logprobs = top is not None
        top = top or 0
    sampling = Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                        top_p=_number(body, "top_p", 1.0, 0.0, 1.0), n=_int(body, "n", 1, 1),
                        seed=_int(body, "seed", None), stop=_stop(body), logprobs=logprobs, top_logprobs=top)
    if sampling.top_p <= 0.0:
        raise bad_request("'top_p' must be greater than 0", "top_p")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    constraint = _constraint(body)
    if constraint is not None:
        if sampling.temperature <= 0:
            raise bad_request("constrained sampling needs 'temperature' > 0 (the target is the model at that "
                              "temperature restricted to the constraint; 0 has no distribution to sample)",
                              "temperature")
        for key, off in (("top_p", sampling.top_p != 1.0), ("stop", bool(sampling.stop)),
                         ("logprobs", sampling.logprobs)):
            if off:
                raise bad_request(f"'{key}' applies to plain decoding only, not to constrained output", key)
    req = GenRequest(kind, model, sampling, stream=stream, include_usage=include_usage, constraint=constraint)
    if kind == "chat":
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)  # response_format works here too (a kiln extension of this endpoint)
    return req
