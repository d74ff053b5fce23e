"""What the OpenAI-compatible API keeps beside our records, in the same Redis.

- Failed uploads: an upload that failed validation stores nothing of its rows (as on
  `POST /v1/datasets`), only this record of its errors, so the file can be retrieved, listed
  and deleted like OpenAI's files in status `error`.
- Suffixes: the `suffix` a job was created with (OpenAI's objects show it; ours have no
  field for it).
- Result sizes: the bytes of a succeeded job's metrics CSV (its `res_...` file), made once:
  a listing of files would otherwise read every job's whole metrics stream again.
"""

from __future__ import annotations

import msgspec

from service.contract.openai import FileObject
from service.openai.files import metrics_csv
from service.store import NotFound, Store, new_id

P = "ftune:openai:"


class FailedUpload(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    filename: str
    bytes: int
    created_at: float
    status_details: str

    def file(self) -> FileObject:
        return FileObject(
            id=self.id,
            bytes=self.bytes,
            created_at=int(self.created_at),
            filename=self.filename,
            purpose="fine-tune",
            status="error",
            status_details=self.status_details,
        )


_failed_decoder = msgspec.json.Decoder(FailedUpload)


def _failed_key(file_id: str) -> str:
    return f"{P}failed:{file_id}"


def failed_index(tenant: str | None) -> str:
    return f"{P}failed:" + ("all" if tenant is None else f"t:{tenant}")


def suffix_key(job_id: str) -> str:
    """A job's OpenAI suffix; deleted with the job (Store's `job_keys`)."""
    return f"{P}suffix:{job_id}"


def result_bytes_key(job_id: str) -> str:
    """A succeeded job's result file size; deleted with the job (Store's `job_keys`)."""
    return f"{P}result-bytes:{job_id}"


async def result_sizes(store: Store, job_ids: list[str]) -> list[int]:
    """The size of each succeeded job's metrics CSV, kept once made: a succeeded job's
    metrics no longer change."""
    if not job_ids:
        return []
    raws = await store.redis.mget([result_bytes_key(j) for j in job_ids])
    sizes = []
    for job_id, raw in zip(job_ids, raws, strict=True):
        if raw is None:
            size = len(metrics_csv(await store.get_metrics(job_id)))
            await store.redis.set(result_bytes_key(job_id), size)
        else:
            size = int(raw)
        sizes.append(size)
    return sizes


MAX_FAILED_UPLOADS = 100
"""A tenant's failed uploads kept, the newest: each only says why a file was refused, and past
this the oldest go, so that refused uploads cannot pile up in Redis without bound."""


async def add_failed_upload(
    store: Store, *, tenant: str, filename: str, size: int, created_at: float, details: str
) -> FailedUpload:
    record = FailedUpload(
        id=new_id("file"),
        tenant=tenant,
        filename=filename,
        bytes=size,
        created_at=created_at,
        status_details=details,
    )
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.set(_failed_key(record.id), msgspec.json.encode(record))
        pipe.zadd(failed_index(tenant), {record.id: 0})
        pipe.zadd(failed_index(None), {record.id: 0})
        pipe.zrange(failed_index(tenant), 0, -MAX_FAILED_UPLOADS - 1)  # ids sort by time
        *_, oldest = await pipe.execute()
    if oldest:
        async with store.redis.pipeline(transaction=True) as pipe:
            pipe.delete(*(_failed_key(i.decode()) for i in oldest))
            pipe.zrem(failed_index(tenant), *oldest)
            pipe.zrem(failed_index(None), *oldest)
            await pipe.execute()
    return record


async def get_failed_upload(store: Store, file_id: str, tenant: str | None) -> FailedUpload:
    raw = await store.redis.get(_failed_key(file_id))
    if raw is None:
        raise NotFound(f"no file {file_id}")
    record = _failed_decoder.decode(raw)
    if tenant is not None and record.tenant != tenant:
        raise NotFound(f"no file {file_id}")
    return record


async def failed_uploads(store: Store, ids: list[str]) -> list[FailedUpload]:
    if not ids:
        return []
    raws = await store.redis.mget([_failed_key(i) for i in ids])
    return [_failed_decoder.decode(raw) for raw in raws if raw]


async def delete_failed_upload(store: Store, file_id: str, tenant: str | None) -> None:
    record = await get_failed_upload(store, file_id, tenant)
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.delete(_failed_key(file_id))
        pipe.zrem(failed_index(record.tenant), file_id)
        pipe.zrem(failed_index(None), file_id)
        await pipe.execute()


async def set_suffix(store: Store, job_id: str, suffix: str) -> None:
    await store.redis.set(suffix_key(job_id), suffix)


async def suffixes(store: Store, job_ids: list[str]) -> dict[str, str]:
    """The suffix of each job created with one."""
    if not job_ids:
        return {}
    raws = await store.redis.mget([suffix_key(j) for j in job_ids])
    return {j: raw.decode() for j, raw in zip(job_ids, raws, strict=True) if raw is not None}
