"""The normalized rows' output: hashed and written by a thread of its own, yet exactly what
was given, in order, and a failed write is the upload's error, not a lost one."""

from __future__ import annotations

import errno
import hashlib
import io
import time
from pathlib import Path

import pytest

from service.datasets.output import FLUSH_BYTES, Output
from service.datasets.validate import InvalidDataset, validate_file


def test_many_buffers_arrive_whole_in_order_and_the_digest_is_of_the_bytes_written() -> None:
    dst = io.BytesIO()
    out = Output(dst)
    lines = [b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * (i % 997)) for i in range(20_000)]
    for i in range(0, len(lines), 50):
        out.write_lines(b"".join(lines[i : i + 50]), 50)
    out.flush()
    expected = b"".join(lines)
    assert len(expected) > 8 * FLUSH_BYTES  # the writer thread took many buffers
    assert dst.getvalue() == expected
    assert out.written == len(expected) and out.rows == len(lines)
    assert out.sha.hexdigest() == hashlib.sha256(expected).hexdigest()


class FullDisk(io.BytesIO):
    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_in_the_writer_thread_fails_the_output() -> None:
    out = Output(FullDisk())
    with pytest.raises(OSError, match="No space left"):
        for _ in range(10):
            out.write_lines(b"x" * FLUSH_BYTES + b"\n", 1)
        out.flush()


class SlowStore(io.BytesIO):
    """A draft in a store that takes its time with each write."""

    def write(self, data: object) -> int:
        time.sleep(0.05)
        return super().write(data)  # type: ignore[arg-type]


def test_no_write_is_left_running_once_a_rejected_dataset_raises(tmp_path: Path) -> None:
    """The upload discards its draft as soon as validation raises: a write still queued for
    the writer thread would reach a draft being discarded (for S3, a multipart upload that
    nothing ever aborts)."""
    path = tmp_path / "rows.jsonl"
    with path.open("wb") as f:
        for i in range(30_000):
            f.write(b'{"prompt": "p%d", "chosen": "%s", "rejected": "r"}\n' % (i, b"c" * 200))
        f.write(b'{"prompt": 1}\n')  # the last row is bad: the verdict comes at the end
    dst = SlowStore()
    with pytest.raises(InvalidDataset):
        validate_file(path, dst)
    written = len(dst.getvalue())
    time.sleep(0.5)
    assert len(dst.getvalue()) == written
