"""Hostile input is a 4xx that says what is wrong, never a 500 nor a stored record: JSON nested
past any row, malformed multipart forms and event ids, names that end in a newline."""

from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis

from service.store import events_key
from tests.fixtures.api import ADMIN, ALICE, Api, LiveServer
from tests.integration.test_api_datasets import ROW, jsonl, stored_nothing, upload
from tests.integration.test_api_jobs import dataset, spec

DEEP = b"[" * 5000 + b"]" * 5000
NDJSON = {"Content-Type": "application/x-ndjson"}


async def test_a_row_nested_thousands_deep_is_a_row_error(api: Api) -> None:
    row = b'{"prompt": ' + DEEP + b', "chosen": "a", "rejected": "b"}\n'
    resp = await upload(api, jsonl(ROW) + row)
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"] == [
        {"line": 2, "msg": "line 2 is JSON nested too deeply to be a row"}
    ]
    assert stored_nothing(api)


async def test_a_request_body_nested_thousands_deep_is_a_400(api: Api) -> None:
    body = b'{"base_model": "org/m", "dataset_id": "ds_x", "labels": ' + DEEP + b"}"
    resp = await api.client.post(
        "/v1/jobs", content=body, headers={**ALICE, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    assert "nested too deeply" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"source": ', "the request body is not valid JSON: input data was truncated"),
        (b'{"source": "s3://b/k",}', "the request body is not valid JSON: trailing comma in "),
    ],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/datasets/import", "/v1/jobs/estimate"])
async def test_a_json_body_that_is_not_json_says_so_at_the_body(
    api: Api, path: str, body: bytes, detail: str
) -> None:
    resp = await api.client.post(
        path, content=body, headers={**ALICE, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["detail"].startswith(detail)
    assert resp.json()["errors"] == [{"msg": resp.json()["detail"], "loc": ["body"]}]


@pytest.mark.parametrize(
    "path",
    ["/v1/jobs", "/v1/jobs/estimate", "/v1/fine_tuning/jobs", "/v1/datasets/import"],
)
async def test_a_json_body_that_is_not_utf8_is_a_400(api: Api, path: str) -> None:
    body = b'{"base_model": "org/m", "dataset_id": "ds_\xff"}'
    resp = await api.client.post(
        path, content=body, headers={**ALICE, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400, resp.text
    assert "not UTF-8" in resp.text


async def test_a_console_name_no_file_can_have_is_a_404(api: Api) -> None:
    for name in ("x" * 255, "x" * 256, "a/" + "y" * 300 + "/b.js"):
        assert (await api.client.get(f"/ui/{name}")).status_code == 404


def form(*parts: bytes, boundary: str = "b0und") -> tuple[bytes, dict[str, str]]:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, {**ALICE, "Content-Type": f"multipart/form-data; boundary={boundary}"}


FILE = b'Content-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n' + jsonl(ROW)


@pytest.mark.parametrize(
    "body",
    [
        b"--b0und\r\nthis is no header\r\n\r\nx\r\n--b0und--\r\n",
        b"--b0und\r\n" + FILE[:40],  # cut inside a part header
        b"".join([b"--b0und\r\nContent-Disposition: form-data; name=f\r\n\r\nx\r\n"] * 20)
        + b"--b0und\r\n"
        + FILE
        + b"\r\n--b0und--\r\n",  # more parts than a form of one file has
    ],
    ids=["bad-header", "truncated", "too-many-parts"],
)
async def test_a_malformed_multipart_body_is_a_400(api: Api, body: bytes) -> None:
    _, headers = form()
    resp = await api.client.post("/v1/datasets", content=body, headers=headers)
    assert resp.status_code == 400, resp.text
    assert "multipart" in resp.json()["detail"]
    assert stored_nothing(api)


async def test_every_part_of_a_form_counts_against_the_size_limit(api: Api) -> None:
    limit = api.settings.max_dataset_bytes
    field = b'Content-Disposition: form-data; name="purpose"\r\n\r\n' + b"x" * 4000
    body, headers = form(*[field] * 14, FILE)  # short fields: within the form's allowance
    resp = await api.client.post("/v1/datasets", content=body, headers=headers)
    assert resp.status_code == 201, resp.text
    # A tiny dataset file, but the form carries more than the limit in another part.
    pad = b'Content-Disposition: form-data; name="f"; filename="pad.bin"\r\n\r\n'
    body, headers = form(FILE, pad + b"y" * (limit + 64 * 1024))
    resp = await api.client.post("/v1/datasets", content=body, headers=headers)
    assert resp.status_code == 413, resp.text  # refused from its Content-Length


async def test_a_json_body_past_the_request_limit_says_the_limit(api: Api) -> None:
    events = [
        {"id": str(i), "prompt": "p" * 2000, "chosen": "a", "rejected": "b"} for i in range(600)
    ]
    resp = await api.client.post("/v1/feedback/big", json={"events": events}, headers=ALICE)
    assert resp.status_code == 413, resp.text
    assert "larger than 1,048,576 bytes" in resp.json()["detail"]
    assert "smaller batches" in resp.json()["detail"]


def test_a_chunked_form_is_counted_as_it_streams_in(live_api: LiveServer) -> None:
    """No Content-Length to refuse it by: the parts are counted as they arrive."""
    pad = b'Content-Disposition: form-data; name="f"; filename="pad.bin"\r\n\r\n'
    body, headers = form(FILE, pad + b"y" * (2 * 1024 * 1024))
    chunks = (body[at : at + 65536] for at in range(0, len(body), 65536))
    resp = httpx.post(f"{live_api.url}/v1/datasets", content=chunks, headers=headers)
    assert resp.status_code == 413, resp.text
    assert "the form is over the limit" in resp.json()["detail"]


@pytest.mark.parametrize("value", ["garbage", "1-", "-1", "99999999999999999999-0", "1-1-1"])
async def test_a_malformed_last_event_id_is_a_400(api: Api, value: str) -> None:
    job = await api.client.post("/v1/jobs", json=spec(await dataset(api)), headers=ALICE)
    resp = await api.client.get(
        f"/v1/jobs/{job.json()['id']}/events", headers={**ALICE, "Last-Event-ID": value}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["errors"][0]["loc"] == ["header", "Last-Event-ID"]


async def test_a_last_event_id_past_the_newest_event_is_a_400(api: Api) -> None:
    """Such an id was never sent: a follower after it would miss the terminal event and hold
    one of the tenant's event streams for good."""
    job = (await api.client.post("/v1/jobs", json=spec(await dataset(api)), headers=ALICE)).json()
    url = f"/v1/jobs/{job['id']}/events"
    newest = await _newest_event(api, job["id"])
    ms, _, seq = newest.partition("-")
    for ahead in (f"{ms}-{int(seq) + 1}", f"{int(ms) + 1}-0"):
        resp = await api.client.get(url, headers={**ALICE, "Last-Event-ID": ahead})
        assert resp.status_code == 400, resp.text
        assert resp.json()["errors"][0]["loc"] == ["header", "Last-Event-ID"]
        assert newest in resp.json()["detail"]
    cancelled = await api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
    assert cancelled.status_code == 202, cancelled.text
    # Resuming after the newest event (here the cancellation) is still what it was.
    newest = await _newest_event(api, job["id"])
    resp = await api.client.get(url, headers={**ALICE, "Last-Event-ID": newest})
    assert resp.status_code == 200, resp.text


async def _newest_event(api: Api, job_id: str) -> str:
    async with Redis.from_url(api.settings.redis_url) as redis:
        newest = await redis.xrevrange(events_key(job_id), count=1)
    return str(newest[0][0].decode())


@pytest.mark.parametrize("value", ["99999999999999999999-0", "1-0\n"])
async def test_an_audit_cursor_redis_cannot_read_is_a_400(api: Api, value: str) -> None:
    await api.client.get("/v1/jobs", headers=ADMIN)  # one audited request
    resp = await api.client.get("/v1/audit", params={"cursor": value}, headers=ADMIN)
    assert resp.status_code == 400, resp.text
    assert resp.json()["errors"][0]["loc"] == ["query", "cursor"]


async def test_a_query_parameter_out_of_bounds_is_located_in_the_query(api: Api) -> None:
    resp = await api.client.get("/v1/jobs", params={"limit": "0"}, headers=ALICE)
    assert resp.status_code == 400, resp.text
    assert resp.json()["errors"][0]["loc"] == ["query", "limit"]


async def test_names_labels_and_models_ending_in_a_newline_are_refused(api: Api) -> None:
    resp = await upload(api, jsonl(ROW), name="mine\n")
    assert resp.status_code == 400, resp.text
    ds = await dataset(api)
    for field, value in [
        ("labels", {"team\n": "a"}),
        ("base_model", "org/model\n"),
        ("dataset_id", ds + "\n"),
    ]:
        resp = await api.client.post("/v1/jobs", json={**spec(ds), field: value}, headers=ALICE)
        assert resp.status_code == 422, (field, value, resp.text)
    resp = await api.client.get("/v1/feedback/chat%0A", headers=ALICE)
    assert resp.status_code in (400, 422), resp.text
    assert resp.json()["errors"][0]["loc"][-1] == "stream"


async def test_an_id_naming_another_key_of_its_record_is_not_found(api: Api) -> None:
    """`ds_...:jobs` is no dataset's id, but its key is the dataset's set of live jobs (a
    GET of it was Redis's WRONGTYPE, a 500): every way in answers as for a missing id."""
    ds = await dataset(api)
    job = (await api.client.post("/v1/jobs", json=spec(ds), headers=ALICE)).json()
    alias = f"{ds}:jobs"  # exists while the job is live
    for method, path in [
        ("GET", f"/v1/datasets/{alias}"),
        ("GET", f"/v1/datasets/{alias}/rows"),
        ("DELETE", f"/v1/datasets/{alias}"),
        ("GET", f"/v1/files/{alias}"),
        ("GET", f"/v1/files/{alias}/content"),
        ("GET", f"/v1/jobs/{job['id']}:x"),
        ("POST", f"/v1/jobs/{job['id']}:x/cancel"),
    ]:
        answer = await api.client.request(method, path, headers=ALICE)
        assert answer.status_code == 404, (method, path, answer.text)
    submit = await api.client.post("/v1/jobs", json=spec(alias), headers=ALICE)
    assert submit.status_code == 422 and "dataset_id" in submit.text, submit.text
    fine_tune = await api.client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "training_file": alias},
        headers=ALICE,
    )
    assert 400 <= fine_tune.status_code < 500, fine_tune.text


async def test_an_unknown_field_is_located_at_itself(api: Api) -> None:
    """Not at `body.data` (the handler's parameter): at the field a client mistyped."""
    for body, loc in (
        ({"base_model": "org/m", "dataset_id": "ds_x", "foo": 1}, ["body", "foo"]),
        (
            {"base_model": "org/m", "dataset_id": "ds_x", "hyperparameters": {"lr": 1}},
            ["body", "hyperparameters", "lr"],
        ),
    ):
        resp = await api.client.post("/v1/jobs", json=body, headers=ALICE)
        assert resp.status_code == 422, resp.text
        assert resp.json()["errors"][0]["loc"] == loc, resp.json()
        assert resp.json()["detail"].startswith(".".join(loc) + ": Object contains unknown field")
    resp = await api.client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "org/m", "training_file": "ds_x", "foo": 1},
        headers=ALICE,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "foo", resp.json()


async def test_a_missing_field_is_located_at_itself(api: Api) -> None:
    """Not at the object that lacks it: at the field a client has to add."""
    for body, loc in (
        ({"dataset_id": "ds_x"}, ["body", "base_model"]),
        (
            {
                "base_model": "org/m",
                "dataset_id": "ds_x",
                "output": {"destination": {"type": "hub"}},
            },
            ["body", "output", "destination", "repo_id"],
        ),
    ):
        resp = await api.client.post("/v1/jobs", json=body, headers=ALICE)
        assert resp.status_code == 422, resp.text
        assert resp.json()["errors"][0]["loc"] == loc, resp.json()
        assert resp.json()["detail"].startswith(".".join(loc) + ": Object missing required field")


async def test_a_value_of_the_wrong_form_is_said_in_words_not_as_a_regex(api: Api) -> None:
    resp = await upload(api, jsonl(ROW), name="a/b c?d#e")
    assert resp.status_code == 400, resp.text
    assert resp.json()["errors"][0] == {
        "loc": ["query", "name"],
        "msg": "expected a name of letters, digits, spaces and . , : ( ) + - _",
    }
    resp = await api.client.post(
        "/v1/datasets/import", json={"source": "file:///data/prefs.jsonl"}, headers=ALICE
    )
    assert resp.status_code == 422, resp.text
    assert "expected hf://datasets/ORG/NAME" in resp.json()["detail"]
    assert "regex" not in resp.text
    ds = await dataset(api)
    resp = await api.client.post(
        "/v1/jobs", json={**spec(ds), "labels": {"Team": "a"}}, headers=ALICE
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["msg"].startswith("expected lowercase letters, digits")
