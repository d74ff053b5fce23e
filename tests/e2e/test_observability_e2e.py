"""Watching a real job: its events over SSE with a reconnect, the worker's Prometheus figures
moving while it trains, and no secret in any log line it caused."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client
from tests.e2e.conftest import Stack, soon
from tests.e2e.test_jobs_end_to_end import spec
from tests.fixtures.tiny_model import preference_rows

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SECRETS = {
    "HF_TOKEN": "hf_e2eSECRETtokenABCDEFGHIJKLMNOP",
    "AWS_SECRET_ACCESS_KEY": "e2e/SECRET+access+key+0123456789abcdef",
}


def events(stack: Stack, job_id: str, last: str | None, limit: int | None) -> list[dict[str, Any]]:
    """The job's events as the CLI's client reads them, resumed after `last`."""
    with (
        Client(stack.api.url, "key-alice") as client,
        contextlib.closing(client.events(job_id, last_event_id=last)) as stream,
    ):
        return [dataclasses.asdict(e) for e in itertools.islice(stream, limit)]


def worker_metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_job_seen_from_outside(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ds = stack.upload(preference_rows(64))
    stack.start_worker(dict(SECRETS))
    # Long enough (~3 s at 0.02 s a step on a fast machine) for the sampler to see the worker
    # busy at a step past 0 more than once.
    steps = 150
    job = stack.submit(spec(stack, ds["id"], hyperparameters={"max_steps": steps}))

    samples: list[dict[str, float]] = []

    def sample() -> None:
        while len(samples) < 200:
            with contextlib.suppress(httpx.HTTPError):  # the worker may still be starting
                samples.append(worker_metrics(stack.metrics_ports[0]))
            if stack.job(job["id"])["status"] in {"succeeded", "failed", "cancelled"}:
                return
            time.sleep(0.3)

    sampler = threading.Thread(target=sample)
    sampler.start()
    first = events(stack, job["id"], None, limit=6)  # drop out mid-job ...
    rest = events(stack, job["id"], first[-1]["id"], limit=None)  # ... and resume until the end
    sampler.join(120)
    done = stack.job(job["id"])
    assert done["status"] == "succeeded", done

    seen = first + rest
    assert len({e["id"] for e in seen}) == len(seen), "every event exactly once"
    statuses = [e["data"]["status"] for e in seen if e["event"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    phases = [e["data"]["phase"] for e in seen if e["event"] == "phase"]
    assert phases[:2] == ["preparing", "training"] and "uploading" in phases
    trained = [
        e["data"]["step"] for e in seen if e["event"] == "metrics" and "loss" in e["data"]["values"]
    ]
    assert trained == list(range(1, steps + 1))
    assert any(e["event"] == "log" for e in seen)

    busy = [s for s in samples if s.get("ftune_worker_busy") == 1]
    assert busy and max(s["ftune_worker_step"] for s in busy) > 0
    assert any(s.get("ftune_worker_tokens_per_second", 0) > 0 for s in busy)
    # Counted just after the status is written: the worker reaps the process first.
    finished = "ftune_worker_jobs_finished_total,status=succeeded"
    assert soon(lambda: worker_metrics(stack.metrics_ports[0]).get(finished) == 1)
    idle = worker_metrics(stack.metrics_ports[0])
    # Idle, the worker shows no load: not the last job's rate, throughput and memory.
    gauges = ("busy", "step", "steps_per_second", "tokens_per_second", "memory_bytes")
    assert {g: idle[f"ftune_worker_{g}"] for g in gauges} == dict.fromkeys(gauges, 0)

    everything = stack.logs() + "\n".join(r.getMessage() for r in caplog.records)
    everything += json.dumps(seen) + json.dumps(done)
    assert "job_id" in stack.logs()  # the worker's lines are JSON with the job's context
    for name, value in {**SECRETS, "API key": "key-alice"}.items():
        assert value not in everything, f"{name} leaked into logs or events"
