"""Automated retraining end to end: feedback in over HTTP, a policy fires, a worker trains the
tiny model for real, and the gate promotes the good run and refuses the run made worse."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Stack
from tests.fixtures.tiny_model import preference_rows

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ACC = "eval_rewards/accuracies"
ROWS = preference_rows(64)


@pytest.fixture
def retraining(stack: Stack) -> Iterator[Stack]:
    """The worker processes run the policy loop themselves, beside training."""
    yield stack


def post(stack: Stack, events: list[dict[str, Any]]) -> dict[str, Any]:
    resp = stack.http.post("/v1/feedback/support", json={"events": events})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def policy(stack: Stack) -> dict[str, Any]:
    resp = stack.http.get("/v1/policies/assistant")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def wait_policy(stack: Stack, until: Any, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = policy(stack)
        if until(p):
            return p
        time.sleep(0.25)
    raise AssertionError(f"timed out; policy is {p}\n--- logs ---\n{stack.logs()[-6000:]}")


def rows_of(stack: Stack, dataset: dict[str, Any]) -> list[dict[str, Any]]:
    data = (stack.store_dir / "datasets" / f"{dataset['sha256']}.jsonl").read_bytes()
    return [json.loads(line) for line in data.splitlines()]


def as_pair(i: int) -> dict[str, Any]:
    return {"id": f"pair-{i}", **ROWS[i]}


def as_edit(i: int) -> dict[str, Any]:
    r = ROWS[i]
    return {
        "id": f"edit-{i}",
        "prompt": r["prompt"],
        "response": r["rejected"],
        "edited": r["chosen"],
    }


def as_rating(i: int, up: bool) -> dict[str, Any]:
    r = ROWS[i]
    return {
        "id": f"rate-{i}-{'up' if up else 'down'}",
        "prompt": r["prompt"],
        "response": r["chosen"] if up else r["rejected"],
        "rating": "up" if up else "down",
    }


def test_feedback_to_promoted_model(retraining: Stack) -> None:
    stack = retraining
    template = {
        "base_model": f"file://{stack.settings.models_dir / 'tiny'}",
        "hyperparameters": {
            "learning_rate": 1e-3,
            "max_steps": 12,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_length": 64,
            "warmup_ratio": 0.0,
            "checkpoint_steps": 50,
            "gradient_checkpointing": False,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
    }
    body = {
        "stream": "support",
        "template": template,
        "trigger": {"min_new_pairs": 24},
        "gate": {"at_least": {ACC: 0.75}, "not_worse_than_promoted": {ACC: "higher"}},
        "holdout_fraction": 0.25,
    }
    assert stack.http.put("/v1/policies/assistant", json=body).status_code == 200
    stack.start_worker()

    # Batch 1: pairs, edits, and "up" ratings that wait for their "down" counterpart.
    first = [
        *map(as_pair, range(6)),
        as_edit(6),
        as_edit(7),
        as_rating(8, True),
        as_rating(9, True),
    ]
    receipt = post(stack, first)
    assert (receipt["pairs_added"], receipt["ratings_waiting"]) == (8, 2)
    retry = post(stack, first)  # the client retries: nothing new
    assert (retry["duplicates"], retry["pairs_added"]) == (10, 0)
    # Batch 2: the "down" ratings complete two pairs; 20 pairs in all.
    second = [as_rating(8, False), as_rating(9, False), *map(as_pair, range(10, 20))]
    assert post(stack, second)["pairs_total"] == 20
    asked = time.time()
    waiting = wait_policy(stack, lambda p: p["status"] and p["status"]["checked_at"] > asked + 1)
    assert waiting["status"]["message"] == "waiting for pairs: 20 new of 24"
    assert waiting["runs"] == []

    # Batch 3 reaches the threshold (with a retried event from batch 2 in it).
    assert post(stack, [second[-1], *map(as_pair, range(20, 24))])["pairs_total"] == 24
    fired = wait_policy(stack, lambda p: p["runs"] and p["runs"][0]["status"] != "starting")
    run = fired["runs"][0]
    assert (run["number"], run["pairs_end"], run["new_pairs"]) == (1, 24, 24)

    # The job trains on exactly the pairs gathered, minus the 6 held out for evaluation.
    gathered = ROWS[:24]
    held, train = rows_of(stack, run["eval_dataset"]), rows_of(stack, run["dataset"])
    assert len(held) == 6 and len(train) == 18
    assert held == [gathered[i] for i in fired["holdout"]["indices"]]
    assert train == [r for i, r in enumerate(gathered) if i not in fired["holdout"]["indices"]]
    job = stack.job(run["job_id"])
    assert job["dataset"]["id"] == run["dataset"]["id"]
    assert job["eval_dataset"]["id"] == run["eval_dataset"]["id"]

    done = wait_policy(stack, lambda p: p["runs"][0]["decision"] is not None)
    run = done["runs"][0]
    assert (run["status"], run["decision"]) == ("succeeded", "promoted"), run
    assert run["metrics"][ACC] >= 0.75 and "eval_loss" in run["metrics"]
    assert done["promoted"]["run_id"] == run["id"]
    assert done["promoted"]["artifacts"][0]["kind"] == "adapter"

    # Feedback turns bad: 40 pairs preferring the rude answers. Training on them makes the
    # model worse on the same held-out pairs, and the gate refuses it.
    swapped = [
        {"id": f"bad-{i}", "prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]}
        for i, r in enumerate(ROWS[24:64], 24)
    ]
    post(stack, swapped)
    done = wait_policy(
        stack, lambda p: len(p["runs"]) == 2 and p["runs"][0]["decision"] is not None
    )
    worse, good = done["runs"]
    assert (worse["number"], worse["status"], worse["decision"]) == (2, "succeeded", "rejected")
    assert worse["eval_dataset"] == good["eval_dataset"] and worse["dataset"]["rows"] == 58
    assert worse["metrics"][ACC] < good["metrics"][ACC]
    assert "worse than promoted run 1's" in worse["decision_reason"], worse
    assert done["promoted"]["run_id"] == good["id"]
    assert "not_worse_than_promoted" in [c["rule"] for c in worse["gate"] if not c["passed"]]
