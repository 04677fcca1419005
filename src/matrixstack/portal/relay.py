"""Relaying a backend's SSE stream to the client, and the record of one metered request.

`StreamRelay(chunks, first, kind, metered, finish)` turns the backend's parsed chunks into the client's events:
each chunk with `model` set to the catalog entry, then a usage chunk (the backend's own when it sent one, else
one the relay makes) and `data: [DONE]`. A backend error in the middle of the stream becomes one
`data: {"error": ...}` event, then the stream ends (the HTTP status was sent already).

A producer task reads the backend while the response writes to the client; whatever the producer gathered while
a write was under way goes out in the next write, as one piece. A stream whose backend is faster than the
client's socket therefore costs one write per batch rather than one per token (writes are the dearest part of a
relay); the first chunk is written alone, so the time to first token is not delayed. At most `MAX_PENDING_CHARS`
wait; past that the producer waits for the client (backpressure).

`close()` (the response's on_close: after the last write, or when the client went away) stops the producer,
closes the backend stream (which aborts the backend request when it was not finished) and meters the request
once: tokens from the backend's usage (or one per content chunk when the backend sent none), TTFT (to the first
content chunk), TPOT (the spread of the rest over the remaining tokens), status 499 for a client that left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from matrixstack.engine.external import UpstreamError
from matrixstack.engine.http import SSE_DONE
from matrixstack.engine.openai_types import chat_chunk, completion_chunk, error_body, usage
from matrixstack.portal.encoding import sse
from matrixstack.portal.service import KeyInfo

CLIENT_CLOSED = 499  # nginx's "client closed request": the status metered when a client goes away
MAX_PENDING_CHARS = 256 * 1024
Kind = Literal["chat", "completion"]


@dataclass
class Metered:
    """One /v1 request as it is metered and logged: who, which entry, tokens, status and timings."""

    request_id: str
    started_s: float
    key: KeyInfo | None = None
    entry: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    stream: bool = False
    error: str | None = None
    resolved: bool = False  # the entry exists for this tenant (else metrics do not label it with its name)
    extra: dict[str, Any] = field(default_factory=dict)


def has_token(chunk: dict[str, Any], kind: Kind) -> bool:
    """Return True when a stream chunk carries generated text."""
    for choice in chunk.get("choices") or ():
        if kind == "chat":
            if (choice.get("delta") or {}).get("content"):
                return True
        elif choice.get("text"):
            return True
    return False


class StreamRelay:
    """The client's side of one streamed request (see the module docstring)."""

    def __init__(
        self,
        chunks: AsyncIterator[dict[str, Any]],
        first: dict[str, Any] | None,
        kind: Kind,
        metered: Metered,
        finish: Callable[[Metered], None],
    ):
        self._chunks, self._first, self._kind, self._m, self._finish = chunks, first, kind, metered, finish
        self._pending: list[str] = []
        self._pending_chars = 0
        self._ready = asyncio.Event()  # something is pending, or the producer ended
        self._room = asyncio.Event()  # the pending text is below MAX_PENDING_CHARS
        self._room.set()
        self._ended = False
        self._producer: asyncio.Task | None = None
        self._closed = False
        self._delivered = False  # events() wrote everything, [DONE] included
        self._content_chunks = 0
        self._first_token_s: float | None = None
        self._last_token_s: float | None = None
        self._usage: dict[str, Any] | None = None

    def _note(self, chunk: dict[str, Any]) -> None:
        """Set the entry as the chunk's model and note its usage and token timing."""
        chunk["model"] = self._m.entry
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if has_token(chunk, self._kind):
            self._last_token_s = time.perf_counter()
            if self._first_token_s is None:
                self._first_token_s = self._last_token_s
            self._content_chunks += 1

    async def _put(self, text: str) -> None:
        self._pending.append(text)
        self._pending_chars += len(text)
        self._ready.set()
        if self._pending_chars > MAX_PENDING_CHARS:
            self._room.clear()
            await self._room.wait()

    async def _produce(self) -> None:
        """Read the backend's chunks after the first into the pending text, then the usage chunk and [DONE]."""
        try:
            await self._relay()
        finally:
            self._ended = True
            self._ready.set()

    async def _relay(self) -> None:
        m = self._m
        last = self._first
        completed = False
        try:
            async for chunk in self._chunks:
                self._note(chunk)
                last = chunk
                await self._put(sse(chunk))
            completed = True
        except UpstreamError as exc:
            m.status, m.error = exc.status_code, exc.message
            await self._put(sse(exc.body))
        except Exception as exc:  # a backend that breaks mid-stream: tell the client in the stream, then close
            m.status, m.error = 500, f"{type(exc).__name__}: {exc}"
            await self._put(sse(error_body(f"the backend failed this request: {m.error}", "server_error")))
        if completed:
            if self._usage is None or (last is not None and last.get("choices")):
                # the backend sent no usage-only last chunk: send one, as OpenAI does with include_usage
                ident = (last or {}).get("id") or f"portal-{m.request_id}"
                created = (last or {}).get("created") or int(time.time())
                total = usage(*self._tokens())
                make = chat_chunk if self._kind == "chat" else completion_chunk
                await self._put(sse(make(ident, m.entry, created, None, None, True, total)))
            await self._put(SSE_DONE)

    def _tokens(self) -> tuple[int, int]:
        """Return (prompt, completion) tokens: the backend's usage, or one completion token per content chunk."""
        if self._usage is not None:
            return int(self._usage.get("prompt_tokens") or 0), int(self._usage.get("completion_tokens") or 0)
        return 0, self._content_chunks

    async def events(self) -> AsyncIterator[str]:
        """Yield the client's SSE text: the first chunk alone, then whatever gathered since the last write."""
        if self._first is None:  # the backend ended without a chunk
            self._producer = asyncio.ensure_future(self._produce())
        else:
            self._note(self._first)
            yield sse(self._first)
            self._producer = asyncio.ensure_future(self._produce())
        while True:
            if not self._pending:
                if self._ended:
                    break
                self._ready.clear()
                await self._ready.wait()
                continue
            text = "".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending.clear()
            self._pending_chars = 0
            self._room.set()
            yield text
        self._delivered = True
        await self._producer  # an unexpected failure of the producer surfaces here

    async def close(self) -> None:
        """Stop the producer, close the backend stream and meter the request (once)."""
        if self._closed:
            return
        self._closed = True
        m = self._m
        producer = self._producer
        if producer is not None and not producer.done():
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await producer
        if not self._delivered and m.status < 400:
            m.status, m.error = CLIENT_CLOSED, "client closed the stream"
        with contextlib.suppress(RuntimeError):
            await self._chunks.aclose()  # type: ignore[attr-defined]
        m.prompt_tokens, m.completion_tokens = self._tokens()
        if self._first_token_s is not None:
            m.ttft_s = self._first_token_s - m.started_s
            if m.completion_tokens > 1 and self._last_token_s is not None:
                m.tpot_s = (self._last_token_s - self._first_token_s) / (m.completion_tokens - 1)
        self._finish(m)
