"""The `ftune` command: run the service (api, worker, dev, demo) and talk to it (datasets, jobs,
feedback, policies).

Client verbs reach the API over HTTP with `Client`; every failure ends in one readable
message on stderr and a non-zero exit code, never a traceback. One module per seam: `app`
(the typer app, global options, errors), `output` (printing), `serve`, `datasets`, `jobs`,
`watch`, `feedback`, `policies`. Importing a command module registers its commands.
"""

from __future__ import annotations

from service.cli import datasets, feedback, jobs, policies, serve  # noqa: F401  (registration)
from service.cli.app import app, read_key_file
from service.cli.watch import watch_job

__all__ = ["app", "main", "read_key_file", "watch_job"]


def main() -> None:
    app()
