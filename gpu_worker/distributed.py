"""One job across all of a worker's GPUs: one process (rank) per GPU, rank 0 being the job's
training child.

Rank 0 does everything a one-process job does (data, checkpoint to resume from, reporting,
checkpoint uploads, evaluation, publishing). When the job starts it starts ranks 1..N-1 as
subprocesses (`python -m gpu_worker.distributed PLAN RANK`, like torchrun would), which import
the training stack while rank 0 prepares, then read the plan rank 0 writes just before training
(`Group.begin`), load the base on their own GPU, build the same trainer from the same prepared
rows, train on their share of every batch and exit after training; transformers/accelerate see
the usual torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) and do the DDP or FSDP
wrapping.

Rank 0 alone decides when training stops (a cancel, a SIGTERM, the end): `StepSync` hands its
decision to every rank after each optimizer step, so all save the same checkpoint and leave
together; a SIGTERM reaching the other ranks (sent to the process group) is ignored for that
reason. If rank 0 leaves training with an error, a cancel or a planned stop, it kills the
others (and the kernel kills them if rank 0 dies). A rank that dies fails the job, and the error
names the rank and what it raised: gloo usually sees the closed connection at once, NCCL only
at the collective timeout (`FTUNE_WORKER_COLLECTIVE_TIMEOUT_SECONDS`), so a watch thread in rank
0 abandons the job (`Reporter.abandon`) if rank 0's process is still there `STUCK_SECONDS` after
another rank died: measured on the CPU, gloo waited on a killed rank's connection for minutes,
in a collective and also after one, when the failed run's DDP model was freed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import msgspec
from torch.distributed.elastic.utils.distributed import get_free_port
from transformers import TrainerCallback

from gpu_worker.errors import ConfigError, JobFailure
from gpu_worker.reporter import JobCancelled, JobStopped
from service.contract import JobSpec, Untrainable, check_trainable

if TYPE_CHECKING:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

PLAN_FILE = "plan.json"
JOIN_SECONDS = 120.0
"""How long rank 0 waits for the other ranks to exit after the last collective."""
STUCK_SECONDS = 15.0
"""How long rank 0 may go on after another rank died before the job is abandoned: enough for a
collective's error to end training the ordinary way (with the planned clean-up)."""


TORCHRUN_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
"""What torchrun sets and accelerate reads; set while a process is in the group."""


class DistributedError(JobFailure):
    """A rank other than 0 failed or vanished: the job fails instead of hanging."""


class Plan(msgspec.Struct, kw_only=True, frozen=True):
    """What the other ranks need to build the same trainer as rank 0 (written as JSON)."""

    spec: JobSpec
    model_dir: str
    rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    init_adapter: str | None
    resume_from: str | None
    output_dir: str
    device: Literal["cpu", "cuda"]
    world_size: int
    port: int = 0
    """The rendezvous port on 127.0.0.1, chosen by `Group.begin`."""
    timeout_seconds: int

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def rank_output_dir(self, rank: int) -> Path:
        """Rank 0's checkpoints are the job's; the others write only their RNG state, kept
        apart so it cannot race rank 0's upload of a checkpoint folder."""
        out = Path(self.output_dir)
        return out if rank == 0 else out.with_name(f"{out.name}-rank{rank}")


def world_size(workers_gpus: int, device: str) -> int:
    """The number of processes a job trains in: the worker's GPUs (on a CPU worker, that many
    gloo processes, which is how the data-parallel path is tested)."""
    if device == "cuda" and workers_gpus > 1:
        import torch

        visible = torch.cuda.device_count()
        if visible < workers_gpus:
            raise ConfigError(
                f"the worker is configured for {workers_gpus} GPUs (FTUNE_WORKER_GPUS) but sees "
                f"{visible}: fix FTUNE_WORKER_GPUS or the pod's GPU request"
            )
    return workers_gpus


def check_strategy(spec: JobSpec, device: str, size: int) -> None:
    """Refuse, before anything is downloaded, what TRL would refuse once the model is loaded
    (a job queued before the API checked it) and what FSDP cannot do here."""
    try:
        check_trainable(spec, size)
    except Untrainable as exc:
        raise ConfigError(str(exc)) from None
    if not shards(spec, size):
        return
    if device != "cuda":
        raise ConfigError(
            "parallelism.strategy 'fsdp' needs GPU workers (on a CPU, accelerate would "
            "silently train plain DDP instead): use strategy 'ddp' on a CPU worker"
        )
    sft_eval = spec.method == "sft" and (spec.eval_fraction > 0 or spec.eval_dataset_id is not None)
    if spec.eval_prompts or sft_eval:
        raise ConfigError(
            "parallelism.strategy 'fsdp' cannot yet generate from the sharded model after "
            "training (eval_prompts, and ROUGE on an sft eval set): remove them, or use 'ddp'"
        )


def parallel_arguments(spec: JobSpec, size: int, device: str, timeout: int) -> dict[str, Any]:
    """The TrainingArguments of a multi-process run (none for one process).

    FSDP follows the FSDP-QLoRA recipe of the peft and bitsandbytes docs (FSDP1, full shard,
    wrap per decoder layer, no `use_orig_params`, weights loaded on rank 0 and broadcast);
    checked on paper only: on a CPU accelerate ignores these settings and trains plain DDP
    (measured), so `check_strategy` refuses FSDP there.
    """
    if size == 1:
        return {}
    args: dict[str, Any] = {
        "ddp_backend": "nccl" if device == "cuda" else "gloo",
        "ddp_timeout": timeout,
        # Every LoRA weight gets a gradient: no search for unused ones each step.
        "ddp_find_unused_parameters": False,
    }
    if spec.parallelism.strategy == "fsdp":
        args["fsdp"] = True
        args["fsdp_config"] = {
            "version": 1,  # the FSDP-QLoRA guide's; transformers 5 defaults to FSDP2
            "reshard_after_forward": "full_shard",
            "backward_prefetch": "backward_pre",
            "forward_prefetch": False,
            "use_orig_params": False,
            "cpu_ram_efficient_loading": True,
            "sync_module_states": True,
        }
        if spec.hyperparameters.gradient_checkpointing:
            args["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    return args


def shards(spec: JobSpec, size: int) -> bool:
    """Whether the base's weights are sharded across the processes (FSDP)."""
    return size > 1 and spec.parallelism.strategy == "fsdp"


def join(plan: Plan, rank: int) -> None:
    """Set the torchrun environment accelerate reads, and open the process group."""
    import torch
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(plan.world_size),
        LOCAL_WORLD_SIZE=str(plan.world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(plan.port),
    )
    if plan.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        plan.backend,
        rank=rank,
        world_size=plan.world_size,
        timeout=timedelta(seconds=plan.timeout_seconds),
    )


def leave() -> None:
    """Close the group and forget it: accelerate keeps the distributed setup in process-wide
    singletons, and a later trainer in this process (a test) must start from scratch."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if dist.is_initialized():
        dist.destroy_process_group()
    for name in TORCHRUN_ENV:
        os.environ.pop(name, None)
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


class RankStates(TrainerCallback):
    """Every rank's RNG state goes into rank 0's checkpoint, which is the job's: a resumed
    rank looks there for its `rng_state_<rank>.pth`, and without it draws dropout masks unlike
    an uninterrupted run's. Ranks 1..N-1 write theirs to folders of their own; after a barrier
    (each rank has written), rank 0 copies them in, before any other callback uploads."""

    def __init__(self, plan: Plan, rank: int) -> None:
        self.plan, self.rank = plan, rank

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        import torch.distributed as dist

        dist.barrier()
        if self.rank != 0:
            return
        name = f"checkpoint-{state.global_step}"
        for rank in range(1, self.plan.world_size):
            own = self.plan.rank_output_dir(rank) / name / f"rng_state_{rank}.pth"
            if own.is_file():
                shutil.copy2(own, self.plan.rank_output_dir(0) / name / own.name)


def rank_states(plan: Plan, rank: int) -> list[TrainerCallback]:
    """`RankStates` where there are several ranks; to come before any callback that uploads."""
    return [RankStates(plan, rank)] if plan.world_size > 1 else []


class StepSync(TrainerCallback):
    """After each optimizer step every rank takes rank 0's `should_training_stop` and
    `should_save` (rank 0's ReporterCallback sets them on a cancel or a planned stop), so all
    ranks save the same checkpoint and leave the loop at the same step. Counts the steps."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.steps += 1
        control.should_training_stop, control.should_save = _from_rank0(
            [control.should_training_stop, control.should_save]
        )


def _from_rank0(flags: list[bool]) -> list[bool]:
    """Rank 0's `flags`, on every rank (one broadcast, on the GPU under NCCL)."""
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.broadcast(tensor, src=0)
    return [bool(v) for v in tensor.tolist()]


class Group:
    """Rank 0's view of the other ranks; a one-process run has none and the same methods do
    nothing, so the pipeline has one code path."""

    def __init__(self, size: int = 1, folder: Path | None = None) -> None:
        self.size = size
        self.folder = folder
        """Where the plan and the ranks' error files are written."""
        self.sync = StepSync() if size > 1 else None
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.joining = False
        """Rank 0 is joining the group or in it: from then on another rank's death can hold it
        in a collective (before, `begin` itself checks the ranks)."""
        self.joined = False

    def begin(self, plan: Plan, log: Callable[[str], None]) -> None:
        """Hand the other ranks the plan (with a free rendezvous port) and join them in the
        process group; from here every rank must take the same collective steps."""
        if self.size == 1:
            return
        assert self.folder is not None
        plan = msgspec.structs.replace(plan, port=int(get_free_port()))
        staged = self.folder / "plan.json.tmp"
        staged.write_bytes(msgspec.json.encode(plan))
        staged.rename(self.folder / PLAN_FILE)  # atomic: a rank never reads half a plan
        hp = plan.spec.hyperparameters
        log(
            f"data parallel: {plan.world_size} processes ({plan.spec.parallelism.strategy}, "
            f"{plan.backend}); an optimizer step sees batch_size {hp.batch_size} x "
            f"gradient_accumulation_steps {hp.gradient_accumulation_steps} x {plan.world_size}"
            f" = {hp.batch_size * hp.gradient_accumulation_steps * plan.world_size} rows"
        )
        self.joining = True
        failed = self.failed_rank(wait=0)
        if failed is not None:
            raise DistributedError(f"data-parallel training could not start: {failed}")
        join(plan, 0)
        self.joined = True

    @property
    def callbacks(self) -> list[TrainerCallback]:
        return [self.sync] if self.sync else []

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, value: bool) -> bool:
        """Rank 0's `value`, on every rank (the decisions the other ranks cannot make alone)."""
        if self.size == 1:
            return value
        (agreed,) = _from_rank0([value])
        return agreed

    def ranks_summary(self, trainer: Trainer) -> list[dict[str, Any]]:
        """Every rank's step count and the sum of its adapter weights, gathered on all ranks:
        the proof that each rank trained and that their gradients were averaged."""
        if self.sync is None:
            return []
        import torch
        import torch.distributed as dist

        assert trainer.model is not None
        with torch.no_grad():
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            total = sum(float(p.detach().double().sum()) for p in params)
        mine = {"rank": dist.get_rank(), "steps": self.sync.steps, "adapter_sum": total}
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    def failed_rank(self, wait: float) -> str | None:
        """A rank that exited with an error (waiting up to `wait` s for one to do so)."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code not in (None, 0):
                    return self.reason(rank, code)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def reason(self, rank: int, code: int) -> str:
        """How rank `rank` ended, from its error file or its exit code."""
        assert self.folder is not None
        error = self.folder / f"rank-{rank}.error"
        who = f"rank {rank} of {self.size}"
        if error.is_file():
            return f"{who} failed: {error.read_text().strip()[:2000]}"
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return f"{who} died ({how}); if it was killed for memory, lower batch_size or max_length"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()


def _watch(group: Group, left: threading.Event, abandon: Callable[[JobFailure], None]) -> None:
    """Rank 0's watch: a rank died while rank 0 joins the group or trains in it, and rank 0 is
    still there `STUCK_SECONDS` later (`left` unset), so it waits on that rank's rendezvous or
    collective, or on gloo freeing what waited on it: kill the other ranks and abandon the job.
    (A death before rank 0 joins is `begin`'s to report, through the ordinary path.)"""
    while not left.wait(0.5):
        failed = group.failed_rank(wait=0) if group.joining else None
        if failed is None:
            continue
        if left.wait(STUCK_SECONDS):
            return
        group.stop()
        abandon(DistributedError(f"data-parallel training failed: {failed}"))
        return


def describe(summary: list[dict[str, Any]]) -> str:
    """One log line for the job's events: what each rank did."""
    ranks = ", ".join(f"rank {s['rank']} trained {s['steps']} steps" for s in summary)
    sums = {round(s["adapter_sum"], 6) for s in summary}
    same = "identical" if len(sums) == 1 else "DIFFERENT"
    return f"data parallel across {len(summary)} processes: {ranks}; adapters {same} on every rank"


@contextlib.contextmanager
def launch(size: int, folder: Path, abandon: Callable[[JobFailure], None]) -> Iterator[Group]:
    """Rank 0: start ranks 1..N-1 now (they import the training stack, then wait for the plan
    that `Group.begin` writes); on leaving, wait for them (normal end) or kill them (an error, a
    cancel, a planned stop), and name a rank that failed rather than rank 0's own
    communication error. A rank's death is watched for from inside until the process ends
    (see `STUCK_SECONDS`)."""
    if size == 1:
        yield Group()
        return
    folder.mkdir(parents=True, exist_ok=True)
    group = Group(size, folder)
    for rank in range(1, size):
        group.procs[rank] = subprocess.Popen(
            [sys.executable, "-m", "gpu_worker.distributed", str(folder / PLAN_FILE), str(rank)],
            stdin=subprocess.DEVNULL,
        )
    left = threading.Event()
    watch = threading.Thread(
        target=_watch, args=(group, left, abandon), name="ftune-ranks-watch", daemon=True
    )
    watch.start()
    try:
        yield group
    except BaseException as exc:
        # A cancel, a planned stop or a failure before training are rank 0's own; anything
        # else may be the echo of another rank's death in a collective: give that rank a moment
        # to be seen dead.
        own = isinstance(exc, JobCancelled | JobStopped) or not group.joined
        failed = group.failed_rank(wait=0 if own else 5.0)
        if failed is None or not group.joining:
            left.set()  # the ranks killed next are not deaths to watch for
        # else the watch stays on until the process ends: freeing the failed run (the DDP
        # model this exception's frames hold) can wait in gloo's destructor on the dead rank.
        group.stop()
        leave()
        if failed is not None and not isinstance(exc, JobCancelled | JobStopped | DistributedError):
            raise DistributedError(f"data-parallel training failed: {failed}") from exc
        raise
    left.set()
    leave()
    deadline = time.monotonic() + JOIN_SECONDS
    for rank, proc in group.procs.items():
        try:
            code = proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            group.stop()
            raise DistributedError(f"rank {rank} of {size} did not exit after training") from None
        if code != 0:
            raise DistributedError(f"data-parallel training failed: {group.reason(rank, code)}")


# -- ranks 1..N-1 -----------------------------------------------------------------------------


def train_rank(plan: Plan, rank: int) -> None:
    """What ranks 1..N-1 do: the collectives of rank 0's training, in the same order."""
    from gpu_worker.data import to_dataset
    from gpu_worker.model import load_model, load_tokenizer
    from gpu_worker.trainer import build_config, build_trainer, train

    join(plan, rank)  # left by exiting: the process ends right after (see `main`)
    spec, model_dir = plan.spec, Path(plan.model_dir)
    group = Group(plan.world_size)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(
        model_dir, spec, plan.device, local_rank=rank, sharded=shards(spec, plan.world_size)
    )
    config = build_config(
        spec,
        plan.rank_output_dir(rank),
        plan.device,
        has_eval=bool(plan.eval_rows),
        parallel=parallel_arguments(spec, plan.world_size, plan.device, plan.timeout_seconds),
    )
    trainer = build_trainer(
        model,
        tokenizer,
        spec,
        config,
        # tokenized as rank 0 does, each rank for itself
        to_dataset(plan.rows, tokenizer, method=plan.spec.method),
        to_dataset(plan.eval_rows, tokenizer, method=plan.spec.method) if plan.eval_rows else None,
        [*rank_states(plan, rank), *group.callbacks],
        init_adapter=Path(plan.init_adapter) if plan.init_adapter else None,
    )
    train(trainer, plan.resume_from)
    after_training(trainer, group, plan.rank_output_dir(rank) / "adapter", evaluate=False)


def after_training(
    trainer: Trainer, group: Group, adapter_dir: Path, *, evaluate: bool
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The steps after `train()` that every rank takes together: save the adapter (gathered
    whole from the shards under FSDP; only rank 0 writes), tell what each rank did, and run a
    final evaluation if rank 0 needs one (`evaluate`). Returns rank 0's eval metrics (empty if
    none) and the ranks' summary."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))
    summary = group.ranks_summary(trainer)
    metrics: dict[str, float] = {}
    if group.agree(evaluate):
        metrics = {k: float(v) for k, v in trainer.evaluate().items()}
    group.barrier()  # every rank done with the group before any of them leaves it
    if group.size > 1:
        _drop_ddp(trainer)
    return metrics, summary


def _drop_ddp(trainer: Trainer) -> None:
    """Free DDP's wrapper (and its gradient reducer) while the process group is still open.

    Freed after the group is destroyed, the reducer holds the last reference to the gloo
    process group, whose destructor then waits for its worker threads: measured, one rank in
    a few hung there for minutes after training."""
    import gc

    wrapped, model = trainer.model_wrapped, trainer.model
    if model is None or wrapped is model:  # FSDP: the model is the wrapper
        return
    trainer.model_wrapped = model
    trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not wrapped]
    del wrapped
    gc.collect()


def main(argv: list[str]) -> NoReturn:
    """`python -m gpu_worker.distributed PLAN RANK`: one of ranks 1..N-1, started before PLAN
    exists."""
    from gpu_worker.warm import die_with_parent
    from service import logs
    from service.settings import Settings

    plan_file, rank = Path(argv[0]), int(argv[1])
    die_with_parent(os.getppid())
    # Rank 0 decides when to stop (StepSync); a SIGTERM sent to the whole group reaches it too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    settings = Settings.from_env()  # the worker's environment: its log format and secrets
    logs.configure_logging(
        settings.log_level, secrets=settings.secret_values(), fmt=settings.log_format
    )
    code = 1
    try:
        # The imports take seconds (bitsandbytes alone pulls in torch._dynamo): done while
        # rank 0 prepares the data and the model. Rank 0 kills this process if it fails first.
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import trl  # noqa: F401

        while not plan_file.exists():
            time.sleep(0.1)
        plan = msgspec.json.decode(plan_file.read_bytes(), type=Plan)
        train_rank(plan, rank)
        code = 0
    except BaseException as exc:
        logging.getLogger("ftune.worker").exception("rank %s failed", rank)
        (plan_file.parent / f"rank-{rank}.error").write_text(f"{type(exc).__name__}: {exc}")
    finally:
        # Straight out: an interpreter teardown with torch's and gloo's threads around can
        # stall, and rank 0 is waiting for this exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
