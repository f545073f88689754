"""The Starlette application of `kiln serve`, and `run` (uvicorn).

Routes: GET /health (never behind the API key), GET /v1/models, GET /v1/models/{id},
POST /v1/chat/completions, POST /v1/completions, and the chat page: GET / and /static/{name}
(static/: HTML, JS, CSS; static like /health, so it loads without the key, and every API call it
makes sends the key it asks for). Every error is OpenAI's error JSON: 400 for a bad
request (malformed JSON, unknown model, a field out of range, a schema llguidance rejects, a prompt
longer than the context), 401 for a missing or wrong API key, 429 (Retry-After) when the model's
queue is full, 404/405 for other routes, 500 for a bug (logged, and the server keeps serving).

A request is parsed and checked here, then runs as one `Job` on its model's worker (worker.py): on
the worker thread the job tokenizes the prompt, sizes the run (models.py), builds the constraint and
its task (decode.py), and reports "ready" (or the error, still answered as a plain 400 before any
stream starts); the task then runs in the model's continuous batch beside the other requests,
emitting text deltas for a stream and the finished choices at the end.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kiln.errors import KilnError
from kiln.runtime.generate import chat_prompt
from kiln.serve.decode import build_potential, check_prompt_ids, constrained_choices, constrained_task, plain_task
from kiln.serve.errors import APIError, bad_request
from kiln.serve.models import ServedModel, close_models, open_models
from kiln.serve.options import ServeOptions
from kiln.serve.parse import GenRequest, parse_request
from kiln.serve.responses import Reply, sse
from kiln.serve.worker import EngineWorker, Job, Prepared

log = logging.getLogger("kiln.serve")

MAX_BODY = 8 << 20  # bytes of one request body


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# --- the work of one request, prepared on the model's worker thread ------------------------------
def _job(model: ServedModel, req: GenRequest, options: ServeOptions):
    def prepare(job: Job) -> Prepared | None:
        param: str | None = "messages" if req.kind == "chat" else "prompt"  # what a 400 blames
        try:
            engine = model.engine
            if req.kind == "chat":
                ids = chat_prompt(engine, req.messages or [])
            elif isinstance(req.prompt, str):
                ids = engine.tokenize(req.prompt)
            else:
                ids = check_prompt_ids(engine, req.prompt or [])
            if not ids:
                raise bad_request("the prompt is empty (no tokens)", param)
            s, c = req.sampling, req.constraint
            if c is None:
                max_tokens = model.budget(len(ids), s.n, s.max_tokens, options.max_tokens, prompt_param=param,
                                          rows_param="n")
                emit = (lambda i, text, lps: job.emit("delta", i, text, lps)) if req.stream else None
                task = plain_task(engine, ids, s, max_tokens, emit)
                prep = Prepared(task, lambda: job.emit("done", task.choices, None))
            else:
                particles = (c.particles or max(s.n, options.particles)) if c.sampler == "smc" else s.n
                max_tokens = model.budget(len(ids), particles, s.max_tokens, options.max_tokens, prompt_param=param,
                                          rows_param="kiln.particles" if c.particles else "n")
                param = c.param
                ctask = constrained_task(engine, ids, build_potential(model.vocab(), c), c, s, max_tokens,
                                         particles)
                prep = Prepared(ctask, lambda: job.emit("done", *constrained_choices(ctask, c, s)))
            job.emit("ready", len(ids))
            return prep
        except APIError as err:
            job.emit("error", err)
        except KilnError as err:
            job.emit("error", bad_request(str(err), param))
        return None

    return prepare


# --- handlers ----------------------------------------------------------------------------------
async def _body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"request body of {len(raw)} bytes: at most {MAX_BODY}")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"malformed JSON in the request body: {exc}") from None


async def _generate(request: Request, kind: str) -> Response:
    state = request.app.state
    try:
        req = parse_request(await _body(request), kind)
        model = state.models.get(req.model)
        if model is None:
            raise bad_request(f"unknown model {req.model!r} (served: {', '.join(state.models)})", "model",
                              "model_not_found")
        job = Job(_job(model, req, state.options))
        state.workers[req.model].submit(job)
    except APIError as err:
        return error_response(err)
    try:
        event = await job.next()
        if event[0] == "error":
            return error_response(event[1])
        prompt_tokens = event[1]
        reply = Reply(kind, req.model)
        if req.stream:
            return StreamingResponse(_stream(job, req, reply, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            event = await job.next()
            if event[0] == "done":
                return JSONResponse(reply.completion(event[1], prompt_tokens, event[2]))
            if event[0] == "error":
                return error_response(event[1])
    except asyncio.CancelledError:
        job.cancel()
        raise


async def _stream(job: Job, req: GenRequest, reply: Reply, prompt_tokens: int) -> AsyncIterator[bytes]:
    n = req.sampling.n
    offsets = [0] * n
    try:
        if req.kind == "chat":
            for i in range(n):
                yield sse(reply.chunk(i, "", role=True))
        while True:
            event = await job.next()
            if event[0] == "delta":
                _, i, text, lps = event
                if text or lps:
                    yield sse(reply.chunk(i, text, lps, offset=offsets[i]))
                    offsets[i] += len(text)
            elif event[0] == "done":
                choices, report = event[1], event[2]
                for k, c in enumerate(choices):
                    if req.constraint is not None and c.text:  # a constrained answer is decided at the end
                        yield sse(reply.chunk(c.index, c.text))
                    last = reply.chunk(c.index, None, finish_reason=c.finish_reason)
                    if report is not None and k == len(choices) - 1:
                        last["kiln"] = report
                    yield sse(last)
                if req.include_usage:
                    yield sse(reply.usage_chunk(prompt_tokens, choices))
                yield sse("[DONE]")
                return
            elif event[0] == "error":
                yield sse(event[1].body())
                return
            else:  # cancelled
                return
    finally:
        job.cancel()  # a client that went away frees the engine at the next step


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [m.describe() for m in request.app.state.models.values()]})


async def get_model(request: Request) -> Response:
    model = request.app.state.models.get(request.path_params["model"])
    if model is None:
        return error_response(APIError(404, f"unknown model {request.path_params['model']!r}", param="model",
                                       code="model_not_found"))
    return JSONResponse(model.describe())


# The chat page: fixed files of the package (src/kiln/serve/static), nothing from elsewhere (the CSP says so).
PAGE_FILES = {"index.html": "text/html", "chat.js": "text/javascript", "chat.css": "text/css"}
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'"}


def _public(path: str) -> bool:
    """Routes the API key does not guard: the health check and the static chat page."""
    return path in ("/health", "/") or path.startswith("/static/")


async def page(request: Request) -> Response:
    name = request.path_params.get("name", "index.html")
    if name not in PAGE_FILES:
        return error_response(APIError(404, f"GET {request.url.path}: Not Found"))
    data = resources.files("kiln.serve").joinpath("static", name).read_bytes()
    return Response(data, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "models": {k: w.status() for k, w in request.app.state.workers.items()}})


# --- the application ---------------------------------------------------------------------------
class APIKeyCheck:
    """ASGI middleware: every route but /health and the static chat page needs `Authorization: Bearer KEY`
    (compared in constant time)."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.key is not None and scope["type"] == "http" and not _public(scope["path"]):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                err = APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                               code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or "error"
    message = f"{request.method} {request.url.path}: {detail}" if status in (404, 405) else str(detail)
    return error_response(APIError(status, message))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}"))


def build_app(models: dict[str, ServedModel], options: ServeOptions) -> Any:
    """The ASGI application serving `models` (already open); workers start with the application."""

    @asynccontextmanager
    async def lifespan(app: Starlette):
        app.state.workers = {mid: EngineWorker(mid, m.engine, options.queue_limit) for mid, m in models.items()}
        for w in app.state.workers.values():
            w.start()
        yield
        for w in app.state.workers.values():
            await w.stop()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", page, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.models = models
    app.state.options = options
    return APIKeyCheck(app, options.resolved_api_key())


def _check_port(host: str, port: int) -> None:
    """A one-line KilnError when the address cannot be bound, before any model is opened (uvicorn would
    report it only after loading, over several log lines)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise KilnError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            raise KilnError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run(options: ServeOptions) -> None:
    """Validate, open the artifacts, serve until SIGINT/SIGTERM (uvicorn drains in-flight requests)."""
    import uvicorn

    options.validate()
    _check_port(options.host, options.port)
    models = open_models(options)
    try:
        app = build_app(models, options)
        host = f"[{options.host}]" if ":" in options.host else options.host
        print(f"kiln serve: http://{host}:{options.port}/v1 serving {', '.join(models)}"
              + (" (API key required)" if options.resolved_api_key() else ""), file=sys.stderr, flush=True)
        uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level,
                    timeout_graceful_shutdown=30)
    finally:
        close_models(models)
