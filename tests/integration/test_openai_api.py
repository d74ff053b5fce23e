"""The OpenAI-compatible API driven by the official `openai` SDK alone, against a live API.

No worker here: jobs stay queued. Training through the same calls is
tests/e2e/test_openai_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import httpx2
import msgspec
import openai
import pytest
import redis
from openai.types.webhooks import FineTuningJobCancelledWebhookEvent

from service import store as store_module
from service.api.body_stream import stream_upload
from service.api.openai import jobs as openai_jobs_api
from service.api.openai.jobs import SDK_RETRY_COUNT
from service.contract import JobStatus
from service.openai import records
from service.openai.hyperparameters import auto_batch_size, auto_epochs
from service.settings import Settings
from tests.fixtures.api import LiveServer
from tests.fixtures.openai_sdk import (
    OPENAI_EXAMPLE_ROW,
    OPENAI_WEATHER_TOOL,
    jsonl,
    openai_rows,
    sdk,
)
from tests.integration.test_api_observability import drive
from tests.integration.test_upload_streaming import with_field_after
from tests.integration.test_webhooks import SECRET, Receiver, _serve

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def client(live_api: LiveServer) -> Iterator[openai.OpenAI]:
    with sdk(live_api.url) as c:
        yield c


def upload(client: openai.OpenAI, rows: list[dict[str, Any]], name: str = "train.jsonl") -> str:
    file = client.files.create(file=(name, jsonl(rows)), purpose="fine-tune")
    return client.files.wait_for_processing(file.id, poll_interval=0.1).id


def retries_taken(exc: openai.APIStatusError) -> int:
    return int(exc.response.request.headers["x-stainless-retry-count"])


def test_files_are_datasets(client: openai.OpenAI) -> None:
    rows = openai_rows(12)
    file = client.files.create(file=("my prefs [v2].jsonl", jsonl(rows)), purpose="fine-tune")
    assert file.id.startswith("ds_") and file.object == "file" and file.purpose == "fine-tune"
    assert file.status == "processed" and file.filename == "my prefs _v2_.jsonl"
    scored = client.files.create(
        file=("scored.jsonl", jsonl([{**r, "score": 1} for r in rows[:3]])), purpose="fine-tune"
    )
    assert scored.status_details is not None
    assert "column 'score' ignored in 3 rows;" in scored.status_details + ";"  # said once
    client.files.delete(scored.id)
    assert client.files.wait_for_processing(file.id, poll_interval=0.1) == file
    content = client.files.content(file.id).read()
    assert file.bytes == len(content)
    lines = [json.loads(line) for line in content.splitlines()]
    assert len(lines) == 12  # normalized, one canonical row per uploaded row
    assert (
        lines[0]["prompt"][-1]["content"] == OPENAI_EXAMPLE_ROW["input"]["messages"][0]["content"]
    )
    assert lines[0]["chosen"] == OPENAI_EXAMPLE_ROW["preferred_output"]
    assert [f.id for f in client.files.list()] == [file.id]
    assert client.files.delete(file.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)


def test_an_invalid_file_ends_in_error_with_its_lines(client: openai.OpenAI) -> None:
    rows = openai_rows(4)
    rows[2] = {**rows[2], "non_preferred_output": rows[2]["preferred_output"]}
    file = client.files.create(file=("bad.jsonl", jsonl(rows)), purpose="fine-tune")
    done = client.files.wait_for_processing(file.id, poll_interval=0.1)
    assert done.status == "error" and done.id.startswith("file_")
    assert done.status_details is not None and "line 3" in done.status_details
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [file.id]
    with pytest.raises(openai.NotFoundError, match="failed validation"):
        client.files.content(file.id)
    with pytest.raises(openai.BadRequestError, match="failed validation") as bad:
        client.fine_tuning.jobs.create(model=MODEL, training_file=file.id)
    assert bad.value.param == "training_file"
    assert client.files.delete(file.id).deleted
    assert list(client.files.list()) == []

    # Bad rows left out, as POST /v1/datasets does with on_invalid=skip, sent in extra_body.
    skip: Any = {"on_invalid": "skip", "max_invalid_fraction": "0.5"}
    kept = client.files.create(file=("ok.jsonl", jsonl(rows)), purpose="fine-tune", extra_body=skip)
    assert kept.status == "processed" and kept.id.startswith("ds_")
    assert len(client.files.content(kept.id).read().splitlines()) == 3
    # What was left out is said where an SDK user looks, not only in our dataset record.
    assert kept.status_details is not None
    assert kept.status_details.startswith(
        "processed with warnings: left out 1 invalid rows: line 3"
    )
    assert client.files.retrieve(kept.id).status_details == kept.status_details
    for field, value, said in (
        ("on_invalid", "drop", "on_invalid: Invalid enum value 'drop'"),
        ("max_invalid_fraction", "2", "max_invalid_fraction: Expected `float` <= 1.0"),
        ("expires_after", "1", "expires_after is not supported here"),
    ):
        with pytest.raises(openai.BadRequestError, match=said) as refused:
            client.files.create(
                file=("x.jsonl", jsonl(rows)), purpose="fine-tune", extra_body={field: value}
            )
        assert refused.value.param == field


def test_the_sdks_file_is_checked_as_it_arrives_and_curls_order_is_saved_first(
    client: openai.OpenAI, live_api: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK sends `purpose` (and extra_body) before the file: the file is checked as it
    arrives, with no temp file. `curl -F file=@x -F purpose=fine-tune` sends it after: that
    file is saved first, its fields then checked; a bad field after a streamed file leaves
    nothing stored."""
    streamed: list[str] = []

    async def seen(body: Any, consume: Any) -> Any:
        streamed.append(body.filename)
        return await stream_upload(body, consume)

    monkeypatch.setattr("service.api.openai.files.stream_upload", seen)
    rows = openai_rows(3)
    assert upload(client, rows, "sdk.jsonl").startswith("ds_")
    assert streamed == ["sdk.jsonl"]

    url, key = f"{live_api.url}/v1/files", {"Authorization": "Bearer key-alice"}
    request = httpx.Request("POST", url, files={"file": ("curl.jsonl", jsonl(rows))})
    form, headers = request.read(), {**key, "Content-Type": request.headers["Content-Type"]}
    after = with_field_after(form, headers, "purpose", b"fine-tune")
    resp = httpx.post(url, content=after, headers=headers)
    assert resp.status_code == 200, resp.text
    assert (resp.json()["status"], resp.json()["filename"]) == ("processed", "curl.jsonl")
    assert streamed == ["sdk.jsonl"]  # saved first: its purpose came after it
    wrong = httpx.post(
        url, content=with_field_after(form, headers, "purpose", b"batch"), headers=headers
    )
    assert wrong.status_code == 400 and "purpose must be 'fine-tune'" in wrong.text

    request = httpx.Request(
        "POST", url, data={"purpose": "fine-tune"}, files={"file": ("late.jsonl", jsonl(rows))}
    )
    form, headers = request.read(), {**key, "Content-Type": request.headers["Content-Type"]}
    late = httpx.post(
        url, content=with_field_after(form, headers, "expires_after", b"1"), headers=headers
    )
    assert late.status_code == 400 and "expires_after is not supported here" in late.text
    assert streamed[-1] == "late.jsonl"  # checked as it came, then refused for its field
    # A file read without the on_invalid that follows it is not taken as read with it.
    bad = [*rows, {**rows[0], "non_preferred_output": rows[0]["preferred_output"]}]
    request = httpx.Request(
        "POST", url, data={"purpose": "fine-tune"}, files={"file": ("bad.jsonl", jsonl(bad))}
    )
    form, headers = request.read(), {**key, "Content-Type": request.headers["Content-Type"]}
    for field, value, said in (
        ("on_invalid", b"skip", "on_invalid came after the file in the form"),
        ("foo", b"1", "foo is not supported here"),
    ):
        resp = httpx.post(
            url, content=with_field_after(form, headers, field, value), headers=headers
        )
        assert resp.status_code == 400 and said in resp.text, resp.text
    assert streamed[-2:] == ["bad.jsonl", "bad.jsonl"]
    kept = client.files.list().data
    assert len(kept) == 2  # the SDK's file and curl's: not the refused
    usage = httpx.get(f"{live_api.url}/v1/usage", headers=key).json()["limits"]
    assert {u["name"]: u["used"] for u in usage}["dataset_bytes"] == sum(f.bytes for f in kept)


def test_only_a_tenants_newest_failed_uploads_are_kept(
    client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "MAX_FAILED_UPLOADS", 2)
    kept = upload(client, openai_rows(3))
    broken = [
        client.files.create(file=(f"b{i}.jsonl", b"{not json\n"), purpose="fine-tune").id
        for i in range(4)
    ]
    assert [f.id for f in client.files.list()] == [broken[3], broken[2], kept]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(broken[0])


def test_files_page_newest_first_across_kinds(client: openai.OpenAI) -> None:
    first, second = upload(client, openai_rows(3)), upload(client, openai_rows(5))
    broken = client.files.create(file=("broken.jsonl", b"{not json\n"), purpose="fine-tune")
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == [broken.id, second] and page.has_more
    assert [f.id for f in client.files.list(limit=1)] == [broken.id, second, first]
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.create(file=("x.jsonl", jsonl(openai_rows(3))), purpose="assistants")
    assert bad.value.param == "purpose"
    # An id that is not ours is refused: listing from the start again, a client would loop.
    for foreign in ("file-abc123", "zzz"):
        with pytest.raises(openai.BadRequestError) as bad:
            client.files.list(after=foreign, limit=2)
        assert bad.value.param == "after", bad.value.body
    assert [f.id for f in client.files.list(after=second, limit=2)] == [first]
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError, match="ids start with ds_, file_ or res_"):
            call("file-abc123")


def test_auto_hyperparameters_are_resolved_and_reported(client: openai.OpenAI) -> None:
    train = upload(client, openai_rows(40))
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "n_epochs": "auto"}}},
        metadata={"team": "search"},
        suffix="first-try",
    )
    assert job.object == "fine_tuning.job" and job.status == "queued"
    assert job.organization_id == "alice" and job.training_file == train
    assert job.model == MODEL and job.metadata == {"team": "search"}
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    used = job.method.dpo.hyperparameters
    assert used.n_epochs == auto_epochs(40) and used.batch_size == auto_batch_size(40)
    raw = client.fine_tuning.jobs.with_raw_response.retrieve(job.id).http_response.json()
    assert type(raw["hyperparameters"]["n_epochs"]) is int  # as OpenAI sends it (was 3.0)
    assert used.beta == 0.1 and used.learning_rate_multiplier == 1.0
    assert job.hyperparameters.batch_size == used.batch_size and job.seed == 42
    assert job.fine_tuned_model is None and job.result_files == []
    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again == job and again.model_extra == {"suffix": "first-try"}
    # No validation_file: every row trains, as on OpenAI (no 5% held out as POST /v1/jobs does).
    ours = httpx.get(
        f"{str(client.base_url).rstrip('/')}/jobs/{job.id}",
        headers={"Authorization": f"Bearer {client.api_key}"},
    ).json()
    assert ours["spec"]["eval_fraction"] == 0.0 and ours["eval_dataset"] is None


def test_explicit_hyperparameters_and_our_options(client: openai.OpenAI) -> None:
    train, valid = upload(client, openai_rows(20)), upload(client, openai_rows(6), "valid.jsonl")
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train,
        validation_file=valid,
        hyperparameters={"batch_size": 12, "learning_rate_multiplier": 2.0, "n_epochs": 2},
        seed=7,
        extra_body={"training": {"loss_type": "ipo"}, "lora": {"r": 4}},
    )
    assert job.validation_file == valid and job.seed == 7
    assert job.hyperparameters.model_dump() == {
        "batch_size": 12,
        "learning_rate_multiplier": 2.0,
        "n_epochs": 2,
    }
    # A multiplier comes back as it was sent (it is stored as the learning rate it makes).
    for multiplier in (1.8, 0.3, 0.07):
        sent = client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=train,
            method={
                "type": "dpo",
                "dpo": {"hyperparameters": {"learning_rate_multiplier": multiplier}},
            },
        )
        assert sent.hyperparameters.learning_rate_multiplier == multiplier
        assert client.fine_tuning.jobs.retrieve(sent.id) == sent
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(
            model=MODEL, training_file=train, extra_body={"training": {"beta": 0.3}}
        )
    assert "beta" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:  # one of them would do nothing
        client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=train,
            hyperparameters={"n_epochs": 2},
            extra_body={"training": {"max_steps": 30}},
        )
    assert bad.value.param == "hyperparameters.n_epochs"  # where this body gave it
    with pytest.raises(openai.BadRequestError) as bad:  # the settings of another method
        client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=train,
            method={"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 7}}},
        )
    assert bad.value.param == "method.supervised" and "method.dpo" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.create(
            model=MODEL,
            training_file=train,
            metadata={"team": 5},  # type: ignore[dict-item]
        )
    assert bad.value.param == "metadata"  # was "metadata[...]"


def test_jobs_page_newest_first_and_filter_by_metadata(client: openai.OpenAI) -> None:
    train = upload(client, openai_rows(8))
    ids = [
        client.fine_tuning.jobs.create(
            model=MODEL, training_file=train, seed=i, metadata={"batch": str(i % 2)}
        ).id
        for i in range(5)
    ]
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[::-1][:2] and first.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == ids[::-1]  # every page
    odd = client.fine_tuning.jobs.list(metadata={"batch": "1"})
    assert [j.id for j in odd] == [ids[3], ids[1]]


def test_a_metadata_filter_past_the_per_request_scan_still_lists_every_match(
    client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our own list reads LABEL_SCAN records a request; the SDK's pages go on from their last
    item, so an empty page would end its listing: the match below six others is still found."""
    monkeypatch.setattr(store_module, "LABEL_SCAN", 2)
    train = upload(client, openai_rows(8))
    ids = [
        client.fine_tuning.jobs.create(
            model=MODEL, training_file=train, seed=i, metadata={"rare": "no" if i else "yes"}
        ).id
        for i in range(7)
    ]
    assert len(set(ids)) == 7
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"rare": "yes"})] == [ids[0]]


def test_a_metadata_filter_reads_a_bounded_number_of_jobs_a_request(
    client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter that matches nothing must not read a tenant's whole index in one request: past
    FILTER_CALLS reads it is refused, saying where to read on from."""
    monkeypatch.setattr(store_module, "LABEL_SCAN", 2)
    monkeypatch.setattr(openai_jobs_api, "FILTER_CALLS", 2)
    train = upload(client, openai_rows(8))
    ids = [
        client.fine_tuning.jobs.create(model=MODEL, training_file=train, seed=i).id
        for i in range(6)
    ]
    with pytest.raises(openai.BadRequestError, match="no job matches") as bad:
        client.fine_tuning.jobs.list(metadata={"team": "nobody"})
    assert bad.value.param == "metadata" and f"after={ids[2]}" in bad.value.message
    assert list(client.fine_tuning.jobs.list(metadata={"team": "nobody"}, after=ids[2])) == []
    many = {f"k{i}": "v" for i in range(17)}
    with pytest.raises(openai.BadRequestError, match="at most 16") as bad:
        client.fine_tuning.jobs.list(metadata=many)
    assert bad.value.param == "metadata"


class LoseFirstAnswer(httpx2.BaseTransport):
    """The requests `matching` reach the server, but the first one's answer is lost: the SDK
    sees a timeout and retries. `seen`: each one's try number and status, in order."""

    def __init__(self, matching: Callable[[httpx2.Request], bool]) -> None:
        self.inner, self.matching = httpx2.HTTPTransport(), matching
        self.seen: list[tuple[str | None, int]] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.inner.handle_request(request)
        if self.matching(request):
            self.seen.append((request.headers.get(SDK_RETRY_COUNT), response.status_code))
            if len(self.seen) == 1:
                response.read()
                raise httpx2.ReadTimeout("answer lost", request=request)
        return response


def test_a_retried_create_does_not_start_a_second_job(live_api: LiveServer) -> None:
    transport = LoseFirstAnswer(
        lambda r: r.method == "POST" and r.url.path == "/v1/fine_tuning/jobs"
    )
    with sdk(live_api.url, http_client=httpx2.Client(transport=transport)) as client:
        train = upload(client, openai_rows(4))
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
        assert len(transport.seen) == 2
        assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]


def test_the_sdks_retry_of_a_cancel_whose_answer_was_lost_gets_the_job(
    live_api: LiveServer,
) -> None:
    """The cancel worked; only its answer was lost: the retry says so rather than raising a
    ConflictError for a cancel that succeeded. A second cancel of one's own is still a 409."""
    transport = LoseFirstAnswer(lambda r: r.url.path.endswith("/cancel"))
    with sdk(live_api.url, http_client=httpx2.Client(transport=transport)) as client:
        train = upload(client, openai_rows(4))
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
        assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert transport.seen == [("0", 200), ("1", 200)]
        with pytest.raises(openai.ConflictError, match="already cancelled"):
            client.fine_tuning.jobs.cancel(job.id)


def test_errors_raise_the_sdk_classes_with_our_message(
    client: openai.OpenAI, live_api: LiveServer
) -> None:
    train = upload(client, openai_rows(4))
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"method": {"type": "reinforcement"}}, "method.type", "dpo"),
        ({"method": {"type": "supervised"}}, "training_file", "use method type 'dpo'"),
        ({"model": "gpt-4o-mini"}, "model", "OpenAI model names"),
        ({"training_file": "ds_0000nothing"}, "training_file", "does not exist"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}},
            "method.dpo.hyperparameters.beta",
            "Expected",
        ),
        ({"extra_body": {"training": {"max_length": 4}}}, "training.max_length", ">= 16"),
        ({"metadata": {"Team": "x"}}, "metadata", "'Team'.*lowercase"),
        ({"metadata": {"team": "x" * 64}}, "metadata", "length <= 63"),
        (
            {"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]},
            "integrations",
            "not supported",
        ),
    ]
    for patch, param, words in cases:
        body: dict[str, Any] = {"model": MODEL, "training_file": train, **patch}
        with pytest.raises(openai.BadRequestError, match=words) as bad:
            client.fine_tuning.jobs.create(**body)
        assert bad.value.param == param, (patch, bad.value.body)
        assert retries_taken(bad.value) == 0

    # A required field left out is named as the param, as a wrong one is.
    missing = httpx.post(
        f"{live_api.url}/v1/fine_tuning/jobs",
        json={"training_file": train},
        headers={"Authorization": "Bearer key-alice"},
    )
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "model", missing.json()

    with (
        sdk(live_api.url, key="key-nobody") as stranger,
        pytest.raises(openai.AuthenticationError, match="unknown API key"),
    ):
        stranger.fine_tuning.jobs.list()

    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
    with sdk(live_api.url, key="key-bob") as bob, pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.list_events("job_0000nothing")

    with pytest.raises(openai.ConflictError, match="live jobs") as conflict:
        client.files.delete(train)
    assert retries_taken(conflict.value) == 0
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError, match="already cancelled") as conflict:
        client.fine_tuning.jobs.cancel(job.id)
    assert retries_taken(conflict.value) == 0


def test_a_tenant_past_its_queued_job_limit_meets_rate_limit_error(api_settings: Settings) -> None:
    with LiveServer(replace(api_settings, max_queued_jobs=1)) as live, sdk(live.url) as client:
        train = upload(client, openai_rows(4))
        first = client.fine_tuning.jobs.create(model=MODEL, training_file=train, seed=1)
        with pytest.raises(openai.RateLimitError, match=r"limit \(queued_jobs\) is 1") as limited:
            client.fine_tuning.jobs.create(model=MODEL, training_file=train, seed=2)
        assert retries_taken(limited.value) == 0
        client.fine_tuning.jobs.cancel(first.id)
        client.fine_tuning.jobs.create(model=MODEL, training_file=train, seed=2)


def test_on_workers_of_two_gpus_a_batch_is_divided_between_them(api_settings: Settings) -> None:
    """OpenAI's batch_size is the examples per optimizer step; ours is per GPU."""
    with LiveServer(replace(api_settings, worker_gpus=2)) as live, sdk(live.url) as client:
        train = upload(client, openai_rows(40))
        dpo = {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=train, method=dpo)
        for shown in (job, client.fine_tuning.jobs.retrieve(job.id)):
            assert shown.method is not None and shown.method.dpo is not None
            assert shown.method.dpo.hyperparameters is not None
            assert shown.method.dpo.hyperparameters.batch_size == 8
        ours = httpx.get(
            f"{live.url}/v1/jobs/{job.id}", headers={"Authorization": "Bearer key-alice"}
        )
        hp = ours.json()["spec"]["hyperparameters"]
        assert hp["batch_size"] * hp["gradient_accumulation_steps"] == 4
        odd = {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 9}}}
        with pytest.raises(openai.BadRequestError, match="multiple of the workers' 2 GPUs") as bad:
            client.fine_tuning.jobs.create(model=MODEL, training_file=train, method=odd)
        assert bad.value.param == "method.dpo.hyperparameters.batch_size"


def test_events_of_a_queued_job(client: openai.OpenAI) -> None:
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=upload(client, openai_rows(4)))
    client.fine_tuning.jobs.cancel(job.id)
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1))
    assert [e.message for e in events] == ["Job cancelled", "Job queued"]
    assert events[0].level == "warn" and events[0].object == "fine_tuning.job.event"
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []


def test_a_jobs_webhook_is_openais_event(api_settings: Settings, tmp_path: Path) -> None:
    secrets = tmp_path / "webhook-secrets.json"
    secrets.write_text(json.dumps({"alice": SECRET}))
    settings = replace(
        api_settings,
        webhook_allow_private=True,
        webhook_backoff_seconds=0.05,
        webhook_secrets_file=secrets,
    )
    for receiver in _serve(Receiver()):
        with LiveServer(settings) as live, sdk(live.url) as client:
            job = client.fine_tuning.jobs.create(
                model=MODEL,
                training_file=upload(client, openai_rows(4)),
                extra_body={"webhook_url": receiver.url},
            )
            client.fine_tuning.jobs.cancel(job.id)
            deadline = time.monotonic() + 10
            while not receiver.requests and time.monotonic() < deadline:
                time.sleep(0.05)
        [delivery] = receiver.requests
        # The SDK's own verifier: Standard Webhooks signature, timestamp, and OpenAI's event type.
        event = client.webhooks.unwrap(delivery.body, delivery.headers, secret=SECRET)
        assert isinstance(event, FineTuningJobCancelledWebhookEvent)
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(delivery.body + b" ", delivery.headers, secret=SECRET)
        assert event.data.id == job.id and event.object == "event"
        assert delivery.headers["ftune-event-type"] == "fine_tuning.job.cancelled"


def test_supervised_jobs_train_openai_chat_files_with_sft(client: openai.OpenAI) -> None:
    chats = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Capital number {i}?"},
                {"role": "assistant", "content": f"City {i}."},
            ]
        }
        for i in range(8)
    ]
    train = upload(client, chats, "chat.jsonl")
    job = client.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    )
    assert job.method is not None and job.method.type == "supervised"
    assert job.method.supervised is not None and job.method.dpo is None
    assert job.method.supervised.hyperparameters.n_epochs == 3
    # no method named: a chat file is supervised, as on OpenAI (and as its legacy form)
    legacy = client.fine_tuning.jobs.create(
        model=MODEL, training_file=train, hyperparameters={"n_epochs": 2}
    )
    assert legacy.method is not None and legacy.method.type == "supervised"
    assert legacy.hyperparameters.n_epochs == 2
    multiplier = {"learning_rate_multiplier": 10_000}
    too_fast: Any = {"type": "supervised", "supervised": {"hyperparameters": multiplier}}
    with pytest.raises(openai.BadRequestError, match="give at most 5000") as bad:
        client.fine_tuning.jobs.create(model=MODEL, training_file=train, method=too_fast)
    assert bad.value.param == "method.supervised.hyperparameters.learning_rate_multiplier"
    # a chat file under dpo says what it needs, in the SDK's terms
    dpo = {"type": "dpo"}
    with pytest.raises(openai.BadRequestError, match="use method type 'supervised'") as bad:
        client.fine_tuning.jobs.create(model=MODEL, training_file=train, method=dpo)
    assert bad.value.param == "training_file" and "dataset_id" not in bad.value.message


def test_function_calling_chat_files_upload_as_openais_guide_writes_them(
    client: openai.OpenAI,
) -> None:
    """A tool-calling file (calls with JSON-string arguments, their results, the row's tools)
    is processed and becomes a supervised job; it was an `error` file."""
    tool = OPENAI_WEATHER_TOOL
    arguments = json.dumps({"location": "San Francisco, USA"})
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": tool["function"]["name"], "arguments": arguments},
    }
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Weather in San Francisco, take {i}?"},
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
                {"role": "assistant", "content": "It is 21 C."},
            ],
            "tools": [tool],
            "parallel_tool_calls": False,
        }
        for i in range(4)
    ]
    train = upload(client, chats, "tools.jsonl")
    stored = [json.loads(line) for line in client.files.content(train).text.splitlines()]
    assert stored[0]["tools"] == [tool]
    assert stored[0]["prompt"][1]["tool_calls"] == [
        {**call, "function": {**call["function"], "arguments": {"location": "San Francisco, USA"}}}
    ]
    assert stored[0]["prompt"][1]["weight"] == 1  # trained, as on OpenAI
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
    assert job.method is not None and job.method.type == "supervised"


def test_dpo_files_that_list_functions_keep_them(client: openai.OpenAI) -> None:
    """A DPO file whose rows list functions and prefer a call (Azure OpenAI's guide: tools in
    `input`, outputs of assistant and tool messages): stored with its tools and calls, and a
    dpo job; the tools were left out with a warning and the calls refused."""
    tool = OPENAI_WEATHER_TOOL
    arguments = json.dumps({"location": "Paris, France", "format": "celsius"})
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_current_weather", "arguments": arguments},
    }
    rows = [
        {
            "input": {
                "messages": [{"role": "user", "content": f"Weather in Paris, take {i}?"}],
                "tools": [tool],
                "parallel_tool_calls": True,
            },
            "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [call]}],
            "non_preferred_output": [{"role": "assistant", "content": "Sunny, surely."}],
        }
        for i in range(4)
    ]
    train = upload(client, rows, "dpo-tools.jsonl")
    stored = [json.loads(line) for line in client.files.content(train).text.splitlines()]
    assert stored[0]["tools"] == [tool]
    assert stored[0]["chosen"] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {**call, "function": {**call["function"], "arguments": json.loads(arguments)}}
            ],
        }
    ]
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train, method={"type": "dpo"})
    assert job.method is not None and job.method.type == "dpo"


def test_a_create_repeated_after_its_job_ended_starts_a_new_job(
    client: openai.OpenAI, live_api: LiveServer
) -> None:
    """A repeat within the retry window is a retry only while the first job lives, and only
    when it is one: the SDK's first try of a create always makes a job, as on OpenAI (the same
    config run twice, to see its variance)."""
    train = upload(client, openai_rows(4))
    first = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
    twin = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
    assert twin.id != first.id
    # The SDK's retry of that create (its answer was lost) finds the job its first try made,
    # and so does a repeat from a client that does not number its tries.
    body = {"model": MODEL, "training_file": train}
    key = {"Authorization": f"Bearer {client.api_key}"}
    for tries in ({"x-stainless-retry-count": "1"}, {}):
        again = httpx.post(f"{live_api.url}/v1/fine_tuning/jobs", json=body, headers=key | tries)
        assert again.json()["id"] == twin.id, tries
    client.fine_tuning.jobs.cancel(twin.id)
    second = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
    assert second.id not in (first.id, twin.id) and second.status == "queued"
    retried = httpx.post(
        f"{live_api.url}/v1/fine_tuning/jobs",
        json=body,
        headers=key | {"x-stainless-retry-count": "2"},
    )
    assert retried.json()["id"] == second.id
    assert [j.id for j in client.fine_tuning.jobs.list()] == [second.id, twin.id, first.id]


def test_a_running_job_is_cancelled_from_the_first_cancel(
    client: openai.OpenAI, api_settings: Settings
) -> None:
    """As on OpenAI: the cancel's answer and every read after say `cancelled` (a client
    polling for a terminal status stops), while our own view waits for the worker."""
    train = upload(client, openai_rows(4))
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train)

    async def claim() -> None:  # what a worker's claim writes
        store = store_module.Store.from_url(api_settings.redis_url)
        await store.update_job(
            job.id,
            lambda j: msgspec.structs.replace(
                j,
                status=JobStatus.running,
                progress=msgspec.structs.replace(j.progress, eta_seconds=120.0),
            ),
        )
        await store.close()

    asyncio.run(claim())
    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.estimated_finish is not None
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is None
    assert cancelled.estimated_finish is None  # no finish ahead of a cancelled job
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).estimated_finish is None
    assert [j.status for j in client.fine_tuning.jobs.list()] == ["cancelled"]
    with pytest.raises(openai.ConflictError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)
    ours = httpx.get(
        f"{str(client.base_url).rstrip('/')}/jobs/{job.id}",
        headers={"Authorization": f"Bearer {client.api_key}"},
    ).json()
    assert ours["status"] == "running" and ours["cancel_requested"] is True
    # The same body again is a new job, not the one shown cancelled.
    again = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
    assert again.id != job.id and again.status == "queued"


def test_what_this_service_lacks_answers_in_openais_envelope(
    client: openai.OpenAI, live_api: LiveServer
) -> None:
    train = upload(client, openai_rows(4))
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
    with pytest.raises(openai.BadRequestError, match="cannot be paused or resumed") as bad:
        client.fine_tuning.jobs.pause(job.id)
    assert retries_taken(bad.value) == 0
    with pytest.raises(openai.BadRequestError, match="cannot be resumed"):
        client.fine_tuning.jobs.resume(job.id)
    with sdk(live_api.url, key="key-bob") as bob, pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.pause(job.id)
    for path in (f"/fine_tuning/jobs/{job.id}/unknown", "/files/nothing/here"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.get(path, cast_to=object)
        assert missing.value.body is not None and missing.value.message  # not an empty 404
        assert isinstance(missing.value.body, dict) and missing.value.body["type"]
    # OpenAI's resources this service does not have say what to do instead.
    with pytest.raises(openai.NotFoundError, match="name the base model") as missing:
        client.models.list()
    assert retries_taken(missing.value) == 0
    with pytest.raises(openai.NotFoundError, match=r"files\.create"):
        client.uploads.create(
            bytes=10, filename="big.jsonl", mime_type="text/jsonl", purpose="fine-tune"
        )
    with pytest.raises(openai.NotFoundError, match="does not serve models"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError, match=r"jobs\.checkpoints\.list"):
        client.fine_tuning.checkpoints.permissions.list("ftckpt_1")
    with pytest.raises(openai.NotFoundError, match="no graders here"):
        client.fine_tuning.alpha.graders.validate(
            grader={
                "type": "string_check",
                "name": "g",
                "input": "a",
                "reference": "b",
                "operation": "eq",
            }
        )


def test_every_answer_carries_a_request_id(client: openai.OpenAI, live_api: LiveServer) -> None:
    raw = client.fine_tuning.jobs.with_raw_response.list()
    assert raw.request_id is not None and raw.request_id.startswith("req_")
    assert (
        raw.parse().data == []
        and client.fine_tuning.jobs.with_raw_response.list().request_id != raw.request_id
    )
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("job_0000nothing")
    assert missing.value.request_id is not None
    given = httpx.get(f"{live_api.url}/healthz", headers={"x-request-id": "edge-1f2e"}, timeout=10)
    assert given.headers["x-request-id"] == "edge-1f2e"  # a proxy's id is kept
    forged = httpx.get(
        f"{live_api.url}/healthz", headers={"x-request-id": "a b <script>" + "x" * 200}, timeout=10
    )
    assert forged.headers["x-request-id"].startswith("req_")
    for method, path in (("GET", "/v1/no-such-route"), ("DELETE", "/healthz")):  # 404, 405
        unmatched = httpx.request(method, f"{live_api.url}{path}", timeout=10)
        assert unmatched.status_code in (404, 405)
        assert unmatched.headers["x-request-id"].startswith("req_")


def test_our_other_preference_methods_are_named_not_shown_as_dpo(
    client: openai.OpenAI, live_api: LiveServer
) -> None:
    train = upload(client, openai_rows(8))
    for method in ("kto", "orpo", "simpo"):
        answer = httpx.post(
            f"{live_api.url}/v1/jobs",
            headers={"Authorization": "Bearer key-alice"},
            json={"base_model": MODEL, "dataset_id": train, "method": method},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
    shown = {j.method.type: j.method for j in client.fine_tuning.jobs.list() if j.method}
    assert set(shown) == {"kto", "orpo", "simpo"}
    simpo = shown["simpo"].model_extra or {}
    assert simpo["simpo"]["hyperparameters"]["beta"] == 2.0  # SimPO's own default
    assert shown["kto"].dpo is None


def test_result_files_list_with_their_size_read_once(
    client: openai.OpenAI, api_settings: Settings
) -> None:
    """A listing names each succeeded job's metrics CSV with its size, measured the first
    time and kept: later listings do not read the job's whole metrics stream again."""
    train = upload(client, openai_rows(8))
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train)
    client.fine_tuning.jobs.create(model=MODEL, training_file=train)  # stays queued

    async def finish() -> None:
        store = store_module.Store.from_url(api_settings.redis_url)
        await drive(store, job.id)
        await store.close()

    asyncio.run(finish())
    [listed] = client.files.list(purpose="fine-tune-results")
    [result_id] = client.fine_tuning.jobs.retrieve(job.id).result_files
    content = client.files.content(result_id).read()
    assert listed.id == result_id and listed.bytes == len(content) > 0
    with redis.Redis.from_url(api_settings.redis_url) as r:
        r.delete(store_module.metrics_key(job.id))
    assert [f.bytes for f in client.files.list(purpose="fine-tune-results")] == [len(content)]
    assert client.files.retrieve(result_id).bytes == len(content)  # what wait_for_processing polls
