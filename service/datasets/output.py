"""The normalized rows as they are written: buffered, hashed (sha256 of exactly what is
written) and counted, and rewritten when text rows have to become conversations.

Each full buffer is hashed and written by a thread of the output's own while the rows after it
are validated: hashlib and file writes let go of the GIL, so that work (a third of a plain
JSONL upload's validation, measured) runs on another core.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import msgspec

from service.blobs import Draft
from service.datasets.canonical import Row, as_conversation

FLUSH_BYTES = 1 << 20
MAX_PENDING = 4
"""Full buffers waiting for the writer thread, at most (memory stays flat)."""


class Output:
    def __init__(self, dst: Sink) -> None:
        self.dst = dst
        self.sha = hashlib.sha256()
        """Of what was written; read it after :meth:`flush`."""
        self.buffer = bytearray()
        self.written = 0
        """Bytes given to be written to ``dst`` so far."""
        self.rows = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ftune-output")
        self._pending: deque[Future[None]] = deque()

    def write(self, datas: list[bytes]) -> None:
        """Encoded rows."""
        self.buffer += b"\n".join(datas)
        self.write_lines(b"\n", len(datas))

    def write_lines(self, data: bytes, rows: int) -> None:
        """Encoded rows, each ending with a newline."""
        self.rows += rows
        self._add(data)

    def _add(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= FLUSH_BYTES:
            self._hand_off(self.buffer)
            self.buffer = bytearray()

    def flush(self) -> None:
        """Everything given so far is hashed and written to ``dst`` when this returns."""
        if self.buffer:
            self._hand_off(self.buffer)
            self.buffer = bytearray()
        while self._pending:
            self._pending.popleft().result()

    def stop(self) -> None:
        """End the writer thread once the writes handed off are done (their errors dropped:
        whoever wanted them called :meth:`flush`); what is still buffered is not written.
        Nothing writes to ``dst`` after this returns, so it may be restarted or discarded."""
        futures.wait(self._pending)
        self._pending.clear()
        self._writer.shutdown()

    def _hand_off(self, data: bytes | bytearray) -> None:
        self.written += len(data)
        self._pending.append(self._writer.submit(self._put, data))
        while len(self._pending) > MAX_PENDING:
            self._pending.popleft().result()

    def _put(self, data: bytes | bytearray) -> None:
        self.sha.update(data)
        self.dst.write(data)

    def append(self, src: BinaryIO, rows: int) -> None:
        """Rows written elsewhere (another process's range), after those here."""
        self.flush()
        while chunk := src.read(FLUSH_BYTES):
            self._hand_off(chunk)
        self.flush()
        self.rows += rows

    def rewrite_as_conversations(
        self, first_rows: int, convert: Callable[[bytes], bytes] | None = None
    ) -> None:
        """Rewrite the first ``first_rows`` rows of ``dst`` (standard ones) as the
        conversations they stand for (``convert``: one encoded row to another; preference
        rows by default), digest and size with them."""
        self.flush()
        if convert is None:
            decode = msgspec.json.Decoder(Row).decode
            encode = msgspec.json.Encoder().encode

            def convert(line: bytes) -> bytes:
                return encode(as_conversation(decode(line)))

        self.sha, self.written = hashlib.sha256(), 0
        with reread(self.dst) as src:
            for i, line in enumerate(src):
                if i < first_rows:
                    line = convert(line) + b"\n"
                self._add(line)
        self.flush()


Sink = BinaryIO | Draft
"""Where normalized rows go: a draft in the blob store (uploads), or any binary file."""


def reread(dst: Sink) -> BinaryIO:
    """What ``dst`` holds, to read from the start; ``dst`` is then empty for writing. A file
    is copied aside first (beside it, when it has a path: not into the temp space)."""
    if isinstance(dst, Draft):
        return dst.reread()
    name = getattr(dst, "name", None)
    directory = os.path.dirname(name) if isinstance(name, str) else None
    aside = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - the caller closes it
    dst.flush()
    dst.seek(0)
    shutil.copyfileobj(dst, aside, FLUSH_BYTES)
    aside.seek(0)
    restart(dst)
    return aside


def restart(dst: Sink) -> None:
    """Drop what was written to ``dst``."""
    if isinstance(dst, Draft):
        dst.restart()
    else:
        dst.seek(0)
        dst.truncate()
