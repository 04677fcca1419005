"""The web dashboard: one page that draws the matrix, the catalog tree and live usage, and the JSON it polls.

`dashboard_state(session)` builds the state the page draws, from the real stores, in the caller's unit of work:
- `pools`: every matrix pool, fabric by fabric and node by node, each device `free`, `allocated` (with the slice
  that holds it and the deployment registered on that slice, if any) or `failed`;
- `deployments`: the portal's deployments, each with a fixed colour (the page colours a slice's devices with it);
- `catalog`: `catalog_service.catalog_tree` (L0 -> L1 -> L2);
- `usage`: requests and tokens over the last `usage_window_s` seconds, in all, and for the `USAGE_ENTRIES`
  busiest catalog entries (`entries` says how many were used): summed in SQL, so the state's size is bounded by
  the pools and the catalog whatever the usage history.

`dashboard_router(state_fn, authorize)` serves `GET /dashboard` (the page), `GET /dashboard/static/{file}` (its
script and style sheet: no CDN, no build step) and `GET /dashboard/state` (the JSON, for an admin key only:
`authorize(request)` is the app's own check and raises its 401/403). The page takes the key from the URL fragment
(`#key=sk-...`, never sent to the server in a URL) or a form, keeps it in `sessionStorage` and sends it as a
Bearer token.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from matrixstack.matrix.pools import FAILED, FREE, list_pools, show_pool
from matrixstack.openai.error_doc import BEARER, error_responses
from matrixstack.portal.catalog_service import catalog_tree
from matrixstack.portal.deployment_service import list_deployments
from matrixstack.portal.usage_service import busiest_entries

# matplotlib's tab10 without its red (failed devices) and grey (free ones), then tab20's light halves of the same.
DEPLOYMENT_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
)
USAGE_WINDOW_S = 60.0
USAGE_ENTRIES = 20  # the busiest entries the usage panel lists
STATIC_FILES = {  # the only files /dashboard/static serves: name -> media type
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def deployment_colour(index: int) -> str:
    """Return the hex colour of the `index`-th deployment (the palette repeats after 16)."""
    return DEPLOYMENT_COLOURS[index % len(DEPLOYMENT_COLOURS)]


def dashboard_state(
    session: Session,
    usage_window_s: float = USAGE_WINDOW_S,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Return the dashboard's state as a JSON-ready dict: pools, deployments, catalog, usage, generated_at."""
    now = now or datetime.now(UTC)
    deployments = [
        {
            "name": d["name"],
            "kind": d["kind"],
            "url": d["url"],
            "status": d["status"],
            "pool": d.get("pool"),
            "slice_id": d.get("slice_id"),
            "colour": deployment_colour(k),
        }
        for k, d in enumerate(list_deployments(session))
    ]
    return {
        "pools": pool_states(session, deployments),
        "deployments": deployments,
        "catalog": catalog_tree(session),
        "usage": usage_summary(session, usage_window_s, now),
        "generated_at": now.isoformat(),
    }


def pool_states(session: Session, deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return every pool as fabrics -> nodes -> devices, each device with its state, slice and deployment."""
    on_slice = {(d["pool"], d["slice_id"]): d["name"] for d in deployments if d["slice_id"] is not None}
    pools = []
    for summary in list_pools(session):
        view = show_pool(session, summary["pool"])
        fabrics = []
        for fabric, owners in zip(view.fabrics, view.owners, strict=True):
            per_node = fabric["devices_per_node"]
            nodes = []
            for node in range(fabric["nodes"]):
                devices = []
                for device in range(node * per_node, (node + 1) * per_node):
                    owner = owners[device]
                    if owner == FAILED:
                        state, slice_id = "failed", None
                    elif owner == FREE:
                        state, slice_id = "free", None
                    else:
                        state, slice_id = "allocated", owner
                    devices.append(
                        {
                            "device": device,
                            "state": state,
                            "deployment": on_slice.get((view.name, slice_id)) if slice_id is not None else None,
                            "slice": slice_id,
                        }
                    )
                nodes.append({"node": node, "devices": devices})
            fabrics.append({"index": fabric["index"], "name": fabric["name"], "nodes": nodes})
        pools.append({"name": view.name, "fabrics": fabrics})
    return pools


def usage_summary(session: Session, window_s: float, now: datetime) -> dict[str, Any]:
    """Return requests and tokens of the window [now - window_s, now), in all and for its USAGE_ENTRIES busiest
    entries (`usage_service.busiest_entries`), with the window and its tokens per second."""
    usage = busiest_entries(session, now - timedelta(seconds=window_s), now, USAGE_ENTRIES)
    tokens = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"window_s": window_s, **usage, "tokens_per_s": round(tokens / window_s, 3) if window_s > 0 else 0.0}


def static_text(name: str) -> str:
    """Return the text of one of the dashboard's packaged files (dashboard.html, .js or .css)."""
    return resources.files("matrixstack.portal").joinpath("static", name).read_text(encoding="utf-8")


def dashboard_router(
    state_fn: Callable[[], dict[str, Any]],
    authorize: Callable[[Request], Any | Awaitable[Any]],
) -> APIRouter:
    """Return the router of the dashboard: the page, its static files, and the admin-only state JSON.

    `state_fn()` returns the state (it may block on the database: it runs in a worker thread); `authorize(request)`
    raises the app's 401/403 unless the request carries an admin key (it may be a coroutine function).
    """
    router = APIRouter(tags=["dashboard"])

    @router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> HTMLResponse:
        base = request.scope.get("root_path", "").rstrip("/") + "/dashboard"
        html = static_text("dashboard.html").replace("{{base}}", base)
        return HTMLResponse(html, headers=PAGE_HEADERS | {"Cache-Control": "no-cache"})

    @router.get("/dashboard/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no dashboard file {name!r}; the files are {', '.join(STATIC_FILES)}")
        return Response(static_text(name), media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @router.get(
        "/dashboard/state",
        summary="Dashboard state (admin key)",
        responses=error_responses(401, 403),
        openapi_extra=BEARER,
    )
    async def state(request: Request) -> JSONResponse:
        checked = authorize(request)
        if inspect.isawaitable(checked):
            await checked
        body = await run_in_threadpool(state_fn)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router
