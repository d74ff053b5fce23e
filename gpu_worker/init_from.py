"""Fetch the LoRA adapter a job continues (`Job.init_adapter`) and check it fits the base model.

The API resolved `spec.init_from` to a location when the job was created: an earlier job's
adapter artifact (in the service's store, S3 or the Hub), or the `hf://` / `s3://` reference
the user gave. Training then starts from these weights (`trainer.build_trainer`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gpu_worker.errors import ConfigError, ModelLoadError
from gpu_worker.model import download_hub, download_s3
from service.blobs import BlobNotFound, BlobStore
from service.contract import Job
from service.settings import Settings

ADAPTER_CONFIG = "adapter_config.json"
HF_REF = re.compile(r"^hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+?))?/?$")
WHAT = "init_from adapter"


def fetch_adapter(
    job: Job, model_dir: Path, *, settings: Settings, store: BlobStore, dest: Path
) -> Path | None:
    """The local folder of the adapter to continue, checked; None when the job starts fresh."""
    uri = job.init_adapter
    if uri is None:
        return None
    folder = _download(uri, settings=settings, store=store, dest=dest)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ConfigError(
            f"{WHAT} {uri!r} is not a PEFT adapter (no {ADAPTER_CONFIG} in it): point "
            "init_from.adapter at the folder that save_pretrained wrote for a LoRA adapter"
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{WHAT} {uri!r} is a {config.get('peft_type')} adapter, not LoRA")
    if job.spec.init_from is not None and job.spec.init_from.job_id is None:
        # An earlier job's base model was compared with this one's at submit.
        _check_base(config.get("base_model_name_or_path"), job, model_dir, uri)
    return folder


def _download(uri: str, *, settings: Settings, store: BlobStore, dest: Path) -> Path:
    own = store.url.rstrip("/") + "/"
    if uri.startswith(own):  # an earlier job's artifact in the service's store
        try:
            store.download_dir(uri.removeprefix(own), dest)
        except BlobNotFound:
            raise ModelLoadError(
                f"{WHAT} {uri!r} is no longer in the service's store (deleted?)"
            ) from None
        return dest
    if uri.startswith("s3://"):
        return download_s3(uri, settings, dest, what=WHAT)
    match = HF_REF.match(uri)
    if match is None:
        raise ConfigError(f"{WHAT} {uri!r} is neither hf://, s3:// nor in the service's store")
    return download_hub(
        match["repo"], match["rev"], settings, what=WHAT, subfolder=match["sub"] or ""
    )


def _check_base(named: object, job: Job, model_dir: Path, uri: str) -> None:
    """The adapter's `base_model_name_or_path` must be this job's base: its Hub id or folder."""
    base = job.spec.base_model
    accepted = {base.removeprefix("hf://"), str(model_dir), str(model_dir.resolve())}
    if isinstance(named, str) and (named in accepted or Path(named).resolve() == model_dir):
        return
    raise ConfigError(
        f"{WHAT} {uri!r} was trained on base model {named!r}, this job's base_model is "
        f"{base!r}: an adapter only fits the base model it was trained on (set base_model to "
        "its base, or use another adapter)"
    )
