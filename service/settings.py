"""Settings shared by the API and the worker, read from the environment once.

No other module reads ``os.environ``: everything configurable is a field here. Bounds live in
the field types, as in the contract, so one check serves both the environment and code that
builds a Settings itself; a bad value fails at start-up, every problem named by its variable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

Count = Annotated[int, msgspec.Meta(ge=1)]
Positive = Annotated[float, msgspec.Meta(gt=0.0)]
RedisUrl = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(redis|rediss|unix)://", description="a redis://, rediss:// or unix:// URL"
    ),
]
StoreUrl = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(file://(localhost)?/[^?#]*|s3://[^/?#\s]+(/[^?#]*)?)$",
        description="file:///absolute/path or s3://bucket[/prefix]",
    ),
]
HttpUrl = Annotated[
    str, msgspec.Meta(pattern=r"^https?://\S+$", description="an http:// or https:// URL")
]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

BOOLEANS = {"true": True, "1": True, "yes": True, "on": True}
BOOLEANS |= {"false": False, "0": False, "no": False, "off": False}
KEY_HASH = r"[0-9a-fA-F]{64}"

ENV_NAMES = {
    "hf_home": "HF_HOME",
    "hf_endpoint": "HF_ENDPOINT",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
}
"""Fields read from a variable other than FTUNE_<FIELD>: the Hub's and MLflow's own."""
NOT_FROM_ENV = {"hf_tokens", "env_secrets"}
"""Fields gathered from several variables in `from_env`."""


class SettingsError(ValueError):
    """Every bad setting at once, one line each naming its variable and what it accepts."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


class Principal(msgspec.Struct, frozen=True):
    tenant: str
    admin: bool = False


@dataclass(frozen=True)
class Settings:
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    """Redis for records, metric streams and the arq queue."""
    # Defaults under the working directory are made absolute when Settings is built.
    store_url: StoreUrl = field(default_factory=lambda: Path(".ftune/store").resolve().as_uri())
    """Blob store for datasets, checkpoints and artifacts: file:///path or s3://bucket/prefix."""
    s3_endpoint_url: HttpUrl | None = None
    """S3-compatible endpoint (empty for AWS); credentials come from boto3's usual sources."""
    api_keys_file: Path | None = None
    """The tenants file (service/tenants.py): each tenant's key hashes, grants and limits; or
    the old form, sha256 hex of an API key -> {"tenant": ..., "admin": false}."""
    max_dataset_bytes: Count = 2 * 1024**3
    """Upload size limit; past it the API answers 413."""
    max_concurrent_uploads: Count = 2
    """Uploads and imports one host spools at once (its processes together); one more is
    refused with 503 and Retry-After. The chart sizes the API's temp space from it and
    max_dataset_bytes."""
    upload_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "ftune-uploads")
    """Where uploads are spooled, one directory each, removed after (or at start-up, when
    the process that made it was killed)."""
    upload_min_bytes_per_second: Positive = 65536.0
    """After upload_grace_seconds, a body that arrives slower than this on average is cut
    off with 408 (a client trickling bytes would hold an upload slot for ever)."""
    upload_grace_seconds: Positive = 30.0
    """How long a body may take before upload_min_bytes_per_second applies."""
    max_line_bytes: Count = 4 * 1024**2
    """One JSONL row's size limit."""
    max_dataset_rows: Count = 10_000_000
    """Row count limit for one dataset."""
    ingest_processes: Count = 1
    """Processes validating one big (64 MiB+) JSONL dataset in line ranges, on API hosts with
    cores to spare; on a busy 2-core machine more than 1 was measured slower."""
    models_dir: Path = field(default_factory=lambda: Path(".ftune/models").resolve())
    """The only local directory base models may be loaded from (file:// references)."""
    work_dir: Path = field(default_factory=lambda: Path(".ftune/work").resolve())
    """Worker scratch space: downloaded datasets, checkpoints, outputs."""
    hf_home: Path | None = None
    """Cache for Hub downloads (HF_HOME)."""
    hf_endpoint: HttpUrl | None = None
    """Hub endpoint (HF_ENDPOINT), for a private Hub mirror or the tests' local server."""
    mlflow_tracking_uri: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    """The MLflow tracking server jobs with integrations.mlflow report to (MLFLOW_TRACKING_URI);
    MLflow reads its credentials (MLFLOW_TRACKING_TOKEN, ...) itself."""
    hf_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    """HF tokens by name: "" for HF_TOKEN, "<name>" for FTUNE_HF_TOKEN_<NAME>. Never logged."""
    job_timeout_hours: Positive = 48.0
    """Hard limit of one attempt of a training job on a worker: past it, the job fails
    (Timeout)."""
    max_attempts: Count = 3
    """How often a job whose worker was lost is retried before it fails."""
    lease_seconds: Positive = 30.0
    """A running job whose worker has not renewed its lease for this long is re-queued."""
    scheduler_enabled: bool = True
    """Whether this API process takes part in the scheduler role (one leader at a time)."""
    scheduler_interval_seconds: Positive = 5.0
    """How often the scheduler (run by the API's leader) reaps lost jobs and steps policies."""
    queue_name: Annotated[str, msgspec.Meta(min_length=1)] = "ftune:queue"
    """The arq queue the API enqueues into and the workers read."""
    metrics_maxlen: Count = 100_000
    """Metric points kept per job (a capped Redis stream; its event stream is capped at twice
    this)."""
    job_retention_days: Positive = 30.0
    """Finished jobs' records, metric and event streams are deleted from Redis this long after
    they finished (the scheduler sweeps them); artifacts and manifests stay in the blob store."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Worker device: auto, cpu or cuda."""
    api_grace_seconds: Annotated[int, msgspec.Meta(ge=0)] = 20
    """On SIGTERM, the API stops taking connections, ends its event streams at once (their
    clients resume on another replica with Last-Event-ID) and gives the other open requests
    this long to end (an upload finishing); then it ends the rest and shuts down cleanly. Keep
    it below the pod's terminationGracePeriodSeconds (30)."""
    worker_grace_seconds: Annotated[int, msgspec.Meta(ge=0)] = 120
    """On SIGTERM, the training process checkpoints at its next step and stops, and the job is
    re-queued to resume there; this bounds the wait (a job past training, evaluating or
    uploading, may finish within it). Past it training is killed and the job resumes from its
    last checkpoint. The Helm chart sets it below terminationGracePeriodSeconds."""
    worker_poll_seconds: Positive = 0.5
    """How often a worker polls the queue: an idle one polls at once when a job is queued (a
    wake-up over pub/sub) and after this at the latest (what a lost wake-up can cost); a busy
    one polls this often for aborts."""
    worker_metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9100
    """Port of a worker's Prometheus endpoint; 0 turns it off."""
    max_queued_jobs: Count | None = 100
    """Queued jobs one tenant may have; a submit past it answers 429."""
    max_running_jobs: Count | None = None
    """Running jobs one tenant may have (its share of the workers). Unset: no limit."""
    max_datasets: Count | None = 1000
    """Datasets one tenant may keep; past it an upload answers 429."""
    max_stored_dataset_bytes: Count | None = 100 * 1024**3
    """Bytes of stored (normalized) datasets one tenant may keep."""
    max_feedback_streams: Count | None = 100
    """Feedback streams one tenant may have."""
    max_feedback_bytes: Count | None = 1024**3
    """About the bytes one tenant's feedback streams may take in Redis (pairs, ratings, event
    ids): Redis is shared and evicts nothing, so one tenant's feedback must not fill it."""
    max_policies: Count | None = 100
    """Retraining policies one tenant may have."""
    max_jobs_per_policy_tick: Count | None = 10
    """Jobs one tenant's policies may start in one scheduler pass; the rest wait a pass."""
    max_event_streams: Count | None = 50
    """Server-Sent Event streams one tenant may hold open at once (those of finished jobs and
    those an admin opens on its jobs count for whoever opened them)."""
    event_stream_seconds: Annotated[int, msgspec.Meta(ge=1)] = 3600
    """A stream ends after this long, with a comment saying so; its client resumes with
    Last-Event-ID (EventSource does by itself). A stream on a job that stays queued for a day
    would otherwise hold its slot and connection that long."""
    max_requests_per_second: Count | None = 100
    """Requests per second per tenant, across all API replicas (429 past it)."""
    tenant_share: Positive = 1.0
    """A tenant's default weight when jobs are dispatched fairly across tenants."""
    redis_max_connections: Count = 32
    """Redis connections one API process opens for requests at most (more wait up to 5 s for
    one); the event streams of the process share one more."""
    worker_gpu_memory_gb: Positive | None = None
    """GPU memory of each worker in GB: the API refuses (422) a job whose estimate
    (service/vram.py) exceeds it. Unset: no check (CPU workers, or not wanted)."""
    worker_gpus: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    """GPUs of each worker (the chart's `worker.gpu.count`): a worker trains each job in this
    many processes, one per GPU (`JobSpec.parallelism`); on a CPU worker, that many gloo
    processes. The API divides the sharded parts of an FSDP job's memory estimate by it."""
    worker_collective_timeout_seconds: Annotated[int, msgspec.Meta(ge=10)] = 600
    """How long a training process waits in a collective (gradient all-reduce) for the others:
    a process that dies or hangs fails the job after this, instead of hanging it. Must exceed
    rank 0's longest pause between steps (uploading a checkpoint)."""
    log_level: LogLevel = "INFO"
    """Root log level for the API, the worker and the training child."""
    log_format: Literal["json", "text"] = "json"
    """json: one object per line (production); text: for a terminal."""
    webhook_allow_private: bool = False
    """Allow webhook receivers on loopback, private or link-local addresses."""
    webhook_secrets_file: Path | None = None
    """JSON: tenant -> Standard Webhooks secret (`whsec_` + base64 of 24-64 random bytes),
    or a list of them while rotating (each one signs every delivery)."""
    webhook_max_attempts: Count = 8
    """Delivery attempts per webhook event before it is given up."""
    webhook_backoff_seconds: Positive = 4.0
    """Delay after the first failed delivery; doubles after each further one (capped at 1 h)."""
    env_secrets: tuple[str, ...] = field(default=(), repr=False)
    """Credential values from the environment (AWS keys, the Redis password, the W&B and MLflow
    tokens): redacted in logs."""

    def __post_init__(self) -> None:
        # Code that builds Settings (tests, the dev stack) gets the same checks as the env.
        problems = [
            _problem(var, value, hint)
            for name, var, hint in _env_fields()
            if not _valid(value := getattr(self, name), hint)
        ]
        if problems:
            raise SettingsError(problems)

    def secret_values(self) -> list[str]:
        """Every value the logs must never show."""
        return [*self.hf_tokens.values(), *self.env_secrets]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from FTUNE_* (and the Hub's) variables; empty means unset (the default).

        Raises SettingsError listing every variable that is not what its field accepts.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, var, hint in _env_fields():
            raw = env.get(var, "").strip()  # a value from a secret often ends in a newline
            if raw == "":
                continue
            try:
                values[name] = _parse(raw, hint)
            except ValueError:
                problems.append(_problem(var, raw, hint))
        try:
            redis_password = urllib.parse.urlsplit(values.get("redis_url", "")).password
        except ValueError:  # e.g. an unclosed '[' of an IPv6 host
            problems.append(_problem("FTUNE_REDIS_URL", values["redis_url"], RedisUrl))
        if problems:
            raise SettingsError(problems)
        values["hf_tokens"] = {
            key.removeprefix("FTUNE_HF_TOKEN_").lower(): value
            for key, value in env.items()
            if key.startswith("FTUNE_HF_TOKEN_") and value
        }
        if env.get("HF_TOKEN"):
            values["hf_tokens"][""] = env["HF_TOKEN"]
        values["env_secrets"] = tuple(
            v
            for v in (
                env.get("AWS_SECRET_ACCESS_KEY"),
                env.get("AWS_SESSION_TOKEN"),
                env.get("WANDB_API_KEY"),
                env.get("MLFLOW_TRACKING_TOKEN"),
                env.get("MLFLOW_TRACKING_PASSWORD"),
                redis_password,
            )
            if v
        )
        return cls(**values)


@cache
def _env_fields() -> tuple[tuple[str, str, Any], ...]:
    """(field, variable, annotated type) of every setting read from one variable."""
    hints = typing.get_type_hints(Settings, include_extras=True)
    return tuple(
        (f.name, ENV_NAMES.get(f.name, f"FTUNE_{f.name.upper()}"), hints[f.name])
        for f in fields(Settings)
        if f.name not in NOT_FROM_ENV
    )


def _parse(raw: str, hint: Any) -> Any:
    """A variable's text as its field's value; ValueError if it is not one."""
    info = _base(msgspec.inspect.type_info(hint))
    value: Any
    if isinstance(info, msgspec.inspect.BoolType):
        value = BOOLEANS.get(raw.lower())
    elif isinstance(info, msgspec.inspect.LiteralType):  # choices ignore case
        value = next((v for v in info.values if str(v).lower() == raw.lower()), None)
    elif isinstance(info, msgspec.inspect.CustomType) and info.cls is Path:
        value = Path(raw).resolve()
    else:
        try:
            value = msgspec.convert(raw, hint, strict=False)
        except msgspec.ValidationError:
            value = None
    if value is None or not _valid(value, hint):
        raise ValueError(raw)
    return value


def _valid(value: Any, hint: Any) -> bool:
    """Whether a field's value is of its type and within its bounds (finite, if a number)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if isinstance(value, Path) or value is None:
        return _accepts(hint, type(value))
    try:
        msgspec.convert(value, hint)
    except msgspec.ValidationError:
        return False
    return True


def _accepts(hint: Any, cls: type) -> bool:
    info = msgspec.inspect.type_info(hint)
    arms = info.types if isinstance(info, msgspec.inspect.UnionType) else (info,)
    if cls is type(None):
        return any(isinstance(a, msgspec.inspect.NoneType) for a in arms)
    return any(isinstance(a, msgspec.inspect.CustomType) and a.cls is Path for a in arms)


def _base(info: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """The type a value must have, without `| None` and without its Meta."""
    if isinstance(info, msgspec.inspect.UnionType):
        info = next(t for t in info.types if not isinstance(t, msgspec.inspect.NoneType))
    return info.type if isinstance(info, msgspec.inspect.Metadata) else info


def _problem(var: str, got: object, hint: Any) -> str:
    return f"{var} must be {_accepted(hint)}, got {str(got)!r}"


def _accepted(hint: Any) -> str:
    """What a field accepts, in words: `an integer ≥ 1`, `one of json, text`, ..."""
    info = msgspec.inspect.type_info(hint)
    if isinstance(info, msgspec.inspect.UnionType):
        info = next(t for t in info.types if not isinstance(t, msgspec.inspect.NoneType))
    if isinstance(info, msgspec.inspect.Metadata) and info.extra_json_schema:
        return str(info.extra_json_schema["description"])
    info = _base(info)
    if isinstance(info, msgspec.inspect.BoolType):
        return "true or false (or 1/0, yes/no, on/off)"
    if isinstance(info, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(str(v) for v in info.values)
    if isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        kind = "an integer" if isinstance(info, msgspec.inspect.IntType) else "a number"
        if info.ge is not None and info.le is not None:
            return f"{kind} from {_num(info.ge)} to {_num(info.le)}"
        bounds = [
            f"{sign} {_num(bound)}"
            for sign, bound in (("≥", info.ge), (">", info.gt), ("≤", info.le), ("<", info.lt))
            if bound is not None
        ]
        return " and ".join([f"{kind} {bounds[0]}", *bounds[1:]]) if bounds else kind
    if isinstance(info, msgspec.inspect.StrType):
        return "a non-empty string"
    return "a path"


def _num(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def write_api_keys(path: Path, keys: Mapping[str, Principal]) -> None:
    """Write a keys file in the old form from plaintext keys (the tests of that form)."""
    data = {hash_api_key(k): {"tenant": p.tenant, "admin": p.admin} for k, p in keys.items()}
    path.write_text(json.dumps(data, indent=2))
