"""A dataset's normalized rows go straight into the blob store (file:// and S3): the local temp
space holds nothing of them, even when rows must be rewritten; drafts left by a killed upload
are swept."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.blobs import DATASETS, BlobStore, dataset_blob_key, open_store
from service.datasets.ingest import store_dataset
from service.datasets.validate import InvalidDataset, Limits
from service.store import Store
from tests.fixtures.s3 import S3Server

MiB = 1024 * 1024
TEXT = {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Let me think at length... 5?"}
CONVERSATION = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "4."}],
    "rejected": [{"role": "assistant", "content": "5."}],
}


def rows(n: int, *, pad: int = 0) -> list[dict[str, object]]:
    return [{**TEXT, "prompt": f"{i}: {'x' * pad}?"} for i in range(n)]


@pytest.fixture(params=["file", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "file":
        yield open_store(f"file://{tmp_path / 'store'}")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    # Parts of 5 MiB, S3's smallest: a 12 MiB dataset is a real multipart upload.
    store = open_store(
        f"s3://{bucket}/p", endpoint_url=server.endpoint_url, multipart_chunksize=5 * MiB
    )
    yield store
    store.close()


@pytest.fixture
def no_temp_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every temp file made while this is active fails: nothing may be written there."""
    sealed = tmp_path / "sealed-tmp"
    sealed.mkdir(mode=0o500)
    monkeypatch.setattr(tempfile, "tempdir", str(sealed))
    yield
    sealed.chmod(0o700)


async def ingest(redis_url: str, blobs: BlobStore, src: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    store = Store.from_url(redis_url)
    try:
        return await store_dataset(
            store, blobs, src, tenant="t", name="n", limits=Limits(), **kwargs
        )
    finally:
        await store.close()


def write(path: Path, items: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.mark.usefixtures("no_temp_space")
async def test_normalized_rows_never_touch_the_temp_space(
    redis_url: str, blobs: BlobStore, tmp_path: Path
) -> None:
    big = write(tmp_path / "big.jsonl", rows(1500, pad=8000))  # ~12 MiB: several S3 parts
    ds = await ingest(redis_url, blobs, big)
    assert ds.rows == 1500 and ds.bytes > 10 * MiB
    with blobs.open(dataset_blob_key(ds.sha256)) as f:
        stored = f.read()
    assert len(stored) == ds.bytes and stored.count(b"\n") == 1500
    assert blobs.list("") == [dataset_blob_key(ds.sha256)], "a draft was left behind"


@pytest.mark.usefixtures("no_temp_space")
async def test_rows_rewritten_as_conversations_read_back_from_the_store(
    redis_url: str, blobs: BlobStore, tmp_path: Path
) -> None:
    """Text rows, then a conversation: the rows written so far are read back and rewritten."""
    mixed = write(tmp_path / "mixed.jsonl", [*rows(700, pad=8000), CONVERSATION])
    ds = await ingest(redis_url, blobs, mixed)
    assert ds.format == "conversational" and ds.rows == 701
    with blobs.open(dataset_blob_key(ds.sha256)) as f:
        first = json.loads(f.readline())
    assert first["prompt"] == [{"role": "user", "content": f"0: {'x' * 8000}?"}]
    assert blobs.list("") == [dataset_blob_key(ds.sha256)], "a draft was left behind"


async def test_an_invalid_dataset_leaves_no_draft(
    redis_url: str, blobs: BlobStore, tmp_path: Path
) -> None:
    bad = write(tmp_path / "bad.jsonl", [*rows(1000, pad=8000), {"prompt": "only"}])
    with pytest.raises(InvalidDataset):
        await ingest(redis_url, blobs, bad)
    assert blobs.list("") == []


def test_drafts_of_a_killed_upload_are_swept_once_old(blobs: BlobStore) -> None:
    old = blobs.draft(DATASETS)
    old.write(b"half a dataset\n" * (400 * 1024))  # ~6 MiB: an S3 multipart upload begun
    fresh = blobs.draft(DATASETS)
    fresh.write(b"in progress\n")
    fresh.reread().close()  # staged in the store
    if hasattr(old, "path"):  # the file store's drafts age by their mtime
        os.utime(old.path, (time.time() - 7200,) * 2)  # type: ignore[attr-defined]
        assert blobs.sweep_drafts(DATASETS, 3600) == 1
        assert not old.path.exists() and fresh.path.exists()  # type: ignore[attr-defined]
    else:
        # moto dates every multipart upload in 2010, so only the objects' ages tell here.
        blobs.sweep_drafts(DATASETS, 3600)
        assert [k for k in blobs.list("") if k.startswith("drafts/")], "a fresh draft went"
        time.sleep(1.1)
        blobs.sweep_drafts(DATASETS, 0)
        assert blobs.list("") == []
        old.discard()
    fresh.discard()
    assert blobs.list("") == []
