"""The cost cutters (precompute_ref_log_probs, packing, use_liger_kernel, torch_compile): off by
default, refused where they do not apply, and where they train, the same training as without.

Their speed is measured in bench/cost_cutters.py, never here.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from gpu_worker.errors import ConfigError
from gpu_worker.pipeline import run
from gpu_worker.reporter import JobCancelled, ListReporter
from gpu_worker.trainer import adapt_to_device
from service.api.app import create_app
from service.blobs import dataset_blob_key, open_store
from service.contract import Hyperparameters, JobSpec
from service.settings import Settings
from tests.fixtures.api import ALICE
from tests.fixtures.tiny_model import preference_rows, stage_job

ROWS = preference_rows(16)
SFT_ROWS = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS]
CUTTERS = ("precompute_ref_log_probs", "packing", "use_liger_kernel", "torch_compile")


def _spec(method: str = "dpo", **hyperparameters: Any) -> JobSpec:
    return msgspec.convert(
        {
            "base_model": "org/tiny",
            "dataset_id": "ds_x",
            "method": method,
            "hyperparameters": hyperparameters,
        },
        JobSpec,
    )


def test_every_cost_cutter_is_off_by_default() -> None:
    assert {name: getattr(Hyperparameters(), name) for name in CUTTERS} == dict.fromkeys(
        CUTTERS, False
    )


@pytest.mark.parametrize(
    ("field", "method", "users"),
    [
        ("precompute_ref_log_probs", "sft", "dpo"),
        ("precompute_ref_log_probs", "kto", "dpo"),
        ("packing", "dpo", "sft"),
        ("use_liger_kernel", "simpo", "dpo, kto, sft"),
    ],
)
def test_a_cost_cutter_is_refused_on_a_method_it_does_not_apply_to(
    field: str, method: str, users: str
) -> None:
    with pytest.raises(msgspec.ValidationError) as refused:
        _spec(method, **{field: True})
    assert f"hyperparameters.{field} does not apply to method {method!r} (only to {users})" in str(
        refused.value
    )


def test_torch_compile_applies_to_every_method() -> None:
    for method in ("dpo", "sft", "kto", "orpo", "simpo"):
        assert _spec(method, torch_compile=True).hyperparameters.torch_compile


def test_liger_is_refused_by_a_worker_without_the_package_or_without_a_gpu() -> None:
    spec = _spec(use_liger_kernel=True)
    with pytest.raises(ConfigError, match="liger-kernel is not installed"):
        adapt_to_device(spec, "cuda")  # not installed here: it pulls in triton
    with pytest.raises(ConfigError, match="use_liger_kernel needs a GPU"):
        adapt_to_device(spec, "cpu")


def test_a_cpu_worker_turns_torch_compile_off_and_says_so() -> None:
    adapted, notes = adapt_to_device(_spec(torch_compile=True), "cpu")
    assert adapted.hyperparameters.torch_compile is False
    assert any("torch_compile True -> False" in note for note in notes), notes


def _losses(reporter: ListReporter, key: str = "loss") -> dict[int, float]:
    return {step: values[key] for step, values in reporter.points if key in values}


def _settings(model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(models_dir=model_dir.parent, work_dir=tmp_path / "w", device="cpu")


@pytest.mark.slow
def test_precomputed_reference_log_probs_train_the_same_steps_also_after_a_resume(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The precomputed reference log-probs are the numbers the per-step reference forward
    gives, just computed earlier: losses, rewards and the eval loss agree at every step. A
    job resumed from a checkpoint recomputes them in its new process (TRL does it when the
    trainer is built, with the adapter disabled, before the checkpoint's adapter is loaded),
    so it continues exactly. LoRA dropout is off: the precompute pass draws a random number
    per data loader, which would shift dropout's masks (the same training, different draws)."""
    store = open_store((tmp_path / "store").as_uri())
    settings = _settings(tiny_model_dir, tmp_path)
    fields: dict[str, Any] = {
        "eval_fraction": 0.25,
        "lora": {"dropout": 0.0},
        "hyperparameters": {"max_steps": 5, "checkpoint_steps": 2, "eval_steps": 5},
    }
    plain = ListReporter()
    run(
        stage_job(store, tiny_model_dir, ROWS, job_id="job_plain", **fields),
        tmp_path / "p",
        plain,
        settings=settings,
        store=store,
    )
    fields["hyperparameters"]["precompute_ref_log_probs"] = True
    job = stage_job(store, tiny_model_dir, ROWS, job_id="job_pre", **fields)
    first = ListReporter()
    first.cancel_after_step = 3
    with pytest.raises(JobCancelled):
        run(job, tmp_path / "pre-1", first, settings=settings, store=store)
    second = ListReporter()
    run(job, tmp_path / "pre-2", second, settings=settings, store=store)

    assert any("resuming from the checkpoint at step 2" in line for line in second.logs)
    for key in ("loss", "rewards/chosen", "rewards/margins", "eval_loss"):
        resumed = {s: v for s, v in _losses(first, key).items() if s <= 2} | _losses(second, key)
        assert list(resumed) == list(_losses(plain, key)), key
        assert resumed == pytest.approx(_losses(plain, key), abs=1e-5, rel=0), key
    assert _losses(plain, "rewards/margins")[5] != 0  # the reference did matter


def test_precomputed_reference_log_probs_are_refused_on_several_processes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """TRL caches them in a file only rank 0 finds: refused before anything is downloaded
    (this job's dataset is not even in the store)."""
    store = open_store((tmp_path / "store").as_uri())
    job = stage_job(store, tiny_model_dir, ROWS, hyperparameters={"precompute_ref_log_probs": True})
    store.delete(dataset_blob_key(job.dataset.sha256))
    settings = replace(_settings(tiny_model_dir, tmp_path), worker_gpus=2)
    with pytest.raises(ConfigError, match="cannot train on workers of several GPUs"):
        run(job, tmp_path / "work", ListReporter(), settings=settings, store=store)


async def test_the_api_refuses_them_when_its_workers_have_several_gpus(
    api_settings: Settings,
) -> None:
    async with AsyncTestClient(create_app(replace(api_settings, worker_gpus=2))) as client:
        rows = "".join(json.dumps(r) + "\n" for r in ROWS)
        headers = {**ALICE, "Content-Type": "application/x-ndjson"}
        ds = (await client.post("/v1/datasets", content=rows, headers=headers)).json()
        body = {"base_model": "org/tiny", "dataset_id": ds["id"]}
        hp = {"precompute_ref_log_probs": True}
        resp = await client.post("/v1/jobs", json={**body, "hyperparameters": hp}, headers=ALICE)
        assert resp.status_code == 422, resp.text
        loc = ["body", "hyperparameters", "precompute_ref_log_probs"]
        assert resp.json()["errors"][0]["loc"] == loc
        assert (await client.post("/v1/jobs", json=body, headers=ALICE)).status_code == 201


@pytest.mark.slow
def test_packed_sft_trains_the_same_loss_as_padded_in_fewer_steps(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Packing (TRL's padding-free best-fit packing) must not let a row attend to the rows
    packed beside it: with every row in one step, the loss and gradient norm are those of
    the padded batch, to float32 rounding (the same tokens, summed in another order; 1e-5
    is far below what one leaked token would change). With smaller batches it makes fewer
    steps an epoch, since a batch then counts packed sequences of max_length tokens."""
    store = open_store((tmp_path / "store").as_uri())
    settings = _settings(tiny_model_dir, tmp_path)

    def train(name: str, **hp: Any) -> ListReporter:
        reporter = ListReporter()
        hp = {"max_steps": None, "num_epochs": 1.0, **hp}
        job = stage_job(
            store, tiny_model_dir, SFT_ROWS, job_id=f"job_{name}", method="sft", hyperparameters=hp
        )
        run(job, tmp_path / name, reporter, settings=settings, store=store)
        return reporter

    padded, packed = train("padded", batch_size=16), train("packed", batch_size=16, packing=True)
    for key in ("loss", "grad_norm", "num_tokens"):
        assert _losses(packed, key) == pytest.approx(_losses(padded, key), abs=1e-5, rel=1e-5)
    assert list(_losses(padded)) == [1]

    padded, packed = train("padded2", batch_size=2), train("packed2", batch_size=2, packing=True)
    assert len(_losses(padded)) == len(SFT_ROWS) // 2
    assert 0 < len(_losses(packed)) < len(_losses(padded)) / 2


@pytest.mark.slow
def test_a_continued_adapter_is_precomputed_against_itself(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """DPO after SFT: TRL's frozen `ref` copy of the continued adapter gives the precomputed
    reference log-probs, as it gives the per-step ones; against the bare base instead, step 1
    would show rewards away from 0 (the SFT adapter already moved the policy)."""
    store = open_store((tmp_path / "store").as_uri())
    settings = _settings(tiny_model_dir, tmp_path)
    sft = stage_job(store, tiny_model_dir, SFT_ROWS, job_id="job_sft", method="sft")
    (adapter,) = run(
        sft, tmp_path / "sft", ListReporter(), settings=settings, store=store
    ).artifacts

    def dpo(name: str, **hp: Any) -> ListReporter:
        job = stage_job(
            store,
            tiny_model_dir,
            ROWS,
            job_id=f"job_{name}",
            init_from={"job_id": "job_sft"},
            hyperparameters={"max_steps": 3, **hp},
        )
        reporter = ListReporter()
        run(
            msgspec.structs.replace(job, init_adapter=adapter.uri),
            tmp_path / name,
            reporter,
            settings=settings,
            store=store,
        )
        return reporter

    per_step, precomputed = dpo("per_step"), dpo("pre", precompute_ref_log_probs=True)
    first = precomputed.points[0][1]
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert _losses(precomputed, key) == pytest.approx(_losses(per_step, key), abs=1e-5), key
