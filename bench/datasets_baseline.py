"""`python -m bench.datasets_baseline FILE CACHE_DIR`: the ingest baseline.

Loads a JSONL (or .jsonl.gz, or Parquet) preference file with Hugging Face
`datasets.load_dataset("json")` (or `"parquet"`) (Arrow, into a
fresh cache) and checks it the way a careful script would: every row has non-empty string
prompt, chosen and rejected, and chosen differs from rejected. Prints one JSON line with the
seconds spent (imports excluded), the CPU seconds of all its threads meanwhile, and the rows
found bad.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def _bad(batch: dict[str, list[Any]]) -> list[bool]:
    return [
        not (
            isinstance(p, str)
            and p
            and isinstance(c, str)
            and c
            and isinstance(r, str)
            and r
            and c != r
        )
        for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"], strict=True)
    ]


def main() -> None:
    path, cache_dir = sys.argv[1], sys.argv[2]
    import datasets

    datasets.disable_progress_bars()
    started, cpu = time.perf_counter(), time.process_time()
    builder = "parquet" if path.endswith(".parquet") else "json"
    ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
    loaded = time.perf_counter()
    bad = ds.filter(_bad, batched=True, batch_size=10_000)
    checked = time.perf_counter()
    print(
        json.dumps(
            {
                "rows": len(ds),
                "bad_rows": len(bad),
                "load_seconds": loaded - started,
                "check_seconds": checked - loaded,
                "seconds": checked - started,
                "cpu_seconds": time.process_time() - cpu,
            }
        )
    )


if __name__ == "__main__":
    main()
