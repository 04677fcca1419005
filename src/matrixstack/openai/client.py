"""One way to call an OpenAI-compatible upstream: the `Upstream` protocol and `upstream_client`, which picks its
implementation by URL scheme.

`Upstream` is what a caller (the portal's gateway, a test, a lane) uses: `send(endpoint, body)` returns the
non-streamed response, `stream(endpoint, body)` yields the `data:` events of a streamed one in blocks of raw bytes
(up to `[DONE]`; closing it aborts the request), `model_ids()`, `health()`, `aclose()`. Errors are `UpstreamError`
(the upstream's status and OpenAI error body; 502 unreachable, 504 timed out) for both implementations:
`KeepAliveClient` (plain http://, the lean fast path for upstreams on the fabric) and `HttpxClient` (https://:
hosted APIs, TLS, proxies).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx

from matrixstack.openai.endpoints import Endpoint
from matrixstack.openai.httpx_client import HttpxClient
from matrixstack.openai.keepalive_client import KeepAliveClient
from matrixstack.openai.transport import KeepAliveTransport

MAX_UPSTREAM_CONNECTIONS = 512  # idle keep-alive connections per upstream client


class Upstream(Protocol):
    """An OpenAI-compatible upstream (see the module docstring)."""

    async def send(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """Return the non-streamed response to the request `body` at `endpoint`."""
        ...

    def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the events of the streamed request `body` at `endpoint` in blocks, up to `[DONE]`."""
        ...

    async def model_ids(self) -> list[str]:
        """Return the ids of the models the upstream lists."""
        ...

    async def health(self) -> bool:
        """Return True when the upstream answers its health check."""
        ...

    async def aclose(self) -> None:
        """Close the client's connections."""
        ...


def upstream_client(url: str, api_key: str | None = None) -> Upstream:
    """Return the client of the upstream at `url` (its API root, e.g. `http://10.0.0.7:8000/v1`): a lean
    `KeepAliveClient` for plain HTTP (upstreams on the fabric), an `HttpxClient` for HTTPS (hosted APIs: TLS,
    proxies); either keeps alive as many connections as run at once. UserError for a URL of another scheme."""
    if url.startswith("http://"):
        return KeepAliveClient(url, api_key, KeepAliveTransport(MAX_UPSTREAM_CONNECTIONS))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=MAX_UPSTREAM_CONNECTIONS)
    return HttpxClient(url, api_key, transport=httpx.AsyncHTTPTransport(limits=limits))
