"""What validation counts while rows stream by, in memory that does not grow with the file:
duplicates (64-bit hashes in a flat table with a ceiling), text lengths (exact min, mean,
max; p95 from a fixed-size sample) and the warnings they turn into.

Each counter also takes a whole block of rows at once (``*_many``), so the common case spends
its time in C (``min``, ``sum``, ``map``) rather than in one Python call per row.
"""

from __future__ import annotations

import math
import operator
import random
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from service.contract import DatasetStats, DatasetWarning
from service.datasets.layouts import PROMPT_LIKE

WARNING_LINES = 10
"""How many line numbers a warning lists."""

_RESERVOIR_SIZE = 4096
_NEAR_WINDOW = 48


class Tally:
    """One warning kind: how many rows, and the first few line numbers."""

    def __init__(self) -> None:
        self.count = 0
        self.lines: list[int] = []

    def add(self, line: int) -> None:
        self.count += 1
        if len(self.lines) < WARNING_LINES:
            self.lines.append(line)

    def add_many(self, lines: Sequence[int]) -> None:
        self.merge(len(lines), lines)

    def merge(self, count: int, lines: Sequence[int]) -> None:
        """``count`` more rows, the first of them at ``lines`` (later than any here)."""
        self.count += count
        if len(self.lines) < WARNING_LINES:
            self.lines.extend(lines[: WARNING_LINES - len(self.lines)])


class HashSet:
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
        return bool(self.add_many((h,)))

    def add_many(self, hashes: Iterable[int]) -> list[int]:
        """Insert each hash in turn; the positions of those already there."""
        seen = []
        slots, mask = self.slots, self.mask
        for pos, h in enumerate(hashes):
            h = (h & 0xFFFF_FFFF_FFFF_FFFF) or 1
            i = h & mask
            while v := slots[i]:
                if v == h:
                    seen.append(pos)
                    break
                i = (i + 1) & mask
            else:
                if self.size >= self.capacity:
                    self.full = True
                    continue
                slots[i] = h
                self.size += 1
                if self.size > self.limit:
                    self._grow()
                    slots, mask = self.slots, self.mask
        return seen

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


class Lengths:
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
        self.add_many([p], [c], [r])

    def add_many(self, ps: Sequence[int], cs: Sequence[int], rs: Sequence[int]) -> None:
        """Rows in order: the same sample as adding them one by one."""
        n = len(ps)
        if not n:
            return
        for i, values in enumerate((ps, cs, rs)):
            self.sums[i] += sum(values)
            self.lo[i] = min(self.lo[i], min(values))
            self.hi[i] = max(self.hi[i], max(values))
        before = self.n
        self.n += n
        j = 0
        while j < n and before + j < self.k:
            self.sample.append((ps[j], cs[j], rs[j]))
            j += 1
            if before + j == self.k:
                self._next = self.k
                self._skip()
        while self._next and self._next <= self.n:
            j = self._next - before - 1
            self.sample[self._rng.randrange(self.k)] = (ps[j], cs[j], rs[j])
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


def near_identical(a: str, b: str) -> bool:
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


_content_of = operator.attrgetter("content")
_role_of = operator.attrgetter("role")
_calls_of = operator.attrgetter("tool_calls")


def near_identical_messages(a: list[Any], b: list[Any]) -> bool:
    """Answers with the same roles and function calls whose contents differ only in
    whitespace and case."""
    if len(a) == 1 == len(b):
        same = near_identical(a[0].content, b[0].content)
    else:
        same = list(map(_role_of, a)) == list(map(_role_of, b)) and near_identical(
            "\n".join(map(_content_of, a)), "\n".join(map(_content_of, b))
        )
    return same and list(map(_calls_of, a)) == list(map(_calls_of, b))


def chars(msgs: list[Any]) -> int:
    """Characters of content in a list of messages, a function call's as its JSON."""
    n = sum(map(len, map(_content_of, msgs)))
    if any(map(_calls_of, msgs)):
        n += sum(len(msgspec.json.encode(m.tool_calls)) for m in msgs if m.tool_calls)
    return n


def rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def row_warnings(
    duplicate: Tally, seen: HashSet, long_row: Tally, near: Tally, long_chars: int
) -> list[DatasetWarning]:
    among = f" among the first {seen.capacity} distinct rows" if seen.full else ""
    found = [
        (
            "duplicate",
            duplicate,
            f"{rows(duplicate.count)} exactly repeating an earlier row{among} "
            "(after normalization)",
        ),
        (
            "long_row",
            long_row,
            f"{rows(long_row.count)} with more than {long_chars} characters of text (prompt, "
            "chosen and rejected together); training will likely drop or truncate them "
            "(see max_length)",
        ),
        (
            "near_identical",
            near,
            f"{rows(near.count)} where chosen and rejected differ only in whitespace or "
            "letter case; such pairs teach the model little",
        ),
    ]
    return [
        DatasetWarning(kind=kind, msg=msg, count=tally.count, lines=tally.lines)
        for kind, tally, msg in found
        if tally.count
    ]


def column_warnings(ignored: dict[str, Tally], *, mapped: bool) -> list[DatasetWarning]:
    """One warning per column that held something no row used (never silence)."""
    found = []
    for name, tally in ignored.items():
        if "[]." in name:  # a message's field (messages.noting_dropped), not a column
            kind = "ignored_message_field"
            msg = (
                f"message field {name!r} ignored in {rows(tally.count)}: a message keeps its "
                "role, content and function calls"
            )
        elif mapped and name in PROMPT_LIKE:
            kind = "unused_prompt_column"
            msg = (
                f"column {name!r} holds text in {rows(tally.count)} but the mapping does "
                "not use it: map it (system_field, history_field or prompt_field) or drop it"
            )
        else:
            kind = "ignored_column"
            msg = f"column {name!r} ignored in {rows(tally.count)}"
            if not name:
                msg += " (an unnamed column: a CSV's row index, as pandas writes it)"
            if name in PROMPT_LIKE:
                msg += (
                    ": its text is in no prompt (map the columns to use it: prompt_field, "
                    "system_field, history_field)"
                )
        found.append(DatasetWarning(kind=kind, msg=msg, count=tally.count, lines=tally.lines))
    return found
