"""The embedded stack behind `ftune dev` and `ftune demo`: Redis, the API and one worker.

Everything lives under one state directory (`.ftune/` by default): Redis's append-only file,
the file:// blob store, models, the worker's scratch space, the API key. A second start reuses
all of it, so jobs and datasets survive a restart. The children run in their own sessions:
Ctrl-C reaches only us, and we stop them in order (worker, API, Redis).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import httpx
import msgspec

from service.dev.localredis import LocalRedis, die_with_parent, free_port
from service.settings import hash_api_key
from service.tenants import ANY, Grants, KeyEntry, TenantEntry, TenantsFile

TENANT = "local"


class StackError(RuntimeError):
    """The stack could not start (port taken, a child exited); the message says why."""


def ensure_api_key(root: Path) -> tuple[str, bool]:
    """The stack's API key and whether it was just created.

    The plaintext goes to `root/api_key` (mode 0600, for the CLI to read); the keys file the
    API reads holds only its sha256.
    """
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "api_key"
    created = False
    try:
        key = key_file.read_text().strip()
    except FileNotFoundError:
        key = ""
    if not key:
        key = secrets.token_urlsafe(32)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        created = True
    os.chmod(key_file, 0o600)
    # One developer's own stack: its tenant may use every Hub token, namespace and bucket this
    # machine's credentials reach (a shared deployment grants them per tenant instead).
    everything = Grants(hub_tokens=(ANY,), hub_namespaces=(ANY,), s3_read=(ANY,), s3_write=(ANY,))
    entry = TenantEntry(keys=[KeyEntry(sha256=hash_api_key(key))], grants=everything)
    (root / "api_keys.json").write_bytes(msgspec.json.encode(TenantsFile(tenants={TENANT: entry})))
    return key, created


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class DevStack:
    """Redis (persistent), the API on `host:port` and one worker, as a context manager.

    `port=None` picks a free port. With `log_dir` the API and worker write there (the demo
    keeps its terminal for the progress bar); without it they share our terminal.
    """

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        log_dir: Path | None = None,
        worker: bool = True,
        extra_env: Mapping[str, str] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.root = root.resolve()
        self.host = host
        self.port = port or free_port()
        self.worker_metrics_port = free_port()
        self.log_dir = log_dir.resolve() if log_dir else None
        self.with_worker = worker
        self.extra_env = dict(extra_env or {})
        self.ready_timeout = ready_timeout
        self.redis: LocalRedis | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.api_key = ""
        self.key_created = False
        self._logs: list[IO[bytes]] = []

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def worker_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_metrics_port}/metrics"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def env(self) -> dict[str, str]:
        """The FTUNE_* settings the API and the worker start with."""
        if self.redis is None:
            raise StackError("Redis is not running")
        return {
            "FTUNE_LOG_FORMAT": "text",
            "TOKENIZERS_PARALLELISM": "false",
            "FTUNE_WORKER_METRICS_PORT": str(self.worker_metrics_port),
            # Ctrl-C should not wait minutes: a running job checkpoints at its next step
            # (SmolLM2 on a CPU: ~5 s) and resumes there on the next start; past 15 s it
            # resumes from its last checkpoint. Below stop()'s 30 s wait for the worker.
            "FTUNE_WORKER_GRACE_SECONDS": "15",
            "FTUNE_REDIS_URL": self.redis.url,
            "FTUNE_STORE_URL": "file://" + str(self.root / "store"),
            "FTUNE_MODELS_DIR": str(self.models_dir),
            "FTUNE_WORK_DIR": str(self.root / "work"),
            "FTUNE_UPLOAD_DIR": str(self.root / "uploads"),
            "FTUNE_API_KEYS_FILE": str(self.root / "api_keys.json"),
            **self.extra_env,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> DevStack:
        if not _port_free(self.host, self.port):
            raise StackError(
                f"port {self.port} on {self.host} is in use: is `ftune dev` already running? "
                "Pick another port (`ftune dev --port P`, `ftune demo` with --url)."
            )
        for sub in ("store", "models", "work"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.api_key, self.key_created = ensure_api_key(self.root)
        try:
            self.redis = LocalRedis(data_dir=self.root / "redis").start()
            cli = [sys.executable, "-m", "service.cli"]
            self.api = self._spawn(
                "api", [*cli, "api", "--host", self.host, "--port", str(self.port)]
            )
            self.wait_ready()
            if self.with_worker:
                self.worker = self._spawn("worker", [*cli, "worker"])
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = (self.log_dir / f"{name}.log").open("ab")
            self._logs.append(out)
        return subprocess.Popen(
            args,
            env={**os.environ, **self.env(), "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            preexec_fn=die_with_parent,
        )

    def wait_ready(self) -> None:
        """Block until the API answers /readyz, or raise with the reason it never will."""
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=2.0) as http:
            while True:
                self.check()
                try:
                    if http.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise StackError(f"the API did not become ready at {self.url}{self._hint()}")
                time.sleep(0.1)

    def check(self) -> None:
        """Raise if a child exited on its own."""
        for name, proc in (("API", self.api), ("worker", self.worker)):
            if proc is not None and proc.poll() is not None:
                raise StackError(f"the {name} exited with code {proc.returncode}{self._hint()}")
        redis = self.redis.process if self.redis is not None else None
        if redis is not None and redis.poll() is not None:
            raise StackError("Redis exited")

    def _hint(self) -> str:
        return f" (logs in {self.log_dir})" if self.log_dir else ""

    def stop(self) -> None:
        """Worker first (it hands back its job), then the API, then Redis."""
        _terminate(self.worker, grace=30.0)
        _terminate(self.api, grace=10.0)
        self.worker = self.api = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        for f in self._logs:
            f.close()
        self._logs.clear()


def _terminate(proc: subprocess.Popen[Any] | None, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
