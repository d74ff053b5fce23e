"""Retraining policies: create or replace, read with their run history, list, delete."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, delete, get, put
from litestar.params import Parameter

from service.api import shown
from service.api.errors import FieldError, InvalidRequest
from service.api.jobs import check_template
from service.api.openapi_docs import FORBIDDEN, NOT_FOUND, TOO_MANY, PageSize, responses
from service.api.tenancy import ListCursor, TenantParam, acting_tenant, listed_tenant, owning_tenant
from service.contract import (
    Policy,
    PolicyList,
    PolicySpec,
)
from service.init_from import InitFromError, resolve_init_adapter
from service.retraining import policies
from service.settings import Principal, Settings
from service.store import NotFound, Store
from service.tenants import Tenants, limits_for

PolicyName = Annotated[
    str,
    Parameter(
        pattern=policies.POLICY_NAME,
        description="Letters, digits, '_', '.', '-'; at most 63 characters",
    ),
]


def _check_gate(spec: PolicySpec) -> None:
    """A gate no run can pass is refused when saved: bounds that contradict each other, or a
    metric the template's trainer never reports (TRL's KTO reports no accuracies), which
    rejects every run but the first (nothing to beat). Checked here, not in the Gate type,
    which also reads the policies stored before."""
    gate = spec.gate
    for metric, low in gate.at_least.items():
        high = gate.at_most.get(metric)
        if high is not None and low > high:
            msg = (
                f"{metric} must be at least {low} and at most {high}: no run can pass; swap or "
                "drop a bound"
            )
            raise InvalidRequest(msg, [FieldError(loc=["body", "gate", "at_least"], msg=msg)])
    if spec.template.method != "kto":
        return
    for rule in ("at_least", "at_most", "not_worse_than_promoted"):
        for metric in getattr(gate, rule) or {}:
            if metric.endswith("rewards/accuracies"):
                msg = (
                    f"TRL's KTO reports no {metric}, so every run would be rejected: gate a kto "
                    "policy on eval_loss, eval_rewards/margins or eval_kl"
                )
                raise InvalidRequest(msg, [FieldError(loc=["body", "gate", rule], msg=msg)])


async def _check_template(
    spec: PolicySpec,
    name: str,
    tenant: str,
    store: Store,
    settings: Settings,
    tenants: Tenants,
) -> None:
    """The template must make a valid job, exactly as POST /v1/jobs would judge it (with the
    label each run's job gets), with the grants of the tenant that will own its jobs."""
    template = spec.template
    await check_template(template, tenant, settings, tenants, at=["body", "template"])
    try:
        policies.job_spec(template, "ds_template", template.eval_dataset_id, policy=name)
    except (ValueError, msgspec.ValidationError) as exc:
        msg = str(exc).split(" - at `$")[0]
        raise InvalidRequest(msg, [FieldError(loc=["body", "template"], msg=msg)]) from None
    try:
        await resolve_init_adapter(store, template, tenant)
    except InitFromError as exc:
        loc = ["body", "template", *exc.loc]
        raise InvalidRequest(str(exc), [FieldError(loc=loc, msg=str(exc))]) from None
    if template.eval_dataset_id is not None:
        try:
            await store.get_dataset(template.eval_dataset_id, tenant)
        except NotFound:
            msg = f"dataset {template.eval_dataset_id} does not exist"
            raise InvalidRequest(
                msg, [FieldError(loc=["body", "template", "eval_dataset_id"], msg=msg)]
            ) from None


class PolicyController(Controller):
    """Policies are named per tenant; another tenant's policy answers 404."""

    path = "/v1/policies"
    tags = ["policies"]

    @put(
        operation_id="PutPolicy",
        path="/{name:str}",
        status_code=200,
        summary="Create or replace a retraining policy (its history is kept)",
        responses=responses(FORBIDDEN, TOO_MANY),
    )
    async def put_policy(
        self,
        name: PolicyName,
        data: PolicySpec,
        principal: Principal,
        store: Store,
        settings: Settings,
        tenants: Tenants,
        tenant: TenantParam = None,
    ) -> Policy:
        owner = owning_tenant(principal, tenant, tenants)
        _check_gate(data)
        await _check_template(data, name, owner, store, settings, tenants)
        most = limits_for(settings, tenants, owner).policies
        await policies.put_policy(store, owner, name, data, max_policies=most)
        return shown.policy(await policies.get_policy(store, owner, name, with_status=True))

    @get(
        operation_id="ListPolicies",
        path="/",
        summary="List the caller's policies by name (an admin's: every tenant's)",
        responses=responses(FORBIDDEN),
    )
    async def list_policies(
        self,
        principal: Principal,
        store: Store,
        limit: PageSize = 50,
        cursor: ListCursor = None,
        tenant: TenantParam = None,
    ) -> PolicyList:
        items, next_cursor = await policies.list_policies(
            store, listed_tenant(principal, tenant), limit=limit, cursor=cursor
        )
        return PolicyList(items=[shown.policy(p) for p in items], next_cursor=next_cursor)

    @get(
        operation_id="GetPolicy",
        path="/{name:str}",
        summary="A policy: its spec, promoted model, runs with metrics and gate decisions",
        responses=responses(NOT_FOUND, FORBIDDEN),
    )
    async def get_policy(
        self, name: PolicyName, principal: Principal, store: Store, tenant: TenantParam = None
    ) -> Policy:
        owner = acting_tenant(principal, tenant)
        return shown.policy(await policies.get_policy(store, owner, name, with_status=True))

    @delete(
        operation_id="DeletePolicy",
        path="/{name:str}",
        status_code=204,
        summary="Delete a policy and its history (a run in flight finishes as a plain job)",
        responses=responses(NOT_FOUND, FORBIDDEN),
    )
    async def delete_policy(
        self, name: PolicyName, principal: Principal, store: Store, tenant: TenantParam = None
    ) -> None:
        await policies.delete_policy(store, acting_tenant(principal, tenant), name)
