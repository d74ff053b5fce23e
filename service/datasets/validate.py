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

import hashlib
import operator
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
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
from service.datasets.containers import (
    FileProblem,
    JsonlBlocks,
    Opened,
    csv_rows,
    json_rows,
    open_dataset,
    parquet_rows,
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


class _Ingest:
    """The state of one validation: counters, the first errors, the output."""

    def __init__(
        self,
        dst: BinaryIO,
        *,
        mapping: FieldMapping | None,
        limits: Limits,
        on_invalid: OnInvalid,
        max_invalid_fraction: float,
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
        self.encode = msgspec.json.Encoder().encode
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
        if not all(map(_passes, decoded)):
            return False
        std = self.fmt == "standard"
        if any(isinstance(row.prompt, str) != std for row in decoded):
            return False
        self.records += len(decoded)
        datas = list(map(self.encode, decoded))
        self._write(datas)
        lines_of = range(first, first + len(decoded))
        self._count(lines_of, decoded, datas, std)
        longest = max(map(len, lines))  # type: ignore[arg-type]
        if longest > self.limits.long_row_chars:
            for line, row in zip(lines_of, decoded, strict=True):
                self._long(line, row)
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
        self._write([data])
        self._count([line], [row], [data], row_fmt == "standard")
        self._long(line, row)

    def _write(self, datas: list[bytes]) -> None:
        self.rows += len(datas)
        out = self.out
        out += b"\n".join(datas)
        out += b"\n"
        if len(out) >= _FLUSH_BYTES:
            self.sha.update(out)
            self.dst.write(out)
            self.written += len(out)
            out.clear()

    def _count(self, lines: Any, decoded: list[_Row], datas: list[bytes], std: bool) -> None:
        """Duplicates, near-identical pairs and lengths of accepted rows (``lines`` in order)."""
        lines = list(lines)
        dup = self.seen.add_many(map(hash, datas))
        if dup:
            self.duplicate.add_many([lines[i] for i in dup])
        prompts = list(map(_prompt_of, decoded))
        chosen = list(map(_chosen_of, decoded))
        rejected = list(map(_rejected_of, decoded))
        if std:
            near = list(map(near_identical, chosen, rejected))
            self.lengths.add_many(
                list(map(len, prompts)), list(map(len, chosen)), list(map(len, rejected))
            )
        else:
            near = list(map(near_identical_messages, chosen, rejected))
            self.lengths.add_many(
                list(map(chars, prompts)), list(map(chars, chosen)), list(map(chars, rejected))
            )
        if any(near):
            self.near.add_many([line for line, hit in zip(lines, near, strict=True) if hit])

    def _long(self, line: int, row: _Row) -> None:
        size: Callable[[Any], int] = len if isinstance(row.prompt, str) else chars
        if size(row.prompt) + size(row.chosen) + size(row.rejected) > self.limits.long_row_chars:
            self.long_row.add(line)

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
        self.sha.update(self.out)
        self.dst.write(self.out)
        self.written += len(self.out)
        self.out.clear()
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
    ingest = _Ingest(
        dst,
        mapping=mapping,
        limits=limits,
        on_invalid=on_invalid,
        max_invalid_fraction=max_invalid_fraction,
    )
    blocks = JsonlBlocks(src, limits.max_line_bytes)
    _jsonl(ingest, blocks, 0)
    return ingest.finish(blocks.consumed, "jsonl", False)


def _jsonl(ingest: _Ingest, blocks: JsonlBlocks, offset: int) -> int:
    """Feed JSONL blocks, numbering lines after ``offset``; the last line number."""
    last = offset
    for first, lines in blocks:
        ingest.add_lines(offset + first, lines, file_start=first == 1)
        last = offset + first + len(lines) - 1
        if ingest.stopped:
            break
    return last


def _read(ingest: _Ingest, path: Path, hint: Container | None, offset: int) -> tuple[Opened, int]:
    """Feed the rows of one file; (what it was, the last line or row number)."""
    limits = ingest.limits
    with open_dataset(path, hint=hint, max_bytes=limits.max_bytes) as opened:
        if opened.container == "jsonl":
            return opened, _jsonl(ingest, JsonlBlocks(opened.stream, limits.max_line_bytes), offset)
        if opened.container == "parquet":
            objects: Iterable[tuple[int, Any]] = parquet_rows(path, limits.max_bytes)
        elif opened.container == "csv":
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
    dst: BinaryIO,
    *,
    hint: Container | None = None,
    mapping: FieldMapping | None = None,
    limits: Limits = DEFAULT_LIMITS,
    on_invalid: OnInvalid = "reject",
    max_invalid_fraction: float = 0.01,
) -> IngestResult:
    """Validate the rows of the file at ``paths`` (or of several, one dataset: the shards of a
    split, lines numbered on from one file to the next), whatever container holds them.

    Raises UnsupportedFile (nothing can be read), DatasetTooLarge (it decompresses past
    ``limits.max_bytes``) or InvalidDataset.
    """
    files = [paths] if isinstance(paths, Path) else list(paths)
    ingest = _Ingest(
        dst,
        mapping=mapping,
        limits=limits,
        on_invalid=on_invalid,
        max_invalid_fraction=max_invalid_fraction,
    )
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
