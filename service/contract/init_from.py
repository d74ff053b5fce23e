"""`init_from` in a job spec: the LoRA adapter a job continues instead of training a fresh one."""

from __future__ import annotations

from typing import Annotated

import msgspec

from service.contract.base import Strict

JOB_ID_RE = r"^job_[A-Za-z0-9]{1,64}(?!\n)$"
ADAPTER_REF_RE = (
    r"^(?:hf://[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
    r"(?:@[A-Za-z0-9._-]{1,128})?(?:/[A-Za-z0-9._/-]{1,256})?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,62}(?:/[^\s]*)?)(?!\n)$"
)


class InitFrom(Strict):
    """Go on training an existing LoRA adapter instead of a fresh one; give exactly one field."""

    job_id: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=JOB_ID_RE,
                description="A succeeded job of yours on the same base model whose artifacts "
                "include the adapter (`output.artifacts` `adapter` or `both`).",
            ),
        ]
        | None
    ) = None
    adapter: (
        Annotated[
            str,
            msgspec.Meta(
                pattern=ADAPTER_REF_RE,
                max_length=512,
                description="A PEFT LoRA adapter folder: `hf://org/name[@revision][/subfolder]` "
                "or `s3://bucket/prefix/`; its adapter_config.json must name this job's "
                "base model (checked by the worker before training).",
            ),
        ]
        | None
    ) = None

    def __post_init__(self) -> None:
        if (self.job_id is None) == (self.adapter is None):
            raise ValueError("init_from takes exactly one of job_id and adapter")
