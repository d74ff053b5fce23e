"""What the OpenAPI documents beyond the types: errors, bodies, paging, descriptions."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

# Litestar 2.x exports no name for its msgspec plugin; it is extended, not copied.
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Example,
    OpenAPIMediaType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)
from litestar.params import Parameter
from litestar.typing import FieldDefinition

from service.api.errors import PROBLEM, Problem

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator

BAD_REQUEST = 400
UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404
CONFLICT = 409
TIMEOUT = 408
TOO_LARGE = 413
UNSUPPORTED = 415
INVALID = 422
TOO_MANY = 429
BAD_GATEWAY = 502
UNAVAILABLE = 503

_DESCRIPTIONS = {
    BAD_REQUEST: "Malformed parameter, header, multipart form or JSON nested too deeply",
    UNAUTHORIZED: "Missing or unknown API key",
    NOT_FOUND: "No such record for this tenant",
    CONFLICT: "Not allowed in the record's current state",
    TOO_LARGE: "Upload over the configured size limit (compressed or decompressed)",
    UNSUPPORTED: (
        "Not a file rows can be read from: `detail` says what was found and how to convert it; "
        "the `Accept-Post` header lists the accepted media types"
    ),
    INVALID: "Invalid body or rows; `errors` says where",
    FORBIDDEN: "The tenant was not granted a Hub token, Hub namespace or S3 prefix the request "
    "uses (or the caller is not an admin); `detail` names the grant",
    TOO_MANY: "The tenant is at one of its limits (request rate, queued jobs, datasets, ...): "
    "`detail` names it; `Retry-After`, `RateLimit-Policy` and `RateLimit` headers say when "
    "to try again",
    BAD_GATEWAY: "The Hub or S3 did not answer as expected",
    TIMEOUT: "The body arrived too slowly (FTUNE_UPLOAD_MIN_BYTES_PER_SECOND)",
    UNAVAILABLE: (
        "This server is taking its limit of uploads at once, or its temp space is short; "
        "retry after the `Retry-After` seconds"
    ),
}


PageSize = Annotated[int, Parameter(ge=1, le=200, description="Items per page.")]
Cursor = Annotated[
    str | None,
    Parameter(
        max_length=64,
        description="The previous page's `next_cursor`; omit it for the first page.",
    ),
]


def responses(*codes: int) -> dict[int, ResponseSpec]:
    """Problem Details responses for `codes`, plus 400, 401, 422 and 429 (the request rate)
    that every route can answer."""
    return {
        code: ResponseSpec(
            data_container=Problem,
            description=_DESCRIPTIONS[code],
            media_type=PROBLEM,
            generate_examples=False,
        )
        for code in sorted({BAD_REQUEST, UNAUTHORIZED, INVALID, TOO_MANY, *codes})
    }


def request_body(
    description: str,
    *,
    examples: dict[str, Example | Reference] | None = None,
    content: dict[str, OpenAPIMediaType] | None = None,
) -> type[Operation]:
    """An `operation_class` that describes the request body, with `examples` for each media type.

    Litestar derives a `data` body's schema but no description or example, and knows nothing
    of a body the handler reads from the raw request: `content` documents that one.
    """

    @dataclass
    class WithBody(Operation):
        def __post_init__(self) -> None:
            if content is not None:
                self.request_body = RequestBody(content=content, required=True)
            if not isinstance(self.request_body, RequestBody):
                raise TypeError("a route without a body needs request_body(content=...)")
            self.request_body.description = description
            for media in self.request_body.content.values():
                media.examples = media.examples or examples

    return WithBody


class ContractSchemas(StructSchemaPlugin):
    """Litestar's msgspec schemas, with the descriptions it leaves out or puts in the wrong place.

    A Struct's docstring describes its component, and a tagged union's tag is described. A
    field's description stays on the field: Litestar also writes it onto the Struct or enum
    the field refers to, the first time, and every other field referring to it shows it.
    """

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        described_enum = field_definition.is_enum and field_definition.kwarg_definition is not None
        return described_enum or super().is_plugin_supported_field(field_definition)

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        if field_definition.kwarg_definition is not None:
            # The component from the bare type; Litestar gives this wrapper the field's metadata.
            bare = FieldDefinition.from_annotation(field_definition.annotation)
            return Schema(all_of=[schema_creator.for_field_definition(bare)])
        schema = super().to_openapi_schema(field_definition, schema_creator)
        cls = field_definition.type_
        if cls.__doc__:
            schema.description = inspect.cleandoc(cls.__doc__)
        info = msgspec.inspect.type_info(cls)
        if isinstance(info, msgspec.inspect.StructType) and schema.properties:
            _exclusive_bounds(info, schema.properties)
        if isinstance(info, msgspec.inspect.StructType) and info.tag_field and schema.properties:
            tag = schema.properties[info.tag_field]
            if isinstance(tag, Schema):
                tag.description = (
                    f"Always `{info.tag}`: the discriminator that selects this variant."
                )
        return schema


def _exclusive_bounds(info: msgspec.inspect.StructType, properties: dict[str, Any]) -> None:
    """An optional number's `gt`/`lt` (e.g. a learning rate > 0 or left out): Litestar keeps
    its `ge`/`le` but drops these."""
    for field in info.fields:
        prop = properties.get(field.encode_name)
        kinds = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else ()
        if not isinstance(prop, Schema):
            continue
        for member in kinds:
            kind = member.type if isinstance(member, msgspec.inspect.Metadata) else member
            if isinstance(kind, msgspec.inspect.FloatType | msgspec.inspect.IntType):
                if kind.gt is not None and prop.exclusive_minimum is None:
                    prop.exclusive_minimum = kind.gt
                if kind.lt is not None and prop.exclusive_maximum is None:
                    prop.exclusive_maximum = kind.lt
