"""The blob store's interface, its keys and prefixes, and what both backends share."""

from __future__ import annotations

import abc
import builtins
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

MiB = 1024 * 1024
DEFAULT_MULTIPART_CHUNKSIZE = 8 * MiB
"""Objects at least this big are uploaded in parts of this size (S3's minimum part is 5 MiB)."""

TMP_PREFIX = ".ftune-tmp-"
"""File-store temp files start with this; they are never keys, so ``list`` skips them."""


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
        if part.startswith(TMP_PREFIX):
            raise ValueError(f"invalid blob key {key!r}: {TMP_PREFIX!r} names are reserved")
    return key


def dir_prefix(prefix: str) -> str:
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


def local_files(local_dir: Path) -> Iterator[tuple[str, Path]]:
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

    def key_of(self, uri: str) -> str | None:
        """The key (or prefix) a uri of this store names, as artifact records hold them;
        None for a uri elsewhere (the Hub, another bucket)."""
        base = self.url + "/"
        return uri[len(base) :] if uri.startswith(base) else None

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
        base = dir_prefix(prefix)
        manifest: dict[str, str] = {}
        for rel, path in local_files(local_dir):
            key = check_key(base + rel)
            manifest[rel] = sha256_file(path)
            self.put_file(key, path)
        return manifest

    # ``builtins.list``: inside the class body ``list`` names the method above.
    def download_dir(self, prefix: str, local_dir: Path) -> builtins.list[str]:
        """Recreate the tree under ``prefix`` in ``local_dir``; returns the relative paths.

        Raises BlobNotFound if nothing is stored under the prefix.
        """
        base = dir_prefix(prefix)
        keys = self.list(base)
        if not keys:
            raise BlobNotFound(self.url + "/" + base)
        rels = []
        for key in keys:
            rel = check_key(key[len(base) :])
            self.get_file(key, local_dir / rel)
            rels.append(rel)
        return rels
