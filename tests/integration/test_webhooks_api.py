"""Webhooks through the running API: a job cancelled over HTTP is delivered, signed, by the
API's own delivery loop (needs the wiring in app.py, store.py and settings.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import redis.asyncio as aioredis
from litestar.testing import AsyncTestClient
from standardwebhooks import Webhook

from service import webhooks
from service.api.app import create_app
from service.contract import WebhookDelivery
from service.settings import Settings
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
