"""The portal's request path: authenticate, resolve the catalog entry, check limits, forward, meter.

`Gateway` holds what the hot path needs in memory so that a request touches no database:
- API keys by their sha256, cached `cache_ttl_s` seconds (`DEFAULT_CACHE_TTL_S`) and dropped at once when a key
  changes: through this portal's admin API directly, and anywhere else (the CLI, another portal process) when the
  watch started by `start()`, which reads `key_service.key_generation` every `KEY_POLL_S` on a worker thread, sees
  it grow: a revoked key is refused within a second wherever it was revoked;
- resolved catalog entries and model lists per tenant, cached the same way and dropped at once when the catalog
  changes through this portal's admin API; a resolution whose deployment cannot be reached (a crashed engine,
  which its site restarts and records `restarting`) is answered 503 with Retry-After (`lane_health.LaneDown`)
  and dropped, so the next request reads the deployment's status (503 while it is down) instead of the stale URL;
  one that comes back is routed to again within the cache period;
- one backend client per (backend URL, api_key): an `Upstream` (`openai.client.upstream_client`: lean keep-alive
  connections for plain-HTTP backends on the fabric, httpx for HTTPS ones, hosted APIs) with the backend's key
  opened (sealed at rest or an `env:` reference) and its failures turned into the portal's own errors, never a
  backend's body (`portal.upstream_errors`);
- `KeyLimiter` (rpm, tpm, lifetime quota seeded once per key from the database; portal/limits.py);
- usage records go to the `UsageWriter` queue (a completed request's answer, or a stream's last piece, leaves only
  once its record is written: a group commit); metrics and one JSON log line per request are written at the end.
  A usage record names the catalog entry the request resolved to, or `UNKNOWN_ENTRY` for every name that resolves
  to nothing (the client's text is never stored); the log line's client texts are bounded (portal/bounds.py).

Database reads on a cache miss run in a worker thread, never on the event loop; a request body over
`BodyPool.threshold_bytes` (256 KiB) is parsed and validated in a child process (`openai.body_pool`), so a large
body costs the event loop (every other request) only its reading, forwarding and the return of the parsed body.

A completion request: once its key is checked, it is admitted against the key's limits (429 with Retry-After;
from then on it counts against the key's rpm whatever its outcome); then its body is validated (400), its entry
resolved for the key's tenant (400 `string_above_max_length` for a `model` over `bounds.MODEL_MAX_CHARS`, 404
`model_not_found` for an unknown entry or another tenant's private one), the entry's settings applied (400 naming
the param when a value is outside an L2 range), the request's most tokens reserved against the key's tpm limit and
quota (429; settled with the real usage when the request ends, however it ends), and it is forwarded. A stream
always asks the backend for `stream_options.include_usage` and always ends with a usage chunk, then
`data: [DONE]`. The response's `model` is the catalog entry's name. A client that goes away cancels the
backend request (streamed: closing the stream closes the upstream connection; not streamed: the request's client
watcher, `openai.disconnect`, cancels the wait for the backend's answer).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from matrixstack.errors import UserError
from matrixstack.matrix.database import Database
from matrixstack.openai.body_pool import BodyPool
from matrixstack.openai.client import Upstream
from matrixstack.openai.disconnect import until_disconnect
from matrixstack.openai.endpoints import Endpoint
from matrixstack.openai.errors import UNREACHABLE, ClientGone, OpenAIError, UpstreamError
from matrixstack.openai.guard import body_chunks
from matrixstack.openai.sse import EventStream
from matrixstack.openai.types import SamplingFields, usage
from matrixstack.portal.bounds import bounded, model_too_long
from matrixstack.portal.cache import TtlCache
from matrixstack.portal.catalog_service import list_entries, resolve_entry
from matrixstack.portal.encoding import JsonResponse, dumps
from matrixstack.portal.key_service import KeyInfo, authenticate, key_generation
from matrixstack.portal.keys import hash_key
from matrixstack.portal.lane_health import LaneDown
from matrixstack.portal.limits import KeyLimiter, request_tokens_bound
from matrixstack.portal.metrics import PortalMetrics
from matrixstack.portal.relay import CLIENT_CLOSED, Metered, StreamRelay
from matrixstack.portal.resolve import DeploymentNotRunning, RangeError, Resolved
from matrixstack.portal.spec import BackendSpec, EntrySpec, UnknownEntry
from matrixstack.portal.upstream_errors import guarded_client
from matrixstack.portal.usage_service import UsageRecord, tokens_used
from matrixstack.portal.usage_writer import UsageWriter, written

LOG = logging.getLogger("matrixstack.portal")
T = TypeVar("T")
DEFAULT_CACHE_TTL_S = 5.0
KEY_POLL_S = 0.25  # how often the key watch reads the last key change: a revocation elsewhere holds at most this
UNKNOWN_ENTRY = "(unknown)"


def new_request_id() -> str:
    """Return a new request id: 32 random hex digits (not secret, so not from the OS: no system call per request)."""
    return f"{random.getrandbits(128):032x}"


def openai_error(status_code: int, message: str, code: str | None = None, param: str | None = None, **kw) -> Any:
    """Return an OpenAIError (answered in OpenAI's error format by the app's handler)."""
    return OpenAIError(status_code, message, param=param, code=code, **kw)


class RateLimited(OpenAIError):
    """A 429 with its Retry-After in whole seconds."""

    def __init__(self, message: str, code: str, retry_after_s: int):
        super().__init__(429, message, code=code, type_="requests" if code == "rate_limit_exceeded" else code)
        self.retry_after_s = retry_after_s

    def response(self) -> Response:
        """Return the error as a JSON response with a Retry-After header."""
        return JsonResponse(self.body(), status_code=429, headers={"Retry-After": str(self.retry_after_s)})


def bearer_token(authorization: str | None) -> str | None:
    """Return the token of an `Authorization: Bearer TOKEN` header value (None when there is none)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Gateway:
    """Authentication, resolution, limits, forwarding and metering of /v1 requests (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        metrics: PortalMetrics,
        writer: UsageWriter,
        limiter: KeyLimiter | None = None,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        log_json: bool = True,
    ):
        self.db = db
        self.metrics = metrics
        self.writer = writer
        self.limiter = limiter or KeyLimiter()
        self.log_json = log_json
        self.keys = TtlCache(cache_ttl_s)
        self.catalog = TtlCache(cache_ttl_s)
        self._clients: dict[tuple[str, str | None], Upstream] = {}
        self._backend_models: dict[tuple[str, str | None], str] = {}
        self._seeds = TtlCache(cache_ttl_s)  # shares one database read among a new key's first requests
        self._key_watch: asyncio.Task | None = None
        self.bodies = BodyPool()

    # ---- caches -------------------------------------------------------------------------------------------

    def catalog_changed(self) -> None:
        """Forget resolved entries, model lists and discovered backend model ids (the catalog changed through this
        portal)."""
        self.catalog.clear()
        self._backend_models.clear()

    def keys_changed(self) -> None:
        """Forget cached keys (a key was revoked or its limits changed)."""
        self.keys.clear()

    def start(self) -> None:
        """Start the key watch on the running event loop (see the module docstring) and the body pool's children;
        `aclose()` ends them."""
        self._key_watch = asyncio.get_running_loop().create_task(self._watch_keys())
        self.bodies.start()

    async def _watch_keys(self) -> None:
        """Forget cached keys whenever the last key change in the database is a new one, read every KEY_POLL_S."""
        seen = None
        while True:
            try:
                last = await self.read(key_generation)
            except Exception:  # the database unreachable for a moment: keep the keys, try again
                LOG.warning("reading key changes failed", exc_info=True)
            else:
                if seen is not None and last != seen:
                    self.keys_changed()
                seen = last
            await asyncio.sleep(KEY_POLL_S)

    async def authenticate(self, authorization: str | None) -> KeyInfo:
        """Return the KeyInfo of the request's Bearer key; raise a 401 `invalid_api_key` when it is missing, unknown
        or revoked."""
        token = bearer_token(authorization)
        if token is None:
            raise openai_error(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer sk-...'",
                "invalid_api_key",
            )
        digest = hash_key(token)
        key = await self.keys.get_or_load(digest, lambda: self.read(authenticate, token))
        if key is None or key.revoked:
            shown = token[:12] + "..." if len(token) > 12 else "..."
            raise openai_error(401, f"Incorrect API key provided: {shown}", "invalid_api_key")
        return key

    async def resolve(self, entry: str, key: KeyInfo) -> Resolved:
        """Return the resolved settings of `entry` as `key`'s tenant sees it; a 404 `model_not_found` otherwise, a
        503 `deployment_not_running` while the deployment its L0 names is registered but not running."""
        if not isinstance(entry, str) or not entry:
            raise openai_error(400, "'model' is a required property", param="model")
        if too_long := model_too_long(entry):
            raise openai_error(400, too_long, "string_above_max_length", "model")

        async def load() -> Resolved | str | DeploymentNotRunning:
            try:
                return await self.read(resolve_entry, entry, key.tenant, key.is_admin)
            except UnknownEntry as exc:
                return str(exc)  # cached like a hit, so unknown names do not reach the database each time
            except DeploymentNotRunning as exc:
                return exc  # cached the same way: a stopped deployment is asked about once per cache period

        resolved = await self.catalog.get_or_load(("resolve", entry, key.tenant, key.is_admin), load)
        if isinstance(resolved, str):
            raise openai_error(404, f"The model `{entry}` does not exist or you do not have access to it.",
                               "model_not_found", "model")  # fmt: skip
        if isinstance(resolved, DeploymentNotRunning):
            raise LaneDown(resolved.deployment, resolved.status)
        return resolved

    async def visible_entries(self, key: KeyInfo) -> list[EntrySpec]:
        """Return the catalog entries `key`'s tenant may call."""
        return await self.catalog.get_or_load(
            ("models", key.tenant, key.is_admin),
            lambda: self.read(list_entries, key.tenant, key.is_admin),
        )

    async def _seed_usage(self, key: KeyInfo) -> None:
        """Read the key's lifetime tokens from the database once per process, before its first request here (also
        for keys without a quota: an admin may set one later, and the count must be right then)."""
        if self.limiter.needs_seed(key.id):
            self.limiter.seed(key.id, await self._seeds.get_or_load(key.id, lambda: self.read(tokens_used, key.id)))

    async def read(self, service: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Return `service(session, *args, **kwargs)` run in one read unit of work of the database, on a worker
        thread (the event loop never waits on the database); the admin API's reads go through it too."""
        return await run_in_threadpool(self.db.read, lambda session: service(session, *args, **kwargs))

    async def write(self, service: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Return `service(session, *args, **kwargs)` run in one write unit of work (committed), on a worker thread."""
        return await run_in_threadpool(self.db.write, lambda session: service(session, *args, **kwargs))

    # ---- backends -----------------------------------------------------------------------------------------

    def client(self, backend: BackendSpec) -> Upstream:
        """Return the one client of (backend URL, api_key), made on first use (`upstream_errors.guarded_client`)."""
        ident = (backend.url, backend.api_key)
        client = self._clients.get(ident)
        if client is None:
            client = self._clients[ident] = guarded_client(backend)
        return client

    async def backend_model(self, resolved: Resolved, client: Upstream) -> str:
        """Return the model id to send: the resolved one, or for an engine/vLLM backend without `model` (and no
        adapter to name) the first model the backend lists (asked once)."""
        backend = resolved.backend
        if backend.model or backend.kind == "upstream" or (backend.adapters and resolved.adapter):
            return resolved.backend_model()
        ident = (backend.url, backend.api_key)
        model = self._backend_models.get(ident)
        if model is None:
            ids = await client.model_ids()
            if not ids:
                raise openai_error(502, f"backend {backend.url} serves no model", "upstream_error",
                                   type_="server_error")  # fmt: skip
            model = self._backend_models[ident] = ids[0]
        return model

    async def aclose(self) -> None:
        """End the key watch and the body pool's children, and close every backend client."""
        if self._key_watch is not None:
            self._key_watch.cancel()
        self.bodies.close()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    # ---- the request path -------------------------------------------------------------------------------

    async def handle(self, request: Request, endpoint: Endpoint) -> Response:
        """Return the response to a /v1 completion request at `endpoint`: check the key (401), parse and validate
        the JSON body (once, a large one in a child process: 400 naming the field), then `forward` it as the client
        sent it."""
        try:
            key = await self.authenticate(request.headers.get("authorization"))
        except OpenAIError as exc:
            self.log_rejected(request, exc.status_code, exc.message)
            raise
        await self.admit(request, key)
        try:
            body, parsed = await self.bodies.run(endpoint.parse, await body_chunks(request))
        except OpenAIError as exc:
            self.log_rejected(request, exc.status_code, exc.message, key)
            raise
        return await self.forward(request, key, endpoint, body, parsed)

    async def admit(self, request: Request, key: KeyInfo) -> None:
        """Count the authenticated request against `key`'s limits; raise (and log) the 429 when they refuse it."""
        await self._seed_usage(key)
        refusal = self.limiter.admit(key)
        if refusal is not None:
            self.metrics.observe((UNKNOWN_ENTRY, "", ""), 429, 0, 0)
            self.log_rejected(request, 429, refusal.message, key)
            raise RateLimited(refusal.message, refusal.code, refusal.retry_after_s)

    async def forward(
        self, request: Request, key: KeyInfo, endpoint: Endpoint, body: dict[str, Any], parsed: SamplingFields
    ) -> Response:
        """Return the response to `key`'s request `body` at `endpoint`, as sent (`parsed`: validated; see the
        module docstring)."""
        m = Metered(request_id=new_request_id(), started_s=time.perf_counter(), stream=parsed.stream)
        m.key = key
        m.entry = parsed.model
        self.metrics.queue_depth.inc()
        streaming = metered = False
        try:
            resolved = await self.resolve(m.entry, m.key)
            m.resolved = True
            m.lane, m.deployment = resolved.backend.kind, resolved.backend.deployment or ""
            try:
                applied = resolved.apply(endpoint, body)
            except RangeError as exc:
                raise openai_error(400, str(exc), param=exc.param) from None
            except UserError as exc:
                raise openai_error(400, str(exc), param=endpoint.prompt_param) from None
            m.reserved_tokens, refusal = self.limiter.reserve(m.key, request_tokens_bound(endpoint, applied))
            if refusal is not None:
                raise RateLimited(refusal.message, refusal.code, refusal.retry_after_s)
            client = self.client(resolved.backend)
            applied["model"] = await self.backend_model(resolved, client)
            if m.stream:
                response = await self._stream(request, client, endpoint, applied, m)
                streaming = True
                return response
            answer = await until_disconnect(request, client.send(endpoint, applied))
            answer["model"] = m.entry
            used = answer.get("usage") or {}
            m.prompt_tokens = int(used.get("prompt_tokens") or 0)
            m.completion_tokens = int(used.get("completion_tokens") or 0)
            if not answer.get("usage"):
                answer["usage"] = usage(m.prompt_tokens, m.completion_tokens)
            metered = True
            await written(self.finish(m))  # billed before the client sees the answer
            return JsonResponse(answer, headers={"x-request-id": m.request_id})
        except BaseException as exc:
            m.status, m.error = _status_of(exc)
            unreachable = isinstance(exc, UpstreamError) and exc.code == UNREACHABLE
            if unreachable and m.resolved and resolved.backend.deployment is not None:
                self.catalog.forget(("resolve", m.entry, key.tenant, key.is_admin))  # its status may have changed
                down = LaneDown(resolved.backend.deployment, "unreachable")
                m.status, m.error = down.status_code, down.message
                raise down from exc
            raise
        finally:
            if not streaming and not metered:
                self.finish(m)

    async def _stream(
        self, request: Request, client: Upstream, endpoint: Endpoint, body: dict[str, Any], m: Metered
    ) -> Response:
        """Return the SSE response relaying the backend's stream (waits for the first chunk, so a backend that
        refuses the request is answered with an error status, not a stream)."""
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        blocks = client.stream(endpoint, body)
        try:
            first = await until_disconnect(request, blocks.__anext__())
        except StopAsyncIteration:
            first = None
        except BaseException:
            await blocks.aclose()  # type: ignore[attr-defined]
            raise
        relay = StreamRelay(blocks, first, endpoint, m, self.finish)
        return EventStream(relay.events(), relay.close)

    # ---- metering ---------------------------------------------------------------------------------------

    def finish(self, m: Metered) -> asyncio.Future | None:
        """Meter one finished request: settle its reserved tokens, the usage record (under its catalog entry, or the
        unknown bucket), metrics and the log line. Return, for a completed request (status 200), the future of its
        usage row's commit (`UsageWriter.commit`), which the caller awaits before the answer's last piece leaves;
        None for any other (its record goes with the writer's next round)."""
        durable = None
        latency_s = time.perf_counter() - m.started_s
        self.metrics.queue_depth.dec()
        tokens = m.prompt_tokens + m.completion_tokens
        if m.key is not None:
            self.limiter.settle(m.key.id, m.reserved_tokens, tokens)
            if m.entry:
                record = UsageRecord(
                    tenant_id=m.key.tenant_id,
                    key_id=m.key.id,
                    entry=m.entry if m.resolved else UNKNOWN_ENTRY,  # never a client's unknown text
                    prompt_tokens=m.prompt_tokens,
                    completion_tokens=m.completion_tokens,
                    status_code=m.status,
                    latency_ms=latency_s * 1000.0,
                    ttft_ms=None if m.ttft_s is None else m.ttft_s * 1000.0,
                    created_at=datetime.now(UTC),
                )
                if m.status == 200:
                    durable = self.writer.commit(record)
                else:
                    self.writer.submit(record)
        if m.key is not None:
            label = m.entry if m.resolved and m.entry else UNKNOWN_ENTRY  # random names must not make new series
            route = (label, m.lane, m.deployment)
            self.metrics.observe(route, m.status, m.prompt_tokens, m.completion_tokens, m.ttft_s, m.tpot_s)
        if LOG.isEnabledFor(logging.INFO):
            self._log(m, latency_s)
        return durable

    def log_rejected(self, request: Request, status: int, message: str, key: KeyInfo | None = None) -> None:
        """Log the line of a /v1 request refused before it reached `forward` (no key, an invalid body)."""
        if LOG.isEnabledFor(logging.INFO):
            m = Metered(request_id=new_request_id(), started_s=time.perf_counter(), key=key, status=status)
            m.error = message
            m.extra["path"] = bounded(request.url.path)
            self._log(m, 0.0)

    def _log(self, m: Metered, latency_s: float) -> None:
        line = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": m.request_id,
            "tenant": m.key.tenant if m.key else None,
            "key": m.key.prefix if m.key else None,
            "entry": bounded(m.entry),
            "status": m.status,
            "stream": m.stream,
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "latency_ms": round(latency_s * 1000.0, 3),
            "ttft_ms": None if m.ttft_s is None else round(m.ttft_s * 1000.0, 3),
        }
        if m.error:
            line["error"] = bounded(m.error)
        line.update(m.extra)
        if self.log_json:
            LOG.info(dumps(line), extra={"portal": line})
        else:
            LOG.info(" ".join(f"{k}={v}" for k, v in line.items()), extra={"portal": line})


def _status_of(exc: BaseException) -> tuple[int, str]:
    """Return (HTTP status, message) a request that raised `exc` is metered with."""
    if isinstance(exc, OpenAIError):
        return exc.status_code, exc.message
    if isinstance(exc, UpstreamError):
        return exc.status_code, exc.message
    if isinstance(exc, ClientGone):
        return CLIENT_CLOSED, "client closed the request"
    if isinstance(exc, UserError):  # answered 404 (unknown entry) or 400 by the app's handler
        return (404 if isinstance(exc, UnknownEntry) else 400), str(exc)
    if isinstance(exc, Exception):
        return 500, f"{type(exc).__name__}: {exc}"
    return CLIENT_CLOSED, "cancelled"
