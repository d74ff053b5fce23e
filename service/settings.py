"""Settings shared by the API and the worker, read from the environment once.

No other module reads ``os.environ``: everything configurable is a field here.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec


class ApiKey(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    admin: bool = False


class Principal(msgspec.Struct, frozen=True):
    tenant: str
    admin: bool = False


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis for records, metric streams and the arq queue."""
    store_url: str = "file://.ftune/store"
    """Blob store for datasets, checkpoints and artifacts: file:///path or s3://bucket/prefix."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (empty for AWS); credentials come from boto3's usual sources."""
    api_keys_file: Path | None = None
    """JSON: sha256 hex of an API key -> {"tenant": ..., "admin": false}."""
    max_dataset_bytes: int = 2 * 1024**3
    """Upload size limit; past it the API answers 413."""
    max_line_bytes: int = 4 * 1024**2
    """One JSONL row's size limit."""
    max_dataset_rows: int = 10_000_000
    """Row count limit for one dataset."""
    ingest_processes: int = 1
    """Processes validating one big (64 MiB+) JSONL dataset in line ranges, on API hosts with
    cores to spare; on a busy 2-core machine more than 1 was measured slower."""
    models_dir: Path = Path(".ftune/models")
    """The only local directory base models may be loaded from (file:// references)."""
    work_dir: Path = Path(".ftune/work")
    """Worker scratch space: downloaded datasets, checkpoints, outputs."""
    hf_home: Path | None = None
    """Cache for Hub downloads (HF_HOME)."""
    hf_endpoint: str | None = None
    """Hub endpoint (HF_ENDPOINT), for a private Hub mirror or the tests' local server."""
    hf_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    """HF tokens by name: "" for HF_TOKEN, "<name>" for FTUNE_HF_TOKEN_<NAME>. Never logged."""
    job_timeout_hours: float = 48.0
    """Hard limit of one training job on a worker."""
    max_attempts: int = 3
    """How often a job whose worker was lost is retried before it fails."""
    lease_seconds: float = 30.0
    """A running job whose worker has not renewed its lease for this long is re-queued."""
    scheduler_enabled: bool = True
    """Whether this API process takes part in the scheduler role (one leader at a time)."""
    scheduler_interval_seconds: float = 5.0
    """How often the scheduler (run by the API's leader) reaps lost jobs and steps policies."""
    queue_name: str = "ftune:queue"
    """The arq queue the API enqueues into and the workers read."""
    metrics_maxlen: int = 100_000
    """Metric points kept per job (a capped Redis stream)."""
    device: str = "auto"
    """Worker device: auto, cpu or cuda."""
    worker_grace_seconds: int = 60
    """On SIGTERM, how long the current job may go on before it is re-queued to resume on
    another worker; the Helm chart sets it below terminationGracePeriodSeconds."""
    worker_metrics_port: int = 9100
    """Port of a worker's Prometheus endpoint; 0 turns it off."""
    worker_gpu_memory_gb: float | None = None
    """GPU memory of each worker in GB: the API refuses (422) a job whose estimate
    (service/vram.py) exceeds it. Unset: no check (CPU workers, or not wanted)."""
    log_level: str = "INFO"
    """Root log level for the API, the worker and the training child."""
    log_format: Literal["json", "text"] = "json"
    """json: one object per line (production); text: for a terminal."""
    webhook_allow_private: bool = False
    """Allow webhook receivers on loopback, private or link-local addresses."""
    webhook_secrets_file: Path | None = None
    """JSON: tenant -> webhook signing secret (or a list of secrets while rotating)."""
    webhook_max_attempts: int = 8
    """Delivery attempts per webhook event before it is given up."""
    webhook_backoff_seconds: float = 4.0
    """Delay after the first failed delivery; doubles after each further one (capped at 1 h)."""
    env_secrets: tuple[str, ...] = field(default=(), repr=False)
    """Credential values from the environment (AWS keys, the Redis password): redacted in logs."""

    def secret_values(self) -> list[str]:
        """Every value the logs must never show."""
        return [*self.hf_tokens.values(), *self.env_secrets]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()

        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else None

        tokens = {
            key.removeprefix("FTUNE_HF_TOKEN_").lower(): value
            for key, value in env.items()
            if key.startswith("FTUNE_HF_TOKEN_") and value
        }
        if get("HF_TOKEN"):
            tokens[""] = env["HF_TOKEN"]
        keys_file = get("FTUNE_API_KEYS_FILE")
        hf_home = get("HF_HOME")
        secrets_file = get("FTUNE_WEBHOOK_SECRETS_FILE")
        gpu_gb = get("FTUNE_WORKER_GPU_MEMORY_GB")
        return cls(
            redis_url=get("FTUNE_REDIS_URL") or defaults.redis_url,
            store_url=get("FTUNE_STORE_URL") or "file://" + str(Path(".ftune/store").resolve()),
            s3_endpoint_url=get("FTUNE_S3_ENDPOINT_URL"),
            api_keys_file=Path(keys_file) if keys_file else None,
            max_dataset_bytes=int(get("FTUNE_MAX_DATASET_BYTES") or defaults.max_dataset_bytes),
            max_line_bytes=int(get("FTUNE_MAX_LINE_BYTES") or defaults.max_line_bytes),
            max_dataset_rows=int(get("FTUNE_MAX_DATASET_ROWS") or defaults.max_dataset_rows),
            ingest_processes=int(get("FTUNE_INGEST_PROCESSES") or defaults.ingest_processes),
            models_dir=Path(get("FTUNE_MODELS_DIR") or defaults.models_dir).resolve(),
            work_dir=Path(get("FTUNE_WORK_DIR") or defaults.work_dir).resolve(),
            hf_home=Path(hf_home) if hf_home else None,
            hf_endpoint=get("HF_ENDPOINT"),
            hf_tokens=tokens,
            job_timeout_hours=float(get("FTUNE_JOB_TIMEOUT_HOURS") or defaults.job_timeout_hours),
            max_attempts=int(get("FTUNE_MAX_ATTEMPTS") or defaults.max_attempts),
            lease_seconds=float(get("FTUNE_LEASE_SECONDS") or defaults.lease_seconds),
            scheduler_enabled=(get("FTUNE_SCHEDULER_ENABLED") or "true").lower()
            not in ("0", "false", "no", "off"),
            scheduler_interval_seconds=float(
                get("FTUNE_SCHEDULER_INTERVAL_SECONDS") or defaults.scheduler_interval_seconds
            ),
            queue_name=get("FTUNE_QUEUE_NAME") or defaults.queue_name,
            metrics_maxlen=int(get("FTUNE_METRICS_MAXLEN") or defaults.metrics_maxlen),
            device=get("FTUNE_DEVICE") or defaults.device,
            worker_grace_seconds=int(
                get("FTUNE_WORKER_GRACE_SECONDS") or defaults.worker_grace_seconds
            ),
            worker_metrics_port=int(
                get("FTUNE_WORKER_METRICS_PORT") or defaults.worker_metrics_port
            ),
            worker_gpu_memory_gb=float(gpu_gb) if gpu_gb else None,
            log_level=get("FTUNE_LOG_LEVEL") or defaults.log_level,
            log_format="text" if get("FTUNE_LOG_FORMAT") == "text" else "json",
            webhook_allow_private=(get("FTUNE_WEBHOOK_ALLOW_PRIVATE") or "").lower()
            in ("1", "true", "yes", "on"),
            webhook_secrets_file=Path(secrets_file) if secrets_file else None,
            webhook_max_attempts=int(
                get("FTUNE_WEBHOOK_MAX_ATTEMPTS") or defaults.webhook_max_attempts
            ),
            webhook_backoff_seconds=float(
                get("FTUNE_WEBHOOK_BACKOFF_SECONDS") or defaults.webhook_backoff_seconds
            ),
            env_secrets=tuple(
                v
                for v in (
                    get("AWS_SECRET_ACCESS_KEY"),
                    get("AWS_SESSION_TOKEN"),
                    urllib.parse.urlsplit(get("FTUNE_REDIS_URL") or "").password,
                )
                if v
            ),
        )

    def load_api_keys(self) -> dict[str, Principal]:
        """sha256 hex of a key -> its principal. No file means no key is accepted."""
        if self.api_keys_file is None:
            return {}
        raw = msgspec.json.decode(self.api_keys_file.read_bytes(), type=dict[str, ApiKey])
        return {h.lower(): Principal(k.tenant, k.admin) for h, k in raw.items()}


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write_api_keys(path: Path, keys: Mapping[str, Principal]) -> None:
    """Write a keys file from plaintext keys (used by `ftune dev` and tests)."""
    data = {hash_api_key(k): {"tenant": p.tenant, "admin": p.admin} for k, p in keys.items()}
    path.write_text(json.dumps(data, indent=2))
