"""Ingest: validating and storing a dataset, against `datasets.load_dataset`.

Files of generated standard preference rows (unique, ~1.1 KB each, texts of varied length) are
uploaded over HTTP to the API running under uvicorn in its own process, whose resident memory
(its own and its range-validation children's) is sampled every 10 ms while the upload runs: it
must not grow with the file (a 1 GB upload with API peak RSS under 200 MB, issues 2 and 12),
and whose CPU time (its own and its children's) is taken before and after. The same file is
also validated in-process with `service.datasets.validate.validate_file` (no HTTP, no store),
and loaded and checked by the baseline in a separate process (`bench/datasets_baseline.py`),
whose peak RSS is sampled the same way and which reports its own CPU time (all its threads).
The smaller file is also uploaded gzip-compressed and as Parquet, each beside `load_dataset`
reading the same file.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import msgspec
import psutil

from bench.common import AUTH, PY, Figure, RssSampler, Section, Stack, median, scratch
from service.datasets.parallel import MIN_BYTES
from service.datasets.validate import validate_file

MB = 1_000_000
VOCABULARY = (
    "the a model answer question user data train helpful honest brief clear detailed "
    "summary policy refund order shipping account password error fix step reason example "
    "because however therefore first then finally please thanks sorry great wrong right "
    "customer support product price update version install configure network memory"
)


def generate(path: Path, size: int, seed: int = 0) -> int:
    """Write unique standard rows until `size` bytes; return the row count."""
    rng = random.Random(seed)
    words = VOCABULARY.split()
    sentences = [
        " ".join(rng.choice(words) for _ in range(rng.randint(6, 24))).capitalize() + "."
        for _ in range(4096)
    ]

    def text(n: int) -> str:
        return " ".join(rng.choice(sentences) for _ in range(n))

    encode = msgspec.json.Encoder().encode
    written = rows = 0
    with path.open("wb") as f:
        while written < size:
            chunk = bytearray()
            for _ in range(1000):
                row = {
                    "prompt": f"Request {rows}: {text(rng.randint(1, 5))}",
                    "chosen": text(rng.randint(1, 6)),
                    "rejected": f"{text(rng.randint(1, 6))} ({rows})",
                }
                chunk += encode(row) + b"\n"
                rows += 1
            f.write(chunk)
            written += len(chunk)
    return rows


def _chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while block := f.read(size):
            yield block


class Upload(NamedTuple):
    seconds: float
    rss_before: int
    rss_peak: int
    cpu_seconds: float
    """CPU time of the API process and the children it waited for (user and system)."""


def settle() -> None:
    """Write out what earlier steps left in the page cache (the generated files, the last
    run's draft or Arrow cache) before a timed run, so no run pays for another's writeback:
    the 1 GB upload ran first after 1.2 GB of generated files and took 6.6 s against
    4.1-4.3 s with nothing left to write out."""
    os.sync()


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def upload(stack: Stack, path: Path, ctype: str = "application/x-ndjson") -> Upload:
    """Wall time, API RSS before and at its peak, and API CPU time of one HTTP upload."""
    assert stack.api is not None
    api = psutil.Process(stack.api.pid)
    settle()
    cpu = _cpu(api)
    with (
        httpx.Client(base_url=stack.url, headers=AUTH, timeout=3600) as http,
        RssSampler(stack.api.pid, children=True) as rss,
    ):
        started = time.perf_counter()
        resp = http.post(
            "/v1/datasets",
            params={"name": path.stem},
            content=_chunks(path),
            headers={"Content-Type": ctype, "Content-Length": str(path.stat().st_size)},
        )
        seconds = time.perf_counter() - started
    if resp.status_code != 201:
        raise RuntimeError(f"upload answered {resp.status_code}: {resp.text[:2000]}")
    return Upload(seconds, rss.first, rss.peak, _cpu(api) - cpu)


def validate_only(path: Path, out: Path, processes: int = 1) -> float:
    with out.open("w+b") as dst:
        settle()
        started = time.perf_counter()
        validate_file(path, dst, processes=processes)
        return time.perf_counter() - started


def gzipped(path: Path) -> Path:
    out = path.with_suffix(".jsonl.gz")
    with path.open("rb") as src, gzip.open(out, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out


def as_parquet(path: Path) -> Path:
    """The rows as Parquet in row groups of 10,000, as `datasets` writes them for the Hub."""
    import pyarrow.json
    import pyarrow.parquet as pq

    out = path.with_suffix(".parquet")
    pq.write_table(pyarrow.json.read_json(path), out, row_group_size=10_000)
    return out


def baseline(path: Path, cache: Path) -> tuple[float, int, float]:
    """(seconds, peak RSS, CPU seconds) of datasets.load_dataset + check, in its own process
    (seconds and CPU without the imports), into the fresh cache ``cache`` (removed after: a
    second load from it would only read Arrow's cache)."""
    import json
    import subprocess

    from bench.common import QUIET_ENV, ROOT

    settle()
    proc = subprocess.Popen(
        [PY, "-m", "bench.datasets_baseline", str(path), str(cache)],
        env={**os.environ, **QUIET_ENV},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    with RssSampler(proc.pid, children=True) as rss:
        out, err = proc.communicate(timeout=3600)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"datasets baseline failed: {err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    return float(result["seconds"]), rss.peak, float(result["cpu_seconds"])


ROUNDS = 3
"""Uploads of each JSONL file with --full, each beside a run of the baseline: on a shared VM
one run of either side may take half as long again as the next, so each side's median is
given, and every round's ratio."""


def run(full: bool) -> Section:
    sizes = [100 * MB, 1000 * MB] if full else [10 * MB, 50 * MB]
    rounds = ROUNDS if full else 1
    section = Section(
        "Ingest: validate + normalize + store a dataset",
        f"python -m bench --{'full' if full else 'quick'} --only ingest",
    )
    with scratch("ingest") as root:
        files = []
        for size in sizes:
            path = root / f"rows-{size // MB}MB.jsonl"
            rows = generate(path, size)
            files.append((path, rows))
        small = files[0][0]
        variants = [
            ("gzip", gzipped(small), "application/gzip"),
            ("Parquet", as_parquet(small), "application/vnd.apache.parquet"),
        ]
        # Ours and the baseline in turn, so that a slow minute of the machine slows both.
        tries: dict[Path, list[tuple[Upload, tuple[float, int, float]]]] = {}
        with Stack(root / "stack") as stack:
            for path, _ in files:
                tries[path] = [
                    (upload(stack, path), baseline(path, root / f"hf-cache-{path.stem}"))
                    for _ in range(rounds)
                ]
            uploads = {path: upload(stack, path, ctype) for _, path, ctype in variants}
        for path, rows in files:
            mb = path.stat().st_size / MB
            ours = [up for up, _ in tries[path]]
            bases = [base for _, base in tries[path]]
            seconds, cpu = median([u.seconds for u in ours]), median([u.cpu_seconds for u in ours])
            before, peak = min(u.rss_before for u in ours), max(u.rss_peak for u in ours)
            base_seconds, base_cpu = median([b[0] for b in bases]), median([b[2] for b in bases])
            base_peak = max(b[1] for b in bases)
            uploads[path] = Upload(seconds, before, peak, cpu)
            validate_seconds = validate_only(path, root / "normalized.jsonl")
            ranges = path.stat().st_size >= MIN_BYTES
            ranges_seconds = validate_only(path, root / "normalized.jsonl", 2) if ranges else 0.0
            label = f"{mb:,.0f} MB, {rows:,} rows"
            medians = " (medians of the rounds below)" if rounds > 1 else ""
            section.add(
                Figure(
                    f"throughput, HTTP upload -> stored ({label}){medians}",
                    mb / seconds,
                    mb / base_seconds,
                    "MB/s",
                    "load_dataset('json') + check",
                    better="higher",
                    why="the body is received (uvicorn with httptools and uvloop) and "
                    "validated as it arrives, from 32 MiB in a child process fed through a "
                    "pipe (below that in a thread of the API, taking turns with receiving on "
                    "its GIL), in one pass in Python and msgspec, then stored with an fsync, "
                    "against Arrow's multithreaded C++ reader, on the 2 cores the client "
                    "sends from; validating alone is about the baseline's time (the "
                    "validate_file row)",
                )
            )
            section.add(
                Figure(
                    f"CPU time, HTTP upload -> stored ({label}){medians}",
                    cpu / mb * 1000,
                    base_cpu / mb * 1000,
                    "CPU s/GB",
                    "load_dataset('json') + check, all its threads",
                    why="what the cores spend on a GB on each side, whatever else the machine "
                    "runs: the API process receiving, validating and storing, "
                    "against Arrow's C++ reader and the check; the client's sending is not "
                    "counted, nor the baseline's reading of the file",
                )
            )
            section.add(
                Figure(
                    f"throughput, validate_file alone ({label})",
                    mb / validate_seconds,
                    mb / base_seconds,
                    "MB/s",
                    "load_dataset('json') + check",
                    better="higher",
                    why="as above: per-block validation in Python and msgspec against Arrow's "
                    "multithreaded C++ reader",
                )
            )
            if ranges:
                section.add(
                    Figure(
                        f"throughput, validate_file in 2 line ranges ({label})",
                        mb / ranges_seconds,
                        mb / base_seconds,
                        "MB/s",
                        "load_dataset('json') + check",
                        better="higher",
                        why="FTUNE_INGEST_PROCESSES=2 (a 64 MiB+ file: one range in place, one "
                        "in a child process, merged in order); it pays only with a core to spare",
                    )
                )
            section.add(
                Figure(
                    f"peak RSS while ingesting ({label})",
                    peak / MB,
                    base_peak / MB,
                    "MB",
                    "the load_dataset process",
                    why="the API process carries Litestar, Redis, arq and boto3 (its idle RSS); "
                    "what matters is that it does not grow with the file",
                )
            )
            if rounds > 1:
                section.facts.append(
                    f"{label}, each round's upload and baseline in turn: "
                    + ", ".join(
                        f"{u.seconds:.2f} s / {b[0]:.2f} s ({b[0] / u.seconds:.2f}x)"
                        for u, b in tries[path]
                    )
                )
            section.facts.append(
                f"{label}: API RSS {before / MB:.0f} MB before the "
                f"upload, {peak / MB:.0f} MB at its peak (+{(peak - before) / MB:.0f} MB); upload "
                f"took {seconds:.1f} s"
            )
        mb = small.stat().st_size / MB
        for name, path, _ in variants:
            seconds, before, peak, _ = uploads[path]
            base_seconds, _, _ = baseline(path, root / f"hf-cache-{path.name}")
            section.add(
                Figure(
                    f"throughput, {name} upload -> stored ({mb:,.0f} MB of JSONL as "
                    f"{path.stat().st_size / MB:,.0f} MB {name})",
                    mb / seconds,
                    mb / base_seconds,
                    "MB/s of JSONL",
                    f"load_dataset on the {name} file + check",
                    better="higher",
                    why="one pass in one process (a gzip stream cannot be split; Parquet rows "
                    "become Python objects before they are checked) against Arrow's C++ readers",
                )
            )
            section.facts.append(
                f"{name}: upload took {seconds:.1f} s, API peak RSS {peak / MB:.0f} MB"
            )
        large = files[-1][0]
        growth = (uploads[large][2] - uploads[large][1]) - (uploads[small][2] - uploads[small][1])
        section.facts.append(
            f"API memory against file size: {uploads[small][2] / MB:.0f} MB peak for "
            f"{small.stat().st_size / MB:,.0f} MB, {uploads[large][2] / MB:.0f} MB for "
            f"{large.stat().st_size / MB:,.0f} MB: {growth / MB:+.0f} MB for "
            f"{large.stat().st_size / small.stat().st_size:.0f}x the data. The body is checked "
            "a block at a time as it arrives; what grows is the duplicate-row "
            "table (8-byte hashes, at most 2/3 full: 16 MiB for a million rows, 24 MiB while "
            "it doubles, capped at 64 MiB by Limits.max_tracked_rows)"
            + (
                f"; the 1 GB upload peaked at {uploads[large][2] / MB:.0f} MB, "
                + ("under" if uploads[large][2] < 200 * MB else "OVER")
                + " the 200 MB requirement"
                if full
                else ""
            )
        )
    return section
