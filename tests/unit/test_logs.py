"""JSON logs: parseable lines, the job they concern, and no secrets, even in tracebacks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from service import logs
from service.logs import bind, configure_logging, log_context, update_context

HF = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"
AWS = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
WEBHOOK = "whsec_tenant_secret_value_42"


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """Our handler on the root logger, writing to a buffer; the root restored afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream = io.StringIO()
    configure_logging("DEBUG", secrets=[WEBHOOK, AWS, ""], stream=stream)
    yield stream
    for handler in [h for h in root.handlers if h not in saved[1]]:
        root.removeHandler(handler)
    root.setLevel(saved[0])
    logs.bind(job_id=None, tenant=None, phase=None)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line(out: io.StringIO) -> None:
    log = logging.getLogger("ftune.test")
    log.info("job %s reached step %d", "job_1", 7)
    log.warning("two\nlines", extra={"step": 3, "color_message": "\x1b[36mtwo\x1b[0m"})
    first, second = lines(out)
    assert first["msg"] == "job job_1 reached step 7"
    assert first["level"] == "INFO" and first["logger"] == "ftune.test"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert second["msg"] == "two\nlines" and second["step"] == 3
    assert "color_message" not in second  # uvicorn's coloured copy of the message


@pytest.mark.parametrize(
    ("message", "kept"),
    [
        (f"pushing with token {HF}", "pushing with token "),
        ("Authorization: Bearer sk-live-abc.def-123", "Authorization: "),
        ("headers {'authorization': 'Bearer abc123456'}", "headers {'authorization': "),
        ("got bearer abcdefghijklmnop from the client", " from the client"),
        (f"env AWS_SECRET_ACCESS_KEY={AWS} AWS_REGION=us-east-1", "AWS_REGION=us-east-1"),
        (f"aws_secret_access_key = {AWS}", "aws_secret_access_key = "),
        ("FTUNE_HF_TOKEN_ORG=abc123def456 loaded", " loaded"),
        ('{"password": "hunter2hunter2", "user": "x"}', '"user": "x"'),
        ("access key AKIAIOSFODNN7EXAMPLE in use", "access key "),
        ("redis://:s3cr3tpass@redis:6379/0 unreachable", "redis://:[REDACTED]@redis:6379/0"),
        (f"signing with {WEBHOOK}!", "signing with [REDACTED]!"),
        (f"the AWS secret is {AWS}", "the AWS secret is [REDACTED]"),
    ],
)
def test_secrets_are_redacted(out: io.StringIO, message: str, kept: str) -> None:
    logging.getLogger("ftune.test").info(message)
    [line] = lines(out)
    assert "[REDACTED]" in line["msg"] and kept in line["msg"]
    for secret in (HF, AWS, WEBHOOK, "sk-live", "abc123456", "hunter2", "AKIAIOSF", "s3cr3t"):
        assert secret not in line["msg"]


def test_ordinary_words_that_look_like_names_are_kept(out: io.StringIO) -> None:
    text = "tokens_per_second=812.5 max_new_tokens: 64 num_tokens=1024 the tokenizer is ready"
    logging.getLogger("ftune.test").info(text)
    assert lines(out)[0]["msg"] == text


def test_secrets_in_arguments_extras_and_tracebacks(out: io.StringIO) -> None:
    log = logging.getLogger("ftune.worker")
    log.info("uploading with %s", HF, extra={"url": f"https://u:{WEBHOOK}@hub/x"})
    try:
        raise RuntimeError(f"Hub refused token {HF} (401)")
    except RuntimeError:
        log.exception("upload failed for %s", "org/model")
    info, error = lines(out)
    assert info["msg"] == "uploading with [REDACTED]"
    assert info["url"] == "https://u:[REDACTED]@hub/x"
    assert error["msg"] == "upload failed for org/model" and error["level"] == "ERROR"
    assert (
        "Traceback" in error["exc"]
        and "RuntimeError: Hub refused token [REDACTED]" in (error["exc"])
    )
    assert HF not in out.getvalue() and WEBHOOK not in out.getvalue()


def test_context_fields_scoped_per_block_and_per_task(out: io.StringIO) -> None:
    log = logging.getLogger("ftune.api")

    async def request(job: str, tenant: str) -> None:
        with log_context(job_id=job, tenant=tenant):
            await asyncio.sleep(0.01)  # interleave with the other task
            log.info("handled")

    async def both() -> None:
        await asyncio.gather(request("job_a", "alice"), request("job_b", "bob"))

    asyncio.run(both())
    with log_context(job_id="job_c", phase="training"):
        with log_context(phase=None):
            log.info("phase cleared")
        log.info("inner")
    log.info("outside")
    a, b, cleared, inner, outside = [x for x in lines(out) if x["logger"] == "ftune.api"]
    assert {(a["job_id"], a["tenant"]), (b["job_id"], b["tenant"])} == {
        ("job_a", "alice"),
        ("job_b", "bob"),
    }
    assert cleared["job_id"] == "job_c" and "phase" not in cleared
    assert inner["phase"] == "training"
    assert "job_id" not in outside


def test_bind_and_update_context(out: io.StringIO) -> None:
    log = logging.getLogger("ftune.worker")
    bind(job_id="job_1", tenant="alice")

    def in_a_thread_later() -> None:
        update_context(phase="merging")
        log.info("merging")

    import threading

    thread = threading.Thread(target=in_a_thread_later)
    thread.start()
    thread.join()
    log.info("explicit wins", extra={"job_id": "job_2"})
    merging, explicit = lines(out)
    assert merging["job_id"] == "job_1" and merging["phase"] == "merging"
    assert explicit["job_id"] == "job_2" and "phase" not in explicit


def test_warnings_and_text_format() -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream = io.StringIO()
    try:
        configure_logging("info", fmt="text", secrets=[WEBHOOK], stream=stream)
        with log_context(job_id="job_9"):
            logging.getLogger("ftune.cli").info("sent %s", WEBHOOK)
            warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    finally:
        for handler in [h for h in root.handlers if h not in saved[1]]:
            root.removeHandler(handler)
        root.setLevel(saved[0])
        logging.captureWarnings(False)
    first, second = stream.getvalue().splitlines()[:2]
    assert first.endswith("ftune.cli sent [REDACTED] job_id=job_9")
    assert "py.warnings" in second and "deprecated thing" in second
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        configure_logging("LOUD")


def test_a_spawned_process_configures_and_binds_itself() -> None:
    """The training child is a fresh interpreter: it logs JSON with its job only after it
    calls configure_logging and bind, as the worker's child entry point does."""
    code = textwrap.dedent(
        f"""
        import logging
        from service.logs import bind, configure_logging
        configure_logging("INFO", secrets=[{WEBHOOK!r}])
        bind(job_id="job_7", tenant="alice", phase="training")
        logging.getLogger("ftune.child").info("step 3 with %s", {WEBHOOK!r})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    [line] = [json.loads(x) for x in done.stderr.splitlines()]
    assert line["msg"] == "step 3 with [REDACTED]"
    assert (line["job_id"], line["tenant"], line["phase"]) == ("job_7", "alice", "training")


def test_redact_for_text_stored_elsewhere(out: io.StringIO) -> None:
    assert logs.redact(f"HTTP 401 for {WEBHOOK}") == "HTTP 401 for [REDACTED]"
