"""The step cache on storage every worker can read: a local or network path, or an fsspec URL (s3://, gs://, ...).

Layout under the store's root. An entry's name (`<key>` below) is the sha256 of a step's cache key
(kiln.recipe.plan.Step.key, the same content addressing as a recipe's output directory) and of its
output names (kiln.recipe.ray_executor.address):

    steps/<key>/files/<output names>   a published step's outputs, exactly as they appear in an output directory
    steps/<key>/record.json            the commit: digest, every file's sha256 and size, the step's result
    leases/<key>/<epoch>.json          one per attempt: owner (host, pid), expiry, state running|done|failed
    tmp/<key>.<token>/                 an attempt's work in progress (never read as a published step)

**Atomic publication.** A step is published when `record.json` exists and nothing else counts. On a
local or network path the attempt's whole directory (outputs and record) is renamed onto
`steps/<key>` in one rename(2), so a reader sees all of it or none of it; on an object store the
files are uploaded under `tmp/`, copied to `steps/<key>/files/`, and `record.json` is written last
(copy-and-commit), created exclusively so that one attempt only ever commits.

**Leases.** Before running a step a worker creates `leases/<key>/<n+1>.json` exclusively (O_EXCL, or
the store's conditional create), where n is the newest epoch and that attempt is finished, expired
(its holder renews it every ttl/3 s) or dead (same host, process gone). Exclusive creation makes
take-over race-free: two workers never hold one key. A holder checks that no newer epoch exists
before it publishes (fencing), and the lease files stay as the record of every attempt, which is how
the tests count executions. fsspec is imported here only.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError


def _pid_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a SIGKILLed worker stays a zombie until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


def _expired(lease: dict[str, Any], now: float) -> bool:
    return float(lease.get("expires", 0)) < now


def _dead(lease: dict[str, Any]) -> bool:
    return lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int) \
        and not _pid_alive(lease["pid"])


@dataclass
class Lease:
    """A held lease: `renew` pushes its expiry, `valid` checks no newer attempt took over, `release` ends it."""

    store: Store
    key: str
    epoch: int
    body: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.store._lease_path(self.key, self.epoch)

    def renew(self) -> None:
        self.body["expires"] = time.time() + self.store.ttl
        self.store._put(self.path, json.dumps(self.body, sort_keys=True).encode())

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.store.ttl / 3):
                with contextlib.suppress(Exception):  # a missed beat only shortens the lease
                    self.renew()

        self._thread = threading.Thread(target=beat, name=f"kiln-lease-{self.key[:8]}", daemon=True)
        self._thread.start()

    def valid(self) -> bool:
        """Still ours: no newer epoch exists for this key."""
        return self.store._epochs(self.key)[-1:] == [self.epoch]

    def release(self, state: str, **extra: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.body.update(state=state, finished=time.time(), **extra)
        with contextlib.suppress(Exception):
            self.store._put(self.path, json.dumps(self.body, sort_keys=True, default=str).encode())


class Store:
    """A content-addressed step store at `url` (a path or an fsspec URL)."""

    def __init__(self, url: str | os.PathLike[str], ttl: float = 30.0, cache: Path | None = None):
        try:
            from fsspec.core import url_to_fs
            from fsspec.implementations.local import LocalFileSystem
        except ImportError:
            raise KilnError("a recipe store needs fsspec (pip install 'kiln-llm[ray]')") from None
        self.url = str(url)
        try:
            self.fs, root = url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            raise KilnError(f"store {self.url}: {exc}") from None
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        if self.local:
            self.url = self.root  # what travels to the workers: absolute, whatever their working directory
        self.ttl = ttl
        if cache is None:
            from kiln.paths import cache_dir
            import hashlib

            cache = cache_dir() / "store-cache" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.cache = cache  # local copies of a remote store's entries (workers read inputs from here)
        if self.local:
            for sub in ("steps", "leases", "tmp"):
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)

    def __reduce__(self):  # travels to Ray workers as its URL and settings
        return (Store, (self.url, self.ttl, self.cache))

    # --- paths and small I/O -------------------------------------------------------------------

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _lease_path(self, key: str, epoch: int) -> str:
        return self._p("leases", key, f"{epoch:06d}.json")

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError, OSError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _staged(path: str, data: bytes) -> str:
        """`data` written in full to a fresh temporary file beside `path` (its name returned), to be renamed
        or linked into place in one step."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        return tmp

    def _put(self, path: str, data: bytes) -> None:
        """Replace `path`'s content in one step (a reader never sees it half written)."""
        if self.local:
            os.replace(self._staged(path, data), path)
        else:
            self.fs.pipe_file(path, data)  # one object PUT: atomic on object stores

    def _create(self, path: str, data: bytes) -> bool:
        """Create `path` only if it does not exist (O_EXCL / a conditional PUT); False if it did."""
        if self.local:
            tmp = self._staged(path, data)
            try:
                os.link(tmp, path)  # link(2) fails if `path` exists: exclusive and never half written
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: O_EXCL (a reader may see it empty a moment)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            finally:
                os.unlink(tmp)
            return True
        try:
            with self.fs.open(path, "xb") as fh:
                fh.write(data)
        except FileExistsError:
            return False
        return True

    # --- published steps -------------------------------------------------------------------------

    def record(self, key: str) -> dict[str, Any] | None:
        """The committed record of step `key`, or None when it is not published."""
        return self._read_json(self._p("steps", key, "record.json"))

    def published(self) -> list[str]:
        try:
            names = self.fs.ls(self._p("steps"), detail=False)
        except FileNotFoundError:
            return []
        keys = sorted(posixpath.basename(n.rstrip("/")) for n in names)
        return [k for k in keys if self.fs.exists(self._p("steps", k, "record.json"))]

    def files(self, key: str) -> Path:
        """A local directory holding step `key`'s outputs: the store's own on a path, else a verified copy."""
        if self.local:
            return Path(self._p("steps", key, "files"))
        dest = self.cache / key
        if dest.is_dir():
            return dest
        rec = self.record(key)
        if rec is None:
            raise KilnError(f"store {self.url}: step {key[:12]} is not published")
        from kiln.atomic import sha256_file

        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self.cache / f".{key}.{secrets.token_hex(4)}.part"
        try:
            for rel, meta in rec["files"].items():
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self._p("steps", key, "files", rel), str(local))
                if sha256_file(local) != meta["sha256"]:
                    raise KilnError(f"store {self.url}: {key[:12]}/{rel} does not match its record")
            try:
                os.rename(tmp, dest)
            except OSError:  # another process fetched it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def scratch(self, key: str, lease: Lease | None = None) -> Path:
        """A fresh local directory for an attempt's outputs (`files/` inside); on a path store it lies
        under tmp/ so that publishing is one rename. With the attempt's `lease`, the path is written into
        the lease before the directory exists, so an attempt killed at any instant leaves nothing that the
        one taking over cannot find and remove."""
        token = secrets.token_hex(6)
        base = Path(self._p("tmp", f"{key}.{token}")) if self.local else self.cache / "work" / f"{key}.{token}"
        if lease is not None:
            lease.body["scratch"] = str(base)
            lease.renew()
        (base / "files").mkdir(parents=True)
        return base

    def publish(self, key: str, scratch: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Commit `scratch/files` as step `key`; returns the record that won (ours, or an earlier one)."""
        body = json.dumps({**record, "key": key}, indent=2, sort_keys=True, default=str).encode()
        if self.local:
            (scratch / "record.json").write_bytes(body)
            dest = self._p("steps", key)
            try:
                os.rename(scratch, dest)  # the whole entry appears at once
            except OSError:  # already published (a non-empty directory is never replaced)
                shutil.rmtree(scratch, ignore_errors=True)
            found = self.record(key)
            if found is None:
                raise KilnError(f"store {self.url}: step {key[:12]} could not be published")
            return found
        existing = self.record(key)
        if existing is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            return existing
        tmp = self._p("tmp", f"{key}.{scratch.name.rsplit('.', 1)[-1]}")
        try:
            names = sorted(p for p in (scratch / "files").rglob("*") if p.is_file())
            for p in names:  # write under a temporary key ...
                self.fs.put_file(str(p), posixpath.join(tmp, "files", p.relative_to(scratch / "files").as_posix()))
            for p in names:  # ... copy into place, then commit with the record
                rel = p.relative_to(scratch / "files").as_posix()
                self.fs.copy(posixpath.join(tmp, "files", rel), self._p("steps", key, "files", rel))
            self._create(self._p("steps", key, "record.json"), body)
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp, recursive=True)
            shutil.rmtree(scratch, ignore_errors=True)
        found = self.record(key)
        if found is None:
            raise KilnError(f"store {self.url}: step {key[:12]} could not be published")
        return found

    def discard(self, scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)

    # --- leases ----------------------------------------------------------------------------------

    def _epochs(self, key: str) -> list[int]:
        try:
            names = self.fs.ls(self._p("leases", key), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            base = posixpath.basename(n.rstrip("/"))
            if base.endswith(".json") and base[:-5].isdigit():
                out.append(int(base[:-5]))
        return sorted(out)

    def attempts(self, key: str) -> list[dict[str, Any]]:
        """Every attempt at step `key`, oldest first (epoch, owner, state: running, done or failed)."""
        return [a for e in self._epochs(key) if (a := self._read_json(self._lease_path(key, e))) is not None]

    def lease_keys(self) -> list[str]:
        try:
            return sorted(posixpath.basename(n.rstrip("/")) for n in self.fs.ls(self._p("leases"), detail=False))
        except FileNotFoundError:
            return []

    def holder(self, key: str) -> dict[str, Any] | None:
        """The live attempt at `key` (running, not expired, not dead), or None."""
        epochs = self._epochs(key)
        if not epochs:
            return None
        cur = self._read_json(self._lease_path(key, epochs[-1]))
        if cur is None or cur.get("state") != "running" or _expired(cur, time.time()) or _dead(cur):
            return None
        return cur

    def acquire(self, key: str, owner: dict[str, Any] | None = None, wait: bool = True,
                poll: float = 0.2) -> Lease | None:
        """Take the lease on `key`; None once the step is published (by whoever held it).

        While another live attempt holds it: wait (`wait`) or return None at once."""
        unreadable_since: dict[int, float] = {}
        while True:
            if self.record(key) is not None:
                return None
            epochs = self._epochs(key)
            n = epochs[-1] if epochs else 0
            cur = self._read_json(self._lease_path(key, n)) if n else None
            now = time.time()
            if n and cur is None:  # being written this instant, or its writer died: give it one ttl
                free = now - unreadable_since.setdefault(n, now) > self.ttl
            else:
                free = cur is None or cur.get("state") != "running" or _expired(cur, now) or _dead(cur)
            if free:
                body = {"key": key, "epoch": n + 1, "host": socket.gethostname(), "pid": os.getpid(),
                        "token": secrets.token_hex(8), "started": now, "expires": now + self.ttl,
                        "state": "running", **(owner or {})}
                if n and cur is not None and cur.get("state") == "running":
                    body["took_over"] = {"epoch": n, "why": "dead" if _dead(cur) else "expired"}
                    if cur.get("scratch"):  # what the lost attempt left (never visible under steps/)
                        shutil.rmtree(cur["scratch"], ignore_errors=True)
                if self._create(self._lease_path(key, n + 1), json.dumps(body, sort_keys=True).encode()):
                    return Lease(self, key, n + 1, body)
                continue  # someone else took epoch n+1 first
            if not wait:
                return None
            time.sleep(poll)


@contextlib.contextmanager
def holding(store: Store, key: str, owner: dict[str, Any] | None = None) -> Iterator[Lease | None]:
    """`acquire` with a heartbeat; the lease ends `failed` if the block raises, else as the block set it."""
    lease = store.acquire(key, owner)
    if lease is None:
        yield None
        return
    lease.start_heartbeat()
    try:
        yield lease
    except BaseException as exc:
        lease.release("failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    if lease.body.get("state") == "running":
        lease.release("done")
