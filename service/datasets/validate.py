"""Streaming validation of a whole JSONL upload: rows checked, normalized, counted and
written one at a time in flat memory."""

from __future__ import annotations

import hashlib
import io
import math
import operator
import random
from array import array
from collections.abc import Callable
from typing import BinaryIO, Literal

import msgspec

from service.contract import DatasetStats, DatasetWarning, FieldMapping, Format
from service.datasets.rows import (
    COMPLETION_ROLES,
    DEFAULT_MAPPING,
    LONG_ROW_CHARS,
    RowInvalid,
    SourceFormat,
    normalize_row,
)

WARNING_LINES = 10
"""How many line numbers a warning lists."""


_RESERVOIR_SIZE = 4096


_NEAR_WINDOW = 48


_SKIP_CHUNK = 1 << 20


_FLUSH_BYTES = 1 << 20


_BOM = b"\xef\xbb\xbf"


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    max_line_bytes: int = 4 * 1024**2
    """Longest line accepted, in bytes, not counting its line ending."""
    max_rows: int = 10_000_000
    """Most non-blank lines accepted; scanning stops past it."""
    max_errors: int = 100
    """How many errors are kept to show (all of them are counted)."""
    long_row_chars: int = LONG_ROW_CHARS
    """Threshold of the ``long_row`` warning, in characters."""
    max_tracked_rows: int = 5_000_000
    """Distinct rows remembered to find duplicates: 8 bytes a slot, at most 2/3 full, so
    the default keeps that table at 64 MiB (96 MiB while it last doubles). Later rows are
    still checked against the remembered ones."""


DEFAULT_LIMITS = Limits()


class RowError(msgspec.Struct, kw_only=True):
    line: int
    """1-based line number; 0 for an error about the whole file."""
    field: str | None
    """Where in the row, e.g. ``chosen``, ``prompt[2].role``, ``input.messages``."""
    msg: str


class InvalidDataset(Exception):
    """The dataset was rejected: the first errors (in line order) and how many there were."""

    def __init__(self, errors: list[RowError], total: int) -> None:
        self.errors = errors
        self.total = total
        shown = "; ".join(
            f"line {e.line}" + (f" {e.field}" if e.field else "") + f": {e.msg}" for e in errors[:3]
        )
        more = f" (and {total - len(errors[:3])} more)" if total > len(errors[:3]) else ""
        super().__init__(f"{total} error{'s' if total != 1 else ''} in the dataset: {shown}{more}")


class IngestResult(msgspec.Struct, kw_only=True):
    rows: int
    bytes: int
    """Size of the normalized JSONL written to ``dst``."""
    source_bytes: int
    """Size of what was read from ``src``."""
    sha256: str
    """sha256 hex of the normalized JSONL written to ``dst``."""
    format: Format
    source_format: SourceFormat
    """The form of the first row (``mapped`` whenever a non-default mapping was used)."""
    stats: DatasetStats
    warnings: list[DatasetWarning]


class _Errors:
    """Keeps the first ``keep`` errors and counts them all."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.items: list[RowError] = []
        self.total = 0

    def add(self, line: int, field: str | None, msg: str) -> None:
        self.total += 1
        if len(self.items) < self.keep:
            self.items.append(RowError(line=line, field=field, msg=msg))


class _Tally:
    """One warning kind: how many rows, and the first few line numbers."""

    def __init__(self) -> None:
        self.count = 0
        self.lines: list[int] = []

    def add(self, line: int) -> None:
        self.count += 1
        if len(self.lines) < WARNING_LINES:
            self.lines.append(line)


class _HashSet:
    """Set of 64-bit hashes in a flat array with linear probing, at most 2/3 full.

    8-24 bytes a row instead of ~100 for a Python set of digests. Past ``capacity`` hashes
    it stops growing (new rows are still checked against the ones it holds), so its memory
    has a fixed ceiling whatever the row count. 0 marks an empty slot (0 is stored as 1).
    """

    def __init__(self, capacity: int, bits: int = 16) -> None:
        self.capacity = capacity
        self.size = 0
        self.full = False
        self._alloc(bits)

    def _alloc(self, bits: int) -> None:
        self.mask = (1 << bits) - 1
        self.slots = array("Q", [0]) * (1 << bits)
        self.limit = (2 << bits) // 3

    def add(self, h: int) -> bool:
        """Insert ``h`` (room permitting); True if it was already there."""
        h = (h & 0xFFFF_FFFF_FFFF_FFFF) or 1
        slots, mask = self.slots, self.mask
        i = h & mask
        while v := slots[i]:
            if v == h:
                return True
            i = (i + 1) & mask
        if self.size >= self.capacity:
            self.full = True
            return False
        slots[i] = h
        self.size += 1
        if self.size > self.limit:
            self._grow()
        return False

    def _grow(self) -> None:
        old = self.slots
        self._alloc(self.mask.bit_length() + 1)
        slots, mask = self.slots, self.mask
        for h in old:
            if h:
                i = h & mask
                while slots[i]:
                    i = (i + 1) & mask
                slots[i] = h


class _Lengths:
    """min/mean/max exactly, p95 from a fixed-seed uniform sample (Li's Algorithm L)."""

    def __init__(self, k: int = _RESERVOIR_SIZE, seed: int = 0) -> None:
        self.k = k
        self.n = 0
        self.lo = [math.inf] * 3
        self.hi = [0] * 3
        self.sums = [0] * 3
        self.sample: list[tuple[int, int, int]] = []
        self._rng = random.Random(seed)
        self._w = 1.0
        self._next = 0

    def _u(self) -> float:
        u = 0.0
        while u == 0.0:
            u = self._rng.random()
        return u

    def _skip(self) -> None:
        self._w *= math.exp(math.log(self._u()) / self.k)
        self._next += math.floor(math.log(self._u()) / math.log1p(-self._w)) + 1

    def add(self, p: int, c: int, r: int) -> None:
        self.n += 1
        lo, hi, sums = self.lo, self.hi, self.sums
        sums[0] += p
        sums[1] += c
        sums[2] += r
        if p < lo[0]:
            lo[0] = p
        if c < lo[1]:
            lo[1] = c
        if r < lo[2]:
            lo[2] = r
        if p > hi[0]:
            hi[0] = p
        if c > hi[1]:
            hi[1] = c
        if r > hi[2]:
            hi[2] = r
        if self.n <= self.k:
            self.sample.append((p, c, r))
            if self.n == self.k:
                self._next = self.k
                self._skip()
        elif self.n == self._next:
            self.sample[self._rng.randrange(self.k)] = (p, c, r)
            self._skip()

    def stats(self) -> DatasetStats:
        def summary(i: int) -> dict[str, float]:
            values = sorted(s[i] for s in self.sample)
            return {
                "min": float(self.lo[i]),
                "mean": round(self.sums[i] / self.n, 2),
                "max": float(self.hi[i]),
                "p95": float(values[math.ceil(0.95 * len(values)) - 1]),
            }

        return DatasetStats(
            prompt_chars=summary(0), chosen_chars=summary(1), rejected_chars=summary(2)
        )


def _squash(text: str) -> str:
    return "".join(text.split()).casefold()


def _near_identical(a: str, b: str) -> bool:
    """Whether two different texts differ only in whitespace and letter case.

    Cheap for the usual pair: the first non-blank characters, then the first few
    non-blank characters, must agree before the whole texts are squashed and compared.
    """
    if a.lstrip()[:1].casefold() != b.lstrip()[:1].casefold():
        return False
    ha, hb = _squash(a[:_NEAR_WINDOW]), _squash(b[:_NEAR_WINDOW])
    n = min(len(ha), len(hb))
    if ha[:n] != hb[:n]:
        return False
    return _squash(a) == _squash(b)


class _Message(msgspec.Struct, gc=False):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class _Row(msgspec.Struct, gc=False):
    """A canonical row, and the type the fast path decodes lines into.

    Decoding straight into it checks types and roles in C and skips unknown keys without
    building them; encoding it gives the canonical JSON (fields and keys in this order).
    """

    prompt: str | list[_Message]
    chosen: str | list[_Message]
    rejected: str | list[_Message]


_content_of = operator.attrgetter("content")
_role_of = operator.attrgetter("role")


def _passes(row: _Row) -> bool:
    """Whether a row decoded straight into :class:`_Row` passes every check of
    :func:`normalize_row` (if not, the slow path says what is wrong)."""
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


def _near_identical_messages(a: list[_Message], b: list[_Message]) -> bool:
    """Answers with the same roles whose contents differ only in whitespace and case."""
    if len(a) == 1 == len(b):
        return _near_identical(a[0].content, b[0].content)
    return list(map(_role_of, a)) == list(map(_role_of, b)) and _near_identical(
        "\n".join(map(_content_of, a)), "\n".join(map(_content_of, b))
    )


def _chars(msgs: list[_Message]) -> int:
    """Characters of content in a list of messages."""
    return sum(map(len, map(_content_of, msgs)))


def _decode_error(raw: bytes, line: int, exc: Exception) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"line {line} is not valid UTF-8: {e.reason} 0x{raw[e.start]:02x} at byte {e.start}"
    return f"line {line} is not valid JSON: {exc}"


def _skip_rest(readline: Callable[[int], bytes]) -> int:
    """Consume the rest of an overlong line in bounded chunks; return the bytes skipped."""
    skipped = 0
    while chunk := readline(_SKIP_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _warnings(
    duplicate: _Tally, seen: _HashSet, long_row: _Tally, near: _Tally, long_chars: int
) -> list[DatasetWarning]:
    among = f" among the first {seen.capacity} distinct rows" if seen.full else ""
    found = [
        (
            "duplicate",
            duplicate,
            f"{_rows(duplicate.count)} exactly repeating an earlier row{among} "
            "(after normalization)",
        ),
        (
            "long_row",
            long_row,
            f"{_rows(long_row.count)} with more than {long_chars} characters of text (prompt, "
            "chosen and rejected together); training will likely drop or truncate them "
            "(see max_length)",
        ),
        (
            "near_identical",
            near,
            f"{_rows(near.count)} where chosen and rejected differ only in whitespace or "
            "letter case; such pairs teach the model little",
        ),
    ]
    return [
        DatasetWarning(kind=kind, msg=msg, count=tally.count, lines=tally.lines)
        for kind, tally, msg in found
        if tally.count
    ]


def validate_jsonl(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    mapping: FieldMapping | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> IngestResult:
    """Validate JSONL preference rows from ``src`` and write them normalized to ``dst``.

    Reads line by line in bounded memory. On any error the whole file is still scanned
    (up to ``limits.max_rows``) and :class:`InvalidDataset` is raised with the first
    ``limits.max_errors`` errors and their total; what was written to ``dst`` is then
    incomplete and must be discarded.

    Each line first goes through a fast path (decoded straight into the canonical row
    type and checked); a line that does not pass it is decoded again generically and
    handed to :func:`normalize_row`, which accepts the other forms or names the fault.
    """
    if isinstance(src, io.RawIOBase):
        src = io.BufferedReader(src, buffer_size=_SKIP_CHUNK)
    readline: Callable[[int], bytes] = src.readline
    mapped = mapping is not None and mapping != DEFAULT_MAPPING
    fast_decode = None if mapped else msgspec.json.Decoder(_Row).decode
    decode = msgspec.json.decode
    encode = msgspec.json.Encoder().encode
    max_line = limits.max_line_bytes
    read_limit = max_line + 2  # room for "\r\n"
    max_rows = limits.max_rows
    long_chars = limits.long_row_chars

    errors = _Errors(limits.max_errors)
    lengths = _Lengths()
    seen = _HashSet(limits.max_tracked_rows)
    duplicate, long_row, near = _Tally(), _Tally(), _Tally()
    sha = hashlib.sha256()
    out = bytearray()
    written = 0
    source_bytes = 0
    line_no = 0
    nonblank = 0
    rows = 0
    fmt: Format | None = None
    fmt_line = 0
    source_format: SourceFormat = "mapped" if mapped else "standard"
    row: _Row | None

    while raw := readline(read_limit):
        line_no += 1
        source_bytes += len(raw)
        if len(raw) > max_line:
            if len(raw) == read_limit and not raw.endswith(b"\n"):
                source_bytes += _skip_rest(readline)
            if len(raw.rstrip(b"\r\n")) > max_line:
                nonblank += 1
                errors.add(
                    line_no, None, f"line {line_no} is longer than the limit of {max_line} bytes"
                )
                continue
        if line_no == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        if not raw or raw.isspace():
            continue
        nonblank += 1
        if nonblank > max_rows:
            errors.add(line_no, None, f"the dataset has more than {max_rows} rows (the limit)")
            break

        try:
            row = fast_decode(raw) if fast_decode is not None else None
        except (msgspec.MsgspecError, UnicodeDecodeError):
            row = None
        if row is not None and _passes(row):
            row_source: SourceFormat = (
                "standard" if row.prompt.__class__ is str else "conversational"
            )
        else:
            try:
                obj = decode(raw)
            except (msgspec.MsgspecError, UnicodeDecodeError) as e:
                errors.add(line_no, None, _decode_error(raw, line_no, e))
                continue
            try:
                normal, row_source = normalize_row(obj, mapping=mapping)
            except RowInvalid as e:
                errors.add(line_no, e.field, e.msg)
                continue
            row = msgspec.convert(normal, _Row)

        prompt, chosen, rejected = row.prompt, row.chosen, row.rejected
        row_fmt: Format = "standard" if prompt.__class__ is str else "conversational"
        if fmt is None:
            fmt, fmt_line = row_fmt, line_no
            if not mapped:
                source_format = row_source
        elif row_fmt != fmt:
            errors.add(
                line_no,
                None,
                f"line {line_no} is {row_fmt} but the dataset is {fmt} from line {fmt_line}",
            )
            continue
        if errors.total:
            continue  # the dataset is rejected: keep checking, stop producing

        rows += 1
        data = encode(row)
        out += data
        out += b"\n"
        if len(out) >= _FLUSH_BYTES:
            sha.update(out)
            dst.write(out)
            written += len(out)
            out.clear()
        if seen.add(hash(data)):
            duplicate.add(line_no)
        if isinstance(prompt, str):
            assert isinstance(chosen, str) and isinstance(rejected, str)
            p, c, r = len(prompt), len(chosen), len(rejected)
            if _near_identical(chosen, rejected):
                near.add(line_no)
        else:
            assert isinstance(chosen, list) and isinstance(rejected, list)
            p, c, r = _chars(prompt), _chars(chosen), _chars(rejected)
            if _near_identical_messages(chosen, rejected):
                near.add(line_no)
        lengths.add(p, c, r)
        if p + c + r > long_chars:
            long_row.add(line_no)

    if not errors.total and rows == 0:
        errors.add(0, None, "the dataset has no rows")
    if errors.total:
        raise InvalidDataset(errors.items, errors.total)
    sha.update(out)
    dst.write(out)
    written += len(out)
    assert fmt is not None
    return IngestResult(
        rows=rows,
        bytes=written,
        source_bytes=source_bytes,
        sha256=sha.hexdigest(),
        format=fmt,
        source_format=source_format,
        stats=lengths.stats(),
        warnings=_warnings(duplicate, seen, long_row, near, long_chars),
    )
