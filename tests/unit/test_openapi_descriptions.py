"""The OpenAPI a client reads: every property and parameter says what it means."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from service import contract
from service.api import errors
from service.api.app import create_app
from service.contract import openai as openai_contract
from service.settings import Settings


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return create_app(Settings()).openapi_schema.to_schema()


def undescribed(node: Any, where: str = "#") -> list[str]:
    """JSON pointers of the properties and parameters under `node` without a description."""
    found: list[str] = []
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            if not prop.get("description"):
                found.append(f"{where}/properties/{name}")
        for i, param in enumerate(node.get("parameters") or []):
            if not param.get("description"):
                found.append(f"{where}/parameters/{i} ({param['in']} {param['name']})")
        for key, value in node.items():
            found += undescribed(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += undescribed(value, f"{where}/{i}")
    return found


def test_every_property_and_parameter_has_a_description(spec: dict[str, Any]) -> None:
    missing = undescribed(spec)
    print("\n".join(missing))
    assert len(missing) == 0, f"{len(missing)} without a description:\n" + "\n".join(missing)


def test_the_walk_finds_what_lacks_a_description() -> None:
    node: dict[str, Any] = {"paths": {"x": {"get": {"parameters": [{"in": "query", "name": "q"}]}}}}
    node["components"] = {"S": {"properties": {"a": {"description": "A"}, "b": {}}}}
    assert undescribed(node) == [
        "#/paths/x/get/parameters/0 (query q)",
        "#/components/S/properties/b",
    ]


def test_request_bodies_are_described_with_examples(spec: dict[str, Any]) -> None:
    for path, method in (("/v1/datasets", "post"), ("/v1/feedback/{stream}", "post")):
        body = spec["paths"][path][method]["requestBody"]
        assert body["description"], path
        for media_type, media in body["content"].items():
            assert media["examples"], (path, media_type)
    upload = spec["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert {"application/x-ndjson", "application/jsonl", "multipart/form-data"} <= set(upload)


def test_a_field_description_stays_on_the_field(spec: dict[str, Any]) -> None:
    """A type's component is described by its docstring, never by a field that refers to it."""
    types = {name: getattr(contract, name) for name in contract.__all__}
    types |= {"Problem": errors.Problem, "FieldError": errors.FieldError}
    types |= {  # the OpenAI-compatible surface's objects live apart, not re-exported
        name: value
        for name, value in vars(openai_contract).items()
        if isinstance(value, type) and issubclass(value, msgspec.Struct)
    }
    for name, schema in spec["components"]["schemas"].items():
        doc = types[name].__doc__
        assert words(schema.get("description")) == words(doc), name


def words(text: str | None) -> list[str]:
    return text.split() if text else []
