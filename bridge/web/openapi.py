"""The OpenAPI document of both listeners (``bridge/web/openapi.yaml``), for them to serve.

The YAML file is the source; it is read once per process, on first use, and its JSON
and YAML forms are kept as bytes so that serving them costs nothing per request.
``tests/e2e/test_admin_cli.py`` keeps it in step with the routes the apps register.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

import orjson
import yaml
from flask import Flask, Response

DOCUMENT = "openapi.yaml"
JSON_TYPE = "application/json"
YAML_TYPE = "application/yaml"


@cache
def as_yaml() -> bytes:
    """The document as shipped."""
    return files("bridge.web").joinpath(DOCUMENT).read_bytes()


@cache
def document() -> dict[str, Any]:
    """The document as plain data. Callers must not change it: it is shared."""
    loaded = yaml.safe_load(as_yaml())
    if not isinstance(loaded, dict):
        raise ValueError(f"bridge/{DOCUMENT} is not a mapping")
    return loaded


@cache
def as_json() -> bytes:
    return orjson.dumps(document())


def add_routes(app: Flask) -> None:
    """``/openapi.json`` and ``/openapi.yaml`` on a listener's app."""

    @app.get("/openapi.json", provide_automatic_options=False)
    def openapi_json() -> Response:
        return Response(as_json(), status=200, content_type=JSON_TYPE)

    @app.get("/openapi.yaml", provide_automatic_options=False)
    def openapi_yaml() -> Response:
        return Response(as_yaml(), status=200, content_type=YAML_TYPE)
