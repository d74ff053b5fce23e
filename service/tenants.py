"""Tenants: who holds which key, what each may use (grants) and how much (limits).

The tenants file is ``FTUNE_API_KEYS_FILE``. Its old form, ``{"<sha256 of a key>": {"tenant":
..., "admin": false}}``, still works and grants nothing. The new form names each tenant::

    {"tenants": {"search": {
        "keys": [{"sha256": "<64 hex>", "admin": false}],
        "grants": {"hub_tokens": ["search"], "hub_namespaces": ["search-org"],
                   "s3_read": ["s3://search-data/"], "s3_write": ["s3://search-models/"]},
        "limits": {"queued_jobs": 20, "requests_per_second": 5}}}}

Nothing granted means the service's own store only: no Hub token, no Hub namespace, no S3
prefix. The API checks a job at submit and the worker checks it again before it downloads or
uploads anything, so a record edited in Redis cannot borrow what its tenant was not lent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from service.contract import HubDestination, JobTemplate, S3Destination
from service.settings import KEY_HASH, Principal, Settings, SettingsError
from service.store import DatasetQuota

DEFAULT_TOKEN = "HF_TOKEN"  # noqa: S105 - a name, not a secret
"""The name that grants the workers' default Hub token (a spec's `credentials: null`)."""
ANY = "*"
"""A grant entry that allows every value (a single trusted team's deployment)."""

Limit = Annotated[int, msgspec.Meta(ge=1)]


class KeyEntry(msgspec.Struct, forbid_unknown_fields=True):
    sha256: Annotated[str, msgspec.Meta(pattern=f"^{KEY_HASH}$")]
    admin: bool = False


class Grants(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    hub_tokens: tuple[str, ...] = ()
    """Names of the workers' Hub tokens (FTUNE_HF_TOKEN_<NAME>; HF_TOKEN for the default)."""
    hub_namespaces: tuple[str, ...] = ()
    """Hub users or orgs the tenant may publish to."""
    s3_read: tuple[str, ...] = ()
    """`s3://bucket[/prefix]`: where base models and dataset imports may come from."""
    s3_write: tuple[str, ...] = ()
    """`s3://bucket[/prefix]`: where artifacts may be published."""


class LimitOverrides(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tenant's own limits; each one left out takes the service's default (FTUNE_MAX_...)."""

    queued_jobs: Limit | None = None
    running_jobs: Limit | None = None
    datasets: Limit | None = None
    dataset_bytes: Limit | None = None
    feedback_streams: Limit | None = None
    feedback_bytes: Limit | None = None
    policies: Limit | None = None
    jobs_per_policy_tick: Limit | None = None
    event_streams: Limit | None = None
    requests_per_second: Limit | None = None
    share: Annotated[float, msgspec.Meta(gt=0)] | None = None


class TenantEntry(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[KeyEntry] = []
    grants: Grants = Grants()
    limits: LimitOverrides = LimitOverrides()


TENANT_NAME_RE = r"^[^:\s]+$"
TenantName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=TENANT_NAME_RE)]
"""No ':' (it separates the parts of Redis keys: tenants `a` and `a:queued` would share an
index) and no white space."""


class TenantsFile(msgspec.Struct, forbid_unknown_fields=True):
    tenants: dict[TenantName, TenantEntry]


class OldKey(msgspec.Struct, forbid_unknown_fields=True):
    tenant: TenantName
    admin: bool = False


@dataclass(frozen=True)
class Tenants:
    """The tenants file, read once: keys by hash, and each tenant's grants and overrides."""

    keys: Mapping[str, Principal] = field(default_factory=dict)
    grants: Mapping[str, Grants] = field(default_factory=dict)
    overrides: Mapping[str, LimitOverrides] = field(default_factory=dict)

    def grants_of(self, tenant: str) -> Grants:
        return self.grants.get(tenant, Grants())

    def count(self) -> int:
        """How many tenants have a key: the teams that share this deployment now."""
        return len({p.tenant for p in self.keys.values()})

    def has_keys(self, tenant: str) -> bool:
        """Whether the tenant can still call the API: a team removed from the file, or left
        with no key, has none."""
        return any(p.tenant == tenant for p in self.keys.values())


class TenantLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Where a tenant must stop; None: no limit."""

    queued_jobs: int | None
    running_jobs: int | None
    datasets: int | None
    dataset_bytes: int | None
    feedback_streams: int | None
    feedback_bytes: int | None
    policies: int | None
    jobs_per_policy_tick: int | None
    event_streams: int | None
    requests_per_second: int | None
    share: float


def limits_for(settings: Settings, tenants: Tenants, tenant: str) -> TenantLimits:
    """The one place a tenant's limits come from: its overrides, else the service's defaults."""
    own = tenants.overrides.get(tenant, LimitOverrides())
    defaults = TenantLimits(
        queued_jobs=settings.max_queued_jobs,
        running_jobs=settings.max_running_jobs,
        datasets=settings.max_datasets,
        dataset_bytes=settings.max_stored_dataset_bytes,
        feedback_streams=settings.max_feedback_streams,
        feedback_bytes=settings.max_feedback_bytes,
        policies=settings.max_policies,
        jobs_per_policy_tick=settings.max_jobs_per_policy_tick,
        event_streams=settings.max_event_streams,
        requests_per_second=settings.max_requests_per_second,
        share=settings.tenant_share,
    )
    changed = {k: v for k, v in msgspec.structs.asdict(own).items() if v is not None}
    return msgspec.structs.replace(defaults, **changed)


def dataset_quota(limits: TenantLimits) -> DatasetQuota:
    return DatasetQuota(limits.datasets, limits.dataset_bytes)


def load(settings: Settings) -> Tenants:
    """The tenants file named by FTUNE_API_KEYS_FILE, either form. No file: no key, no grant.

    Raises SettingsError naming FTUNE_API_KEYS_FILE when it cannot be read or is malformed.
    """
    path = settings.api_keys_file
    if path is None:
        return Tenants()
    where = f"FTUNE_API_KEYS_FILE ({path})"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SettingsError([f"{where} cannot be read: {exc.strerror or exc}"]) from None
    try:
        if msgspec.json.decode(raw, type=dict[str, msgspec.Raw]).keys() == {"tenants"}:
            return _new_form(msgspec.json.decode(raw, type=TenantsFile), where)
        old = msgspec.json.decode(raw, type=dict[str, OldKey])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SettingsError(
            [
                f'{where} must be {{"tenants": {{name: {{"keys": [...], "grants": {{...}}, '
                f'"limits": {{...}}}}}}}} or map key hashes to {{"tenant": "...", "admin": '
                f"false}}: {exc}"
            ]
        ) from None
    if plain := [k for k in old if not re.fullmatch(KEY_HASH, k)]:
        raise SettingsError(
            [
                f"{where} must hold the sha256 hex of each API key (64 hex digits), never "
                f"the key itself; {len(plain)} of its entries are not one"
            ]
        )
    return Tenants(keys={h.lower(): Principal(k.tenant, k.admin) for h, k in old.items()})


def _new_form(doc: TenantsFile, where: str) -> Tenants:
    keys: dict[str, Principal] = {}
    for name, entry in doc.tenants.items():
        for key in entry.keys:
            digest = key.sha256.lower()
            if digest in keys:
                raise SettingsError([f"{where}: a key hash is listed twice ({digest[:8]}...)"])
            keys[digest] = Principal(name, key.admin)
        for prefix in (*entry.grants.s3_read, *entry.grants.s3_write):
            if prefix != ANY and not _S3_PREFIX.fullmatch(prefix):
                raise SettingsError(
                    [f"{where}: tenant {name}: {prefix!r} is not s3://bucket[/prefix] or '*'"]
                )
    return Tenants(
        keys=keys,
        grants={n: e.grants for n, e in doc.tenants.items()},
        overrides={n: e.limits for n, e in doc.tenants.items()},
    )


# -- grants ------------------------------------------------------------------------------------

_S3_PREFIX = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,62}(/[^\s]*)?")


class GrantMissing(Exception):
    """The tenant was not granted something its request uses: 403, naming the grant; or
    (`status` 422) it names the service's own store, which no grant opens."""

    def __init__(self, grant: str, detail: str, loc: list[str], status: int = 403) -> None:
        super().__init__(detail)
        self.grant, self.detail, self.loc, self.status = grant, detail, loc, status


def inside_store(uri: str, store_url: str) -> bool:
    """Whether an s3:// URI lies in the service's own store (never a source or destination
    a spec may name: it holds every tenant's datasets, checkpoints and artifacts)."""
    store = urlsplit(store_url)
    parts = urlsplit(uri)
    if store.scheme != "s3" or parts.netloc != store.netloc:
        return False
    return _under(parts.path, store.path)


def _under(path: str, prefix: str) -> bool:
    path, prefix = path.strip("/"), prefix.strip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _s3_allowed(uri: str, granted: tuple[str, ...]) -> bool:
    parts = urlsplit(uri)
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        return False  # a key with dot segments may be normalized on the way to S3
    for entry in granted:
        if entry == ANY:
            return True
        grant = urlsplit(entry)
        if grant.netloc == parts.netloc and _under(parts.path, grant.path):
            return True
    return False


def check_s3_read(tenants: Tenants, tenant: str, uri: str, store_url: str, loc: list[str]) -> None:
    """A model or dataset source in S3: granted by s3_read, and never the store itself."""
    if inside_store(uri, store_url):
        raise GrantMissing(
            "s3_read",
            f"{'.'.join(loc[1:])}: {uri} is inside the service's own store, which is never a "
            "source; read from a bucket or prefix of your own",
            loc,
            422,
        )
    if not _s3_allowed(uri, tenants.grants_of(tenant).s3_read):
        raise GrantMissing(
            "s3_read",
            f"{'.'.join(loc[1:])}: tenant {tenant} has no s3_read grant for {uri}; an operator "
            "grants S3 prefixes in the tenants file",
            loc,
        )


def check_job(tenants: Tenants, tenant: str, spec: JobTemplate, store_url: str) -> None:
    """Everything a job (or a policy's template) would read or write outside the store must be
    granted to its tenant; raises GrantMissing for the first thing that is not."""
    grants = tenants.grants_of(tenant)
    if spec.base_model.startswith("s3://"):
        check_s3_read(tenants, tenant, spec.base_model, store_url, ["body", "base_model"])
    adapter = spec.init_from.adapter if spec.init_from is not None else None
    if adapter is not None and adapter.startswith("s3://"):  # an earlier job's: by job_id
        check_s3_read(tenants, tenant, adapter, store_url, ["body", "init_from", "adapter"])
    dest = spec.output.destination
    loc = ["body", "output", "destination"]
    if isinstance(dest, HubDestination):
        token = dest.credentials or DEFAULT_TOKEN
        if ANY not in grants.hub_tokens and token not in grants.hub_tokens:
            raise GrantMissing(
                "hub_tokens",
                f"output.destination.credentials: tenant {tenant} may not use the Hub token "
                f"{token!r}; an operator grants token names in the tenants file (hub_tokens)",
                [*loc, "credentials"],
            )
        namespace = dest.repo_id.split("/", 1)[0]
        if ANY not in grants.hub_namespaces and namespace not in grants.hub_namespaces:
            raise GrantMissing(
                "hub_namespaces",
                f"output.destination.repo_id: tenant {tenant} may not publish to the Hub "
                f"namespace {namespace!r}; an operator grants namespaces in the tenants file "
                "(hub_namespaces)",
                [*loc, "repo_id"],
            )
    elif isinstance(dest, S3Destination) and inside_store(dest.uri, store_url):
        raise GrantMissing(
            "s3_write",
            f"output.destination.uri: {dest.uri} is inside the service's own store; use "
            "destination type store, or a bucket or prefix of your own",
            [*loc, "uri"],
            422,
        )
    elif isinstance(dest, S3Destination) and not _s3_allowed(dest.uri, grants.s3_write):
        raise GrantMissing(
            "s3_write",
            f"output.destination.uri: tenant {tenant} has no s3_write grant for {dest.uri}; an "
            "operator grants S3 prefixes in the tenants file",
            [*loc, "uri"],
        )
