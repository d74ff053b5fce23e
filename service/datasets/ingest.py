"""Turn a JSONL file on disk into a stored dataset: validate, normalize, store, record; and
remove one again.

Shared by uploads (ours and OpenAI-compatible files) and feedback snapshots, so all give the
same normalized blob, stats and sha256 for the same rows. Validation runs in a thread: it is
CPU-bound and must not stall the event loop. Invalid input raises InvalidDataset and stores
nothing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import anyio.to_thread

from service.blobs import BlobStore, dataset_blob_key
from service.contract import Dataset, FieldMapping
from service.datasets.validate import IngestResult, Limits, validate_jsonl
from service.store import Store, new_id


async def store_dataset(
    store: Store,
    blobs: BlobStore,
    src: Path,
    *,
    tenant: str,
    name: str,
    limits: Limits,
    mapping: FieldMapping | None = None,
) -> Dataset:
    with tempfile.TemporaryDirectory(prefix="ftune-ingest-") as tmp:
        normalized = Path(tmp) / "normalized.jsonl"

        def validate() -> IngestResult:
            with src.open("rb") as raw, normalized.open("wb") as dst:
                return validate_jsonl(raw, dst, mapping=mapping, limits=limits)

        result = await anyio.to_thread.run_sync(validate)
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
    )
    await store.put_dataset(ds)
    return ds


async def delete_dataset(
    store: Store, blobs: BlobStore, dataset_id: str, tenant: str | None
) -> Dataset:
    """Delete the record (Conflict while a live job uses it), and its blob once no other
    record shares the content."""
    ds, remaining = await store.delete_dataset(dataset_id, tenant)
    if remaining <= 0:
        await anyio.to_thread.run_sync(blobs.delete, dataset_blob_key(ds.sha256))
    return ds
