"""A feedback stream of lone ratings (no prompt is ever rated both ways, so no pair forms)
trains a kto policy run end to end: every rating is an unpaired row."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_retraining import ROWS, post, rows_of, wait_policy

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_unpaired_ratings_train_a_kto_policy_run(stack: Stack) -> None:
    template = {
        "base_model": f"file://{stack.settings.models_dir / 'tiny'}",
        "method": "kto",
        "hyperparameters": {
            "learning_rate": 1e-3,
            "max_steps": 4,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_length": 64,
            "warmup_ratio": 0.0,
            "checkpoint_steps": 50,
            "gradient_checkpointing": False,
            "desirable_weight": 1.0,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
    }
    body = {
        "stream": "support",
        "template": template,
        "trigger": {"min_new_pairs": 16},
        "gate": {"at_most": {"eval_loss": 10.0}},
        "holdout_fraction": 0.25,
    }
    resp = stack.http.put("/v1/policies/assistant", json=body)
    assert resp.status_code == 200, resp.text
    # one rating per prompt, up and down alternating: no pair can ever form
    events = [
        {
            "id": f"rate-{i}",
            "prompt": ROWS[i]["prompt"],
            "response": ROWS[i]["chosen" if i % 2 else "rejected"],
            "rating": "up" if i % 2 else "down",
        }
        for i in range(16)
    ]
    receipt = post(stack, events)
    assert (receipt["pairs_added"], receipt["pairs_total"]) == (0, 0)
    stream = stack.http.get("/v1/feedback/support").json()
    assert (stream["pairs"], stream["ratings"], stream["pending_ratings"]) == (0, 16, 16)
    # a pairs snapshot has nothing; an unpaired one has every rating
    assert stack.http.post("/v1/feedback/support/snapshot").status_code == 409
    snap = stack.http.post("/v1/feedback/support/snapshot", params={"rows": "unpaired"})
    assert snap.status_code == 201, snap.text
    assert snap.json()["rows"] == "unpaired" and snap.json()["dataset"]["kind"] == "unpaired"

    stack.start_worker()
    done = wait_policy(
        stack, lambda p: p["runs"] and p["runs"][0]["status"] in {"succeeded", "failed"}, 400
    )
    run = done["runs"][0]
    assert run["status"] == "succeeded", (run, stack.logs()[-4000:])
    assert run["decision"] == "promoted", run
    job = stack.job(run["job_id"])
    assert job["spec"]["method"] == "kto" and job["dataset"]["kind"] == "unpaired"
    trained = rows_of(stack, run["dataset"])
    held = rows_of(stack, run["eval_dataset"])
    assert len(trained) + len(held) == 16 and len(held) == 4
    assert {r["label"] for r in trained} == {True, False}
    assert {"eval_loss", "eval_rewards/chosen", "kl"} <= run["metrics"].keys()
    assert done["promoted"]["method"] == "kto"
