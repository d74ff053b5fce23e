"""The trainer's link to the outside: metrics, progress, cancellation and checkpoints in the store.

`ReporterCallback` sees every log TRL makes and forwards it unchanged (plus throughput and memory),
checks the cancel and stop flags after every optimizer step, and copies each checkpoint the
trainer saves to the blob store, so that a job whose worker dies resumes elsewhere from its last
checkpoint (and one stopped on purpose from the step it reached).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from transformers import TrainerCallback

from gpu_worker.reporter import JobCancelled, Reporter
from service.blobs import BlobStore
from service.checkpoints import (
    MANIFEST,
    checkpoint_prefix,
    checkpoints_prefix,
    complete_steps,
    step_of,
)
from service.contract import MetricPoint, Progress

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

METRICS_FILE = "ftune-metrics.jsonl"
"""The metric points up to a checkpoint, so a resumed run can write the whole history."""
KEEP_CHECKPOINTS = 2


def write_points(path: Path, points: list[MetricPoint]) -> None:
    path.write_bytes(b"".join(msgspec.json.encode(p) + b"\n" for p in points))


def read_points(path: Path) -> list[MetricPoint]:
    if not path.is_file():
        return []
    decoder = msgspec.json.Decoder(MetricPoint)
    return [decoder.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


class CheckpointStore:
    """A job's checkpoints in the blob store (the layout is service/checkpoints.py's)."""

    def __init__(self, store: BlobStore, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        self.prefix = checkpoints_prefix(job_id)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return complete_steps(self.store.list(self.prefix), self.prefix)

    def newest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def upload(self, folder: Path, step: int) -> None:
        """Copy a checkpoint folder up, then its manifest, then drop all but the newest ones."""
        prefix = checkpoint_prefix(self.job_id, step)
        manifest = self.store.upload_dir(prefix, folder)
        self.store.put_bytes(prefix + MANIFEST, msgspec.json.encode(manifest))
        keep = set(self.steps()[-KEEP_CHECKPOINTS:])
        oldest_kept = min(keep)
        for key_folder in {
            k[len(self.prefix) :].split("/")[0] for k in self.store.list(self.prefix)
        }:
            old = step_of(key_folder)
            if old is not None and old < oldest_kept:
                self.store.delete_prefix(self.prefix + key_folder)

    def download(self, step: int, output_dir: Path) -> Path:
        """Fetch checkpoint `step` into `output_dir/checkpoint-{step}` (replacing a local copy)."""
        folder = output_dir / f"checkpoint-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        self.store.download_dir(checkpoint_prefix(self.job_id, step), folder)
        (folder / MANIFEST).unlink(missing_ok=True)
        return folder


def memory_bytes() -> int:
    """Peak GPU memory allocated by torch, or the process's resident memory on a CPU."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


class AlreadyTrained(Exception):
    """Raised by `EndAtMaxSteps` before a step past the last one."""


class EndAtMaxSteps(TrainerCallback):
    """A job resumed from the checkpoint of its last step (its worker was lost while it
    evaluated or published) must train nothing more, but transformers' loop checks `max_steps`
    only after a step: it would train one step past it. Every rank ends before that step (all
    have the checkpoint's state, so no collective is left waiting); `train()` has loaded the
    checkpoint's adapter by then."""

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if 0 < state.max_steps <= state.global_step:
            raise AlreadyTrained(f"the checkpoint is at the last step ({state.global_step})")


class ReporterCallback(TrainerCallback):
    """Forwards TRL's logs and the progress to a Reporter; stops on cancel; syncs checkpoints.

    Train logs get three keys of ours: `tokens_per_second` (TRL's `num_tokens` over the time
    spent in optimizer steps since the previous log), `step_seconds` (the mean step time since
    the previous log) and `memory_bytes`. Eval logs (`eval_*`) are forwarded as they are. The
    end-of-training summary (`train_runtime`, `train_loss`, ...) is kept in `summary`.
    """

    def __init__(
        self,
        reporter: Reporter,
        *,
        checkpoints: CheckpointStore | None = None,
        history: list[MetricPoint] | None = None,
        also: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.reporter = reporter
        self.also = also
        """Gets every point the reporter gets (the experiment trackers)."""
        self.checkpoints = checkpoints
        self.points: list[MetricPoint] = list(history or [])
        """Every metric point of the job, including those restored from a checkpoint."""
        self.summary: dict[str, float] = {}
        self._non_finite: set[str] = set()
        self.cancel_seen = False
        self.stopped_at: int | None = None
        """The step at which a planned stop saved its checkpoint and ended training."""
        self._step_started = 0.0
        self._window_seconds = 0.0
        self._window_steps = 0
        self._run_seconds = 0.0
        self._run_steps = 0
        self._last_num_tokens = 0.0

    # -- progress and cancellation -------------------------------------------------------------

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._step_started = time.perf_counter()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        seconds = time.perf_counter() - self._step_started
        self._window_seconds += seconds
        self._window_steps += 1
        self._run_seconds += seconds
        self._run_steps += 1
        remaining = max(state.max_steps - state.global_step, 0)
        self.reporter.progress(
            Progress(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=float(state.epoch or 0.0),
                eta_seconds=remaining * self._run_seconds / self._run_steps,
            )
        )
        if self.reporter.cancelled():
            # Let the trainer log (and checkpoint, if due) this step, then stop at on_epoch_end.
            self.cancel_seen = True
            control.should_training_stop = True
        elif self.reporter.stop_requested() and state.global_step < state.max_steps:
            # A planned stop: the trainer saves a checkpoint of this very step (on_save uploads
            # it), then leaves train(); the next attempt resumes here, not at an older one.
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.cancel_seen:
            raise JobCancelled(f"cancelled at step {state.global_step}")

    # -- metrics -------------------------------------------------------------------------------

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        values = self._finite(
            state.global_step,
            {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)},
        )
        if not values:
            return
        if "train_runtime" in values:
            self.summary = values
            return
        if not any(k.startswith("eval_") for k in values):
            values.update(self._throughput(values))
        self.add_point(state.global_step, values)

    def _finite(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """The values that are numbers. JSON has no NaN or infinity: stored, they read back as
        null and the job's record could not be read. The first of each name is said in the
        job's log (a diverged loss, a gradient that overflowed)."""
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        for name in bad:
            if name not in self._non_finite:
                self._non_finite.add(name)
                self.reporter.log(
                    f"step {step}: {name} is {values[name]}; such values are left out of the "
                    "metrics (a loss that diverged, or a gradient that overflowed)"
                )
        return {k: v for k, v in values.items() if k not in bad} if bad else values

    def add_point(self, step: int, values: dict[str, float]) -> None:
        """Record and report a metric point (TRL's logs, and metrics measured after training)."""
        values = self._finite(step, values)
        if not values:
            return
        self.points.append(MetricPoint(step=step, time=time.time(), values=values))
        self.reporter.metrics(step, values)
        if self.also is not None:
            self.also(step, values)

    def _throughput(self, values: dict[str, float]) -> dict[str, float]:
        extra = {"memory_bytes": float(memory_bytes())}
        if self._window_steps:
            extra["step_seconds"] = self._window_seconds / self._window_steps
            if "num_tokens" in values and self._window_seconds > 0:
                tokens = values["num_tokens"] - self._last_num_tokens
                extra["tokens_per_second"] = tokens / self._window_seconds
        self._last_num_tokens = values.get("num_tokens", self._last_num_tokens)
        self._window_seconds = 0.0
        self._window_steps = 0
        return extra

    # -- checkpoints ---------------------------------------------------------------------------

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.checkpoints is None:
            return
        folder = Path(args.output_dir or ".") / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        write_points(folder / METRICS_FILE, self.points)
        self.checkpoints.upload(folder, state.global_step)
        key = f"{self.checkpoints.prefix}checkpoint-{state.global_step}"
        self.reporter.log(f"checkpoint saved to {self.checkpoints.store.uri(key)}")
