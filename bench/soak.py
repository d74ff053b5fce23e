"""Soak: several tenants at once against one API and two workers, then a consistency check.

`python -m bench.soak [--seconds 60] [--tenants 4] [--users 2] [--out FILE]`

For `--seconds`, each tenant's `--users` loops do what teams do, at random: upload a small
dataset (six contents in all, so blobs are shared across tenants and deduplicated, and a delete
races uploads of the same content), submit a job on one of their datasets, follow a job's event
stream for up to 2 s, cancel a job, delete a dataset, list and read jobs. Two real worker
processes take the jobs; each job names a base model no worker can load (a config.json, no
weights), so it ends `failed` in `preparing` once its training process has imported the training
stack: the workers claim, run and finish jobs the whole time. The tenants run into the
configured limits (live jobs, open streams), which answer 429.

Afterwards every live job is cancelled, the workers are given up to 60 s to finish, and the
state is checked: every dataset record's blob exists (lost = 0), every stored dataset blob
belongs to a record (orphaned = 0), each blob's reference count equals its records, every job
ended, and the arq queue (what KEDA counts) is empty with nothing "in progress".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import Stack, percentile, scratch
from service.blobs import dataset_blob_key
from service.settings import Principal, Settings, write_api_keys
from tests.fixtures.tiny_model import preference_rows

NDJSON = {"Content-Type": "application/x-ndjson"}
STREAM_SECONDS = 2.0
LIMITS = {
    "FTUNE_MAX_QUEUED_JOBS": "6",
    "FTUNE_MAX_EVENT_STREAMS": "1",
    "FTUNE_LEASE_SECONDS": "5",
    "FTUNE_SCHEDULER_INTERVAL_SECONDS": "1",
}


class Load:
    """Every request's operation, status and latency."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.status: Counter[tuple[str, int]] = Counter()
        self.busy = 0
        """503s with Retry-After: back-pressure by design (e.g. upload slots), not failures."""

    def note(self, op: str, resp: httpx.Response, seconds: float) -> None:
        self.latency[op].append(seconds)
        self.status[(op, resp.status_code)] += 1
        if resp.status_code == 503 and "Retry-After" in resp.headers:
            self.busy += 1

    @property
    def errors(self) -> int:
        """Server errors that are not back-pressure: what a soak must not show."""
        return sum(n for (_, status), n in self.status.items() if status >= 500) - self.busy


async def _call(
    load: Load, op: str, http: httpx.AsyncClient, method: str, url: str, **kw: Any
) -> httpx.Response:
    started = time.perf_counter()
    resp = await http.request(method, url, **kw)
    load.note(op, resp, time.perf_counter() - started)
    return resp


async def _stream(load: Load, http: httpx.AsyncClient, job_id: str) -> None:
    """Follow a job's events for up to STREAM_SECONDS; latency is the time to the headers."""
    started = time.perf_counter()
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        load.note("stream", resp, time.perf_counter() - started)
        if resp.status_code != 200:
            await resp.aread()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STREAM_SECONDS):
                async for _ in resp.aiter_lines():
                    pass


async def _user(load: Load, url: str, key: str, base_model: str, until: float, seed: int) -> None:
    rnd = random.Random(seed)
    datasets: list[str] = []
    jobs: list[str] = []
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        while time.monotonic() < until:
            op = rnd.choices(
                ["upload", "submit", "stream", "cancel", "delete", "read"],
                weights=[20, 20, 15, 15, 15, 15],
            )[0]
            if op == "upload" or not datasets:
                rows = preference_rows(rnd.randint(8, 13))
                body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                resp = await _call(
                    load, "upload", http, "POST", "/v1/datasets", content=body, headers=NDJSON
                )
                if resp.status_code == 201:
                    datasets.append(resp.json()["id"])
            elif op == "submit":
                spec = {
                    "base_model": base_model,
                    "dataset_id": rnd.choice(datasets),
                    "eval_fraction": 0.0,
                }
                spec["priority"] = rnd.choice([0, 0, 5])
                resp = await _call(load, "submit", http, "POST", "/v1/jobs", json=spec)
                if resp.status_code == 201:
                    jobs.append(resp.json()["id"])
            elif op == "stream" and jobs:
                await _stream(load, http, rnd.choice(jobs[-5:]))
            elif op == "cancel" and jobs:
                await _call(load, "cancel", http, "POST", f"/v1/jobs/{rnd.choice(jobs)}/cancel")
            elif op == "delete":
                ds = rnd.choice(datasets)
                resp = await _call(load, "delete", http, "DELETE", f"/v1/datasets/{ds}")
                if resp.status_code in (204, 404):
                    datasets.remove(ds)
            else:
                await _call(load, "read", http, "GET", "/v1/jobs", params={"limit": 20})
                if jobs:
                    await _call(load, "read", http, "GET", f"/v1/jobs/{rnd.choice(jobs)}")


def _keys(n: int) -> dict[str, Principal]:
    return {f"soak-key-{i}": Principal(f"team-{i}") for i in range(n)}


async def _drain(url: str, keys: list[str], timeout: float = 60) -> int:
    """Cancel every live job; wait until none is live. Returns the jobs still live."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        deadline = time.monotonic() + timeout
        while True:
            live = 0
            for key in keys:
                auth = {"Authorization": f"Bearer {key}"}
                for status in ("queued", "running"):
                    page = await http.get(
                        "/v1/jobs", params={"status": status, "limit": 100}, headers=auth
                    )
                    for job in page.json()["items"]:
                        live += 1
                        await http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
            if live == 0 or time.monotonic() > deadline:
                return live
            await asyncio.sleep(1)


def _consistency(stack: Stack, queue_name: str) -> dict[str, int | str]:
    client = redis.Redis.from_url(stack.redis.url)
    try:
        records: Counter[str] = Counter()
        for key in client.scan_iter("ftune:ds:*"):
            if key.count(b":") == 2:  # ftune:ds:<id>, not ftune:ds:<id>:jobs
                records[json.loads(client.get(key) or b"{}")["sha256"]] += 1
        stored = {p.stem for p in (stack.store_dir / "datasets").glob("*.jsonl")}
        refs = {
            key.decode().rsplit(":", 1)[1]: int(client.get(key) or 0)
            for key in client.scan_iter("ftune:blobrefs:*")
        }
        wrong_refs = sum(1 for sha, n in records.items() if refs.get(sha, 0) != n)
        wrong_refs += sum(1 for sha, n in refs.items() if n > 0 and sha not in records)
        live = sum(int(client.zcard(f"ftune:jobs:all:{s}")) for s in ("queued", "running"))
        started: Counter[str] = Counter()
        for key in client.scan_iter("ftune:job:*"):
            job = json.loads(client.get(key) or b"{}")
            if job.get("started_at"):
                started[job["tenant"]] += 1
        return {
            "dataset records": sum(records.values()),
            "blobs stored": len(stored),
            "lost (record without blob)": sum(
                1 for sha in records if not (stack.store_dir / dataset_blob_key(sha)).exists()
            ),
            "orphaned (blob without record)": len(stored - set(records)),
            "wrong reference counts": wrong_refs,
            "jobs": int(client.zcard("ftune:jobs:all")),
            "jobs started by a worker": sum(started.values()),
            "of them, fewest / most for one tenant": f"{min(started.values(), default=0)} / "
            f"{max(started.values(), default=0)}",
            "jobs still live": live,
            "arq queue entries": int(client.zcard(queue_name)),
            "arq entries in progress": sum(1 for _ in client.scan_iter("arq:in-progress:*")),
        }
    finally:
        client.close()


def run(seconds: float, tenants: int, users: int) -> str:
    keys = _keys(tenants)
    with scratch("soak") as root:
        root.mkdir(parents=True, exist_ok=True)
        write_api_keys(root / "keys.json", keys)
        with Stack(root, workers=2, env=LIMITS) as stack:
            base_model = stack.unloadable_model()
            time.sleep(3.0)  # let the workers finish starting
            load = Load()
            started = time.monotonic()
            until = started + seconds

            async def go() -> None:
                await asyncio.gather(
                    *(
                        _user(load, stack.url, key, base_model, until, seed=i * 100 + u)
                        for i, key in enumerate(keys)
                        for u in range(users)
                    )
                )

            asyncio.run(go())
            elapsed = time.monotonic() - started
            still_live = asyncio.run(_drain(stack.url, list(keys)))
            state = _consistency(stack, Settings().queue_name)
            state["jobs still live after 60 s of draining"] = still_live
    return _report(load, state, seconds=elapsed, tenants=tenants, users=users)


def _report(
    load: Load, state: dict[str, int | str], *, seconds: float, tenants: int, users: int
) -> str:
    served = sum(load.status.values())
    by_status: Counter[int] = Counter()
    for (_, status), n in load.status.items():
        by_status[status] += n
    every = [s for values in load.latency.values() for s in values]
    lines = [
        f"## soak: {tenants} tenants x {users} clients for {seconds:.0f} s, one API, two workers",
        "",
        f"Requests served: {served} ({served / seconds:.0f}/s); by status: "
        + ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items()))
        + f"; server errors (5xx but 503 with Retry-After): {load.errors}; 503 with "
        f"Retry-After (back-pressure): {load.busy}.",
        f"Latency over all requests: p50 {1000 * percentile(every, 50):.0f} ms, "
        f"p99 {1000 * percentile(every, 99):.0f} ms (streams: time to the headers).",
        "",
        "| operation | requests | statuses | p50 | p99 |",
        "|---|---|---|---|---|",
    ]
    for op in sorted(load.latency):
        statuses = ", ".join(f"{s}: {n}" for (o, s), n in sorted(load.status.items()) if o == op)
        values = load.latency[op]
        lines.append(
            f"| {op} | {len(values)} | {statuses} | {1000 * percentile(values, 50):.0f} ms "
            f"| {1000 * percentile(values, 99):.0f} ms |"
        )
    lines += ["", "| after the load | count |", "|---|---|"]
    lines += [f"| {what} | {n} |" for what, n in state.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--users", type=int, default=2, help="concurrent clients per tenant")
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)
    report = run(args.seconds, args.tenants, args.users)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return (
        0 if "| lost (record without blob) | 0 |" in report and "Retry-After): 0;" in report else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
