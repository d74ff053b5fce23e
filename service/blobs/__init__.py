"""One blob store interface over ``file://`` directories and ``s3://`` buckets.

Datasets, checkpoints and artifacts all go through a :class:`BlobStore`, so the API and the
worker do not care whether they run on a laptop (``file:///…``) or in a cluster (``s3://…``,
any S3-compatible endpoint). Everything is synchronous: boto3 is, and the API calls the store
from a worker thread.

Keys are ``/``-separated paths relative to the store root (``datasets/ds_1/rows.jsonl``). A
*prefix* names a directory of keys: ``"jobs/j1"`` and ``"jobs/j1/"`` both mean the keys below
``jobs/j1/`` (never ``jobs/j10/…``); ``""`` means the whole store.

The seams: ``base`` (the interface, keys and what both backends share), ``local`` and ``s3``
(one backend each, with its drafts).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from service.blobs.base import (
    DATASETS,
    DEFAULT_MULTIPART_CHUNKSIZE,
    DRAFT_MAX_AGE_SECONDS,
    DRAFTS,
    BlobNotFound,
    BlobStore,
    Draft,
    check_key,
    dataset_blob_key,
    sha256_file,
)
from service.blobs.local import FileBlobStore
from service.blobs.s3 import S3BlobStore

if TYPE_CHECKING:
    import boto3

__all__ = [
    "DATASETS",
    "DEFAULT_MULTIPART_CHUNKSIZE",
    "DRAFTS",
    "DRAFT_MAX_AGE_SECONDS",
    "BlobNotFound",
    "BlobStore",
    "Draft",
    "FileBlobStore",
    "S3BlobStore",
    "check_key",
    "dataset_blob_key",
    "open_store",
    "sha256_file",
]


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
