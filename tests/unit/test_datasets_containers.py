"""Files as shipped: what each container becomes, and one clear refusal for what is not rows."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.datasets.containers import DatasetTooLarge, JsonlBlocks, UnsupportedFile
from service.datasets.validate import IngestResult, InvalidDataset, Limits, validate_file

ROWS = [
    {"prompt": f"Question {i} — ¿qué?", "chosen": f"Good {i}", "rejected": f"Bad {i}"}
    for i in range(5)
]
CANONICAL = b"".join(msgspec.json.encode(r) + b"\n" for r in ROWS)


def ingest(path: Path, **kwargs: Any) -> tuple[IngestResult, bytes]:
    out = io.BytesIO()
    return validate_file(path, out, **kwargs), out.getvalue()


def errors(path: Path, **kwargs: Any) -> list[tuple[int, str | None, str]]:
    with pytest.raises(InvalidDataset) as info:
        validate_file(path, io.BytesIO(), **kwargs)
    return [(e.line, e.field, e.msg) for e in info.value.errors]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("name", "data", "container", "compressed"),
    [
        ("a.jsonl", CANONICAL, "jsonl", False),
        ("a.jsonl.gz", gzip.compress(CANONICAL), "jsonl", True),
        ("a.json", json.dumps(ROWS, indent=2, ensure_ascii=False).encode(), "json", False),
        ("b.json", b"\xef\xbb\xbf" + json.dumps(ROWS).encode(), "json", False),
        ("a.json.gz", gzip.compress(json.dumps(ROWS).encode()), "json", True),
        (
            "pretty.jsonl",
            b"".join(json.dumps(r, indent=2).encode() + b"\n" for r in ROWS),
            "json",
            False,
        ),
    ],
    ids=["jsonl", "jsonl.gz", "array", "array-bom", "array.gz", "pretty-objects"],
)
def test_every_container_gives_the_same_rows(
    tmp_path: Path, name: str, data: bytes, container: str, compressed: bool
) -> None:
    result, out = ingest(write(tmp_path, name, data))
    assert out == CANONICAL
    assert (result.container, result.compressed, result.rows) == (container, compressed, 5)
    assert result.source_bytes == len(data)


def test_parquet_row_groups_and_its_refusals(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=2)
    result, out = ingest(path)
    assert (out, result.container, result.rows) == (CANONICAL, "parquet", 5)
    with pytest.raises(DatasetTooLarge, match="uncompressed; the limit is 100"):
        ingest(path, limits=Limits(max_bytes=100))
    broken = write(tmp_path, "broken.parquet", b"PAR1" + b"\x00" * 100)
    with pytest.raises(UnsupportedFile, match="starts like Parquet but cannot be read"):
        ingest(broken)
    with pytest.raises(UnsupportedFile, match="gzip-compressed Parquet"):
        ingest(write(tmp_path, "a.parquet.gz", gzip.compress(path.read_bytes())))


def test_parquet_columns_keep_their_names_whatever_they_are(tmp_path: Path) -> None:
    """A column named as no Python name could be, or twice (Arrow allows it), still names
    its values; of two columns of one name the last is read, as Arrow's own dicts do."""
    path = tmp_path / "names.parquet"
    table = pa.Table.from_pylist(ROWS).append_column("score-chosen", pa.array([1.5] * 5))
    pq.write_table(table.append_column("Unnamed: 0", pa.array(range(5))), path)
    result, out = ingest(path)
    assert out == CANONICAL
    assert {w.msg for w in result.warnings} == {
        "column 'score-chosen' ignored in 5 rows",
        "column 'Unnamed: 0' ignored in 5 rows",
    }
    twice = pa.table(
        [pa.array([r[k] for r in ROWS]) for k in ("prompt", "chosen", "rejected")]
        + [pa.array(["unused"] * 5)],
        names=["prompt", "chosen", "rejected", "chosen"],
    )
    pq.write_table(twice, path)
    result, out = ingest(path)
    assert out == b"".join(msgspec.json.encode({**r, "chosen": "unused"}) + b"\n" for r in ROWS)


def test_parquet_binary_columns_are_read_as_their_text(tmp_path: Path) -> None:
    """Writers that do not mark strings store text as binary: it is its UTF-8 text (it was
    stored as base64, 201 and no warning); bytes that are not UTF-8 are refused, named."""
    path = tmp_path / "binary.parquet"
    columns = {k: pa.array([r[k].encode() for r in ROWS], pa.binary()) for k in ROWS[0]}
    pq.write_table(pa.table(columns), path)
    result, out = ingest(path)
    assert (out, result.rows) == (CANONICAL, 5)
    columns["chosen"] = pa.array([b"caf\xe9"] * 5, pa.binary())
    pq.write_table(pa.table(columns), path)
    with pytest.raises(UnsupportedFile, match="column 'chosen' is binary and holds bytes that"):
        ingest(path)


def test_a_broken_json_array_is_one_error_where_it_breaks(tmp_path: Path) -> None:
    text = json.dumps(ROWS, indent=2)
    path = write(tmp_path, "cut.json", text[: len(text) // 2].encode())
    [(line, field, msg)] = errors(path)
    assert (line, field) == (3, None)
    assert msg.startswith("the JSON array is malformed after row 2")


def test_a_json_array_row_over_the_line_limit_stops_the_read(tmp_path: Path) -> None:
    rows = [ROWS[0], {**ROWS[1], "prompt": "x" * 300_000}, ROWS[2]]
    path = write(tmp_path, "big.json", json.dumps(rows).encode())
    [(line, _, msg)] = errors(path, limits=Limits(max_line_bytes=100_000))
    assert line == 2 and "longer than the limit of" in msg


def test_a_row_over_the_limit_is_refused_in_arrays_and_csv_as_in_jsonl(tmp_path: Path) -> None:
    """A row a little over the limit passed as a JSON array element (the read's guard allows
    the limit plus what it reads ahead) and as a CSV row of fields each under it."""
    limits = Limits(max_line_bytes=64 * 1024)
    rows = [ROWS[0], {**ROWS[1], "prompt": "x" * 100_000}, ROWS[2]]
    array = write(tmp_path, "a.json", json.dumps(rows).encode())
    [(line, _, msg)] = errors(array, limits=limits)
    assert line == 2 and msg.startswith("row 2 is longer than the limit of 65536 bytes")
    cells = ",".join(["y" * 60_000] * 3)
    csv_file = write(tmp_path, "a.csv", f"prompt,chosen,rejected\nq,a,b\n{cells}\n".encode())
    [(line, _, msg)] = errors(csv_file, hint="csv", limits=limits)
    assert line == 2 and msg == "row 2 is longer than the limit of 65536 bytes (180000)"
    result, _ = ingest(
        csv_file, hint="csv", limits=limits, on_invalid="skip", max_invalid_fraction=0.5
    )
    assert result.rows == 1


def test_gzip_is_limited_decompressed_and_must_be_gzip(tmp_path: Path) -> None:
    bomb = write(tmp_path, "bomb.gz", gzip.compress(CANONICAL * 1000))
    with pytest.raises(DatasetTooLarge, match="decompresses to more than the limit of 4096"):
        ingest(bomb, limits=Limits(max_bytes=4096))
    fake = write(tmp_path, "fake.gz", b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(UnsupportedFile, match="looks gzip-compressed but is not"):
        ingest(fake)
    # Cut short or damaged past the first 64 KiB sniffed: one clear refusal, not a crash.
    whole = gzip.compress(CANONICAL * 3000)
    damaged = bytearray(whole)
    damaged[len(whole) // 2] ^= 0xFF
    for name, data in (("cut.jsonl.gz", whole[: len(whole) * 2 // 3]), ("bad.gz", damaged)):
        with pytest.raises(UnsupportedFile, match="the gzip stream breaks off after"):
            ingest(write(tmp_path, name, bytes(data)))


def test_csv_cells_quoted_across_lines_and_ragged_rows(tmp_path: Path) -> None:
    data = (
        b'prompt,chosen,rejected\n"Two\nlines?",Yes.,No.\n'
        b"Plain?,Sure.,Never.,an extra cell\n"
        b",,\n"
        b"Third?,,No.\n"
    )
    path = write(tmp_path, "a.csv", data)
    with pytest.raises(InvalidDataset) as info:
        ingest(path, hint="csv")
    assert [(e.line, e.field, e.msg) for e in info.value.errors] == [
        (4, "chosen", "the text is empty")
    ]
    result, out = ingest(path, hint="csv", on_invalid="skip", max_invalid_fraction=0.5)
    assert [msgspec.json.decode(x) for x in out.splitlines()] == [
        {"prompt": "Two\nlines?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": "Plain?", "chosen": "Sure.", "rejected": "Never."},
    ]
    assert [w.msg for w in result.warnings] == ["column '(column 4)' ignored in 1 row"]


def test_csv_cells_holding_chats_are_read_as_chats_not_stored_as_their_text(
    tmp_path: Path,
) -> None:
    """UltraFeedback-binarized's chosen and rejected are lists of messages: a CSV export with
    them written by json.dumps was stored as the JSON text, with no warning, and the model
    would have trained on it. Written by pandas' to_csv (Python's repr), it is refused saying
    how to export; a cell of JSON that is not a chat (a structured answer) stays text."""
    user = {"role": "user", "content": "Haiku about autumn?"}
    chosen = [user, {"role": "assistant", "content": "Old pond, a frog jumps — «plop»."}]
    rejected = [user, {"role": "assistant", "content": "No."}]
    history = [["Hi", "Hello!"]]

    def export(cell: Any) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["prompt", "chosen", "rejected", "history", "score_chosen"])
        writer.writerow(["Haiku about autumn?", cell(chosen), cell(rejected), cell(history), 8.5])
        answer = '{"season": "autumn"}'
        writer.writerow(["As JSON?", answer, "[1] no", "", 2])
        return out.getvalue().encode()

    result, out = ingest(write(tmp_path, "uf.csv", export(json.dumps)), hint="csv")
    first, second = (msgspec.json.decode(x) for x in out.splitlines())
    assert first["chosen"] == chosen[1:] and first["rejected"] == rejected[1:]
    assert first["prompt"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        user,
    ]
    assert second["chosen"] == [{"role": "assistant", "content": '{"season": "autumn"}'}]
    assert result.rows == 2

    [(line, field, msg)] = errors(write(tmp_path, "pd.csv", export(str)), hint="csv")
    assert (line, field) == (1, "chosen")
    assert msg.startswith("the cell holds a Python list of messages (what pandas' to_csv")


def test_a_pandas_csv_with_its_index_column_is_read_as_csv_unhinted(tmp_path: Path) -> None:
    """`df.to_csv("data.csv.gz")` writes an unnamed index column first; sent as gzip (what the
    CLI sends for .gz) it was read as JSONL, every line 'not valid JSON'."""
    data = b",prompt,chosen,rejected\n0,Hi?,Hello,Go away\n1,Q2,A2,B2\n"
    result, out = ingest(write(tmp_path, "data.csv.gz", gzip.compress(data)))
    assert (result.container, result.rows) == ("csv", 2)
    assert msgspec.json.decode(out.splitlines()[0]) == {
        "prompt": "Hi?",
        "chosen": "Hello",
        "rejected": "Go away",
    }
    [warning] = result.warnings
    assert warning.msg.startswith("column '' ignored in 2 rows (an unnamed column")


@pytest.mark.parametrize("at", [2, 401], ids=["first-block", "later"])
def test_a_csv_byte_that_is_not_utf8_is_an_error_at_its_row(tmp_path: Path, at: int) -> None:
    """As a JSONL line's: at its row, skippable (it was a 400 'the request body is not UTF-8'
    near the start, and later an error at a row the decoder's read-ahead chose, unskippable)."""
    rows = [f"q{i},a{i},b{i}\n".encode() for i in range(1, 501)]
    rows[at - 1] = b"caf\xe9,a,b\n"
    path = write(tmp_path, "a.csv", b"prompt,chosen,rejected\n" + b"".join(rows))
    assert errors(path, hint="csv") == [
        (at, "prompt", "the text is not UTF-8: byte 0xe9 at character 3; save the file as UTF-8")
    ]
    result, out = ingest(path, hint="csv", on_invalid="skip")
    assert result.rows == 499 and b"caf" not in out


@pytest.mark.parametrize(
    ("data", "found"),
    [
        ("\n".join(json.dumps(r) for r in ROWS).encode("utf-16-le"), "UTF-16 text"),
        (b"\xfd7zXZ\x00" + b"\x00" * 40, "xz-compressed"),
        (b"\x28\xb5\x2f\xfd" + b"\x00" * 40, "zstd-compressed"),
        (b"ARROW1\x00\x00", "an Arrow IPC file"),
        (b"SQLite format 3\x00" + b"\x00" * 40, "binary data of an unknown kind"),
        ("prompt;chosen\nbonjour;été\n".encode("cp1252") * 3, "Windows-1252/Latin-1"),
        ("你好嗎？\n".encode("gb18030") * 3, "GBK/GB18030"),  # noqa: RUF001 - the text
    ],
    ids=["utf-16-no-bom", "xz", "zstd", "arrow", "sqlite", "latin-1", "gbk"],
)
def test_what_is_not_rows_is_named_once(tmp_path: Path, data: bytes, found: str) -> None:
    with pytest.raises(UnsupportedFile) as info:
        ingest(write(tmp_path, "data.bin", data))
    assert found in str(info.value)


def test_one_bad_utf8_line_among_good_ones_is_named_at_its_line(tmp_path: Path) -> None:
    data = CANONICAL + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    [(line, field, msg)] = errors(write(tmp_path, "a.jsonl", data))
    assert (line, field) == (6, None)
    assert msg == "line 6 is not valid UTF-8: invalid continuation byte 0xe9 at byte 15"


@pytest.mark.parametrize("block", [4, 7, 64, 1 << 20])
def test_jsonl_blocks_give_every_line_with_its_number_whatever_the_block_size(block: int) -> None:
    """Lines cut by the read size come out whole, an overlong one as None, a CRLF's \\r kept
    and a last line without its newline still given."""
    data = b'{"a": 1}\r\n\n' + b"x" * 40 + b'\n{"b": 2}\n  \n{"c": 3}'
    blocks = JsonlBlocks(io.BytesIO(data), max_line=20, block=block)
    numbered = [(first + i, line) for first, b in blocks for i, line in enumerate(b.lines)]
    assert numbered == [
        (1, b'{"a": 1}\r'),
        (2, b""),
        (3, None),
        (4, b'{"b": 2}'),
        (5, b"  "),
        (6, b'{"c": 3}'),
    ]
    assert blocks.lines == 6 and blocks.consumed == len(data)


@pytest.mark.parametrize("width", [0, 10, 255, 256, 3000])
def test_a_block_counts_its_lines_short_or_long_without_splitting_them(width: int) -> None:
    """Lines are counted apart from being split (the fast path decodes a block whole): the
    numbers stay right for short lines and long ones."""
    data = b"".join(b"x" * (width + i % 7) + b"\n" for i in range(300))
    blocks = JsonlBlocks(io.BytesIO(data + b"last"), max_line=1 << 20)
    counted = [(first, b.count) for first, b in blocks]
    assert sum(n for _, n in counted) == blocks.lines == 301
    assert [first for first, _ in counted] == [
        1 + sum(n for _, n in counted[:i]) for i in range(len(counted))
    ]
    whole = [b for _, b in JsonlBlocks(io.BytesIO(data), max_line=1 << 20)]
    assert [line for b in whole for line in b.lines] == data.split(b"\n")[:-1]


def test_shards_number_lines_on_after_a_last_line_without_its_newline(tmp_path: Path) -> None:
    first, second = tmp_path / "train-0.jsonl", tmp_path / "train-1.jsonl"
    first.write_bytes(CANONICAL.rstrip(b"\n"))  # 5 lines, the last one unterminated
    second.write_bytes(b'{"prompt": "p"}\n')
    with pytest.raises(InvalidDataset) as exc:
        validate_file([first, second], io.BytesIO())
    assert [e.line for e in exc.value.errors] == [6]


def test_parquet_of_function_calls_stores_each_call_as_written(tmp_path: Path) -> None:
    """Arrow gives every object of a column every key any of them has: each call gained the
    other calls' arguments as nulls, each tool the other tools' parameters (and each message
    a null tool_calls), which templates render. The Parquet file now stores what the same
    rows as JSONL store."""

    def row(i: int, arguments: dict[str, str], parameter: str) -> dict[str, Any]:
        call = {"type": "function", "function": {"name": "weather", "arguments": arguments}}
        parameters = {"type": "object", "properties": {parameter: {"type": "string"}}}
        return {
            "input": {
                "messages": [{"role": "user", "content": f"Weather {i}?"}],
                "tools": [
                    {"type": "function", "function": {"name": "w", "parameters": parameters}}
                ],
            },
            "preferred_output": [{"role": "assistant", "tool_calls": [call]}],
            "non_preferred_output": [{"role": "assistant", "content": "Sunny."}],
        }

    rows = [row(0, {"city": "Lima"}, "city"), row(1, {"zone": "UTC"}, "zone")]
    path = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    _, from_parquet = ingest(path)
    jsonl = b"".join(msgspec.json.encode(r) + b"\n" for r in rows)
    _, from_jsonl = ingest(write(tmp_path, "tools.jsonl", jsonl))
    assert from_parquet == from_jsonl
    assert b"null" not in from_parquet
