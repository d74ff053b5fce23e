"""Turn a dataset into a stored dataset: validate, normalize, store, record.

Shared by uploads, imports and feedback snapshots, so all give the same normalized blob,
stats and sha256 for the same rows. Validation runs in a child process
(:mod:`service.datasets.child`): it is CPU-bound, and in the API process it would hold the
interpreter from every other request for as long as it runs. Invalid input raises
InvalidDataset and stores nothing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec

from service.blobs import BlobStore, dataset_blob_key
from service.contract import Container, Dataset, FieldMapping, OnInvalid
from service.datasets.child import Job, Outcome, outcome_path
from service.datasets.validate import IngestResult, Limits
from service.store import Store, new_id

log = logging.getLogger("ftune.datasets")


class ValidatorFailed(RuntimeError):
    """The validation process died without an answer (a bug or the machine's memory)."""


async def _validate(job: Job) -> IngestResult:
    """Run ``job`` in a child process; its result, or the error it found."""
    command = [sys.executable, "-m", "service.datasets.child", msgspec.json.encode(job).decode()]
    with tempfile.TemporaryFile() as errors:
        process = await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors
        )
        try:
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()
        answer = outcome_path(job)
        if process.returncode != 0 or not answer.exists():
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-3000:]
            log.error("dataset validation process failed (%s): %s", process.returncode, tail)
            raise ValidatorFailed(f"the validation process failed (exit {process.returncode})")
    return msgspec.msgpack.decode(answer.read_bytes(), type=Outcome).unwrap()


async def store_dataset(
    store: Store,
    blobs: BlobStore,
    src: Path | list[Path],
    *,
    tenant: str,
    name: str,
    limits: Limits,
    mapping: FieldMapping | None = None,
    hint: Container | None = None,
    on_invalid: OnInvalid = "reject",
    max_invalid_fraction: float = 0.01,
    processes: int = 1,
) -> Dataset:
    """Validate ``src`` (a file, or the files of one dataset), store its rows and record it."""
    files = [src] if isinstance(src, Path) else src
    with tempfile.TemporaryDirectory(prefix="ftune-ingest-") as tmp:
        normalized = Path(tmp) / "normalized.jsonl"
        job = Job(
            output=str(normalized),
            files=[str(f) for f in files],
            hint=hint,
            mapping=mapping,
            limits=limits,
            on_invalid=on_invalid,
            max_invalid_fraction=max_invalid_fraction,
            processes=processes,
        )
        result = await _validate(job)
        key = dataset_blob_key(result.sha256)
        if not await anyio.to_thread.run_sync(blobs.exists, key):
            await anyio.to_thread.run_sync(blobs.put_file, key, normalized)
    ds = Dataset(
        id=new_id("ds"),
        tenant=tenant,
        name=name,
        rows=result.rows,
        bytes=result.bytes,
        source_bytes=result.source_bytes,
        sha256=result.sha256,
        format=result.format,
        source_format=result.source_format,
        stats=result.stats,
        warnings=result.warnings,
        created_at=time.time(),
        container=result.container,
        compressed=result.compressed,
        mapping=result.mapping,
        skipped_rows=result.skipped_rows,
        skipped=result.skipped,
    )
    await store.put_dataset(ds)
    return ds
