"""Who an API key belongs to: what a client (the web console) shows and offers."""

from __future__ import annotations

from typing import Annotated

import msgspec


class Caller(msgspec.Struct, kw_only=True):
    """The tenant an API key belongs to, and whether it is an admin key."""

    tenant: Annotated[str, msgspec.Meta(description="The key's tenant.")]
    admin: Annotated[
        bool, msgspec.Meta(description="An admin key reads every tenant's jobs and datasets.")
    ]
