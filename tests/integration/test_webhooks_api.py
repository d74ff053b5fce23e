"""Webhooks through the running API: a job cancelled over HTTP is delivered, signed, by the
API's own delivery loop (needs the wiring in app.py, store.py and settings.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient
from standardwebhooks import Webhook

from service import webhooks
from service.api.app import create_app
from service.contract import JobStatus, WebhookDelivery
from service.settings import Settings
from service.store import Store
from tests.fixtures.api import ALICE, BOB
from tests.integration.test_webhooks import SECRET, Receiver, _serve


async def test_a_job_cancelled_over_http_is_delivered_signed(
    api_settings: Settings, tmp_path: Path
) -> None:
    secrets = tmp_path / "webhook-secrets.json"
    secrets.write_text(json.dumps({"alice": SECRET}))
    settings = dataclasses.replace(
        api_settings,
        webhook_allow_private=True,  # the receiver is on loopback
        webhook_secrets_file=secrets,
        webhook_backoff_seconds=0.05,
    )
    for receiver in _serve(Receiver(codes=[500, 200])):
        async with AsyncTestClient(create_app(settings)) as client:
            ds = await client.post(
                "/v1/datasets",
                content=b'{"prompt": "q", "chosen": "a.", "rejected": "b b."}\n',
                params={"name": "d"},
                headers={**ALICE, "Content-Type": "application/x-ndjson"},
            )
            spec = {"base_model": "org/m", "dataset_id": ds.json()["id"]}
            job = (
                await client.post(
                    "/v1/jobs", json={**spec, "webhook_url": receiver.url}, headers=ALICE
                )
            ).json()
            cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
            assert cancelled.json()["status"] == "cancelled"
            r = aioredis.Redis.from_url(settings.redis_url)
            deadline = time.monotonic() + 10
            log: list[WebhookDelivery] = []
            while time.monotonic() < deadline and not (log and log[-1].ok):
                await asyncio.sleep(0.05)
                log = await webhooks.delivery_log(r, job["id"])
            await r.aclose()
            # The team can see what its receiver answered, and only its own jobs'.
            path = f"/v1/jobs/{job['id']}/webhook-deliveries"
            shown = (await client.get(path, headers=ALICE)).json()
            assert [(d["attempt"], d["ok"], d["status_code"]) for d in shown["deliveries"]] == [
                (1, False, 500),
                (2, True, 200),
            ]
            assert (await client.get(path, headers=BOB)).status_code == 404
            # Operators see the outcomes on /metrics, across replicas (counted in Redis).
            metrics = (await client.get("/metrics")).text
            assert 'ftune_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics
            assert 'ftune_webhook_deliveries_total{outcome="retrying"} 1.0' in metrics
            assert 'ftune_webhook_deliveries_total{outcome="given_up"} 0.0' in metrics
        assert [a.status_code for a in log] == [500, 200]
        last = receiver.requests[-1]
        assert Webhook(SECRET).verify(last.body, last.headers)["type"] == "job.cancelled"


async def test_a_policys_gate_decisions_reach_its_templates_webhook(
    api_settings: Settings, tmp_path: Path
) -> None:
    """A product team learns from its receiver, not by polling, that a retrained model is the
    one to serve now (or why it is not): after the run's job's own event, signed the same way."""
    secrets = tmp_path / "webhook-secrets.json"
    secrets.write_text(json.dumps({"alice": SECRET}))
    settings = dataclasses.replace(
        api_settings,
        webhook_allow_private=True,
        webhook_secrets_file=secrets,
        webhook_backoff_seconds=0.05,
        scheduler_enabled=True,
        scheduler_interval_seconds=0.1,
    )
    acc = "eval_rewards/accuracies"
    worker = Store.from_url(settings.redis_url, on_terminal=(webhooks.stage_webhook,))

    async def run_ends(
        client: AsyncTestClient[Any], number: int, accuracy: float, vanish: bool = False
    ) -> str:
        """Wait for the policy's run `number` to fire, then end its job as a worker does (or
        delete its record)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            runs = (await client.get("/v1/policies/p", headers=ALICE)).json()["runs"]
            if runs and runs[0]["number"] == number and runs[0]["status"] == "queued":
                break
            await asyncio.sleep(0.05)
        job_id: str = runs[0]["job_id"]
        if vanish:
            await worker.redis.delete(f"ftune:job:{job_id}")
            return job_id
        await worker.update_job(
            job_id,
            lambda j: msgspec.structs.replace(
                j,
                status=JobStatus.succeeded,
                finished_at=time.time(),
                latest_metrics={acc: accuracy},
            ),
        )
        return job_id

    async def received(count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while len(receiver.requests) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return [Webhook(SECRET).verify(r.body, r.headers) for r in receiver.requests]

    events = [
        {"id": f"e{i}", "prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."}
        for i in range(20)
    ]
    for receiver in _serve(Receiver()):
        async with AsyncTestClient(create_app(settings)) as client:
            body = {
                "stream": "chat",
                "template": {"base_model": "org/m", "webhook_url": receiver.url},
                "trigger": {"min_new_pairs": 5},
                "gate": {"at_least": {acc: 0.75}},
                "holdout_fraction": 0.2,
            }
            assert (await client.put("/v1/policies/p", json=body, headers=ALICE)).is_success
            await client.post("/v1/feedback/chat", json={"events": events[:10]}, headers=ALICE)
            first = await run_ends(client, 1, 0.9)
            by_type = {e["type"]: e for e in await received(2)}  # sent in any order
            assert by_type["job.succeeded"]["job_id"] == first
            verdict = by_type["policy.run.promoted"]
            assert (verdict["policy"], verdict["job_id"]) == ("p", first)
            assert verdict["run"]["number"] == 1 and verdict["run"]["decision"] == "promoted"
            check, *_ = verdict["run"]["gate"]
            assert (check["rule"], check["metric"], check["value"], check["passed"]) == (
                "at_least",
                acc,
                0.9,
                True,
            )
            assert verdict["promoted"]["job_id"] == first
            assert verdict["promoted"]["artifacts"] == []  # a worker would have listed its own

            await client.post("/v1/feedback/chat", json={"events": events[10:]}, headers=ALICE)
            second = await run_ends(client, 2, 0.5)
            by_type = {e["type"]: e for e in await received(4)}
            assert by_type["job.succeeded"]["job_id"] == second
            rejected = by_type["policy.run.rejected"]
            assert rejected["job_id"] == second
            assert rejected["run"]["decision_reason"] == (
                f"{acc} 0.5 < 0.75; {acc} 0.5 is worse than promoted run 1's 0.9 (higher is better)"
            )
            assert rejected["promoted"]["job_id"] == first  # still the model to serve
            assert len({e["id"] for e in await received(4)}) == 4
            shown = await client.get(f"/v1/jobs/{second}/webhook-deliveries", headers=ALICE)
            assert sorted((d["type"], d["ok"]) for d in shown.json()["deliveries"]) == [
                ("job.succeeded", True),
                ("policy.run.rejected", True),
            ]

            # A run whose job vanished is announced with no job to look up, and logs nothing.
            more = [{**e, "id": f"more-{e['id']}", "prompt": f"More {e['prompt']}"} for e in events]
            await client.post("/v1/feedback/chat", json={"events": more[:5]}, headers=ALICE)
            third = await run_ends(client, 3, 0.9, vanish=True)
            lost = [e for e in await received(5) if e.get("run", {}).get("status") == "lost"]
            assert [(e["type"], e["job_id"], e["run"]["job_id"]) for e in lost] == [
                ("policy.run.rejected", None, third)
            ]
            assert await worker.redis.exists(webhooks.log_key(""), webhooks.log_key(third)) == 0
    await worker.close()
