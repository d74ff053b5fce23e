"""Webhooks against a real receiver on loopback and a real Redis: signed (verified the way a
receiver would, with the `standardwebhooks` library), retried, recorded, and never sent to a
private address unless the operator allows it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from standardwebhooks import Webhook, WebhookVerificationError

from service import webhooks
from service.contract import (
    Artifact,
    DatasetRef,
    Job,
    JobError,
    JobSpec,
    JobStatus,
    Phase,
    WebhookEvent,
)
from service.dev.localredis import free_port
from service.webhooks import WebhookConfig, check_url, delivery
from tests.fixtures.api import ALICE, Api


def secret(name: str) -> str:
    """A Standard Webhooks secret: whsec_ and the base64 of a 32-byte key."""
    return "whsec_" + base64.b64encode(name.encode().ljust(32, b".")).decode()


SECRET = secret("alice")
ROOT = Path(__file__).resolve().parents[2]
FAST = WebhookConfig(backoff_seconds=0.05, poll_seconds=0.02, allow_private=True)


# -- a receiver ---------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """An HTTP endpoint answering the given status codes in turn (the last one repeats)."""

    codes: list[int] = field(default_factory=lambda: [200])
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/ftune"


def _serve(state: Receiver, tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(Received(dict(self.headers.items()), body, time.time()))
            code = state.codes[min(len(state.requests), len(state.codes)) - 1]
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from _serve(Receiver())


def _certificate(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for the name `localhost` only (no IP address in it):
    (server context, client context trusting it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, ssl.create_default_context(cadata=pem.decode())


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def finished_job(url: str | None, status: JobStatus = JobStatus.succeeded) -> Job:
    now = time.time()
    return Job(
        id=f"job_{int(now * 1000):012x}abcdef012345",
        tenant="alice",
        status=status,
        spec=JobSpec(
            base_model="org/model", dataset_id="ds_1", webhook_url=url, labels={"team": "search"}
        ),
        dataset=DatasetRef(id="ds_1", sha256="0" * 64, rows=4, format="standard"),
        created_at=now - 60,
        updated_at=now,
        finished_at=now,
        attempt=1,
        latest_metrics={"loss": 0.25, "rewards/accuracies": 1.0},
        artifacts=[Artifact(kind="adapter", uri="s3://b/p/", files=["a"], sha256={"a": "1" * 64})]
        if status == JobStatus.succeeded
        else [],
        error=JobError(type="OutOfMemory", message="lower batch_size", phase=Phase.training)
        if status == JobStatus.failed
        else None,
    )


async def wait_for(r: Any, job_id: str, n: int, timeout: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = await webhooks.delivery_log(r, job_id)
        if len(log) >= n and (log[-1].ok or log[-1].next_attempt_at is None):
            return log
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {await webhooks.delivery_log(r, job_id)} after {timeout} s")


# -- delivery -----------------------------------------------------------------------------


async def test_signed_delivery_retried_until_the_receiver_answers_2xx(
    r: Any, receiver: Receiver
) -> None:
    receiver.codes = [500, 500, 200]
    job = finished_job(receiver.url)
    assert await webhooks.enqueue_webhook(r, job) is True
    config = dataclasses.replace(FAST, secrets={"alice": (SECRET,)})
    async with webhooks.delivering(r, config):
        log = await wait_for(r, job.id, 3)

    assert [(a.attempt, a.status_code, a.ok) for a in log] == [
        (1, 500, False),
        (2, 500, False),
        (3, 200, True),
    ]
    assert log[0].error == "HTTP 500"
    assert all(a.next_attempt_at for a in log[:2]) and log[2].next_attempt_at is None
    # The backoff doubles: 0.05 s, then 0.1 s.
    gaps = [b.at - a.at for a, b in zip(receiver.requests, receiver.requests[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1

    assert len(receiver.requests) == 3
    first = receiver.requests[0]
    assert {q.body for q in receiver.requests} == {first.body}  # one event, the same body
    assert {q.headers["webhook-id"] for q in receiver.requests} == {log[0].event_id}
    for q in receiver.requests:
        # Each attempt is signed when it is sent, so a retry hours later still verifies. The
        # header is in whole seconds (truncated): it trails the arrival by less than 1 s plus
        # the delivery's own time, which a loaded machine stretches.
        assert -1 <= q.at - int(q.headers["webhook-timestamp"]) < 2
        assert Webhook(SECRET).verify(q.body, q.headers)["id"] == log[0].event_id
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            Webhook(secret("bob")).verify(q.body, q.headers)
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            Webhook(SECRET).verify(q.body.replace(b"succeeded", b"cancelled"), q.headers)
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            Webhook(SECRET).verify(q.body, {**q.headers, "webhook-id": "evt_other"})
    assert first.headers["Content-Type"] == "application/json"
    event = json.loads(first.body)
    assert event["type"] == "job.succeeded" and event["status"] == "succeeded"
    assert event["job_id"] == job.id and event["id"] == log[0].event_id
    assert event["data"]["latest_metrics"] == {"loss": 0.25, "rewards/accuracies": 1.0}
    assert event["data"]["artifacts"][0]["uri"] == "s3://b/p/"
    assert event["data"]["attempt"] == 1 and event["data"]["labels"] == {"team": "search"}
    assert set(event["data"]) == {
        "status",
        "error",
        "artifacts",
        "latest_metrics",
        "finished_at",
        "attempt",
        "labels",
    }

    # Delivered: nothing is due, and enqueueing the same event again does nothing.
    assert await r.zcard(webhooks.DUE) == 0
    assert await webhooks.enqueue_webhook(r, job) is False
    assert await webhooks.deliver_due(r, FAST) == []
    assert len(receiver.requests) == 3


async def test_gives_up_after_max_attempts(r: Any, receiver: Receiver) -> None:
    receiver.codes = [503]
    job = finished_job(receiver.url, JobStatus.failed)
    await webhooks.enqueue_webhook(r, job)
    config = WebhookConfig(max_attempts=3, backoff_seconds=0, allow_private=True)
    for _ in range(5):
        await webhooks.deliver_due(r, config)
    log = await webhooks.delivery_log(r, job.id)
    assert [a.status_code for a in log] == [503, 503, 503]
    assert log[-1].next_attempt_at is None and not log[-1].ok
    assert len(receiver.requests) == 3 and await r.zcard(webhooks.DUE) == 0
    event = json.loads(receiver.requests[0].body)
    assert event["type"] == "job.failed"
    assert event["data"]["error"] == {
        "type": "OutOfMemory",
        "message": "lower batch_size",
        "phase": "training",
    }
    # No secret for the tenant: still delivered, with its id and time, without a signature.
    headers = receiver.requests[0].headers
    assert headers["webhook-id"] == log[0].event_id and "webhook-timestamp" in headers
    assert "webhook-signature" not in headers


async def test_network_errors_are_recorded_and_retried(r: Any) -> None:
    job = finished_job(f"http://127.0.0.1:{free_port()}/nobody-listens")
    await webhooks.enqueue_webhook(r, job)
    [attempt] = await webhooks.deliver_due(r, WebhookConfig(allow_private=True))
    assert not attempt.ok and attempt.status_code is None
    assert attempt.error is not None and attempt.error.startswith("ConnectError")
    assert attempt.next_attempt_at is not None
    assert await r.zscore(webhooks.DUE, attempt.event_id) == pytest.approx(attempt.next_attempt_at)


async def test_private_address_refused_again_at_delivery(r: Any, receiver: Receiver) -> None:
    """A URL that passed at submit but now resolves privately (DNS rebinding, or the policy
    changed) is never contacted, and not retried."""
    job = finished_job(receiver.url)
    await webhooks.enqueue_webhook(r, job)
    [attempt] = await webhooks.deliver_due(r, WebhookConfig(allow_private=False))
    assert receiver.requests == []
    assert attempt.error is not None and "host '127.0.0.1' is a loopback address" in attempt.error
    assert attempt.next_attempt_at is None and await r.zcard(webhooks.DUE) == 0


async def test_connects_to_the_checked_address_but_keeps_the_host_name(
    r: Any, receiver: Receiver
) -> None:
    job = finished_job(f"http://localhost:{receiver.port}/hook?x=1")
    await webhooks.enqueue_webhook(r, job)
    [attempt] = await webhooks.deliver_due(r, WebhookConfig(allow_private=True))
    assert attempt.ok, attempt
    assert receiver.requests[0].headers["Host"] == f"localhost:{receiver.port}"


async def test_https_to_a_pinned_address_still_checks_the_certificate_name(
    r: Any, tmp_path: Path
) -> None:
    """The connection goes to the checked IP, yet TLS sends SNI and verifies `localhost`
    (the certificate holds no IP address, so verifying against the IP would fail)."""
    server_tls, client_tls = _certificate(tmp_path)
    for state in _serve(Receiver(), server_tls):
        job = finished_job(f"https://localhost:{state.port}/hook")
        await webhooks.enqueue_webhook(r, job)
        [attempt] = await webhooks.deliver_due(
            r, WebhookConfig(allow_private=True, verify=client_tls)
        )
        assert attempt.ok, attempt
        assert state.requests[0].headers["Host"] == f"localhost:{state.port}"
        # Without trusting the certificate, the attempt fails (and will be retried).
        job2 = finished_job(f"https://localhost:{state.port}/hook", JobStatus.failed)
        await webhooks.enqueue_webhook(r, job2)
        [refused] = await webhooks.deliver_due(r, WebhookConfig(allow_private=True))
        assert not refused.ok and "CERTIFICATE_VERIFY_FAILED" in (refused.error or "")
        assert refused.next_attempt_at is not None


async def test_a_claimed_event_whose_sender_died_is_sent_again(r: Any, receiver: Receiver) -> None:
    job = finished_job(receiver.url)
    await webhooks.enqueue_webhook(r, job)
    eid = webhooks.event_id(job.id, job.status)
    # A replica claims the event (pushes its due time forward by the claim) and then dies.
    config = WebhookConfig(allow_private=True, claim_seconds=0.2)
    claimed = await delivery._claim(r, config, 16, Counter())
    assert claimed == [(eid, job.tenant)]
    assert await webhooks.deliver_due(r, config) == []  # claimed: nobody else sends it
    await asyncio.sleep(0.25)
    [attempt] = await webhooks.deliver_due(r, config)
    assert attempt.ok and len(receiver.requests) == 1


async def test_stage_webhook_commits_with_the_status_change(r: Any) -> None:
    job = finished_job("https://hooks.example.com/x", JobStatus.cancelled)
    async with r.pipeline(transaction=True) as pipe:
        pipe.multi()
        pipe.set("ftune:test:status", "cancelled")
        webhooks.stage_webhook(pipe, job)
        webhooks.stage_webhook(pipe, finished_job(None))  # no URL: nothing staged
        await pipe.execute()
    eid = webhooks.event_id(job.id, JobStatus.cancelled)
    assert await r.zrange(webhooks.DUE, 0, -1) == [eid.encode()]
    body = await r.hget(webhooks.event_key(eid), "body")
    event = msgspec.json.decode(body, type=WebhookEvent)
    assert event.type == "job.cancelled" and event.status == JobStatus.cancelled


def test_enqueue_refuses_a_job_that_has_not_ended() -> None:
    job = msgspec.structs.replace(finished_job("https://x.example/"), status=JobStatus.running)
    with pytest.raises(ValueError, match="running, not finished"):
        webhooks.build_event(job)


# -- signatures ---------------------------------------------------------------------------


async def test_while_rotating_either_secret_verifies(r: Any, receiver: Receiver) -> None:
    new, old = secret("alice-2026"), secret("alice-2025")
    job = finished_job(receiver.url)
    await webhooks.enqueue_webhook(r, job)
    config = WebhookConfig(allow_private=True, secrets={"alice": (new, old)})
    [attempt] = await webhooks.deliver_due(r, config)
    assert attempt.ok, attempt
    [q] = receiver.requests
    assert len(q.headers["webhook-signature"].split(" ")) == 2
    assert Webhook(new).verify(q.body, q.headers)["job_id"] == job.id
    assert Webhook(old).verify(q.body, q.headers)["job_id"] == job.id
    with pytest.raises(WebhookVerificationError):
        Webhook(secret("mallory")).verify(q.body, q.headers)


async def test_a_stale_delivery_is_refused_by_the_receiver(
    r: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent by a clock 6 minutes behind, which is what a delivery captured and replayed
    6 minutes later looks like: the signature matches, the timestamp is too old."""
    real = time.time
    with monkeypatch.context() as clock:
        clock.setattr(time, "time", lambda: real() - 360)
        job = finished_job(receiver.url)
        await webhooks.enqueue_webhook(r, job)
        config = WebhookConfig(allow_private=True, secrets={"alice": (SECRET,)})
        [attempt] = await webhooks.deliver_due(r, config)
    assert attempt.ok, attempt
    [q] = receiver.requests
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(q.body, q.headers)
    # Moving the timestamp forward breaks the signature instead.
    fresh = {**q.headers, "webhook-timestamp": str(int(real()))}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET).verify(q.body, fresh)


def readme_receiver() -> str:
    """The receiver example in the README's Webhooks section."""
    section = (ROOT / "README.md").read_text().split("### Webhooks\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_receiver_accepts_a_delivery_and_refuses_a_forgery(r: Any) -> None:
    port = free_port()
    env = {**os.environ, "FTUNE_WEBHOOK_SECRET": SECRET, "PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-c", readme_receiver()], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no receiver"
                await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{port}/hooks/ftune"
        job = finished_job(url)
        await webhooks.enqueue_webhook(r, job)
        signed = WebhookConfig(allow_private=True, secrets={"alice": (SECRET,)})
        [accepted] = await webhooks.deliver_due(r, signed)
        forger = WebhookConfig(allow_private=True, secrets={"alice": (secret("mallory"),)})
        await webhooks.enqueue_webhook(r, finished_job(url, JobStatus.failed))
        [refused] = await webhooks.deliver_due(r, forger)
    finally:
        proc.terminate()
        printed = proc.communicate(timeout=10)[0]
    assert (accepted.status_code, refused.status_code) == (204, 400)
    assert printed.split() == [accepted.event_id, "job.succeeded", job.id]


def test_secrets_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    rotating = [secret("bob-new"), secret("bob-old")]
    path.write_text(json.dumps({"alice": SECRET, "bob": rotating}))
    assert webhooks.load_secrets(path) == {"alice": (SECRET,), "bob": tuple(rotating)}
    assert webhooks.load_secrets(None) == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("plain-text-secret-0123456789", "secret 1 of 1 does not start with 'whsec_'"),
        ("whsec_alice_0123456789abcdef", "secret 1 of 1 is not standard base64"),
        ("whsec_" + base64.b64encode(b"k" * 16).decode(), "decodes to 16 bytes, not 24 to 64"),
        ("whsec_" + base64.b64encode(b"k" * 65).decode(), "decodes to 65 bytes, not 24 to 64"),
        (["whsec_" + base64.b64encode(b"k" * 32).decode(), "whsec_c2hvcnQ="], "secret 2 of 2"),
        ([], "tenant 'alice' has no secret"),
    ],
)
def test_a_bad_secret_stops_start_up_with_a_message(
    tmp_path: Path, value: str | list[str], message: str
) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"alice": value}))
    with pytest.raises(ValueError, match="webhook secrets file") as info:
        webhooks.load_secrets(path)
    text = str(info.value)
    assert message in text
    if value:
        assert "tenant 'alice'" in text and "token_bytes(32)" in text  # says how to make one
    for given in [value] if isinstance(value, str) else value:
        assert given.removeprefix("whsec_") not in text  # never echoes a secret


# -- address checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1/h", "host '127.0.0.1' is a loopback address"),
        ("http://127.1.2.3:8080/h", "is a loopback address"),
        ("http://2130706433/h", "resolves to 127.0.0.1, a loopback address"),
        ("http://localhost:8000/h", "'localhost' is a loopback name"),
        ("http://api.localhost/h", "is a loopback name"),
        ("http://[::1]/h", "host '::1' is a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "is a link-local address"),
        ("http://[fe80::1]/h", "is a link-local address"),
        ("http://10.1.2.3/h", "is a private address"),
        ("http://172.16.0.1/h", "is a private address"),
        ("https://192.168.1.10/h", "is a private address"),
        ("http://[fd00::1]/h", "is a private address"),
        ("http://224.0.0.1/h", "is a multicast address"),
        ("http://0.0.0.0/h", "the unspecified address"),
        ("http://240.0.0.1/h", "is a reserved address"),
        ("http://100.64.0.1/h", "is not a public address"),
        ("http://[::ffff:127.0.0.1]/h", "loopback address (embedded in ::ffff:7f00:1)"),
        ("http://[2002:a00:1::]/h", "private address (embedded in 2002:a00:1::)"),
    ],
)
def test_non_public_webhook_hosts_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="FTUNE_WEBHOOK_ALLOW_PRIVATE=true") as info:
        check_url(url, allow_private=False)
    assert message in str(info.value)


def test_public_hosts_pass_and_the_operator_can_allow_private_ones() -> None:
    check_url("https://93.184.215.14/hooks", allow_private=False)
    check_url("http://[2606:4700::1111]:8443/hooks", allow_private=False)
    check_url("http://127.0.0.1:9/h", allow_private=True)
    check_url("http://localhost/h", allow_private=True)


def test_unresolvable_and_malformed_urls_are_refused() -> None:
    with pytest.raises(webhooks.UnresolvableHost, match=r"'nowhere\.invalid' does not resolve"):
        check_url("https://nowhere.invalid/h", allow_private=False)
    with pytest.raises(ValueError, match="must be http:// or https://"):
        check_url("ftp://93.184.215.14/h", allow_private=False)
    with pytest.raises(ValueError, match="not a valid URL"):
        check_url("http://93.184.215.14:99999/h", allow_private=False)


# -- through the API ----------------------------------------------------------------------


async def test_submit_refuses_a_loopback_webhook_with_422(api: Api) -> None:
    ds = await api.client.post(
        "/v1/datasets",
        content=b'{"prompt": "q", "chosen": "a.", "rejected": "b b."}\n',
        params={"name": "d"},
        headers={**ALICE, "Content-Type": "application/x-ndjson"},
    )
    assert ds.status_code == 201, ds.text
    spec = {"base_model": "org/model", "dataset_id": ds.json()["id"]}
    resp = await api.client.post(
        "/v1/jobs", json={**spec, "webhook_url": "http://127.0.0.1:8080/hook"}, headers=ALICE
    )
    assert resp.status_code == 422, resp.text
    problem = resp.json()
    assert problem["errors"][0]["loc"] == ["body", "webhook_url"]
    assert "loopback address" in problem["detail"]
    assert "FTUNE_WEBHOOK_ALLOW_PRIVATE=true" in problem["detail"]
    ok = await api.client.post(
        "/v1/jobs", json={**spec, "webhook_url": "https://93.184.215.14/hook"}, headers=ALICE
    )
    assert ok.status_code == 201, ok.text


async def test_a_tenant_whose_receivers_hang_does_not_hold_up_the_others(
    r: Any, receiver: Receiver
) -> None:
    """Bob's receivers never answer: his events hold at most per_tenant slots, each only for
    its own timeout, and Alice's event goes out at once behind a backlog of 120 of his (it
    waited for whole passes of timeouts, then for a pass per few of his events put back)."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)  # accepts, never answers
    slow = f"http://127.0.0.1:{hang.getsockname()[1]}/hook"
    try:
        for i in range(120):
            job = msgspec.structs.replace(
                finished_job(slow), id=f"job_{i:012x}b0b0b0b0b0b0", tenant="bob"
            )
            await webhooks.enqueue_webhook(r, job)
        await asyncio.sleep(0.01)  # Alice's event is due after all of Bob's
        alice = finished_job(receiver.url)
        await webhooks.enqueue_webhook(r, alice)
        config = dataclasses.replace(
            FAST, batch=4, per_tenant=2, timeout_seconds=3.0, backoff_seconds=60, poll_seconds=0.25
        )
        started = time.monotonic()
        async with webhooks.delivering(r, config):
            await wait_for(r, alice.id, 1, timeout=10)
            took = time.monotonic() - started
        assert took < 1.5, f"Alice's webhook waited {took:.1f} s behind Bob's"
        assert len(receiver.requests) == 1
        # Bob's events were not dropped: put back or in flight, each still due.
        assert await r.zcard(webhooks.DUE) == 120
    finally:
        hang.close()
