"""Streaming validation of a whole upload: rows checked, normalized, counted and written one
block at a time in flat memory.

:func:`validate_file` reads any container :mod:`service.datasets.containers` knows;
:func:`validate_jsonl` reads a JSONL stream. JSONL blocks take a fast path: every line decoded
straight into the canonical row type by msgspec (types and roles checked in C, unknown keys
refused) and the block's texts counted with C builtins. A block that does not pass is taken
again line by line, and a line that does not pass goes through
:func:`service.datasets.layouts.normalize`, which reads the published layouts or names the
fault. Rows from JSON arrays, Parquet and CSV go straight to it.

Invalid rows reject the dataset (every row is still checked, so the answer lists them all)
unless ``on_invalid="skip"``: then they are left out and listed, as long as they are at most
``max_invalid_fraction`` of the rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from service.contract import Container, DatasetKind, FieldMapping, OnInvalid
from service.datasets import parallel
from service.datasets.collect import (
    DEFAULT_LIMITS,
    Collector,
    IngestResult,
    InvalidDataset,
    Limits,
    RowError,
)
from service.datasets.containers import (
    FileProblem,
    JsonlBlocks,
    Opened,
    csv_rows,
    json_rows,
    open_dataset,
    parquet_lines,
)
from service.datasets.kinds import KindCollector, detect_kind
from service.datasets.output import Sink, restart
from service.datasets.stats import WARNING_LINES

Ingest = Collector | KindCollector


def validate_jsonl(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    mapping: FieldMapping | None = None,
    limits: Limits = DEFAULT_LIMITS,
    on_invalid: OnInvalid = "reject",
    max_invalid_fraction: float = 0.01,
) -> IngestResult:
    """Validate JSONL preference rows from ``src`` and write them normalized to ``dst``.

    Reads a block at a time in bounded memory. Raises :class:`InvalidDataset` with the first
    ``limits.max_errors`` errors and their total when the dataset is rejected; what was
    written to ``dst`` is then incomplete and must be discarded.
    """
    ingest = Collector(
        dst,
        mapping=mapping,
        limits=limits,
        on_invalid=on_invalid,
        max_invalid_fraction=max_invalid_fraction,
    )
    blocks = JsonlBlocks(src, limits.max_line_bytes)
    _jsonl(ingest, blocks, 0)
    return ingest.finish(blocks.consumed, "jsonl", False)


def _jsonl(ingest: Ingest, blocks: JsonlBlocks, offset: int) -> int:
    """Feed JSONL blocks, numbering lines after ``offset``; the last line number."""
    for first, block in blocks:
        ingest.add_block(offset + first, block, file_start=first == 1)
        if ingest.stopped:
            break
    return offset + blocks.lines


def _read(ingest: Ingest, source: Path, hint: Container | None, offset: int) -> tuple[Opened, int]:
    """Feed the rows of one file; (what it was, the last line or row number)."""
    limits = ingest.limits
    with open_dataset(source, hint=hint, max_bytes=limits.max_bytes) as opened:
        if opened.container == "jsonl":
            return opened, _jsonl(ingest, JsonlBlocks(opened.stream, limits.max_line_bytes), offset)
        if opened.container == "parquet":  # a JSON line a row: line numbers are row numbers
            with parquet_lines(opened.path, limits.max_bytes) as lines:
                return opened, _jsonl(ingest, JsonlBlocks(lines, limits.max_line_bytes), offset)
        objects: Iterable[tuple[int, Any]]
        if opened.container == "csv":
            objects = csv_rows(opened.stream, limits.max_line_bytes)
        else:
            objects = json_rows(opened.stream, limits.max_line_bytes)
        last = offset
        try:
            for n, obj in objects:
                last = offset + n
                ingest.add_object(last, obj)
                if ingest.stopped:
                    break
        except FileProblem as e:
            ingest.fatal(offset + e.line, e.msg)
        return opened, last


def validate_file(
    paths: Path | Sequence[Path],
    dst: Sink,
    *,
    hint: Container | None = None,
    mapping: FieldMapping | None = None,
    limits: Limits = DEFAULT_LIMITS,
    on_invalid: OnInvalid = "reject",
    max_invalid_fraction: float = 0.01,
    processes: int = 1,
) -> IngestResult:
    """Validate the rows of the file at ``paths`` (or of several, one dataset: the shards of a
    split, lines numbered on from one file to the next), whatever container holds them.

    A big plain JSONL file is validated in ranges by up to ``processes`` processes, with the
    same result (``dst`` is restarted if the ranges give up).
    Raises UnsupportedFile (nothing can be read), DatasetTooLarge (it decompresses past
    ``limits.max_bytes``) or InvalidDataset.
    """
    files = [paths] if isinstance(paths, Path) else list(paths)
    kind = _kind(files[0], hint, mapping, limits)
    if kind != "preference":
        ingest: Ingest = KindCollector(
            dst,
            kind=kind,
            mapping=mapping,
            limits=limits,
            on_invalid=on_invalid,
            max_invalid_fraction=max_invalid_fraction,
        )
        return _read_all(ingest, files, hint)
    if processes > 1 and len(files) == 1 and files[0].stat().st_size >= parallel.MIN_BYTES:
        with open_dataset(files[0], hint=hint, max_bytes=limits.max_bytes) as opened:
            plain = opened.container == "jsonl" and not opened.compressed
        if plain:
            result = parallel.validate_parallel(
                files[0],
                dst,
                processes=processes,
                mapping=mapping,
                limits=limits,
                on_invalid=on_invalid,
                max_invalid_fraction=max_invalid_fraction,
            )
            if result is not None:
                return result
            restart(dst)
    ingest = Collector(
        dst,
        mapping=mapping,
        limits=limits,
        on_invalid=on_invalid,
        max_invalid_fraction=max_invalid_fraction,
    )
    return _read_all(ingest, files, hint)


def _read_all(ingest: Ingest, files: list[Path], hint: Container | None) -> IngestResult:
    last = 0
    first: Opened | None = None
    for path in files:
        opened, last = _read(ingest, path, hint, last)
        first = first or opened
        if ingest.stopped:
            break
    assert first is not None, "no file to validate"
    size = sum(path.stat().st_size for path in files)
    return ingest.finish(size, first.container, first.compressed)


def _kind(
    path: Path, hint: Container | None, mapping: FieldMapping | None, limits: Limits
) -> DatasetKind:
    """The kind of the file's rows, from the mapping or its first row (preference when the
    first row cannot be read: that path says what is wrong)."""
    if mapping is not None and mapping.kind() != "preference":
        return mapping.kind()
    try:
        with open_dataset(path, hint=hint, max_bytes=limits.max_bytes) as opened:
            return detect_kind(_first_row(opened, limits), mapping)
    except Exception:  # unreadable files are reported by the full read
        return "preference"


def _first_row(opened: Opened, limits: Limits) -> Any:
    if opened.container in ("jsonl", "parquet"):
        if opened.container == "jsonl":
            blocks = JsonlBlocks(opened.stream, limits.max_line_bytes)
            return _first_line(blocks)
        with parquet_lines(opened.path, limits.max_bytes) as lines:
            return _first_line(JsonlBlocks(lines, limits.max_line_bytes))
    objects = (
        csv_rows(opened.stream, limits.max_line_bytes)
        if opened.container == "csv"
        else json_rows(opened.stream, limits.max_line_bytes)
    )
    for _, obj in objects:
        return obj
    return None


def _first_line(blocks: JsonlBlocks) -> Any:
    for _, lines in blocks:
        for raw in lines:
            if raw is None:
                return None
            raw = raw.removeprefix(b"\xef\xbb\xbf")
            if raw.strip():
                return msgspec.json.decode(raw)
    return None


__all__ = [
    "DEFAULT_LIMITS",
    "WARNING_LINES",
    "IngestResult",
    "InvalidDataset",
    "Limits",
    "RowError",
    "validate_file",
    "validate_jsonl",
]
