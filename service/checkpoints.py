"""Where a job's training checkpoints live in the blob store: the worker writes and resumes
from them, the API lists them (OpenAI's checkpoints route).

Each is a folder `jobs/{job_id}/checkpoints/checkpoint-{step}/` with the trainer's files and,
uploaded last, `ftune-manifest.json`: a folder without it is incomplete and does not count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MANIFEST = "ftune-manifest.json"
"""Uploaded last into a checkpoint's folder: a checkpoint without it is incomplete."""
_FOLDER = re.compile(r"^checkpoint-(\d+)\Z")


def checkpoints_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/"


def checkpoint_prefix(job_id: str, step: int) -> str:
    return f"{checkpoints_prefix(job_id)}checkpoint-{step}/"


def step_of(folder: str) -> int | None:
    """The step a `checkpoint-{step}` folder name holds, else None."""
    match = _FOLDER.match(folder)
    return int(match.group(1)) if match else None


def complete_steps(keys: Iterable[str], prefix: str) -> list[int]:
    """Steps of the complete checkpoints among blob `keys` listed under `prefix`, oldest
    first."""
    found = set()
    for key in keys:
        folder, _, name = key[len(prefix) :].partition("/")
        step = step_of(folder)
        if step is not None and name == MANIFEST:
            found.add(step)
    return sorted(found)
