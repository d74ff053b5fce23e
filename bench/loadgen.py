"""`python -m bench.loadgen CONFIG_JSON`: a small HTTP/1.1 load generator, in its own process.

`concurrency` keep-alive connections each send one request, read the whole response, and
send the next, until `requests` have completed or `seconds` have passed (both bounded). Only
loopback addresses are accepted. Raw asyncio streams rather than an HTTP client library, so
the generator costs little beside the server it measures. Prints one JSON line: completed
requests, wall seconds, requests/s, p50/p99 latency in ms, and status counts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from collections import Counter
from typing import Any


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _client(
    host: str,
    port: int,
    request: bytes,
    state: dict[str, Any],
    latencies: list[float],
    statuses: Counter[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while state["left"] > 0 and time.perf_counter() < state["deadline"]:
            state["left"] -= 1
            started = time.perf_counter()
            writer.write(request)
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - started)
            statuses[status] += 1
    finally:
        writer.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def _run(config: dict[str, Any], requests: int, seconds: float) -> dict[str, Any]:
    host, port = config["host"], int(config["port"])
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to load a non-loopback address: {host}")
    body = config.get("body", "").encode()
    head = [
        f"{config['method']} {config['path']} HTTP/1.1",
        f"Host: {host}:{port}",
        *(f"{k}: {v}" for k, v in config.get("headers", {}).items()),
    ]
    if body or config["method"] == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    state = {"left": requests, "deadline": time.perf_counter() + seconds}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    started = time.perf_counter()
    await asyncio.gather(
        *(
            _client(host, port, request, state, latencies, statuses)
            for _ in range(int(config["concurrency"]))
        )
    )
    wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "seconds": wall,
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * _percentile(latencies, 50),
        "p99_ms": 1000 * _percentile(latencies, 99),
        "statuses": {str(k): v for k, v in statuses.items()},
    }


def main() -> None:
    config = json.loads(sys.argv[1])
    warmup = int(config.get("warmup_requests", 0))
    if warmup:
        asyncio.run(_run(config, warmup, float(config["seconds"])))
    result = asyncio.run(_run(config, int(config["requests"]), float(config["seconds"])))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
