"""`ftune demo` end to end: its own dev stack, SmolLM2-135M, a real QLoRA DPO job, results.

Slow (minutes): it loads and trains a real 135M model on the CPU. A short run (few steps)
proves the wiring: stack up, model converted, dataset accepted, job trained, adapter stored,
before/after answers and the length measure printed, stack torn down. The full-length demo's
effect on answer length was measured by hand (figures beside DEMO_STEPS in service/demo.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.cli.demo import MODEL_NAME
from service.client import Client
from service.dev.localredis import free_port

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    state = tmp_path / ".ftune"
    converted = REPO / ".ftune" / "models" / MODEL_NAME
    if (converted / "config.json").exists():
        # Skip the 93 MB download and the one-off conversion when a converted copy exists.
        shutil.copytree(converted, state / "models" / MODEL_NAME)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTUNE_")}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--url", f"http://127.0.0.1:{port}",
         "demo", "--state-dir", str(state), "--max-steps", "3"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path,
        env={**env, "COLUMNS": "160"},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in (state / "logs").glob("*.log"))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- logs ---\n{logs}"
    out = result.stdout
    assert f"started the dev stack at http://127.0.0.1:{port}" in out
    assert f"http://127.0.0.1:{port}/ui/#/jobs/job_" in out  # the job's console page
    assert "succeeded" in out and "preference learned: mean answer length" in out
    assert "held-out prompt" in out and "before (base model)" in out
    adapter_line = next(line for line in out.splitlines() if line.startswith("adapter: file://"))
    adapter_dir = Path(adapter_line.split()[1].removeprefix("file://"))
    assert adapter_dir.is_relative_to(state / "store")
    assert (adapter_dir / "adapter_model.safetensors").exists()
    assert not _healthy(port), "the demo must stop the stack it started"
    print(f"demo with 3 steps took {elapsed:.0f} s")


def _healthy(port: int) -> bool:
    with Client(f"http://127.0.0.1:{port}") as client:
        return client.healthy()
