"""A real `kiln serve` process on a free loopback port, shared by the server's tests (test_serve, test_serve_page)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kiln_cli import KILN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(base: str, path: str, body: bytes | dict[str, Any] | None = None, key: str | None = None,
         timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a plain HTTP request: POST when `body` is given (a dict is sent as JSON)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`kiln serve ARGS --port P` with its output in `log`; returns (process, base URL) once /health says ok."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KILN_API_KEY"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([KILN, "serve", *args, "--port", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if json.loads(http(base, "/health")[2])["status"] == "ok":
                return proc, base
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "kiln serve did not come up: " + log.read_text()
        time.sleep(0.2)


def stop(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM (the server drains and exits; uvicorn re-raises the signal), then no traceback in its log."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
