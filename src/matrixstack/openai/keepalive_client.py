"""The lean upstream client for plain HTTP: OpenAI requests straight over `KeepAliveTransport`'s connections.

`KeepAliveClient(base_url, api_key, transport)` is an `Upstream` (openai/client.py): `send`, `stream` (blocks of
raw events, as bytes, unparsed: see `sse.event_blocks`), `model_ids`, `health`, `aclose`. An upstream's error is
an `UpstreamError` with its status and OpenAI error body as sent, an unreachable upstream a 502 and a timeout a
504. What it leaves out is httpx's client layer: building an `httpx.Request` (URL parsing, header merging,
cookies, auth and redirect hooks) and wrapping the response cost about as much CPU as the rest of a proxied
request. Here the request head is one bytes template per upstream, filled with the path and the body's length,
and a stream is split into SSE events on bytes. Upstreams on the fabric are plain HTTP; hosted APIs (https, maybe
behind a proxy) go through `HttpxClient` (openai/httpx_client.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from matrixstack.openai.endpoints import Endpoint
from matrixstack.openai.errors import non_json_error, transport_error, upstream_error
from matrixstack.openai.sse import event_blocks
from matrixstack.openai.transport import CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S, KeepAliveTransport, ResponseStream


class KeepAliveClient:
    """An OpenAI-compatible upstream at a plain-HTTP base URL (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        transport: KeepAliveTransport,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        """`base_url` is the API root as OpenAI clients take it, e.g. `http://10.0.0.7:8000/v1`."""
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"KeepAliveClient takes a plain http:// base URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        port = parts.port or 80
        self._origin = ("http", parts.hostname, port)
        self._prefix = parts.path.rstrip("/").encode()
        host = parts.hostname if port == 80 else f"{parts.hostname}:{port}"
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._headers = f"Host: {host}\r\nAccept: */*\r\nUser-Agent: matrixstack-portal\r\n{auth}".encode()
        self._timeouts_s = (CONNECT_TIMEOUT_S, timeout_s, timeout_s)
        self._transport = transport
        self._ending: set[asyncio.Task] = set()  # streams past [DONE] whose last bytes are still being read

    def _head(self, method: bytes, path: bytes, length: int | None) -> bytes:
        body_headers = b"" if length is None else b"Content-Type: application/json\r\nContent-Length: %d\r\n" % length
        return b"%s %s%s HTTP/1.1\r\n%s%s\r\n" % (method, self._prefix, path, self._headers, body_headers)

    async def _send(self, method: bytes, path: bytes, body: bytes | None):
        """Return (status, response body stream) of one request; UpstreamError when the upstream can't be reached."""
        head = self._head(method, path, None if body is None else len(body))
        try:
            status, _, stream = await self._transport.exchange(self._origin, head, body or b"", self._timeouts_s)
        except httpx.TransportError as exc:
            raise transport_error(self.base_url, exc) from None
        return status, stream

    async def _json(self, method: bytes, path: bytes, body: dict[str, Any] | None) -> dict[str, Any]:
        """Return the upstream's JSON answer to one request; UpstreamError on an error status or a non-JSON body."""
        status, stream = await self._send(method, path, None if body is None else orjson.dumps(body))
        try:
            data = b"".join([piece async for piece in stream])
        except httpx.TransportError as exc:
            raise transport_error(self.base_url, exc) from None
        finally:
            await stream.aclose()
        if status >= 400:
            raise upstream_error(status, data.decode("utf-8", "replace"), _reason(status))
        try:
            return orjson.loads(data)
        except ValueError:
            raise non_json_error(self.base_url + path.decode()) from None

    async def send(self, endpoint: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        """Return the upstream's non-streamed response to the OpenAI request `body` at `endpoint`."""
        return await self._json(b"POST", endpoint.path_bytes, {**body, "stream": False})

    def stream(self, endpoint: Endpoint, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the `data:` events of the streamed request `body` at `endpoint` up to `[DONE]` as blocks, a block
        per read of the response (`sse.event_blocks`); an error event raises UpstreamError after the events before
        it. Closing it closes the request (aborting it at the upstream)."""
        return event_blocks(lambda: self._open(endpoint.path_bytes, body), self.base_url, self._finish)

    async def _open(self, path: bytes, body: dict[str, Any]) -> ResponseStream:
        """Return the body of the streamed request `body` at `path`; UpstreamError for an error status."""
        status, stream = await self._send(b"POST", path, orjson.dumps({**body, "stream": True}))
        if status >= 400:
            try:
                data = b"".join([piece async for piece in stream])
            finally:
                await stream.aclose()
            raise upstream_error(status, data.decode("utf-8", "replace"), _reason(status))
        return stream

    async def _finish(self, stream: ResponseStream, over: bool) -> None:
        """End a stream's body. One that is over for the reader ends at once: when its last bytes (the chunked
        terminator, which a server may send in a later write) are not in yet, they are read in the background
        (keeping the connection), so the client's last bytes do not wait for them."""
        if over and not stream.ended:
            task = asyncio.get_running_loop().create_task(stream.aclose())
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)
        else:
            await stream.aclose()

    async def model_ids(self) -> list[str]:
        """Return the ids of the models the upstream lists (`GET /models`)."""
        return [card["id"] for card in (await self._json(b"GET", b"/models", None)).get("data", [])]

    async def health(self) -> bool:
        """Return True when the upstream answers `GET /health` (or, lacking one, `GET /models`) with 200."""
        for path in (self._prefix.removesuffix(b"/v1") + b"/health", self._prefix + b"/models"):
            head = b"GET %s HTTP/1.1\r\n%s\r\n" % (path, self._headers)
            try:
                status, _, stream = await self._transport.exchange(self._origin, head, b"", (CONNECT_TIMEOUT_S,) * 3)
                await stream.aclose()
            except httpx.TransportError:
                return False
            if status == 200:
                return True
            if status != 404:
                return False
        return False

    async def aclose(self) -> None:
        """Close the idle connections (after the streams that were ending)."""
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        await self._transport.aclose()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
