"""`python -m service.api.openapi` prints the spec the app generates (make openapi)."""

import sys

import msgspec

from service.api.app import create_app
from service.settings import Settings


def render() -> bytes:
    """The spec as stable, sorted, indented JSON (what openapi/openapi.json holds)."""
    schema = create_app(Settings()).openapi_schema.to_schema()
    return msgspec.json.format(msgspec.json.encode(schema, order="sorted"), indent=2) + b"\n"


if __name__ == "__main__":
    sys.stdout.buffer.write(render())
