"""/docs without the internet: Redoc and Swagger UI load their JavaScript from this package.

Litestar's render plugins fetch their bundles from a CDN by default, so the docs page is
blank in an air-gapped cluster. Here each plugin gets a local `js_url` (and `css_url`),
served by a static route; the files and their licences are in static/docs (SOURCES.txt).
"""

from __future__ import annotations

from pathlib import Path

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.openapi.plugins import (
    OpenAPIRenderPlugin,
    RedocRenderPlugin,
    SwaggerRenderPlugin,
)
from litestar.static_files import create_static_files_router

ASSETS_DIR = Path(__file__).resolve().parent / "static" / "docs"
ASSETS_PATH = "/docs/assets"
REDOC_VERSION = "2.5.2"
SWAGGER_UI_VERSION = "5.35.0"
# Litestar's default favicon is a CDN image too; an empty data URL asks for nothing.
_NO_FAVICON = "<link rel='icon' href='data:,'>"


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """Redoc at /docs (as before), Swagger UI with "Try it out" at /docs/swagger."""
    return [
        RedocRenderPlugin(
            path=["/", "/redoc"],
            js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            google_fonts=False,
            favicon=_NO_FAVICON,
        ),
        SwaggerRenderPlugin(
            path="/swagger",
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
            favicon=_NO_FAVICON,
        ),
    ]


def assets_router() -> Router:
    """The bundles, cached by browsers for a day (their names carry no version)."""
    return create_static_files_router(
        path=ASSETS_PATH,
        directories=[ASSETS_DIR],
        include_in_schema=False,
        cache_control=CacheControlHeader(max_age=86400, public=True),
    )
