"""Running the service: `ftune api`, `ftune worker`, `ftune scheduler`, `ftune dev`, `ftune demo`.

Heavy imports (uvicorn, the training stack, the dev stack) happen inside the commands, so the
client verbs start fast and work without the worker extra.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.markup import escape

from service.cli.app import STATE_DIR, app, handled, options
from service.cli.output import err, out

if TYPE_CHECKING:
    from service.settings import Settings


def service_settings() -> Settings:
    """The FTUNE_* settings and the tenants file (the API, the scheduler and the workers all
    read it), checked before anything listens or starts: every bad variable in one message and
    exit code 2, instead of a traceback from inside uvicorn or the worker."""
    from service.settings import Settings, SettingsError
    from service.tenants import load

    try:
        settings = Settings.from_env()
        load(settings)
    except SettingsError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    return settings


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes.")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the HTTP API (configured by FTUNE_* environment variables)."""
    import uvicorn

    from service.logs import uvicorn_log_config

    settings = service_settings()
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=uvicorn_log_config(
            settings.log_level, secrets=settings.secret_values(), fmt=settings.log_format
        ),
        proxy_headers=True,
        timeout_graceful_shutdown=settings.api_grace_seconds,
    )


@app.command()
def worker(
    burst: Annotated[
        bool,
        typer.Option(
            help="Train one job, then exit (a KEDA ScaledJob's pod); waits while the queue "
            "holds jobs, exits at once when it is empty."
        ),
    ] = False,
) -> None:
    """Run one training worker (needs the `worker` extra: torch, transformers, trl ...)."""
    try:
        from gpu_worker.worker import run_worker
    except ImportError as exc:
        err.print(
            f"[red]error:[/] the worker needs the training stack ({exc}); "
            "install it with: pip install 'ftune[worker]'"
        )
        raise typer.Exit(1) from None
    from service import webhooks

    # The worker knows no feature: the webhook staged with a job's end is registered here.
    run_worker(service_settings(), on_terminal=(webhooks.stage_webhook,), burst=burst)


@app.command()
def scheduler() -> None:
    """Run the scheduler role alone (lease reaper, retraining policies), for deployments that
    set FTUNE_SCHEDULER_ENABLED=false on the API; one leader at a time however many run."""
    from service.scheduler import run_scheduler

    run_scheduler(service_settings())


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Interface the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the API listens on.")] = 8000,
    state_dir: Annotated[
        Path, typer.Option(help="Where Redis data, the store, models and the key live.")
    ] = STATE_DIR,
) -> None:
    """Start Redis, the API and one worker on this machine; Ctrl-C stops them."""
    from service.dev.stack import DevStack, StackError

    service_settings()  # the API and the worker inherit our environment
    stack = DevStack(state_dir, port, host=host)
    with _stop_on_sigterm():
        try:
            with stack:
                out.print(f"ftune is running at [bold]{stack.url}[/] (docs: {stack.url}/docs)")
                out.print(f"Console: [bold]{stack.url}/ui/[/] (sign in with the API key)")
                if stack.key_created:
                    out.print(f"API key (shown once; also in {state_dir / 'api_key'}):")
                    out.print(f"  {stack.api_key}", soft_wrap=True)
                else:
                    out.print(f"API key: in {state_dir / 'api_key'} (the CLI reads it from there)")
                out.print(f"Worker metrics: {stack.worker_metrics_url}")
                out.print(f"State: {stack.root}. Press Ctrl-C to stop.")
                while True:
                    stack.check()
                    time.sleep(0.5)
        except (StackError, RuntimeError) as exc:  # LocalRedis raises RuntimeError
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            out.print("stopping worker, API and Redis ...")
    out.print("stopped")


@app.command()
@handled
def demo(
    ctx: typer.Context,
    state_dir: Annotated[
        Path, typer.Option(help="Where the dev stack keeps its state and models.")
    ] = STATE_DIR,
    max_steps: Annotated[
        int | None, typer.Option(help="Training steps (default: the demo's tuned value).")
    ] = None,
) -> None:
    """Fine-tune SmolLM2-135M on a sample dataset end to end and show before/after answers."""
    from service.cli.demo import run_demo

    opts = options(ctx)
    code = run_demo(opts.url, opts.api_key, state_dir=state_dir, max_steps=max_steps)
    raise typer.Exit(code)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so `with DevStack` unwinds and stops the children; and
    Ctrl-C stops them even when `ftune dev` was started with SIGINT ignored (a shell script's
    background job, `nohup`): Python would leave it ignored, and the stack would never stop."""

    def raise_interrupt(signum: int, frame: object) -> NoReturn:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
