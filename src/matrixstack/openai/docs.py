"""`GET /docs`: the API's routes as one self-contained HTML page, instead of FastAPI's Swagger UI.

FastAPI's `/docs` and `/redoc` pages load their scripts and styles from a public CDN, unpinned: a page that
breaks without internet (these servers often run without it) and runs whatever the CDN serves. This page has no
script and loads nothing: it lists each route (method, path, summary, its JSON body's schema) from the app's own
OpenAPI document and links to `/openapi.json`, which any OpenAPI tool reads. An app passes `docs_url=None,
redoc_url=None` to FastAPI and calls `install_docs(app)`.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

METHODS = ("get", "post", "put", "patch", "delete")
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}
STYLE = "body{font-family:sans-serif;margin:2em;max-width:70em}td,th{padding:.2em .8em;text-align:left}"


def docs_page(schema: dict[str, Any]) -> str:
    """Return the HTML page listing the routes of the OpenAPI document `schema`."""
    info = schema.get("info", {})
    rows = []
    for path, operations in schema.get("paths", {}).items():
        for method in METHODS:
            operation = operations.get(method)
            if operation is None:
                continue
            content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            body = content.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1]
            cells = (method.upper(), path, operation.get("summary", ""), body)
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    title = html.escape(info.get("title", "API"))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
        f"<body><h1>{title}</h1><p>{html.escape(info.get('description', ''))}</p>"
        "<p>The whole schema: <a href='openapi.json'>openapi.json</a> (OpenAPI 3; open it in any OpenAPI tool).</p>"
        "<table><tr><th>method</th><th>path</th><th>what</th><th>JSON body</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )


def install_docs(app: FastAPI) -> None:
    """Serve `GET /docs` on `app`: the page of `docs_page` for the app's OpenAPI document."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()), headers=PAGE_HEADERS)
