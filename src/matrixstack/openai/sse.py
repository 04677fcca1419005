"""Server-sent events as OpenAI streams them: writing them, answering with them, and cutting a stream into blocks.

- `sse_event(data)`, `SSE_DONE`: one `data: {...}` event, and the `data: [DONE]` that ends an OpenAI stream;
- `EventStream(content, on_close)`: a streaming response that always runs its close callback, also when the
  client disconnected;
- `EventBlocks`: cuts an upstream's SSE body, as it arrives, into blocks of its `data:` events, unparsed
  (`event_block` normalises one block), so that a relay passes them on in one piece; an error event ends it
  with an `UpstreamError`. `event_blocks(open_body, base_url, finish)` is the loop both upstream clients stream
  with: it yields the blocks of a response body as they arrive.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import httpx
import orjson
from fastapi.responses import Response

from matrixstack.openai.disconnect import client_watch
from matrixstack.openai.errors import ClientGone, UpstreamError, stream_error, transport_error

SSE_DONE = "data: [DONE]\n\n"
SSE_DONE_BYTES = SSE_DONE.encode()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DATA = b"data:"
DATA_PREFIX = b"data: "  # how every event of a block starts
EVENT_END = b"\n\n"  # and ends (a JSON text has no raw newline)
DONE = b"[DONE]"
CLEAN_EVENTS = re.compile(rb"(?:data: \{[^\n]*\n\n)*")  # `data: {json}` events only, as OpenAI-style servers send
ERROR_EVENT = re.compile(rb'(?:^|\n)data: \{\s*"error"\s*:')  # an event that is an error object: parsed and raised


def sse_event(data: dict[str, Any]) -> str:
    """Return one server-sent event (`data: {...}\\n\\n`) carrying `data` as compact JSON (orjson: the engine's
    stream and the portal's relay write their events with this one encoder)."""
    return f"data: {orjson.dumps(data).decode()}\n\n"


class EventStream(Response):
    """An SSE response that always runs `on_close` when it ends, also when the client disconnected.

    Written for the request path rather than taken from Starlette: `StreamingResponse` runs each stream in an anyio
    task group with a second task listening for the disconnect, which costs more CPU than relaying a short
    stream. Here the request's `ClientWatch` (the one its earlier waits used, or a new one) ends the writing when
    the client goes away: the pending read of the content stops at once, so the backend or engine behind it learns
    of it through `on_close`. A piece that ends with `data: [DONE]` ends the response in the same write (the
    content is closed after it).
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str | bytes], on_close: Callable[[], Awaitable[None]]):
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)  # no body yet, so no Content-Length: the server sends it chunked
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        watch = client_watch(scope, receive)
        try:
            async with watch:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for piece in self._content:
                    body = piece if isinstance(piece, bytes) else piece.encode()
                    done = body.endswith(SSE_DONE_BYTES)  # the last event of an OpenAI stream: end the response
                    await send({"type": "http.response.body", "body": body, "more_body": not done})
                    if done:
                        break
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except ClientGone:
            pass
        finally:
            with contextlib.suppress(RuntimeError):
                await self._content.aclose()  # type: ignore[attr-defined]
            await self._on_close()


def event_block(text: bytes) -> tuple[bytes, bool]:
    """Return (block, done) for complete SSE events `text` (LF line ends): the block is the `data:` events before
    `[DONE]`, each as `data: <json>\\n\\n`, and done tells whether `[DONE]` came. A block of OpenAI-style events is
    `text` itself (one regex match); anything else (comments, other fields, `data:` without the space) is
    rewritten line by line, dropping what is not data."""
    done = text.endswith(SSE_DONE_BYTES)
    if done:
        text = text[: -len(SSE_DONE_BYTES)]
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


class EventBlocks:
    """One SSE response body, read piece by piece: `feed(piece)` returns the events the piece completes, as one
    block (see `event_block`). The stream is over once `done`: `[DONE]` came, or an error event, which `error`
    then holds (an `UpstreamError`; the block returned is the events before it)."""

    __slots__ = ("_pending", "done", "error")

    def __init__(self) -> None:
        self._pending = b""
        self.done = False
        self.error: UpstreamError | None = None

    def feed(self, piece: bytes) -> bytes:
        """Return the block of the events `piece` completes (b"" while none is complete)."""
        pending = self._pending + piece if self._pending else piece
        if b"\r" in pending:
            pending = pending.replace(b"\r\n", b"\n")
        cut = pending.rfind(EVENT_END) + len(EVENT_END)
        if cut < len(EVENT_END):
            self._pending = pending  # no event is complete yet
            return b""
        block, self.done = event_block(pending[:cut])
        self._pending = pending[cut:]
        # the literal first: the regex scans slowly (its alternation defeats the prefix search)
        found = ERROR_EVENT.search(block) if b'"error"' in block else None
        if found is not None:
            start = found.start() + (block[found.start()] == 10)  # after the newline before it
            end = block.find(EVENT_END, start)
            self.error = stream_error(orjson.loads(block[start + len(DATA_PREFIX) : end]))
            if self.error is not None:
                self.done = True
                return block[:start]
        return block


class ResponseBody(Protocol):
    """A response body being read (the keep-alive transport's, or an httpx response's)."""

    async def next_piece(self) -> bytes:
        """Return the next bytes that arrived (b"" once the body ended)."""
        ...


Body = TypeVar("Body", bound=ResponseBody)


async def event_blocks(
    open_body: Callable[[], Awaitable[Body]], base_url: str, finish: Callable[[Body, bool], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """Yield the `data:` events of a streamed response up to `[DONE]` as blocks, a block per piece read (see
    `EventBlocks`); an error event raises its UpstreamError after the events before it.

    `open_body()` sends the request and returns the response's body once it is answered with a success status
    (else it raises); it is called on the first read, so an iterator closed unread sends nothing. `finish(body,
    over)` ends the body, told whether the stream was over for the reader (`[DONE]` or an error event came) or
    stopped before. A transport error (httpx's) is the upstream's 502 or 504."""
    events = EventBlocks()
    body: Body | None = None
    try:
        body = await open_body()
        while piece := await body.next_piece():
            if block := events.feed(piece):
                yield block
            if events.done:
                break
        if events.error is not None:
            raise events.error
    except httpx.TransportError as exc:
        raise transport_error(base_url, exc) from None
    finally:
        if body is not None:
            await finish(body, events.done)
