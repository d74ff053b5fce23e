"""Files streamed out of the blob store: a dataset's rows, a job's artifacts.

Read a MiB at a time off the event loop, so a download of any size takes no temp space and
holds one buffer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import BinaryIO
from urllib.parse import quote

import anyio.to_thread


async def blob_chunks(body: BinaryIO) -> AsyncIterator[bytes]:
    """A blob's bytes a MiB at a time, read off the event loop; closed at the end."""
    try:
        while chunk := await anyio.to_thread.run_sync(body.read, 1 << 20):
            yield chunk
    finally:
        body.close()


def attachment(name: str) -> str:
    """A Content-Disposition that saves the download under `name` (RFC 6266; UTF-8 quoted
    when it is not plain)."""
    quoted = quote(name)
    return (
        f'attachment; filename="{name}"'
        if quoted == name
        else f"attachment; filename*=utf-8''{quoted}"
    )
