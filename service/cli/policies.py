"""`ftune policies ...`: define retraining policies (a stream, a trigger, a job template, a
gate) and read what they did: the trigger's state, each run with its gate decision and checks,
and the promoted run. The scheduler that fires them runs in the API, not here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from service.cli.app import AsJson, app, check_name, handled, load_object, options
from service.cli.output import (
    fmt_metrics,
    fmt_status,
    fmt_when,
    listing,
    out,
    print_json,
    print_kv,
    print_table,
)
from service.contract import (
    Gate,
    HubDestination,
    Policy,
    PolicyRun,
    PolicySpec,
    S3Destination,
    Trigger,
)

policies_app = typer.Typer(
    help="Retrain on feedback: a trigger, a job template and a promotion gate per policy.",
    no_args_is_help=True,
)
app.add_typer(policies_app, name="policies")

Name = Annotated[str, typer.Argument(metavar="NAME", callback=check_name, show_default=False)]


@policies_app.command("put")
@handled
def policies_put(
    ctx: typer.Context,
    name: Name,
    spec_file: Annotated[
        Path,
        typer.Argument(
            metavar="SPEC.json|yaml",
            exists=True,
            dir_okay=False,
            readable=True,
            help="A PolicySpec: stream, template, trigger, gate, holdout_fraction, enabled.",
        ),
    ],
    as_json: AsJson = False,
) -> None:
    """Create or replace a policy (its runs and promoted model are kept)."""
    spec = load_object(spec_file, "a PolicySpec", yaml_too=True)
    with options(ctx).client() as client:
        policy = client.put_policy(name, spec)
    if as_json:
        print_json(policy)
        return
    out.print(
        f"saved policy [bold]{escape(policy.name)}[/] (revision {policy.revision}) on stream "
        f"{escape(policy.spec.stream)}: fires {trigger_text(policy.spec.trigger)}"
    )


@policies_app.command("list")
@handled
def policies_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 50,
    cursor: Annotated[str | None, typer.Option(help="From a previous page.")] = None,
    as_json: AsJson = False,
) -> None:
    """List policies by name."""
    with options(ctx).client() as client:
        page = client.list_policies(limit, cursor)
    if as_json:
        print_json(page)
        return
    table = listing("NAME", "STREAM", "TRIGGER", "RUNS", "LAST RUN", "PROMOTED", no_wrap=())
    for p in page.items:
        last = p.runs[0] if p.runs else None
        table.add_row(
            escape(p.name) + ("" if p.spec.enabled else " (disabled)"),
            escape(p.spec.stream),
            escape(trigger_text(p.spec.trigger)),
            str(len(p.runs)),
            _run_state(last) if last else "",
            f"run {p.promoted.number}" if p.promoted else "",
        )
    print_table(table)
    if page.next_cursor:
        out.print(f"more: --cursor {page.next_cursor}")


@policies_app.command("show")
@handled
def policies_show(
    ctx: typer.Context,
    name: Name,
    runs: Annotated[int, typer.Option(min=0, max=100, help="Newest runs to show.")] = 5,
    as_json: AsJson = False,
) -> None:
    """Show a policy: trigger state, runs with their gate decisions, the promoted run."""
    with options(ctx).client() as client:
        policy = client.get_policy(name)
    if as_json:
        print_json(policy)
        return
    print_policy(policy, runs)


@policies_app.command("delete")
@handled
def policies_delete(ctx: typer.Context, name: Name) -> None:
    """Delete a policy and its history (a run in flight finishes as a plain job)."""
    with options(ctx).client() as client:
        client.delete_policy(name)
    out.print(f"deleted policy {escape(name)}")


def print_policy(policy: Policy, shown_runs: int) -> None:
    spec = policy.spec
    rows = [
        ("policy", f"{escape(policy.name)} (revision {policy.revision})"),
        ("stream", escape(spec.stream)),
        ("trigger", escape(trigger_text(spec.trigger))),
        ("gate", escape(gate_text(spec.gate))),
        ("held out", escape(_holdout_text(policy))),
        ("trains", escape(f"{spec.template.base_model} ({spec.template.method})")),
        ("publishes to", escape(destination_text(spec))),
    ]
    if not spec.enabled:
        rows.append(("enabled", "no"))
    if policy.status is not None:
        status = f"{escape(policy.status.message)} (checked {fmt_when(policy.status.checked_at)})"
        rows.append(("status", status))
        if policy.status.next_cron_at is not None:
            rows.append(("next schedule", fmt_when(policy.status.next_cron_at)))
    else:
        rows.append(("status", "not checked yet: the scheduler in the API checks every policy"))
    promoted = policy.promoted
    if promoted is None:
        rows.append(("promoted", "none yet"))
    else:
        rows.append(
            (
                "promoted",
                f"run {promoted.number}, job {promoted.job_id}, {fmt_when(promoted.promoted_at)}",
            )
        )
        if promoted.metrics:
            rows.append(("  metrics", fmt_metrics(promoted.metrics, every=True)))
        for art in promoted.artifacts:
            rows.append((f"  {art.kind}", escape(art.uri)))
        for uri in promoted.published:
            rows.append(("  published", escape(uri)))
    print_kv(rows)

    if not policy.runs:
        out.print("no runs yet")
        return
    table = listing("RUN", "FIRED", "STATUS", "JOB", "TRAIN ROWS", "DECISION", "WHY IT FIRED")
    shown = policy.runs[:shown_runs]
    for run in shown:
        table.add_row(
            str(run.number),
            fmt_when(run.fired_at),
            fmt_status(run.status),
            run.job_id,
            str(run.dataset.rows) if run.dataset else "",
            fmt_status(run.decision) if run.decision else "",
            escape(run.reason),
        )
    print_table(table)
    if len(policy.runs) > len(shown):
        out.print(f"{len(policy.runs) - len(shown)} older runs: --runs {len(policy.runs)}")
    for run in shown:
        _print_decision(run)


def _print_decision(run: PolicyRun) -> None:
    if run.decision is None:
        return
    out.print(f"run {run.number} {fmt_status(run.decision)}: {escape(run.decision_reason or '')}")
    for check in run.gate:
        mark = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        out.print(f"  {mark} {escape(check.note)}")
    if run.metrics:
        out.print(f"  metrics: {fmt_metrics(run.metrics, every=True)}")
    for uri in run.published:
        out.print(f"  published: {escape(uri)}")
    if run.publish_error:
        out.print(f"  [red]publishing failed:[/] {escape(run.publish_error)}")


def _run_state(run: PolicyRun) -> str:
    state = f"{run.number}: {fmt_status(run.status)}"
    return state + (f", {fmt_status(run.decision)}" if run.decision else "")


def trigger_text(trigger: Trigger) -> str:
    """The trigger in words, e.g. `at 100 new pairs` or `on '0 3 * * *' (UTC) with new pairs`."""
    if trigger.cron is None:
        text = f"at {trigger.min_new_pairs} new pairs"
    elif trigger.min_new_pairs is None:
        text = f"on '{trigger.cron}' (UTC) with new pairs"
    else:
        text = f"on '{trigger.cron}' (UTC) with at least {trigger.min_new_pairs} new pairs"
    if trigger.min_interval_seconds:
        text += f", at least {trigger.min_interval_seconds:g}s apart"
    return text


def gate_text(gate: Gate) -> str:
    rules = [f"{m} >= {v:g}" for m, v in gate.at_least.items()]
    rules += [f"{m} <= {v:g}" for m, v in gate.at_most.items()]
    tolerance = f" within {gate.tolerance:g}" if gate.tolerance else ""
    rules += [
        f"{m} not worse than the promoted run's ({way} is better){tolerance}"
        for m, way in (gate.not_worse_than_promoted or {}).items()
    ]
    return "; ".join(rules) or "none: every run that succeeds is promoted"


def destination_text(spec: PolicySpec) -> str:
    """Where a promoted run's artifacts end up."""
    destination = spec.template.output.destination
    if isinstance(destination, HubDestination):
        return f"the Hub: {destination.repo_id}"
    if isinstance(destination, S3Destination):
        return destination.uri
    return "the service's store (the run's job artifacts)"


def _holdout_text(policy: Policy) -> str:
    if policy.spec.template.eval_dataset_id is not None:
        return f"the template's eval dataset {policy.spec.template.eval_dataset_id}"
    if policy.holdout is not None:
        h = policy.holdout
        return f"{len(h.indices)} of the first {h.pairs_end} pairs, as {h.dataset.id}"
    return f"{policy.spec.holdout_fraction:.0%} of the pairs at the first run"
