"""/docs in an air-gapped cluster: every script, style sheet and icon the pages ask for is
served by the API itself, byte for byte the vendored file, and nothing points off the host."""

from __future__ import annotations

import re

import pytest

from service.api.docs_ui import ASSETS_DIR
from tests.fixtures.api import Api

REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
CONTENT_TYPES = {".js": "javascript", ".css": "text/css"}


@pytest.mark.parametrize("page", ["/docs", "/docs/redoc", "/docs/swagger"])
async def test_docs_pages_load_everything_from_the_api(api: Api, page: str) -> None:
    resp = await api.client.get(page)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    html = resp.text
    references = REFERENCE.findall(html)
    assert references, html[:500]
    assert "//" not in "".join(r for r in references if not r.startswith("data:")), references
    assert "googleapis" not in html and "cdn." not in html
    for ref in references:
        if ref.startswith("data:"):
            continue
        asset = await api.client.get(ref)
        assert asset.status_code == 200, ref
        name = ref.rsplit("/", 1)[-1]
        assert asset.content == (ASSETS_DIR / name).read_bytes(), ref
        suffix = name[name.rfind(".") :]
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], ref
        assert "max-age=86400" in asset.headers["cache-control"]


async def test_the_schema_is_still_served_and_assets_are_not_in_it(api: Api) -> None:
    schema = (await api.client.get("/docs/openapi.json")).json()
    assert schema["info"]["title"] == "ftune"
    assert not [p for p in schema["paths"] if p.startswith("/docs")]


def test_each_vendored_bundle_ships_with_its_licence() -> None:
    names = {p.name for p in ASSETS_DIR.iterdir()}
    for bundle in ("redoc.standalone.js", "swagger-ui-bundle.js"):
        assert f"{bundle}.LICENSE.txt" in names
    assert {"redoc.LICENSE", "swagger-ui.LICENSE", "swagger-ui.NOTICE", "SOURCES.txt"} <= names
    assert "MIT License" in (ASSETS_DIR / "redoc.LICENSE").read_text()
    assert "Apache License" in (ASSETS_DIR / "swagger-ui.LICENSE").read_text()
