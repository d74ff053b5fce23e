"""`python -m bench.arq_noop REDIS_URL QUEUE POLL_DELAY`: a bare arq worker with a no-op task.

The queue-latency baseline: the same arq version, poll delay and job slots as our worker, and
nothing else.
"""

from __future__ import annotations

import sys
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func


async def noop(ctx: dict[str, Any]) -> None:
    return None


def main() -> None:
    redis_url, queue, poll_delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    Worker(
        functions=[func(noop, name="noop")],
        queue_name=queue,
        redis_settings=RedisSettings.from_dsn(redis_url),
        max_jobs=1,
        poll_delay=poll_delay,
        max_tries=1,
    ).run()


if __name__ == "__main__":
    main()
