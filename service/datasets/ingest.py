"""Turn a dataset into a stored dataset: validate, normalize, store, record; and remove one again.

Shared by uploads (ours and OpenAI-compatible files), imports and feedback snapshots, so all
give the same normalized blob, stats and sha256 for the same rows. The normalized rows are
written straight into the blob store as a draft (:class:`service.blobs.Draft`), committed under
their sha256 at the end: the local temp space holds at most the file as it was sent, and
nothing for an upload's file read as it arrives (a raw body, or the file of a form).
Validation runs in a worker thread: it is CPU-bound and must not stall the event loop (other
requests are still answered: /healthz stayed under 60 ms during a 400 MB upload). Invalid
input raises InvalidDataset and stores nothing.

Reading the body in that thread as it arrives beat saving it first: 1 GB took 6.5-6.9 s
against 8.5 s in the same bench, and 2-3 CPU s less (no spool file written and read back),
on 2 cores where the client sent it (bench/README.md, ingest). Receiving and checking then
take turns on the process's GIL, so a big body (``in_child``) is checked in a child process
that the thread feeds (:mod:`service.datasets.offload`).
"""

from __future__ import annotations

import io
import time
from functools import partial
from pathlib import Path

import anyio.to_thread

from service.blobs import DATASETS, BlobStore, dataset_blob_key
from service.contract import Container, Dataset, FieldMapping, OnInvalid
from service.datasets.offload import validate_in_child
from service.datasets.validate import IngestResult, Limits, validate_file, validate_stream
from service.store import DatasetQuota, Store, new_id


async def store_dataset(
    store: Store,
    blobs: BlobStore,
    src: Path | list[Path] | io.RawIOBase,
    *,
    tenant: str,
    name: str,
    limits: Limits,
    mapping: FieldMapping | None = None,
    hint: Container | None = None,
    on_invalid: OnInvalid = "reject",
    max_invalid_fraction: float = 0.01,
    processes: int = 1,
    quota: DatasetQuota | None = None,
    in_child: bool = False,
) -> Dataset:
    """Validate ``src`` (a file, the files of one dataset, or an upload's body as it arrives:
    ``in_child``, in a child process), store its rows and record it; LimitReached past the
    tenant's ``quota``, looked at before the work and kept atomically with the record."""
    if quota is not None:
        await store.check_dataset_quota(tenant, 0, quota)
    draft = await anyio.to_thread.run_sync(blobs.draft, DATASETS)
    read = (
        partial(validate_in_child if in_child else validate_stream, src)
        if isinstance(src, io.RawIOBase)
        else partial(validate_file, src, processes=processes)
    )
    try:
        result = await anyio.to_thread.run_sync(
            partial(
                read,
                draft,
                hint=hint,
                mapping=mapping,
                limits=limits,
                on_invalid=on_invalid,
                max_invalid_fraction=max_invalid_fraction,
            )
        )
        if quota is not None:
            await store.check_dataset_quota(tenant, result.bytes, quota)
        key = dataset_blob_key(result.sha256)
        async with store.blob_lock(result.sha256):
            await store.add_blob_ref(result.sha256)
        try:
            if not await anyio.to_thread.run_sync(blobs.exists, key):
                await anyio.to_thread.run_sync(draft.commit, key)
            ds = _record(result, tenant=tenant, name=name)
            await store.put_dataset(ds, quota)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _release_blob(
                    store, blobs, result.sha256, await store.drop_blob_ref(result.sha256)
                )
            raise
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(draft.discard)
    return ds


def _record(result: IngestResult, *, tenant: str, name: str) -> Dataset:
    return Dataset(
        id=new_id("ds"),
        tenant=tenant,
        name=name,
        rows=result.rows,
        bytes=result.bytes,
        source_bytes=result.source_bytes,
        sha256=result.sha256,
        format=result.format,
        kind=result.kind,
        source_format=result.source_format,
        stats=result.stats,
        warnings=result.warnings,
        created_at=time.time(),
        container=result.container,
        compressed=result.compressed,
        mapping=result.mapping,
        functions=result.functions,
        skipped_rows=result.skipped_rows,
        skipped=result.skipped,
    )


async def delete_dataset(
    store: Store, blobs: BlobStore, dataset_id: str, tenant: str | None
) -> Dataset:
    """Delete the record (Conflict while a live job uses it), and its blob once no other
    record shares the content."""
    ds, remaining = await store.delete_dataset(dataset_id, tenant)
    await _release_blob(store, blobs, ds.sha256, remaining)
    return ds


async def _release_blob(store: Store, blobs: BlobStore, sha256: str, remaining: int) -> None:
    """Delete the blob once no reference is left. Under the blob's lock, and only if still
    none is: an upload of the same content takes its reference under that lock before it
    checks whether the blob exists, so it either sees the blob gone (and stores it again) or
    keeps it alive; no interleaving leaves a record whose blob is gone."""
    if remaining > 0:
        return
    async with store.blob_lock(sha256):
        if await store.blob_refs(sha256) <= 0:
            await anyio.to_thread.run_sync(blobs.delete, dataset_blob_key(sha256))
