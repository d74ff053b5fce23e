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

import contextlib
import io
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

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
    BadCell,
    Counting,
    FileProblem,
    JsonlBlocks,
    Lines,
    Opened,
    UnsupportedFile,
    csv_rows,
    json_rows,
    open_dataset,
    open_stream,
)
from service.datasets.kinds import HEAD_ROWS, KindCollector, detect_kind
from service.datasets.output import Sink, restart
from service.datasets.parquet import parquet_lines
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
    try:
        blocks = JsonlBlocks(src, limits.max_line_bytes)
        _jsonl(ingest, blocks, 0)
        return ingest.finish(blocks.consumed, "jsonl", False)
    finally:
        ingest.output.stop()


Blocks = Iterator[tuple[int, Lines]]


def _jsonl(ingest: Ingest, blocks: JsonlBlocks, offset: int, items: Blocks | None = None) -> int:
    """Feed JSONL blocks (``items``, if some were already taken from ``blocks``), numbering
    lines after ``offset``; the last line number."""
    for first, block in blocks if items is None else items:
        ingest.add_block(offset + first, block, file_start=first == 1)
        if ingest.stopped:
            break
    return offset + blocks.lines


class _Pass:
    """One validation of the files of a dataset: its collector is made for the kind of the
    first row, told from the very stream the rows are then fed from."""

    def __init__(self, make: Callable[[DatasetKind], Ingest], mapping: FieldMapping | None):
        self.make = make
        self.mapping = mapping
        self.ingest: Ingest | None = None

    def collector(self, head: list[Any] | None = None) -> Ingest:
        """The pass's collector, made for the kind of the ``head`` rows if there is none yet."""
        if self.ingest is None:
            self.ingest = self.make(detect_kind(head or [], self.mapping))
        return self.ingest

    def stop(self) -> None:
        """Whatever ended the pass, no write to ``dst`` is left running."""
        if self.ingest is not None:
            self.ingest.output.stop()


def _read(run: _Pass, opened: Opened, limits: Limits, offset: int) -> int:
    """Feed the rows of one opened file; the last line or row number."""
    if opened.container in ("jsonl", "parquet"):
        # Parquet: a JSON line a row, so line numbers are row numbers.
        lines: contextlib.AbstractContextManager[IO[bytes]] = contextlib.nullcontext(opened.stream)
        if opened.container == "parquet":
            assert opened.path is not None, "open_stream gives Parquet only with its file"
            lines = parquet_lines(opened.path, limits.max_bytes)
        with lines as stream:
            blocks = JsonlBlocks(stream, limits.max_line_bytes)
            items: Blocks = iter(blocks)
            if run.ingest is None:
                taken, head = _head_lines(items)
                items = itertools.chain(taken, items)
                run.collector(head)
            return _jsonl(run.collector(), blocks, offset, items)
    objects: Iterator[tuple[int, Any]]
    if opened.container == "csv":
        objects = csv_rows(opened.stream, limits.max_line_bytes)
    else:
        objects = json_rows(opened.stream, limits.max_line_bytes)
    last = offset
    try:
        if run.ingest is None:
            peeked, objects = _peek(objects)
            run.collector([obj for _, obj in peeked if not isinstance(obj, BadCell)])
        ingest = run.collector()
        for n, obj in objects:
            last = offset + n
            if isinstance(obj, BadCell):
                ingest.add_invalid(last, obj.column, obj.msg)
            else:
                ingest.add_object(last, obj)
            if ingest.stopped:
                break
    except FileProblem as e:
        run.collector().fatal(offset + e.line, e.msg)
    return last


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
    if (
        processes > 1
        and len(files) == 1
        and files[0].stat().st_size >= parallel.MIN_BYTES
        and _plain_preference(files[0], hint, mapping, limits)
    ):
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
    opens = (open_dataset(path, hint=hint, max_bytes=limits.max_bytes) for path in files)
    return _validate(
        opens,
        dst,
        lambda: sum(path.stat().st_size for path in files),
        mapping=mapping,
        limits=limits,
        on_invalid=on_invalid,
        max_invalid_fraction=max_invalid_fraction,
    )


def validate_stream(
    src: io.RawIOBase,
    dst: Sink,
    *,
    hint: Container | None = None,
    mapping: FieldMapping | None = None,
    limits: Limits = DEFAULT_LIMITS,
    on_invalid: OnInvalid = "reject",
    max_invalid_fraction: float = 0.01,
) -> IngestResult:
    """:func:`validate_file` for bytes read once as they come (an upload's body, checked
    while it arrives instead of saved first); any container but Parquet."""
    counted = Counting(src)
    return _validate(
        [open_stream(counted, hint=hint, max_bytes=limits.max_bytes)],
        dst,
        lambda: counted.total,
        mapping=mapping,
        limits=limits,
        on_invalid=on_invalid,
        max_invalid_fraction=max_invalid_fraction,
    )


def _validate(
    opens: Iterable[contextlib.AbstractContextManager[Opened]],
    dst: Sink,
    size: Callable[[], int],
    *,
    mapping: FieldMapping | None,
    limits: Limits,
    on_invalid: OnInvalid,
    max_invalid_fraction: float,
) -> IngestResult:
    """One pass over the files ``opens`` opens in turn (``size``: their bytes, once read)."""

    def make(kind: DatasetKind) -> Ingest:
        if kind != "preference":
            return KindCollector(
                dst,
                kind=kind,
                mapping=mapping,
                limits=limits,
                on_invalid=on_invalid,
                max_invalid_fraction=max_invalid_fraction,
            )
        return Collector(
            dst,
            mapping=mapping,
            limits=limits,
            on_invalid=on_invalid,
            max_invalid_fraction=max_invalid_fraction,
        )

    run = _Pass(make, mapping)
    last = 0
    first: Opened | None = None
    try:
        for opening in opens:
            with opening as opened:
                last = _read(run, opened, limits, last)
            first = first or opened
            if run.collector().stopped:
                break
        assert first is not None, "no file to validate"
        return run.collector().finish(size(), first.container, first.compressed)
    finally:
        run.stop()


def _plain_preference(
    path: Path, hint: Container | None, mapping: FieldMapping | None, limits: Limits
) -> bool:
    """Whether the file is uncompressed JSONL of preference rows (what ranges can split)."""
    try:
        with open_dataset(path, hint=hint, max_bytes=limits.max_bytes) as opened:
            if opened.container != "jsonl" or opened.compressed:
                return False
            _, head = _head_lines(iter(JsonlBlocks(opened.stream, limits.max_line_bytes)))
    except UnsupportedFile:  # reported by the pass
        return False
    return detect_kind(head, mapping) == "preference"


def _peek(
    objects: Iterator[tuple[int, Any]],
) -> tuple[list[tuple[int, Any]], Iterator[tuple[int, Any]]]:
    """The first :data:`HEAD_ROWS` objects, and all of them again (a file that breaks off
    among the first still has the rows before fed, then its problem raised)."""
    peeked: list[tuple[int, Any]] = []
    try:
        peeked.extend(itertools.islice(objects, HEAD_ROWS))
    except FileProblem as problem:
        caught = problem

        def then_raise() -> Iterator[tuple[int, Any]]:
            raise caught
            yield  # a generator

        return peeked, itertools.chain(list(peeked), then_raise())
    return peeked, itertools.chain(list(peeked), objects)


_HEAD_LINES = 4096
"""Lines (blank ones too) the head is looked for in: what is held for it stays small."""


def _head_lines(blocks: Blocks) -> tuple[list[tuple[int, Lines]], list[Any]]:
    """The first rows of JSONL blocks that can be read (up to :data:`HEAD_ROWS` lines; the
    pass reports the others), and the blocks they were found in, to be fed again (blocks of
    blank lines before them are left out: they add nothing)."""
    taken: list[tuple[int, Lines]] = []
    rows: list[Any] = []
    seen = 0
    for item in blocks:
        lines = item[1].lines
        if taken or any(raw is None or raw.strip() for raw in lines):
            taken.append(item)
        for raw in lines:
            seen += 1  # blank lines count too: the blocks kept stay few
            if raw is None or not raw.strip():
                continue
            with contextlib.suppress(Exception):  # the pass reports it at its line
                rows.append(msgspec.json.decode(raw.removeprefix(b"\xef\xbb\xbf")))
            if len(rows) >= HEAD_ROWS or seen >= _HEAD_LINES:
                return taken, rows
    return taken, rows


__all__ = [
    "DEFAULT_LIMITS",
    "WARNING_LINES",
    "IngestResult",
    "InvalidDataset",
    "Limits",
    "RowError",
    "validate_file",
    "validate_jsonl",
    "validate_stream",
]
