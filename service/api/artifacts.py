"""`GET /v1/jobs/{id}/artifacts/{kind}/{file}`: a job's artifact files out of the service's
store, so a team gets its model without a shell on the store's host or credentials to its
bucket. Artifacts published to the Hub or a team's S3 prefix are fetched from there."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from litestar import Controller, Response, get
from litestar.params import Parameter
from litestar.response import Stream

from service.api.auth import scope
from service.api.downloads import attachment, blob_chunks
from service.api.jobs import JobId
from service.api.openapi_docs import NOT_FOUND, responses
from service.blobs import BlobNotFound, BlobStore
from service.contract import ArtifactKind
from service.settings import Principal
from service.store import NotFound, Store

_LISTED = 20
"""File names said in a 404 for one the artifact does not have."""


class ArtifactController(Controller):
    path = "/v1/jobs"
    tags = ["jobs"]

    @get(
        operation_id="DownloadJobArtifactFile",
        path="/{job_id:str}/artifacts/{kind:str}/{file:path}",
        media_type="application/octet-stream",
        summary="One file of a job's artifact (adapter or merged model) in the service's store",
        description="`file` is one of the artifact's `files` (e.g. `adapter_model.safetensors`"
        "); the answer carries its sha256 as the `ETag`. `ftune jobs download ID` fetches "
        "them all and checks each against the artifact's manifest. An artifact published to "
        "the Hub or to S3 is not served here (404 saying where it is).",
        responses=responses(NOT_FOUND),
    )
    async def artifact_file(
        self,
        job_id: JobId,
        kind: Annotated[ArtifactKind, Parameter(description="`adapter` or `merged`.")],
        file: Annotated[str, Parameter(description="The file's name in the artifact.")],
        principal: Principal,
        store: Store,
        blobs: BlobStore,
    ) -> Response[Any]:
        job = await store.get_job(job_id, scope(principal))
        artifact = next((a for a in job.artifacts if a.kind == kind), None)
        if artifact is None:
            made = ", ".join(a.kind for a in job.artifacts) or "none"
            raise NotFound(f"job {job_id} has no {kind} artifact (its artifacts: {made})")
        prefix = blobs.key_of(artifact.uri)
        if prefix is None:
            raise NotFound(
                f"the {kind} of job {job_id} was published to {artifact.uri}, not kept in the "
                "service's store: fetch it from there"
            )
        name = file.lstrip("/")
        if name not in artifact.files:
            listed = ", ".join(artifact.files[:_LISTED])
            more = (
                f" and {len(artifact.files) - _LISTED} more"
                if len(artifact.files) > _LISTED
                else ""
            )
            raise NotFound(
                f"the {kind} of job {job_id} has no file {name!r}; its files: {listed}{more}"
            )
        try:
            body = await anyio.to_thread.run_sync(blobs.open, prefix + name)
        except BlobNotFound:  # the record lists it, the store lost it
            raise NotFound(
                f"the {kind} of job {job_id} lists {name!r} but the store has no such file"
            ) from None
        # No Content-Length from the record: sent as stored, which the ETag lets a client check.
        headers = {"Content-Disposition": attachment(name.rsplit("/", 1)[-1])}
        if name in artifact.sha256:
            headers["ETag"] = f'"{artifact.sha256[name]}"'
        return Stream(blob_chunks(body), media_type="application/octet-stream", headers=headers)
