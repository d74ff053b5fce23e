"""API: `GET /v1/jobs/{id}` and `POST /v1/jobs` at 1, 16 and 64 concurrent clients.

Our API and the bare Litestar baseline (`bench/bare_app.py`) run under the same uvicorn
command, one process each, on loopback; the load generator (`bench/loadgen.py`) runs in its own
process with keep-alive connections, a warm-up, and bounded request counts and durations. Each
POST creates a real job (record, indexes, events and an arq enqueue in Redis); no worker runs.
The tenant's request rate and queued-jobs limits are raised past what the load can reach: the
rate limiter and the quota check still run on every request, they just never refuse.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

from bench.common import (
    AUTH,
    HTTP_PARSER,
    PY,
    QUIET_ENV,
    ROOT,
    Figure,
    Section,
    Stack,
    run_json,
    scratch,
    stop_process,
    uvicorn_command,
    wait_http,
)
from service.dev.localredis import free_port
from tests.fixtures.tiny_model import preference_rows

CONCURRENCY = (1, 16, 64)
UNREACHED = {"FTUNE_MAX_REQUESTS_PER_SECOND": "1000000", "FTUNE_MAX_QUEUED_JOBS": "1000000"}
"""Limits the load never reaches: their checks still cost what they cost."""


def _load(port: int, method: str, path: str, concurrency: int, full: bool, **extra: Any) -> Any:
    config = {
        "host": "127.0.0.1",
        "port": port,
        "method": method,
        "path": path,
        "concurrency": concurrency,
        "requests": 20_000 if full else 1_500,
        "seconds": 10 if full else 2.5,
        "warmup_requests": 500 if full else 100,
        **extra,
    }
    return run_json([PY, "-m", "bench.loadgen", json.dumps(config)], timeout=120)


def _bare(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = root / "bare.log"
    proc = subprocess.Popen(
        uvicorn_command("bench.bare_app:create_app", port),
        env={**__import__("os").environ, **QUIET_ENV},
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_http(f"http://127.0.0.1:{port}/const", proc, log)
    return proc, port


def run(full: bool) -> Section:
    section = Section(
        "API throughput and latency (uvicorn, one process, loopback)",
        f"python -m bench --{'full' if full else 'quick'} --only api",
    )
    with scratch("api") as root, Stack(root / "stack", env=UNREACHED) as stack:
        bare, bare_port = _bare(root)
        try:
            ds = stack.upload_rows(preference_rows(8))
            spec = {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "dataset_id": ds["id"]}
            job = stack.submit(spec)
            body = json.dumps(spec)
            cases = (
                ("GET /v1/jobs/{id}", "GET", f"/v1/jobs/{job['id']}", "GET /const", ""),
                ("POST /v1/jobs", "POST", "/v1/jobs", "POST /const", body),
            )
            for name, method, path, bare_name, payload in cases:
                for c in CONCURRENCY:
                    ours = _load(stack.port, method, path, c, full, headers=AUTH, body=payload)
                    base = _load(bare_port, method, "/const", c, full, body=payload)
                    _check(name, ours, base)
                    _figures(section, name, bare_name, c, ours, base)
        finally:
            stop_process(bare)
    parser = (
        "httptools, in C"
        if HTTP_PARSER == "httptools"
        or (HTTP_PARSER == "auto" and importlib.util.find_spec("httptools"))
        else "h11, in Python"
    )
    loop = "uvloop's" if importlib.util.find_spec("uvloop") else "asyncio's own"
    section.facts.append(
        f"the generator and each server share the machine's 2 cores; both servers run uvicorn "
        f"with the same HTTP parser ({parser}) and event loop ({loop}), which bounds the bare "
        "baseline too"
    )
    return section


def _check(name: str, ours: dict[str, Any], base: dict[str, Any]) -> None:
    for who, result in (("ours", ours), ("bare", base)):
        bad = {k: v for k, v in result["statuses"].items() if not k.startswith("2")}
        if bad or not result["requests"]:
            raise RuntimeError(f"{name} ({who}): unexpected answers {result['statuses']}")


def _figures(
    section: Section, name: str, bare_name: str, c: int, ours: dict[str, Any], base: dict[str, Any]
) -> None:
    baseline = "a bare Litestar endpoint returning a constant, same uvicorn configuration"
    if name.startswith("GET"):
        why_rps = (
            "per request our GET does what the bare one does (uvicorn, Litestar routing) "
            "plus two Redis round trips in turn (the tenant's request-rate hit, a Lua script, "
            "then the record), bearer-key auth, decoding and re-encoding the ~2 KB job record, "
            "the rate-limit, audit and Prometheus middleware and dependency injection: 4-5x "
            "the bare request's CPU in one process. More processes (uvicorn --workers, or "
            "API replicas, which are stateless) scale it"
        )
    else:
        why_rps = (
            "a submit is 3 Redis round trips in turn (the request-rate hit, one MGET of the "
            "dataset records, one MULTI/EXEC with the record's Lua script and the enqueue), "
            "plus validating the spec, the grants and GPU memory checks, and encoding the "
            "record into the script and the response: about 4-5x the bare request's CPU in one "
            "process; more processes scale it"
        )
    row = f"{name} ({bare_name}), {c} client{'s' if c > 1 else ''}"
    section.add(
        Figure(
            f"{name} throughput",
            ours["rps"],
            base["rps"],
            "req/s",
            baseline,
            better="higher",
            why=why_rps,
            row=row,
            column="throughput",
        )
    )
    for q in ("p50", "p99"):
        section.add(
            Figure(
                f"{name} {q} latency",
                ours[f"{q}_ms"],
                base[f"{q}_ms"],
                "ms",
                baseline,
                why="the per-request work above; at 16 and 64 clients requests also queue "
                "for the one API process, so the tail follows the throughput",
                row=row,
                column=f"{q} latency",
            )
        )
