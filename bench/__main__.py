"""`python -m bench [--quick | --full] [--only NAME ...] [--out FILE]`: every benchmark, one run.

Each benchmark prints its figures beside a baseline measured in the same run on the same
machine, with the ratio. `--quick` (the default, `make bench`) keeps the whole run to about six
minutes on 2 cores; `--full` uses the sizes and counts the README's figures come from.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import api, cost_cutters, distributed, ingest, quality, queue_latency, training, vram
from bench.common import Section, machine

BENCHMARKS: dict[str, Callable[[bool], Section]] = {
    "vram": vram.run,
    "api": api.run,
    "ingest": ingest.run,
    "queue": queue_latency.run,
    "training": training.run,
    "quality": quality.run,
    "cutters": cost_cutters.run,
    "distributed": distributed.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, ~6 min (default)")
    mode.add_argument("--full", action="store_true", help="the README's sizes and counts")
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only these (repeatable)"
    )
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    args = parser.parse_args(argv)
    full = bool(args.full)
    names = args.only or list(BENCHMARKS)

    header = [
        f"## bench --{'full' if full else 'quick'}: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Machine: {machine()}.",
        "",
    ]
    print("\n".join(header), flush=True)
    report = list(header)
    failed = []
    started = time.monotonic()
    for name in names:
        load = os.getloadavg()[0]
        t0 = time.monotonic()
        try:
            section = BENCHMARKS[name](full)
        except Exception:
            failed.append(name)
            text = f"### {name}: FAILED\n\n```\n{traceback.format_exc()}```\n"
        else:
            section.seconds = time.monotonic() - t0
            section.facts.append(f"load average (1 min) when it started: {load:.1f}")
            text = section.markdown()
        print(text, flush=True)
        report.append(text)
    total = f"Total: {time.monotonic() - started:.0f} s."
    print(total)
    report.append(total + "\n")
    if args.out:
        args.out.write_text("\n".join(report))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
