"""The `ftune` CLI against the real API over HTTP (uvicorn on a loopback port, real Redis).

No worker runs here: jobs stay queued unless a test moves them through the same Store the
worker uses, which is how `jobs watch` is shown following a job to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import json
import os
import runpy
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from service.blobs import open_store
from service.cli import app, watch_job
from service.cli.app import Options
from service.cli.demo import DATASET_FILE, heldout_prompts, length_measure
from service.client import Client, EventsUnsupported
from service.contract import Artifact, Generation, JobError, JobStatus, MetricPoint, Phase, Progress
from service.dev.localredis import free_port
from service.dev.stack import DevStack, StackError
from service.settings import Settings, hash_api_key
from service.store import Store
from tests.fixtures.api import LiveServer, auth
from tests.fixtures.cli import KEY
from tests.fixtures.hub import USER, HubServer

ROOT = Path(__file__).resolve().parents[2]

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Well, let me think. It is 4."},
    {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Great question! Lima."},
    {"prompt": "Opposite of hot?", "chosen": "Cold.", "rejected": "Hmm, probably cold, I think."},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def upload(cli: Callable[..., Result], tmp_path: Path) -> dict[str, Any]:
    result = cli("datasets", "upload", str(write_jsonl(tmp_path / "prefs.jsonl", ROWS)), "--json")
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def submit_queued(cli: Callable[..., Result], dataset_id: str, *extra: str) -> str:
    result = cli(
        "jobs", "submit", "--base-model", "org/model", "--dataset", dataset_id, "--json", *extra
    )
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["id"])


def test_upload_list_show_and_delete_a_dataset(cli: Callable[..., Result], tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    result = cli("datasets", "upload", str(path), "--name", "tiny prefs")
    assert result.exit_code == 0, result.output
    assert "3 rows" in result.stdout and "standard" in result.stdout
    ds_id = result.stdout.split()[1]
    assert ds_id.startswith("ds_")

    listed = cli("datasets", "list")
    assert listed.exit_code == 0 and ds_id in listed.stdout and "tiny prefs" in listed.stdout

    shown = cli("datasets", "show", ds_id)
    assert shown.exit_code == 0, shown.output
    assert "rows" in shown.stdout and "3" in shown.stdout and "prompt" in shown.stdout
    assert "preference: trains dpo, orpo, simpo, kto" in shown.stdout  # what it can train
    assert "preference" in listed.stdout.splitlines()[1]
    as_json = json.loads(cli("datasets", "show", ds_id, "--json").stdout)
    assert as_json["id"] == ds_id and as_json["rows"] == 3 and as_json["name"] == "tiny prefs"

    assert cli("datasets", "delete", ds_id).exit_code == 0
    gone = cli("datasets", "show", ds_id)
    assert gone.exit_code == 1 and "404" in gone.stderr


def test_show_prints_the_rows_as_training_sees_them(cli: Callable[..., Result]) -> None:
    """A LLaMA-Factory ShareGPT array goes up as shipped; the preview shows the system message
    and the Traditional Chinese text as they are."""
    fixture = ROOT / "tests" / "fixtures" / "datasets" / "sharegpt.json"
    uploaded = cli("datasets", "upload", str(fixture), "--json")
    assert uploaded.exit_code == 0, uploaded.output
    ds_id = json.loads(uploaded.stdout)["id"]
    shown = cli("datasets", "show", ds_id, "--rows", "2")
    assert shown.exit_code == 0, shown.output
    assert "prompt     [system] Answer in one sentence." in shown.stdout
    assert "chosen     [assistant] About 14 million in the city proper." in shown.stdout
    assert "[user] 台北有什麼好吃的？" in shown.stdout  # noqa: RUF001 - the text itself
    assert "row 3" not in shown.stdout
    as_json = json.loads(cli("datasets", "show", ds_id, "--rows", "1", "--json").stdout)
    assert as_json["dataset"]["source_format"] == "sharegpt"
    assert as_json["rows"][0]["rejected"] == [{"role": "assistant", "content": "Tokyo."}]


def test_show_prints_sft_and_unpaired_rows(cli: Callable[..., Result], tmp_path: Path) -> None:
    """Datasets without a chosen/rejected pair show their completion, lengths and labels."""
    sft = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hi there."},
                    {"role": "user", "content": "Again?"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "Weather?"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "type": "function",
                                "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                            }
                        ],
                    },
                ]
            },
        ],
    )
    ds_id = json.loads(cli("datasets", "upload", str(sft), "--json").stdout)["id"]
    shown = cli("datasets", "show", ds_id, "--rows", "2")
    assert 'completion [assistant] weather({"city": "Paris"})' in shown.stdout
    assert shown.exit_code == 0, shown.output
    assert "completion [assistant] Hello." in shown.stdout
    assert "prompt     [user] Hi?" in shown.stdout and "rejected" not in shown.stdout
    assert "prompt     [assistant, trained] Hi there." in shown.stdout  # a chat's earlier answer

    kto = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "2+2?", "completion": "4.", "label": True},
            {"prompt": "2+3?", "completion": "6.", "label": False},
        ],
    )
    ds_id = json.loads(cli("datasets", "upload", str(kto), "--json").stdout)["id"]
    shown = cli("datasets", "show", ds_id, "--rows", "2")
    assert shown.exit_code == 0, shown.output
    assert "desirable rows: 1 of 2" in shown.stdout
    assert "completion 6." in shown.stdout and "label      undesirable" in shown.stdout
    stats = [line.split() for line in shown.stdout.splitlines()]
    assert ["completion", "2", "2", "2", "2"] in stats  # lengths of "4." and "6."


def test_show_prints_the_calls_of_a_preference_dataset(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    row = {
        "input": {
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [{"type": "function", "function": {"name": "weather"}}],
        },
        "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [call]}],
        "non_preferred_output": [{"role": "assistant", "content": "Cold."}],
    }
    path = write_jsonl(tmp_path / "dpo-tools.jsonl", [row])
    ds_id = json.loads(cli("datasets", "upload", str(path), "--json").stdout)["id"]
    shown = cli("datasets", "show", ds_id, "--rows", "1")
    assert shown.exit_code == 0, shown.output
    [kind] = [line.split() for line in shown.stdout.splitlines() if line.startswith(" kind ")]
    assert kind == ["kind", "preference:", "trains", "dpo,", "orpo,", "simpo,", "kto"]
    assert 'chosen     [assistant] weather({"city": "Oslo"})' in shown.stdout


def test_the_default_name_is_the_file_name_made_valid(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    """A file name the name rules refuse ([], #, a gzip suffix) still uploads without --name."""
    path = tmp_path / "prefs [v2] #3.jsonl.gz"
    path.write_bytes(gzip.compress(write_jsonl(tmp_path / "p.jsonl", ROWS).read_bytes()))
    result = cli("datasets", "upload", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "prefs _v2_ _3"


def test_import_from_the_hub_with_bad_rows_skipped(
    api_settings: Settings, hub_server: HubServer, tmp_path: Path
) -> None:
    """`ftune datasets import` fetches a published set server-side; HH's empty answers need
    --on-invalid skip, and what was skipped is said."""
    repo = f"{USER}/hh-{tmp_path.name[-8:]}"
    hh = (ROOT / "tests" / "fixtures" / "datasets" / "hh.jsonl").read_bytes()
    hub_server.seed_dataset(repo, {"harmless-base/train.jsonl.gz": gzip.compress(hh)})
    settings = replace(
        api_settings, hf_endpoint=hub_server.endpoint, hf_tokens={"": hub_server.read_token}
    )
    with LiveServer(settings) as server:
        runner = CliRunner()

        def cli(*args: str) -> Result:
            head = ["--url", server.url, "--api-key", KEY]
            return runner.invoke(app, [*head, *args], env={"COLUMNS": "200"})

        source = f"hf://datasets/{repo}/harmless-base"
        refused = cli("datasets", "import", source)
        assert refused.exit_code == 1 and "422" in refused.stderr and "line 2" in refused.stderr
        imported = cli(
            "datasets", "import", source, "--on-invalid", "skip", "--max-invalid-fraction", "0.5"
        )
        assert imported.exit_code == 0, imported.output
        assert "imported ds_" in imported.stdout and ": 2 rows, preference" in imported.stdout
        assert "skipped 1 invalid rows" in imported.stderr and "line 2: rejected" in imported.stderr
        ds_id = imported.stdout.split()[1]
        shown = cli("datasets", "show", ds_id)
        assert shown.exit_code == 0 and "line 2: rejected" in shown.stderr
        wrong = cli("datasets", "import", f"hf://datasets/{repo}", "--config", "en")
        assert wrong.exit_code == 1 and "declares no configs" in wrong.stderr


def test_upload_with_a_column_mapping(cli: Callable[..., Result], tmp_path: Path) -> None:
    rows = [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    result = cli(
        "datasets", "upload", str(path), "--prompt-field", "q", "--chosen-field", "good",
        "--rejected-field", "bad", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source_format"] == "mapped"

    extra = write_jsonl(tmp_path / "extra.jsonl", [{**r, "score": 1} for r in ROWS])
    result = cli("datasets", "upload", str(extra))
    assert result.exit_code == 0, result.output
    # The message says its count once, then where.
    assert "column 'score' ignored in 3 rows (lines 1, 2, 3)\n" in result.stderr


def test_a_bad_dataset_is_refused_with_line_numbers(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [ROWS[0], "{not json", {"prompt": "p", "chosen": "same", "rejected": "same"}, ROWS[1]],
    )
    result = cli("datasets", "upload", str(path))
    assert result.exit_code == 1
    assert "422" in result.stderr and "2 invalid rows" in result.stderr
    assert "line 2" in result.stderr and "line 3" in result.stderr
    assert "Traceback" not in result.output
    assert cli("datasets", "list", "--json").stdout.count('"id"') == 0  # nothing stored
    empty = cli("datasets", "upload", str(write_jsonl(tmp_path / "empty.jsonl", [])))
    assert empty.exit_code == 1 and "the dataset has no rows" in empty.stderr
    assert "line 0" not in empty.stderr  # a whole-file problem has no line


def test_a_csv_files_problems_are_told_by_row(cli: Callable[..., Result], tmp_path: Path) -> None:
    """A CSV record may span lines (a quoted text with a line break): its number is a row's."""
    sheet = tmp_path / "votes.csv"
    sheet.write_text(
        'prompt,chosen,rejected,score\n"Two\nlines",Yes.,No.,1\nHi,,Bye.,2\n'
        "Why?,Because.,No idea.,3\n"
    )
    refused = cli("datasets", "upload", str(sheet))
    assert refused.exit_code == 1 and "row 2, chosen: the text is empty" in refused.stderr
    assert "line 2" not in refused.stderr
    taken = cli(
        "datasets", "upload", str(sheet), "--on-invalid", "skip", "--max-invalid-fraction", "0.5"
    )
    assert taken.exit_code == 0, taken.output
    assert "row 2: chosen: the text is empty" in taken.stderr
    assert "column 'score' ignored in 2 rows (rows 1, 3)" in taken.stderr


def test_submit_takes_the_method_as_a_flag(cli: Callable[..., Result], tmp_path: Path) -> None:
    """An sft or kto job without writing a spec file; the method must fit the dataset."""
    pairs = upload(cli, tmp_path)["id"]
    job_id = submit_queued(cli, pairs, "--method", "kto")
    shown = json.loads(cli("jobs", "show", job_id, "--json").stdout)
    assert shown["spec"]["method"] == "kto"
    sft = cli("jobs", "submit", "--base-model", "org/model", "--dataset", pairs, "--method", "sft")
    assert sft.exit_code == 1 and "completion_field=chosen" in sft.stderr  # pairs: no sft
    assert cli("jobs", "submit", "--dataset", pairs, "--method", "ppo").exit_code == 2


def test_a_bad_spec_gets_a_readable_error(cli: Callable[..., Result], tmp_path: Path) -> None:
    ds = upload(cli, tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"base_model": "org/model", "dataset_id": ds["id"], "hyperparameters": {"beta": -1}}
        )
    )
    result = cli("jobs", "submit", str(spec))
    assert result.exit_code == 1
    assert "422" in result.stderr and "hyperparameters.beta" in result.stderr

    spec.write_text('{"base_model": "org/model",\n "dataset_id": }')
    result = cli("jobs", "submit", str(spec))
    assert result.exit_code == 2 and "not valid JSON: line 2" in result.stderr

    result = cli("jobs", "submit", "--dataset", ds["id"])
    assert result.exit_code == 2 and "--base-model" in result.stderr

    result = cli("jobs", "submit", "--base-model", "org/m", "--dataset", "ds_doesnotexist")
    assert result.exit_code == 1 and "ds_doesnotexist does not exist" in result.stderr


def test_flags_override_the_spec_file(cli: Callable[..., Result], tmp_path: Path) -> None:
    ds = upload(cli, tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "base_model": "org/model",
                "dataset_id": ds["id"],
                "hyperparameters": {"beta": 0.2, "max_steps": 100},
                "labels": {"team": "search"},
            }
        )
    )
    result = cli(
        "jobs", "submit", str(spec), "--max-steps", "7", "--learning-rate", "1e-4",
        "--destination", "s3://bucket/out/", "--label", "run=3", "--eval-prompt", "Hi?", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)["spec"]
    assert job["hyperparameters"]["max_steps"] == 7 and job["hyperparameters"]["beta"] == 0.2
    assert job["hyperparameters"]["learning_rate"] == 1e-4
    assert job["output"]["destination"] == {"type": "s3", "uri": "s3://bucket/out/"}
    assert job["labels"] == {"team": "search", "run": "3"}
    assert job["eval_prompts"] == ["Hi?"]


def test_list_show_and_cancel_a_queued_job(cli: Callable[..., Result], tmp_path: Path) -> None:
    ds = upload(cli, tmp_path)
    job_id = submit_queued(cli, ds["id"], "--label", "team=search")
    other = submit_queued(cli, ds["id"])

    listed = cli("jobs", "list")
    assert listed.exit_code == 0 and job_id in listed.stdout and other in listed.stdout
    assert listed.stdout.index(other) < listed.stdout.index(job_id)  # newest first
    assert "queued" in listed.stdout
    labelled = cli("jobs", "list", "--label", "team=search")
    assert job_id in labelled.stdout and other not in labelled.stdout
    assert cli("jobs", "list", "--label", "nonsense").exit_code == 2

    shown = cli("jobs", "show", job_id)
    assert shown.exit_code == 0 and "queued" in shown.stdout and "team=search" in shown.stdout

    cancelled = cli("jobs", "cancel", job_id)
    assert cancelled.exit_code == 0 and f"cancelled {job_id}" in cancelled.stdout
    assert job_id in cli("jobs", "list", "--status", "cancelled").stdout
    assert job_id not in cli("jobs", "list", "--status", "queued").stdout
    again = cli("jobs", "cancel", job_id)
    assert again.exit_code == 1 and "409" in again.stderr and "already cancelled" in again.stderr

    watched = cli("jobs", "watch", job_id)
    assert watched.exit_code == 1 and "cancelled" in watched.stdout


# -- a job moved along by hand, as a worker would ---------------------------------------------


def run_async(coro_fn: Callable[[Store], Any], redis_url: str) -> Any:
    async def go() -> Any:
        store = Store.from_url(redis_url)
        try:
            return await coro_fn(store)
        finally:
            await store.close()

    return asyncio.run(go())


def set_job(redis_url: str, job_id: str, **changes: Any) -> None:
    async def change(store: Store) -> None:
        await store.update_job(job_id, lambda j: msgspec.structs.replace(j, **changes))

    run_async(change, redis_url)


def add_points(redis_url: str, job_id: str, points: list[MetricPoint]) -> None:
    async def add(store: Store) -> None:
        for p in points:
            await store.add_metrics(job_id, p)

    run_async(add, redis_url)


POINTS = [
    MetricPoint(step=1, time=1000.0, values={"loss": 0.69, "rewards/accuracies": 0.25}),
    MetricPoint(step=2, time=1004.5, values={"loss": 0.52, "rewards/accuracies": 0.75}),
    MetricPoint(step=3, time=1009.0, values={"loss": 0.31, "grad_norm": 1.5}),
]


def test_metrics_as_a_table_and_as_csv(
    cli: Callable[..., Result], tmp_path: Path, api_settings: Settings
) -> None:
    job_id = submit_queued(cli, upload(cli, tmp_path)["id"])
    add_points(api_settings.redis_url, job_id, POINTS)

    result = cli("jobs", "metrics", job_id, "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["step", "time", "grad_norm", "loss", "rewards/accuracies"]
    assert rows[1] == ["1", "1000.000", "", "0.69", "0.25"]
    assert rows[3] == ["3", "1009.000", "1.5", "0.31", ""]
    assert len(rows) == 4

    since = list(csv.reader(io.StringIO(cli("jobs", "metrics", job_id, "--csv",
                                             "--since-step", "2").stdout)))  # fmt: skip
    assert [r[0] for r in since[1:]] == ["2", "3"]

    table = cli("jobs", "metrics", job_id)
    assert table.exit_code == 0 and "rewards/accuracies" in table.stdout and "0.31" in table.stdout


def test_watch_follows_a_job_to_success(
    cli: Callable[..., Result], tmp_path: Path, api_settings: Settings
) -> None:
    job_id = submit_queued(cli, upload(cli, tmp_path)["id"])
    url = api_settings.redis_url

    def worker() -> None:
        time.sleep(0.5)
        set_job(
            url, job_id, status=JobStatus.running, phase=Phase.preparing, started_at=time.time()
        )
        time.sleep(0.3)
        set_job(url, job_id, phase=Phase.training, progress=Progress(step=0, total_steps=3))
        for p in POINTS:
            add_points(url, job_id, [p])
            set_job(url, job_id, progress=Progress(step=p.step, total_steps=3, eta_seconds=9.0),
                    latest_metrics=p.values)  # fmt: skip
            time.sleep(0.2)
        artifact = Artifact(kind="adapter", uri="file:///store/jobs/x/adapter/", files=[],
                            sha256={})  # fmt: skip
        set_job(url, job_id, status=JobStatus.succeeded, phase=None, finished_at=time.time(),
                artifacts=[artifact])  # fmt: skip

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    result = cli("jobs", "watch", job_id)
    thread.join()
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 20
    out = result.stdout
    for line in ("queued", "running (preparing)", "running (training)", "succeeded"):
        assert line in out, out
    assert out.index("running (preparing)") < out.index("running (training)")
    assert "3/3" in out and "loss 0.31" in out
    assert "adapter: file:///store/jobs/x/adapter/" in out


def test_watch_follows_a_stream_cut_short_to_the_end_with_each_line_at_its_time(
    cli: Callable[..., Result], tmp_path: Path, api_settings: Settings
) -> None:
    """The server ends a stream at its time limit (an hour by default; an API restart too):
    watch went on by polling and printed no log line or phase after that. It follows the
    stream again from the last event; and history replayed at its start shows when it
    happened, not the time it was read."""
    short = replace(api_settings, event_stream_seconds=1)
    with LiveServer(short) as live:
        job_id = submit_queued(cli, upload(cli, tmp_path)["id"])  # the same Redis and store
        url = api_settings.redis_url
        set_job(url, job_id, status=JobStatus.running, phase=Phase.preparing)
        time.sleep(1.5)  # the history is older than the watch

        def worker() -> None:
            for i in range(3):
                time.sleep(1.2)  # a stream ends (1 s) between two lines
                run_async(lambda store, i=i: store.add_log(job_id, f"line {i}"), url)
            set_job(url, job_id, phase=Phase.training)
            time.sleep(1.2)
            set_job(url, job_id, status=JobStatus.succeeded, phase=None, finished_at=time.time())

        thread = threading.Thread(target=worker)
        started = time.time()
        thread.start()
        result = cli("jobs", "watch", job_id, url=live.url)
        thread.join()
    assert result.exit_code == 0, result.output
    out = result.stdout
    for said in ("line 0", "line 1", "line 2", "running (training)", "succeeded"):
        assert said in out, out
    queued = next(line for line in out.splitlines() if line.endswith(" queued"))
    when = datetime.strptime(" ".join(queued.split()[:2]), "%Y-%m-%d %H:%M:%S").timestamp()
    assert when <= started - 1, (queued, started)  # submitted before the watch began


def test_watch_and_logs_at_the_tenants_stream_limit_do_not_fail(
    cli: Callable[..., Result], tmp_path: Path, api_settings: Settings
) -> None:
    """With the tenant's open event streams at their limit (a dashboard, a teammate), watch
    follows the job by polling, and logs waits for a stream: both exited 1 on the 429."""
    one = replace(api_settings, max_event_streams=1)
    with LiveServer(one) as live:
        dataset = upload(cli, tmp_path)["id"]
        job_id, other = submit_queued(cli, dataset), submit_queued(cli, dataset)
        url = api_settings.redis_url
        holding = threading.Event()

        def hold() -> None:  # another of the tenant's clients, following another job
            with (
                httpx.Client(base_url=live.url, headers=auth(KEY), timeout=30) as http,
                http.stream("GET", f"/v1/jobs/{other}/events") as stream,
            ):
                for _ in stream.iter_lines():
                    holding.set()

        threading.Thread(target=hold, daemon=True).start()
        assert holding.wait(10)

        def worker() -> None:
            time.sleep(1.0)
            set_job(url, job_id, status=JobStatus.running, phase=Phase.training)
            run_async(lambda store: store.add_log(job_id, "saved checkpoint-3"), url)
            time.sleep(1.0)
            set_job(url, job_id, status=JobStatus.succeeded, phase=None, finished_at=time.time())

        thread = threading.Thread(target=worker)
        thread.start()
        watched = cli("jobs", "watch", job_id, url=live.url)
        thread.join()
        assert watched.exit_code == 0, watched.output
        assert "succeeded" in watched.stdout
        # logs waits for a slot: the other job's stream ends with that job, a moment later.
        ends = threading.Timer(
            1.0, lambda: set_job(url, other, status=JobStatus.cancelled, finished_at=time.time())
        )
        ends.start()
        logged = cli("jobs", "logs", job_id, url=live.url)
        ends.join()
        assert logged.exit_code == 0, logged.output
        assert "saved checkpoint-3" in logged.stdout


def test_logs_prints_a_jobs_log_from_its_start_and_follows_it_to_its_end(
    cli: Callable[..., Result], tmp_path: Path, api_settings: Settings
) -> None:
    job_id = submit_queued(cli, upload(cli, tmp_path)["id"])
    url = api_settings.redis_url
    set_job(url, job_id, status=JobStatus.running, phase=Phase.preparing)
    run_async(lambda store: store.add_log(job_id, "loading org/model in 4-bit"), url)

    def worker() -> None:  # the rest arrives while `logs` follows
        time.sleep(0.5)
        set_job(url, job_id, phase=Phase.training)
        run_async(lambda store: store.add_log(job_id, "saved checkpoint-3"), url)
        set_job(url, job_id, status=JobStatus.succeeded, phase=None, finished_at=time.time())

    thread = threading.Thread(target=worker)
    thread.start()
    result = cli("jobs", "logs", job_id)
    thread.join()
    assert result.exit_code == 0, result.output
    said = [line.split(" ", 2)[2] for line in result.stdout.splitlines()]  # after the time
    assert said == [
        "status queued",
        "status running",
        "phase preparing",
        "loading org/model in 4-bit",
        "phase training",
        "saved checkpoint-3",
        "status succeeded",
    ]
    again = cli("jobs", "logs", job_id)  # an ended job: its whole log, at once
    assert again.exit_code == 0 and again.stdout.count("\n") == len(said)
    assert cli("jobs", "logs", "job_nosuch").exit_code == 1


def test_download_saves_a_jobs_adapter_from_the_store_checked_file_by_file(
    cli: Callable[..., Result], tmp_path: Path, api_settings: Settings, live_api: LiveServer
) -> None:
    """A team gets its model from the service without a shell on the store's host."""
    job_id = submit_queued(cli, upload(cli, tmp_path)["id"])
    made = tmp_path / "made"
    (made / "nested").mkdir(parents=True)
    (made / "adapter_model.safetensors").write_bytes(os.urandom(3 << 20))  # several chunks
    (made / "adapter_config.json").write_text('{"r": 8}')
    (made / "nested" / "tokenizer.json").write_text("{}")
    blobs = open_store(api_settings.store_url)
    prefix = f"jobs/{job_id}/artifacts/adapter/"
    sha = blobs.upload_dir(prefix, made)
    sizes = {name: (made / name).stat().st_size for name in sha}
    adapter = Artifact(
        kind="adapter", uri=f"{blobs.url}/{prefix}", files=sorted(sha), sha256=sha, sizes=sizes
    )
    set_job(api_settings.redis_url, job_id, status=JobStatus.succeeded, artifacts=[adapter])

    result = cli("jobs", "download", job_id, "--to", str(tmp_path / "got"))
    assert result.exit_code == 0, result.output
    assert "3 files, 3.1 MB), each checked against its sha256" in result.stdout
    for name in sha:
        assert (tmp_path / "got" / "adapter" / name).read_bytes() == (made / name).read_bytes()
    assert not list((tmp_path / "got").rglob("*.part"))

    # Only its tenant gets it; a file it does not have is named with those it has.
    url = f"{live_api.url}/v1/jobs/{job_id}/artifacts/adapter/adapter_config.json"
    got = httpx.get(url, headers=auth(KEY))
    assert got.content == b'{"r": 8}' and got.headers["etag"] == f'"{sha["adapter_config.json"]}"'
    assert httpx.get(url, headers=auth("key-bob")).status_code == 404
    missing = httpx.get(url.replace("adapter_config", "nope"), headers=auth(KEY))
    assert missing.status_code == 404 and "its files: adapter_config.json" in missing.text
    blobs.delete(prefix + "nested/tokenizer.json")  # listed, but lost from the store
    lost = httpx.get(url.replace("adapter_config.json", "nested/tokenizer.json"), headers=auth(KEY))
    assert lost.status_code == 404 and "the store has no such file" in lost.text

    # What was stored is not what the manifest says: refused, and said.
    blobs.put_bytes(prefix + "adapter_config.json", b'{"r": 9}')
    tampered = cli("jobs", "download", job_id, "--to", str(tmp_path / "again"))
    assert tampered.exit_code == 1 and "adapter_config.json: its sha256 is" in tampered.stderr
    assert "not saved" in tampered.stderr
    kept = {p.name for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert "adapter_config.json" not in kept and not any(n.endswith(".part") for n in kept)

    # Published to the Hub: fetched from there, as the API says.
    hub = Artifact(kind="adapter", uri="hf://team/model/adapter", files=["a"], sha256={})
    published = submit_queued(cli, upload(cli, tmp_path)["id"])
    set_job(api_settings.redis_url, published, status=JobStatus.succeeded, artifacts=[hub])
    elsewhere = cli("jobs", "download", published, "--to", str(tmp_path / "hub"))
    assert elsewhere.exit_code == 1 and "published to hf://team/model/adapter" in elsewhere.stderr
    no_merged = cli("jobs", "download", published, "--kind", "merged")
    assert no_merged.exit_code == 1 and "has no merged; its artifacts: adapter" in no_merged.stderr


def test_watch_exits_1_and_prints_the_error_of_a_failed_job(
    cli: Callable[..., Result], tmp_path: Path, api_settings: Settings
) -> None:
    job_id = submit_queued(cli, upload(cli, tmp_path)["id"])
    set_job(api_settings.redis_url, job_id, status=JobStatus.running, phase=Phase.preparing)
    error = JobError(type="ModelNotFound", message="no model at org/model", phase=Phase.preparing)
    set_job(api_settings.redis_url, job_id, status=JobStatus.failed, error=error)

    result = cli("jobs", "watch", job_id)
    assert result.exit_code == 1
    assert result.stdout.count("failed") == 1  # the status line; then why, not it again
    assert "ModelNotFound while preparing: no model at org/model" in result.stdout


def test_on_80_columns_ids_and_uris_are_printed_whole(
    cli: Callable[..., Result], tmp_path: Path, api_settings: Settings
) -> None:
    """What a user copies from a listing or a job (its id, where its model went) is never cut
    short, and no column is left out: a pipe gets 80 columns."""
    ds = upload(cli, tmp_path)
    job_id = submit_queued(cli, ds["id"], "--base-model", "Qwen/Qwen2.5-0.5B-Instruct")
    uri = f"s3://a-rather-long-bucket-name/teams/search/fine-tunes/2026-12/{job_id}/adapter/"
    artifact = Artifact(kind="adapter", uri=uri, files=[], sha256={})
    set_job(api_settings.redis_url, job_id, status=JobStatus.running, phase=Phase.training)
    set_job(api_settings.redis_url, job_id, status=JobStatus.succeeded, artifacts=[artifact])
    listed = cli("jobs", "list", columns=80)
    assert listed.exit_code == 0, listed.output
    assert job_id in listed.stdout and ds["id"] in listed.stdout and "…" not in listed.stdout
    assert "BASE MODEL" in listed.stdout and "succeeded" in listed.stdout
    shown = cli("jobs", "show", job_id, columns=80)
    assert "…" not in shown.stdout
    assert uri in "".join(line.strip() for line in shown.stdout.splitlines())  # folded, whole
    datasets = cli("datasets", "list", columns=80)
    assert ds["id"] in datasets.stdout and "…" not in datasets.stdout


def test_submit_json_watch_prints_one_json_document_the_job_as_it_ended(
    cli: Callable[..., Result], tmp_path: Path, live_api: LiveServer
) -> None:
    """A script reads stdout as JSON: the watch goes to stderr. A flag for the length of
    training replaces the file's other one (both are refused)."""
    ds = upload(cli, tmp_path)
    spec = tmp_path / "spec.json"
    body = {"base_model": "org/model", "dataset_id": ds["id"], "hyperparameters": {"max_steps": 5}}
    spec.write_text(json.dumps(body))

    def cancel_it() -> None:  # no worker here: the job ends by its cancel
        with Client(live_api.url, KEY) as client:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                page = client.list_jobs()
                if page.items:
                    client.cancel_job(page.items[0].id)
                    return
                time.sleep(0.05)

    canceller = threading.Thread(target=cancel_it)
    canceller.start()
    both = cli("jobs", "submit", str(spec), "--num-epochs", "2", "--max-steps", "3")
    assert both.exit_code == 1 and "set only one of them" in both.stderr, both.output
    result = cli("jobs", "submit", str(spec), "--num-epochs", "2", "--watch", "--json")
    canceller.join()
    assert result.exit_code == 1, result.output
    final = json.loads(result.stdout)  # one document
    assert final["status"] == "cancelled"
    assert final["spec"]["hyperparameters"]["num_epochs"] == 2
    assert final["spec"]["hyperparameters"]["max_steps"] is None
    assert f"submitted {final['id']}" in result.stderr
    assert result.stderr.count("cancelled") == 1, result.stderr


class WithoutEvents(httpx.HTTPTransport):
    """The live API, except that its events endpoint answers like a server without SSE."""

    def __init__(self, status: int, content_type: str) -> None:
        super().__init__()
        self.status, self.content_type = status, content_type

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            body = json.dumps({"status": self.status, "title": "no events here"}).encode()
            return httpx.Response(
                self.status, headers={"Content-Type": self.content_type}, content=body
            )
        return super().handle_request(request)


def test_logs_says_so_when_the_server_streams_no_events(
    cli: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy that answers the events route itself: a message and exit code 1, no traceback."""
    job_id = submit_queued(cli, upload(cli, tmp_path)["id"])
    monkeypatch.setattr(
        Options,
        "client",
        lambda self: Client(self.url, self.api_key, transport=WithoutEvents(404, "text/html")),
    )
    result = cli("jobs", "logs", job_id)
    assert result.exit_code == 1 and "does not stream job events" in result.stderr
    assert f"ftune jobs watch {job_id}" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("status", "content_type"), [(404, "application/problem+json"), (200, "application/json")]
)
def test_watch_polls_when_the_server_does_not_stream_events(
    cli: Callable[..., Result],
    tmp_path: Path,
    api_settings: Settings,
    live_api: LiveServer,
    status: int,
    content_type: str,
) -> None:
    job_id = submit_queued(cli, upload(cli, tmp_path)["id"])
    url = api_settings.redis_url

    def worker() -> None:
        time.sleep(0.3)
        set_job(url, job_id, status=JobStatus.running, phase=Phase.training)
        add_points(url, job_id, POINTS)
        time.sleep(0.3)
        set_job(url, job_id, status=JobStatus.succeeded, phase=None, finished_at=time.time())

    with Client(live_api.url, KEY, transport=WithoutEvents(status, content_type)) as client:
        with pytest.raises(EventsUnsupported):
            next(client.events(job_id))
        thread = threading.Thread(target=worker)
        thread.start()
        screen = io.StringIO()
        job = watch_job(client, job_id, Console(file=screen, width=200), poll=0.1)
        thread.join()
    assert job.status == JobStatus.succeeded
    assert f"{job_id} succeeded" in screen.getvalue() and "loss 0.31" in screen.getvalue()


# -- keys and URLs ----------------------------------------------------------------------------


def test_an_id_with_a_slash_is_a_usage_error_not_a_traceback(cli: Callable[..., Result]) -> None:
    result = cli("jobs", "show", "a/b")
    assert result.exit_code == 2
    assert "not a valid id: 'a/b'" in result.stderr and "Traceback" not in result.output


def test_a_missing_or_wrong_api_key_says_what_to_do(cli: Callable[..., Result]) -> None:
    result = cli("jobs", "list", key=None)
    assert result.exit_code == 1
    assert "401" in result.stderr and "FTUNE_API_KEY" in result.stderr

    wrong = "not-the-right-key-1234"
    result = cli("datasets", "list", key=wrong)
    assert result.exit_code == 1 and "unknown API key" in result.stderr
    assert wrong not in result.output  # a key is never echoed


def test_the_key_file_written_by_ftune_dev_is_used(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    (tmp_path / ".ftune").mkdir()
    (tmp_path / ".ftune" / "api_key").write_text(KEY + "\n")
    result = cli("datasets", "list", key=None)
    assert result.exit_code == 0, result.output
    assert KEY not in result.output


def test_an_unreachable_url_is_explained(cli: Callable[..., Result]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("jobs", "list", url=url)
    assert result.exit_code == 1
    assert f"cannot reach the ftune API at {url}: is `ftune dev` running?" in result.stderr
    assert "Traceback" not in result.output


def test_a_url_is_taken_as_users_write_it(cli: Callable[..., Result], live_api: LiveServer) -> None:
    """The base_url an OpenAI client is given (ending in /v1) works; one without a scheme is
    refused saying so (it was reported as a server that is not running)."""
    assert cli("jobs", "list", url=f"{live_api.url}/v1/").exit_code == 0
    bare = cli("jobs", "list", url=live_api.url.removeprefix("http://"))
    assert bare.exit_code == 2 and "has no scheme" in bare.output


# -- the dev stack ----------------------------------------------------------------------------


def test_a_killed_dev_stack_takes_its_redis_along(tmp_path: Path) -> None:
    """`ftune dev` (or a test run) killed with SIGKILL gets no chance to stop its Redis: the
    kernel does (it kept the port and its data files locked until killed by hand)."""
    script = (
        "import sys, time\n"
        "from service.dev.localredis import LocalRedis\n"
        "print(LocalRedis().start().process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    redis_pid = int(parent.stdout.readline())
    server = psutil.Process(redis_pid)
    assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    parent.kill()
    parent.wait()
    gone, _ = psutil.wait_procs([server], timeout=10)
    assert gone, "Redis outlived its killed parent"


def test_dev_stack_keeps_its_key_and_data_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / ".ftune"
    runner = CliRunner()
    env = {"COLUMNS": "200", "FTUNE_API_KEY": None, "FTUNE_URL": None}
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)

    with DevStack(root, worker=False, log_dir=tmp_path / "logs") as stack:
        assert stack.key_created
        key_file = root / "api_key"
        assert key_file.read_text().strip() == stack.api_key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        local = json.loads((root / "api_keys.json").read_text())["tenants"]["local"]
        assert local["keys"] == [{"sha256": hash_api_key(stack.api_key), "admin": False}]
        assert set(local["grants"]["hub_namespaces"]) == {"*"}
        # The CLI finds the key in .ftune/api_key by itself.
        result = runner.invoke(app, ["--url", stack.url, "datasets", "upload", str(data)], env=env)
        assert result.exit_code == 0, result.output
        ds_id = result.stdout.split()[1]
        # Its own stack: the developer's tenant may publish wherever their credentials reach.
        hub_job = {
            "base_model": "org/m",
            "dataset_id": ds_id,
            "output": {"destination": {"type": "hub", "repo_id": "someone/tuned"}},
        }
        with Client(stack.url, stack.api_key) as client:
            assert client.submit_job(hub_job).status == "queued"
        redis_pid = stack.redis.process.pid if stack.redis and stack.redis.process else 0
        api_url = stack.url
    assert not psutil.pid_exists(redis_pid) or psutil.Process(redis_pid).status() == "zombie"
    assert not Client(api_url).healthy()

    with DevStack(root, worker=False, log_dir=tmp_path / "logs") as again:
        assert not again.key_created and again.api_key == stack.api_key
        result = runner.invoke(app, ["--url", again.url, "datasets", "list"], env=env)
        assert result.exit_code == 0 and ds_id in result.stdout  # Redis kept it (AOF)


def test_dev_refuses_a_port_in_use(tmp_path: Path, live_api: LiveServer) -> None:
    port = int(live_api.url.rsplit(":", 1)[1])
    with pytest.raises(StackError, match=f"port {port} .* in use"):
        DevStack(tmp_path / ".ftune", port, worker=False).start()


def test_api_with_a_bad_variable_says_which_and_never_listens(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
        env={**os.environ, "FTUNE_MAX_ATTEMPTS": "three", "FTUNE_LOG_FORMAT": "xml"},
    )  # fmt: skip
    listened = False
    while proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.05):
            listened = True
        time.sleep(0.02)
    out, err = (b.decode() for b in proc.communicate(timeout=30))
    assert proc.returncode == 2 and not listened, out + err
    assert "FTUNE_MAX_ATTEMPTS must be an integer ≥ 1, got 'three'" in err
    assert "FTUNE_LOG_FORMAT must be one of json, text, got 'xml'" in err
    assert "Traceback" not in err and "Uvicorn" not in out + err


@pytest.mark.slow
def test_ftune_dev_runs_api_and_worker_and_stops_them_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    # Started with SIGINT ignored, as a shell script's background job (or `nohup`) starts it:
    # Ctrl-C must stop it all the same.
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "dev", "--port", str(port),
         "--state-dir", str(tmp_path / ".ftune")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while not any("Press Ctrl-C" in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        lines.append(proc.stdout.readline().decode())
    text = "".join(lines)
    key = (tmp_path / ".ftune" / "api_key").read_text().strip()
    assert f"http://127.0.0.1:{port}" in text and key in text  # shown once, on first start
    metrics_url = next(line.split()[-1] for line in lines if line.startswith("Worker metrics"))
    while True:  # the worker serves its metrics once it is up
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(metrics_url).status_code == 200:
                break
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3  # redis, API, worker
    with Client(f"http://127.0.0.1:{port}", key) as client:
        assert client.ready()
        assert client.list_jobs().items == []

    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, text + rest.decode()
    assert "stopped" in rest.decode()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert not Client(f"http://127.0.0.1:{port}").healthy()


# -- the demo's data --------------------------------------------------------------------------


def test_the_demo_dataset_is_in_sync_with_its_generator_and_accepted(
    cli: Callable[..., Result],
) -> None:
    generated = runpy.run_path(str(ROOT / "tools" / "make_demo_data.py"))["rows"]()
    shipped = [json.loads(line) for line in DATASET_FILE.read_text().splitlines()]
    assert shipped == generated  # rerun tools/make_demo_data.py after editing it
    assert len(shipped) >= 250
    train_prompts = {r["prompt"].lower() for r in shipped}
    assert not train_prompts & {p.lower() for p in heldout_prompts()}
    # The visible preference: the chosen answer is always the short one, by far on average.
    assert all(len(r["chosen"]) * 2 < len(r["rejected"]) for r in shipped)
    assert sum(len(r["rejected"]) / len(r["chosen"]) for r in shipped) / len(shipped) > 4

    result = cli("datasets", "upload", str(DATASET_FILE), "--json")
    assert result.exit_code == 0, result.output
    ds = json.loads(result.stdout)
    assert ds["rows"] == len(shipped) and ds["warnings"] == []


def test_length_measure_counts_shorter_answers() -> None:
    gens = [
        Generation(prompt="a", base="one two three four", tuned="one"),
        Generation(prompt="b", base="one two", tuned="one two three"),
    ]
    m = length_measure(gens)
    assert (m.base_words, m.tuned_words, m.shorter, m.total) == (3.0, 2.0, 1, 2)
    assert "3.0 -> 2.0 words" in str(m) and "1 of 2" in str(m)
