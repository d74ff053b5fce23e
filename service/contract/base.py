"""The base of every input Struct, apart so that each part of the contract can build on it."""

from __future__ import annotations

import msgspec


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Inputs reject unknown keys: a typo in a spec must not silently train with defaults."""
