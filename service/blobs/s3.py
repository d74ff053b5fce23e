"""The ``s3://`` backend: any S3-compatible bucket through boto3."""

from __future__ import annotations

import builtins
import contextlib
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from service.blobs.base import (
    DEFAULT_MULTIPART_CHUNKSIZE,
    DRAFTS,
    BlobNotFound,
    BlobStore,
    Draft,
    MiB,
    check_key,
    dir_prefix,
)

if TYPE_CHECKING:
    import boto3
    from types_boto3_s3.client import S3Client

_S3_DELETE_BATCH = 1000
"""S3's limit of keys per DeleteObjects call."""
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


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
        self.prefix = dir_prefix(prefix)
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
        full_prefix = self.prefix + dir_prefix(prefix)
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
        full_prefix = self.prefix + dir_prefix(prefix)
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
