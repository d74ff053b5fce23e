"""The web console in headless Chromium (Debian's, driven by Playwright) against a real API,
Redis and worker: sign in, upload, submit from the form, watch the curves grow live, compare
the generations, cancel, read a policy run's gate decision; no key in any URL or log line.

Screenshots of every page land in `test-artifacts/console/` (`FTUNE_SCREENSHOTS` moves them);
`make screenshot` copies the job page's into the README.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from playwright.sync_api import Browser, Page, Playwright, Route, expect, sync_playwright

from service.api.console import CONTENT_SECURITY_POLICY
from service.contract import JobStatus, Phase, Progress
from service.settings import Settings
from service.store import Store
from tests.e2e.conftest import Stack
from tests.fixtures.api import LiveServer
from tests.fixtures.tiny_model import preference_rows

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(os.environ.get("FTUNE_SCREENSHOTS", "test-artifacts/console"))
KEY = "key-alice"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"
WAIT_MS = 300_000  # an upper bound for a loaded machine; idle, a job takes ~15 s
STEPS = 20
# Elements wider than the viewport: a page that scrolls sideways on a phone.
OVERFLOW = """[...document.querySelectorAll('body *')]
  .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1)
  .filter((e) => !e.closest('.table-wrap, pre'))
  .map((e) => e.tagName + '.' + e.className)"""


@dataclass
class Console:
    """One browser tab on the console, with every URL it asked for and every error it logged."""

    page: Page
    base: str
    urls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Script errors and CSP violations; an API's 4xx is the page's to show, not an error."""

    def open(self, fragment: str) -> None:
        self.page.goto(f"{self.base}/ui/{fragment}")

    def sign_in(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.press("#api-key", "Enter")

    def shot(self, name: str, *, full_page: bool = True) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)

    def wait_for(self, probe: Callable[[], int | bool], timeout: float = WAIT_MS / 1000) -> Any:
        """Poll from here: the console's CSP (rightly) forbids wait_for_function's eval."""
        deadline = time.monotonic() + timeout
        while not (found := probe()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out on {self.page.url}")
            self.page.wait_for_timeout(100)
        return found

    def points(self, family: str) -> int:
        box = self.page.locator(f'figure.chart[data-family="{family}"]')
        return int(box.get_attribute("data-points") or 0) if box.count() else 0


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (as .ci/run does)")
    with sync_playwright() as p:
        browser = _launch(p)
        yield browser
        browser.close()


def _launch(p: Playwright) -> Browser:
    return p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


@pytest.fixture
def console_for(chromium: Browser) -> Iterator[Any]:
    contexts = []

    def open_console(base: str) -> Console:
        context = chromium.new_context(viewport={"width": 1280, "height": 800})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20_000)
        tab = Console(page=page, base=base)
        page.on("request", lambda r: tab.urls.append(r.url))
        page.on("console", lambda m: _error(tab, m.type, m.text))
        page.on(
            "response", lambda r: "/ui/" in r.url and r.status >= 400 and tab.errors.append(r.url)
        )
        page.on("pageerror", lambda e: tab.errors.append(str(e)))
        return tab

    yield open_console
    for context in contexts:
        context.close()


def _error(tab: Console, kind: str, text: str) -> None:
    if kind == "error" and not text.startswith("Failed to load resource"):
        tab.errors.append(text)


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_wrong_key_shows_the_sign_in_page_with_an_error(
    live_api: LiveServer, console_for: Any
) -> None:
    tab = console_for(live_api.url)
    resp = tab.page.goto(f"{live_api.url}/ui/")
    assert resp is not None and resp.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    expect(tab.page.locator("#sign-in")).to_be_visible()
    tab.sign_in("not-a-key")
    expect(tab.page.locator("#sign-in-error")).to_contain_text("refused")
    expect(tab.page.locator("#nav")).to_be_hidden()
    tab.shot("sign-in-error")

    tab.sign_in(KEY)
    expect(tab.page.locator("#who-tenant")).to_have_text("alice")
    expect(tab.page.locator("#page h1")).to_have_text("Jobs")
    tab.page.reload()  # the tab keeps its key (sessionStorage) ...
    expect(tab.page.locator("#who-tenant")).to_have_text("alice")
    other = console_for(live_api.url)  # ... and no other tab gets it
    other.open("#/jobs")
    expect(other.page.locator("#sign-in")).to_be_visible()
    tab.page.click("#sign-out")
    expect(tab.page.locator("#sign-in")).to_be_visible()
    tab.sign_in("key-admin")  # an admin sees every tenant, with a filter
    expect(tab.page.locator("#who-tenant")).to_have_text("ops (admin)")
    expect(tab.page.locator("input[name=tenant]")).to_be_visible()
    expect(tab.page.locator("th", has_text="Tenant")).to_have_count(0)  # no jobs, no table
    tab.page.click("#sign-out")
    assert tab.page.evaluate("sessionStorage.length") == 0
    assert tab.page.context.cookies() == []
    assert not [u for u in tab.urls if KEY in u]
    assert tab.errors == []  # no script error, no CSP violation, no missing file


def upload_pairs(http: httpx.Client, rows: int) -> dict[str, Any]:
    """A dataset of `rows` preference pairs, as the signed-in tenant."""
    resp = http.post(
        "/v1/datasets",
        content="".join(json.dumps(r) + "\n" for r in preference_rows(rows)),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def test_chat_and_rating_datasets_preview_their_own_columns_on_a_phone(
    live_api: LiveServer, console_for: Any
) -> None:
    """An sft or kto dataset's page shows its completions (and labels): the preview read
    chosen/rejected of every row and the page broke. Long unbroken text wraps on a phone.
    The skip link moves the focus and leaves the page as it is."""
    long = "https://example.org/" + "x" * 220
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Q{i}?"},
                {"role": "assistant", "content": long},
            ]
        }
        for i in range(3)
    ]
    chats[0]["messages"][:0] = [  # an earlier answer: trained too, and said so
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi, how can I help?"},
    ]
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    chats.append(
        {"messages": [chats[1]["messages"][0], {"role": "assistant", "tool_calls": [call]}]}
    )
    ratings = [{"prompt": f"P{i}", "completion": f"C{i}", "label": i % 2 == 0} for i in range(4)]
    ids = []
    for name, rows in (("chats", chats), ("ratings", ratings)):
        resp = httpx.post(
            f"{live_api.url}/v1/datasets",
            params={"name": name},
            content="".join(json.dumps(r) + "\n" for r in rows),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-ndjson"},
            timeout=30,
        )
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
    tab = console_for(live_api.url)
    tab.page.set_viewport_size({"width": 390, "height": 800})
    tab.open("#/jobs")
    tab.sign_in(KEY)
    tab.open(f"#/datasets/{ids[0]}")
    expect(tab.page.locator("th", has_text="Completion")).to_be_visible()
    completions = tab.page.locator("td pre.cell", has_text="assistant: https://example.org/")
    expect(completions).to_have_count(3)
    trained = tab.page.locator("td pre.cell", has_text="assistant (trained): Hi, how can I help?")
    expect(trained).to_have_count(1)
    called = tab.page.locator("td pre.cell", has_text='assistant: weather({"city":"Paris"})')
    expect(called).to_have_count(1)
    assert tab.page.evaluate("document.documentElement.scrollWidth") <= 390
    tab.open(f"#/datasets/{ids[1]}")
    expect(tab.page.locator("th", has_text="Label")).to_be_visible()
    expect(tab.page.locator("td pre.cell", has_text="true (good)")).to_have_count(2)
    tab.page.focus("a.skip")  # the first stop of a keyboard user coming to the page
    tab.page.keyboard.press("Enter")
    expect(tab.page.locator("#page h1")).to_have_text("ratings")
    assert tab.page.url.endswith(f"#/datasets/{ids[1]}")
    assert tab.page.evaluate("document.activeElement.id") == "main"
    # Chart values as a person reads them: a learning rate of 5e-6 read "0" on its axis.
    values = "[5e-6, -3.75e-6, 0.693147, 0, 12345.6]"
    shown = f"import('/ui/js/charts.js').then((m) => {values}.map(m.number))"
    assert tab.page.evaluate(shown) == ["5.00e-6", "-3.75e-6", "0.6931", "0", "12350"]
    # On an axis of fixed width, large values short: memory_bytes read "?20000000".
    big = "[620000000, 1234567, 150000, 99999, 5e-6]"
    axis = f"import('/ui/js/charts.js').then((m) => {big}.map(m.axisNumber))"
    assert tab.page.evaluate(axis) == ["620M", "1.23M", "150K", "100000", "5.00e-6"]
    assert tab.errors == []


def test_a_dropped_event_stream_resumes_after_the_last_event(
    live_api: LiveServer, console_for: Any
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=live_api.url, headers=headers) as http:
        ds = upload_pairs(http, 8)
        job_id = http.post("/v1/jobs", json={"base_model": "org/m", "dataset_id": ds["id"]}).json()[
            "id"
        ]  # no worker here: it stays queued and its stream stays open
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            lines = []
            for line in stream.iter_lines():
                if not line:
                    break
                lines.append(line)
    first = "\n".join(lines) + "\n\n"  # the job's first event, as the API sent it
    sent_id = next(line.removeprefix("id:").strip() for line in lines if line.startswith("id:"))

    tab = console_for(live_api.url)
    asked: list[str | None] = []

    def drop_the_first_stream(route: Route) -> None:
        asked.append(route.request.headers.get("last-event-id"))
        if len(asked) == 1:  # the connection ends after one event, the job still queued
            route.fulfill(status=200, content_type="text/event-stream", body=first)
        elif len(asked) == 2:  # then the tenant is at its open streams for a moment
            headers = {"Retry-After": "3"}  # shown that long: over a check's interval
            route.fulfill(status=429, content_type="application/problem+json", headers=headers)
        else:
            route.continue_()

    tab.page.route(re.compile(r"/events$"), drop_the_first_stream)
    tab.open(f"#/jobs/{job_id}")
    tab.sign_in(KEY)
    expect(tab.page.locator(".log")).to_contain_text("[status] queued")
    expect(tab.page.locator(".stream-state")).to_contain_text("429")  # said, and retried
    tab.wait_for(lambda: len(asked) >= 3)
    expect(tab.page.locator(".stream-state")).to_have_text("live")
    assert asked[:3] == [None, sent_id, sent_id]  # resumed right after the last event it had
    tab.page.wait_for_timeout(500)
    assert tab.page.locator(".log").inner_text().count("[status] queued") == 1  # not replayed
    assert tab.errors == []


def test_uploads_and_submits_do_what_the_user_meant(
    live_api: LiveServer, console_for: Any, tmp_path: Path
) -> None:
    """What a person does in a hurry: an upload named after its file, with invalid rows left
    out or its columns named; moving on while it goes up; a double click on Submit; a form
    sent half filled; "Train on it" on an old dataset; the service gone for a moment."""
    http = httpx.Client(base_url=live_api.url, headers={"Authorization": f"Bearer {KEY}"})
    tab = console_for(live_api.url)
    page = tab.page
    tab.open("#/datasets")
    tab.sign_in(KEY)
    expect(page.locator("#page h1")).to_have_text("Datasets")
    hint = page.locator("input[name=name]").get_attribute("aria-describedby")
    expect(page.locator(f"#{hint}")).to_contain_text("name the dataset after its file")

    # HH's harmless split has empty final answers: refused whole, then taken with them left out.
    hh = tmp_path / "hh [harmless].jsonl"
    hh.write_bytes((FIXTURES / "hh.jsonl").read_bytes())
    page.set_input_files("#dataset-file", str(hh))
    expect(page.locator("#upload-result")).to_contain_text("line 2")
    page.click("text=Columns and invalid rows")
    page.check("input[name=skip_invalid]")
    page.fill("input[name=max_invalid_fraction]", "0.5")
    page.set_input_files("#dataset-file", str(hh))
    page.wait_for_url(re.compile(r"#/datasets/ds_"))
    expect(page.locator("#page h1")).to_have_text("hh _harmless_")
    expect(page.locator("ul.problems")).to_contain_text("line 2 (rejected)")

    # Columns of its own: named in the upload's options.
    tab.open("#/datasets")
    csv_file = tmp_path / "votes.csv"
    csv_file.write_text(
        'question,good,bad\n"Capital of\nPeru?",Lima.,Quito.\n2+2?,,5.\n3+3?,6.,7.\n'
    )
    page.click("text=Columns and invalid rows")
    page.fill("input[name=prompt_field]", "question")
    page.fill("input[name=chosen_field]", "good")
    page.fill("input[name=rejected_field]", "bad")
    page.check("input[name=skip_invalid]")
    page.fill("input[name=max_invalid_fraction]", "0.5")
    page.set_input_files("#dataset-file", str(csv_file))
    page.wait_for_url(re.compile(r"#/datasets/ds_"))
    expect(page.locator("#page h1")).to_have_text("votes")
    expect(page.locator(".facts")).to_contain_text("read as mapped")
    # The second record, on the file's fourth line: a CSV file's problems are told by row.
    expect(page.locator("ul.problems")).to_contain_text("row 2 (good)")

    # Moving on while a file goes up: the user stays where they went, and is told.
    held: list[Route] = []

    def hold_uploads(route: Route) -> None:
        if route.request.method == "POST":
            held.append(route)
        else:
            route.continue_()

    page.route(re.compile(r"/v1/datasets\?"), hold_uploads)
    tab.open("#/datasets")
    page.set_input_files("#dataset-file", str(jsonl(tmp_path / "late.jsonl", preference_rows(3))))
    tab.wait_for(lambda: len(held))
    tab.open("#/new")
    expect(page.locator("#page h1")).to_have_text("New job")
    held[0].continue_()
    expect(page.locator("#notice")).to_contain_text("late.jsonl: stored 3 rows as ds_")
    assert page.url.endswith("#/new")
    page.unroute(re.compile(r"/v1/datasets\?"))

    # A form sent half filled says what is missing, beside it; nothing is sent.
    page.click(".job-form button[type=submit]")
    expect(page.locator(".job-form .error")).to_have_text(re.compile("^Name a base model"))
    assert page.evaluate("document.activeElement.name") == "base_model"
    page.fill("input[name=base_model]", "org/model")
    page.click(".job-form button[type=submit]")
    expect(page.locator(".job-form .error")).to_have_text(re.compile("^Choose a dataset"))
    assert page.evaluate("document.activeElement.name") == "dataset_id"
    assert http.get("/v1/jobs").json()["items"] == []

    # "Train on it" on a dataset older than the newest hundred the form lists.
    old = http.get("/v1/datasets", params={"limit": 1}).json()["items"][0]["id"]
    for i in range(100):
        resp = http.post(
            "/v1/datasets",
            params={"name": f"newer {i}"},
            content=json.dumps({"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."}),
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert resp.status_code == 201, resp.text
    tab.open(f"#/new?dataset={old}")
    expect(page.locator("select[name=dataset_id]")).to_have_value(old)
    expect(page.locator("select[name=dataset_id] option:checked")).to_contain_text(
        "preference pairs"
    )

    # A value the API refuses is said with the form's label, at that field.
    page.fill("input[name=base_model]", "org/model")
    page.fill("input[name=lora_r]", "0")
    page.click(".job-form button[type=submit]")
    expect(page.locator(".job-form .error[role=alert]")).to_contain_text("LoRA r: ")
    assert page.evaluate("document.activeElement.name") == "lora_r"
    page.fill("input[name=lora_r]", "8")
    # One in the JSON typed under "More of the spec": named by its path there, not the API's.
    page.fill("textarea[name=extra]", json.dumps({"hyperparameters": {"warmup_ratio": 2}}))
    page.click(".job-form button[type=submit]")
    refusal = page.locator(".job-form .error[role=alert]")
    expect(refusal).to_contain_text("More of the spec, hyperparameters.warmup_ratio: ")
    expect(refusal).not_to_contain_text("body.")
    assert page.evaluate("document.activeElement.name") == "extra"
    page.fill("textarea[name=extra]", "")

    # A double click makes one job.
    page.dblclick(".job-form button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/job_"))
    page.wait_for_timeout(500)
    jobs = http.get("/v1/jobs").json()["items"]
    assert [j["id"] for j in jobs] == [page.url.rsplit("/", 1)[-1]]
    # Its page: never re-queued (the record's attempt 0), no merging phase for an adapter.
    expect(page.locator(".facts")).to_contain_text("Re-queuedno")
    expect(page.locator(".timeline li")).to_have_count(4)
    page.click("text=Cancel job…")
    page.click("dialog button[value=cancel]")
    expect(page.locator(".summary .badge")).to_have_text("cancelled")
    expect(page.locator("#page")).not_to_contain_text("Cancel requested")
    expect(page.locator("#page")).to_contain_text("None: the job was cancelled.")

    # The service gone for a moment: said plainly, and the page comes back by itself.
    page.route(re.compile(r"/v1/"), lambda route: route.abort())
    tab.open("#/datasets")
    expect(page.locator("#page .error")).to_contain_text("The service did not answer")
    expect(page.locator("#page button", has_text="Try again")).to_be_visible()
    page.unroute(re.compile(r"/v1/"))
    expect(page.locator("#page h1")).to_have_text("Datasets", timeout=15_000)
    http.close()
    tab.errors = [e for e in tab.errors if "ERR_FAILED" not in e]
    assert tab.errors == []


def test_the_jobs_list_follows_its_jobs_and_keeps_its_page(
    live_api: LiveServer, console_for: Any
) -> None:
    with httpx.Client(base_url=live_api.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        ds = upload_pairs(http, 4)
        ids = [
            http.post("/v1/jobs", json={"base_model": "org/m", "dataset_id": ds["id"]}).json()["id"]
            for _ in range(22)
        ]
        tab = console_for(live_api.url)
        page = tab.page
        tab.open("#/jobs")
        tab.sign_in(KEY)
        expect(page.locator("tbody tr")).to_have_count(20)
        # A job that changes is shown changed, without a reload.
        assert http.post(f"/v1/jobs/{ids[-1]}/cancel").is_success
        row = page.locator("tbody tr", has=page.locator(f"a[href='#/jobs/{ids[-1]}']"))
        expect(row.locator(".badge")).to_have_text("cancelled", timeout=15_000)
        # The older page is in the URL: Back from one of its jobs returns to it.
        page.click("text=Older →")
        expect(page.locator("tbody tr")).to_have_count(2)
        assert "cursor=" in page.url
        page.click(f"a[href='#/jobs/{ids[0]}']")
        expect(page.locator("#page h1")).to_have_text(ids[0])
        page.go_back()
        expect(page.locator("tbody tr")).to_have_count(2)
        page.click("text=← Newest")
        expect(page.locator("tbody tr")).to_have_count(20)
    assert tab.errors == []


def test_pages_follow_what_changes_without_an_event(
    live_api: LiveServer, api_settings: Settings, console_for: Any
) -> None:
    """A running job's progress is written with no event (steps between two logged points):
    its page froze at the last event's step. A list of finished jobs stopped refreshing, so a
    job submitted since (a teammate, the CLI, a policy) never showed without a reload."""
    with httpx.Client(base_url=live_api.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        ds = upload_pairs(http, 4)
        spec = {"base_model": "org/m", "dataset_id": ds["id"]}
        job_id = http.post("/v1/jobs", json=spec).json()["id"]

        def progress(step: int, **more: Any) -> None:
            async def change() -> None:
                store = Store.from_url(api_settings.redis_url)
                await store.update_job(
                    job_id,
                    lambda j: msgspec.structs.replace(
                        j, progress=Progress(step=step, total_steps=120), **more
                    ),
                )
                await store.close()

            # In a thread of its own: Playwright's sync API runs an event loop in this one.
            writer = threading.Thread(target=asyncio.run, args=(change(),))
            writer.start()
            writer.join()

        progress(0, status=JobStatus.running, phase=Phase.training)
        tab = console_for(live_api.url)
        page = tab.page
        tab.open(f"#/jobs/{job_id}")
        tab.sign_in(KEY)
        expect(page.locator("dd", has_text="0 / 120")).to_be_visible()
        progress(77)  # no event
        expect(page.locator("dd", has_text="77 / 120")).to_be_visible(timeout=15_000)

        assert http.post(f"/v1/jobs/{job_id}/cancel").is_success
        progress(77, status=JobStatus.cancelled, finished_at=time.time())
        tab.open("#/jobs")
        expect(page.locator("tbody tr")).to_have_count(1)
        newer = http.post("/v1/jobs", json=spec).json()["id"]
        expect(page.locator(f"a[href='#/jobs/{newer}']")).to_be_visible(timeout=25_000)
    assert tab.errors == []


def test_the_console_drives_a_job_and_a_policy_end_to_end(
    stack: Stack, console_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack.start_worker()
    rows = preference_rows(64)
    tiny = f"file://{stack.settings.models_dir / 'tiny'}"
    tab = console_for(stack.api.url)
    page = tab.page
    tab.open("#/datasets")
    tab.sign_in(KEY)
    expect(page.locator("#page h1")).to_have_text("Datasets")

    # A bad file dropped on the page: the API's validation error, with its line number.
    bad = jsonl(tmp_path / "bad.jsonl", [*rows[:2], {"prompt": "Hi", "chosen": "Hello"}])
    dropped = page.evaluate_handle(
        """(text) => {
            const files = new DataTransfer();
            files.items.add(new File([text], "bad.jsonl", { type: "application/x-ndjson" }));
            return files;
        }""",
        bad.read_text(),
    )
    page.dispatch_event(".drop", "drop", {"dataTransfer": dropped})
    expect(page.locator("#upload-result")).to_contain_text("line 3")
    expect(page.locator("#upload-result")).to_contain_text("rejected")
    tab.shot("datasets-invalid-upload")

    page.fill("input[name=name]", "tiny preferences")
    page.set_input_files("#dataset-file", str(jsonl(tmp_path / "good.jsonl", rows)))
    page.wait_for_url(re.compile(r"#/datasets/ds_"))
    expect(page.locator("#page h1")).to_have_text("tiny preferences")
    expect(page.locator("table tbody tr")).to_have_count(10)  # the preview rows
    tab.shot("dataset")

    # The form: defaults from the contract, the GPU memory estimate, the JSON it POSTs.
    page.click("text=Train on it")
    expect(page.locator("#page h1")).to_have_text("New job")
    expect(page.locator("input[name=beta]")).to_have_value("")  # the method's default
    expect(page.locator("input[name=beta]")).to_have_attribute("placeholder", "not set")
    page.fill("input[name=base_model]", tiny)
    page.fill("input[name=learning_rate]", "0.001")
    page.fill("input[name=max_steps]", str(STEPS))
    page.fill("input[name=lora_r]", "8")
    page.fill("input[name=lora_alpha]", "16")
    page.fill("textarea[name=eval_prompts]", "How was the park?")
    extra = {
        "hyperparameters": {
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_length": 64,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "checkpoint_steps": 100,
            "gradient_checkpointing": False,
        },
        "lora": {"dropout": 0.0},
        "quantization": {"compute_dtype": "float32"},
        "labels": {"from": "console"},
    }
    page.fill("textarea[name=extra]", json.dumps(extra))
    expect(page.locator("#estimate")).to_contain_text("GB")
    posted = json.loads(page.locator("#spec-json").inner_text())
    assert posted["hyperparameters"]["max_steps"] == STEPS and "num_epochs" not in posted
    tab.shot("new-job")
    page.click(".job-form button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/job_"))
    job_id = page.url.rsplit("/", 1)[-1]
    assert stack.job(job_id)["spec"]["hyperparameters"]["max_steps"] == STEPS

    # Queued behind it: a job to cancel, and the feedback that makes a policy fire a run.
    victim = stack.submit(posted)
    _start_policy(stack, rows, tiny)

    # The curves grow while it trains, without a reload.
    page.evaluate("window.sameDocument = true")
    first = tab.wait_for(lambda: tab.points("loss"))
    tab.wait_for(lambda: tab.points("loss") > first)
    assert page.evaluate("window.sameDocument") is True
    assert tab.points("rewards") > 0

    # Meanwhile the other job waits in the queue: cancel it, after a confirmation.
    tab.open(f"#/jobs/{victim['id']}")
    page.click("text=Cancel job…")
    page.click("dialog button[value=cancel]")
    expect(page.locator(".summary .badge")).to_have_text("cancelled")
    assert stack.job(victim["id"])["status"] == "cancelled"

    # Back on the first job: the history and the live stream, merged by step.
    tab.open(f"#/jobs/{job_id}")
    assert stack.wait_done(job_id, timeout=WAIT_MS / 1000)["status"] == "succeeded"
    expect(page.locator(".summary .badge")).to_have_text("succeeded", timeout=10_000)
    assert tab.points("loss") >= STEPS  # every step logged, from the history and the stream
    expect(page.locator(".generation h3")).to_have_text("How was the park?")
    expect(page.locator(".generation .answer.base")).to_be_visible()
    expect(page.locator(".generation .answer.tuned")).to_be_visible()
    expect(page.locator(".artifact code.hash").first).to_have_text(re.compile("^[0-9a-f]{64}$"))
    # Its files, kept in the service's store, come down with the key the page holds.
    with page.expect_download() as saving:
        page.click("button[aria-label='Download adapter_config.json']")
    saved = Path(saving.value.path()).read_bytes()
    stored = stack.store_dir / "jobs" / job_id / "artifacts" / "adapter" / "adapter_config.json"
    assert saving.value.suggested_filename == "adapter_config.json"
    assert saved == stored.read_bytes()
    points = tab.points("loss")
    page.check("#smoothing")  # the same points, drawn smoothed
    assert tab.points("loss") == points
    page.uncheck("#smoothing")
    tab.shot("job-full")
    page.set_viewport_size({"width": 1280, "height": 1100})
    tab.shot("job", full_page=False)  # the README's (make screenshot): status and first curves
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(300)  # the charts follow the resize
    assert page.evaluate(OVERFLOW) == []
    tab.shot("job-phone")
    page.set_viewport_size({"width": 1280, "height": 800})

    tab.open("#/jobs?status=cancelled")
    expect(page.locator("tbody tr")).to_have_count(1)
    tab.open("#/jobs?label=from%3Dconsole")  # the form's job and the cancelled one
    expect(page.locator("tbody tr")).to_have_count(2)
    tab.open("#/jobs")
    expect(page.locator(f"a[href='#/jobs/{job_id}']")).to_be_visible()
    tab.shot("jobs")

    # The policy's run and its gate decision, with the numbers compared.
    run = _decided_run(stack)
    tab.open("#/retraining")
    decision = page.locator(".policy tr.run .decision .badge").first
    expect(decision).to_have_text(run["decision"])
    check = run["gate"][0]
    expect(page.locator(".policy .checks li").first).to_contain_text(check["metric"])
    expect(page.locator(".policy").first).to_contain_text("support")
    tab.shot("retraining")

    # Every page reads on a phone without scrolling sideways (tables scroll in their box).
    page.set_viewport_size({"width": 390, "height": 844})
    for fragment, title in (
        ("#/jobs", "Jobs"),
        ("#/datasets", "Datasets"),
        ("#/new", "New job"),
        ("#/retraining", "Retraining"),
    ):
        tab.open(fragment)
        expect(page.locator("#page h1")).to_have_text(title)
        assert page.evaluate(OVERFLOW) == [], fragment
    tab.shot("retraining-phone")

    # Nothing carried the key but the Authorization header.
    assert tab.urls and not [u for u in tab.urls if KEY in u]
    assert KEY not in stack.logs()
    assert KEY not in caplog.text
    assert page.context.cookies() == []
    assert tab.errors == []


def _start_policy(stack: Stack, rows: list[dict[str, Any]], tiny: str) -> None:
    template = {
        "base_model": tiny,
        "hyperparameters": {
            "learning_rate": 1e-3,
            "max_steps": 4,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_length": 64,
            "warmup_ratio": 0.0,
            "checkpoint_steps": 50,
            "gradient_checkpointing": False,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"bits": 4, "compute_dtype": "float32"},
    }
    acc = "eval_rewards/accuracies"
    body = {
        "stream": "support",
        "template": template,
        "trigger": {"min_new_pairs": 24},
        "gate": {"at_least": {acc: 0.75}},
        "holdout_fraction": 0.25,
    }
    assert stack.http.put("/v1/policies/assistant", json=body).status_code == 200
    events = [{"id": f"pair-{i}", **rows[i]} for i in range(24)]
    resp = stack.http.post("/v1/feedback/support", json={"events": events})
    assert resp.status_code == 200, resp.text


def _decided_run(stack: Stack, timeout: float = WAIT_MS / 1000) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = stack.http.get("/v1/policies/assistant").json()["runs"]
        if runs and runs[0]["decision"]:
            return dict(runs[0])
        time.sleep(0.25)
    raise AssertionError(f"no gate decision\n--- logs ---\n{stack.logs()[-6000:]}")
