"""Datasets imported by reference: the files of a Hub dataset split, or one S3 object,
downloaded to local files so they are validated exactly like an upload.

A Hub split is chosen as ``datasets.load_dataset`` chooses it in the common cases: by the
``configs:`` of the repo's README card when it declares them (a config's ``data_files`` per
split, globs relative to its ``data_dir``), else by file names (``SPLIT.*``, ``SPLIT-*``, a
``SPLIT/`` folder, the standard splits' other names), else all files as train.

Blocking (huggingface_hub and boto3 are): the API calls :func:`fetch` from a worker thread.
The Hub is read with the service's default token (``HF_TOKEN``) and S3 with its credentials,
as base models are; so a source inside the service's own store is refused, or any tenant
could read what the store holds for the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from service.contract import Container, DatasetImport, dataset_name
from service.datasets.containers import DatasetTooLarge
from service.settings import Settings
from service.tenants import inside_store

DATA_SUFFIXES = (
    ".jsonl",
    ".ndjson",
    ".json",
    ".parquet",
    ".csv",
    ".jsonl.gz",
    ".ndjson.gz",
    ".json.gz",
    ".csv.gz",
)
CARD_MAX_BYTES = 4 * 1024 * 1024
"""A README card larger than this is not read for its configs (the largest cards, with long
``dataset_info`` blocks, are a few hundred KB)."""


class SourceError(Exception):
    """The source cannot be read as given: ``status`` 422 (fix the request) or 502 (the Hub or
    S3 did not answer as it should)."""

    def __init__(self, msg: str, status: int = 422, field: str = "source") -> None:
        super().__init__(msg)
        self.msg = msg
        self.status = status
        self.field = field
        """The request's field to fix."""


@dataclass(frozen=True)
class Fetched:
    files: list[Path]
    """Local copies, in the order their rows count."""
    name: str
    """A dataset name for when the request gave none."""
    hint: Container | None


def hint_of(filename: str) -> Container | None:
    """The container a file name suggests (the bytes still decide, except CSV vs JSONL)."""
    name = filename.lower().removesuffix(".gz")
    for suffix, container in ((".csv", "csv"), (".parquet", "parquet"), (".json", "json")):
        if name.endswith(suffix):
            return container  # type: ignore[return-value]
    return None


def fetch(req: DatasetImport, settings: Settings, dest: Path, max_bytes: int) -> Fetched:
    if req.source.startswith("hf://datasets/"):
        return _fetch_hub(req, settings, dest, max_bytes)
    return _fetch_s3(req.source, settings, dest, max_bytes)


_SPLIT_NAMES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
"""The names `load_dataset` reads as each standard split, in file and folder names."""


def _split_match(path: str, split: str) -> bool:
    p = PurePosixPath(path)
    base = p.name
    return any(
        base.startswith((f"{name}.", f"{name}-")) or p.parent.name == name
        for name in _SPLIT_NAMES.get(split, (split,))
    )


_SHARD = re.compile(r"[\w.]+-\d{5}-of-\d{5}")
"""The Hub's shard names (`train_prefs-00000-of-00001.parquet`): the split is its first part."""


def _names_a_split(path: str) -> bool:
    return bool(_SHARD.match(PurePosixPath(path).name)) or any(
        _split_match(path, split) for split in _SPLIT_NAMES
    )


def _is_data(path: str) -> bool:
    """A data file as `load_dataset` sees one: a data suffix, nothing hidden (`.x`) or
    private (`__x`) on its path, no card or metadata file."""
    parts = PurePosixPath(path).parts
    return (
        path.lower().endswith(DATA_SUFFIXES)
        and not any(part.startswith((".", "__")) for part in parts)
        and parts[-1] not in ("dataset_info.json", "dataset_infos.json", "config.json")
    )


def _fetch_hub(req: DatasetImport, settings: Settings, dest: Path, max_bytes: int) -> Fetched:
    import httpx2  # huggingface_hub's HTTP client: its transport errors are not OSErrors
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.hf_api import RepoFile

    org, name, *rest = req.source.removeprefix("hf://datasets/").split("/", 2)
    repo_id, sub = f"{org}/{name}", (rest[0].strip("/") if rest else "")
    split = req.split or "train"
    token = settings.hf_tokens.get("") or False
    where = f"hf://datasets/{repo_id}" + (f" at {req.revision}" if req.revision else "")
    api = HfApi(endpoint=settings.hf_endpoint, token=token)
    try:
        tree = [
            f
            for f in api.list_repo_tree(
                repo_id, recursive=True, revision=req.revision, repo_type="dataset"
            )
            if isinstance(f, RepoFile)
        ]
        card = _card(tree, repo_id, req.revision, settings, token, dest) if not sub else None
        chosen, label = _choose(tree, sub, card, req, where)
        total = sum(f.size for f in chosen)
        if total > max_bytes:
            raise DatasetTooLarge(
                f"the files of {where} split {split!r} are {total} bytes; the limit is {max_bytes}"
            )
        files = [
            Path(
                hf_hub_download(
                    repo_id,
                    f.path,
                    repo_type="dataset",
                    revision=req.revision,
                    endpoint=settings.hf_endpoint,
                    token=token,
                    local_dir=dest,
                )
            )
            for f in chosen
        ]
    except HFValidationError as e:  # a name the Hub cannot have, e.g. ending in '.'
        raise SourceError(f"source: {where} is not a valid Hub dataset name: {e}") from None
    except GatedRepoError:
        raise SourceError(
            f"source: {where} is gated: accept its terms with the account whose token the "
            "service holds (HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise _not_found(where, settings) from None
    except RevisionNotFoundError:
        raise SourceError(
            f"revision: hf://datasets/{repo_id} has no branch, tag or commit {req.revision!r}",
            field="revision",
        ) from None
    except EntryNotFoundError:
        raise SourceError(f"source: a file of {where} vanished while it was read") from None
    except (HfHubHTTPError, OSError, httpx2.HTTPError) as e:
        response = getattr(e, "response", None)
        if getattr(response, "status_code", None) == 404:
            # A Hub (or mirror) that answers a plain 404 without the error-code header that
            # huggingface_hub turns into RepositoryNotFoundError: the user's name is wrong.
            raise _not_found(where, settings) from None
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceError(f"the Hub could not be read for {where}: {cause}", 502) from None
    default = dataset_name(f"{name}{'-' + label if label else ''} {split}")
    return Fetched(files, default, hint_of(chosen[0].path))


def _card(
    tree: list[Any], repo_id: str, revision: str | None, settings: Settings, token: Any, dest: Path
) -> dict[str, Any] | None:
    """The YAML header of the repo's README card, if it has one small enough to read."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.repocard import metadata_load

    readme = next((f for f in tree if f.path == "README.md"), None)
    if readme is None or readme.size > CARD_MAX_BYTES:
        return None
    path = hf_hub_download(
        repo_id,
        "README.md",
        repo_type="dataset",
        revision=revision,
        endpoint=settings.hf_endpoint,
        token=token,
        local_dir=dest / ".card",
    )
    try:
        return metadata_load(path)
    except Exception:  # yaml's errors: a card the Hub itself would show as broken
        return None


def _choose(
    tree: list[Any], sub: str, card: dict[str, Any] | None, req: DatasetImport, where: str
) -> tuple[list[Any], str]:
    """The files of the split asked for, in name order, and what names them in the default
    dataset name (the folder, or a config other than the default)."""
    split = req.split or "train"
    if sub and req.config:
        raise SourceError(
            f"config: give a folder in the source or a config, not both ({sub!r} and "
            f"{req.config!r})",
            field="config",
        )
    if sub and any(f.path == sub for f in tree):
        return [f for f in tree if f.path == sub], sub.replace("/", "-")
    configs, defaults = _configs(card) if not sub else ({}, [])
    default = defaults[0] if len(defaults) == 1 else None
    if req.config is None and len(defaults) > 1:
        raise SourceError(
            f"config: the README of {where} makes both {defaults[0]!r} and {defaults[1]!r} its "
            "default config (load_dataset refuses it too); choose one with config",
            field="config",
        )
    if req.config and not configs:
        raise SourceError(
            f"config: {where} declares no configs in its README; leave config out",
            field="config",
        )
    label = sub.replace("/", "-")
    if configs:
        config = _Config.pick(configs, req.config or default, where)
        label = "" if config.name == default else config.name
        if config.splits is None:  # data_dir alone: split files found by name under it
            sub = config.base
        else:
            return config.files(tree, split, where), label
    inside = [f for f in tree if not sub or f.path.startswith(sub + "/")]
    data = sorted((f for f in inside if _is_data(f.path)), key=_path)
    chosen = [f for f in data if _split_match(f.path, split)]
    if not chosen and split == "train" and not any(_names_a_split(f.path) for f in data):
        chosen = data  # no file named for any split (a lone data.jsonl): all of them are train
    if not chosen:
        found = sorted({PurePosixPath(f.path).name.split(".")[0].split("-")[0] for f in data})
        field = "split" if found else "source"
        raise SourceError(
            f"{field}: {where} has no data files for split {split!r}"
            + (f" under {sub!r}" if sub else "")
            + (f"; splits found: {', '.join(found)}" if found else "; it has no data files"),
            field=field,
        )
    return chosen, label


@dataclass(frozen=True)
class _Config:
    """One of the ``configs:`` a README card declares."""

    name: str
    base: str
    """Its ``data_dir``: the folder its patterns are relative to."""
    splits: dict[str, list[str]] | None
    """Each split's glob patterns; None when only ``data_dir`` is given."""

    @staticmethod
    def pick(configs: dict[str, _Config], name: str | None, where: str) -> _Config:
        names = ", ".join(configs)
        if name is None:
            raise SourceError(
                f"config: {where} declares configs {names} in its README; choose one with config",
                field="config",
            )
        if name not in configs:
            raise SourceError(
                f"config: {where} has no config {name!r}; its README declares {names}",
                field="config",
            )
        return configs[name]

    def files(self, tree: list[Any], split: str, where: str) -> list[Any]:
        assert self.splits is not None
        if split not in self.splits:
            raise SourceError(
                f"split: config {self.name!r} of {where} has no split {split!r}; its splits: "
                + ", ".join(self.splits),
                field="split",
            )
        patterns = [
            f"{self.base}/{p.removeprefix('./')}" if self.base else p.removeprefix("./")
            for p in self.splits[split]
        ]
        rules = [_glob(p) for p in patterns]
        chosen = sorted(
            (f for f in tree if _is_data(f.path) and any(r.match(f.path) for r in rules)),
            key=_path,
        )
        if not chosen:
            raise SourceError(
                f"split: no file of {where} matches {', '.join(patterns)}, the files of split "
                f"{split!r} in config {self.name!r} of its README",
                field="split",
            )
        return chosen


def _path(f: Any) -> str:
    return str(f.path)


def _configs(card: dict[str, Any] | None) -> tuple[dict[str, _Config], list[str]]:
    """The card's configs by name, and those ``load_dataset`` would take without a name (it
    refuses more than one): the only one, or those marked ``default: true`` or named
    ``default``."""
    declared = (card or {}).get("configs")
    configs: dict[str, _Config] = {}
    marked: list[str] = []
    for entry in declared if isinstance(declared, list) else []:
        if not isinstance(entry, dict):
            continue
        name = str(entry.get("config_name") or "default")
        base = str(entry.get("data_dir") or "").removeprefix("./").strip("/")
        configs[name] = _Config(name, base, _data_files(entry.get("data_files")))
        if (name == "default" or entry.get("default")) and name not in marked:
            marked.append(name)
    return configs, list(configs) if len(configs) == 1 else marked


def _data_files(spec: Any) -> dict[str, list[str]] | None:
    """A config's ``data_files`` in any of the card's forms: one pattern, a list of patterns
    (both the train split), a list of ``{split, path}``, or a mapping of split to patterns."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return {"train": [spec]}
    if isinstance(spec, dict):
        return {str(k): _patterns(v) for k, v in spec.items()}
    if isinstance(spec, list) and all(isinstance(x, str) for x in spec):
        return {"train": list(spec)}
    splits: dict[str, list[str]] = {}
    for entry in spec if isinstance(spec, list) else []:
        if isinstance(entry, dict) and "path" in entry:
            splits.setdefault(str(entry.get("split") or "train"), []).extend(
                _patterns(entry["path"])
            )
    return splits


def _patterns(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value or []]


def _glob(pattern: str) -> re.Pattern[str]:
    """A data_files pattern as the Hub reads it (fsspec's, as huggingface_hub's file system):
    ``*`` and ``?`` stay within a folder, ``**`` crosses folders, ``[..]`` classes."""
    from fsspec.utils import glob_translate

    return re.compile(glob_translate(pattern))


def _fetch_s3(source: str, settings: Settings, dest: Path, max_bytes: int) -> Fetched:
    from service.blobs import BlobNotFound, open_store

    bucket, _, key = source.removeprefix("s3://").partition("/")
    if inside_store(source, settings.store_url):
        raise SourceError(
            f"source: {source} is inside the service's own store ({settings.store_url}), which "
            "is never a source; import from a bucket or prefix of your own"
        )
    try:
        store = open_store(f"s3://{bucket}", endpoint_url=settings.s3_endpoint_url)
    except ValueError as e:
        raise SourceError(f"source: {e}") from None
    local = dest / (PurePosixPath(key).name or "object")
    try:
        size = store.size(key)
        if size > max_bytes:
            raise DatasetTooLarge(f"{source} is {size} bytes; the limit is {max_bytes}")
        store.get_file(key, local)
    except ValueError as e:
        raise SourceError(f"source: {e}") from None
    except BlobNotFound:
        raise SourceError(f"source: there is no object at {source}") from None
    except Exception as e:
        if isinstance(e, DatasetTooLarge):
            raise
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("AccessDenied", "403", "NoSuchBucket", "AllAccessDisabled"):
                raise SourceError(
                    f"source: the service's S3 credentials cannot read {source} ({code})"
                ) from None
        if isinstance(e, ClientError | BotoCoreError):
            raise SourceError(f"S3 could not be read for {source}: {e}", 502) from None
        raise
    finally:
        store.close()
    return Fetched([local], dataset_name(local.name), hint_of(key))


def _not_found(where: str, settings: Settings) -> SourceError:
    return SourceError(
        f"source: {where} was not found on the Hub "
        f"({settings.hf_endpoint or 'huggingface.co'}); check the name, and that the "
        "service's HF token can read it if it is private"
    )
