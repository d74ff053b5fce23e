"""No silent data loss: every row is trained on, held out by prompt, or dropped and counted.

The row preparation must match what TRL trains on (so its counts are true), pairs that
max_length would turn into identical token sequences are excluded and reported, and the eval
split never puts a prompt on both sides. What the worker did reaches the job record, its
events and the model card.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gpu_worker.data import apply_chat_template, pair_token_ids, to_dataset
from gpu_worker.model import load_model, load_tokenizer
from gpu_worker.pipeline import run
from gpu_worker.reporter import ListReporter, QueueReporter
from gpu_worker.supervisor import Supervisor
from gpu_worker.trainer import build_config, build_trainer
from service.blobs import BlobStore, open_store
from service.contract import (
    ChatTemplate,
    DataReport,
    DatasetRef,
    DroppedRows,
    Job,
    JobSpec,
    JobStatus,
)
from service.metrics import WorkerMetrics
from service.settings import Settings
from service.store import Store, new_id
from tests.fixtures.tiny_model import preference_rows, stage_job

VERBOSE = " Additionally, it is important to remember that the weather, the park and the city"
"""A long shared tail, like the demo's verbose rejected answers: cut anywhere inside it, the
chosen and rejected answers below are the same tokens."""


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return open_store((tmp_path / "store").as_uri())


@pytest.fixture
def settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(models_dir=tiny_model_dir.parent, work_dir=tmp_path / "work", device="cpu")


def _prompts_x_pairs(prompts: int, pairs: int) -> list[dict[str, str]]:
    return [
        {
            "prompt": f"What do you think of place number {p}?",
            "chosen": f"I think it was wonderful and great, {k}.",
            "rejected": f"I think it was terrible and awful, {k}.",
        }
        for p in range(prompts)
        for k in range(pairs)
    ]


def test_pair_tokens_are_what_trl_trains_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Our counts come from the same token ids as TRL's own preprocessing, for chat and raw text."""
    spec = msgspec.convert(
        {"base_model": "org/tiny", "dataset_id": "ds_x", "quantization": {"bits": None}},
        JobSpec,
    )
    tokenizer = load_tokenizer(tiny_model_dir)
    raw = preference_rows(6)
    for rows in (apply_chat_template(raw, tokenizer, ChatTemplate(), print), raw):
        trainer = build_trainer(
            load_model(tiny_model_dir, spec, "cpu"),
            tokenizer,
            spec,
            build_config(spec, tmp_path / "out", "cpu"),
            to_dataset(rows),
            None,
        )
        prepared: Any = trainer.train_dataset
        theirs = [(len(ex["prompt_ids"]), ex["chosen_ids"], ex["rejected_ids"]) for ex in prepared]
        assert list(pair_token_ids(rows, tokenizer)) == theirs


@pytest.mark.slow
def test_pairs_identical_after_truncation_are_excluded_and_counted(
    tiny_model_dir: Path, store: BlobStore, settings: Settings, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    good = preference_rows(16)
    verbose = [
        {
            "prompt": f"Describe place number {i}.",
            "chosen": f"It was nice.{VERBOSE} stay in my memory, {i}.",
            "rejected": f"It was nice.{VERBOSE} fade from my memory, {i}.",
        }
        for i in range(5)
    ]
    templated = apply_chat_template(good + verbose, tokenizer, ChatTemplate(), print)
    pairs = list(pair_token_ids(templated, tokenizer))
    # Room for every whole answer of `good`, but not past the shared part of `verbose`.
    max_length = max(n + max(len(c), len(r)) for n, c, r in pairs[:16])
    assert all(n + len(c) > max_length + 8 for n, c, _ in pairs[16:])
    job = stage_job(
        store,
        tiny_model_dir,
        good + verbose,
        hyperparameters={"max_steps": 2, "max_length": max_length},
    )
    reporter = ListReporter()

    run(job, tmp_path / "work", reporter, settings=settings, store=store)

    data: DataReport = reporter.fields["data"]
    assert data.dropped == DroppedRows(identical_after_truncation=5)
    assert reporter.fields["rows_dropped"] == 5 and data.train_rows == 16
    assert any(
        f"dropped 5 training rows that do not fit max_length={max_length} "
        "(5 identical after truncation)" in line
        for line in reporter.logs
    )
    card = store.get_bytes(f"jobs/{job.id}/artifacts/adapter/README.md").decode()
    assert "| training rows dropped: identical after truncation | 5 |" in card
    assert "| rows trained on | 16 |" in card


@pytest.mark.slow
def test_eval_split_is_prompt_disjoint_and_reported(
    tiny_model_dir: Path, store: BlobStore, settings: Settings, tmp_path: Path
) -> None:
    rows = _prompts_x_pairs(100, 3)
    job = stage_job(
        store,
        tiny_model_dir,
        rows + rows[:4],  # 4 exact repeats
        eval_fraction=0.1,
        hyperparameters={"max_steps": 1},
    )
    reporter = ListReporter()

    result = run(job, tmp_path / "work", reporter, settings=settings, store=store)

    data: DataReport = reporter.fields["data"]
    assert (data.train_rows, data.eval_rows, data.eval_prompts) == (270, 30, 10)
    assert data.eval_source == "split" and data.eval_prompt_disjoint
    assert data.eval_prompts_shared == 0 and data.duplicates_removed == 4
    assert reporter.fields["rows_dropped"] == 4  # trained + eval + dropped = rows given
    assert any(
        "270 training rows, 30 eval rows (10 prompts held out by prompt, none of them in "
        "training); removed 4 exact duplicate rows" in line
        for line in reporter.logs
    )
    assert "eval_rewards/accuracies" in result.final_metrics
    card = store.get_bytes(f"jobs/{job.id}/artifacts/adapter/README.md").decode()
    assert "| rows evaluated on | 30 (10 prompts, none of them a training prompt) |" in card
    assert "| duplicate rows removed | 4 |" in card


@pytest.mark.slow
def test_an_eval_dataset_sharing_prompts_with_training_is_reported(
    tiny_model_dir: Path, store: BlobStore, settings: Settings, tmp_path: Path
) -> None:
    rows = _prompts_x_pairs(20, 2)
    shared = [{**row, "chosen": "It was truly wonderful."} for row in rows[:6:2]]  # 3 prompts
    fresh = _prompts_x_pairs(24, 1)[20:]  # 4 new prompts
    job = stage_job(
        store, tiny_model_dir, rows, eval_rows=shared + fresh, hyperparameters={"max_steps": 1}
    )
    reporter = ListReporter()

    run(job, tmp_path / "work", reporter, settings=settings, store=store)

    data: DataReport = reporter.fields["data"]
    assert data.eval_source == "eval_dataset" and (data.eval_rows, data.eval_prompts) == (7, 7)
    assert not data.eval_prompt_disjoint and data.eval_prompts_shared == 3
    assert any(
        "(7 prompts from eval_dataset_id, 3 of them also in training)" in line
        for line in reporter.logs
    )


async def test_the_data_report_reaches_the_job_record_and_events(redis_url: str) -> None:
    """Through the real child-to-worker queue (pickled) into Redis and the job's event stream."""
    store = Store.from_url(redis_url)
    now = time.time()
    job = Job(
        id=new_id("job"),
        tenant="alice",
        status=JobStatus.queued,
        spec=JobSpec(base_model="org/model", dataset_id="ds_x"),
        dataset=DatasetRef(id="ds_x", sha256="0" * 64, rows=300, format="standard"),
        created_at=now,
        updated_at=now,
    )
    await store.redis.set("ftune:ds:ds_x", b"{}")
    await store.create_job(job)
    report = DataReport(
        train_rows=270,
        eval_rows=28,
        eval_prompts=10,
        eval_source="split",
        eval_prompt_disjoint=True,
        eval_prompts_shared=0,
        duplicates_removed=0,
        eval_dropped=DroppedRows(identical_after_truncation=2),
    )
    events: Any = mp.get_context("spawn").Queue()
    reporter = QueueReporter(events, mp.get_context("spawn").Event())
    reporter.update(rows_dropped=report.rows_left_out, data=report)
    reporter.log("data: 270 training rows, 28 eval rows")
    supervisor = Supervisor(store, job, Settings(redis_url=redis_url), "w", WorkerMetrics())

    # A multiprocessing queue hands its items over from a feeder thread: the log line can
    # arrive a poll after the update, so wait for both.
    for _ in range(100):
        supervisor.take(events)
        await supervisor.flush()
        logged = await store.read_events(job.id, after="0", block_ms=None)
        if (await store.get_job(job.id, None)).data is not None and any(
            kind == "log" for _, kind, _ in logged
        ):
            break
        await asyncio.sleep(0.05)

    stored = await store.get_job(job.id, None)
    assert stored.data == report and stored.rows_dropped == 2
    assert any(kind == "log" and b"270 training rows" in data for _, kind, data in logged)
    await store.close()
