"""What one validation keeps while rows stream by: the first errors, the counters and the
normalized output (:mod:`service.datasets.output`).

:mod:`service.datasets.validate` feeds a :class:`Collector` from one file;
:mod:`service.datasets.parallel` feeds one per range of a big file and merges them.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import compress
from typing import Any

import msgspec

from service.contract import (
    Container,
    DatasetKind,
    DatasetStats,
    DatasetWarning,
    FieldMapping,
    Format,
    OnInvalid,
    RowProblem,
    SourceFormat,
    numbered_as,
    uses_functions,
)
from service.datasets.canonical import (
    CANONICAL_MAPPING,
    Row,
    as_conversation,
    conversations_pass,
    decode_error,
    first_letters,
    list_no_tools,
    parts,
    passes,
    texts_pass,
)
from service.datasets.containers import Lines
from service.datasets.layouts import DEFAULT_MAPPING, normalize
from service.datasets.messages import RowInvalid, noting_dropped
from service.datasets.output import Output, Sink
from service.datasets.rows import LONG_ROW_CHARS
from service.datasets.stats import (
    WARNING_LINES,
    HashSet,
    Lengths,
    Tally,
    chars,
    column_warnings,
    near_identical,
    near_identical_messages,
    row_warnings,
    rows,
)
from service.settings import Settings

RowError = RowProblem
_FLUSH_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_HOLD_ROWS = 512
MAX_COLUMNS = 100
"""Distinct ignored columns tracked (a ragged file must not grow the tally without bound)."""


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    max_line_bytes: int = 4 * 1024**2
    """Longest line (or row of a JSON array) accepted, in bytes, not counting its ending."""
    max_rows: int = 10_000_000
    """Most rows accepted; scanning stops past it."""
    max_errors: int = 100
    """How many errors are kept to show (all of them are counted)."""
    long_row_chars: int = LONG_ROW_CHARS
    """Threshold of the ``long_row`` warning, in characters."""
    max_tracked_rows: int = 5_000_000
    """Distinct rows remembered to find duplicates: 8 bytes a slot, at most 2/3 full, so
    the default keeps that table at 64 MiB (96 MiB while it last doubles). Later rows are
    still checked against the remembered ones."""
    max_bytes: int = 2 * 1024**3
    """Most bytes a compressed file may decompress to (a gzip bomb stops there)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The operator's limits: every way a dataset is made (upload, import, OpenAI file,
        feedback snapshot) is held to the same ones."""
        return cls(
            max_line_bytes=settings.max_line_bytes,
            max_rows=settings.max_dataset_rows,
            max_bytes=settings.max_dataset_bytes,
        )


DEFAULT_LIMITS = Limits()


class InvalidDataset(Exception):
    """The dataset was rejected: the first errors (in line order) and how many there were."""

    def __init__(
        self,
        errors: list[RowError],
        total: int,
        reason: str | None = None,
        container: Container = "jsonl",
    ) -> None:
        self.errors = errors
        self.total = total
        self.reason = reason
        self.container = container
        """What the errors' numbers count (:func:`numbered_as`): lines of JSONL, else rows."""
        unit = numbered_as(container)
        shown = "; ".join(
            f"{unit} {e.line}" + (f" {e.field}" if e.field else "") + f": {e.msg}"
            for e in errors[:3]
        )
        more = f" (and {total - len(errors[:3])} more)" if total > len(errors[:3]) else ""
        head = reason or f"{total} error{'s' if total != 1 else ''} in the dataset"
        super().__init__(f"{head}: {shown}{more}")


class IngestResult(msgspec.Struct, kw_only=True):
    rows: int
    bytes: int
    """Size of the normalized JSONL written to ``dst``."""
    source_bytes: int
    """Size of what was read (the file as uploaded, compressed or not)."""
    sha256: str
    """sha256 hex of the normalized JSONL written to ``dst``."""
    format: Format
    kind: DatasetKind = "preference"
    source_format: SourceFormat
    """The layout of the first row (``mapped`` whenever a non-default mapping was used)."""
    stats: DatasetStats
    warnings: list[DatasetWarning]
    container: Container = "jsonl"
    compressed: bool = False
    mapping: dict[str, str] = {}
    functions: bool = False
    """Whether a row lists functions or calls one."""
    skipped_rows: int = 0
    skipped: list[RowError] = []


class ErrorTally:
    """Keeps the first ``keep`` errors and counts them all."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.items: list[RowError] = []
        self.total = 0
        self.fatal = False
        self.fatal_msg: str | None = None
        """What stopped the pass: the whole file's fault, not one more invalid row."""

    def add(self, line: int, field: str | None, msg: str) -> None:
        self.total += 1
        if len(self.items) < self.keep:
            self.items.append(RowError(line=line, field=field, msg=msg))

    def stop(self, line: int, msg: str) -> None:
        """An error no row after ``line`` can be read past (or the file as a whole: line 0)."""
        self.add(line, None, msg)
        self.fatal, self.fatal_msg = True, msg

    def verdict(
        self,
        *,
        kept: int,
        records: int,
        skip: bool,
        max_invalid_fraction: float,
        container: Container,
    ) -> None:
        """Raise InvalidDataset unless the pass may be stored: no fatal error, and invalid rows
        only when skipping them was asked for, within `max_invalid_fraction`, with rows left."""
        invalid = self.total

        def refused(reason: str | None = None) -> InvalidDataset:
            return InvalidDataset(self.items, invalid, reason, container)

        if self.fatal_msg is not None:
            before = invalid - 1
            also = f"; {rows(before)} before it {'are' if before > 1 else 'is'} invalid"
            raise refused(self.fatal_msg + (also if before else ""))
        if self.fatal or (invalid and not skip):
            raise refused()
        if invalid and kept == 0:
            raise refused(f"none of the {rows(records)} is valid")
        if invalid > max_invalid_fraction * records:
            raise refused(
                f"{invalid} of {rows(records)} are invalid "
                f"({100 * invalid / records:.2f}%), more than max_invalid_fraction "
                f"{max_invalid_fraction}"
            )


def _single_turn_hash(row: Row, data: bytes) -> int:
    """A one-turn conversation's hash as its text row's (user text, answers); else its
    encoding's (a row with functions or calls is never a text row's)."""
    prompt: Any = row.prompt
    chosen: Any = row.chosen
    rejected: Any = row.rejected
    if (
        len(prompt) == len(chosen) == len(rejected) == 1
        and prompt[0].role == "user"
        and chosen[0].role == rejected[0].role == "assistant"
        and row.tools is None
        and chosen[0].tool_calls is None
        and rejected[0].tool_calls is None
    ):
        return hash((prompt[0].content, chosen[0].content, rejected[0].content))
    return hash(data)


def made_conversational(standard_rows: int, converted: Tally) -> list[DatasetWarning]:
    """The warning, if any, that text rows (the first ``standard_rows``, and ``converted``
    after them) became conversations to match rows with system messages, turns or functions."""
    count = standard_rows + converted.count
    if not count:
        return []
    return [
        DatasetWarning(
            kind="made_conversational",
            msg=f"{rows(count)} with a text prompt became conversations (one user message, one "
            "answer) to match the rows with system messages, turns or functions",
            count=count,
            lines=sorted(converted.lines)[:WARNING_LINES],
        )
    ]


class Collector:
    """The state of one validation: counters, the first errors, the output.

    With ``record``, accepted rows are not counted for duplicates and lengths here but kept
    (line, hash, lengths: 40 bytes a row) for :func:`service.datasets.parallel.merge` in
    another process.
    """

    def __init__(
        self,
        dst: Sink,
        *,
        mapping: FieldMapping | None,
        limits: Limits,
        on_invalid: OnInvalid,
        max_invalid_fraction: float,
        hasher: Callable[[bytes], int] = hash,
        record: bool = False,
    ) -> None:
        self.dst = dst
        self.mapping = mapping
        self.mapped = mapping is not None and mapping != DEFAULT_MAPPING
        self.limits = limits
        self.skip = on_invalid == "skip"
        self.max_invalid_fraction = max_invalid_fraction
        decoder = None if self.mapped else msgspec.json.Decoder(Row)
        self.fast_decode: Callable[[bytes], Row] | None = decoder and decoder.decode
        self.decode_lines: Callable[[bytes], list[Row]] | None = decoder and decoder.decode_lines
        encoder = msgspec.json.Encoder()
        self.encode, self.encode_lines = encoder.encode, encoder.encode_lines
        self.errors = ErrorTally(limits.max_errors)
        self.lengths = Lengths()
        self.seen = HashSet(limits.max_tracked_rows)
        self.duplicate, self.long_row, self.near = Tally(), Tally(), Tally()
        self.ignored: dict[str, Tally] = {}
        self.output = Output(dst)
        self.records = 0
        self.functions = False
        """Whether a row lists functions or calls one (only rows normalize took can)."""
        self.fmt: Format | None = None
        self.standard_rows = 0
        """Rows written as standard before a conversational one made the dataset a
        conversation: :meth:`finish` rewrites them."""
        self.converted = Tally()
        self.layout: SourceFormat = "mapped" if self.mapped else "standard"
        self.described: dict[str, str] = {}
        self.stopped = False
        self.held: list[Row] = []
        self.held_lines: list[int] = []
        self.held_datas: list[bytes] = []
        self.held_bytes = 0
        """Rows accepted one by one, written and counted a block at a time (:meth:`drain`)."""
        self.hasher = hasher
        self.record = record
        self._tuple_hashes = hasher is hash
        """Standard rows are hashed as their three texts (no per-row encoding needed); the
        process-independent hasher of ranges takes their encodings."""
        self.row_lines, self.row_hashes = array("Q"), array("Q")
        self.row_chars = (array("Q"), array("Q"), array("Q"))

    # ------------------------------------------------------------------ input

    def _record(self, line: int) -> bool:
        """Count a row; False (and stop) once there are more than the limit."""
        self.records += 1
        if self.records > self.limits.max_rows:
            self.errors.stop(
                line, f"the dataset has more than {self.limits.max_rows} rows (the limit)"
            )
            self.stopped = True
            return False
        return True

    def error(self, line: int, field: str | None, msg: str) -> None:
        self.errors.add(line, field, msg)

    def fatal(self, line: int, msg: str) -> None:
        self.errors.stop(line, msg)
        self.stopped = True

    def add_block(self, first: int, block: Lines, *, file_start: bool) -> None:
        """A block of JSONL lines, numbered from ``first`` (``file_start``: the first block)."""
        if file_start and block.data is not None and block.data.startswith(_BOM):
            block = Lines(block.data[3:])
        if self.fast_decode is not None and self.fmt is not None and self._block(first, block):
            return
        lines = block.lines
        if file_start and lines and lines[0] is not None and lines[0].startswith(_BOM):
            lines = [lines[0][3:], *lines[1:]]
        for i, raw in enumerate(lines):
            if self.stopped:
                return
            self._line(first + i, raw)

    def _block(self, first: int, block: Lines) -> bool:
        """The whole block in one go, if every line is a canonical row of the dataset's format
        (no blank line, no other key): True when it was taken."""
        if self.records + block.count > self.limits.max_rows:
            return False
        assert self.fast_decode is not None and self.decode_lines is not None
        try:
            if block.data is not None:
                # One value a line, each ending at its line's end: as many as there are lines
                # unless one is blank or a value spans lines (then each line says its own).
                decoded = self.decode_lines(block.data)
                if len(decoded) != block.count:
                    return False
            elif all(block.lines):
                decoded = list(map(self.fast_decode, block.lines))  # type: ignore[arg-type]
            else:
                return False
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
            return False
        return self._take(first, decoded)

    def _take(self, first: int, decoded: list[Row]) -> bool:
        """Rows decoded a block at a time, numbered from ``first``, if they all pass."""
        columns = parts(decoded)
        std = self.fmt == "standard"
        if not (
            texts_pass(*columns) and list_no_tools(decoded)
            if std
            else conversations_pass(decoded, columns[0])
        ):
            return False
        self.records += len(decoded)
        self.drain()
        lines = range(first, first + len(decoded))
        if self._tuple_hashes and std:  # no row encoded on its own: one call for the block
            self.output.write_lines(self.encode_lines(decoded), len(decoded))
            self._count(lines, decoded, columns, None, std)
        else:
            datas = list(map(self.encode, decoded))
            self.output.write(datas)
            self._count(lines, decoded, columns, datas, std)
        return True

    def _line(self, line: int, raw: bytes | None) -> None:
        if raw is None:
            if self._record(line):
                self.error(
                    line,
                    None,
                    f"line {line} is longer than the limit of {self.limits.max_line_bytes} bytes",
                )
            return
        if not raw or raw.isspace():
            return
        if not self._record(line):
            return
        row: Row | None = None
        if self.fast_decode is not None:
            try:
                row = self.fast_decode(raw)
            except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
                row = None
        if row is not None and passes(row):
            kind: SourceFormat = "standard" if isinstance(row.prompt, str) else "conversational"
            self._accept(line, row, kind, CANONICAL_MAPPING, ())
            return
        try:
            obj = msgspec.json.decode(raw)
        except (msgspec.MsgspecError, UnicodeDecodeError) as e:
            self.error(line, None, decode_error(raw, line, e))
            return
        except RecursionError:  # msgspec's own depth limit: no row is nested this deep
            self.error(line, None, f"line {line} is JSON nested too deeply to be a row")
            return
        self._normalize(line, obj)

    def add_invalid(self, line: int, field: str | None, msg: str) -> None:
        """A row that could not be read, numbered ``line``."""
        if self._record(line):
            self.error(line, field, msg)

    def add_object(self, line: int, obj: Any) -> None:
        """A row already decoded (from a JSON array, Parquet or CSV), numbered ``line``."""
        if self._record(line):
            self._normalize(line, obj)

    def _normalize(self, line: int, obj: Any) -> None:
        try:
            with noting_dropped() as dropped:
                found = normalize(obj, self.mapping)
        except RowInvalid as e:
            self.error(line, e.field, e.msg)
            return
        self.functions = self.functions or uses_functions(found.row)
        row = msgspec.convert(found.row, Row)
        self._accept(line, row, found.layout, found.mapping, [*found.ignored, *sorted(dropped)])

    # ------------------------------------------------------------------ output

    def _accept(
        self,
        line: int,
        row: Row,
        layout: SourceFormat,
        mapping: dict[str, str],
        ignored: Iterable[str],
    ) -> None:
        row_fmt: Format = "standard" if isinstance(row.prompt, str) else "conversational"
        if self.fmt is None:
            self.fmt = row_fmt
            self.layout = "mapped" if self.mapped else layout
            self.described = mapping
        elif row_fmt != self.fmt:
            # Texts and conversations in one file (a system column in some rows only): the
            # dataset is a conversation, and a text row reads as one user turn and one answer.
            if row_fmt == "standard":
                row, row_fmt = as_conversation(row), "conversational"
                self.converted.add(line)
            else:
                self.drain()
                self.fmt, self.standard_rows = "conversational", self.output.rows
                if not self.mapped:  # the layout that holds the system messages or turns
                    self.layout, self.described = layout, mapping
        if row_fmt == "standard" and len(self.converted.lines) < WARNING_LINES:
            self.converted.lines.append(line)  # the first text rows, in case they turn
        for name in ignored:
            tally = self.ignored.get(name)
            if tally is None:
                if len(self.ignored) >= MAX_COLUMNS:
                    continue
                tally = self.ignored[name] = Tally()
            tally.add(line)
        data = self.encode(row)
        self.held_lines.append(line)
        self.held.append(row)
        self.held_datas.append(data)
        self.held_bytes += len(data)
        if len(self.held) >= _HOLD_ROWS or self.held_bytes >= _FLUSH_BYTES:
            self.drain()

    def drain(self) -> None:
        """Write and count the rows accepted one by one, as a block (all of one format)."""
        if self.held:
            self.output.write(self.held_datas)
            std = self.fmt == "standard"
            self._count(self.held_lines, self.held, parts(self.held), self.held_datas, std)
            self.held, self.held_lines, self.held_datas, self.held_bytes = [], [], [], 0

    def _count(
        self,
        lines: Sequence[int],
        accepted: list[Row],
        parts: tuple[list[Any], ...],
        datas: list[bytes] | None,
        std: bool,
    ) -> None:
        """Duplicates, near-identical pairs, long rows and lengths of ``accepted`` rows
        (``lines`` in order; ``parts``: their prompts, chosen and rejected; ``datas``: their
        encodings, unless texts are hashed as they are)."""
        prompts, chosen, rejected = parts
        size: Callable[[Any], int] = len if std else chars
        sizes = (list(map(size, prompts)), list(map(size, chosen)), list(map(size, rejected)))
        if self._tuple_hashes and std:
            hashes: Iterable[int] = map(hash, zip(prompts, chosen, rejected, strict=True))
        elif self._tuple_hashes:
            # A one-turn conversation (a text row made one, or written so) hashes as the texts
            # do, whether or not text rows came yet: a repeat across a switch is counted.
            assert datas is not None
            hashes = list(map(_single_turn_hash, accepted, datas))
        else:
            assert datas is not None
            hashes = map(self.hasher, datas)
        if self.record:
            self.row_lines.extend(lines)
            self.row_hashes.extend(hashes)
            for kept, values in zip(self.row_chars, sizes, strict=True):
                kept.extend(values)
        else:
            self.count_rows(lines, list(hashes), *sizes)
        totals = map(operator.add, map(operator.add, sizes[0], sizes[1]), sizes[2])
        long_rows = list(compress(lines, map(self.limits.long_row_chars.__lt__, totals)))
        if long_rows:
            self.long_row.add_many(long_rows)
        if std:  # only pairs whose first letters agree can be near-identical
            same = map(operator.eq, first_letters(chosen), first_letters(rejected))
            maybe = list(compress(range(len(chosen)), same))
            near = [i for i in maybe if near_identical(chosen[i], rejected[i])]
        else:
            near = list(
                compress(range(len(chosen)), map(near_identical_messages, chosen, rejected))
            )
        if near:
            self.near.add_many([lines[i] for i in near])

    def count_rows(
        self,
        lines: Sequence[int],
        hashes: Iterable[int],
        ps: Sequence[int],
        cs: Sequence[int],
        rs: Sequence[int],
        *,
        offset: int = 0,
    ) -> None:
        dup = self.seen.add_many(hashes)
        if dup:
            self.duplicate.add_many([offset + lines[i] for i in dup])
        self.lengths.add_many(ps, cs, rs)

    def flush(self) -> None:
        """Write out what is held and buffered."""
        self.drain()
        self.output.flush()

    # ------------------------------------------------------------------ result

    def finish(self, source_bytes: int, container: Container, compressed: bool) -> IngestResult:
        self.drain()
        errors = self.errors
        invalid = errors.total
        if not errors.fatal and self.output.rows == 0 and not invalid:
            self.fatal(0, "the dataset has no rows")
        errors.verdict(
            kept=self.output.rows,
            records=self.records,
            skip=self.skip,
            max_invalid_fraction=self.max_invalid_fraction,
            container=container,
        )
        self.flush()
        assert self.fmt is not None
        warnings = row_warnings(
            self.duplicate, self.seen, self.long_row, self.near, self.limits.long_row_chars
        )
        if self.standard_rows:
            self.output.rewrite_as_conversations(self.standard_rows)
        if self.fmt == "conversational":
            warnings += made_conversational(self.standard_rows, self.converted)
        return IngestResult(
            rows=self.output.rows,
            bytes=self.output.written,
            source_bytes=source_bytes,
            sha256=self.output.sha.hexdigest(),
            format=self.fmt,
            source_format=self.layout,
            stats=self.lengths.stats(),
            warnings=warnings + column_warnings(self.ignored, mapped=self.mapped),
            container=container,
            compressed=compressed,
            mapping=self.described,
            functions=self.functions,
            skipped_rows=invalid,
            skipped=errors.items if invalid else [],
        )
