"""A big JSONL file validated in line ranges by several processes gives exactly what one pass
gives: rows, bytes, sha256, stats, warnings with their lines, errors with theirs."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service.datasets import parallel
from service.datasets.validate import DEFAULT_LIMITS, InvalidDataset, validate_file, validate_jsonl


def write(path: Path, rows: list[Any]) -> None:
    path.write_bytes(
        b"".join(r if isinstance(r, bytes) else msgspec.json.encode(r) + b"\n" for r in rows)
    )


def mixed_rows(n: int, seed: int = 3) -> list[Any]:
    """Unique rows, with repeats far apart, near-identical pairs, long rows, an ignored column,
    blank lines and (when asked) a few bad lines."""
    rng = random.Random(seed)
    rows: list[Any] = []
    for i in range(n):
        row: Any = {
            "prompt": f"question {i} " + "x" * rng.randint(0, 300),
            "chosen": f"yes {i}",
            "rejected": f"no {i}",
        }
        if i % 997 == 5:
            row = rows[rng.randrange(len(rows))]  # a repeat, maybe from another range
        elif i % 1009 == 7:
            row = {**row, "rejected": row["chosen"].upper()}
        elif i % 2003 == 11:
            row = {**row, "prompt": "p" * 40_000}
        elif i % 1500 == 3:
            row = {**row, "source": "web"}
        elif i % 3001 == 13:
            row = b"\n"
        rows.append(row)
    return rows


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "MIN_RANGE_BYTES", 64 * 1024)


def one_pass(path: Path, **kwargs: Any) -> tuple[Any, bytes]:
    out = io.BytesIO()
    with path.open("rb") as src:
        return validate_jsonl(src, out, **kwargs), out.getvalue()


def in_ranges(path: Path, on_invalid: Any = "reject") -> tuple[Any, bytes]:
    out = io.BytesIO()
    result = parallel.validate_parallel(
        path,
        out,
        processes=3,
        mapping=None,
        limits=DEFAULT_LIMITS,
        on_invalid=on_invalid,
        max_invalid_fraction=0.01,
    )
    return result, out.getvalue()


def test_ranges_give_what_one_pass_gives(tmp_path: Path, small_ranges: None) -> None:
    path = tmp_path / "big.jsonl"
    write(path, mixed_rows(12_000))
    expected, expected_bytes = one_pass(path)
    result, data = in_ranges(path)
    assert result is not None, "the ranges gave up"
    assert data == expected_bytes
    assert result == expected
    kinds = {w.kind: w.count for w in result.warnings}
    assert kinds.keys() == {"duplicate", "near_identical", "long_row", "ignored_column"}


def test_invalid_rows_are_named_at_their_lines_in_any_range(
    tmp_path: Path, small_ranges: None
) -> None:
    rows = mixed_rows(9_000)
    for at in (10, 4_000, 8_500):
        rows[at] = {"prompt": "p", "chosen": "same", "rejected": "same"}
    path = tmp_path / "bad.jsonl"
    write(path, rows)
    with pytest.raises(InvalidDataset) as one:
        one_pass(path)
    with pytest.raises(InvalidDataset) as ranges:
        in_ranges(path)
    assert [(e.line, e.field, e.msg) for e in ranges.value.errors] == [
        (e.line, e.field, e.msg) for e in one.value.errors
    ]
    assert ranges.value.total == one.value.total == 3

    skipped, data = in_ranges(path, on_invalid="skip")
    assert (skipped, data) == one_pass(path, on_invalid="skip")
    assert [s.line for s in skipped.skipped] == [e.line for e in one.value.errors]


def test_a_conversational_row_in_a_later_range_falls_back_to_one_pass(
    tmp_path: Path, small_ranges: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = mixed_rows(8_000)
    rows[7_000] = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    path = tmp_path / "mixed.jsonl"
    write(path, rows)
    assert in_ranges(path)[0] is None
    # validate_file then validates it in one pass, over what the ranges had written.
    out = io.BytesIO(b"stale bytes from the ranges")
    monkeypatch.setattr(parallel, "MIN_BYTES", 0)
    result = validate_file(path, out, processes=3)
    expected, expected_bytes = one_pass(path)
    assert (result, out.getvalue()) == (expected, expected_bytes)
    assert result.format == "conversational"


def test_row_hashes_spread_over_the_duplicate_tables_slots() -> None:
    """The table takes a row's slot from its hash's low bits: for templated rows ("What is
    a + b?") those must still spread, or counting duplicates degrades to a crawl (adler32
    there put 100,000 such rows in 806 of 65,536 slots, and a 70 MB file took minutes)."""
    rng = random.Random(1)
    rows = []
    for _ in range(100_000):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        row = {"prompt": f"What is {a} + {b}?", "chosen": f"{a + b}.", "rejected": f"{a - b}."}
        rows.append(msgspec.json.encode(row))
    slots = {parallel.stable_hash(row) & 0xFFFF for row in rows}
    assert len(slots) > 45_000  # uniform hashing fills about 51,000
