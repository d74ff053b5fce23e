"""What every benchmark shares: the service as separate processes, samplers, result rows.

Everything runs on loopback: a Redis from `service.dev.localredis`, the API under uvicorn in its own
process (so its memory and CPU are its own), and workers as `python -m service.cli worker`
processes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx
import psutil

from service.dev.localredis import LocalRedis, free_port
from service.settings import Principal, write_api_keys

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
API_KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FTUNE_LOG_LEVEL": "WARNING",
    "FTUNE_WORKER_METRICS_PORT": "0",
    "PYTHONPATH": str(ROOT),
}


# -- results -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure beside its baseline, measured in the same run."""

    what: str
    ours: float
    baseline: float
    unit: str
    baseline_what: str
    better: Literal["lower", "higher", "match"] = "lower"
    """Which way is better; `match`: an estimate, good within `tolerance` of the baseline."""
    why: str = ""
    """When ours is worse than the baseline: why, and what would fix it."""
    tolerance: float = 0.10
    row: str = ""
    column: str = ""
    """With both set on every figure, a section renders as one grid: rows by columns."""

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline else float("nan")

    @property
    def worse(self) -> bool:
        if self.better == "match":
            return abs(self.ratio - 1) > self.tolerance
        return self.ours > self.baseline if self.better == "lower" else self.ours < self.baseline


@dataclass
class Section:
    title: str
    command: str
    figures: list[Figure] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def _grid(self) -> list[str]:
        rows = list(dict.fromkeys(f.row for f in self.figures))
        columns = list(dict.fromkeys(f.column for f in self.figures))
        cells = {(f.row, f.column): f for f in self.figures}
        lines = [
            "| | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for row in rows:
            out = []
            for column in columns:
                f = cells.get((row, column))
                out.append(
                    f"{fmt(f.ours)} / {fmt(f.baseline)} {f.unit} ({f.ratio:.2f})" if f else ""
                )
            lines.append(f"| {row} | " + " | ".join(out) + " |")
        baselines = "; ".join(dict.fromkeys(f.baseline_what for f in self.figures))
        return [
            *lines,
            "",
            f"Each cell: ours / baseline (ours / baseline). Baseline: {baselines}.",
            "",
        ]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", f"`{self.command}` ({self.seconds:.0f} s)", ""]
        if self.figures and all(f.row and f.column for f in self.figures):
            lines += self._grid()
        elif self.figures:
            lines += [
                "| figure | ours | baseline | ours / baseline |",
                "|---|---:|---:|---:|",
            ]
            for f in self.figures:
                lines.append(
                    f"| {f.what} | {fmt(f.ours)} {f.unit} | {fmt(f.baseline)} {f.unit} "
                    f"({f.baseline_what}) | {f.ratio:.2f} |"
                )
            lines.append("")
        reasons: dict[str, list[str]] = {}
        for f in self.figures:
            if f.worse:
                reasons.setdefault(f.why or "(no reason given)", []).append(f.what)
        for why, whats in reasons.items():
            where = "; ".join(f"*{w}*" for w in dict.fromkeys(whats))
            lines.append(f"- worse than the baseline: {where}. Why, and what would fix it: {why}")
        lines += [f"- {fact}" for fact in self.facts]
        return "\n".join(lines).rstrip() + "\n"


def fmt(value: float) -> str:
    if value != value:  # nan
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> str:
    """One line saying where the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 1024**3
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, no GPU, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


# -- processes -----------------------------------------------------------------------------------


class RssSampler:
    """Peak resident memory of a process (and its children) sampled every `interval` seconds.

    Its children are looked up every `CHILDREN_EVERY` seconds, not at each sample: psutil
    finds them by reading every process's /proc entry, and doing that every 10 ms took the
    measuring process a core's worth of reads beside the upload it measured (a 1 GB upload
    went from 3.8-4.4 s to 4.7-4.9 s with it)."""

    CHILDREN_EVERY = 0.25
    """The children measured (a validation range, a Parquet reader) live for seconds."""

    def __init__(self, pid: int, interval: float = 0.01, children: bool = False) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.children = children
        self.peak = 0
        self.first = 0
        self._known: list[psutil.Process] = []
        self._looked = -math.inf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self.process.memory_info().rss
        if self.children:
            now = time.monotonic()
            if now - self._looked >= self.CHILDREN_EVERY:
                self._known, self._looked = self.process.children(recursive=True), now
            for child in self._known:
                with suppress(psutil.Error):
                    total += child.memory_info().rss
        return int(total)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._rss()
            except psutil.Error:
                return
            self.first = self.first or rss
            self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.first = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL: only for processes this run started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def wait_http(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{tail(log)}")


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


HTTP_PARSER = os.environ.get("FTUNE_BENCH_HTTP", "auto")
"""uvicorn's `--http` for every server of a run: `auto` (httptools when installed, as deployed)
or `h11`, the parser the issue 17 figures were first measured with."""


def uvicorn_command(factory: str, port: int) -> list[str]:
    """The one server configuration both our API and the bare baseline run under."""
    return [
        PY,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--http",
        HTTP_PARSER,
        "--log-level",
        "warning",
        "--no-access-log",
    ]


class Stack:
    """Redis, the API (uvicorn, one process) and `workers` worker processes under `root`."""

    def __init__(self, root: Path, *, workers: int = 0, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.n_workers = workers
        self.extra_env = env or {}
        self.redis = LocalRedis()
        self.models_dir = root / "models"
        self.store_dir = root / "store"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.http = httpx.Client(base_url=self.url, headers=AUTH, timeout=120)

    def env(self) -> dict[str, str]:
        keys = self.root / "keys.json"
        if not keys.exists():
            write_api_keys(keys, {API_KEY: Principal("bench")})
        return {
            **os.environ,
            **QUIET_ENV,
            "FTUNE_REDIS_URL": self.redis.url,
            "FTUNE_STORE_URL": self.store_dir.as_uri(),
            "FTUNE_MODELS_DIR": str(self.models_dir),
            "FTUNE_WORK_DIR": str(self.root / "work"),
            "FTUNE_API_KEYS_FILE": str(keys),
            "FTUNE_LOG_FORMAT": "text",
            **self.extra_env,
        }

    def _log(self, name: str) -> IO[bytes]:
        handle = (self.root / f"{name}.log").open("wb")
        self._logs.append(handle)
        return handle

    def start(self) -> Stack:
        self.root.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(exist_ok=True)
        self.redis.start()
        self.api = subprocess.Popen(
            uvicorn_command("service.api.app:create_app", self.port),
            env=self.env(),
            cwd=ROOT,
            stdout=self._log("api"),
            stderr=subprocess.STDOUT,
        )
        wait_http(self.url + "/healthz", self.api, self.root / "api.log")
        for _ in range(self.n_workers):
            self.start_worker()
        return self

    def start_worker(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [PY, "-m", "service.cli", "worker"],
            env=self.env(),
            cwd=ROOT,
            stdout=self._log(f"worker-{len(self.workers)}"),
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def close(self) -> None:
        self.http.close()
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            stop_process(proc)
        self.redis.stop()
        for handle in self._logs:
            handle.close()

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        return "\n".join(tail(p) for p in sorted(self.root.glob("*.log")))

    # -- the API as a client sees it -------------------------------------------------------------

    def upload_rows(self, rows: Sequence[dict[str, Any]], name: str = "bench") -> dict[str, Any]:
        body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        resp = self.http.post(
            "/v1/datasets",
            params={"name": name},
            content=body,
            headers={"Content-Type": "application/x-ndjson"},
        )
        resp.raise_for_status()
        return dict(resp.json())

    def unloadable_model(self) -> str:
        """A base model the API accepts (its directory and config.json are in the models
        dir) but no worker can load (no weights, no tokenizer): its jobs are claimed, then
        fail in `preparing` once the training process has imported the training stack."""
        path = self.models_dir / "unloadable"
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text('{"model_type": "llama"}')
        return path.as_uri()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post("/v1/jobs", json=spec)
        if resp.status_code != 201:
            raise RuntimeError(f"submit answered {resp.status_code}: {resp.text}")
        return dict(resp.json())

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/jobs/{job_id}")
        resp.raise_for_status()
        return dict(resp.json())

    def wait(self, job_id: str, until: Any, timeout: float = 600, poll: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(poll)
        raise RuntimeError(f"job {job_id} timed out: {job}\n{self.logs()}")

    def wait_done(self, job_id: str, timeout: float = 600, poll: float = 0.25) -> dict[str, Any]:
        terminal = {"succeeded", "failed", "cancelled"}
        job: dict[str, Any] = self.wait(job_id, lambda j: j["status"] in terminal, timeout, poll)
        return job


@contextmanager
def scratch(name: str, keep: bool = False) -> Iterator[Path]:
    """A fresh directory for one benchmark, removed afterwards unless `keep`."""
    base = Path(os.environ.get("FTUNE_BENCH_DIR") or Path(tempfile.gettempdir()) / "ftune-bench")
    path = base / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def run_json(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800) -> Any:
    """Run a helper process that prints one JSON object as its last line; return it."""
    proc = subprocess.run(
        args,
        env={**os.environ, **QUIET_ENV, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:4])} failed ({proc.returncode}):\n{proc.stderr.decode()[-4000:]}"
        )
    lines = [line for line in proc.stdout.decode().splitlines() if line.strip()]
    return json.loads(lines[-1])


def build_model(path: Path) -> None:
    """The tests' tiny Llama and tokenizer, written to `path` by a separate process."""
    subprocess.run(
        [
            PY,
            "-c",
            "import sys; from pathlib import Path; "
            "from tests.fixtures.tiny_model import build_tiny_model; "
            "build_tiny_model(Path(sys.argv[1]))",
            str(path),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, **QUIET_ENV},
        cwd=ROOT,
    )


def run_plain_trl(
    spec: dict[str, Any],
    model_dir: Path,
    rows: Path,
    eval_rows: Path | None,
    out: Path,
    *,
    fp32_adapter: bool,
    env: dict[str, str] | None = None,
) -> Any:
    """bench/plain_trl.py on `spec` as the CPU worker runs it (defaults filled in, adapted)."""
    import msgspec

    from gpu_worker.trainer import adapt_to_device
    from service.contract import JobSpec

    worker_spec, _ = adapt_to_device(msgspec.convert(spec, JobSpec), "cpu")
    out.mkdir(parents=True, exist_ok=True)
    config = out / "plain-trl.json"
    config.write_text(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "rows": str(rows),
                "eval_rows": str(eval_rows) if eval_rows else None,
                "out_dir": str(out),
                "spec": msgspec.to_builtins(worker_spec),
                "fp32_adapter": fp32_adapter,
            }
        )
    )
    return run_json([PY, "-m", "bench.plain_trl", str(config)], env=env)
