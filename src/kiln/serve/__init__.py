"""`kiln serve`: an OpenAI-compatible HTTP server over kiln's engines (llama.cpp for GGUF, onnxruntime
for ONNX directories), with exact constrained sampling by SMC as its structured-output mode.

One module per job:

=============  =============================================================================
options.py     `ServeOptions`: what the server is started with (and the bind/API-key rule)
errors.py      `APIError`: OpenAI's error JSON with its HTTP status
parse.py       request bodies -> validated `GenRequest`s (400s with the offending `param`)
models.py      the served artifacts: engines opened once, model ids, context budgets
decode.py      a request's task: plain sampling (kiln.runtime.sampling: n rows, top_p, stop, logprobs)
               or constrained sampling (SMC or mask-only: kiln.runtime.smc.SMCTask)
worker.py      one worker thread per engine: every running request in one continuous batch
               (kiln.runtime.batching), arrival-order admission, 429 beyond --queue-limit
responses.py   OpenAI response objects and streaming chunks
app.py         the Starlette application: routes, API-key check, server-sent events
=============  =============================================================================

Why Starlette + uvicorn: Starlette is the ASGI toolkit FastAPI itself is built on (actively maintained,
small, no code generation), and gives streaming responses and disconnect detection without
FastAPI's request validation layer, whose 422 errors are not OpenAI's error format anyway; uvicorn
is its reference server (pure-Python h11 install, graceful shutdown on SIGTERM). Both come with the
optional `serve` extra; nothing else in kiln imports this package, so `kiln.runtime` embeds
without them.
"""

from __future__ import annotations

from kiln.serve.options import ServeOptions


def serve(options: ServeOptions) -> None:
    """Open every artifact in `options.artifacts` and serve them until interrupted (SIGINT/SIGTERM drain
    in-flight requests first). Options are validated, and the artifacts opened, before the port is bound:
    problems are one-line KilnErrors."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        from kiln.errors import KilnError

        raise KilnError("kiln serve needs its extra: pip install 'kiln-llm[serve]'") from None
    from kiln.serve.app import run

    run(options)


__all__ = ["ServeOptions", "serve"]
