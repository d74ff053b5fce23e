"""The blob store behaves the same on a local directory and on a real S3 endpoint (moto)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service import blobs
from service.blobs import BlobNotFound, BlobStore, FileBlobStore, S3BlobStore, open_store
from tests.fixtures.s3 import S3Server

MiB = 1024 * 1024


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    """The same store contract on both backends; S3 under a prefix to exercise the join."""
    if request.param == "file":
        opened = open_store((tmp_path / "store").as_uri())
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        opened = open_store(f"s3://{bucket}/team/ftune/", endpoint_url=server.endpoint_url)
    yield opened
    opened.close()


def _random_bytes(n: int) -> bytes:
    return os.urandom(n)


def test_put_and_get_bytes_round_trip(store: BlobStore) -> None:
    store.put_bytes("datasets/ds_1/rows.jsonl", b'{"a": 1}\n')
    assert store.get_bytes("datasets/ds_1/rows.jsonl") == b'{"a": 1}\n'
    assert store.exists("datasets/ds_1/rows.jsonl")
    assert store.size("datasets/ds_1/rows.jsonl") == 9
    # Overwriting replaces the value; empty blobs are blobs.
    store.put_bytes("datasets/ds_1/rows.jsonl", b"")
    assert store.get_bytes("datasets/ds_1/rows.jsonl") == b""
    assert store.size("datasets/ds_1/rows.jsonl") == 0
    assert store.exists("datasets/ds_1/rows.jsonl")


def test_put_and_get_file_round_trip(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = _random_bytes(300_000)
    src.write_bytes(data)
    store.put_file("ckpt/step-10/adapter.safetensors", src)
    dest = tmp_path / "out" / "nested" / "adapter.safetensors"  # parents do not exist yet
    store.get_file("ckpt/step-10/adapter.safetensors", dest)
    assert dest.read_bytes() == data
    # get_file replaces an existing local file.
    dest.write_bytes(b"stale")
    store.get_file("ckpt/step-10/adapter.safetensors", dest)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["adapter.safetensors"]


def test_missing_keys_raise_blob_not_found_naming_the_uri(store: BlobStore, tmp_path: Path) -> None:
    uri = store.uri("nope/missing.bin")
    for call in (
        lambda: store.get_bytes("nope/missing.bin"),
        lambda: store.size("nope/missing.bin"),
        lambda: store.get_file("nope/missing.bin", tmp_path / "x"),
    ):
        with pytest.raises(BlobNotFound) as info:
            call()
        assert uri in str(info.value)
    assert not (tmp_path / "x").exists()
    assert not store.exists("nope/missing.bin")
    store.delete("nope/missing.bin")  # deleting a missing key is fine
    with pytest.raises(BlobNotFound):
        store.download_dir("nope", tmp_path / "dl")


def test_a_directory_is_not_a_blob(store: BlobStore) -> None:
    store.put_bytes("a/b/c.txt", b"x")
    assert not store.exists("a/b")
    with pytest.raises(BlobNotFound):
        store.get_bytes("a/b")


def test_list_is_sorted_relative_and_scoped_to_a_directory(store: BlobStore) -> None:
    for key in ["jobs/j1/b.txt", "jobs/j1/a/z.txt", "jobs/j10/x.txt", "jobs/j1/a.txt", "top"]:
        store.put_bytes(key, key.encode())
    assert store.list("jobs/j1") == ["jobs/j1/a.txt", "jobs/j1/a/z.txt", "jobs/j1/b.txt"]
    assert store.list("jobs/j1/") == store.list("jobs/j1")
    assert store.list("") == [
        "jobs/j1/a.txt",
        "jobs/j1/a/z.txt",
        "jobs/j1/b.txt",
        "jobs/j10/x.txt",
        "top",
    ]
    assert store.list("absent") == []


def test_delete_and_delete_prefix(store: BlobStore) -> None:
    for key in ["jobs/j1/a.txt", "jobs/j1/sub/b.txt", "jobs/j10/c.txt", "keep.txt"]:
        store.put_bytes(key, b"x")
    store.delete("keep.txt")
    assert not store.exists("keep.txt")
    store.delete_prefix("jobs/j1")
    assert store.list("") == ["jobs/j10/c.txt"]  # the sibling with a longer name survives
    store.delete_prefix("never/written")  # nothing there is fine
    store.delete_prefix("")
    assert store.list("") == []
    # The store still works after being emptied.
    store.put_bytes("jobs/j1/a.txt", b"again")
    assert store.get_bytes("jobs/j1/a.txt") == b"again"


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "../escape", "a/../../b", "a//b", "a/./b", "trailing/", "a\\b", "nul\x00"],
)
def test_bad_keys_are_rejected(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError, match="invalid blob key"):
        store.get_bytes(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        store.exists(key)


def test_bad_prefixes_are_rejected(store: BlobStore, tmp_path: Path) -> None:
    for prefix in ["/", "/abs", "../up", "a/../b"]:
        with pytest.raises(ValueError, match="invalid blob"):
            store.list(prefix)
        with pytest.raises(ValueError, match="invalid blob"):
            store.delete_prefix(prefix)
        with pytest.raises(ValueError, match="invalid blob"):
            store.upload_dir(prefix, tmp_path)


def test_upload_dir_download_dir_round_trip_with_sha256(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    files = {
        "adapter_config.json": b'{"r": 16}',
        "adapter_model.safetensors": _random_bytes(1 * MiB + 17),
        "tokenizer/tokenizer.json": b"{}",
        "tokenizer/deep/er/vocab.txt": b"a\nb\n",
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)

    manifest = store.upload_dir("artifacts/job_1/adapter/", src)
    assert manifest == {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    assert store.list("artifacts/job_1") == sorted(f"artifacts/job_1/adapter/{r}" for r in files)

    dest = tmp_path / "restored"
    rels = store.download_dir("artifacts/job_1/adapter", dest)
    assert rels == sorted(files)
    for rel, data in files.items():
        restored = dest / rel
        assert hashlib.sha256(restored.read_bytes()).hexdigest() == manifest[rel]
        assert restored.read_bytes() == data


def test_upload_dir_of_a_missing_directory_fails(store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        store.upload_dir("x", tmp_path / "missing")


def test_large_file_round_trip(store: BlobStore, tmp_path: Path) -> None:
    """20 MiB: past the 8 MiB multipart threshold on S3; streamed copies on file://."""
    src = tmp_path / "big.bin"
    data = _random_bytes(20 * MiB)
    src.write_bytes(data)
    store.put_file("big/model.safetensors", src)
    assert store.size("big/model.safetensors") == 20 * MiB
    out = tmp_path / "big.out"
    store.get_file("big/model.safetensors", out)
    assert blobs.sha256_file(out) == hashlib.sha256(data).hexdigest()


def test_uri_joins_without_double_slashes(tmp_path: Path, s3_server: S3Server) -> None:
    file_store = open_store((tmp_path / "s").as_uri() + "/")
    assert file_store.url == (tmp_path / "s").as_uri()
    assert file_store.uri("a/b.txt") == f"{(tmp_path / 's').as_uri()}/a/b.txt"
    for url, expected in [
        ("s3://bucket", "s3://bucket/a/b.txt"),
        ("s3://bucket/", "s3://bucket/a/b.txt"),
        ("s3://bucket/pre/fix/", "s3://bucket/pre/fix/a/b.txt"),
        ("s3://bucket//pre", "s3://bucket/pre/a/b.txt"),
    ]:
        s3_store = open_store(url, endpoint_url=s3_server.endpoint_url)
        assert s3_store.uri("a/b.txt") == expected
        s3_store.close()


# --- S3 specifics ----------------------------------------------------------------------------


def test_s3_prefix_isolates_stores_in_one_bucket(s3_server: S3Server, s3_bucket: str) -> None:
    """Objects land under bucket/prefix/key; a prefix 'a' store never sees 'ab/...' keys."""
    a = open_store(f"s3://{s3_bucket}/a", endpoint_url=s3_server.endpoint_url)
    ab = open_store(f"s3://{s3_bucket}/ab", endpoint_url=s3_server.endpoint_url)
    root = open_store(f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    a.put_bytes("k.txt", b"a")
    ab.put_bytes("k.txt", b"ab")
    raw = s3_server.client()
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == ["a/k.txt", "ab/k.txt"]
    assert a.list("") == ["k.txt"]
    assert a.get_bytes("k.txt") == b"a"
    a.delete_prefix("")
    assert root.list("") == ["ab/k.txt"]
    # "Folder" marker objects made by consoles are not blobs.
    raw.put_object(Bucket=s3_bucket, Key="ab/folder/", Body=b"")
    assert ab.list("") == ["k.txt"]


def test_s3_large_uploads_are_multipart(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """put_file and put_bytes past the threshold go in parts of the configured size."""
    raw = s3_server.client()
    data = _random_bytes(20 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)

    default = open_store(f"s3://{s3_bucket}/m", endpoint_url=s3_server.endpoint_url)
    default.put_file("file.bin", src)
    etag = raw.head_object(Bucket=s3_bucket, Key="m/file.bin")["ETag"].strip('"')
    assert re.fullmatch(r"[0-9a-f]{32}-3", etag), etag  # 8 + 8 + 4 MiB

    small_parts = S3BlobStore(
        s3_bucket, "m", endpoint_url=s3_server.endpoint_url, multipart_chunksize=5 * MiB
    )
    small_parts.put_bytes("bytes.bin", data)
    head = raw.head_object(Bucket=s3_bucket, Key="m/bytes.bin", PartNumber=1)
    assert head["PartsCount"] == 4
    assert head["ContentLength"] == 5 * MiB
    assert hashlib.sha256(small_parts.get_bytes("bytes.bin")).digest() == (
        hashlib.sha256(data).digest()
    )

    # Below the threshold a single PUT is used (a plain MD5 ETag).
    default.put_bytes("small.bin", b"x" * 1024)
    etag = raw.head_object(Bucket=s3_bucket, Key="m/small.bin")["ETag"].strip('"')
    assert etag == hashlib.md5(b"x" * 1024).hexdigest()  # S3's single-PUT ETag
    default.close()
    small_parts.close()


def test_s3_list_and_delete_prefix_past_one_page(s3_server: S3Server, s3_bucket: str) -> None:
    """More than 1000 keys: list paginates, delete_prefix deletes in batches of at most 1000."""
    store = open_store(f"s3://{s3_bucket}/many", endpoint_url=s3_server.endpoint_url)
    keys = [f"k/{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b"."), keys))
    store.put_bytes("other/keep", b".")
    assert store.list("k") == keys
    store.delete_prefix("k")
    assert store.list("") == ["other/keep"]
    store.close()


def test_s3_missing_bucket_is_an_error_not_a_missing_blob(s3_server: S3Server) -> None:
    """A misconfigured store must fail loudly rather than look empty."""
    store = open_store("s3://ftune-no-such-bucket", endpoint_url=s3_server.endpoint_url)
    with pytest.raises(Exception) as info:
        store.get_bytes("x")
    assert not isinstance(info.value, BlobNotFound)
    assert "NoSuchBucket" in str(info.value)
    store.close()


# --- file:// specifics -----------------------------------------------------------------------


def test_file_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies before the rename leaves the old blob intact and no temp file."""
    store = FileBlobStore(tmp_path / "store")
    store.put_bytes("d/blob", b"old")

    def crash(*args: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)  # what FileBlobStore renames with
    with pytest.raises(OSError, match="simulated crash"):
        store.put_bytes("d/blob", b"new" * 1000)
    src = tmp_path / "src"
    src.write_bytes(b"from file")
    with pytest.raises(OSError, match="simulated crash"):
        store.put_file("d/other", src)
    monkeypatch.undo()

    assert store.get_bytes("d/blob") == b"old"
    assert not store.exists("d/other")
    assert sorted(p.name for p in (tmp_path / "store" / "d").iterdir()) == ["blob"]


def test_file_store_hides_leftover_temp_files(tmp_path: Path) -> None:
    """A temp file left by a killed process is never listed or downloaded as a blob."""
    store = FileBlobStore(tmp_path / "store")
    store.put_bytes("d/blob", b"x")
    (tmp_path / "store" / "d" / ".ftune-tmp-abc123").write_bytes(b"half")
    assert store.list("") == ["d/blob"]
    assert store.download_dir("d", tmp_path / "dl") == ["blob"]


# --- open_store ------------------------------------------------------------------------------


def test_open_store_picks_the_backend(tmp_path: Path, s3_server: S3Server) -> None:
    file_store = open_store(f"file://{tmp_path}")
    assert isinstance(file_store, FileBlobStore)
    assert file_store.root == tmp_path
    assert isinstance(open_store(f"file://localhost{tmp_path}"), FileBlobStore)
    # A store's own url opens the same directory again, even with characters that need escaping.
    odd = FileBlobStore(tmp_path / "my store %")
    odd.put_bytes("k", b"v")
    reopened = open_store(odd.url)
    assert isinstance(reopened, FileBlobStore)
    assert reopened.root == odd.root
    assert reopened.get_bytes("k") == b"v"
    s3 = open_store("s3://bucket/a/b", endpoint_url=s3_server.endpoint_url)
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix, s3.url) == ("bucket", "a/b/", "s3://bucket/a/b")
    s3.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://relative/path", "absolute path"),
        ("file:relative", "absolute"),
        ("/var/lib/ftune", "unsupported store url"),
        ("http://example.com/x", "unsupported store url"),
        ("gs://bucket/x", "unsupported store url"),
        ("s3://", "s3://bucket"),
        ("s3:///prefix-only", "s3://bucket"),
        ("s3://bucket/a/../b", "invalid blob key"),
        ("", "unsupported store url"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        open_store(url)
