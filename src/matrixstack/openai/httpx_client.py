"""The upstream client for any OpenAI-compatible server over httpx: hosted APIs (https, TLS, proxies) and anything
else the lean `KeepAliveClient` does not take.

`HttpxClient(base_url, api_key, timeout_s, transport)` is an `Upstream` (openai/client.py): `send(endpoint, body)`,
`stream(endpoint, body)` (the `data:` events in blocks, as `sse.event_blocks` reads them), `model_ids()`, `health()`,
`aclose()`. Bodies are OpenAI request dicts, passed through as they are (only `stream` is set). An upstream error
is raised as `UpstreamError` carrying the upstream status and its OpenAI error body unchanged, so a portal relays
it as is; an unreachable upstream is a 502 (`upstream_unreachable`), a timeout a 504 (`upstream_timeout`), both in
OpenAI's error format.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from matrixstack.errors import UserError
from matrixstack.openai.endpoints import Endpoint
from matrixstack.openai.errors import non_json_error, transport_error, upstream_error
from matrixstack.openai.sse import event_blocks
from matrixstack.openai.transport import CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S


class HttpxClient:
    """An OpenAI-compatible server reached over httpx (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        """`base_url` is the API root as OpenAI clients take it, e.g. `http://127.0.0.1:8000/v1`."""
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"external engine URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            transport=transport,
        )

    @property
    def root_url(self) -> str:
        """Return the server root (the base URL without a trailing /v1), where /health lives."""
        return self.base_url.removesuffix("/v1")

    async def __aenter__(self) -> HttpxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the upstream's JSON answer to one request; UpstreamError on an error status or a non-JSON body."""
        try:
            response = await self._client.request(method, url, json=body)
        except httpx.TransportError as exc:
            raise transport_error(self.base_url, exc) from None
        if response.status_code >= 400:
            raise upstream_error(response.status_code, response.text, response.reason_phrase)
        try:
            return response.json()
        except ValueError:
            raise non_json_error(url) from None

    async def send(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """Return the upstream's non-streamed response to the OpenAI request `body` at `endpoint`."""
        return await self._request("POST", f"{self.base_url}{endpoint.path}", {**body, "stream": False})

    def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the `data:` events of the streamed request `body` at `endpoint` up to `[DONE]` in blocks, a block
        per piece read (`sse.event_blocks`); an error event raises UpstreamError after the events before it.
        Closing it closes the upstream request, which aborts it there."""
        return event_blocks(lambda: self._open(endpoint, body), self.base_url, _ResponseBody.finish)

    async def _open(self, endpoint: Endpoint, body: dict[str, Any]) -> _ResponseBody:
        """Return the body of the streamed request `body` at `endpoint`; UpstreamError for an error status."""
        request = self._client.build_request("POST", f"{self.base_url}{endpoint.path}", json={**body, "stream": True})
        response = await self._client.send(request, stream=True)
        if response.status_code >= 400:
            try:
                text = (await response.aread()).decode("utf-8", "replace")
            finally:
                await response.aclose()
            raise upstream_error(response.status_code, text, response.reason_phrase)
        return _ResponseBody(response)

    async def model_ids(self) -> list[str]:
        """Return the upstream's model ids (`GET /models`)."""
        models = await self._request("GET", f"{self.base_url}/models")
        return [card["id"] for card in models.get("data", [])]

    async def health(self) -> bool:
        """Return True when the upstream answers `GET /health` (or, lacking one, `GET /models`) with 200."""
        for url in (f"{self.root_url}/health", f"{self.base_url}/models"):
            try:
                response = await self._client.get(url, timeout=CONNECT_TIMEOUT_S)
            except httpx.TransportError:
                return False
            if response.status_code == 200:
                return True
            if response.status_code != 404:
                return False
        return False


class _ResponseBody:
    """An httpx response's body, read piece by piece (an `sse.ResponseBody`)."""

    def __init__(self, response: httpx.Response):
        self._response = response
        self._pieces = response.aiter_bytes()

    async def next_piece(self) -> bytes:
        """Return the next decoded bytes of the body (b"" once it ended)."""
        return await anext(self._pieces, b"")

    async def finish(self, over: bool) -> None:
        """Close the response (which aborts the request at the upstream when it was not over)."""
        await self._pieces.aclose()
        await self._response.aclose()
