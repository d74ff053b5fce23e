"""How rows are packed in an uploaded file: told from its first bytes, read as a stream.

JSONL (the default), a JSON array or concatenated JSON objects (streamed with ijson, never
loaded whole), Parquet (read by :mod:`service.datasets.parquet`) and CSV with a header row; any
of them but Parquet may come gzip-compressed, decompressed on the fly with the size limit
applied to the decompressed bytes. Anything else (UTF-16 or Big5 text, a zip, a pickle, xz)
is refused once, saying what was found and how to convert it, rather than line by line.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import msgspec

from service.contract import Container

ACCEPTED_TYPES = (
    "application/x-ndjson",
    "application/jsonl",
    "application/json",
    "application/vnd.apache.parquet",
    "text/csv",
    "application/gzip",
    "application/octet-stream",
    "multipart/form-data",
)
"""Media types an upload may declare (gzip also as ``Content-Encoding``); the bytes decide."""

SNIFF_BYTES = 64 * 1024
_BLOCK = 1 << 20
_BOM = b"\xef\xbb\xbf"
_CSV_NAME = r'(?:"[^"\r\n]{1,64}"|[^",\t;{}\[\]\r\n]{1,64})'
_CSV_HEADER = re.compile(rf"^[\ufeff]?(?:{_CSV_NAME})?(?:[,\t;]{_CSV_NAME})+\r?$")
"""A header row: names (quoted, as R's write.csv and QUOTE_ALL write them, or bare, with any
punctuation but JSON's brackets) and a separator between them; the first may be empty (the
index column pandas' `to_csv` writes)."""


_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


def module_command(module: str, *args: str) -> list[str]:
    """``python -m module args`` in a child interpreter that imports this very copy of the
    code (a checkout on no path, an editable install pointing elsewhere: it does not matter)."""
    boot = (
        f"import runpy, sys; sys.path.insert(0, {_SOURCE_ROOT!r}); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", boot, *args]


class UnsupportedFile(Exception):
    """The file is not in a form rows can be read from (answered with 415)."""


class DatasetTooLarge(Exception):
    """The dataset (decompressed) is over the size limit (answered with 413)."""


@dataclass(frozen=True)
class BadCell:
    """A row that cannot be read (a CSV cell not UTF-8, a row past the size limit): an error
    at its row, as for a JSONL line, so `on_invalid=skip` can leave it out."""

    column: str | None
    msg: str


class FileProblem(Exception):
    """The file broke off in a way no later row can be read from (e.g. a JSON array cut short)."""

    def __init__(self, line: int, msg: str) -> None:
        super().__init__(msg)
        self.line = line
        self.msg = msg


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Opened:
    container: Container
    compressed: bool
    stream: IO[bytes]
    """The (decompressed) bytes from the start (not for Parquet)."""
    path: Path | None
    """The file, for Parquet."""


class _IntoReadable(Protocol):
    def readinto(self, buffer: Any, /) -> int | None: ...


class Counting(io.RawIOBase):
    """A stream's bytes as they are read, counted (what a streamed upload's size is)."""

    def __init__(self, inner: _IntoReadable) -> None:
        self.inner = inner
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.inner.readinto(buffer) or 0
        self.total += n
        return n


class _Counted(Counting):
    """Decompressed bytes, refusing to go past ``limit`` (a gzip bomb gets 413, not an OOM)."""

    def __init__(self, inner: gzip.GzipFile, limit: int) -> None:
        super().__init__(inner)
        self.gzip = inner
        self.limit = limit

    def readinto(self, buffer: Any) -> int:
        try:
            n = super().readinto(buffer)
        except (OSError, EOFError, zlib.error) as e:  # gzip's own errors, past the sniffed head
            raise UnsupportedFile(
                f"the gzip stream breaks off after {self.total:,} decompressed bytes ({e}): "
                "the file was cut short or damaged; compress it again and upload the whole file"
            ) from None
        if self.total > self.limit:
            raise DatasetTooLarge(
                f"the dataset decompresses to more than the limit of {self.limit} bytes"
            )
        return n


def _binary(head: bytes) -> str | None:
    """What a file that is not UTF-8 text is, with how to convert it; None if it is text."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return (
            "a zip archive: unzip it and upload the .jsonl, .json, .parquet or .csv file inside "
            "(one file per dataset)"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return (
            "a Python pickle, which is never unpickled here: convert it to JSONL, e.g. with "
            "pandas: pd.read_pickle(path).to_json('data.jsonl', orient='records', lines=True, "
            "force_ascii=False)"
        )
    for magic, name, tool in (
        (b"\xfd7zXZ\x00", "xz", "xz -d"),
        (b"(\xb5/\xfd", "zstd", "zstd -d"),
        (b"BZh", "bzip2", "bunzip2"),
    ):
        if head.startswith(magic):
            return f"{name}-compressed: decompress it ({tool}) or compress it with gzip instead"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or _utf16(head):
        return (
            "UTF-16 text: convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8 in.jsonl > out.jsonl"
        )
    if head.startswith(b"ARROW1"):
        return "an Arrow IPC file: write it as Parquet or JSONL instead"
    if b"\x00" in head:
        return f"binary data of an unknown kind (it starts with {head[:8]!r})"
    return None


def _utf16(head: bytes) -> bool:
    """UTF-16 without a byte order mark: the high byte of each character is often 0 (JSON's
    punctuation and keys are ASCII), the low byte almost never."""
    half = len(head) // 2
    if half < 8:
        return False
    for high, low in ((head[1::2], head[0::2]), (head[0::2], head[1::2])):
        if high.count(0) > half * 0.3 and low.count(0) < half * 0.05:
            return True
    return False


def _not_utf8(head: bytes) -> str | None:
    """Why the first bytes are not UTF-8 text, and how to convert them (None when they are).

    A file is refused as a whole when most of its first lines are not UTF-8: a stray bad
    byte in an otherwise UTF-8 file is better reported at its line.
    """
    lines = [line for line in head.split(b"\n")[:-1] or [head] if line.strip()]
    bad = [i for i, line in enumerate(lines) if not _utf8(line)]
    if not bad or len(bad) * 2 < len(lines):
        return None
    sample = b"\n".join(lines[:50])
    fits = []
    for encoding, label in (
        ("gb18030", "GBK/GB18030 (Simplified Chinese)"),
        ("big5", "Big5 (Traditional Chinese)"),
        ("shift_jis", "Shift JIS (Japanese)"),
        ("euc_kr", "EUC-KR (Korean)"),
        ("cp1252", "Windows-1252/Latin-1"),
    ):
        try:
            sample.decode(encoding)
        except UnicodeDecodeError:
            continue
        fits.append((encoding.upper(), label))
    if len(fits) > 1:  # Windows-1252 decodes nearly every byte: a CJK reading is likelier
        fits = [fit for fit in fits if fit[0] != "CP1252"]
    if len(fits) == 1:
        guess = (
            f"it reads as {fits[0][1]}: convert it, e.g. iconv -f {fits[0][0]} -t UTF-8 in > out"
        )
    elif fits:
        # Several legacy encodings decode most CJK bytes: naming one would be a guess.
        names = ", ".join(label for _, label in fits[:-1]) + f" or {fits[-1][1]}"
        guess = (
            f"it reads as {names}: find out which (e.g. file -i, or Python's charset_normalizer) "
            f"and convert it, e.g. iconv -f {fits[0][0]} -t UTF-8 in > out"
        )
    else:
        guess = "convert it to UTF-8"
    where = f"line {bad[0] + 1}"
    try:
        lines[bad[0]].decode("utf-8")
    except UnicodeDecodeError as e:
        where += f" has byte 0x{lines[bad[0]][e.start]:02x}"
    return f"text that is not UTF-8 ({where}, which UTF-8 does not allow); {guess}"


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data" and e.end == len(data)
    return True


def _kind_of_text(head: bytes, hint: Container | None) -> Container:
    text = head[3:] if head.startswith(_BOM) else head
    stripped = text.lstrip()
    if hint == "csv":
        return "csv"
    if stripped.startswith(b"["):
        return "json"
    first = stripped.split(b"\n", 1)[0].strip()
    if first == b"{":
        return "json"  # pretty-printed objects, one after another
    if not stripped.startswith(b"{") and _CSV_HEADER.match(first.decode("utf-8", "replace")):
        return "csv"
    return "jsonl"


@contextlib.contextmanager
def open_dataset(path: Path, *, hint: Container | None, max_bytes: int) -> Iterator[Opened]:
    """Tell what a file holds and open it for reading rows; UnsupportedFile if nothing can."""
    with (
        path.open("rb", buffering=0) as file,
        open_stream(file, hint=hint, max_bytes=max_bytes, path=path) as opened,
    ):
        yield opened


@contextlib.contextmanager
def open_stream(
    src: io.RawIOBase, *, hint: Container | None, max_bytes: int, path: Path | None = None
) -> Iterator[Opened]:
    """:func:`open_dataset` for bytes read once from the start (an upload's body as it
    arrives); Parquet, which is read from its end, only from the file at ``path``."""
    with io.BufferedReader(src, _BLOCK) as raw:
        head = raw.read(SNIFF_BYTES)
        if head.startswith(b"PAR1"):
            if path is None:
                raise UnsupportedFile("a Parquet file is read from its end: save it first")
            yield Opened("parquet", False, raw, path)
            return
        stream: IO[bytes] = io.BufferedReader(_Chained(head, raw), buffer_size=_BLOCK)
        compressed = head.startswith(b"\x1f\x8b")
        if compressed:
            counted = _Counted(gzip.GzipFile(fileobj=stream, mode="rb"), max_bytes)
            try:
                head = counted.gzip.read(SNIFF_BYTES)
            except (OSError, EOFError, zlib.error) as e:
                raise UnsupportedFile(f"the file looks gzip-compressed but is not: {e}") from None
            counted.total = len(head)
            stream = io.BufferedReader(_Chained(head, counted), buffer_size=_BLOCK)
            if head.startswith(b"PAR1"):
                raise UnsupportedFile(
                    "a gzip-compressed Parquet file: Parquet compresses its own columns, so "
                    "upload the .parquet file as it is"
                )
        why = _binary(head) or _not_utf8(head)
        if why:
            raise UnsupportedFile(f"the file is {why}")
        yield Opened(_kind_of_text(head, hint), compressed, stream, path)


def _line_ends(data: bytes) -> int:
    """``data.count(b"\\n")``, at a third of its cost for lines of a few hundred bytes and
    more (the common row): ``find`` looks for one byte with memchr, where ``count`` steps
    through the bytes one at a time, which is cheaper only for short lines."""
    n, find = 0, data.find
    at = find(b"\n")
    while at >= 0:
        n += 1
        if n == 64 and at < 64 * 256:
            return n + data.count(b"\n", at + 1)
        at = find(b"\n", at + 1)
    return n


class Lines:
    """A block of JSONL lines: whole lines as read (``data``), split only when a line is
    looked at (the fast path decodes the block in one call, ``msgspec``'s ``decode_lines``),
    or the lines themselves when some are too long to keep."""

    __slots__ = ("_count", "_lines", "data")

    def __init__(self, data: bytes | None, lines: list[bytes | None] | None = None) -> None:
        self.data = data
        """The lines with their endings, none too long; None when given split."""
        self._lines = lines
        self._count: int | None = None

    @property
    def lines(self) -> list[bytes | None]:
        """Each line, its ending cut off (a ``\\r`` before it left on); ``None`` for one too
        long."""
        if self._lines is None:
            assert self.data is not None
            self._lines = self.data.split(b"\n")  # type: ignore[assignment]
            self._lines.pop()  # type: ignore[union-attr]  # after the last line ending
        assert self._lines is not None
        return self._lines

    @property
    def count(self) -> int:
        """How many lines: counted, or those split already."""
        if self._count is None:
            self._count = len(self._lines) if self._lines is not None else _line_ends(self.data)  # type: ignore[arg-type]
        return self._count


class JsonlBlocks:
    """``(first line number, lines)`` a block at a time (:class:`Lines`), in which ``None``
    stands for a line longer than ``max_line`` bytes (its line ending not counted), skipped
    in chunks and never held whole. ``consumed`` counts the bytes read so far.

    A line number is given before the line is counted: read ``lines`` after each block."""

    def __init__(self, src: IO[bytes], max_line: int, block: int = _BLOCK) -> None:
        self.src = src
        self.max_line = max_line
        self.block = block
        self.consumed = 0
        self.lines = 0
        """Lines given so far."""

    def _read(self) -> bytes:
        data = self.src.read(self.block)
        self.consumed += len(data)
        return data

    def _line(self, line: bytes) -> bytes | None:
        return line if len(line.rstrip(b"\r")) <= self.max_line else None

    def __iter__(self) -> Iterator[tuple[int, Lines]]:
        max_line = self.max_line
        self.lines = 0
        pending = chunk = b""  # pending: the start of a line cut at a chunk's end
        while True:
            chunk = chunk or self._read()
            if not chunk:
                if pending:  # a last line without its newline
                    yield self.lines + 1, Lines(None, [self._line(pending)])
                    self.lines += 1
                return
            start = 0
            if pending:
                nl = chunk.find(b"\n")
                if nl < 0:
                    pending, chunk = pending + chunk, b""
                else:
                    yield self.lines + 1, Lines(None, [self._line(pending + chunk[:nl])])
                    self.lines += 1
                    pending, start = b"", nl + 1
            if chunk:
                end = chunk.rfind(b"\n") + 1
                if end > start:
                    yield from self._run(chunk[start:end])
                pending, chunk = chunk[max(end, start) :], b""
            if len(pending) > max_line + 1:
                # An overlong line with no end in sight: drop it up to its newline.
                while (nl := pending.find(b"\n")) < 0 and (pending := self._read()):
                    pass
                pending, chunk = b"", pending[nl + 1 :] if nl >= 0 else b""
                yield self.lines + 1, Lines(None, [None])
                self.lines += 1

    def _run(self, run: bytes) -> Iterator[tuple[int, Lines]]:
        """Whole lines, each checked for its length only if one might be too long."""
        block = Lines(run)
        if len(run) > self.max_line:
            block = Lines(None, [self._line(x) for x in block.lines])  # type: ignore[arg-type]
        yield self.lines + 1, block
        self.lines += block.count


class _Guarded(io.RawIOBase):
    """A stream that refuses to feed one JSON value past ``limit`` bytes (ijson would hold it)."""

    def __init__(self, inner: _Readable, limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.since = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        self.since += len(data)
        if self.since > self.limit:
            raise FileProblem(0, f"a row is longer than the limit of {self.limit} bytes")
        buffer[: len(data)] = data
        return len(data)


def _sized(n: int, row: Any, limit: int) -> Any:
    """The row, or a BadCell if it is longer than a JSONL line may be (written as one)."""
    import msgspec

    size = len(msgspec.json.encode(row))
    if size <= limit:
        return row
    return BadCell(None, f"row {n} is longer than the limit of {limit} bytes ({size} as one line)")


def json_rows(src: IO[bytes], max_row_bytes: int) -> Iterator[tuple[int, Any]]:
    """Rows of a JSON array, or of JSON values one after another, streamed."""
    import ijson

    head = src.read(SNIFF_BYTES)
    body = head[3:] if head.startswith(_BOM) else head
    array = body.lstrip().startswith(b"[")
    guard = _Guarded(_Chained(body, src), max_row_bytes + SNIFF_BYTES)
    items = (
        ijson.items(guard, "item", use_float=True)
        if array
        else ijson.items(guard, "", multiple_values=True, use_float=True)
    )
    n = 0
    try:
        for n, item in enumerate(items, 1):
            # Only a row read across more than the limit less a read-ahead can be too long.
            long = guard.since + SNIFF_BYTES > max_row_bytes
            guard.since = 0
            yield n, _sized(n, item, max_row_bytes) if long else item
    except FileProblem as e:
        raise FileProblem(n + 1, f"row {n + 1}: {e.msg}") from None
    except ijson.JSONError as e:
        what = "JSON array" if array else "JSON"
        raise FileProblem(
            n + 1, f"the {what} is malformed after row {n}: {str(e).splitlines()[0]}"
        ) from None


class _Chained(io.RawIOBase):
    """Bytes already read, then the rest of the stream."""

    def __init__(self, first: bytes, rest: _Readable) -> None:
        self.first = first
        self.rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.first:
            n = min(len(buffer), len(self.first))
            buffer[:n] = self.first[:n]
            self.first = self.first[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def csv_rows(
    src: IO[bytes], max_field_bytes: int
) -> Iterator[tuple[int, dict[str, Any] | BadCell]]:
    """Rows of a CSV file with a header row, as ``{column: text}`` (every column in every
    row, so a ``system`` column makes every row a conversation, empty cells or not). Bytes
    that are not UTF-8 are a :class:`BadCell` at their row (a whole file in a legacy encoding
    is refused before, by its first bytes)."""
    text = io.TextIOWrapper(src, encoding="utf-8-sig", errors="surrogateescape", newline="")
    first = text.readline()
    delimiter = max((",", "\t", ";"), key=first.count)
    if csv.field_size_limit() < max_field_bytes:
        csv.field_size_limit(max_field_bytes)
    reader = csv.reader(_lines(first, text), delimiter=delimiter)
    header = next(reader)
    if any(map(_ESCAPED.search, header)):
        raise FileProblem(1, "the CSV header row is not UTF-8 text: save the file as UTF-8")
    n = 0
    try:
        for n, cells in enumerate(reader, 1):
            if not any(cells):
                continue
            try:  # one encoding a row: its size, and a kept byte that was not UTF-8 fails it
                size = len("".join(cells).encode())
            except UnicodeEncodeError:
                yield n, _undecoded(header, cells)
                continue
            if size > max_field_bytes:
                msg = f"row {n} is longer than the limit of {max_field_bytes} bytes ({size})"
                yield n, BadCell(None, msg)
                continue
            row: dict[str, Any] = dict(zip(header, cells, strict=False))
            if len(cells) > len(header):
                row[f"(column {len(header) + 1})"] = cells[len(header)]
            yield n, _with_chats(row)
    except csv.Error as e:
        raise FileProblem(n + 1, f"row {n + 1} of the CSV file cannot be read: {e}") from None


def _with_chats(row: dict[str, Any]) -> dict[str, Any] | BadCell:
    """A CSV row whose cells hold chats (lists of messages, as `json.dumps` writes them in a
    cell) with those lists read: stored as their text, the model would train on the JSON.
    Python's own writing of a list (`df.to_csv` of message lists) cannot be read as JSON, and
    is refused saying how to export; any other text stays text (a JSON answer is an answer)."""
    for column, cell in row.items():
        if not cell.startswith(("[", " [")):
            continue
        try:
            value = msgspec.json.decode(cell)
        except msgspec.DecodeError:
            if _PYTHON_CHAT.match(cell):
                return BadCell(
                    column,
                    "the cell holds a Python list of messages (what pandas' to_csv writes), "
                    "not JSON: export the rows with to_json(orient='records', lines=True), or "
                    "write the cells with json.dumps",
                )
            continue
        if _chat_like(value) or (column == "history" and _history_like(value)):
            row[column] = value
    return row


def _chat_like(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value)
    )


def _history_like(value: Any) -> bool:
    """LLaMA-Factory's history: [[question, answer], ...]."""
    return isinstance(value, list) and all(
        isinstance(turn, list) and all(isinstance(t, str) for t in turn) for turn in value
    )


_PYTHON_CHAT = re.compile(r"\s*\[\s*\{\s*'(role|content|from|value)'\s*:")
"""The start of a list of message dicts as Python's repr writes it."""
_ESCAPED = re.compile("[\udc80-\udcff]")
"""A byte that was not UTF-8, as the decoder's surrogateescape keeps it."""


def _undecoded(header: list[str], cells: list[str]) -> BadCell:
    i, match = next((i, m) for i, cell in enumerate(cells) if (m := _ESCAPED.search(cell)))
    column = header[i] if i < len(header) else f"(column {i + 1})"
    byte = ord(match.group()) - 0xDC00
    return BadCell(
        column,
        f"the text is not UTF-8: byte 0x{byte:02x} at character {match.start()}; "
        "save the file as UTF-8",
    )


def _lines(first: str, rest: IO[str]) -> Iterator[str]:
    yield first
    yield from rest
