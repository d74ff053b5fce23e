"""The ``file://`` backend: a directory, written atomically (temp file, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from service.blobs.base import (
    TMP_PREFIX,
    BlobNotFound,
    BlobStore,
    Draft,
    MiB,
    check_key,
    dir_prefix,
)


def _atomic_write(dest: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``dest`` through a temp file in the same directory and ``os.replace``.

    ``write(fileobj)`` fills the temp file. A crash or an error at any point leaves either the
    old file or the new one, never half of one, and no temp file behind on errors.
    """
    for attempt in range(3):
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
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
        base = dir_prefix(prefix)
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
        return _FileDraft(self, self.root / dir_prefix(prefix))

    def sweep_drafts(self, prefix: str, older_than: float) -> int:
        top = self.root / dir_prefix(prefix)
        cutoff = time.time() - older_than
        swept = 0
        for path in top.glob(TMP_PREFIX + "*") if top.is_dir() else ():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    swept += 1
            except FileNotFoundError:
                pass
        return swept

    def list(self, prefix: str) -> list[str]:
        base = dir_prefix(prefix)
        top = self.root / base if base else self.root
        if not top.is_dir():
            return []
        keys = []
        for dirpath, _dirnames, filenames in os.walk(top):
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                path = Path(dirpath, name)
                if path.is_file():
                    keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)


class _FileDraft(Draft):
    """A temp file in the directory its blob will land in: committed by a rename."""

    def __init__(self, store: FileBlobStore, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
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
