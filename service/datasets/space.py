"""The temp space datasets are made in (uploads, imports, feedback snapshots): bounded,
cleaned after a crash, and never waited on.

Each upload (or import, or snapshot) gets its own directory under one root, with a lock file held
(``flock``) for as long as it runs. The kernel drops the lock when its process dies, however
it dies, so a directory whose lock can be taken belongs to a killed upload: it is removed at
start-up and whenever uploads are counted. Every process of a host shares the root, so the
count (``max_concurrent_uploads``) is the host's, which is what its temp space is sized by
(the chart: ``tmpSizeLimit`` ≥ that many times ``maxDatasetBytes``). Where several tenants
share the host, one tenant holds at most half of it (rounded up): a tenant's slow uploads
cannot shut the others out. Past either count, or with less free space than one more upload
may take, admission fails at once (SpaceBusy: 503 with Retry-After for a request; a policy's
run waits for a later tick).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import IO

import anyio

from service.settings import Settings

log = logging.getLogger("ftune.datasets")

RETRY_AFTER_SECONDS = 30
"""What a refused upload is told to wait: about as long as an upload of ordinary size takes."""
_LOCK = ".lock"
_ADMIT = ".admit"


class SpaceBusy(Exception):
    """No room for one more upload on this host now; trying again after ``retry_after``
    seconds may work."""

    def __init__(self, detail: str, retry_after: int = RETRY_AFTER_SECONDS) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class UploadSpace:
    """Directories for uploads under ``root``, at most ``max_uploads`` at once on this host
    and ``per_tenant`` of them for one tenant, each only when the space it may take is free:
    its declared size, else ``reserve_bytes`` (one upload at its largest)."""

    def __init__(
        self, root: Path, *, max_uploads: int, reserve_bytes: int, per_tenant: int | None = None
    ) -> None:
        self.root = root
        self.max_uploads = max_uploads
        self.reserve_bytes = reserve_bytes
        self.per_tenant = max_uploads if per_tenant is None else per_tenant

    @classmethod
    def from_settings(cls, settings: Settings, *, tenants: int) -> UploadSpace:
        """The host's space: every instance made from the same settings shares its count.
        ``tenants``: how many the tenants file has; with more than one, each may hold half."""
        return cls(
            settings.upload_dir,
            max_uploads=settings.max_concurrent_uploads,
            reserve_bytes=settings.max_dataset_bytes,
            per_tenant=fair_share(settings.max_concurrent_uploads, tenants),
        )

    def sweep(self) -> int:
        """Remove the directories of uploads whose process died; how many are still live."""
        with self._admitting():
            return self._sweep().total()

    @contextmanager
    def _admitting(self) -> Iterator[None]:
        """One process of the host admits or sweeps at a time."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / _ADMIT).open("ab") as admitting:
            fcntl.flock(admitting, fcntl.LOCK_EX)
            yield

    def _sweep(self) -> Counter[str]:
        """The live uploads by their tenant's tag, once the dead ones are removed."""
        live: Counter[str] = Counter()
        for path in self.root.iterdir():
            if not path.is_dir():
                continue
            with _try_lock(path / _LOCK) as taken:
                if not taken:
                    live[path.name.partition(".")[0]] += 1
                    continue
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed the temp files of a killed upload: %s", path.name)
        return live

    @asynccontextmanager
    async def slot(self, tenant: str, size: int | None = None) -> AsyncIterator[Path]:
        """A directory of one's own for one upload of ``tenant``'s, of ``size`` bytes (None:
        unknown), removed after; SpaceBusy when the host or the tenant is at its count of
        uploads, or the host is short of space."""
        path, lock = await anyio.to_thread.run_sync(self._admit, tenant, size)
        try:
            yield path
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_release, path, lock)

    def ensure_room(self, size: int | None) -> None:
        """SpaceBusy unless the space has room for a file of ``size`` bytes (None: unknown),
        for an upload admitted without any that turns out to need some."""
        needed = self.reserve_bytes if size is None else min(size, self.reserve_bytes)
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise SpaceBusy(
                f"this server's temp space is short ({free} bytes free, the upload may "
                f"take {needed}); try again shortly"
            )

    def _admit(self, tenant: str, size: int | None) -> tuple[Path, IO[bytes]]:
        tag = _tag(tenant)
        with self._admitting():
            live = self._sweep()
            if live.total() >= self.max_uploads:
                raise SpaceBusy(
                    f"this server is taking {live.total()} uploads, its limit; try again shortly"
                )
            if live[tag] >= self.per_tenant:
                raise SpaceBusy(
                    f"tenant {tenant} is taking {live[tag]} uploads on this server, its share "
                    f"of the {self.max_uploads} it takes at once; try again once one is done"
                )
            self.ensure_room(size)
            path = self.root / f"{tag}.{os.getpid()}-{uuid.uuid4().hex[:12]}"
            path.mkdir()
            lock = (path / _LOCK).open("ab")
            fcntl.flock(lock, fcntl.LOCK_EX)
            return path, lock


def fair_share(max_uploads: int, tenants: int) -> int:
    """One tenant's count of a host's ``max_uploads``: all of them when it is alone, else half
    (rounded up), so another tenant always finds one."""
    return max_uploads if tenants <= 1 else max(1, math.ceil(max_uploads / 2))


def _tag(tenant: str) -> str:
    """A tenant's mark on its directories' names (any tenant name, made safe for a path)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


@contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Whether the lock file at ``path`` could be taken (its owner is gone), held meanwhile."""
    try:
        f = path.open("rb")
    except FileNotFoundError:  # being removed
        yield False
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _release(path: Path, lock: IO[bytes]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with suppress(OSError):
        lock.close()
