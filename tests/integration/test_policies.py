"""Retraining policies against real Redis: the API, and the periodic tick firing and judging runs.

Here the tests play the worker's part at the end of a job (they write its final status and
metrics to the job record, as the worker does); tests/e2e/test_retraining.py trains for real.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from arq.connections import ArqRedis

from service import queue, webhooks
from service.blobs import BlobStore, open_store
from service.contract import Artifact, Job, JobError, JobStatus
from service.datasets.space import UploadSpace
from service.retraining import policies, runs
from service.retraining.runs import tick
from service.settings import Settings
from service.store import Store
from tests.fixtures.api import ALICE, BOB, KEYS, Api, write_tenants
from tests.fixtures.s3 import S3Server
from tests.fixtures.tiny_model import preference_rows

ACC = "eval_rewards/accuracies"


@dataclass
class Loop:
    """What the worker hands the policy tick: the store, the arq pool, the blob store."""

    store: Store
    pool: ArqRedis
    blobs: BlobStore
    settings: Settings

    async def tick(self, **kw: Any) -> list[str]:
        return await tick(self.store, self.pool, self.blobs, self.settings, **kw)

    async def finish(
        self,
        job_id: str,
        status: JobStatus = JobStatus.succeeded,
        metrics: dict[str, float] | None = None,
        **fields: Any,
    ) -> Job:
        """End a job as the worker would."""
        return await self.store.update_job(
            job_id,
            lambda j: msgspec.structs.replace(
                j,
                status=status,
                finished_at=time.time(),
                latest_metrics={**j.latest_metrics, **(metrics or {})},
                **fields,
            ),
        )


@pytest.fixture
async def loop(api_settings: Settings) -> AsyncIterator[Loop]:
    store = Store.from_url(api_settings.redis_url)
    pool = await queue.connect(api_settings.redis_url)
    try:
        yield Loop(store, pool, open_store(api_settings.store_url), api_settings)
    finally:
        await pool.aclose()
        await store.close()


ROWS = preference_rows(64)


def events(start: int, stop: int, prefix: str = "e") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", **ROWS[i]} for i in range(start, stop)]


async def feed(
    api: Api, stream: str, evs: list[dict[str, Any]], headers: dict[str, str] = ALICE
) -> None:
    resp = await api.client.post(f"/v1/feedback/{stream}", json={"events": evs}, headers=headers)
    assert resp.status_code == 200, resp.text


def policy_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "stream": "chat",
        "template": {"base_model": "org/model", "hyperparameters": {"max_steps": 4}},
        "trigger": {"min_new_pairs": 10},
        "gate": {"at_least": {ACC: 0.75}, "not_worse_than_promoted": {ACC: "higher"}},
        "holdout_fraction": 0.2,
    }
    return {**body, **over}


async def put(api: Api, name: str, body: dict[str, Any], headers: dict[str, str] = ALICE) -> Any:
    return await api.client.put(f"/v1/policies/{name}", json=body, headers=headers)


async def get(api: Api, name: str) -> dict[str, Any]:
    resp = await api.client.get(f"/v1/policies/{name}", headers=ALICE)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def blob_rows(api: Api, sha256: str) -> list[dict[str, Any]]:
    data = (api.store_dir / "datasets" / f"{sha256}.jsonl").read_bytes()
    return [json.loads(line) for line in data.splitlines()]


def stage_adapter(loop: Loop, job_id: str, tmp_path: Path) -> Artifact:
    """What a worker leaves for a job publishing to the store: an adapter folder."""
    prefix = f"jobs/{job_id}/artifacts/adapter/"
    folder = tmp_path / job_id
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")
    sha = loop.blobs.upload_dir(prefix, folder)
    return Artifact(kind="adapter", uri=f"{loop.blobs.url}/{prefix}", files=sorted(sha), sha256=sha)


# --------------------------------------------------------------------------- API


async def test_put_get_list_delete(api: Api) -> None:
    resp = await put(api, "nightly", policy_body())
    assert resp.status_code == 200, resp.text
    created = resp.json()
    assert (created["name"], created["tenant"], created["revision"]) == ("nightly", "alice", 1)
    assert created["runs"] == [] and created["promoted"] is None and created["active_run"] is None
    assert created["spec"]["template"]["hyperparameters"]["beta"] == 0.1  # defaults filled in
    assert created["spec"]["gate"]["tolerance"] == 0.0

    again = (await put(api, "nightly", policy_body(trigger={"min_new_pairs": 50}))).json()
    assert again["revision"] == 2 and again["created_at"] == created["created_at"]
    assert (await get(api, "nightly"))["spec"]["trigger"]["min_new_pairs"] == 50

    await put(api, "hourly", policy_body(trigger={"cron": "@hourly"}))
    listed = (await api.client.get("/v1/policies", headers=ALICE)).json()
    assert [p["name"] for p in listed["items"]] == ["hourly", "nightly"]
    page = (await api.client.get("/v1/policies?limit=1", headers=ALICE)).json()
    assert [p["name"] for p in page["items"]] == ["hourly"] and page["next_cursor"] == "hourly"

    assert (await api.client.delete("/v1/policies/hourly", headers=ALICE)).status_code == 204
    assert (await api.client.get("/v1/policies/hourly", headers=ALICE)).status_code == 404


async def test_policies_belong_to_their_tenant(api: Api) -> None:
    await put(api, "mine", policy_body())
    assert (await api.client.get("/v1/policies/mine", headers=BOB)).status_code == 404
    assert (await api.client.delete("/v1/policies/mine", headers=BOB)).status_code == 404
    assert (await api.client.get("/v1/policies", headers=BOB)).json()["items"] == []
    # Bob's policy of the same name is his own.
    assert (await put(api, "mine", policy_body(stream="other"), headers=BOB)).status_code == 200
    assert (await get(api, "mine"))["spec"]["stream"] == "chat"


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"trigger": {}}, ["body", "trigger"]),
        ({"trigger": {"cron": "0 0 30 2 *"}}, ["body", "trigger"]),
        ({"stream": "bad:name"}, ["body", "stream"]),
        ({"holdout_fraction": 0.9}, ["body", "holdout_fraction"]),
        ({"gate": {"at_least": {"bad metric!": 1}}}, ["body", "gate", "at_least"]),
        ({"gate": {"not_worse_than_promoted": {ACC: "up"}}}, ["body", "gate"]),
        (
            {"gate": {"at_least": {"eval_loss": 0.9}, "at_most": {"eval_loss": 0.1}}},
            ["body", "gate"],
        ),
        ({"template": {"base_model": "not a model"}}, ["body", "template"]),
        ({"template": {"base_model": "org/m", "dataset_id": "ds_1"}}, ["body", "template"]),
        (
            {"template": {"base_model": "org/m", "hyperparameters": {"loss_type": "exo_pair"}}},
            ["body", "template", "hyperparameters"],
        ),
        (
            {"template": {"base_model": "file:///etc/models/x"}},
            ["body", "template", "base_model"],
        ),
        (
            {"template": {"base_model": "org/m", "eval_dataset_id": "ds_missing"}},
            ["body", "template", "eval_dataset_id"],
        ),
        (
            {"template": {"base_model": "org/m", "init_from": {"job_id": "job_abc"}}},
            ["body", "template", "init_from", "job_id"],
        ),
        (
            {"template": {"base_model": "org/m", "webhook_url": "http://127.0.0.1:8080/hook"}},
            ["body", "template", "webhook_url"],
        ),
    ],
    ids=[
        "no-trigger",
        "never-cron",
        "stream-name",
        "holdout",
        "metric-name",
        "direction",
        "bounds-no-run-can-pass",
        "base-model",
        "dataset-in-template",
        "cross-field",
        "outside-models-dir",
        "eval-dataset",
        "init-from-missing-job",
        "loopback-webhook",
    ],
)
async def test_bad_policies_are_refused_with_where(
    api: Api, patch: dict[str, Any], loc: list[str]
) -> None:
    resp = await put(api, "p", policy_body(**patch))
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["loc"][: len(loc)] == loc, resp.json()
    assert (await api.client.get("/v1/policies/p", headers=ALICE)).status_code == 404


async def test_a_stored_policy_no_run_can_pass_still_reads(api: Api) -> None:
    """Contradictory bounds are refused when saved, not when read: a policy stored before
    the rule existed can still be shown, fixed and deleted."""
    assert (await put(api, "old", policy_body())).status_code == 200
    r = redis.Redis.from_url(api.settings.redis_url)
    key = "ftune:policy:alice:old:record"
    record = json.loads(r.get(key) or b"{}")
    record["spec"]["gate"]["at_least"] = {"eval_loss": 0.9}
    record["spec"]["gate"]["at_most"] = {"eval_loss": 0.1}
    r.set(key, json.dumps(record))
    assert (await api.client.get("/v1/policies/old", headers=ALICE)).status_code == 200
    assert (await api.client.get("/v1/policies", headers=ALICE)).status_code == 200
    assert (await put(api, "old", policy_body())).status_code == 200
    assert (await api.client.delete("/v1/policies/old", headers=ALICE)).status_code == 204


async def test_policy_names_are_checked(api: Api) -> None:
    assert (await put(api, "bad:name", policy_body())).status_code == 400
    assert (await put(api, "x" * 64, policy_body())).status_code == 400


# --------------------------------------------------------------------------- the tick


async def test_fires_at_the_threshold_and_the_gate_decides(api: Api, loop: Loop) -> None:
    await put(api, "p", policy_body())
    await feed(api, "chat", events(0, 9))
    assert await loop.tick() == []
    status = (await get(api, "p"))["status"]
    assert status["message"] == "waiting for pairs: 9 new of 10" and status["new_pairs"] == 9

    await feed(api, "chat", events(7, 9))  # a retry: no new pair
    assert await loop.tick() == []
    await feed(api, "chat", events(9, 10))
    [line] = await loop.tick()
    assert "fired run 1 (10 new pairs (at least 10))" in line

    policy = await get(api, "p")
    [run] = policy["runs"]
    assert (run["number"], run["status"], run["pairs_end"], run["new_pairs"]) == (
        1,
        "queued",
        10,
        10,
    )
    assert policy["active_run"] == run["id"]
    # 2 of the 10 pairs (holdout_fraction 0.2) are held out for good; it trains on the other 8.
    holdout = policy["holdout"]
    assert len(holdout["indices"]) == 2 and holdout["pairs_end"] == 10
    assert run["eval_dataset"] == holdout["dataset"] and run["dataset"]["rows"] == 8
    train = blob_rows(api, run["dataset"]["sha256"])
    held = blob_rows(api, holdout["dataset"]["sha256"])
    assert held == [ROWS[i] for i in holdout["indices"]]
    assert train == [ROWS[i] for i in range(10) if i not in holdout["indices"]]

    job = (await api.client.get(f"/v1/jobs/{run['job_id']}", headers=ALICE)).json()
    assert job["status"] == "queued" and job["tenant"] == "alice"
    assert job["dataset"]["id"] == run["dataset"]["id"]
    assert job["eval_dataset"]["id"] == holdout["dataset"]["id"]
    assert job["spec"]["labels"] == {"policy": "p"}
    assert job["spec"]["hyperparameters"]["max_steps"] == 4
    assert await loop.pool.zrange(loop.settings.queue_name, 0, -1) == [f"{job['id']}:0".encode()]
    stream = (await api.client.get("/v1/feedback/chat", headers=ALICE)).json()
    assert [(s["selection"], s["by"]) for s in stream["recent_snapshots"]] == [
        ("train", "policy p run 1"),
        ("held_out", "policy p"),
    ]

    # While the job runs the policy waits, even with enough new pairs.
    await feed(api, "chat", events(10, 29))
    assert await loop.tick() == []
    assert "is queued" in (await get(api, "p"))["status"]["message"]
    await loop.finish(run["job_id"], metrics={ACC: 1.0, "eval_loss": 0.6})
    [line] = await loop.tick()
    assert line.endswith(
        "run 1 promoted: passed: eval_rewards/accuracies 1 >= 0.75; no promoted model yet"
    )
    policy = await get(api, "p")
    assert (
        policy["promoted"]["run_id"] == run["id"] and policy["promoted"]["job_id"] == run["job_id"]
    )
    assert policy["active_run"] is None
    first = policy["runs"][0]
    assert (first["status"], first["decision"]) == ("succeeded", "promoted")
    assert first["metrics"] == {ACC: 1.0, "eval_loss": 0.6}

    # Run 2: 19 new pairs waited; it trains on all 29 but the held-out 2, judged on the same 2.
    [line] = await loop.tick()
    assert "fired run 2 (19 new pairs" in line
    second = (await get(api, "p"))["runs"][0]
    assert second["eval_dataset"] == holdout["dataset"] and second["dataset"]["rows"] == 27
    assert blob_rows(api, second["dataset"]["sha256"]) == [
        ROWS[i] for i in range(29) if i not in holdout["indices"]
    ]
    await loop.finish(second["job_id"], metrics={ACC: 0.5, "eval_loss": 0.7})
    [line] = await loop.tick()
    assert "run 2 rejected" in line
    policy = await get(api, "p")
    assert policy["promoted"]["run_id"] == run["id"]
    second = policy["runs"][0]
    assert second["decision"] == "rejected"
    assert second["decision_reason"] == (
        "eval_rewards/accuracies 0.5 < 0.75; eval_rewards/accuracies 0.5 is worse than "
        "promoted run 1's 1 (higher is better)"
    )
    assert [c["passed"] for c in second["gate"]] == [False, False]

    # Run 3 fails outright: kept, not promoted, with the job's error.
    await feed(api, "chat", events(30, 40))
    await loop.tick()
    third = (await get(api, "p"))["runs"][0]
    error = JobError(type="DatasetError", message="all rows dropped")
    await loop.finish(third["job_id"], JobStatus.failed, error=error)
    await loop.tick()
    policy = await get(api, "p")
    assert [(r["number"], r["status"], r["decision"]) for r in policy["runs"]] == [
        (3, "failed", "rejected"),
        (2, "succeeded", "rejected"),
        (1, "succeeded", "promoted"),
    ]
    assert policy["runs"][0]["decision_reason"] == "the job failed: DatasetError: all rows dropped"
    assert policy["promoted"]["number"] == 1


async def test_a_later_copy_of_a_held_out_pair_never_trains(api: Api, loop: Loop) -> None:
    await put(api, "p", policy_body(trigger={"min_new_pairs": 5}, holdout_fraction=0.4))
    await feed(api, "chat", events(0, 5))
    await loop.tick()
    policy = await get(api, "p")
    held = policy["holdout"]["indices"]
    await loop.finish(policy["runs"][0]["job_id"], metrics={ACC: 1.0})
    await loop.tick()
    # The same pairs again, under new ids: users repeat themselves.
    await feed(api, "chat", [{**ROWS[i], "id": f"again{i}"} for i in range(5)])
    await loop.tick()
    run = (await get(api, "p"))["runs"][0]
    kept = [ROWS[i] for i in range(5) if i not in held]
    assert blob_rows(api, run["dataset"]["sha256"]) == kept + kept


async def test_held_out_prompts_are_never_trained_on(api: Api, loop: Loop) -> None:
    """Feedback repeats its prompts: every pair of a held-out prompt is held out, now and
    later, so the gate scores prompts the run never trained on. A stream of one prompt has
    none to spare: its pairs are held out one by one, as before."""
    answers = [("Sure, here it is.", "No."), ("Yes, gladly.", "Go away."), ("Of course.", "?")]
    rows = [
        {"prompt": f"Question {q}?", "chosen": f"{good} ({q})", "rejected": f"{bad} ({q})"}
        for q in range(10)
        for good, bad in answers
    ]
    await put(api, "p", policy_body(trigger={"min_new_pairs": 30}, holdout_fraction=0.2))
    await feed(api, "chat", [{**r, "id": f"r{i}"} for i, r in enumerate(rows)])
    await loop.tick()
    policy = await get(api, "p")
    holdout, run = policy["holdout"], policy["runs"][0]
    assert holdout["by"] == "prompt" and len(holdout["prompts"]) == 2
    held = {r["prompt"] for r in blob_rows(api, holdout["dataset"]["sha256"])}
    trained = {r["prompt"] for r in blob_rows(api, run["dataset"]["sha256"])}
    assert len(held) == 2 and not held & trained and len(trained) == 8
    assert run["eval_dataset"]["rows"] == 6 and run["dataset"]["rows"] == 24
    await loop.finish(run["job_id"], metrics={ACC: 1.0})
    await loop.tick()
    # New answers to a held-out prompt, later: still never trained on.
    again = sorted(held)[0]
    await feed(
        api,
        "chat",
        [
            {"id": f"n{i}", "prompt": again, "chosen": f"Yes {i}.", "rejected": f"No {i}."}
            for i in range(30)
        ],
    )
    await loop.tick()
    second = (await get(api, "p"))["runs"][0]
    assert second["number"] == 2
    assert again not in {r["prompt"] for r in blob_rows(api, second["dataset"]["sha256"])}

    await put(api, "one", policy_body(stream="faq", trigger={"min_new_pairs": 20}))
    await feed(
        api,
        "faq",
        [
            {
                "id": f"f{i}",
                "prompt": "Reset my password?",
                "chosen": f"Settings {i}.",
                "rejected": f"No {i}.",
            }
            for i in range(20)
        ],
    )
    await loop.tick()
    one = await get(api, "one")
    assert one["holdout"]["by"] == "pair" and one["holdout"]["prompts"] == []
    assert one["runs"][0]["eval_dataset"]["rows"] == 4  # 0.2 of 20, one by one

    # Mostly a few prompts, and some asked once: held out by prompt, only the rare ones would
    # qualify, a handful of pairs for good; so pair by pair, the whole 0.2 of them.
    skewed = [
        {"id": f"s{i}", "prompt": f"Top {i % 4}?", "chosen": f"Y{i}.", "rejected": f"N{i}."}
        for i in range(160)
    ]
    skewed += [
        {"id": f"o{i}", "prompt": f"Once {i}?", "chosen": "Y.", "rejected": "N."} for i in range(40)
    ]
    await put(api, "skew", policy_body(stream="skew", trigger={"min_new_pairs": 200}))
    await feed(api, "skew", skewed)
    await loop.tick()
    skew = await get(api, "skew")
    assert skew["holdout"]["by"] == "pair" and skew["runs"][0]["eval_dataset"]["rows"] == 40


async def test_template_eval_dataset_is_the_fixed_held_out_set(api: Api, loop: Loop) -> None:
    upload = await api.client.post(
        "/v1/datasets",
        content="".join(json.dumps(r) + "\n" for r in ROWS[50:56]),
        headers={**ALICE, "Content-Type": "application/x-ndjson"},
    )
    eval_id = upload.json()["id"]
    template = {"base_model": "org/model", "eval_dataset_id": eval_id}
    await put(api, "p", policy_body(template=template, trigger={"min_new_pairs": 4}))
    await feed(api, "chat", events(0, 4))
    await loop.tick()
    policy = await get(api, "p")
    run = policy["runs"][0]
    assert policy["holdout"] is None
    assert run["eval_dataset"]["id"] == eval_id and run["dataset"]["rows"] == 4
    stream = (await api.client.get("/v1/feedback/chat", headers=ALICE)).json()
    assert stream["recent_snapshots"][0]["selection"] == "all"


async def test_a_due_policy_waits_for_temp_space_and_fires_once_there_is(
    api: Api, loop: Loop
) -> None:
    """Its snapshots take a slot of the host's upload space: with every slot taken, the run
    is not spent but put off to a later tick."""
    await put(api, "p", policy_body())
    await feed(api, "chat", events(0, 10))
    host = UploadSpace(
        loop.settings.upload_dir, max_uploads=loop.settings.max_concurrent_uploads, reserve_bytes=0
    )
    taken = [host._admit("another-team", None) for _ in range(loop.settings.max_concurrent_uploads)]
    assert await loop.tick() == []
    policy = await get(api, "p")
    assert policy["runs"] == [] and policy["status"]["new_pairs"] == 10
    assert "waiting for temp space" in policy["status"]["message"]
    assert "uploads, its limit" in policy["status"]["message"]
    for _, lock in taken:  # those uploads end
        lock.close()
    [line] = await loop.tick()
    assert "fired run 1" in line
    [run] = (await get(api, "p"))["runs"]
    assert run["status"] == "queued"
    assert [p.name for p in loop.settings.upload_dir.iterdir()] == [".admit"]


async def test_a_due_policy_whose_template_cannot_train_here_does_not_fire(
    api: Api, loop: Loop
) -> None:
    """Saved while the workers had one GPU; with two, a job of it would fail at the worker
    on every trigger: the policy says why instead and spends no run."""
    body = policy_body()
    body["template"]["hyperparameters"]["precompute_ref_log_probs"] = True
    assert (await put(api, "p", body)).status_code == 200
    await feed(api, "chat", events(0, 10))
    two_gpus = replace(loop, settings=replace(loop.settings, worker_gpus=2))
    assert await two_gpus.tick() == []
    policy = await get(api, "p")
    assert policy["runs"] == [] and policy["pairs_at_last_run"] == 0
    assert "its template cannot train" in policy["status"]["message"]
    assert "precompute_ref_log_probs" in policy["status"]["message"]
    [line] = await loop.tick()  # on one GPU it trains
    assert "fired run 1" in line


async def test_a_tenant_removed_from_the_tenants_file_fires_nothing(api: Api, loop: Loop) -> None:
    """An operator removes a team's keys: its policies stop starting jobs (nobody could see or
    cancel them), say why, and fire again once the team has a key."""
    await put(api, "p", policy_body())
    await feed(api, "chat", events(0, 10))
    assert loop.settings.api_keys_file is not None
    without = {k: v for k, v in KEYS.items() if v.tenant != "alice"}
    write_tenants(loop.settings.api_keys_file, without, {})
    assert await loop.tick() == []
    write_tenants(loop.settings.api_keys_file, KEYS, {})
    policy = await get(api, "p")
    assert policy["runs"] == [] and "no API key" in policy["status"]["message"]
    [line] = await loop.tick()
    assert "fired run 1" in line


async def test_cron_policy_fires_on_its_schedule(api: Api, loop: Loop) -> None:
    await put(api, "p", policy_body(trigger={"cron": "0 * * * *"}))
    await feed(api, "chat", events(0, 3))
    created = (await get(api, "p"))["cron_after"]
    next_hour = (created // 3600 + 1) * 3600
    assert await loop.tick(now=next_hour - 1) == []
    assert "waiting for the schedule" in (await get(api, "p"))["status"]["message"]
    [line] = await loop.tick(now=next_hour + 5)
    assert "fired run 1 (3 new pairs (at least 1), scheduled" in line


async def test_disabled_policy_and_too_few_pairs_to_hold_out(api: Api, loop: Loop) -> None:
    await put(api, "p", policy_body(trigger={"min_new_pairs": 1}, enabled=False))
    await feed(api, "chat", events(0, 1))
    assert await loop.tick() == []
    assert (await get(api, "p"))["status"]["message"] == "disabled"
    await put(api, "p", policy_body(trigger={"min_new_pairs": 1}))
    [line] = await loop.tick()
    assert "could not start" in line and "too few" in line
    policy = await get(api, "p")
    assert policy["active_run"] is None
    assert (policy["runs"][0]["status"], policy["runs"][0]["decision"]) == (
        "not_started",
        "rejected",
    )
    assert "too few to hold 1 out" in policy["runs"][0]["decision_reason"]


async def test_a_run_on_feedback_that_calls_functions_says_so_in_its_job(
    api: Api, loop: Loop
) -> None:
    weather = [{"type": "function", "function": {"name": "weather"}}]
    template = {"base_model": "org/model", "method": "orpo", "hyperparameters": {"max_steps": 4}}
    await put(api, "p", policy_body(template=template, trigger={"min_new_pairs": 5}))
    await feed(api, "chat", [{**e, "tools": weather} for e in events(0, 10)])
    [line] = await loop.tick()
    assert "fired run 1" in line
    [run_] = (await get(api, "p"))["runs"]
    job = (await api.client.get(f"/v1/jobs/{run_['job_id']}", headers=ALICE)).json()
    assert job["dataset"]["functions"] is True
    rows = blob_rows(api, job["dataset"]["sha256"])
    assert all(row["tools"] == weather for row in rows)


async def test_concurrent_ticks_fire_once(api: Api, loop: Loop) -> None:
    await put(api, "p", policy_body())
    await feed(api, "chat", events(0, 10))
    results = await asyncio.gather(*(loop.tick() for _ in range(4)))
    assert sum(len(r) for r in results) == 1
    assert len((await get(api, "p"))["runs"]) == 1
    assert len(await loop.pool.zrange(loop.settings.queue_name, 0, -1)) == 1


async def test_an_interrupted_firing_is_cleared_or_adopted(api: Api, loop: Loop) -> None:
    await put(api, "p", policy_body())
    await feed(api, "chat", events(0, 10))
    await loop.tick()
    policy = await get(api, "p")
    run = policy["runs"][0]
    # Pretend the firing tick died before it recorded the job (run still "starting").
    await policies.update_policy(
        loop.store, "alice", "p", lambda p: policies.with_run(p, run["id"], status="starting")
    )
    assert await loop.tick() == []  # within the grace period: leave it to the firing tick
    later = time.time() + policies.FIRE_GRACE_SECONDS + 1
    [line] = await loop.tick(now=later)
    assert line.endswith(f"adopted job {run['job_id']}")
    assert (await get(api, "p"))["runs"][0]["status"] == "queued"

    # Without a job, the run is given up and the policy can fire again.
    await loop.finish(run["job_id"], metrics={ACC: 1.0})
    await loop.tick()
    await feed(api, "chat", events(10, 20))
    await loop.tick()
    second = (await get(api, "p"))["runs"][0]
    await loop.store.redis.delete(f"ftune:job:{second['job_id']}")
    await policies.update_policy(
        loop.store, "alice", "p", lambda p: policies.with_run(p, second["id"], status="starting")
    )
    [line] = await loop.tick(now=later)
    assert "lost: the firing was interrupted" in line
    assert (await get(api, "p"))["active_run"] is None


async def test_a_run_that_is_lost_or_cannot_start_is_announced_as_rejected(
    api: Api, loop: Loop
) -> None:
    """The template's receiver hears of every run the gate closes, not only the trained ones."""
    hook = "https://93.184.216.34/hooks/ftune"  # a public address: no lookup, never sent here
    template = {**policy_body()["template"], "webhook_url": hook}
    body = policy_body(template=template, trigger={"min_new_pairs": 1})
    assert (await put(api, "p", body)).is_success
    sync_redis = redis.Redis.from_url(loop.settings.redis_url)

    def queued() -> dict[str, dict[str, Any]]:
        keys = sync_redis.keys(webhooks.event_key("*"))
        events = [json.loads(sync_redis.hget(k, "body") or b"{}") for k in keys]
        return {e["run"]["status"]: e for e in events}

    await feed(api, "chat", events(0, 1))  # too few pairs to hold one out
    [line] = await loop.tick(announce=webhooks.stage_verdict)
    assert "could not start" in line
    [not_started] = queued().values()
    assert (not_started["type"], not_started["policy"]) == ("policy.run.rejected", "p")
    assert "too few to hold 1 out" in not_started["run"]["decision_reason"]
    assert not_started["promoted"] is None
    assert sync_redis.hget(webhooks.event_key(not_started["id"]), "url") == hook.encode()

    await feed(api, "chat", events(1, 10))
    await loop.tick(announce=webhooks.stage_verdict)
    run = (await get(api, "p"))["runs"][0]
    await loop.store.redis.delete(f"ftune:job:{run['job_id']}")
    [line] = await loop.tick(announce=webhooks.stage_verdict)
    assert "lost: its job" in line
    lost = queued()["lost"]
    assert (lost["type"], lost["run"]["job_id"]) == ("policy.run.rejected", run["job_id"])
    assert lost["job_id"] is None and not_started["job_id"] is None  # no job to look up
    assert len(queued()) == 2
    sync_redis.close()


async def test_a_promoted_run_is_published_where_the_template_says(
    api: Api, loop: Loop, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    settings = replace(loop.settings, s3_endpoint_url=s3_server.endpoint_url)
    loop = replace(loop, settings=settings)
    destination = {"type": "s3", "uri": f"s3://{s3_bucket}/models/chat"}
    template = {"base_model": "org/model", "output": {"destination": destination}}
    await put(api, "p", policy_body(template=template))
    await feed(api, "chat", events(0, 10))
    await loop.tick()
    run = (await get(api, "p"))["runs"][0]
    job = (await api.client.get(f"/v1/jobs/{run['job_id']}", headers=ALICE)).json()
    assert job["spec"]["output"]["destination"] == {"type": "store"}  # staged, not published

    artifact = stage_adapter(loop, job["id"], tmp_path)
    await loop.finish(job["id"], metrics={ACC: 1.0}, artifacts=[artifact])
    [line] = await loop.tick()
    assert "promoted" in line
    policy = await get(api, "p")
    uri = f"s3://{s3_bucket}/models/chat/adapter/"
    assert policy["runs"][0]["published"] == [uri] and policy["promoted"]["published"] == [uri]
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="models/chat/adapter/")
    keys = {o["Key"].removeprefix("models/chat/adapter/") for o in listed["Contents"]}
    assert keys == {
        "adapter_model.safetensors",
        "adapter_config.json",
        "manifest.json",
        "README.md",
    }
    body = s3_server.client().get_object(
        Bucket=s3_bucket, Key="models/chat/adapter/adapter_model.safetensors"
    )
    assert body["Body"].read() == b"weights"


async def test_a_failed_publish_is_recorded(
    api: Api, loop: Loop, s3_server: S3Server, tmp_path: Path
) -> None:
    loop = replace(loop, settings=replace(loop.settings, s3_endpoint_url=s3_server.endpoint_url))
    destination = {"type": "s3", "uri": "s3://no-such-bucket-ftune/models"}
    template = {"base_model": "org/model", "output": {"destination": destination}}
    await put(api, "p", policy_body(template=template))
    await feed(api, "chat", events(0, 10))
    await loop.tick()
    run = (await get(api, "p"))["runs"][0]
    artifact = stage_adapter(loop, run["job_id"], tmp_path)
    await loop.finish(run["job_id"], metrics={ACC: 1.0}, artifacts=[artifact])
    await loop.tick()
    policy = await get(api, "p")
    # It passed the gate, so it is the promoted model; where it could not go is on record.
    run = policy["runs"][0]
    assert run["decision"] == "promoted" and run["published"] == []
    assert (
        "no-such-bucket-ftune" in run["publish_error"] and "does not exist" in run["publish_error"]
    )
    assert policy["promoted"]["run_id"] == run["id"]


async def test_a_kto_gate_is_on_a_metric_kto_reports(api: Api) -> None:
    """TRL's KTO logs no accuracies: by default a kto policy compares eval_loss, and a gate
    on accuracies (which rejected every run after the first) is refused when saved."""
    kto = {"base_model": "org/model", "method": "kto", "hyperparameters": {"max_steps": 4}}
    resp = await put(api, "k", policy_body(template=kto, gate={}))
    assert resp.status_code == 200, resp.text
    assert resp.json()["spec"]["gate"]["not_worse_than_promoted"] == {"eval_loss": "lower"}
    resp = await put(api, "d", policy_body(gate={}))  # dpo keeps comparing accuracies
    assert resp.json()["spec"]["gate"]["not_worse_than_promoted"] == {ACC: "higher"}
    resp = await put(api, "k", policy_body(template=kto))  # the body's gate names ACC
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["loc"] == ["body", "gate", "at_least"]
    assert "KTO reports no eval_rewards/accuracies" in resp.json()["detail"]


async def test_a_policys_status_says_what_it_counts_and_when_its_stream_is_gone(
    api: Api, loop: Loop
) -> None:
    kto = {"base_model": "org/model", "method": "kto", "hyperparameters": {"max_steps": 4}}
    assert (await put(api, "k", policy_body(stream="rt", template=kto, gate={}))).status_code == 200
    ratings = [
        {"id": f"r{i}", "prompt": f"Q{i}?", "response": "A.", "rating": "up"} for i in range(3)
    ]
    await feed(api, "rt", ratings)
    await loop.tick()
    assert (await get(api, "k"))["status"]["message"] == "waiting for ratings: 3 new of 10"
    assert (await api.client.delete("/v1/feedback/rt", headers=ALICE)).status_code == 204
    await loop.tick()
    assert (await get(api, "k"))["status"]["message"] == (
        "stream rt does not exist (yet): waiting for ratings: 0 new of 10"
    )


async def test_a_template_is_checked_with_the_label_its_runs_add(api: Api) -> None:
    labels = {f"k{i}": "v" for i in range(32)}  # the most a job has; runs add `policy`
    template = {"base_model": "org/model", "labels": labels}
    resp = await put(api, "p", policy_body(template=template))
    assert resp.status_code == 422, resp.text
    assert "32" in resp.text


@pytest.mark.parametrize("saved_before", [False, True], ids=["now", "saved-before-upgrade"])
async def test_a_stream_made_again_or_other_rows_are_counted_anew(
    api: Api, loop: Loop, tmp_path: Path, saved_before: bool
) -> None:
    """Deleting the stream, or switching the template between pairs and ratings (kto),
    gives the policy other rows: all of them new, and held out afresh. A policy saved before
    its stream's time was kept tells a stream made since by its last run's time."""
    await feed(api, "chat", events(0, 20))
    assert (await put(api, "p", policy_body(gate={}))).status_code == 200
    await loop.tick()
    first = await get(api, "p")
    run = first["runs"][0]
    await loop.finish(run["job_id"], metrics={ACC: 0.9})
    await loop.tick()
    old_holdout = (await get(api, "p"))["holdout"]["dataset"]["id"]
    if saved_before:
        await policies.update_policy(
            loop.store, "alice", "p", lambda p: msgspec.structs.replace(p, stream_created_at=None)
        )

    assert (await api.client.delete("/v1/feedback/chat", headers=ALICE)).status_code == 204
    await feed(api, "chat", events(20, 32, prefix="n"))  # 12 pairs: new, past 10
    await loop.tick()
    again = await get(api, "p")
    second = again["runs"][0]
    assert second["number"] == 2 and second["new_pairs"] == 12, again["status"]
    assert again["holdout"]["dataset"]["id"] != old_holdout
    assert again["holdout"]["pairs_end"] == 12
    trained = blob_rows(api, second["dataset"]["sha256"])
    held = blob_rows(api, again["holdout"]["dataset"]["sha256"])
    assert len(trained) + len(held) == 12
    await loop.finish(second["job_id"], metrics={ACC: 0.9})
    await loop.tick()

    kto = {"base_model": "org/model", "method": "kto", "hyperparameters": {"max_steps": 4}}
    assert (await put(api, "p", policy_body(template=kto, gate={}))).status_code == 200
    switched = await get(api, "p")
    assert switched["pairs_at_last_run"] == 0 and switched["holdout"] is None


async def test_a_run_adopted_after_its_tick_died_keeps_its_held_out_pairs(
    api: Api, loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick dies after submitting the job: the adopted run is judged, and the next run
    scored, on the pairs drawn for it (they were kept only once the run was recorded)."""
    await put(api, "p", policy_body())
    await feed(api, "chat", events(0, 10))
    with_run = runs.with_run

    def dies_once_submitted(p: Any, run_id: str, **fields: Any) -> Any:
        if fields.get("status") == "queued":
            raise RuntimeError("the scheduler's pod was killed")
        return with_run(p, run_id, **fields)

    monkeypatch.setattr(runs, "with_run", dies_once_submitted)
    await loop.tick()
    monkeypatch.undo()
    policy = await get(api, "p")
    assert policy["runs"][0]["status"] == "starting"
    later = time.time() + policies.FIRE_GRACE_SECONDS + 1
    [line] = await loop.tick(now=later)
    assert line.endswith(f"adopted job {policy['runs'][0]['job_id']}")
    adopted = await get(api, "p")
    job = (await api.client.get(f"/v1/jobs/{adopted['runs'][0]['job_id']}", headers=ALICE)).json()
    assert adopted["holdout"] is not None
    assert adopted["holdout"]["dataset"]["id"] == job["eval_dataset"]["id"]


async def test_a_tick_that_read_the_policy_before_another_fired_does_not_fire_again(
    api: Api, loop: Loop, tmp_path: Path
) -> None:
    """A whole other tick (fire, then decide) between one tick's read and its claim: the
    claim sees a newer run and stands down (it fired run 1 a second time, with 0 new pairs)."""
    await put(api, "p", policy_body())
    await feed(api, "chat", events(0, 10))
    stale = await policies.get_policy(loop.store, "alice", "p")
    await loop.tick()
    run = (await get(api, "p"))["runs"][0]
    await loop.finish(run["job_id"], metrics={ACC: 0.9})
    await loop.tick()
    assert (await get(api, "p"))["active_run"] is None
    fired = await runs._fire(
        loop.store,
        loop.pool,
        loop.blobs,
        loop.settings,
        stale,
        10,
        None,
        "stale",
        tmp_path,
        now=time.time(),
        announce=None,
    )
    assert fired == []
    assert [r["number"] for r in (await get(api, "p"))["runs"]] == [1]


async def test_overlapping_ticks_publish_a_promoted_run_once(
    api: Api, loop: Loop, tmp_path: Path
) -> None:
    calls: list[str] = []

    def slow_publisher(job: Job, destination: Any, blobs: Any, settings: Any) -> list[str]:
        calls.append(job.id)
        time.sleep(0.5)  # still uploading when the other tick comes
        return ["hf://org/chat"]

    destination = {"type": "hub", "repo_id": "org/chat"}
    template = {"base_model": "org/model", "output": {"destination": destination}}
    await put(api, "p", policy_body(template=template))
    await feed(api, "chat", events(0, 10))
    await loop.tick()
    run = (await get(api, "p"))["runs"][0]
    artifact = stage_adapter(loop, run["job_id"], tmp_path)
    await loop.finish(run["job_id"], metrics={ACC: 1.0}, artifacts=[artifact])
    results = await asyncio.gather(*(loop.tick(publisher=slow_publisher) for _ in range(3)))
    assert calls == [run["job_id"]]
    assert sum(len(r) for r in results) == 1
    assert (await get(api, "p"))["promoted"]["published"] == ["hf://org/chat"]
