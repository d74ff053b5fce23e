"""Publish a finished adapter or merged model: manifest, model card, then Hub, S3 or the store.

Every artifact explains itself: ``manifest.json`` lists each file with its sha256 and size, and
``README.md`` is a Hugging Face model card (front matter the Hub indexes, then base model,
dataset, hyperparameters, LoRA and quantization settings, final metrics and how to load it).

Destinations (``job.spec.output.destination``):

- ``store``: the service's own blob store, under ``jobs/{job_id}/artifacts/{kind}/``;
- ``s3``: ``{uri}/{kind}/`` with the workers' S3 credentials (multipart for big files);
- ``hub``: ``repo_id`` with the workers' HF token (``credentials`` names one), created if
  missing. The adapter goes to the repo root, unless ``artifacts`` is ``both``: then the merged
  model is at the root and the adapter under ``adapter/``.

Any failure is a :class:`PublishError` whose message says what to fix and never holds a token
or an S3 key: they are scrubbed, and the original exception is not chained.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from service.blobs import BlobStore, open_store
from service.contract import (
    METHOD_FIELDS,
    Artifact,
    ArtifactKind,
    DataReport,
    HubDestination,
    Job,
    JobSpec,
    S3Destination,
    StoreDestination,
)
from service.settings import Settings


class PublishError(Exception):
    """The artifact could not be written to its destination; the message says what to fix."""


MANIFEST = "manifest.json"
MODEL_CARD = "README.md"
MANIFEST_FORMAT = "ftune.manifest/1"
ADAPTER_SUBDIR = "adapter"
"""Where the adapter goes in a Hub repo that also holds the merged model."""


def publish(
    src_dir: Path,
    *,
    kind: ArtifactKind,
    job: Job,
    settings: Settings,
    store: BlobStore,
    final_metrics: dict[str, float],
) -> Artifact:
    """Write the manifest and model card into ``src_dir``, upload it, describe where it went."""
    if not src_dir.is_dir() or not any(p.is_file() for p in src_dir.rglob("*")):
        raise PublishError(f"nothing to publish: {src_dir} is missing or empty")
    dest = job.spec.output.destination
    location = _Location.of(dest, kind=kind, job=job, store=store)
    try:
        if kind == "adapter":
            _point_adapter_at_hub_base(src_dir, job.spec)
        write_model_card(
            src_dir, kind=kind, job=job, final_metrics=final_metrics, location=location
        )
        manifest = write_manifest(src_dir, kind=kind, job=job)
        sha256 = {rel: entry["sha256"] for rel, entry in manifest["files"].items()}
        sha256[MANIFEST] = _sha256(src_dir / MANIFEST)
    except (OSError, ValueError) as exc:
        raise PublishError(
            f"cannot write the model card and manifest into {src_dir}: {exc}; the worker's "
            "work dir (FTUNE_WORK_DIR) must be writable"
        ) from None

    try:
        if isinstance(dest, HubDestination):
            _upload_hub(src_dir, dest, kind=kind, job=job, settings=settings, location=location)
        else:
            target = store if isinstance(dest, StoreDestination) else None
            uploaded = _upload_blobs(src_dir, location, target, settings)
            if uploaded != sha256:
                changed = sorted(set(uploaded.items()) ^ set(sha256.items()))
                raise PublishError(
                    f"files in {src_dir} changed while they were uploaded ({changed[0][0]}, ...); "
                    "nothing else may write to the output folder during publishing"
                )
    except PublishError as exc:
        raise PublishError(_scrub(str(exc), _secrets(settings, location))) from None
    except Exception as exc:
        message = _explain(exc, location, settings)
        raise PublishError(_scrub(message, _secrets(settings, location))) from None

    files = sorted(sha256)
    sizes = {rel: (src_dir / rel).stat().st_size for rel in files}
    return Artifact(kind=kind, uri=location.uri, files=files, sha256=sha256, sizes=sizes)


# --------------------------------------------------------------------------- where it goes


class _Location(msgspec.Struct, frozen=True, kw_only=True):
    """The resolved destination of one artifact."""

    type: Literal["hub", "s3", "store"]
    uri: str
    """What the Artifact records: ``hf://org/name[@rev][/adapter]``, ``s3://b/p/adapter/``..."""
    base: str = ""
    """Hub: repo_id; S3: the destination uri; store: the store url."""
    path: str = ""
    """Hub: the folder in the repo ("" = root); blob stores: the key prefix below ``base``."""
    revision: str = "main"
    token_name: str = ""

    @classmethod
    def of(cls, dest: Any, *, kind: ArtifactKind, job: Job, store: BlobStore) -> _Location:
        if isinstance(dest, HubDestination):
            path = "" if kind == "merged" or job.spec.output.artifacts == "adapter" else "adapter"
            uri = f"hf://{dest.repo_id}"
            if dest.revision != "main":
                uri += f"@{dest.revision}"
            if path:
                uri += f"/{path}"
            return cls(
                type="hub",
                uri=uri,
                base=dest.repo_id,
                path=path,
                revision=dest.revision,
                token_name=dest.credentials or "",
            )
        if isinstance(dest, S3Destination):
            base = dest.uri.rstrip("/")
            return cls(type="s3", uri=f"{base}/{kind}/", base=base, path=f"{kind}/")
        if isinstance(dest, StoreDestination):
            prefix = f"jobs/{job.id}/artifacts/{kind}/"
            return cls(type="store", uri=f"{store.url}/{prefix}", base=store.url, path=prefix)
        raise PublishError(f"unknown output destination {dest!r}")

    @property
    def token_variable(self) -> str:
        return token_variable(self.token_name)


def token_variable(name: str) -> str:
    """The environment variable a named Hub token comes from ("" names HF_TOKEN; a '-' of
    the name is a '_' there, as a variable name cannot hold one)."""
    return f"FTUNE_HF_TOKEN_{name.upper().replace('-', '_')}" if name else "HF_TOKEN"


def hub_token(dest: HubDestination, settings: Settings) -> str:
    """The token a Hub destination publishes with (its `credentials`, else HF_TOKEN);
    PublishError saying which variable to set when this process has none. The worker asks
    before it trains, not only when it uploads."""
    name = dest.credentials or ""
    token = settings.hf_tokens.get(name) or settings.hf_tokens.get(name.replace("-", "_"))
    if token:
        return token
    if name:
        raise PublishError(
            f"no HF token named {name!r} on this worker: set {token_variable(name)} in "
            f"the workers' environment (a token with write access to {dest.repo_id}), or fix "
            "output.destination.credentials"
        )
    raise PublishError(
        "no HF token on this worker: set HF_TOKEN in the workers' environment (a token with "
        f"write access to {dest.repo_id}), or name another token in "
        "output.destination.credentials"
    )


def _upload_hub(
    src_dir: Path,
    dest: HubDestination,
    *,
    kind: ArtifactKind,
    job: Job,
    settings: Settings,
    location: _Location,
) -> None:
    token = hub_token(dest, settings)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=settings.hf_endpoint, token=token, library_name="ftune")
    # Look before creating: a token may write to an existing repo without being allowed to
    # create repos in the namespace (fine-grained tokens), and the visibility must be checked.
    try:
        private: bool | None = api.model_info(dest.repo_id).private
    except RepositoryNotFoundError:
        api.create_repo(dest.repo_id, private=dest.private, exist_ok=True)
        private = dest.private
    if dest.private and not private:
        raise PublishError(
            f"the Hub repo {dest.repo_id} already exists and is public, but the job asks for a "
            "private repo: make the repo private, pick another repo_id, or set private to false"
        )
    if dest.revision != "main":
        api.create_branch(dest.repo_id, branch=dest.revision, exist_ok=True)
    api.upload_folder(
        repo_id=dest.repo_id,
        folder_path=src_dir,
        path_in_repo=location.path or None,
        revision=dest.revision,
        commit_message=f"ftune job {job.id}: upload {kind}",
        commit_description=(
            f"{kind} from DPO fine-tuning of {job.spec.base_model} on dataset "
            f"sha256:{job.dataset.sha256} ({job.dataset.rows} rows), ftune job {job.id}."
        ),
    )


def _upload_blobs(
    src_dir: Path, location: _Location, store: BlobStore | None, settings: Settings
) -> dict[str, str]:
    """Upload to a blob store; then drop keys under the prefix the artifact does not have.

    So the prefix mirrors the artifact exactly, also when an earlier attempt left other files.
    Stale keys go only after the new files are all in place.
    """
    owned = store is None
    target = store or open_store(location.base, endpoint_url=settings.s3_endpoint_url)
    try:
        uploaded = target.upload_dir(location.path, src_dir)
        for key in target.list(location.path):
            if key[len(location.path) :] not in uploaded:
                target.delete(key)
        return uploaded
    finally:
        if owned:
            target.close()


# --------------------------------------------------------------------------- errors


def _explain(exc: Exception, location: _Location, settings: Settings) -> str:
    """A message saying what went wrong and what to change (before scrubbing)."""
    detail = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    s3_code = _s3_error_code(exc)
    if location.type == "hub":
        repo = location.base
        status = getattr(getattr(exc, "response", None), "status_code", None)
        endpoint = settings.hf_endpoint or "https://huggingface.co"
        if status == 401:
            return (
                f"the Hub at {endpoint} rejected the token in {location.token_variable} for "
                f"{repo}: it is invalid or expired; put a valid write token in "
                f"{location.token_variable} on the workers ({detail})"
            )
        if status == 403:
            return (
                f"the token in {location.token_variable} may not write to {repo}: give it write "
                f"access to the '{repo.split('/')[0]}' namespace, or choose another repo_id "
                f"({detail})"
            )
        if _is_network_error(exc):
            return (
                f"cannot reach the Hub at {endpoint}: check the workers' network access and "
                f"HF_ENDPOINT ({detail})"
            )
        return f"uploading to the Hub repo {repo} failed: {detail}"

    where = location.uri
    what = "the service's blob store" if location.type == "store" else "S3"
    endpoint = settings.s3_endpoint_url or "AWS S3"
    if _class_named(exc, "NoCredentialsError", "PartialCredentialsError"):
        return (
            f"no S3 credentials on this worker for {where}: give the workers AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY (or an instance role)"
        )
    if _class_named(exc, "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return (
            f"cannot reach {what} at {endpoint}: check FTUNE_S3_ENDPOINT_URL and the workers' "
            f"network access ({detail})"
        )
    if s3_code == "NoSuchBucket":
        bucket = where.removeprefix("s3://").split("/")[0]
        fix = (
            "fix output.destination.uri"
            if location.type == "s3"
            else "fix FTUNE_STORE_URL on the workers"
        )
        return f"the S3 bucket '{bucket}' does not exist at {endpoint}: create it or {fix}"
    if s3_code in _S3_AUTH_CODES:
        return (
            f"S3 refused the workers' credentials for {where} ({s3_code}): check the access key, "
            f"the secret and their permission to write (s3:PutObject) there ({detail})"
        )
    return f"uploading to {what} at {where} failed: {detail}"


_S3_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "403",
    }
)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _class_named(exc: BaseException, *names: str) -> bool:
    return any(type(e).__name__ in names for e in _chain(exc))


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, also when s3transfer wrapped it in text."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, Mapping):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        match = re.search(r"An error occurred \((\w+)\)", str(e))
        if match:
            return match.group(1)
    return None


def _is_network_error(exc: BaseException) -> bool:
    names = ("ConnectError", "ConnectTimeout", "TimeoutException", "TransportError", "ReadTimeout")
    return _class_named(exc, *names) or any(
        isinstance(e, ConnectionError | TimeoutError) for e in _chain(exc)
    )


def _secrets(settings: Settings, location: _Location) -> list[str]:
    """Every credential that could show up in a message: HF tokens and, for S3, boto3's keys."""
    secrets = [t for t in settings.hf_tokens.values() if t]
    if location.type == "s3" or location.base.startswith("s3://"):
        try:
            import boto3

            credentials = boto3.session.Session().get_credentials()
            if credentials is not None:
                frozen = credentials.get_frozen_credentials()
                secrets += [s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s]
        except Exception:  # noqa: S110 - no credentials means nothing to scrub
            pass
    return secrets


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{16,}\b", "hf_***", text)


# --------------------------------------------------------------------------- manifest, card


def write_manifest(src_dir: Path, *, kind: ArtifactKind, job: Job) -> dict[str, Any]:
    """Write ``manifest.json``: sha256 and size of every other file in ``src_dir``."""
    files = {
        rel: {"sha256": _sha256(path), "size": path.stat().st_size}
        for rel, path in _files(src_dir)
        if rel != MANIFEST
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "job_id": job.id,
        "kind": kind,
        "base_model": job.spec.base_model,
        "base_revision": job.spec.revision,
        "dataset_sha256": job.dataset.sha256,
        "files": files,
    }
    (src_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def write_model_card(
    src_dir: Path,
    *,
    kind: ArtifactKind,
    job: Job,
    final_metrics: Mapping[str, float],
    location: _Location,
) -> None:
    """Write ``README.md``: Hub front matter, then what the model is and how to load it."""
    import yaml

    spec = job.spec
    hub_base = _hub_base(spec)
    method_tag = "qlora" if spec.quantization.bits else "lora"
    method = "QLoRA" if spec.quantization.bits else "LoRA"
    front: dict[str, Any] = {}
    if hub_base:
        front["base_model"] = hub_base
    front["library_name"] = "peft" if kind == "adapter" else "transformers"
    front["pipeline_tag"] = "text-generation"
    front["tags"] = [spec.method, method_tag, "trl", "ftune"]
    datasets = [f"sha256:{job.dataset.sha256}"]
    if job.eval_dataset is not None:
        datasets.append(f"sha256:{job.eval_dataset.sha256}")
    front["datasets"] = datasets

    title = location.base if location.type == "hub" else f"ftune job {job.id}"
    what = "LoRA adapter" if kind == "adapter" else "merged model (base + LoRA, 16-bit)"
    q = spec.quantization
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {title}" + (" (adapter)" if kind == "adapter" and location.path else ""),
        "",
        f"A {what} fine-tuned with {spec.method.upper()} ({method}) from "
        f"`{spec.base_model}`{f' at revision `{spec.revision}`' if spec.revision else ''} "
        f"by ftune job `{job.id}`.",
        "",
        "## Training data",
        "",
        _table(
            [
                ("dataset sha256", f"`{job.dataset.sha256}`"),
                ("rows", job.dataset.rows),
                ("format", job.dataset.format),
            ]
            + (
                [
                    ("eval dataset sha256", f"`{job.eval_dataset.sha256}`"),
                    ("eval rows", job.eval_dataset.rows),
                ]
                if job.eval_dataset is not None
                else [("eval fraction", spec.eval_fraction)]
            )
            + _data_rows(job.data)
        ),
        "",
        "## Hyperparameters",
        "",
        _table(
            (name, value)
            for name, value in msgspec.structs.asdict(spec.hyperparameters).items()
            if spec.method in METHOD_FIELDS.get(name, (spec.method,))
        ),
        "",
        "## LoRA",
        "",
        _table(msgspec.structs.asdict(spec.lora).items()),
        "",
        "## Quantization during training",
        "",
        _table(
            [("bits", "none (LoRA on unquantized weights)")]
            if q.bits is None
            else [
                ("bits", q.bits),
                ("quant_type", q.quant_type),
                ("double_quant", q.double_quant),
                ("compute_dtype", q.compute_dtype),
            ]
        ),
        "",
    ]
    if kind == "merged":
        lines += [
            "The adapter was merged into the base reloaded in 16-bit, not into the 4-bit weights.",
            "",
        ]
    lines += ["## Final metrics", ""]
    lines += [_table(sorted(final_metrics.items())) if final_metrics else "No metrics recorded."]
    lines += ["", "## How to load it", "", _how_to_load(src_dir, kind, spec, location), ""]
    (src_dir / MODEL_CARD).write_text("\n".join(lines))


def _how_to_load(src_dir: Path, kind: ArtifactKind, spec: JobSpec, location: _Location) -> str:
    if location.type == "hub":
        ref = json.dumps(location.base)
        options = ""
        if location.path:
            options += f", subfolder={json.dumps(location.path)}"
        if location.revision != "main":
            options += f", revision={json.dumps(location.revision)}"
        intro = ""
    else:
        ref = '"./model"'
        options = ""
        source = location.uri
        if location.type == "s3":
            copy = f"aws s3 cp --recursive {source} ./model"
        else:
            copy = f"cp -r {source.removeprefix('file://')} ./model"
        intro = f"Copy the folder first: `{copy}`, then:\n\n"
    tokenizer_from = f"{ref}{options}"
    if kind == "merged":
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained({ref}{options}, dtype="auto")',
            f"tokenizer = AutoTokenizer.from_pretrained({tokenizer_from})",
        ]
    else:
        hub_base = _hub_base(spec)
        base_ref = json.dumps(hub_base) if hub_base else '"path/to/the/base/model"'
        base_options = f", revision={json.dumps(spec.revision)}" if spec.revision else ""
        if not (src_dir / "tokenizer_config.json").is_file():
            tokenizer_from = f"{base_ref}{base_options}"
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained({base_ref}{base_options}, dtype="auto")',
            f"model = PeftModel.from_pretrained(base, {ref}{options})",
            f"tokenizer = AutoTokenizer.from_pretrained({tokenizer_from})",
        ]
        if not hub_base:
            code.insert(2, f"# The base model: {spec.base_model}")
    return intro + "```python\n" + "\n".join(code) + "\n```"


def _point_adapter_at_hub_base(src_dir: Path, spec: JobSpec) -> None:
    """Make adapter_config.json name the Hub base, not the worker-local path it trained from.

    So ``AutoPeftModelForCausalLM.from_pretrained(repo)`` finds the base on any machine.
    """
    hub_base = _hub_base(spec)
    config_path = src_dir / "adapter_config.json"
    if not hub_base or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    wanted = {"base_model_name_or_path": hub_base, "revision": spec.revision}
    if all(config.get(k) == v for k, v in wanted.items()):
        return
    config.update(wanted)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _hub_base(spec: JobSpec) -> str | None:
    if spec.base_model.startswith(("s3://", "file://")):
        return None
    return spec.base_model.removeprefix("hf://")


def _data_rows(data: DataReport | None) -> list[tuple[str, Any]]:
    """What the worker trained and evaluated on, and every row it left out, by reason."""
    if data is None:
        return []
    rows: list[tuple[str, Any]] = [("rows trained on", data.train_rows)]
    if data.eval_source != "none":
        overlap = (
            "none of them a training prompt"
            if data.eval_prompt_disjoint
            else f"{data.eval_prompts_shared} of them also training prompts"
        )
        rows.append(
            ("rows evaluated on", f"{data.eval_rows} ({data.eval_prompts} prompts, {overlap})")
        )
    if data.duplicates_removed:
        rows.append(("duplicate rows removed", data.duplicates_removed))
    for side, dropped in (("training", data.dropped), ("eval", data.eval_dropped)):
        for reason, n in msgspec.structs.asdict(dropped).items():
            if n:
                rows.append((f"{side} rows dropped: {reason.replace('_', ' ')}", n))
    return rows


def _table(rows: Iterable[tuple[str, Any]]) -> str:
    out = ["| | |", "|---|---|"]
    for key, value in rows:
        out.append(f"| {_cell(key)} | {_cell(value)} |")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, list | tuple):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _files(root: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
