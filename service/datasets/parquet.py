"""A Parquet file's rows as JSON lines, read row group by row group with pyarrow in a child
process: pyarrow (~100 MB once loaded) stays out of the API process, and the lines take the
JSONL path of :mod:`service.datasets.validate`."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from service.datasets.containers import DatasetTooLarge, UnsupportedFile, module_command


@contextlib.contextmanager
def parquet_lines(path: Path, max_bytes: int) -> Iterator[IO[bytes]]:
    """The rows of a Parquet file as JSON lines, one a row, from a child process that reads it
    row group by row group: pyarrow (~100 MB once loaded) stays out of the API process, whose
    memory stays flat, and the lines take the JSONL fast path."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            module_command(__name__, str(path), str(max_bytes)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        assert proc.stdout is not None
        try:
            yield proc.stdout
            if proc.stdout.read(1):
                return  # the reader stopped early (a fatal error): nothing more is wanted
            if proc.wait() != 0:
                log.seek(0)
                last = log.read().decode(errors="replace").strip().rpartition("\n")[2]
                kind, _, msg = last.partition(": ")
                if kind == "DatasetTooLarge":
                    raise DatasetTooLarge(msg)
                if kind == "UnsupportedFile":
                    raise UnsupportedFile(msg)
                raise UnsupportedFile(f"the Parquet file could not be read: {last}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _parquet_to_jsonl(path: Path, max_bytes: int, out: IO[bytes]) -> None:
    import msgspec
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken footer
        raise UnsupportedFile(f"the file starts like Parquet but cannot be read: {e}") from None
    meta = pf.metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if size > max_bytes:
        raise DatasetTooLarge(
            f"the Parquet file holds {size} bytes of data uncompressed; the limit is {max_bytes}"
        )
    encoder = msgspec.json.Encoder(enc_hook=str)
    names = pf.schema_arrow.names
    nested = [i for i, field in enumerate(pf.schema_arrow) if _has_structs(field.type)]
    row = _row_type(names)
    for batch in pf.iter_batches(batch_size=1024):
        columns = [column.to_pylist() for column in _as_text(batch).columns]
        for i in nested:
            if _nulls_inside(batch.column(i)):
                columns[i] = [_without_nulls(value) for value in columns[i]]
        if row is not None:
            rows: list[Any] = list(map(row, *columns))
        else:
            rows = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
        out.write(encoder.encode_lines(rows))


def _row_type(names: list[str]) -> Any:
    """A Struct type whose fields encode under the column names, in order: a batch's rows
    made from its columns (in C) cost a third less than Arrow's ``to_pylist`` dicts. None
    when names repeat (Arrow allows it; the last one wins, as in a dict)."""
    import msgspec

    if len(set(names)) != len(names):
        return None
    fields = [f"f{i}" for i in range(len(names))]
    return msgspec.defstruct("ParquetRow", fields, rename=dict(zip(fields, names, strict=True)))


def _has_structs(type_: Any) -> bool:
    """Whether a column holds objects (structs), at any depth."""
    import pyarrow as pa

    if pa.types.is_struct(type_):
        return True
    if (
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or pa.types.is_fixed_size_list(type_)
    ):
        return _has_structs(type_.value_type)
    if pa.types.is_map(type_):
        return _has_structs(type_.item_type)
    return False


def _nulls_inside(array: Any) -> bool:
    """Whether any object of a column has a null key (most columns of messages have none:
    they are left as they are, at no cost)."""
    import pyarrow as pa

    if isinstance(array, pa.StructArray):
        return any(
            array.field(i).null_count or _nulls_inside(array.field(i))
            for i in range(array.type.num_fields)
        )
    if isinstance(array, pa.ListArray | pa.LargeListArray | pa.FixedSizeListArray):
        return _nulls_inside(array.values)
    if isinstance(array, pa.MapArray):
        return _nulls_inside(array.items)
    return False


def _without_nulls(value: Any) -> Any:
    """Objects without their null keys. Arrow gives every object of a column every key any
    of them has, null where it had none: a call's arguments would gain the other calls'
    arguments (``{"city": "Paris", "zone": null}``), a tool's parameters the other tools',
    which chat templates render; Parquet cannot tell those from a null given on purpose."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _as_text(batch: Any) -> Any:
    """Binary columns as the UTF-8 text they hold (writers that do not mark strings as such
    store them so); their bytes would be encoded as base64 and trained on as such."""
    import pyarrow as pa

    for i, field in enumerate(batch.schema):
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            try:
                text = batch.column(i).cast(pa.large_string())
            except pa.ArrowInvalid:
                raise UnsupportedFile(
                    f"column {field.name!r} is binary and holds bytes that are not UTF-8 text; "
                    "write its text as a string column"
                ) from None
            batch = batch.set_column(i, field.name, text)
    return batch


if __name__ == "__main__":
    try:
        _parquet_to_jsonl(Path(sys.argv[1]), int(sys.argv[2]), sys.stdout.buffer)
    except (DatasetTooLarge, UnsupportedFile) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
