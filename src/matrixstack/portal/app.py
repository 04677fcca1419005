"""The portal's HTTP app: the OpenAI-compatible /v1 API over the catalog, the admin API, metrics, dashboard.

`create_portal_app(db_url)` builds a FastAPI app on the portal database (the matrix layer's by default):
- `GET /v1/models`, `GET /v1/models/{model}`: the entries the caller's tenant may call, as OpenAI model cards
  with `level`, `parent` and `provider`;
- `POST /v1/chat/completions`, `POST /v1/completions`: resolved, limited, forwarded and metered by the `Gateway`
  (portal/gateway.py), streamed (SSE) or not, usage in every response, `model` = the catalog entry;
- `/admin/...`: the admin API (portal/admin_api.py), for admin keys;
- `GET /metrics` (Prometheus: with the scrape token or an admin key every series; without a token configured,
  anyone, private entries' names summed away: portal/scrape.py), `GET /health` (each deployment's status: 200
  `ok` / `degraded`, 503 `unavailable` only when nothing can serve; portal/lane_health.py), `GET /openapi.json`,
  `GET /docs` (`openai.docs`: a page that loads nothing from a CDN);
- `GET /dashboard` and `/dashboard/state` (portal/dashboard.py).

Before any route, every request passes `openai.guard.RequestGuard`: a body over `max_body_mib` (default 4 MiB) is a
413 `request_too_large`, read no further; a body declared with a non-JSON content type a 400. Every response
carries `portal.headers`' anti-framing and no-sniff headers.

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 401 `invalid_api_key` without a valid
key, 403 `permission_denied` for an admin route with a non-admin key, 404 `model_not_found`, 429
`rate_limit_exceeded` / `insufficient_quota` with `Retry-After`, 503 `deployment_not_running` (with
`Retry-After` while it restarts), 400 naming the param for an invalid body or a user error; a backend's failure as
the portal's own error (502 `upstream_error` / `upstream_auth_failed`, 503 `upstream_busy`, ...:
portal/upstream_errors.py), never the backend's body. The OpenAPI schema documents each route's error statuses
with that body (`openai.error_doc`; no 422: validation errors are 400s).

Keys and catalog entries are cached `cache_ttl_s` seconds (default 5): an entry changed by another process (the
CLI) takes effect within that time, through this app's admin API at once; a key revoked or limited anywhere within
a second (the gateway's key watch, started with the app's lifespan). Usage goes to
the database through a background batch writer (`UsageWriter`), started and stopped (after a last flush) with
the app's lifespan.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from matrixstack.errors import UserError
from matrixstack.matrix.database import Database
from matrixstack.openai.docs import install_docs
from matrixstack.openai.endpoints import CHAT, COMPLETION, ENDPOINTS, Endpoint
from matrixstack.openai.error_doc import (
    BEARER,
    body_doc,
    document_bodies,
    error_responses,
    without_validation_responses,
)
from matrixstack.openai.errors import (
    ClientGone,
    OpenAIError,
    UpstreamError,
    error_body,
    install_openai_error_handlers,
    validation_error,
)
from matrixstack.openai.guard import DEFAULT_MAX_BODY_MIB, RequestGuard, max_body_bytes
from matrixstack.portal.admin_api import admin_router
from matrixstack.portal.dashboard import dashboard_router, dashboard_state
from matrixstack.portal.encoding import JsonResponse
from matrixstack.portal.gateway import DEFAULT_CACHE_TTL_S, Gateway, openai_error
from matrixstack.portal.headers import secure_send
from matrixstack.portal.key_service import KeyInfo
from matrixstack.portal.lane_health import health_report
from matrixstack.portal.limits import KeyLimiter
from matrixstack.portal.metrics import PortalMetrics, pool_utilisation
from matrixstack.portal.resolve import RangeError
from matrixstack.portal.scrape import metrics_response, scrape_token
from matrixstack.portal.spec import EntrySpec, UnknownEntry
from matrixstack.portal.store import open_portal_database
from matrixstack.portal.usage_service import record_usage
from matrixstack.portal.usage_writer import INTERVAL_S, UsageWriter

LOG = logging.getLogger("matrixstack.portal")
bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer sk-...`")


@dataclass
class Portal:
    """What one portal app holds: the database, the gateway, metrics and the usage writer."""

    db: Database
    gateway: Gateway
    metrics: PortalMetrics
    writer: UsageWriter

    def close(self) -> None:
        """Write the queued usage, then close the database connections."""
        self.writer.stop()
        self.db.close()


def model_card(entry: EntrySpec) -> dict[str, Any]:
    """Return an entry as an OpenAI model card with its level, parent, provider and description."""
    return {
        "id": entry.name,
        "object": "model",
        "created": 0,
        "owned_by": entry.owner or ("matrixstack" if entry.provider == "first-party" else "third-party"),
        "level": entry.level,
        "parent": entry.parent,
        "provider": entry.provider,
        "description": entry.description,
    }


def _user_error(exc: UserError) -> OpenAIError:
    """Return the HTTP error of a user error: 404 model_not_found for an unknown entry, else 400 (with the param
    of a RangeError)."""
    if isinstance(exc, UnknownEntry):
        return OpenAIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, RangeError):
        return OpenAIError(400, str(exc), param=exc.param)
    return OpenAIError(400, str(exc))


def error_response(exc: Exception) -> Response:
    """Return the OpenAI-format response of an error raised on the request path (the hot routes' handler)."""
    if isinstance(exc, OpenAIError):
        return exc.response()
    if isinstance(exc, UpstreamError):
        return JsonResponse(exc.body, status_code=exc.status_code)
    if isinstance(exc, ClientGone):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    if isinstance(exc, UserError):
        return _user_error(exc).response()
    LOG.exception("internal error", exc_info=exc)
    return JsonResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


class PortalApp(FastAPI):
    """The portal's FastAPI app, answering the two completion routes before its middleware and router.

    Every request passes through FastAPI's middleware stack (error, exception, exit-stack and body-limit
    middleware), its router and its endpoint wrapper before reaching a route: ~0.1 ms of CPU together, a sixth of
    what the portal spends on a proxied request. `POST /v1/chat/completions` and `POST /v1/completions` go to the
    gateway directly instead, errors answered as the app's handlers would (`error_response`); the routes stay
    declared on the app, so the OpenAPI schema and every other route are FastAPI's as usual.
    """

    gateway: Gateway
    guard: RequestGuard  # over `serve`

    async def __call__(self, scope, receive, send) -> None:
        """Serve one ASGI connection: its body checked by the guard, the security headers on its response."""
        await self.guard(scope, receive, secure_send(send) if scope["type"] == "http" else send)

    async def serve(self, scope, receive, send) -> None:
        """Serve one ASGI connection: a hot route here, anything else through FastAPI."""
        if scope["type"] == "http" and scope["method"] == "POST":
            route = HOT_ROUTES.get(scope["path"])
            if route is not None:
                scope["app"] = self
                request = Request(scope, receive, send)
                try:
                    response = await self.gateway.handle(request, route)
                except Exception as exc:
                    response = error_response(exc)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


HOT_ROUTES: dict[str, Endpoint] = {f"/v1{endpoint.path}": endpoint for endpoint in ENDPOINTS}
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"}},
}
STREAMED = {"description": "the completion: JSON, or server-sent events when `stream` is true",
            "content": {"text/event-stream": {"schema": SSE_EVENT}}}  # fmt: skip
COMPLETION_RESPONSES = {200: STREAMED} | error_responses(400, 401, 404, 413, 429, 502, 503, 504)


def _admin_only() -> OpenAIError:
    """Return the 403 of an admin route called with a key that is not an admin's."""
    return openai_error(403, "this route needs an admin API key", "permission_denied")


async def _key_refusal(gateway: Gateway, request: Request) -> OpenAIError | None:
    """Return the 401 (no valid key) or 403 (an admin route, a key that is not an admin's) of a request to a keyed
    route, None when its key may call it. FastAPI reads and validates a body before the route's key dependency
    runs; an invalid body must not answer 400 to a caller without a key."""
    path = request.url.path
    if not path.startswith(("/v1/", "/admin/")):
        return None
    try:
        key = await gateway.authenticate(request.headers.get("authorization"))
    except OpenAIError as exc:
        return exc
    return _admin_only() if path.startswith("/admin/") and not key.is_admin else None


def _install_error_handlers(app: FastAPI, gateway: Gateway) -> None:
    """Answer every error in OpenAI's format."""

    install_openai_error_handlers(app)
    http_error = app.exception_handlers[StarletteHTTPException]

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        refused = await _key_refusal(gateway, request) if exc.status_code == 400 else None  # a body FastAPI can't parse
        return refused.response() if refused is not None else await http_error(request, exc)

    @app.exception_handler(UpstreamError)
    @app.exception_handler(UserError)
    async def _path_error(_: Request, exc: Exception) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        refused = await _key_refusal(gateway, request)
        if refused is not None:
            return refused.response()
        error = validation_error(list(exc.errors()))
        if request.url.path.startswith("/v1/"):
            gateway.log_rejected(request, error.status_code, error.message, getattr(request.state, "key", None))
        return error.response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> Response:
        return error_response(exc)


def create_portal_app(
    db_url: str | None,
    *,
    log_json: bool = True,
    cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
    usage_interval_s: float = INTERVAL_S,
    metrics_token: str | None = None,
    max_body_mib: float = DEFAULT_MAX_BODY_MIB,
) -> FastAPI:
    """Return the portal's FastAPI app on the database at `db_url` (None: the default SQLite file).

    `log_json` writes each request's log line as one JSON object (else `key=value` pairs); `cache_ttl_s` is how
    long keys and resolved entries are cached; `usage_interval_s` how often the usage writer writes a batch;
    `metrics_token` the token /metrics asks for (default $MATRIXSTACK_METRICS_TOKEN; none: see portal/scrape.py).
    `max_body_mib` the largest request body taken (413 above).
    """
    db = open_portal_database(db_url)
    metrics = PortalMetrics(lambda: db.read(pool_utilisation))
    writer = UsageWriter(
        lambda records: db.write(lambda session: record_usage(session, records)), interval_s=usage_interval_s
    )
    gateway = Gateway(db, metrics, writer, KeyLimiter(), cache_ttl_s=cache_ttl_s, log_json=log_json)
    portal = Portal(db, gateway, metrics, writer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        writer.start()
        gateway.start()
        try:
            yield
        finally:
            await gateway.aclose()
            await run_in_threadpool(portal.close)

    app = PortalApp(
        title="MatrixStack portal",
        description="OpenAI-compatible API over the MatrixStack catalog (L0 / L1 / L2 entries, first- and "
        "third-party), with tenants, API keys, limits, usage, metrics and an admin API.",
        version="1",
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry hooks cost ~0.1 ms per request even unconfigured; the portal has its
        # own metrics (/metrics) and request log.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: `install_docs` serves one without
        redoc_url=None,
    )
    app.state.portal = portal
    app.gateway = gateway
    app.guard = RequestGuard(
        app.serve, max_body_bytes(max_body_mib), lambda scope: _key_refusal(gateway, Request(scope))
    )
    install_docs(app)
    _install_error_handlers(app, gateway)

    async def caller(
        request: Request, _: HTTPAuthorizationCredentials | None = Security(bearer)
    ) -> KeyInfo:  # the Security parameter puts the scheme in the OpenAPI schema
        try:
            key = await gateway.authenticate(request.headers.get("authorization"))
        except OpenAIError as exc:
            gateway.log_rejected(request, exc.status_code, exc.message)
            raise
        request.state.key = key
        return key

    async def require_admin(request: Request, key: KeyInfo = Depends(caller)) -> KeyInfo:
        if not key.is_admin:
            raise _admin_only()
        return key

    async def authorize_admin(request: Request) -> KeyInfo:
        return await require_admin(request, await gateway.authenticate(request.headers.get("authorization")))

    # ---- OpenAI API ----

    @app.get("/v1/models", summary="The catalog entries the caller may use", tags=["openai"],
             responses=error_responses(401))  # fmt: skip
    async def list_models(key: KeyInfo = Depends(caller)) -> Response:
        entries = await gateway.visible_entries(key)
        return JsonResponse({"object": "list", "data": [model_card(e) for e in entries]})

    @app.get("/v1/models/{model:path}", summary="One catalog entry", tags=["openai"],
             responses=error_responses(401, 404))  # fmt: skip
    async def get_model(model: str, key: KeyInfo = Depends(caller)) -> Response:
        for entry in await gateway.visible_entries(key):
            if entry.name == model:
                return JsonResponse(model_card(entry))
        raise openai_error(404, f"The model `{model}` does not exist or you do not have access to it.",
                           "model_not_found", "model")  # fmt: skip

    # PortalApp answers the two hot routes before FastAPI's routing; these declarations put them in the OpenAPI
    # document. They read and validate their bodies themselves (`Endpoint.parse`: the JSON parsed once, the dict
    # validated, after the key is checked); `document_bodies` adds the body schemas.
    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI)", tags=["openai"],
              openapi_extra=body_doc(CHAT.body_model) | BEARER, responses=COMPLETION_RESPONSES)  # fmt: skip
    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, CHAT)

    @app.post("/v1/completions", summary="Text completion (OpenAI)", tags=["openai"],
              openapi_extra=body_doc(COMPLETION.body_model) | BEARER, responses=COMPLETION_RESPONSES)  # fmt: skip
    async def completions(request: Request) -> Response:
        return await gateway.handle(request, COMPLETION)

    # ---- admin, metrics, health ----

    app.include_router(admin_router(gateway, require_admin))

    token = scrape_token(metrics_token)

    @app.get("/metrics", summary="Prometheus metrics (scrape token or admin key: portal/scrape.py)", tags=["ops"],
             response_class=PlainTextResponse, responses=error_responses(401, 403))  # fmt: skip
    async def prometheus(request: Request) -> Response:
        return await metrics_response(request, gateway, token)

    unavailable = {503: {"description": "unavailable: no deployment runs and no other backend can serve"}}

    @app.get("/health", summary="Each deployment's status; 503 only when nothing can serve", tags=["ops"],
             responses=unavailable)  # fmt: skip
    async def health() -> Response:
        status_code, body = await run_in_threadpool(db.read, health_report)
        return JsonResponse(body, status_code=status_code)

    document_bodies(app, tuple(endpoint.body_model for endpoint in ENDPOINTS))
    without_validation_responses(app)

    # ---- dashboard (portal/dashboard.py) ----
    app.include_router(dashboard_router(lambda: db.read(dashboard_state), authorize_admin))

    return app
