"""Every method beside dpo trains as a job: uploaded through the API, run by a worker process,
published with its method's metrics (dpo's own end-to-end tests are test_jobs_end_to_end.py)."""

from __future__ import annotations

import msgspec
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_jobs_end_to_end import spec, store_path
from tests.fixtures.tiny_model import preference_rows

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

METHOD_KEYS = {
    "sft": {"loss", "mean_token_accuracy"},
    "kto": {"loss", "kl", "rewards/chosen", "rewards/rejected"},
    "orpo": {"loss", "nll_loss", "log_odds_ratio", "rewards/accuracies"},
    "simpo": {"loss", "rewards/margins", "rewards/accuracies"},
}


def test_sft_kto_orpo_and_simpo_jobs_train_and_publish(stack: Stack) -> None:
    pairs = preference_rows(32)
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs]
    unpaired_rows = [
        {
            "prompt": r["prompt"],
            "completion": r["chosen" if i % 2 else "rejected"],
            "label": i % 2 == 1,
        }
        for i, r in enumerate(pairs)
    ]
    datasets = {
        "sft": stack.upload(sft_rows, "sft"),
        "kto": stack.upload(unpaired_rows, "unpaired"),
        "orpo": stack.upload(pairs, "pairs"),
    }
    datasets["simpo"] = datasets["orpo"]
    assert [datasets[m]["kind"] for m in ("sft", "kto", "orpo")] == [
        "sft",
        "unpaired",
        "preference",
    ]
    stack.start_worker()
    jobs = {}
    for method, ds in datasets.items():
        steps = 16 if method == "sft" else 4
        jobs[method] = stack.submit(
            spec(
                stack,
                ds["id"],
                method=method,
                eval_fraction=0.25,
                eval_prompts=["How was the park?"],
                max_new_tokens=12,
                hyperparameters={"max_steps": steps, "learning_rate": 5e-3, "checkpoint_steps": 50},
            )
        )
    for method, submitted in jobs.items():
        job = stack.wait_done(submitted["id"], timeout=600)
        assert job["status"] == "succeeded", (method, job, stack.logs()[-4000:])
        assert job["spec"]["method"] == method
        points = stack.http.get(f"/v1/jobs/{job['id']}/metrics").json()["points"]
        train_keys = set().union(*(p["values"] for p in points if "loss" in p["values"]))
        assert METHOD_KEYS[method] <= train_keys, (method, train_keys)
        assert any("eval_loss" in p["values"] for p in points), method
        (artifact,) = job["artifacts"]
        folder = store_path(stack, artifact["uri"])
        assert (folder / "adapter_model.safetensors").is_file()
        saved = msgspec.json.decode((folder / "spec.json").read_bytes())
        assert saved["method"] == method
        (generation,) = job["eval_generations"]
        assert generation["prompt"] == "How was the park?" and generation["tuned"]
    sft = stack.job(jobs["sft"]["id"])
    # ROUGE of the answers to the held-out prompts: in the metrics and the job's final metrics
    assert sft["latest_metrics"]["eval_rouge1"] > 0.2, sft["latest_metrics"]
    assert {"eval_rouge2", "eval_rougeL"} <= sft["latest_metrics"].keys()
