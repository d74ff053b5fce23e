"""What one validation keeps while rows stream by: the first errors, the counters, the
normalized output and its digest; and the canonical row type the fast path decodes into.

:mod:`service.datasets.validate` feeds a :class:`Collector` from one file;
:mod:`service.datasets.parallel` feeds one per range of a big file and merges them.
"""

from __future__ import annotations

import hashlib
import operator
import shutil
import tempfile
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import compress
from typing import Any, BinaryIO, Literal

import msgspec

from service.contract import (
    Container,
    DatasetStats,
    DatasetWarning,
    FieldMapping,
    Format,
    OnInvalid,
    RowProblem,
    SourceFormat,
)
from service.datasets.layouts import DEFAULT_MAPPING, PROMPT_LIKE, normalize
from service.datasets.messages import COMPLETION_ROLES, RowInvalid
from service.datasets.rows import LONG_ROW_CHARS
from service.datasets.stats import (
    WARNING_LINES,
    HashSet,
    Lengths,
    Tally,
    chars,
    near_identical,
    near_identical_messages,
    row_warnings,
    rows,
)

RowError = RowProblem
_FLUSH_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_HOLD_ROWS = 512
_MAX_COLUMNS = 100
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


DEFAULT_LIMITS = Limits()


class InvalidDataset(Exception):
    """The dataset was rejected: the first errors (in line order) and how many there were."""

    def __init__(self, errors: list[RowError], total: int, reason: str | None = None) -> None:
        self.errors = errors
        self.total = total
        self.reason = reason
        shown = "; ".join(
            f"line {e.line}" + (f" {e.field}" if e.field else "") + f": {e.msg}" for e in errors[:3]
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
    source_format: SourceFormat
    """The layout of the first row (``mapped`` whenever a non-default mapping was used)."""
    stats: DatasetStats
    warnings: list[DatasetWarning]
    container: Container = "jsonl"
    compressed: bool = False
    mapping: dict[str, str] = {}
    skipped_rows: int = 0
    skipped: list[RowError] = []


class _Errors:
    """Keeps the first ``keep`` errors and counts them all."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.items: list[RowError] = []
        self.total = 0
        self.fatal = False

    def add(self, line: int, field: str | None, msg: str) -> None:
        self.total += 1
        if len(self.items) < self.keep:
            self.items.append(RowError(line=line, field=field, msg=msg))


class _Message(msgspec.Struct, gc=False):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class _Row(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """A canonical row, and the type the fast path decodes lines into.

    Decoding straight into it checks types and roles in C and refuses any other key (a row
    with more columns may be another layout, or a column to warn about); encoding it gives
    the canonical JSON (fields and keys in this order).
    """

    prompt: str | list[_Message]
    chosen: str | list[_Message]
    rejected: str | list[_Message]


_role_of = operator.attrgetter("role")
_prompt_of = operator.attrgetter("prompt")
_chosen_of = operator.attrgetter("chosen")
_rejected_of = operator.attrgetter("rejected")


def _passes(row: _Row) -> bool:
    """Whether a row decoded straight into :class:`_Row` passes every check of
    :func:`normalize` (if not, the slow path says what is wrong)."""
    p, c, r = row.prompt, row.chosen, row.rejected
    if isinstance(p, str):
        return (
            isinstance(c, str)
            and isinstance(r, str)
            and bool(p and c and r)
            and c != r
            and not (p.isspace() or c.isspace() or r.isspace())
        )
    if not (isinstance(c, list) and isinstance(r, list) and p and c and r):
        return False
    if p[-1].role == "assistant" or c[0].role != "assistant" or r[0].role != "assistant":
        return False
    for msgs in (p, c, r):
        for m in msgs:
            if not m.content or m.content.isspace():
                return False
    for msgs in (c, r):
        if len(msgs) > 1 and not COMPLETION_ROLES.issuperset(map(_role_of, msgs)):
            return False
    return c != r


def _parts(rows: list[_Row]) -> tuple[list[Any], list[Any], list[Any]]:
    return (
        list(map(_prompt_of, rows)),
        list(map(_chosen_of, rows)),
        list(map(_rejected_of, rows)),
    )


def _texts_pass(*columns: list[Any]) -> bool:
    """Whether decoded standard rows pass every check of :func:`normalize`, a column at a
    time in C: all texts, none empty or blank, chosen never equal to rejected."""
    for texts in columns:
        if set(map(type, texts)) != {str} or not all(texts) or any(map(str.isspace, texts)):
            return False
    return not any(map(operator.eq, columns[1], columns[2]))


def _conversations_pass(rows: list[_Row], prompts: list[Any]) -> bool:
    return set(map(type, prompts)) == {list} and all(map(_passes, rows))


_first = operator.itemgetter(slice(0, 1))


def _first_letters(texts: list[str]) -> Iterable[str]:
    """Each text's first non-blank character, case-folded (C calls only)."""
    return map(str.casefold, map(_first, map(str.lstrip, texts)))


def _decode_error(raw: bytes, line: int, exc: Exception) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"line {line} is not valid UTF-8: {e.reason} 0x{raw[e.start]:02x} at byte {e.start}"
    return f"line {line} is not valid JSON: {exc}"


def _as_conversation(row: _Row) -> _Row:
    """A standard row as the conversation it stands for (what training would make of it)."""
    return _Row(
        [_Message("user", row.prompt)],  # type: ignore[arg-type]
        [_Message("assistant", row.chosen)],  # type: ignore[arg-type]
        [_Message("assistant", row.rejected)],  # type: ignore[arg-type]
    )


_CANONICAL = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


def stable_hash(data: bytes) -> int:
    """A 64-bit row hash that is the same in every process (``hash`` is salted per process),
    for rows counted in one process and compared in another."""
    return zlib.crc32(data) << 32 | zlib.adler32(data)


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
    ignored: dict[str, tuple[int, list[int]]]
    near: tuple[int, list[int]]
    long_row: tuple[int, list[int]]
    row_lines: bytes
    row_hashes: bytes
    row_chars: tuple[bytes, bytes, bytes]


class Collector:
    """The state of one validation: counters, the first errors, the output.

    With ``record``, accepted rows are not counted for duplicates and lengths here but kept
    (line, hash, lengths: 40 bytes a row) for :meth:`merge` in another process.
    """

    def __init__(
        self,
        dst: BinaryIO,
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
        self.fast_decode: Callable[[bytes], _Row] | None = (
            None if self.mapped else msgspec.json.Decoder(_Row).decode
        )
        encoder = msgspec.json.Encoder()
        self.encode, self.encode_lines = encoder.encode, encoder.encode_lines
        self.errors = _Errors(limits.max_errors)
        self.lengths = Lengths()
        self.seen = HashSet(limits.max_tracked_rows)
        self.duplicate, self.long_row, self.near = Tally(), Tally(), Tally()
        self.ignored: dict[str, Tally] = {}
        self.sha = hashlib.sha256()
        self.out = bytearray()
        self.written = 0
        self.records = 0
        self.rows = 0
        self.fmt: Format | None = None
        self.standard_rows = 0
        """Rows written as standard before a conversational one made the dataset a
        conversation: :meth:`finish` rewrites them."""
        self.converted = Tally()
        self.layout: SourceFormat = "mapped" if self.mapped else "standard"
        self.described: dict[str, str] = {}
        self.stopped = False
        self.held: list[_Row] = []
        self.held_lines: list[int] = []
        self.held_datas: list[bytes] = []
        self.held_bytes = 0
        """Rows accepted one by one, written and counted a block at a time (:meth:`_drain`)."""
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
            self.errors.add(
                line, None, f"the dataset has more than {self.limits.max_rows} rows (the limit)"
            )
            self.errors.fatal = self.stopped = True
            return False
        return True

    def error(self, line: int, field: str | None, msg: str) -> None:
        self.errors.add(line, field, msg)

    def fatal(self, line: int, msg: str) -> None:
        self.errors.add(line, None, msg)
        self.errors.fatal = self.stopped = True

    def add_block(self, first: int, block: bytes | list[bytes | None], *, file_start: bool) -> None:
        """What :class:`JsonlBlocks` gives: whole lines as one run of bytes, or a list."""
        if isinstance(block, bytes):
            lines: list[bytes | None] = block.split(b"\n")  # type: ignore[assignment]
            lines.pop()  # after the last line ending
            block = lines
        self.add_lines(first, block, file_start=file_start)

    def add_lines(self, first: int, lines: list[bytes | None], *, file_start: bool) -> None:
        """A block of JSONL lines, numbered from ``first`` (``file_start``: the first block)."""
        if file_start and lines and lines[0] is not None and lines[0].startswith(_BOM):
            lines = [lines[0][3:], *lines[1:]]
        if self.fast_decode is not None and self.fmt is not None and self._block(first, lines):
            return
        for i, raw in enumerate(lines):
            if self.stopped:
                return
            self._line(first + i, raw)

    def _block(self, first: int, lines: list[bytes | None]) -> bool:
        """The whole block in one go, if every line is a canonical row of the dataset's format
        (no blank line, no other key): True when it was taken."""
        if self.records + len(lines) > self.limits.max_rows or not all(lines):
            return False
        assert self.fast_decode is not None
        try:
            decoded = list(map(self.fast_decode, lines))  # type: ignore[arg-type]
        except (msgspec.MsgspecError, UnicodeDecodeError):
            return False
        return self._take(first, decoded)

    def _take(self, first: int, decoded: list[_Row]) -> bool:
        """Rows decoded a block at a time, numbered from ``first``, if they all pass."""
        parts = _parts(decoded)
        std = self.fmt == "standard"
        if not (_texts_pass(*parts) if std else _conversations_pass(decoded, parts[0])):
            return False
        self.records += len(decoded)
        self._drain()
        lines = range(first, first + len(decoded))
        if self._tuple_hashes and std:  # no row encoded on its own: one call for the block
            self._write_lines(self.encode_lines(decoded), len(decoded))
            self._count(lines, parts, None, std)
        else:
            datas = list(map(self.encode, decoded))
            self._write(datas)
            self._count(lines, parts, datas, std)
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
        row: _Row | None = None
        if self.fast_decode is not None:
            try:
                row = self.fast_decode(raw)
            except (msgspec.MsgspecError, UnicodeDecodeError):
                row = None
        if row is not None and _passes(row):
            kind: SourceFormat = "standard" if isinstance(row.prompt, str) else "conversational"
            self._accept(line, row, kind, _CANONICAL, ())
            return
        try:
            obj = msgspec.json.decode(raw)
        except (msgspec.MsgspecError, UnicodeDecodeError) as e:
            self.error(line, None, _decode_error(raw, line, e))
            return
        self._normalize(line, obj)

    def add_object(self, line: int, obj: Any) -> None:
        """A row already decoded (from a JSON array, Parquet or CSV), numbered ``line``."""
        if self._record(line):
            self._normalize(line, obj)

    def _normalize(self, line: int, obj: Any) -> None:
        try:
            found = normalize(obj, self.mapping)
        except RowInvalid as e:
            self.error(line, e.field, e.msg)
            return
        row = msgspec.convert(found.row, _Row)
        self._accept(line, row, found.layout, found.mapping, found.ignored)

    # ------------------------------------------------------------------ output

    def _accept(
        self,
        line: int,
        row: _Row,
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
                row, row_fmt = _as_conversation(row), "conversational"
                self.converted.add(line)
            else:
                self._drain()
                self.fmt, self.standard_rows = "conversational", self.rows
                if not self.mapped:  # the layout that holds the system messages or turns
                    self.layout, self.described = layout, mapping
        if row_fmt == "standard" and len(self.converted.lines) < WARNING_LINES:
            self.converted.lines.append(line)  # the first text rows, in case they turn
        for name in ignored:
            tally = self.ignored.get(name)
            if tally is None:
                if len(self.ignored) >= _MAX_COLUMNS:
                    continue
                tally = self.ignored[name] = Tally()
            tally.add(line)
        data = self.encode(row)
        self.held_lines.append(line)
        self.held.append(row)
        self.held_datas.append(data)
        self.held_bytes += len(data)
        if len(self.held) >= _HOLD_ROWS or self.held_bytes >= _FLUSH_BYTES:
            self._drain()

    def _drain(self) -> None:
        """Write and count the rows accepted one by one, as a block (all of one format)."""
        if self.held:
            self._write(self.held_datas)
            std = self.fmt == "standard"
            self._count(self.held_lines, _parts(self.held), self.held_datas, std)
            self.held, self.held_lines, self.held_datas, self.held_bytes = [], [], [], 0

    def _write(self, datas: list[bytes]) -> None:
        self.out += b"\n".join(datas)
        self._write_lines(b"\n", len(datas))

    def _write_lines(self, data: bytes, rows: int) -> None:
        """Rows already encoded, each ending with a newline."""
        self.rows += rows
        out = self.out
        out += data
        if len(out) >= _FLUSH_BYTES:
            self.sha.update(out)
            self.dst.write(out)
            self.written += len(out)
            out.clear()

    def _count(
        self,
        lines: Sequence[int],
        parts: tuple[list[Any], ...],
        datas: list[bytes] | None,
        std: bool,
    ) -> None:
        """Duplicates, near-identical pairs, long rows and lengths of accepted rows (``lines``
        in order; ``parts``: their prompts, chosen and rejected; ``datas``: their encodings,
        unless texts are hashed as they are)."""
        prompts, chosen, rejected = parts
        size: Callable[[Any], int] = len if std else chars
        sizes = (list(map(size, prompts)), list(map(size, chosen)), list(map(size, rejected)))
        if self._tuple_hashes and std:
            hashes: Iterable[int] = map(hash, zip(prompts, chosen, rejected, strict=True))
        else:
            assert datas is not None
            hashes = map(self.hasher, datas)
        if self.record:
            self.row_lines.extend(lines)
            self.row_hashes.extend(hashes)
            for kept, values in zip(self.row_chars, sizes, strict=True):
                kept.extend(values)
        else:
            self._count_rows(lines, list(hashes), *sizes)
        totals = map(operator.add, map(operator.add, sizes[0], sizes[1]), sizes[2])
        long_rows = list(compress(lines, map(self.limits.long_row_chars.__lt__, totals)))
        if long_rows:
            self.long_row.add_many(long_rows)
        if std:  # only pairs whose first letters agree can be near-identical
            same = map(operator.eq, _first_letters(chosen), _first_letters(rejected))
            maybe = list(compress(range(len(chosen)), same))
            near = [i for i in maybe if near_identical(chosen[i], rejected[i])]
        else:
            near = list(
                compress(range(len(chosen)), map(near_identical_messages, chosen, rejected))
            )
        if near:
            self.near.add_many([lines[i] for i in near])

    def _count_rows(
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
        """Write out what is buffered."""
        self._drain()
        self.sha.update(self.out)
        self.dst.write(self.out)
        self.written += len(self.out)
        self.out.clear()

    def range_result(self, lines: int) -> RangeResult:
        """What :meth:`merge` needs of a range ``record`` mode went through."""
        self.flush()

        def tally(t: Tally) -> tuple[int, list[int]]:
            return t.count, t.lines

        return RangeResult(
            lines=lines,
            records=self.records,
            rows=self.rows,
            errors=self.errors.items,
            error_total=self.errors.total,
            fatal=self.errors.fatal,
            fmt=self.fmt,
            layout=self.layout,
            described=self.described,
            mixed=bool(self.standard_rows or self.converted.count),
            ignored={name: tally(t) for name, t in self.ignored.items()},
            near=tally(self.near),
            long_row=tally(self.long_row),
            row_lines=self.row_lines.tobytes(),
            row_hashes=self.row_hashes.tobytes(),
            row_chars=(
                self.row_chars[0].tobytes(),
                self.row_chars[1].tobytes(),
                self.row_chars[2].tobytes(),
            ),
        )

    def merge(self, part: RangeResult, offset: int, output: BinaryIO) -> bool:
        """Take in the range after the ones seen so far (its lines after ``offset``, its
        normalized rows in ``output``), as if its rows had come here one by one.

        False when that would not be the same: the range met other formats, or rows past
        the limit; then validate the whole file in one go instead.
        """
        if part.fatal or part.mixed or self.records + part.records > self.limits.max_rows:
            return False
        self._drain()
        if part.fmt is not None and self.fmt is not None and part.fmt != self.fmt:
            return False
        if self.fmt is None and part.fmt is not None:
            self.fmt, self.layout, self.described = part.fmt, part.layout, part.described
        self.records += part.records
        for e in part.errors:
            self.errors.add(offset + e.line, e.field, e.msg)
        self.errors.total += part.error_total - len(part.errors)
        for name, (count, lines) in part.ignored.items():
            if name in self.ignored or len(self.ignored) < _MAX_COLUMNS:
                self.ignored.setdefault(name, Tally()).merge(count, [offset + n for n in lines])
        for mine, (count, lines) in ((self.near, part.near), (self.long_row, part.long_row)):
            mine.merge(count, [offset + n for n in lines])
        self.flush()
        while chunk := output.read(_FLUSH_BYTES):
            self.sha.update(chunk)
            self.dst.write(chunk)
            self.written += len(chunk)
        self.rows += part.rows
        self._count_rows(
            array("Q", part.row_lines),
            array("Q", part.row_hashes),
            *(array("Q", values) for values in part.row_chars),
            offset=offset,
        )
        return True

    def _rewrite_standard_rows(self) -> None:
        """Rewrite the first ``standard_rows`` rows of ``dst`` as conversations (in a temp
        file, then back), and the digest and size with them."""
        decode = msgspec.json.Decoder(_Row).decode
        dst = self.dst
        dst.flush()
        dst.seek(0)
        sha, written = hashlib.sha256(), 0
        with tempfile.TemporaryFile() as tmp:
            for i, line in enumerate(dst):
                if i < self.standard_rows:
                    line = self.encode(_as_conversation(decode(line))) + b"\n"
                tmp.write(line)
                sha.update(line)
                written += len(line)
            tmp.seek(0)
            dst.seek(0)
            dst.truncate()
            shutil.copyfileobj(tmp, dst, _FLUSH_BYTES)
        self.sha, self.written = sha, written

    # ------------------------------------------------------------------ result

    def _column_warnings(self) -> list[DatasetWarning]:
        found = []
        for name, tally in self.ignored.items():
            if self.mapped and name in PROMPT_LIKE:
                kind = "unused_prompt_column"
                msg = (
                    f"column {name!r} holds text in {rows(tally.count)} but the mapping does "
                    "not use it: map it (system_field, history_field or prompt_field) or drop it"
                )
            else:
                kind = "ignored_column"
                msg = f"column {name!r} ignored in {rows(tally.count)}"
                if name in PROMPT_LIKE:
                    msg += (
                        ": its text is in no prompt (map the columns to use it: prompt_field, "
                        "system_field, history_field)"
                    )
            found.append(DatasetWarning(kind=kind, msg=msg, count=tally.count, lines=tally.lines))
        return found

    def finish(self, source_bytes: int, container: Container, compressed: bool) -> IngestResult:
        self._drain()
        errors = self.errors
        invalid = errors.total
        if not errors.fatal and self.rows == 0 and not invalid:
            self.fatal(0, "the dataset has no rows")
        if errors.fatal or (invalid and not self.skip):
            raise InvalidDataset(errors.items, errors.total)
        if invalid and self.rows == 0:
            raise InvalidDataset(
                errors.items, errors.total, f"none of the {rows(self.records)} is valid"
            )
        if invalid > self.max_invalid_fraction * self.records:
            raise InvalidDataset(
                errors.items,
                errors.total,
                f"{invalid} of {rows(self.records)} are invalid "
                f"({100 * invalid / self.records:.2f}%), more than max_invalid_fraction "
                f"{self.max_invalid_fraction}",
            )
        self.flush()
        assert self.fmt is not None
        warnings = row_warnings(
            self.duplicate, self.seen, self.long_row, self.near, self.limits.long_row_chars
        )
        if self.standard_rows:
            self._rewrite_standard_rows()
        if self.fmt == "conversational" and (self.standard_rows or self.converted.count):
            count = self.standard_rows + self.converted.count
            lines = sorted(self.converted.lines)[:WARNING_LINES]
            warnings.append(
                DatasetWarning(
                    kind="made_conversational",
                    msg=f"{rows(count)} with a text prompt became conversations (one user "
                    "message, one answer) to match the rows with system messages or turns",
                    count=count,
                    lines=lines,
                )
            )
        return IngestResult(
            rows=self.rows,
            bytes=self.written,
            source_bytes=source_bytes,
            sha256=self.sha.hexdigest(),
            format=self.fmt,
            source_format=self.layout,
            stats=self.lengths.stats(),
            warnings=warnings + self._column_warnings(),
            container=container,
            compressed=compressed,
            mapping=self.described,
            skipped_rows=invalid,
            skipped=errors.items if invalid else [],
        )
