"""`ftune feedback` and `ftune policies` against the real API over HTTP, with the scheduler
running inside the API as deployed (uvicorn on a loopback port, real Redis).

No worker runs: a test ends a run's job itself through the Store, as a worker would, and the
API's scheduler fires the policy, follows the job and judges it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import Result

from service.contract import Artifact, JobStatus
from service.settings import Settings
from tests.fixtures.tiny_model import preference_rows
from tests.integration.test_cli import set_job, write_jsonl

ACC = "eval_rewards/accuracies"
ROWS = preference_rows(64)

Cli = Callable[..., Result]


@pytest.fixture
def api_settings(api_settings: Settings) -> Settings:
    """The API runs its scheduler, as deployed, and ticks fast; a stream may hold more than
    one request's worth of bytes (a dataset's limit bounds it)."""
    return replace(
        api_settings,
        scheduler_enabled=True,
        scheduler_interval_seconds=0.2,
        max_dataset_bytes=8 * 1024 * 1024,
    )


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def eventually(cli: Cli, args: tuple[str, ...], text: str, timeout: float = 15.0) -> str:
    """Run `ftune ARGS` until its output contains `text` (the scheduler ticks in the API)."""
    deadline = time.monotonic() + timeout
    while True:
        out = ok(cli(*args))
        if text in out:
            return out
        assert time.monotonic() < deadline, f"{text!r} not within {timeout}s; last:\n{out}"
        time.sleep(0.2)


def pairs(start: int, stop: int) -> list[dict[str, Any]]:
    """Pair events with no id: the CLI gives each one made of its content."""
    return [dict(ROWS[i]) for i in range(start, stop)]


# -- feedback -----------------------------------------------------------------------------------


def test_post_pairs_ratings_and_edits_then_read_and_snapshot_the_stream(
    cli: Cli, tmp_path: Path
) -> None:
    q = ROWS[40]["prompt"]
    events = [
        *pairs(0, 4),
        {"id": "r1", "prompt": q, "response": "Glad to help!", "rating": "up"},
        {"id": "r2", "prompt": q, "response": "Figure it out.", "rating": "down"},
        {"id": "r3", "prompt": ROWS[41]["prompt"], "response": "Sure.", "rating": "up"},
        {"prompt": ROWS[42]["prompt"], "response": "No.", "edited": "Happy to explain."},
    ]
    file = write_jsonl(tmp_path / "feedback.jsonl", events)

    out = ok(cli("feedback", "post", "chat", str(file)))
    assert "posted 8 events to chat (1 batch): 8 accepted, 0 duplicates" in out
    assert "pairs: 6 added, 6 in the stream" in out
    assert "1 ratings wait for an opposite rating of the same prompt" in out

    # Posting the same file again stores nothing: the ids made for id-less events are stable.
    again = ok(cli("feedback", "post", "chat", str(file)))
    assert "8 events to chat (1 batch): 0 accepted, 8 duplicates" in again
    assert "pairs: 0 added, 6 in the stream" in again

    more = write_jsonl(tmp_path / "more.jsonl", pairs(4, 11))
    receipt = json.loads(ok(cli("feedback", "post", "chat", str(more), "--batch-size", "3",
                                "--json")))  # fmt: skip
    assert receipt == {
        "stream": "chat", "batches": 3, "received": 7, "accepted": 7, "duplicates": 0,
        "pairs_added": 7, "pairs_total": 13, "pending_ratings": 1,
    }  # fmt: skip

    listed = ok(cli("feedback", "list"))
    assert "chat" in listed and "standard" in listed and "13" in listed

    shown = ok(cli("feedback", "show", "chat"))
    assert "13" in shown and "1 ratings without an opposite rating yet" in shown
    assert "(8 duplicates ignored)" in shown

    page = ok(cli("feedback", "pairs", "chat", "--limit", "5"))
    assert "pairs 0-4 of 13" in page and "more: --offset 5" in page
    made = json.loads(ok(cli("feedback", "pairs", "chat", "--offset", "4", "--limit", "2",
                             "--json")))  # fmt: skip
    assert [p["kind"] for p in made["items"]] == ["rating", "edit"]
    assert made["items"][0]["events"] == ["r1", "r2"]
    assert made["items"][1]["row"]["chosen"] == "Happy to explain."
    assert made["items"][1]["row"]["rejected"] == "No."

    snap = ok(cli("feedback", "snapshot", "chat"))
    assert "snapshot 1 of chat:" in snap and "(13 rows, standard) from pairs 0-12" in snap
    ds_id = snap.split()[4]
    assert json.loads(ok(cli("datasets", "show", ds_id, "--json")))["rows"] == 13
    assert ds_id in ok(cli("feedback", "show", "chat"))


def test_a_file_is_posted_in_batches_that_fit_the_api(cli: Cli, tmp_path: Path) -> None:
    many = [{"id": f"e{i}", "prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."}
            for i in range(1001)]  # fmt: skip
    out = ok(cli("feedback", "post", "small", str(write_jsonl(tmp_path / "many.jsonl", many))))
    assert "posted 1001 events to small (2 batches): 1001 accepted" in out

    # 300 events of ~5 KB: far fewer than 1000, but more than one request's worth of bytes.
    long = "A long and careful answer. " * 200
    big = [{"id": f"b{i}", "prompt": f"Tell me about {i}.", "chosen": long, "rejected": "No."}
           for i in range(300)]  # fmt: skip
    out = ok(cli("feedback", "post", "big", str(write_jsonl(tmp_path / "big.jsonl", big))))
    assert "posted 300 events to big (2 batches): 300 accepted" in out


def test_a_refused_batch_names_its_file_lines_and_a_second_post_completes(
    cli: Cli, tmp_path: Path
) -> None:
    events = [*pairs(0, 5), {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
              *pairs(5, 6)]  # fmt: skip
    file = write_jsonl(tmp_path / "feedback.jsonl", events)
    result = cli("feedback", "post", "chat", str(file), "--batch-size", "3")
    assert result.exit_code == 1
    assert "422" in result.stderr and "the batch of lines 4-6 was refused" in result.stderr
    assert "line 6" in result.stderr and "Traceback" not in result.output
    assert "lines 1-3 were stored; post the file again once it is fixed" in result.stderr

    events[5] = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    write_jsonl(file, events)
    out = ok(cli("feedback", "post", "chat", str(file), "--batch-size", "3"))
    assert "posted 7 events to chat (3 batches): 4 accepted, 3 duplicates" in out
    assert "7 in the stream" in out


def test_bad_files_and_names_fail_before_anything_is_sent(cli: Cli, tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{not json", ROWS[1]])
    result = cli("feedback", "post", "chat", str(file))
    assert result.exit_code == 2 and "bad.jsonl: line 2: not valid JSON" in result.stderr
    file = write_jsonl(tmp_path / "list.jsonl", [ROWS[0], '["a list"]'])
    result = cli("feedback", "post", "chat", str(file))
    assert result.exit_code == 2 and "line 2: expected an event object" in result.stderr
    # Nothing was stored: the stream was never made.
    missing = cli("feedback", "show", "chat")
    assert missing.exit_code == 1 and "feedback stream chat does not exist" in missing.stderr

    bad = cli("feedback", "show", "no:colons")
    assert bad.exit_code == 2 and "'no:colons' is not a valid name" in bad.output
    bad = cli("policies", "show", "a/b")
    assert bad.exit_code == 2 and "'a/b' is not a valid name" in bad.output


# -- policies -----------------------------------------------------------------------------------

POLICY_YAML = f"""\
stream: chat
template:
  base_model: org/model
  hyperparameters: {{max_steps: 4}}
trigger:
  min_new_pairs: 10
gate:
  at_least: {{"{ACC}": 0.75}}
holdout_fraction: 0.2
"""


def finish(redis_url: str, job_id: str, accuracy: float) -> None:
    """End a run's job as the worker would: succeeded, with its final metrics and adapter."""
    adapter = Artifact(kind="adapter", uri=f"file:///store/jobs/{job_id}/artifacts/adapter/",
                       files=["adapter_model.safetensors"], sha256={})  # fmt: skip
    set_job(redis_url, job_id, status=JobStatus.succeeded, finished_at=time.time(),
            latest_metrics={ACC: accuracy, "eval_loss": 0.5}, artifacts=[adapter])  # fmt: skip


def test_a_policy_waits_fires_and_its_runs_are_judged_by_the_gate(
    cli: Cli, tmp_path: Path, api_settings: Settings
) -> None:
    ok(cli("feedback", "post", "chat", str(write_jsonl(tmp_path / "a.jsonl", pairs(0, 6)))))
    spec = tmp_path / "nightly.yaml"
    spec.write_text(POLICY_YAML)
    saved = ok(cli("policies", "put", "nightly", str(spec)))
    assert "saved policy nightly (revision 1) on stream chat: fires at 10 new pairs" in saved

    show = ("policies", "show", "nightly")
    waiting = eventually(cli, show, "waiting for pairs: 6 new of 10")
    assert "eval_rewards/accuracies >= 0.75" in waiting and "no runs yet" in waiting
    assert "20% of the pairs at the first run" in waiting
    assert "the service's store" in waiting and "none yet" in waiting
    listed = ok(cli("policies", "list"))
    assert "nightly" in listed and "chat" in listed and "at 10 new pairs" in listed

    ok(cli("feedback", "post", "chat", str(write_jsonl(tmp_path / "b.jsonl", pairs(6, 10)))))
    fired = eventually(cli, show, "run 1: job")
    assert "10 new pairs (at least 10)" in fired  # why it fired
    policy = json.loads(ok(cli(*show, "--json")))
    run = policy["runs"][0]
    assert run["status"] in ("queued", "running") and run["dataset"]["rows"] == 8
    assert "2 of the first 10 pairs" in fired  # the fixed held-out set

    finish(api_settings.redis_url, run["job_id"], accuracy=0.875)
    judged = eventually(cli, show, "run 1 promoted")
    assert f"run 1, job {run['job_id']}" in judged  # the promoted run
    assert f"file:///store/jobs/{run['job_id']}/artifacts/adapter/" in judged  # where it is
    assert "pass eval_rewards/accuracies 0.875 >= 0.75" in judged

    ok(cli("feedback", "post", "chat", str(write_jsonl(tmp_path / "c.jsonl", pairs(10, 20)))))
    eventually(cli, show, "run 2: job")
    second = json.loads(ok(cli(*show, "--json")))["runs"][0]
    finish(api_settings.redis_url, second["job_id"], accuracy=0.5)
    judged = eventually(cli, show, "run 2 rejected")
    assert "FAIL eval_rewards/accuracies 0.5 < 0.75" in judged
    assert "worse than promoted run 1's 0.875" in judged
    assert f"run 1, job {run['job_id']}" in judged  # still the promoted one
    assert "2: succeeded, rejected" in ok(cli("policies", "list"))

    assert "deleted policy nightly" in ok(cli("policies", "delete", "nightly"))
    gone = cli(*show)
    assert gone.exit_code == 1 and "404" in gone.stderr


def test_policy_specs_in_json_and_bad_ones_explained(cli: Cli, tmp_path: Path) -> None:
    spec = tmp_path / "p.json"
    body = {"stream": "chat", "template": {"base_model": "org/model"},
            "trigger": {"cron": "0 3 * * *", "min_new_pairs": 50}}  # fmt: skip
    spec.write_text(json.dumps(body))
    out = ok(cli("policies", "put", "p", str(spec)))
    assert "fires on '0 3 * * *' (UTC) with at least 50 new pairs" in out
    again = json.loads(ok(cli("policies", "put", "p", str(spec), "--json")))
    assert again["revision"] == 2 and again["spec"]["holdout_fraction"] == 0.1

    spec.write_text(json.dumps({**body, "holdout_fraction": 0.9}))
    result = cli("policies", "put", "p", str(spec))
    assert result.exit_code == 1 and "422" in result.stderr
    assert "holdout_fraction" in result.stderr and "Traceback" not in result.output

    bad = tmp_path / "bad.yaml"
    bad.write_text("stream: chat\ntemplate: [unclosed\n")
    result = cli("policies", "put", "p", str(bad))
    assert result.exit_code == 2 and "bad.yaml is not valid YAML: line" in result.stderr
    bad.write_text("- a list\n")
    result = cli("policies", "put", "p", str(bad))
    assert result.exit_code == 2 and "must hold a YAML mapping (a PolicySpec)" in result.stderr
