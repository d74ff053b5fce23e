"""Dataset validation at scale and under random input: memory stays flat, big files keep
exact duplicate counts, and the fast path never disagrees with normalize_row."""

from __future__ import annotations

import io
import random
import tracemalloc
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.datasets.collect import Collector
from service.datasets.containers import Lines
from service.datasets.rows import RowInvalid, normalize_row
from service.datasets.validate import InvalidDataset, Limits, validate_jsonl

MiB = 1 << 20


def _write_dataset(path: Path, target_bytes: int, prompt_chars: tuple[int, int]) -> int:
    """Unique standard rows (prompt length uniform in ``prompt_chars``, answers a tenth of
    its upper end) plus, every 1000th line, an exact repeat of the row 500 lines earlier.
    Returns the number of rows."""
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "preference", "model", "answer", "helpful", "kind"]
    base = " ".join(rng.choice(words) for _ in range(2 * prompt_chars[1] // 5 + 1000))
    answer = prompt_chars[1] // 10
    encode = msgspec.json.Encoder().encode
    rows = size = 0
    recent: list[bytes] = []
    with path.open("wb") as f:
        while size < target_bytes:
            if rows % 1000 == 999:
                data = recent[-500]
            else:
                start = rng.randrange(len(base) // 2)
                row = {
                    "prompt": f"{rows}:" + base[start : start + rng.randint(*prompt_chars)],
                    "chosen": base[start + 7 : start + 7 + answer],
                    "rejected": base[start + 11 : start + 11 + answer],
                    "source": "synthetic",
                }
                data = encode(row) + b"\n"
            recent = [*recent[-600:], data]
            f.write(data)
            size += len(data)
            rows += 1
    return rows


def test_a_50_mb_upload_validates_in_flat_memory(tmp_path: Path) -> None:
    """Rows of ~16 KB keep the row count (and tracemalloc's per-allocation cost) low."""
    src_path, dst_path = tmp_path / "big.jsonl", tmp_path / "out.jsonl"
    rows = _write_dataset(src_path, 50 * MiB, (4_000, 20_000))

    tracemalloc.start()
    try:
        with src_path.open("rb") as src, dst_path.open("wb") as dst:
            result = validate_jsonl(src, dst)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert result.rows == rows > 2000
    assert result.source_bytes == src_path.stat().st_size
    assert result.bytes == dst_path.stat().st_size
    repeats = [1000 * k for k in range(1, rows // 1000 + 1)]
    assert [(w.kind, w.count, w.lines[:10]) for w in result.warnings] == [
        ("duplicate", len(repeats), repeats[:10]),
        ("ignored_column", rows, list(range(1, 11))),
    ]


def test_many_rows_keep_exact_duplicate_counts_and_a_sampled_p95(tmp_path: Path) -> None:
    """Over 90k rows: the hash table doubles and the p95 comes from a 4096-row sample."""
    path = tmp_path / "many.jsonl"
    rows = _write_dataset(path, 20 * MiB, (10, 200))
    with path.open("rb") as src:
        result = validate_jsonl(src, io.BytesIO())
    assert result.rows == rows > 90_000
    [warning, ignored] = result.warnings
    assert (ignored.kind, ignored.msg) == (
        "ignored_column",
        f"column 'source' ignored in {rows} rows",
    )
    assert (warning.kind, warning.count) == ("duplicate", rows // 1000)
    assert warning.lines == [1000 * k for k in range(1, 11)]
    prompt = result.stats.prompt_chars
    # "<index>:" (up to 7 characters) + 10..200 characters: the p95 is about 196.
    assert 188 <= prompt["p95"] <= 204
    assert prompt["min"] >= 12
    assert prompt["max"] <= 207


def test_an_overlong_line_is_never_loaded_whole(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    good = b'{"prompt":"p","chosen":"c","rejected":"r"}\n'
    with path.open("wb") as f:
        f.write(good)
        f.write(b'{"prompt":"')
        for _ in range(32):
            f.write(b"x" * MiB)
        f.write(b'","chosen":"c","rejected":"r"}\n')
        f.write(b"not json\n")

    tracemalloc.start()
    try:
        with path.open("rb") as src, pytest.raises(InvalidDataset) as info:
            validate_jsonl(src, io.BytesIO(), limits=Limits(max_line_bytes=MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 5 * MiB, f"peak {peak / MiB:.1f} MiB for a 32 MiB line"
    assert [(e.line, e.msg[:30]) for e in info.value.errors] == [
        (2, "line 2 is longer than the limi"),
        (3, "line 3 is not valid JSON: JSON"),
    ]


# --------------------------------------------------------------------------- properties

texts = st.sampled_from(["", " ", "\n\t", "a", "A ", "b", "Paris"]) | st.text(max_size=8)
roles = st.sampled_from(["system", "user", "assistant", "assistant", "tool", "bot"])
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "text", "image_url"])}, optional={"text": texts}
)
contents = texts | st.lists(parts, max_size=2) | st.none() | st.integers()
messages = st.fixed_dictionaries(
    {}, optional={"role": roles | st.integers(), "content": contents, "name": texts}
)
conversations = st.lists(messages | texts, max_size=4)
values = texts | conversations | st.none() | st.integers()
rows = st.fixed_dictionaries(
    {},
    optional={
        "prompt": values,
        "chosen": values,
        "rejected": values,
        "input": st.fixed_dictionaries({}, optional={"messages": values}) | values,
        "preferred_output": values,
        "non_preferred_output": values,
        "meta": values,
    },
)
nonblank = st.sampled_from(["a", "b", "A", " a", "Paris"]) | st.text(min_size=1, max_size=6)


def _conversation(roles: st.SearchStrategy[str], size: int) -> st.SearchStrategy[list[Any]]:
    message = st.builds(lambda r, c: {"role": r, "content": c}, roles, nonblank)
    return st.lists(message, min_size=1, max_size=size)


# Mostly well-formed conversations with the odd wrong role or blank text, in the explicit
# (TRL) and implicit-prompt forms: where the fast path and the slow path could disagree.
any_role = st.sampled_from(["system", "user", "user", "tool", "assistant"])
answer_role = st.sampled_from(["assistant", "assistant", "assistant", "tool", "user"])
near_conversations = st.fixed_dictionaries(
    {
        "prompt": _conversation(any_role, 3),
        "chosen": _conversation(answer_role, 2),
        "rejected": _conversation(answer_role, 2),
    }
)
near_implicit = st.builds(
    lambda shared, a, b: {"chosen": shared + a, "rejected": shared + b},
    _conversation(any_role, 3),
    _conversation(answer_role, 2),
    _conversation(answer_role, 2),
)


def _expected(obj: Any) -> tuple[str, Any]:
    try:
        row, _ = normalize_row(obj)
    except RowInvalid as e:
        return "error", (1, e.field, e.msg)
    return "row", msgspec.json.encode(row) + b"\n"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows | near_conversations | near_implicit)
def test_validation_agrees_with_normalize_row(obj: dict[str, Any]) -> None:
    """The fast path (typed decoding) must accept and write exactly what normalize_row does,
    and reject with its field and message otherwise."""
    kind, expected = _expected(obj)
    dst = io.BytesIO()
    try:
        validate_jsonl(io.BytesIO(msgspec.json.encode(obj) + b"\n"), dst)
    except InvalidDataset as e:
        assert kind == "error"
        assert [(x.line, x.field, x.msg) for x in e.errors] == [expected]
    else:
        assert kind == "row"
        assert dst.getvalue() == expected


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1).filter(lambda t: not t.isspace()),
            st.text(min_size=1).filter(lambda t: not t.isspace()),
            st.text(min_size=1).filter(lambda t: not t.isspace()),
        ).filter(lambda t: t[1] != t[2]),
        min_size=1,
        max_size=20,
    )
)
def test_any_text_round_trips(triples: list[tuple[str, str, str]]) -> None:
    data = b"".join(
        msgspec.json.encode({"prompt": p, "chosen": c, "rejected": r}) + b"\n"
        for p, c, r in triples
    )
    dst = io.BytesIO()
    result = validate_jsonl(io.BytesIO(data), dst)
    back = [msgspec.json.decode(x) for x in dst.getvalue().split(b"\n")[:-1]]
    assert [(b["prompt"], b["chosen"], b["rejected"]) for b in back] == triples
    assert result.stats.prompt_chars["max"] == max(len(p) for p, _, _ in triples)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40) | st.just(b'{"prompt":"p","chosen":"c","rejected":"r"}')))
def test_arbitrary_bytes_never_crash(chunks: list[bytes]) -> None:
    data = b"\n".join(chunks)
    try:
        result = validate_jsonl(io.BytesIO(data), io.BytesIO(), limits=Limits(max_line_bytes=64))
    except InvalidDataset as e:
        assert e.total >= len(e.errors) >= 1
        assert all(0 <= x.line <= data.count(b"\n") + 1 for x in e.errors)
    else:
        assert result.rows >= 1


TRICKY_LINES = [
    b'{"prompt":"a","chosen":"b","rejected":"c"}\r\n',
    b"\n",
    b"   \n",
    b'{"prompt":"a","chosen":"b","rejected":"c"} {"prompt":"x","chosen":"y","rejected":"z"}\n',
    b'{"prompt":"a","chosen":"b",\n',
    b'"rejected":"c"}\n',
    b'{"prompt":"p","chosen":"same","rejected":"same"}\n',
    b'{"prompt":"p","chosen":"c","rejected":"r","extra":1}\n',
    b"\xef\xbb\xbf" + b'{"prompt":"p","chosen":"c","rejected":"r"}\n',
    b' {"prompt":"lead","chosen":"c","rejected":"r"}\n',
    b'{"prompt":"trail","chosen":"c","rejected":"r"} \n',
    b'{"prompt":"  ","chosen":"c","rejected":"r"}\n',
    b'{"prompt":[{"role":"user","content":"q"}],"chosen":"c","rejected":"r"}\n',
]


@pytest.mark.parametrize("skip", [False, True])
def test_lines_read_a_block_at_a_time_are_judged_like_lines_read_one_by_one(
    skip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first block is read line by line; later ones in one go when they can be. The same
    tricky lines placed after 1.5 MiB of good rows get the same verdicts as at the start."""
    good = [
        msgspec.json.encode({"prompt": f"q{i}", "chosen": "x" * 300, "rejected": f"n{i}"}) + b"\n"
        for i in range(5000)
    ]
    assert sum(map(len, good)) > 1.5 * MiB
    kwargs: dict[str, Any] = {"on_invalid": "skip", "max_invalid_fraction": 1.0} if skip else {}
    taken = []
    whole_block = Collector._block

    def spy(self: Collector, first: int, block: Lines) -> bool:
        taken.append(whole_block(self, first, block))
        return taken[-1]

    monkeypatch.setattr(Collector, "_block", spy)

    def run(lines: list[bytes]) -> tuple[list[tuple[int, str | None, str]], list[bytes]]:
        out = io.BytesIO()
        try:
            result = validate_jsonl(io.BytesIO(b"".join(lines)), out, **kwargs)
        except InvalidDataset as e:
            return [(x.line, x.field, x.msg) for x in e.errors], []
        return [(x.line, x.field, x.msg) for x in result.skipped], out.getvalue().splitlines()

    first_errors, first_rows = run(TRICKY_LINES + good)
    later_errors, later_rows = run(good + TRICKY_LINES)
    assert set(taken) == {True, False}  # both ways were taken
    shift = len(good)
    assert first_errors == [
        (line - shift, field, msg.replace(f"line {line}", f"line {line - shift}"))
        for line, field, msg in later_errors
    ]
    assert [line for line, _, _ in first_errors] == [4, 5, 6, 7, 9, 12, 13]
    assert sorted(first_rows) == sorted(later_rows)
