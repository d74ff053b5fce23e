"""Logs for the API, the worker and the training child: one JSON object per line, with the
job they concern, and no secrets in them.

- `configure_logging(level, secrets=...)` puts one handler on the root logger: every logger
  (ours, uvicorn's, arq's, a library's) that propagates to the root comes out as JSON.
- Context: `log_context(job_id=..., tenant=...)` scopes fields to a block (and to the asyncio
  tasks started in it; contextvars keep concurrent requests apart); `update_context(...)` sets
  them for the rest of the current task; `bind(...)` sets process-wide defaults, for a
  process that serves one job, like the training child (spawned: it inherits nothing, so it
  calls `configure_logging` and `bind` itself).
- Redaction happens before formatting, on the message with its arguments, the exception and
  stack text, and string extras: the configured secret values, and anything shaped like a
  credential (`Bearer ...`, `Authorization: ...`, `hf_...` tokens, AWS access key ids,
  `AWS_SECRET_ACCESS_KEY=...`-style assignments, passwords in URLs).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import IO, Any, Literal

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 6
"""Shorter configured values are not redacted verbatim: they would blank ordinary words."""

_CREDENTIAL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization headers and bearer tokens, in any casing.
    (re.compile(r"(?i)\b(authorization\s*[:=]\s*)[^\r\n,;}]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + REDACTED),
    # Hugging Face tokens, AWS access key ids.
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    # Standard Webhooks secrets.
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]{16,}"), REDACTED),
    # NAME=value / "name": "value" where the name says it is a secret. Upper-case names as
    # environment variables spell them; lower-case ones only as whole words (so that
    # `tokens_per_second=...` or `max_new_tokens: 64` are left alone).
    (
        re.compile(
            r"\b([A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIALS?)"
            r"[A-Z0-9_]*[\"']?\s*[=:]\s*[\"']?)[^\s\"',;}&]+"
        ),
        r"\1" + REDACTED,
    ),
    (
        re.compile(
            r"(?i)\b((?:aws_secret_access_key|aws_session_token|secret_access_key|"
            r"session_token|access_token|refresh_token|id_token|hf_token|api_key|apikey|"
            r"client_secret|webhook_secret|password|passwd|secret|token)"
            r"[\"']?\s*[=:]\s*[\"']?)[^\s\"',;}&]+"
        ),
        r"\1" + REDACTED,
    ),
    # user:password@ in URLs (redis://:pw@host, https://user:pw@host), and a userinfo that is
    # a token on its own (https://ghp_abc@host).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^@\s/]+@"), r"\1:" + REDACTED + "@"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@\[]+@"), r"\1" + REDACTED + "@"),
    # Query parameters named like a credential (?api_key=, &access_token=, X-Amz-Signature=).
    (
        re.compile(
            r"(?i)([?&](?:[\w.-]*(?:key|token|secret|passw(?:or)?d|signature|credential|auth)"
            r"[\w.-]*|sig)=)[^&#\s\"']+"
        ),
        r"\1" + REDACTED,
    ),
)


class Redactor:
    """Replaces configured secret values and credential-shaped text with [REDACTED]."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len)
        self._exact = (
            re.compile("|".join(re.escape(v) for v in reversed(values))) if values else None
        )

    def __call__(self, text: str) -> str:
        if self._exact is not None:
            text = self._exact.sub(REDACTED, text)
        for pattern, replacement in _CREDENTIAL_PATTERNS:
            text = pattern.sub(replacement, text)
        return text


_redactor = Redactor()


def redact(text: str) -> str:
    """Redact with the secrets given to `configure_logging` (e.g. for an error message that
    is about to be stored in a job record, or a webhook URL a response shows)."""
    return _redactor(text)


# -- context ------------------------------------------------------------------------------

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "ftune_log_context", default=_EMPTY
)
_bound: Mapping[str, Any] = _EMPTY


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (job_id, tenant, phase, ...) to every record logged inside the block.
    A field set to None is removed for the block."""
    token = _context.set(MappingProxyType({**_context.get(), **fields}))
    try:
        yield
    finally:
        _context.reset(token)


def update_context(**fields: Any) -> None:
    """Set fields for the rest of the current task or thread (e.g. a phase change)."""
    _context.set(MappingProxyType({**_context.get(), **fields}))


def bind(**fields: Any) -> None:
    """Set process-wide fields, under any context (the training child binds its job)."""
    global _bound
    _bound = MappingProxyType({**_bound, **fields})


def current_context() -> dict[str, Any]:
    """The fields a record logged here and now would carry."""
    return {k: v for k, v in {**_bound, **_context.get()}.items() if v is not None}


# -- filter and formatters ----------------------------------------------------------------

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_FIRST = ("ts", "level", "logger", "msg")
_DROPPED = frozenset({"color_message"})
"""Extras that only repeat the message (uvicorn's copy with terminal colours)."""


class ContextFilter(logging.Filter):
    """Stamps the context onto each record, and redacts the record in place, before any
    handler formats it. On a handler, it sees records from every propagating logger."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current_context().items():
            record.__dict__.setdefault(key, value)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg} {record.args}"
        record.msg, record.args = self.redactor(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redactor(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and isinstance(value, str):
                record.__dict__[key] = self.redactor(value)
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v
        for k, v in record.__dict__.items()
        if k not in _STANDARD
        and k not in _FIRST
        and k not in _DROPPED
        and not k.startswith("_")
        and v is not None
    }


def _timestamp(record: logging.LogRecord) -> str:
    at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the context and extra fields, and
    exc (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For a terminal (`ftune dev`): `time level logger msg key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        if not extra:
            return line
        head, sep, tail = line.partition("\n")
        return f"{head} {extra}{sep}{tail}"


def uvicorn_log_config(
    level: str, *, secrets: Iterable[str], fmt: Literal["json", "text"]
) -> dict[str, Any]:
    """uvicorn's ``log_config``: `configure_logging` in each of its processes (it applies
    the config in every worker it spawns), and its loggers, the access log too, sent to
    the root handler, so that the API logs JSON with query strings and URLs redacted."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "ftune": {
                "()": "service.logs._configured",
                "log_level": level,
                "secrets": list(secrets),
                "fmt": fmt,
            }
        },
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def _configured(log_level: str, secrets: list[str], fmt: Literal["json", "text"]) -> Any:
    """The dictConfig factory of `uvicorn_log_config`: configures, then returns a handler
    that does nothing (ours is on the root logger)."""
    configure_logging(log_level, secrets=secrets, fmt=fmt)
    return logging.NullHandler()


def configure_logging(
    level: str = "INFO",
    *,
    secrets: Iterable[str] = (),
    fmt: Literal["json", "text"] = "json",
    stream: IO[str] | None = None,
) -> None:
    """Install the JSON (or text) handler on the root logger, replacing one installed before.

    `secrets`: values to redact wherever they appear (HF tokens, AWS keys, webhook secrets,
    Redis passwords). Python warnings are routed into the log too.
    """
    global _redactor
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    _redactor = Redactor(secrets)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_ftune", False)]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler._ftune = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter(_redactor))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
