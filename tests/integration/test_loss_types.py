"""The loss types we accept are exactly the installed TRL's, and every one of them trains.

TRL has no public list of its DPO losses; the truth is the `if loss_type == ...` chain in
`DPOTrainer`'s loss. Reading it here means a TRL upgrade that adds, renames or removes a loss
(as `aot_pair` became `aot_unpaired`) fails these tests instead of users' jobs at step 1.
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest

from gpu_worker.pipeline import run
from gpu_worker.reporter import ListReporter
from service.blobs import open_store
from service.contract import BETA_FREE_LOSSES, LABEL_SMOOTHING_LOSSES, LossType
from service.settings import Settings
from tests.fixtures.tiny_model import preference_rows, stage_job


def trl_loss_branches() -> dict[str, set[str]]:
    """Each loss type TRL's DPOTrainer implements, with the `self.` attributes its formula reads."""
    from trl.trainer import dpo_trainer

    branches: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(inspect.getsource(dpo_trainer))):
        test = node.test if isinstance(node, ast.If) else None
        if not (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "loss_type"
            and isinstance(test.ops[0], ast.Eq)
            and isinstance(test.comparators[0], ast.Constant)
        ):
            continue
        assert isinstance(node, ast.If)
        branches[str(test.comparators[0].value)] = {
            sub.attr
            for stmt in node.body
            for sub in ast.walk(stmt)
            if isinstance(sub, ast.Attribute)
            and isinstance(sub.value, ast.Name)
            and sub.value.id == "self"
        }
    return branches


def test_loss_types_are_exactly_the_installed_trls() -> None:
    assert {t.value for t in LossType} == set(trl_loss_branches())


def test_label_smoothing_and_beta_are_accepted_exactly_where_trl_reads_them() -> None:
    branches = trl_loss_branches()
    assert {t.value for t in LABEL_SMOOTHING_LOSSES} == {
        loss for loss, reads in branches.items() if "label_smoothing" in reads
    }
    assert {t.value for t in BETA_FREE_LOSSES} == {
        loss for loss, reads in branches.items() if "beta" not in reads
    }


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", list(LossType), ids=str)
def test_every_accepted_loss_type_trains_a_step(
    loss_type: LossType, tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = open_store((tmp_path / "store").as_uri())
    smoothing = 0.1 if loss_type in LABEL_SMOOTHING_LOSSES else 0.0  # exo_pair needs > 0
    job = stage_job(
        store,
        tiny_model_dir,
        preference_rows(8),
        hyperparameters={"max_steps": 1, "loss_type": loss_type, "label_smoothing": smoothing},
    )
    settings = Settings(models_dir=tiny_model_dir.parent, work_dir=tmp_path / "w", device="cpu")
    reporter = ListReporter()

    run(job, tmp_path / "work", reporter, settings=settings, store=store)

    ((step, values),) = [(s, v) for s, v in reporter.points if "loss" in v]
    assert step == 1 and math.isfinite(values["loss"]) and values["grad_norm"] > 0
    from safetensors.torch import load

    adapter = load(store.get_bytes(f"jobs/{job.id}/artifacts/adapter/adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
