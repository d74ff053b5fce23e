"""Records as responses show them: a credential in a webhook_url (its userinfo, a token in its
query string) comes out redacted, like in the logs. The record keeps the URL whole, since
deliveries need it; only its owner can read it, but a response is copied into terminals, CI
logs and tickets."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from service.contract import Job, JobTemplate, Policy
from service.logs import redact

T = TypeVar("T", bound=JobTemplate)


def template(spec: T) -> T:
    """``spec`` with its webhook_url redacted (the same object when there is nothing to hide)."""
    url = spec.webhook_url
    if url is None or (clean := redact(url)) == url:
        return spec
    return msgspec.structs.replace(spec, webhook_url=clean)


def job(record: Job) -> Job:
    spec = template(record.spec)
    return record if spec is record.spec else msgspec.structs.replace(record, spec=spec)


def policy(record: Policy) -> Policy:
    shown = template(record.spec.template)
    if shown is record.spec.template:
        return record
    return msgspec.structs.replace(
        record, spec=msgspec.structs.replace(record.spec, template=shown)
    )
