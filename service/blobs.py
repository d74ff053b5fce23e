"""One blob store interface over ``file://`` directories and ``s3://`` buckets.

Datasets, checkpoints and artifacts all go through a :class:`BlobStore`, so the API and the
worker do not care whether they run on a laptop (``file:///…``) or in a cluster (``s3://…``,
any S3-compatible endpoint). Everything is synchronous: boto3 is, and the API calls the store
from a worker thread.

Keys are ``/``-separated paths relative to the store root (``datasets/ds_1/rows.jsonl``). A
*prefix* names a directory of keys: ``"jobs/j1"`` and ``"jobs/j1/"`` both mean the keys below
``jobs/j1/`` (never ``jobs/j10/…``); ``""`` means the whole store.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    import boto3
    from types_boto3_s3.client import S3Client

__all__ = [
    "DATASETS",
    "DEFAULT_MULTIPART_CHUNKSIZE",
    "DRAFT_MAX_AGE_SECONDS",
    "BlobNotFound",
    "BlobStore",
    "Draft",
    "FileBlobStore",
    "S3BlobStore",
    "check_key",
    "open_store",
    "sha256_file",
]

MiB = 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 8 * MiB
"""Objects at least this big are uploaded in parts of this size (S3's minimum part is 5 MiB)."""

_TMP_PREFIX = ".ftune-tmp-"
"""File-store temp files start with this; they are never keys, so ``list`` skips them."""
_S3_DELETE_BATCH = 1000
"""S3's limit of keys per DeleteObjects call."""
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


DATASETS = "datasets"
"""The prefix of dataset blobs (and of their drafts in a file store)."""


def dataset_blob_key(sha256: str) -> str:
    """Where a dataset's normalized JSONL lives: content-addressed, shared by equal uploads."""
    return f"{DATASETS}/{sha256}.jsonl"


class BlobNotFound(Exception):
    """The key (or, for ``download_dir``, every key under a prefix) does not exist."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"blob not found: {uri}")
        self.uri = uri


class Draft(abc.ABC):
    """A blob written before its key is known (a dataset's key is the sha256 of its rows),
    straight into the store rather than into local temp space: written in order, then
    committed under its key or discarded. ``reread`` gives back what was written so far
    (a rewrite reads it while writing the new version); ``restart`` empties it."""

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``."""

    @abc.abstractmethod
    def reread(self) -> BinaryIO:
        """What was written so far, to read from the start (close it after); the draft is
        then empty, ready to be written again."""

    @abc.abstractmethod
    def restart(self) -> None:
        """Drop what was written."""

    @abc.abstractmethod
    def commit(self, key: str) -> None:
        """Store what was written under ``key`` (replacing any old value); the draft is gone."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop the draft and whatever it left in the store; safe to call twice."""

    def __enter__(self) -> Draft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


DRAFTS = "drafts/"
"""Where S3 drafts are staged before they are committed (copied) under their key."""
DRAFT_MAX_AGE_SECONDS = 24 * 3600
"""A draft older than this was left by a process that died mid-upload: swept at start-up."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ValueError.

    Rejected: empty keys, a leading ``/``, empty, ``.`` or ``..`` segments (so a key can never
    escape the store root or mean two different objects on the two backends), NUL bytes,
    backslashes and names reserved for the file store's temp files.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid blob key {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"invalid blob key {key!r}: must be relative (no leading '/')")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"invalid blob key {key!r}: NUL and backslash are not allowed")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(
                f"invalid blob key {key!r}: empty, '.' and '..' path segments are not allowed"
            )
        if part.startswith(_TMP_PREFIX):
            raise ValueError(f"invalid blob key {key!r}: {_TMP_PREFIX!r} names are reserved")
    return key


def _dir_prefix(prefix: str) -> str:
    """Normalize a prefix to ``""`` or ``"a/b/"`` (validated like a key)."""
    stripped = prefix.rstrip("/")
    if not stripped:
        if prefix:
            raise ValueError(f"invalid blob prefix {prefix!r}: must be relative (no leading '/')")
        return ""
    check_key(stripped)
    return stripped + "/"


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file, read in chunks (never the whole file in memory)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _local_files(local_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative '/'-path, path) of every regular file under ``local_dir``, sorted."""
    if not local_dir.is_dir():
        raise NotADirectoryError(f"not a directory: {local_dir}")
    found: list[tuple[str, Path]] = []
    for dirpath, _dirnames, filenames in os.walk(local_dir):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file():
                found.append((path.relative_to(local_dir).as_posix(), path))
    return iter(sorted(found))


class BlobStore(abc.ABC):
    """A flat namespace of immutable-ish blobs addressed by relative keys."""

    url: str
    """Base url without a trailing slash, e.g. ``file:///var/lib/ftune`` or ``s3://bucket/p``."""

    def uri(self, key: str) -> str:
        """The full uri of ``key`` (what job records and artifact lists show)."""
        return f"{self.url}/{check_key(key)}"

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the contents of a local file under ``key``, replacing any old value."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any old value."""

    @abc.abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Write the blob to a local file (parents created, replaced atomically)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The blob's contents; BlobNotFound if it does not exist."""

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """The blob as a stream read from the start (close it after); BlobNotFound if absent.

        For reading part of a big blob (a dataset preview) without fetching all of it.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a blob."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; BlobNotFound if it does not exist."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under ``prefix`` (a directory; ``""`` empties the store)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the store root) under ``prefix``, sorted."""

    @abc.abstractmethod
    def draft(self, prefix: str) -> Draft:
        """A new blob to be committed under ``prefix`` once its key is known."""

    @abc.abstractmethod
    def sweep_drafts(self, prefix: str, older_than: float) -> int:
        """Remove drafts under ``prefix`` begun more than ``older_than`` seconds ago (left by
        a process killed mid-upload); how many went."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release network resources (the S3 client's connection pool)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def upload_dir(self, prefix: str, local_dir: Path) -> dict[str, str]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``.

        Returns ``{relative path: sha256 hex}``, the manifest artifacts carry. Keys already
        under the prefix that have no local counterpart are left alone.
        """
        base = _dir_prefix(prefix)
        manifest: dict[str, str] = {}
        for rel, path in _local_files(local_dir):
            key = check_key(base + rel)
            manifest[rel] = sha256_file(path)
            self.put_file(key, path)
        return manifest

    # ``builtins.list``: inside the class body ``list`` names the method above.
    def download_dir(self, prefix: str, local_dir: Path) -> builtins.list[str]:
        """Recreate the tree under ``prefix`` in ``local_dir``; returns the relative paths.

        Raises BlobNotFound if nothing is stored under the prefix.
        """
        base = _dir_prefix(prefix)
        keys = self.list(base)
        if not keys:
            raise BlobNotFound(self.url + "/" + base)
        rels = []
        for key in keys:
            rel = check_key(key[len(base) :])
            self.get_file(key, local_dir / rel)
            rels.append(rel)
        return rels


def _atomic_write(dest: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``dest`` through a temp file in the same directory and ``os.replace``.

    ``write(fileobj)`` fills the temp file. A crash or an error at any point leaves either the
    old file or the new one, never half of one, and no temp file behind on errors.
    """
    for attempt in range(3):
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
            break
        except FileNotFoundError:
            # A concurrent delete_prefix removed the directory between mkdir and mkstemp.
            if attempt == 2:
                raise
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class FileBlobStore(BlobStore):
    """Blobs as files under a local root directory (the embedded default)."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f"file store root must be an absolute path, got {str(root)!r}")
        self.root = root
        self.url = root.as_uri().rstrip("/")
        """Percent-encoded like the key part of ``uri``, so ``open_store(url)`` round-trips."""

    def uri(self, key: str) -> str:
        return f"{self.url}/{quote(check_key(key))}"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        with path.open("rb") as src:
            _atomic_write(dest, lambda f: shutil.copyfileobj(src, f, MiB))

    def put_bytes(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), lambda f: f.write(data))

    def get_file(self, key: str, path: Path) -> None:
        try:
            src = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(self.uri(key)) from None
        with src:
            _atomic_write(path, lambda f: shutil.copyfileobj(src, f, MiB))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(self.uri(key)) from None

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise BlobNotFound(self.uri(key)) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(self.uri(key))
        return path.stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        base = _dir_prefix(prefix)
        if not base:
            for child in self.root.iterdir() if self.root.is_dir() else ():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            return
        target = self.root / base.rstrip("/")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)

    def draft(self, prefix: str) -> Draft:
        return _FileDraft(self, self.root / _dir_prefix(prefix))

    def sweep_drafts(self, prefix: str, older_than: float) -> int:
        top = self.root / _dir_prefix(prefix)
        cutoff = time.time() - older_than
        swept = 0
        for path in top.glob(_TMP_PREFIX + "*") if top.is_dir() else ():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    swept += 1
            except FileNotFoundError:
                pass
        return swept

    def list(self, prefix: str) -> list[str]:
        base = _dir_prefix(prefix)
        top = self.root / base if base else self.root
        if not top.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(top):
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                path = Path(dirpath, name)
                if path.is_file():
                    keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)


class _FileDraft(Draft):
    """A temp file in the directory its blob will land in: committed by a rename."""

    def __init__(self, store: FileBlobStore, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
        self.store = store
        self.path = Path(name)
        self.file: BinaryIO = open(fd, "wb")  # noqa: SIM115 - closed by commit or discard

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self.file.write(data)

    def reread(self) -> BinaryIO:
        self.file.close()
        src = self.path.open("rb")
        self.path.unlink()  # the open handle keeps the bytes until it is closed
        self.file = self.path.open("xb")
        return src

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()

    def commit(self, key: str) -> None:
        dest = self.store._path(key)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, dest)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    return str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES


class S3BlobStore(BlobStore):
    """Blobs as objects under ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint.

    Credentials come from boto3's usual sources (environment, shared files, instance roles) or
    from the ``session`` given; they are never stored on this object or logged.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        addressing_style: str | None = None,
        session: boto3.session.Session | None = None,
    ) -> None:
        """``addressing_style`` defaults to ``path`` when ``endpoint_url`` is set, since most
        S3-compatible servers (MinIO, Ceph, moto) are reached by host or IP without wildcard DNS.
        """
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        _check_bucket(bucket)
        if multipart_chunksize < 5 * MiB:
            raise ValueError("multipart_chunksize must be at least 5 MiB (S3's minimum part size)")
        self.bucket = bucket
        self.prefix = _dir_prefix(prefix)
        self.endpoint_url = endpoint_url or None
        self.url = f"s3://{bucket}" + (f"/{self.prefix.rstrip('/')}" if self.prefix else "")
        options: dict[str, Any] = {"retries": {"max_attempts": 5, "mode": "standard"}}
        if self.endpoint_url:
            options["s3"] = {"addressing_style": addressing_style or "path"}
            # boto3 >= 1.36 sends CRC checksums by default, which several S3-compatible
            # servers reject; send checksums only where the API demands them.
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        elif addressing_style:
            options["s3"] = {"addressing_style": addressing_style}
        self._client: S3Client = (session or boto3.session.Session()).client(
            "s3", endpoint_url=self.endpoint_url, config=Config(**options)
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_chunksize,
            multipart_chunksize=multipart_chunksize,
            preferred_transfer_client="classic",
        )

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"not a file: {path}")
        self._client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._client.upload_fileobj(
            io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer
        )

    def get_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # s3transfer writes a temp file beside ``path`` and renames it: atomic.
            self._client.download_file(self.bucket, full, str(path), Config=self._transfer)
        except Exception as exc:
            if _is_not_found(exc):
                raise BlobNotFound(self.uri(key)) from None
            raise

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def open(self, key: str) -> BinaryIO:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if _is_not_found(exc):
                raise BlobNotFound(self.uri(key)) from None
            raise
        # botocore's StreamingBody reads, iterates lines and closes like a binary file.
        return cast(BinaryIO, response["Body"])

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self._client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise BlobNotFound(self.uri(key))
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _iter_keys(self, full_prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def delete_prefix(self, prefix: str) -> None:
        full_prefix = self.prefix + _dir_prefix(prefix)
        batch: list[str] = []
        for key in self._iter_keys(full_prefix):
            batch.append(key)
            if len(batch) == _S3_DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        response = self._client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
        )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise OSError(
                f"S3 refused to delete {len(errors)} of {len(keys)} objects in s3://{self.bucket}, "
                f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
            )

    def list(self, prefix: str) -> list[str]:
        full_prefix = self.prefix + _dir_prefix(prefix)
        start = len(self.prefix)
        # Keys ending in '/' are "folder" markers some consoles create, not blobs.
        return sorted(k[start:] for k in self._iter_keys(full_prefix) if not k.endswith("/"))

    def draft(self, prefix: str) -> Draft:
        return _S3Draft(self)

    def sweep_drafts(self, prefix: str, older_than: float) -> int:
        cutoff = time.time() - older_than
        full = self.prefix + DRAFTS
        paginator = self._client.get_paginator("list_objects_v2")
        old = [
            obj["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full)
            for obj in page.get("Contents", [])
            if obj["LastModified"].timestamp() < cutoff
        ]
        for at in range(0, len(old), _S3_DELETE_BATCH):
            self._delete_batch(old[at : at + _S3_DELETE_BATCH])
        uploads = self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=full)
        stale = [u for u in uploads.get("Uploads", []) if u["Initiated"].timestamp() < cutoff]
        for upload in stale:
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        return len(old) + len(stale)

    def close(self) -> None:
        self._client.close()


class _S3Draft(Draft):
    """Parts of a multipart upload sent as they fill (a small draft is one PUT), staged
    under ``drafts/`` and committed by a server-side copy: nothing is kept on local disk."""

    def __init__(self, store: S3BlobStore) -> None:
        self.store = store
        self.client = store._client
        self.bucket = store.bucket
        self.chunk = store._transfer.multipart_chunksize
        self.name = uuid.uuid4().hex
        self.staged: builtins.list[str] = []
        """Every key staged so far (a reread stages what was written), deleted at the end."""
        self._begin()

    def _begin(self) -> None:
        self.key = f"{self.store.prefix}{DRAFTS}{self.name}-{len(self.staged)}"
        self.staged.append(self.key)
        self.upload_id: str | None = None
        self.parts: builtins.list[dict[str, Any]] = []
        self.buffer = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.buffer += data
        if len(self.buffer) >= self.chunk:
            self._send_part()
        return len(data)

    def _send_part(self) -> None:
        if self.upload_id is None:
            created = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)
            self.upload_id = created["UploadId"]
        number = len(self.parts) + 1
        sent = self.client.upload_part(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=bytes(self.buffer),
        )
        self.parts.append({"ETag": sent["ETag"], "PartNumber": number})
        self.buffer.clear()

    def _finish(self) -> None:
        """Store what was written under the draft's staging key."""
        if self.upload_id is None:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
        else:
            if self.buffer:
                self._send_part()
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},  # type: ignore[typeddict-item]
            )
            self.upload_id = None
        self.buffer.clear()

    def _abort(self) -> None:
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            with contextlib.suppress(self.client.exceptions.NoSuchUpload):  # swept already
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=upload_id
                )

    def reread(self) -> BinaryIO:
        self._finish()
        body = self.client.get_object(Bucket=self.bucket, Key=self.key)["Body"]
        self._begin()
        return io.BufferedReader(_BodyReader(body), MiB)

    def restart(self) -> None:
        self._abort()
        self.parts, self.buffer = [], bytearray()

    def commit(self, key: str) -> None:
        self._finish()
        self.client.copy(
            {"Bucket": self.bucket, "Key": self.key},
            self.bucket,
            self.store._key(key),
            Config=self.store._transfer,
        )
        self.discard()

    def discard(self) -> None:
        self._abort()
        staged, self.staged = self.staged, []
        if staged:
            self.store._delete_batch(staged)


class _BodyReader(io.RawIOBase):
    """botocore's StreamingBody as a raw stream, for a BufferedReader that reads lines."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def _check_bucket(bucket: str) -> None:
    if not bucket or "/" in bucket or not bucket.strip() or bucket != bucket.strip():
        raise ValueError(f"invalid S3 bucket name {bucket!r}")


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
    session: boto3.session.Session | None = None,
) -> BlobStore:
    """Open ``file:///abs/path`` or ``s3://bucket[/prefix]``; ValueError for anything else.

    ``endpoint_url`` (an S3-compatible server, ``FTUNE_S3_ENDPOINT_URL``), ``multipart_chunksize``
    and ``session`` only apply to ``s3://`` urls.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"invalid store url {url!r}: a file url needs an absolute path, "
                f"e.g. file:///var/lib/ftune (got host {parts.netloc!r})"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or parts.query or parts.fragment:
            raise ValueError(
                f"invalid store url {url!r}: expected file:///absolute/path, e.g. "
                "file:///var/lib/ftune"
            )
        return FileBlobStore(Path(path))
    if parts.scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(
                f"invalid store url {url!r}: expected s3://bucket or s3://bucket/prefix"
            )
        try:
            return S3BlobStore(
                parts.netloc,
                unquote(parts.path).strip("/"),
                endpoint_url=endpoint_url,
                multipart_chunksize=multipart_chunksize,
                session=session,
            )
        except ValueError as exc:
            raise ValueError(f"invalid store url {url!r}: {exc}") from None
    raise ValueError(
        f"unsupported store url {url!r}: expected file:///absolute/path or s3://bucket[/prefix]"
    )
