"""The typer app, its global options, and how every client verb fails: one message, an exit code.

The API key comes from --api-key, FTUNE_API_KEY or the `.ftune/api_key` that `ftune dev`
writes, and is never printed.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.markup import escape

from service.cli.output import err
from service.client import ApiError, Client, InvalidId, Unreachable
from service.contract import STREAM_NAME

DEFAULT_URL = "http://127.0.0.1:8000"
STATE_DIR = Path(".ftune")

AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]
P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="ftune",
    help="Self-hosted QLoRA fine-tuning (DPO, SFT, KTO, ORPO, SimPO): datasets in, adapters out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataclass
class Options:
    url: str
    api_key: str | None

    def client(self) -> Client:
        return Client(self.url, self.api_key)


class Fail(Exception):
    """Stop with this message and exit code (raised by commands, printed by `handled`)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def read_key_file(state_dir: Path = STATE_DIR) -> str | None:
    try:
        return (state_dir / "api_key").read_text().strip() or None
    except OSError:
        return None


def report_api_error(exc: ApiError) -> None:
    err.print(f"[red]error:[/] {escape(str(exc))}")
    for line in exc.error_lines():
        if line not in exc.detail:  # the detail often quotes the first error already
            err.print(f"  {escape(line)}")
    if exc.status == 401:
        err.print(
            "  pass --api-key or set FTUNE_API_KEY (`ftune dev` writes one to .ftune/api_key)"
        )


def report_unreachable(exc: Unreachable) -> None:
    err.print(
        f"[red]error:[/] cannot reach the ftune API at {escape(exc.url)}: "
        f"is `ftune dev` running? ({escape(exc.reason)})"
    )


def handled(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the client's exceptions into a message and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Unreachable as exc:
            report_unreachable(exc)
        except ApiError as exc:
            report_api_error(exc)
        except Fail as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(exc.code) from None
        except InvalidId as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
        raise typer.Exit(1)

    return wrapper


def options(ctx: typer.Context) -> Options:
    obj = ctx.find_root().obj
    assert isinstance(obj, Options)
    return obj


def check_name(value: str) -> str:
    """A stream or policy name as the API takes it, checked before any request is made."""
    if not re.fullmatch(STREAM_NAME, value):
        raise typer.BadParameter(
            f"{value!r} is not a valid name: letters, digits, '_', '.' and '-', starting with "
            "a letter or digit, at most 63 characters"
        )
    return value


def load_object(path: Path, what: str, *, yaml_too: bool = False) -> dict[str, Any]:
    """A spec file's top-level object; JSON, or YAML too when `yaml_too` and the file is
    named .yaml/.yml. Malformed files fail with the line, before anything is sent."""
    if yaml_too and path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise Fail(f"{path} is not valid YAML: {where}{problem}", 2) from None
        kind = "a YAML mapping"
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise Fail(f"{path} is not valid JSON: line {exc.lineno}: {exc.msg}", 2) from None
        kind = "a JSON object"
    if not isinstance(data, dict):
        raise Fail(f"{path} must hold {kind} ({what})", 2)
    return data


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option("--url", envvar="FTUNE_URL", help="The ftune API's base URL.")
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="FTUNE_API_KEY",
            help="API key (default: .ftune/api_key, written by `ftune dev`).",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = Options(url=_base_url(url), api_key=api_key or read_key_file())


def _base_url(url: str) -> str:
    """The API's base URL as given, or refused saying what is wanted: a scheme is needed, and
    the `/v1` an OpenAI client's base_url ends with is the CLI's to add."""
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(
            f"{url!r} has no scheme: give http://HOST:PORT (e.g. {DEFAULT_URL})", param_hint="--url"
        )
    return url.rstrip("/").removesuffix("/v1")
