"""Which adapter a job continues (`spec.init_from`), checked and resolved when it is created.

Shared by `POST /v1/jobs` (a 422 naming the field) and the retraining policies (a run that
cannot start). An earlier job is checked here, where its record is at hand: same tenant,
succeeded, an adapter among its artifacts, the same base model and LoRA settings. An `hf://`
or `s3://` adapter is taken as given (its S3 grant is checked with the rest of the spec's,
`tenants.check_job`): the worker reads its adapter_config.json before training.
"""

from __future__ import annotations

from service.contract import Job, JobStatus, JobTemplate, Lora, Promoted
from service.store import NotFound, Store


class InitFromError(ValueError):
    """`init_from` (or a field it must agree with) cannot be used; `loc` is the field's path."""

    def __init__(self, message: str, loc: tuple[str, ...] = ("init_from", "job_id")) -> None:
        super().__init__(message)
        self.loc = loc


async def resolve_init_adapter(store: Store, spec: JobTemplate, tenant: str) -> str | None:
    """The location of the adapter `spec` continues, or None for a fresh adapter.

    An `s3://` adapter is the tenant's grants' business (`tenants.check_job`: `s3_read`, and
    never inside the service's store, which holds every tenant's jobs).
    """
    init = spec.init_from
    if init is None:
        return None
    if init.adapter is not None:
        return init.adapter
    assert init.job_id is not None  # InitFrom takes exactly one
    try:
        source = await store.get_job(init.job_id, tenant)
    except NotFound:
        raise InitFromError(f"job {init.job_id} does not exist") from None
    return adapter_of(source, spec)


def adapter_of(source: Job, spec: JobTemplate) -> str:
    """The adapter artifact of `source` if `spec` may continue it, else InitFromError."""
    if source.status != JobStatus.succeeded:
        raise InitFromError(
            f"job {source.id} is {source.status.value}: only a succeeded job's adapter can be "
            "continued"
        )
    theirs, ours = source.spec, spec
    if (theirs.base_model, theirs.revision) != (ours.base_model, ours.revision):
        raise InitFromError(
            f"job {source.id} trained an adapter for base_model {_model(theirs)}, this job's is "
            f"{_model(ours)}: an adapter only fits the base model it was trained on"
        )
    adapters = [a.uri for a in source.artifacts if a.kind == "adapter"]
    if not adapters:
        raise InitFromError(
            f"job {source.id} published only a merged model (output.artifacts "
            f"{theirs.output.artifacts!r}), and a merged model cannot be continued as an "
            "adapter: use a job whose output.artifacts was 'adapter' or 'both'"
        )
    if ours.lora not in (Lora(), theirs.lora):
        raise InitFromError(
            f"lora differs from job {source.id}'s, whose adapter keeps its own r, alpha and "
            "target modules: leave lora out",
            loc=("lora",),
        )
    return adapters[0]


def promoted_adapter(promoted: Promoted, spec: JobTemplate) -> str:
    """The adapter of a policy's promoted run, from the policy's own record of it (its job's
    record may be gone past the retention period); ValueError if `spec` cannot continue it."""
    theirs = f"{promoted.base_model}" + (f"@{promoted.revision}" if promoted.revision else "")
    if (promoted.base_model, promoted.revision) != (spec.base_model, spec.revision):
        raise ValueError(
            f"init_from_promoted: promoted run {promoted.number} was trained on {theirs}, the "
            f"template's base_model is {_model(spec)}"
        )
    adapters = [a.uri for a in promoted.artifacts if a.kind == "adapter"]
    if not adapters:
        raise ValueError(f"init_from_promoted: promoted run {promoted.number} published no adapter")
    return adapters[0]


def _model(spec: JobTemplate) -> str:
    return spec.base_model + (f"@{spec.revision}" if spec.revision else "")
