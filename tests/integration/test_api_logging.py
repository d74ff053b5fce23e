"""`ftune api` logs JSON, access log included, and no credential a request carried reaches a
log line or a response: not a key in a query string, not a webhook URL's userinfo or token."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import redis

from service.settings import Settings
from tests.fixtures.api import ALICE, ApiProcess
from tests.integration.test_api_datasets import ROW, jsonl

SECRETS = ("query-key-0123456789", "hookpass-0123456789", "hook-token-0123456789")
WEBHOOK = (
    "https://hookuser:hookpass-0123456789@93.184.216.34/hooks/ftune"
    "?token=hook-token-0123456789&team=search"
)


def test_no_credential_reaches_a_log_line_or_a_response(
    api_settings: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "api.log"
    answers: list[str] = []
    with ApiProcess(api_settings, log) as api, httpx.Client(base_url=api.url) as http:

        def call(method: str, url: str, **kwargs: object) -> httpx.Response:
            resp = http.request(method, url, **kwargs)  # type: ignore[arg-type]
            answers.append(resp.text + str(resp.headers))
            return resp

        assert call("GET", "/v1/jobs?api_key=query-key-0123456789", headers=ALICE).is_success
        assert call("GET", "/healthz?access_token=query-key-0123456789").is_success
        assert call("GET", "/v1/datasets?key=query-key-0123456789").status_code == 401
        ds = call(
            "POST",
            "/v1/datasets",
            content=jsonl(ROW),
            headers={**ALICE, "Content-Type": "application/x-ndjson"},
        ).json()
        body = {"base_model": "org/model", "dataset_id": ds["id"], "webhook_url": WEBHOOK}
        created = call("POST", "/v1/jobs", json=body, headers=ALICE)
        assert created.status_code == 201, created.text
        job = created.json()
        shown = "https://hookuser:[REDACTED]@93.184.216.34/hooks/ftune?token=[REDACTED]&team=search"
        assert job["spec"]["webhook_url"] == shown
        assert (
            call("GET", f"/v1/jobs/{job['id']}", headers=ALICE).json()["spec"]["webhook_url"]
            == shown
        )
        call("GET", "/v1/jobs", headers=ALICE)
        call("POST", f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
        bad = call(
            "POST",
            "/v1/jobs",
            json={**body, "webhook_url": "ftp://u:hookpass-0123456789@x"},
            headers=ALICE,
        )
        assert bad.status_code == 422
    # The record keeps the URL whole: the delivery needs it.
    stored = redis.Redis.from_url(api_settings.redis_url).get(f"ftune:job:{job['id']}")
    assert stored is not None and WEBHOOK.encode() in stored

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    access = [line["msg"] for line in lines if line["logger"] == "uvicorn.access"]
    assert any('"GET /v1/jobs?api_key=[REDACTED] HTTP/1.1" 200' in m for m in access), access
    assert any("/healthz?access_token=[REDACTED]" in m for m in access), access
    assert any(line["logger"] == "ftune.api" for line in lines)  # ours and uvicorn's, as JSON
    text = log.read_text() + "".join(answers)
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, leaked
