"""Deleting a dataset while an upload of the same content is stored never loses the blob a
record points to, nor leaves a blob no record points to (real Redis; file:// and S3 stores)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from service.blobs import BlobStore, dataset_blob_key, open_store
from service.datasets.ingest import delete_dataset, store_dataset
from service.datasets.validate import Limits
from service.store import Store
from tests.fixtures.s3 import S3Server

ROUNDS = 25
ROW = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Let me think at length... 5?"}


async def race(store: Store, blobs: BlobStore, src: Path) -> None:
    """Each round: one dataset of the content, then its delete against two more uploads."""

    async def upload() -> str:
        ds = await store_dataset(store, blobs, src, tenant="t", name="n", limits=Limits())
        return ds.sha256

    sha = await upload()
    for _ in range(ROUNDS):
        (first,), _ = await store.list_datasets("t", limit=1, cursor=None)
        await asyncio.gather(
            delete_dataset(store, blobs, first.id, "t"), upload(), upload(), upload()
        )
        listed, _ = await store.list_datasets("t", limit=100, cursor=None)
        assert listed, "three uploads and one delete leave records"
        for ds in listed:
            assert blobs.exists(dataset_blob_key(ds.sha256)), "a listed dataset lost its blob"
        for ds in listed[1:]:  # keep one for the next round's delete
            await delete_dataset(store, blobs, ds.id, "t")
    (last,), _ = await store.list_datasets("t", limit=1, cursor=None)
    await delete_dataset(store, blobs, last.id, "t")
    assert not blobs.exists(dataset_blob_key(sha)), "the last delete left an orphaned blob"
    assert await store.blob_refs(sha) == 0


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({**ROW, "prompt": f"{i}?"}) + "\n" for i in range(50)))
    return src


async def test_delete_racing_uploads_of_the_same_content_file_store(
    redis_url: str, tmp_path: Path, rows_file: Path
) -> None:
    store = Store.from_url(redis_url)
    try:
        await race(store, open_store(f"file://{tmp_path / 'store'}"), rows_file)
    finally:
        await store.close()


async def test_delete_racing_uploads_of_the_same_content_s3_store(
    redis_url: str, s3_server: S3Server, s3_bucket: str, rows_file: Path
) -> None:
    store = Store.from_url(redis_url)
    blobs = open_store(f"s3://{s3_bucket}/p", endpoint_url=s3_server.endpoint_url)
    try:
        await race(store, blobs, rows_file)
    finally:
        blobs.close()
        await store.close()
