"""What `kiln serve` is started with, validated before anything is opened or bound."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from kiln.errors import KilnError

API_KEY_ENV = "KILN_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether binding `host` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


@dataclass
class ServeOptions:
    artifacts: list[str] = field(default_factory=list)  # PATH or NAME=PATH
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: $KILN_API_KEY, if set
    ctx: int | None = None  # tokens one sequence may hold (default: the artifact's context, at most 4096)
    rows: int = 16  # engine sequences: the most choices (n) or particles one request may use
    kv_cells: int | None = None  # llama.cpp's one KV pool shared by all rows (default: max(ctx, 4096))
    particles: int = 8  # SMC particles of a constrained request that names none (at least n)
    max_tokens: int = 256  # a request without max_tokens gets this much (or what still fits)
    queue_limit: int = 16  # requests waiting per model beyond the running one; more get 429
    threads: int | None = None
    log_level: str = "info"

    def resolved_api_key(self) -> str | None:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return key or None

    def validate(self) -> None:
        if not self.artifacts:
            raise KilnError("no artifact to serve: give at least one .gguf file or ONNX directory")
        if not 0 <= self.port <= 65535:
            raise KilnError(f"--port {self.port}: must be between 0 and 65535")
        for name, value, least in (("--ctx", self.ctx, 16), ("--rows", self.rows, 1), ("--kv-cells", self.kv_cells, 16),
                                   ("--particles", self.particles, 1), ("--max-tokens", self.max_tokens, 1),
                                   ("--queue-limit", self.queue_limit, 0), ("--threads", self.threads, 1)):
            if value is not None and value < least:
                raise KilnError(f"{name} {value}: must be at least {least}")
        if self.particles > self.rows:
            raise KilnError(f"--particles {self.particles} exceeds --rows {self.rows} (each particle is an engine row)")
        if not is_loopback(self.host) and not self.resolved_api_key():
            raise KilnError(f"--host {self.host} is reachable from other machines: set --api-key (or ${API_KEY_ENV}) "
                            "to serve there, or bind 127.0.0.1")
