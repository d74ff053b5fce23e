"""One training job from start to finish: prepare → train → evaluate → merge → upload.

`run` is meant to be read top to bottom; each step is a call into data, model, trainer,
callbacks, merge or publish. It runs in the worker's child process and talks to the outside only
through the Reporter (phases, progress, metrics, logs, record fields) and the blob store.

Local layout under `workdir`: `data/` (dataset JSONL), `output/` (the trainer's checkpoints),
`adapter/` and `merged/` (the artifacts, each with spec.json, metrics.jsonl and, if
eval_prompts were given, eval_generations.jsonl).
"""

from __future__ import annotations

import gc
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from gpu_worker import distributed
from gpu_worker.callbacks import METRICS_FILE, CheckpointStore, ReporterCallback, read_points
from gpu_worker.callbacks import write_points as write_metrics
from gpu_worker.data import (
    apply_chat_template,
    fetch_rows,
    fit_max_length,
    kto_rows,
    prompt_key,
    remove_duplicates,
    split_eval,
    to_dataset,
)
from gpu_worker.errors import ConfigError, DatasetError
from gpu_worker.generations import generate_side_by_side, generate_with_merged
from gpu_worker.init_from import fetch_adapter
from gpu_worker.model import load_model, load_tokenizer, resolve_model
from gpu_worker.reporter import JobCancelled, JobStopped, Reporter
from gpu_worker.tracking import Tracking
from gpu_worker.trainer import adapt_to_device, build_config, build_trainer, resolve_device, train
from gpu_worker.turns import Row
from service import tenants
from service.blobs import BlobStore
from service.contract import (
    Artifact,
    DataReport,
    DroppedRows,
    Generation,
    HubDestination,
    Job,
    JobSpec,
    MetricPoint,
    Phase,
)
from service.settings import Settings, SettingsError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_OUR_KEYS = ("tokens_per_second", "step_seconds", "memory_bytes")


class PipelineResult(msgspec.Struct, kw_only=True):
    artifacts: list[Artifact]
    final_metrics: dict[str, float]


def run(
    job: Job, workdir: Path, reporter: Reporter, *, settings: Settings, store: BlobStore
) -> PipelineResult:
    """Train `job` in `workdir` and publish its artifacts; raises JobFailure, JobCancelled or
    JobStopped (a planned stop: SIGTERM during preparation or training)."""
    _quiet_progress_bars()
    reporter.phase(Phase.preparing)
    _check_grants(job, settings)
    tracking = Tracking.start(job, settings, reporter)
    try:
        result = _run(job, workdir, reporter, settings=settings, store=store, tracking=tracking)
    except BaseException as exc:
        tracking.finish(_outcome(exc))
        raise
    tracking.finish("succeeded", result.final_metrics, result.artifacts)
    return result


def _outcome(exc: BaseException) -> str:
    """What the trackers are told: `stopped` leaves their run open for the next attempt."""
    if isinstance(exc, JobCancelled):
        return "cancelled"
    return "stopped" if isinstance(exc, JobStopped) else "failed"


def _run(
    job: Job,
    workdir: Path,
    reporter: Reporter,
    *,
    settings: Settings,
    store: BlobStore,
    tracking: Tracking,
) -> PipelineResult:
    device = resolve_device(settings.device)
    spec, notes = adapt_to_device(job.spec, device)
    processes = distributed.world_size(settings.worker_gpus, device)
    distributed.check_strategy(spec, device, processes)
    for note in notes:
        reporter.log(note)
    # Ranks 1..N-1 (several GPUs) start now and import the training stack while this process
    # prepares; `group.begin` hands them what they need to train alongside it.
    with distributed.launch(processes, workdir / "ranks", reporter.abandon) as group:
        rows = fetch_rows(store, job.dataset, workdir / "data")
        eval_rows = (
            fetch_rows(store, job.eval_dataset, workdir / "data") if job.eval_dataset else None
        )
        model_dir = resolve_model(
            spec.base_model, spec.revision, settings=settings, workdir=workdir
        )
        tokenizer = load_tokenizer(model_dir)
        init_adapter = fetch_adapter(
            job, model_dir, settings=settings, store=store, dest=workdir / "init-adapter"
        )
        rows, eval_rows, data = _prepare_rows(rows, eval_rows, tokenizer, spec, reporter)
        job = msgspec.structs.replace(job, rows_dropped=data.rows_left_out, data=data)  # card
        reporter.log(f"{len(rows)} training rows, {len(eval_rows)} eval rows, device {device}")
        model = load_model(model_dir, spec, device, sharded=distributed.shards(spec, processes))
        _stop_if_cancelled(reporter)
        if reporter.stop_requested():  # nothing trained yet: the next attempt loses only loading
            raise JobStopped("stopped before training")

        reporter.phase(Phase.training)
        output_dir = workdir / "output"
        checkpoints = CheckpointStore(store, job.id)
        resume_from, history = _fetch_newest_checkpoint(checkpoints, output_dir, reporter)
        callback = ReporterCallback(
            reporter, checkpoints=checkpoints, history=history, also=tracking.log
        )
        if spec.method == "kto":
            rows = kto_rows(rows, spec.hyperparameters.seed)
        plan = distributed.Plan(
            spec=spec,
            model_dir=str(model_dir),
            rows=rows,
            eval_rows=eval_rows,
            init_adapter=str(init_adapter) if init_adapter else None,
            resume_from=str(resume_from) if resume_from else None,
            output_dir=str(output_dir),
            device="cuda" if device == "cuda" else "cpu",
            world_size=processes,
            timeout_seconds=settings.worker_collective_timeout_seconds,
        )
        group.begin(plan, reporter.log)
        parallel = distributed.parallel_arguments(spec, processes, device, plan.timeout_seconds)
        trainer = build_trainer(
            model,
            tokenizer,
            spec,
            build_config(spec, output_dir, device, has_eval=bool(eval_rows), parallel=parallel),
            to_dataset(rows, tokenizer, reporter.log, spec.method),
            to_dataset(eval_rows, tokenizer, method=spec.method) if eval_rows else None,
            [*distributed.rank_states(plan, 0), callback, *group.callbacks],
            init_adapter=init_adapter,
        )
        if not train(trainer, plan.resume_from):
            reporter.log("the checkpoint is of the last step: nothing left to train")
        if callback.stopped_at is not None:
            raise JobStopped(f"stopped at step {callback.stopped_at}, checkpoint saved")
        reporter.phase(Phase.evaluating)
        adapter_dir = workdir / "adapter"
        evaluated = _eval_at(callback, trainer.state.global_step) if eval_rows else {}
        final_eval, ranks = distributed.after_training(
            trainer, group, adapter_dir, evaluate=bool(eval_rows) and not evaluated
        )
    if ranks:
        reporter.log(distributed.describe(ranks))
    # A pickle of the training arguments: not needed to load the adapter, unsafe to unpickle.
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    # The frozen reference copy TRL adds when an adapter is continued: the starting point,
    # not part of the result.
    shutil.rmtree(adapter_dir / "ref", ignore_errors=True)

    final_metrics = _final_train_metrics(callback, resumed=plan.resume_from is not None)
    if eval_rows:
        final_metrics |= evaluated or final_eval
        final_metrics = {k: v for k, v in final_metrics.items() if math.isfinite(v)}
        if spec.method == "sft":
            from gpu_worker.rouge import rouge_scores

            rouge = rouge_scores(trainer.model, tokenizer, eval_rows, spec, device)
            callback.add_point(trainer.state.global_step, rouge)
            final_metrics |= rouge
    publish_merged = spec.output.artifacts in ("merged", "both")
    generations = []
    if spec.eval_prompts and not publish_merged:  # else from the merged model, once it exists
        generations = generate_side_by_side(trainer.model, tokenizer, spec, device)
        reporter.update(eval_generations=generations)
    del trainer, model
    _free_memory()
    _stop_if_cancelled(reporter)

    outputs: dict[Literal["adapter", "merged"], Path] = {}
    if spec.output.artifacts in ("adapter", "both"):
        outputs["adapter"] = adapter_dir
    if publish_merged:
        reporter.phase(Phase.merging)
        from gpu_worker.merge import merge_adapter

        outputs["merged"] = workdir / "merged"
        dtype = _merge_dtype(model_dir)
        merge_adapter(model_dir, adapter_dir, outputs["merged"], dtype=dtype)
        if spec.eval_prompts:
            reporter.log(f"eval_prompts: generating with the merged model ({dtype})")
            generations = generate_with_merged(
                model_dir, outputs["merged"], tokenizer, spec, device, dtype=dtype
            )
            reporter.update(eval_generations=generations)
        _stop_if_cancelled(reporter)  # merging takes minutes on a real model

    reporter.phase(Phase.uploading)
    from service.publish import publish

    artifacts = []
    for kind, folder in outputs.items():
        _describe(folder, job.spec, callback.points, generations)
        artifacts.append(
            publish(
                folder,
                kind=kind,
                job=job,
                settings=settings,
                store=store,
                final_metrics=final_metrics,
            )
        )
    return PipelineResult(artifacts=artifacts, final_metrics=final_metrics)


def _prepare_rows(
    rows: list[Row],
    eval_rows: list[Row] | None,
    tokenizer: PreTrainedTokenizerBase,
    spec: JobSpec,
    reporter: Reporter,
) -> tuple[list[Row], list[Row], DataReport]:
    """Duplicates out, chat template, eval split by prompt, rows that no longer carry a
    preference at max_length out; every row is counted in the DataReport, reported and logged.

    The split comes before the length filter so that which prompts are held out does not
    depend on max_length.
    """
    max_length = spec.hyperparameters.max_length
    rows, duplicates = remove_duplicates(rows)
    rows = apply_chat_template(rows, tokenizer, spec.chat_template, reporter.log)
    if eval_rows is None:
        rows, eval_rows = split_eval(rows, spec.eval_fraction, spec.hyperparameters.seed)
        source: Literal["split", "eval_dataset", "none"] = "split" if eval_rows else "none"
    else:
        eval_rows, eval_duplicates = remove_duplicates(eval_rows)
        duplicates += eval_duplicates
        eval_rows = apply_chat_template(eval_rows, tokenizer, spec.chat_template, reporter.log)
        source = "eval_dataset"
    rows, dropped = fit_max_length(rows, tokenizer, max_length)
    eval_rows, eval_dropped = fit_max_length(eval_rows, tokenizer, max_length)
    eval_keys = {prompt_key(row["prompt"]) for row in eval_rows}
    shared = len(eval_keys & {prompt_key(row["prompt"]) for row in rows})
    report = DataReport(
        train_rows=len(rows),
        eval_rows=len(eval_rows),
        eval_prompts=len(eval_keys),
        eval_source=source,
        eval_prompt_disjoint=shared == 0,
        eval_prompts_shared=shared,
        duplicates_removed=duplicates,
        dropped=dropped,
        eval_dropped=eval_dropped,
    )
    reporter.update(rows_dropped=report.rows_left_out, data=report)
    reporter.log(_describe_data(report, max_length))
    if not rows:
        raise DatasetError(
            f"all {dropped.total} training rows were dropped as not fitting "
            f"max_length={max_length} tokens ({_reasons(dropped)}). Raise "
            "hyperparameters.max_length or shorten the prompts"
        )
    return rows, eval_rows, report


def _describe_data(report: DataReport, max_length: int) -> str:
    """One log line (an event the user sees) accounting for every row."""
    line = f"data: {report.train_rows} training rows, {report.eval_rows} eval rows"
    if report.eval_source != "none":
        where = "held out by prompt" if report.eval_source == "split" else "from eval_dataset_id"
        overlap = (
            "none of them in training"
            if report.eval_prompt_disjoint
            else f"{report.eval_prompts_shared} of them also in training"
        )
        line += f" ({report.eval_prompts} prompts {where}, {overlap})"
    if report.duplicates_removed:
        line += f"; removed {report.duplicates_removed} exact duplicate rows"
    for side, dropped in (("training", report.dropped), ("eval", report.eval_dropped)):
        if dropped.total:
            line += (
                f"; dropped {dropped.total} {side} rows that do not fit max_length={max_length} "
                f"({_reasons(dropped)})"
            )
    return line


def _reasons(dropped: DroppedRows) -> str:
    counts = msgspec.structs.asdict(dropped)
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in counts.items() if n)


def _quiet_progress_bars() -> None:
    """Progress goes through the reporter; console bars would only fill the worker's log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _stop_if_cancelled(reporter: Reporter) -> None:
    if reporter.cancelled():
        raise JobCancelled("cancelled between phases")


def _check_grants(job: Job, settings: Settings) -> None:
    """The tenant's grants again, before anything is downloaded or uploaded: the API checked
    them at submit, but a record edited in Redis must not borrow a token or bucket."""
    try:
        tenants.check_job(tenants.load(settings), job.tenant, job.spec, settings.store_url)
    except tenants.GrantMissing as exc:
        raise ConfigError(f"refused before any download or upload: {exc.detail}") from None
    except SettingsError as exc:
        raise ConfigError(f"the workers' tenants file cannot be read: {exc}") from None
    destination = job.spec.output.destination
    if isinstance(destination, HubDestination):
        from service.publish import PublishError, hub_token

        try:  # said before hours of training, not when the upload finds it missing
            hub_token(destination, settings)
        except PublishError as exc:
            raise ConfigError(f"refused before training: {exc}") from None


def _fetch_newest_checkpoint(
    checkpoints: CheckpointStore, output_dir: Path, reporter: Reporter
) -> tuple[Path | None, list[MetricPoint]]:
    """The newest stored checkpoint, downloaded, and the metric points up to it."""
    step = checkpoints.newest()
    if step is None:
        return None, []
    folder = checkpoints.download(step, output_dir)
    reporter.log(f"resuming from the checkpoint at step {step}")
    return folder, [p for p in read_points(folder / METRICS_FILE) if p.step <= step]


def _final_train_metrics(callback: ReporterCallback, *, resumed: bool) -> dict[str, float]:
    """The last training log (TRL's keys) and the end-of-training summary (`train_loss`, ...).
    A resumed run's summary covers only the steps it trained (none, resumed at the last step),
    so its `train_loss` is made from every step's logged loss, as an unbroken run's is; its
    runtime and throughput figures stay those of the last attempt."""
    last: dict[str, float] = {}
    losses: dict[int, float] = {}
    for point in callback.points:
        if not any(k.startswith("eval_") for k in point.values):
            last = {k: v for k, v in point.values.items() if k not in _OUR_KEYS}
            if "loss" in point.values:
                losses[point.step] = point.values["loss"]  # a step trained again: its last
    final = last | callback.summary
    if resumed and losses:
        # Each logged loss is the mean over the steps since the one logged before it.
        ends = sorted(losses)
        total = sum(losses[e] * (e - b) for b, e in zip([0, *ends], ends, strict=False))
        final["train_loss"] = total / ends[-1]
    return final


def _eval_at(callback: ReporterCallback, step: int) -> dict[str, float]:
    """The eval metrics logged at `step` if eval_steps already evaluated there, else empty."""
    last = callback.points[-1] if callback.points else None
    if last is None or last.step != step or "eval_loss" not in last.values:
        return {}
    return last.values


def _merge_dtype(model_dir: Path) -> str:
    """The base's own dtype from its config (its 16-bit width in practice), else bfloat16."""
    config = json.loads((model_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16"


def _describe(
    folder: Path, spec: JobSpec, points: list[MetricPoint], generations: list[Generation]
) -> None:
    """spec.json, metrics.jsonl (and eval_generations.jsonl): the artifact explains itself.

    The spec goes without its webhook_url: it says nothing of the training, may hold
    credentials, and the artifact is published as it is."""
    shown = msgspec.structs.replace(spec, webhook_url=None)
    (folder / "spec.json").write_bytes(msgspec.json.format(msgspec.json.encode(shown)) + b"\n")
    write_metrics(folder / "metrics.jsonl", points)
    if generations:
        lines = [msgspec.json.encode(g) + b"\n" for g in generations]
        (folder / "eval_generations.jsonl").write_bytes(b"".join(lines))


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
