"""A whole stack for end-to-end tests: real Redis, the API over HTTP, workers as processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dev.localredis import free_port
from service.settings import Settings
from tests.fixtures.api import ALICE, LiveServer


def soon(check: Callable[[], bool], within: float = 10.0) -> bool:
    """Whether ``check`` holds within ``within`` seconds: for what a worker does just after a
    job's status is written (reaping its process, counting it in its metrics)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Stack:
    settings: Settings
    api: LiveServer
    http: httpx.Client
    root: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)

    @property
    def store_dir(self) -> Path:
        return Path(self.settings.store_url.removeprefix("file://"))

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "FTUNE_REDIS_URL": s.redis_url,
            "FTUNE_STORE_URL": s.store_url,
            "FTUNE_MODELS_DIR": str(s.models_dir),
            "FTUNE_WORK_DIR": str(s.work_dir),
            "FTUNE_LEASE_SECONDS": str(s.lease_seconds),
            "FTUNE_MAX_ATTEMPTS": str(s.max_attempts),
            "FTUNE_API_KEYS_FILE": str(s.api_keys_file or ""),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    def start_worker(
        self, extra_env: dict[str, str] | None = None, *, own_group: bool = False
    ) -> subprocess.Popen[bytes]:
        """A worker process; its Prometheus port is in `metrics_ports`. `own_group`: in its own
        process group, which a test may signal as a whole (as systemd or dumb-init do)."""
        log = (self.root / f"worker-{len(self.workers)}.log").open("wb")
        port = free_port()
        self.metrics_ports.append(port)
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env={**self.env(), "FTUNE_WORKER_METRICS_PORT": str(port), **(extra_env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,
        )
        self.workers.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    def upload(self, rows: list[dict[str, Any]], name: str = "train") -> dict[str, Any]:
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        resp = self.http.post(
            "/v1/datasets",
            params={"name": name},
            content=body,
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post("/v1/jobs", json=spec)
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/v1/jobs/{job_id}").json())

    def wait(self, job_id: str, until: Any, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.25)
        raise AssertionError(f"timed out; job is {job}\n--- logs ---\n{self.logs()[-6000:]}")

    def wait_done(self, job_id: str, timeout: float = 300) -> dict[str, Any]:
        terminal = {"succeeded", "failed", "cancelled"}
        return self.wait(job_id, lambda j: j["status"] in terminal, timeout)


@pytest.fixture
def stack(api_settings: Settings, tmp_path: Path, tiny_model_dir: Path) -> Iterator[Stack]:
    settings = replace(
        api_settings,
        lease_seconds=3.0,
        max_dataset_bytes=64 * 1024**2,
        scheduler_enabled=True,
        scheduler_interval_seconds=0.5,
    )
    shutil.copytree(tiny_model_dir, settings.models_dir / "tiny")
    with (
        LiveServer(settings) as api,
        httpx.Client(base_url=api.url, headers=ALICE, timeout=30) as http,
    ):
        s = Stack(settings=settings, api=api, http=http, root=tmp_path)
        yield s
        for proc in s.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
