"""Prometheus figures, all named `ftune_*`.

Queue depth, jobs by status, the job duration histogram and Redis' memory use are read from
Redis at scrape time, so every API replica reports the same truth (and an alert on Redis
memory needs no exporter beside it). The duration histogram's buckets are
counted in Redis by the workers when a job ends. Request counts and latencies are the API
process's own, per route template (`service/api/request_metrics.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.asyncio import Redis

from service.contract import JobStatus

DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 24 * 3600.0)
_DURATIONS = "ftune:stats:job_duration"


def _bucket_field(upper: float) -> str:
    return "+Inf" if math.isinf(upper) else repr(upper)


async def record_job_duration(redis: Redis, seconds: float) -> None:
    """Count one finished job into the shared histogram (called by the worker)."""
    async with redis.pipeline(transaction=True) as pipe:
        for upper in (*DURATION_BUCKETS, math.inf):
            if seconds <= upper:
                pipe.hincrby(_DURATIONS, _bucket_field(upper), 1)
        pipe.hincrbyfloat(_DURATIONS, "sum", seconds)
        pipe.hincrby(_DURATIONS, "count", 1)
        await pipe.execute()


WEBHOOK_OUTCOMES = "ftune:webhook-outcomes"
"""Webhook delivery attempts by outcome (`delivered`, `retrying`, `given_up`), counted in Redis
so that every API replica reports all of them."""
WEBHOOK_OUTCOME_NAMES = ("delivered", "retrying", "given_up")


class ServiceCollector:
    """Figures read from Redis just before each scrape (`refresh`), served by `collect`."""

    def __init__(self) -> None:
        self.queue_depth = 0
        self.by_status: dict[str, int] = {}
        self.durations: dict[str, float] = {}
        self.redis_memory: dict[str, int] = {}
        self.webhooks: dict[str, int] = {}

    async def refresh(self, redis: Redis, queue_name: str) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zcard(queue_name)
            for status in JobStatus:
                pipe.zcard(f"ftune:jobs:all:{status.value}")
            pipe.hgetall(_DURATIONS)
            pipe.info("memory")
            pipe.hgetall(WEBHOOK_OUTCOMES)
            results = await pipe.execute()
        self.queue_depth = int(results[0])
        self.by_status = {s.value: int(n) for s, n in zip(JobStatus, results[1:-3], strict=True)}
        self.durations = {k.decode(): float(v) for k, v in results[-3].items()}
        self.webhooks = {k.decode(): int(v) for k, v in results[-1].items()}
        memory = results[-2]
        self.redis_memory = {k: int(memory.get(k, 0)) for k in ("used_memory", "maxmemory")}

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ftune_queue_depth",
            "Job attempts on the queue: waiting or being trained",
            value=self.queue_depth,
        )
        jobs = GaugeMetricFamily("ftune_jobs", "Jobs by status", labels=["status"])
        for status, count in self.by_status.items():
            jobs.add_metric([status], count)
        yield jobs
        buckets = [
            (_bucket_field(upper), self.durations.get(_bucket_field(upper), 0.0))
            for upper in (*DURATION_BUCKETS, math.inf)
        ]
        yield GaugeMetricFamily(
            "ftune_redis_memory_used_bytes",
            "Memory Redis uses for records, streams and the queue (INFO used_memory)",
            value=self.redis_memory.get("used_memory", 0),
        )
        yield GaugeMetricFamily(
            "ftune_redis_maxmemory_bytes",
            "Redis' maxmemory: past it writes fail (noeviction); 0 means no limit",
            value=self.redis_memory.get("maxmemory", 0),
        )
        webhooks = CounterMetricFamily(
            "ftune_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered (2xx), retrying (failed, another "
            "attempt due) or given_up (failed, the last attempt)",
            labels=["outcome"],
        )
        for outcome in WEBHOOK_OUTCOME_NAMES:
            webhooks.add_metric([outcome], self.webhooks.get(outcome, 0))
        yield webhooks
        yield HistogramMetricFamily(
            "ftune_job_duration_seconds",
            "Wall time of finished jobs, from start to end",
            buckets=buckets,
            sum_value=self.durations.get("sum", 0.0),
        )


class WorkerMetrics:
    """A worker's own figures, served on its metrics port."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.busy = Gauge("ftune_worker_busy", "1 while training a job", registry=self.registry)
        self.step = Gauge("ftune_worker_step", "Current job's step", registry=self.registry)
        self.steps_per_second = Gauge(
            "ftune_worker_steps_per_second", "Current job's step rate", registry=self.registry
        )
        self.tokens_per_second = Gauge(
            "ftune_worker_tokens_per_second", "Current job's throughput", registry=self.registry
        )
        self.memory_bytes = Gauge(
            "ftune_worker_memory_bytes",
            "Training process memory (GPU peak or CPU RSS)",
            registry=self.registry,
        )
        self.finished = Counter(
            "ftune_worker_jobs_finished",
            "Jobs this worker finished, by outcome",
            ["status"],
            registry=self.registry,
        )

    def idle(self) -> None:
        """No job: the last one's step, rate and memory are not this worker's now (a dashboard
        would show load that is not there)."""
        for gauge in (
            self.busy,
            self.step,
            self.steps_per_second,
            self.tokens_per_second,
            self.memory_bytes,
        ):
            gauge.set(0)

    def observe(self, values: dict[str, float]) -> None:
        if "step_seconds" in values and values["step_seconds"] > 0:
            self.steps_per_second.set(1.0 / values["step_seconds"])
        if "tokens_per_second" in values:
            self.tokens_per_second.set(values["tokens_per_second"])
        if "memory_bytes" in values:
            self.memory_bytes.set(values["memory_bytes"])
