"""The normalized rows as they are written: buffered, hashed (sha256 of exactly what is
written) and counted, and rewritten when text rows have to become conversations."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from typing import BinaryIO

import msgspec

from service.datasets.canonical import Row, as_conversation

FLUSH_BYTES = 1 << 20


class Output:
    def __init__(self, dst: BinaryIO) -> None:
        self.dst = dst
        self.sha = hashlib.sha256()
        self.buffer = bytearray()
        self.written = 0
        """Bytes written to ``dst`` so far."""
        self.rows = 0

    def write(self, datas: list[bytes]) -> None:
        """Encoded rows."""
        self.buffer += b"\n".join(datas)
        self.write_lines(b"\n", len(datas))

    def write_lines(self, data: bytes, rows: int) -> None:
        """Encoded rows, each ending with a newline."""
        self.rows += rows
        self.buffer += data
        if len(self.buffer) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        self.sha.update(self.buffer)
        self.dst.write(self.buffer)
        self.written += len(self.buffer)
        self.buffer.clear()

    def append(self, src: BinaryIO, rows: int) -> None:
        """Rows written elsewhere (another process's range), after those here."""
        self.flush()
        while chunk := src.read(FLUSH_BYTES):
            self.sha.update(chunk)
            self.dst.write(chunk)
            self.written += len(chunk)
        self.rows += rows

    def rewrite_as_conversations(self, first_rows: int) -> None:
        """Rewrite the first ``first_rows`` rows of ``dst`` (standard ones) as the
        conversations they stand for, in a temp file and then back, digest and size with them."""
        self.flush()
        decode = msgspec.json.Decoder(Row).decode
        encode = msgspec.json.Encoder().encode
        dst = self.dst
        dst.flush()
        dst.seek(0)
        self.sha, self.written = hashlib.sha256(), 0
        with tempfile.TemporaryFile() as tmp:
            for i, line in enumerate(dst):
                if i < first_rows:
                    line = encode(as_conversation(decode(line))) + b"\n"
                tmp.write(line)
                self.sha.update(line)
                self.written += len(line)
            tmp.seek(0)
            dst.seek(0)
            dst.truncate()
            shutil.copyfileobj(tmp, dst, FLUSH_BYTES)
