"""The portal's client for a plain-HTTP backend: OpenAI requests straight over `KeepAliveTransport`'s connections.

`Backend(base_url, api_key, transport)` has the methods of `engine.external.ExternalEngine` that the gateway uses
(`chat`, `complete`, `model_ids`, `aclose`) with the same results and errors, and streams as blocks of raw
events (`stream_chat_blocks`, `stream_complete_blocks`: the `data: <json>` events that arrived in one read, as
bytes, unparsed, so that a relay can pass them on in one piece without decoding and encoding each):
an upstream's error is an `UpstreamError` with its status and OpenAI error body as sent, an unreachable backend
a 502 and a timeout a 504. What it leaves out is httpx's client layer: building an `httpx.Request` (URL parsing,
header merging, cookies, auth and redirect hooks) and wrapping the response cost about as much CPU as the rest of
a proxied request. Here the request head is one bytes template per backend, filled with the path and the body's
length, and a stream is split into SSE events on bytes. Backends on the fabric are plain HTTP; hosted APIs
(https, maybe behind a proxy) keep going through `ExternalEngine` and httpx.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import httpx

from matrixstack.engine.external import (
    CONNECT_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    UpstreamError,
    stream_error,
    transport_error,
    upstream_error,
)
from matrixstack.engine.openai_types import error_body
from matrixstack.portal.encoding import dumps_bytes, loads
from matrixstack.portal.transport import KeepAliveTransport

DATA = b"data:"
DATA_PREFIX = b"data: "  # how every event of a block starts
EVENT_END = b"\n\n"  # and ends (a JSON text has no raw newline)
DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
CLEAN_EVENTS = re.compile(rb"(?:data: \{[^\n]*\n\n)*")  # `data: {json}` events only, as OpenAI-style servers send
ERROR_EVENT = re.compile(rb'(?:^|\n)data: \{\s*"error"\s*:')  # an event that is an error object: parsed and raised


def event_block(text: bytes) -> tuple[bytes, bool]:
    """Return (block, done) for complete SSE events `text` (LF line ends): the block is the `data:` events before
    `[DONE]`, each as `data: <json>\\n\\n`, and done tells whether `[DONE]` came. A block of OpenAI-style events is
    `text` itself (one regex match); anything else (comments, other fields, `data:` without the space) is
    rewritten line by line, dropping what is not data."""
    done = text.endswith(DONE_EVENT)
    if done:
        text = text[: -len(DONE_EVENT)]
    if CLEAN_EVENTS.fullmatch(text):
        return text, done
    events = []
    for line in text.split(b"\n"):
        if not line.startswith(DATA):
            continue  # blank separators, comments (": ping"), event names
        data = line[len(DATA) :].strip()
        if data == DONE:
            return b"".join(events), True
        events.append(DATA_PREFIX + data + EVENT_END)
    return b"".join(events), done


class Backend:
    """An OpenAI-compatible backend at a plain-HTTP base URL (see the module docstring)."""

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
            raise ValueError(f"Backend takes a plain http:// base URL, got {base_url!r}")
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
        """Return (status, response body stream) of one request; UpstreamError when the backend can't be reached."""
        head = self._head(method, path, None if body is None else len(body))
        try:
            status, _, stream = await self._transport.exchange(self._origin, head, body or b"", self._timeouts_s)
        except httpx.TransportError as exc:
            raise transport_error(self.base_url, exc) from None
        return status, stream

    async def _json(self, method: bytes, path: bytes, body: dict[str, Any] | None) -> dict[str, Any]:
        """Return the backend's JSON answer to one request; UpstreamError on an error status or a non-JSON body."""
        status, stream = await self._send(method, path, None if body is None else dumps_bytes(body))
        try:
            data = b"".join([piece async for piece in stream])
        except httpx.TransportError as exc:
            raise transport_error(self.base_url, exc) from None
        finally:
            await stream.aclose()
        if status >= 400:
            raise upstream_error(status, data.decode("utf-8", "replace"), _reason(status))
        try:
            return loads(data)
        except ValueError:
            url = self.base_url + path.decode()
            raise UpstreamError(
                502, error_body(f"upstream {url} answered non-JSON", "server_error", code="upstream_error")
            ) from None

    async def _blocks(self, path: bytes, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the `data:` events of a streamed request up to `[DONE]` as blocks (see `event_block`), a block per
        read of the response; an error event raises UpstreamError after the events before it. Closing it closes
        the request (aborting it at the backend). After `[DONE]` it ends at once: when the body's last bytes (the
        chunked terminator, which a server may send in a later write) are not in yet, they are read in the
        background, so the client's last bytes do not wait for them."""
        status, stream = await self._send(b"POST", path, dumps_bytes({**body, "stream": True}))
        done = False
        try:
            if status >= 400:
                data = b"".join([piece async for piece in stream])
                raise upstream_error(status, data.decode("utf-8", "replace"), _reason(status))
            pending = b""
            while piece := await stream.next_piece():
                pending = pending + piece if pending else piece
                if b"\r" in pending:
                    pending = pending.replace(b"\r\n", b"\n")
                cut = pending.rfind(EVENT_END) + len(EVENT_END)
                if cut < len(EVENT_END):
                    continue  # no event is complete yet
                block, done = event_block(pending[:cut])
                pending = pending[cut:]
                # the literal first: the regex scans slowly (its alternation defeats the prefix search)
                error = ERROR_EVENT.search(block) if b'"error"' in block else None
                if error is not None:
                    start = error.start() + (block[error.start()] == 10)  # after the newline before it
                    end = block.find(EVENT_END, start)
                    raised = stream_error(loads(block[start + len(DATA_PREFIX) : end]))
                    if raised is not None:
                        if start:
                            yield block[:start]
                        raise raised
                if block:
                    yield block
                if done:
                    return
        except httpx.TransportError as exc:
            raise transport_error(self.base_url, exc) from None
        finally:
            if done and not stream.ended:  # over for the caller: read the last bytes (keeping the connection) meanwhile
                task = asyncio.get_running_loop().create_task(stream.aclose())
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)
            else:
                await stream.aclose()

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Return the backend's non-streamed `/chat/completions` response to the OpenAI request `body`."""
        return await self._json(b"POST", b"/chat/completions", {**body, "stream": False})

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Return the backend's non-streamed `/completions` response to the OpenAI request `body`."""
        return await self._json(b"POST", b"/completions", {**body, "stream": False})

    def stream_chat_blocks(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the events of a streamed `/chat/completions` (up to `[DONE]`) in blocks, one per read."""
        return self._blocks(b"/chat/completions", body)

    def stream_complete_blocks(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Yield the events of a streamed `/completions` (up to `[DONE]`) in blocks, one per read."""
        return self._blocks(b"/completions", body)

    async def model_ids(self) -> list[str]:
        """Return the ids of the models the backend lists (`GET /models`)."""
        return [card["id"] for card in (await self._json(b"GET", b"/models", None)).get("data", [])]

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
