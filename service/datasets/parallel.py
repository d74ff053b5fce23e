"""A big plain JSONL file validated in line ranges, one process per range, merged in order.

The calling thread takes the first range itself while child processes (``python -m`` this
module, so nothing depends on how the server was started) take the others, each
writing its normalized rows to a part file and keeping, per accepted row, its line, a
process-independent hash and its text lengths. The merge then appends the parts in order and
counts duplicates and lengths over those rows exactly as one pass would: the result (rows,
bytes, sha256, stats, warnings, errors) is the same. When a range met what only the whole
file can settle (text and conversational rows, more rows than the limit), the merge gives up
and the caller validates the file in one pass.

gzip streams cannot be split, and a small file is not worth the processes' start (~0.3 s):
both are validated in one pass.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import tempfile
import zlib
from array import array
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from service.contract import FieldMapping, Format, OnInvalid, SourceFormat
from service.datasets.collect import MAX_COLUMNS, Collector, IngestResult, Limits, RowError
from service.datasets.containers import JsonlBlocks, module_command
from service.datasets.output import Sink
from service.datasets.stats import Tally

MIN_BYTES = 64 * 1024 * 1024
"""Smallest file split into ranges."""
MIN_RANGE_BYTES = 16 * 1024 * 1024
"""Smallest range a process is started for."""

log = logging.getLogger("ftune.datasets")


class _Window(io.RawIOBase):
    """Bytes ``start`` to ``end`` of a file."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        self.file = path.open("rb", buffering=0)
        self.file.seek(start)
        self.left = end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self.left)]
        n = self.file.readinto(view) or 0
        self.left -= n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def _feed(collector: Collector, window: _Window, limits: Limits, *, file_start: bool) -> int:
    """Feed a range's lines; how many lines it had."""
    with io.BufferedReader(window, buffer_size=1 << 20) as stream:
        blocks = JsonlBlocks(stream, limits.max_line_bytes)
        for first, block in blocks:
            collector.add_block(first, block, file_start=file_start and first == 1)
            if collector.stopped:
                break
        return blocks.lines


def _boundaries(path: Path, size: int, parts: int) -> list[int]:
    """Range starts (each just after a newline) and the file's end."""
    cuts = [0]
    with path.open("rb") as f:
        for i in range(1, parts):
            f.seek(max(size * i // parts, cuts[-1]))
            f.readline()
            at = f.tell()
            if at - cuts[-1] >= MIN_RANGE_BYTES and size - at >= MIN_RANGE_BYTES:
                cuts.append(at)
    return [*cuts, size]


def stable_hash(data: bytes) -> int:
    """A 64-bit row hash that is the same in every process (``hash`` is salted per process),
    for rows counted in one process and compared in another. CRC-32 in the low bits, which
    the duplicate table's slots are taken from: adler32's cluster for rows of like length
    and content, and with them there a file of templated rows took minutes to count."""
    return zlib.adler32(data) << 32 | zlib.crc32(data)


class RangeResult(msgspec.Struct):
    """What a collector in ``record`` mode saw in its range of a file, for the one that
    merges the ranges in order (line numbers count from the range's start)."""

    lines: int
    records: int
    rows: int
    errors: list[RowError]
    error_total: int
    fatal: bool
    fmt: Format | None
    layout: SourceFormat
    described: dict[str, str]
    mixed: bool
    """Text and conversational rows met in the range: the merge gives up."""
    functions: bool
    ignored: dict[str, tuple[int, list[int]]]
    near: tuple[int, list[int]]
    long_row: tuple[int, list[int]]
    row_lines: bytes
    row_hashes: bytes
    row_chars: tuple[bytes, bytes, bytes]


def range_result(collector: Collector, lines: int) -> RangeResult:
    """What :func:`merge` needs of a range a collector in ``record`` mode went through."""
    collector.flush()

    def tally(t: Tally) -> tuple[int, list[int]]:
        return t.count, t.lines

    return RangeResult(
        lines=lines,
        records=collector.records,
        rows=collector.output.rows,
        errors=collector.errors.items,
        error_total=collector.errors.total,
        fatal=collector.errors.fatal,
        fmt=collector.fmt,
        layout=collector.layout,
        described=collector.described,
        mixed=bool(collector.standard_rows or collector.converted.count),
        functions=collector.functions,
        ignored={name: tally(t) for name, t in collector.ignored.items()},
        near=tally(collector.near),
        long_row=tally(collector.long_row),
        row_lines=collector.row_lines.tobytes(),
        row_hashes=collector.row_hashes.tobytes(),
        row_chars=(
            collector.row_chars[0].tobytes(),
            collector.row_chars[1].tobytes(),
            collector.row_chars[2].tobytes(),
        ),
    )


def merge(collector: Collector, part: RangeResult, offset: int, output: BinaryIO) -> bool:
    """Take in the range after the ones seen so far (its lines after ``offset``, its
    normalized rows in ``output``), as if its rows had come here one by one.

    False when that would not be the same: the range met other formats, or rows past
    the limit; then validate the whole file in one go instead.
    """
    if part.fatal or part.mixed or collector.records + part.records > collector.limits.max_rows:
        return False
    collector.drain()
    if part.fmt is not None and collector.fmt is not None and part.fmt != collector.fmt:
        return False
    if collector.fmt is None and part.fmt is not None:
        collector.fmt, collector.layout, collector.described = part.fmt, part.layout, part.described
    collector.records += part.records
    collector.functions = collector.functions or part.functions
    for e in part.errors:
        collector.errors.add(offset + e.line, e.field, e.msg)
    collector.errors.total += part.error_total - len(part.errors)
    for name, (count, lines) in part.ignored.items():
        if name in collector.ignored or len(collector.ignored) < MAX_COLUMNS:
            collector.ignored.setdefault(name, Tally()).merge(count, [offset + n for n in lines])
    for mine, (count, lines) in ((collector.near, part.near), (collector.long_row, part.long_row)):
        mine.merge(count, [offset + n for n in lines])
    collector.flush()
    collector.output.append(output, part.rows)
    collector.count_rows(
        array("Q", part.row_lines),
        array("Q", part.row_hashes),
        *(array("Q", values) for values in part.row_chars),
        offset=offset,
    )
    return True


class _Options(msgspec.Struct, frozen=True):
    mapping: FieldMapping | None
    limits: Limits
    on_invalid: OnInvalid


def validate_range(
    path: Path, start: int, end: int, output: Path, options: _Options
) -> RangeResult:
    """One range, its rows to ``output``; what the merge needs back."""
    with output.open("wb") as dst:
        collector = Collector(
            dst,
            mapping=options.mapping,
            limits=options.limits,
            on_invalid=options.on_invalid,
            max_invalid_fraction=1.0,
            hasher=stable_hash,
            record=True,
        )
        try:
            lines = _feed(collector, _Window(path, start, end), options.limits, file_start=False)
            return range_result(collector, lines)
        finally:
            collector.output.stop()


def _start(
    path: Path, start: int, end: int, output: Path, options: _Options
) -> subprocess.Popen[bytes]:
    """A child process for one range (its own interpreter: nothing of the server is copied,
    nothing depends on how the server's main module was started)."""
    with output.with_suffix(".log").open("wb") as log:
        return subprocess.Popen(
            module_command(
                __name__,
                str(path),
                str(start),
                str(end),
                str(output),
                msgspec.json.encode(options).decode(),
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _result(proc: subprocess.Popen[bytes], output: Path) -> RangeResult | None:
    if proc.wait() != 0:
        tail = output.with_suffix(".log").read_text(errors="replace")[-2000:]
        log.warning("a range validation process failed (exit %s): %s", proc.returncode, tail)
        return None
    return msgspec.msgpack.decode(output.with_suffix(".result").read_bytes(), type=RangeResult)


def validate_parallel(
    path: Path,
    dst: Sink,
    *,
    processes: int,
    mapping: FieldMapping | None,
    limits: Limits,
    on_invalid: OnInvalid,
    max_invalid_fraction: float,
) -> IngestResult | None:
    """Validate the plain JSONL file at ``path`` in up to ``processes`` ranges at once.

    None when the ranges cannot stand for one pass (the caller then truncates ``dst`` and
    validates the file in one pass); InvalidDataset like one pass otherwise.
    """
    size = path.stat().st_size
    bounds = _boundaries(path, size, processes)
    if len(bounds) < 3:
        return None
    collector = Collector(
        dst,
        mapping=mapping,
        limits=limits,
        on_invalid=on_invalid,
        max_invalid_fraction=max_invalid_fraction,
        hasher=stable_hash,
    )
    options = _Options(mapping=mapping, limits=limits, on_invalid=on_invalid)
    try:
        # Beside the file (the upload's own scratch directory, swept with it).
        with tempfile.TemporaryDirectory(prefix="ftune-ranges-", dir=path.parent) as tmp:
            outputs = [Path(tmp) / f"part-{i}.jsonl" for i in range(1, len(bounds) - 1)]
            procs = [
                _start(path, bounds[i], bounds[i + 1], output, options)
                for i, output in enumerate(outputs, 1)
            ]
            try:
                offset = _feed(collector, _Window(path, 0, bounds[1]), limits, file_start=True)
                for proc, output in zip(procs, outputs, strict=True):
                    part = None if collector.stopped else _result(proc, output)
                    if part is None:
                        return None
                    with output.open("rb") as f:
                        if not merge(collector, part, offset, f):
                            return None
                    output.unlink()
                    offset += part.lines
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
        return collector.finish(size, "jsonl", False)
    finally:
        collector.output.stop()  # when the ranges give up, the caller restarts dst


def _main(argv: list[str]) -> int:
    """``python -m service.datasets.parallel PATH START END OUTPUT OPTIONS``: one range."""
    path, start, end, output, options = argv
    result = validate_range(
        Path(path), int(start), int(end), Path(output), msgspec.json.decode(options, type=_Options)
    )
    Path(output).with_suffix(".result").write_bytes(msgspec.msgpack.encode(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
