"""Relaying a backend's SSE stream to the client, and the record of one metered request.

`StreamRelay(batches, first, kind, metered, finish)` turns the backend's chunks, in batches (those that arrived
in one read: `Backend.stream_*_batches`; one chunk per batch from `ExternalEngine`), into the client's events:
each chunk with `model` set to the catalog entry, then a usage chunk (the backend's own when it sent one, else one
the relay makes) and `data: [DONE]`. A batch is written as one piece: a stream whose backend is faster than the
client costs one write per read rather than one per token (writes are the dearest part of a relay), and the
chunks of a batch have all arrived, so none waits for another. The relay reads the next batch only when the last
one was written, which is the backpressure. A backend error in the middle of the stream becomes one
`data: {"error": ...}` event, then the stream ends (the HTTP status was sent already).

`close()` (the response's on_close: after the last write, or when the client went away) closes the backend stream
(which aborts the backend request when it was not finished) and meters the request once: tokens from the
backend's usage (or one per content chunk when the backend sent none), TTFT (to the first content chunk), TPOT
(the spread of the rest over the remaining tokens), status 499 for a client that left.
"""

from __future__ import annotations

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
        batches: AsyncIterator[list[dict[str, Any]]],
        first: list[dict[str, Any]] | None,
        kind: Kind,
        metered: Metered,
        finish: Callable[[Metered], None],
    ):
        self._batches, self._first, self._kind, self._m, self._finish = batches, first, kind, metered, finish
        self._closed = False
        self._delivered = False  # events() wrote everything, [DONE] included
        self._content_chunks = 0
        self._first_token_s: float | None = None
        self._last_token_s: float | None = None
        self._usage: dict[str, Any] | None = None
        self._last: dict[str, Any] | None = None

    def _encode(self, batch: list[dict[str, Any]]) -> str:
        """Return the batch's events, each chunk with the entry as its model, noting usage and token timing."""
        now = time.perf_counter()
        for chunk in batch:
            chunk["model"] = self._m.entry
            if chunk.get("usage"):
                self._usage = chunk["usage"]
            if has_token(chunk, self._kind):
                self._last_token_s = now
                if self._first_token_s is None:
                    self._first_token_s = now
                self._content_chunks += 1
        self._last = batch[-1]
        return "".join([sse(chunk) for chunk in batch])

    async def events(self) -> AsyncIterator[str]:
        """Yield the client's SSE text: a piece per backend batch, then the usage chunk and [DONE]."""
        m = self._m
        if self._first:
            yield self._encode(self._first)
        try:
            async for batch in self._batches:
                yield self._encode(batch)
        except UpstreamError as exc:
            m.status, m.error = exc.status_code, exc.message
            yield sse(exc.body)
            return
        except Exception as exc:  # a backend that breaks mid-stream: tell the client in the stream, then close
            m.status, m.error = 500, f"{type(exc).__name__}: {exc}"
            yield sse(error_body(f"the backend failed this request: {m.error}", "server_error"))
            return
        last = self._last
        tail = ""
        if self._usage is None or (last is not None and last.get("choices")):
            # the backend sent no usage-only last chunk: send one, as OpenAI does with include_usage
            ident = (last or {}).get("id") or f"portal-{m.request_id}"
            created = (last or {}).get("created") or int(time.time())
            make = chat_chunk if self._kind == "chat" else completion_chunk
            tail = sse(make(ident, m.entry, created, None, None, True, usage(*self._tokens())))
        self._delivered = True  # the response ends with this piece (EventStream closes the stream after [DONE])
        yield tail + SSE_DONE

    def _tokens(self) -> tuple[int, int]:
        """Return (prompt, completion) tokens: the backend's usage, or one completion token per content chunk."""
        if self._usage is not None:
            return int(self._usage.get("prompt_tokens") or 0), int(self._usage.get("completion_tokens") or 0)
        return 0, self._content_chunks

    async def close(self) -> None:
        """Close the backend stream and meter the request (once)."""
        if self._closed:
            return
        self._closed = True
        m = self._m
        if not self._delivered and m.status < 400:
            m.status, m.error = CLIENT_CLOSED, "client closed the stream"
        with contextlib.suppress(RuntimeError):
            await self._batches.aclose()  # type: ignore[attr-defined]
        m.prompt_tokens, m.completion_tokens = self._tokens()
        if self._first_token_s is not None:
            m.ttft_s = self._first_token_s - m.started_s
            if m.completion_tokens > 1 and self._last_token_s is not None:
                m.tpot_s = (self._last_token_s - self._first_token_s) / (m.completion_tokens - 1)
        self._finish(m)


async def one_per_batch(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[list[dict[str, Any]]]:
    """Yield each chunk of a stream as a batch of its own (`ExternalEngine`'s streams); closing it closes `chunks`."""
    try:
        async for chunk in chunks:
            yield [chunk]
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
