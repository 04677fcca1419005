"""A backend's failures as the portal's own errors: never a backend's error body to a tenant, no secret in the log.

`guarded_client(backend)` returns the `Upstream` the gateway calls a backend through: the `openai.client` one,
made with the backend's clear key (`upstream_secrets.backend_api_key`; a key it cannot open is a 502
`upstream_auth_failed`), whose failures — an error status, an error event in a stream, a backend unreachable or
slow — it raises as the portal's own (`backend_failure`):

- 401 or 403 from the backend: 502 `upstream_auth_failed` (the portal's key for it is wrong: the operator's fault,
  not the tenant's);
- 429: 503 `upstream_busy`, nothing of the backend's body;
- a client fault (400, 413, 422) from a third-party `upstream`: 400 `upstream_refused`, saying only that the
  upstream refused the request and its status;
- any other 4xx from a deployment the portal runs (`engine`, `vllm`: a prompt too long, an unknown parameter): its
  status with the `message`, `code` and `param` of its OpenAI error, scrubbed of secrets (`portal.scrub`) and cut to
  `MAX_MESSAGE_CHARS`, so the client learns what to fix. A third-party upstream's text never reaches a tenant: it
  may echo anything, the portal's own key included;
- any other status: 502 `upstream_error`; unreachable: 502 `upstream_unreachable`; no answer in time: 504
  `upstream_timeout`.

The error is an `UpstreamError` whose `body` is what the client gets (the same object in a stream's error event)
and whose `message`, which the request log records, says what the backend answered, scrubbed and cut.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from matrixstack.errors import UserError
from matrixstack.openai.client import Upstream, upstream_client
from matrixstack.openai.endpoints import Endpoint
from matrixstack.openai.errors import TIMED_OUT, UNREACHABLE, UpstreamError, error_body
from matrixstack.portal.scrub import scrub
from matrixstack.portal.spec import BackendSpec
from matrixstack.portal.upstream_secrets import backend_api_key

DEPLOYMENT_KINDS = ("engine", "vllm")  # backends the portal runs: their client-fault messages are relayed
CLIENT_FAULTS = (400, 413, 422)
AUTH_FAILURES = (401, 403)
MAX_MESSAGE_CHARS = 500
TRANSPORT = {502: UNREACHABLE, 504: TIMED_OUT}  # what the client itself raises (openai.errors)


def _cut(value: Any) -> Any:
    """Return a string scrubbed and cut to MAX_MESSAGE_CHARS (other values as they are)."""
    return scrub(value)[:MAX_MESSAGE_CHARS] if isinstance(value, str) else value


def _failure(status: int, code: str, message: str, detail: str, param: str | None = None) -> UpstreamError:
    """Return the portal's error: `message` for the client, `detail` for the log."""
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    error = UpstreamError(status, error_body(message, type_, param, code))
    error.message = detail
    return error


def backend_failure(exc: UpstreamError, kind: str) -> UpstreamError:
    """Return the portal's own error for backend failure `exc` of a backend of `kind` (see the module docstring)."""
    status = exc.status_code
    detail = f"backend answered {status}: {_cut(exc.message)}"
    if status in TRANSPORT and exc.code == TRANSPORT[status]:
        reached = "did not answer in time" if status == 504 else "cannot be reached"
        return _failure(status, exc.code, f"the backend of this model {reached}", _cut(exc.message))
    if status in AUTH_FAILURES:
        return _failure(502, "upstream_auth_failed", f"the backend of this model refused the portal's credentials "
                        f"(HTTP {status}); the operator must fix its key", detail)  # fmt: skip
    if status == 429:
        return _failure(503, "upstream_busy", "the backend of this model is over its limits; retry later", detail)
    if 400 <= status < 500 and kind in DEPLOYMENT_KINDS:
        error = exc.body.get("error") if isinstance(exc.body.get("error"), dict) else {}
        message = _cut(str(error.get("message") or f"the model's backend refused the request (HTTP {status})"))
        param = error.get("param") if isinstance(error.get("param"), str) else None
        code = error.get("code") if isinstance(error.get("code"), str | int) else None
        return _failure(status, _cut(code), message, detail, _cut(param))
    if status in CLIENT_FAULTS:
        return _failure(400, "upstream_refused", f"the model's upstream refused the request (HTTP {status})", detail)
    return _failure(502, "upstream_error", f"the backend of this model failed the request (HTTP {status})", detail)


class GuardedUpstream:
    """An `Upstream` whose failures are the portal's own errors (see the module docstring)."""

    def __init__(self, inner: Upstream, kind: str):
        self._inner, self._kind = inner, kind

    async def send(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """Return the backend's non-streamed response; the portal's error when it fails."""
        try:
            return await self._inner.send(endpoint, body)
        except UpstreamError as exc:
            raise backend_failure(exc, self._kind) from None

    async def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the backend's event blocks; the portal's error when it fails. Closing it closes the backend's."""
        blocks = self._inner.stream(endpoint, body)
        try:
            async for block in blocks:
                yield block
        except UpstreamError as exc:
            raise backend_failure(exc, self._kind) from None
        finally:
            await blocks.aclose()  # type: ignore[attr-defined]

    async def model_ids(self) -> list[str]:
        """Return the ids of the models the backend lists; the portal's error when it fails."""
        try:
            return await self._inner.model_ids()
        except UpstreamError as exc:
            raise backend_failure(exc, self._kind) from None

    async def health(self) -> bool:
        """Return True when the backend answers its health check."""
        return await self._inner.health()

    async def aclose(self) -> None:
        """Close the backend client's connections."""
        await self._inner.aclose()


def guarded_client(backend: BackendSpec) -> Upstream:
    """Return the guarded client of `backend`, with its clear key; a 502 `upstream_auth_failed` when the key
    cannot be opened (an unset `env:` variable, a key sealed with another data key)."""
    try:
        api_key = backend_api_key(backend)
    except UserError as exc:
        raise _failure(502, "upstream_auth_failed", "the portal holds no usable key for the backend of this model; "
                       "the operator must set it", str(exc)) from None  # fmt: skip
    return GuardedUpstream(upstream_client(backend.url, api_key), backend.kind)
