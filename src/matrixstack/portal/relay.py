"""Relaying a backend's SSE stream to the client, and the record of one metered request.

`StreamRelay(blocks, first, endpoint, metered, finish)` turns the backend's events — `data: <json>` events in
blocks (those that arrived in one read: an `Upstream`'s `stream`, openai/client.py) — into the client's events:
each chunk with `model` set to the catalog entry, then a usage chunk (the backend's own when it sent one, else one
the relay makes) and `data: [DONE]`. Chunks are passed on as text, a block at a time: one regex pass over the
block rewrites every `model` field in place, finds the usage object and counts the tokens (a string in the
endpoint's `text_field`, `content` (chat) or `text` (completion), that is not empty); decoding and encoding every
chunk, or even splitting a block into its events, cost more than the rest of the relay. A block is written as one
piece: a stream whose backend is faster than the client costs one write per read rather than one per token
(writes are the dearest part of a relay), and the chunks of a block have all arrived, so none waits for
another. The relay reads the next block only when the last one was written, which is the backpressure. A backend
error in the middle of the stream becomes one `data: {"error": ...}` event, then `data: [DONE]` (the HTTP status
was sent already): every stream ends with `[DONE]`.

`close()` (the response's on_close: after the last write, or when the client went away) closes the backend stream
(which aborts the backend request when it was not finished) and meters the request once: tokens from the
backend's usage (or one per content string when the backend sent none), TTFT (to the first content chunk), TPOT
(the spread of the rest over the remaining tokens), status 499 for a client that left.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from matrixstack.openai.endpoints import ENDPOINTS, Endpoint
from matrixstack.openai.errors import UpstreamError, error_body
from matrixstack.openai.sse import DATA_PREFIX, EVENT_END, SSE_DONE, sse_event
from matrixstack.openai.types import usage
from matrixstack.portal.encoding import dumps_bytes, loads
from matrixstack.portal.key_service import KeyInfo
from matrixstack.portal.usage_writer import written

CLIENT_CLOSED = 499  # nginx's "client closed request": the status metered when a client goes away


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
    reserved_tokens: int = 0  # reserved against the key's limits at admission, settled when metered
    ttft_s: float | None = None
    tpot_s: float | None = None
    stream: bool = False
    error: str | None = None
    resolved: bool = False  # the entry exists for this tenant (else metrics do not label it with its name)
    lane: str = ""  # the resolved entry's backend kind: engine, vllm or upstream
    deployment: str = ""  # the deployment serving it ("" for a backend given by URL only)
    extra: dict[str, Any] = field(default_factory=dict)


MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
TOKEN_FIELD = {e: re.compile(rb'"%s"\s*:\s*"[^"]' % e.text_field.encode()) for e in ENDPOINTS}  # a non-empty text


class StreamRelay:
    """The client's side of one streamed request (see the module docstring)."""

    def __init__(
        self,
        blocks: AsyncIterator[bytes],
        first: bytes | None,
        endpoint: Endpoint,
        metered: Metered,
        finish: Callable[[Metered], asyncio.Future | None],
    ):
        self._blocks, self._first, self._endpoint, self._m, self._finish = blocks, first, endpoint, metered, finish
        self._model_field = b'"model":' + dumps_bytes(metered.entry)
        self._model_template = self._model_field.replace(b"\\", b"\\\\")  # as re.sub's replacement: literal
        self._token = TOKEN_FIELD[endpoint]
        self._closed = False
        self._metered = False
        self._delivered = False  # events() wrote everything, [DONE] included
        self._content_chunks = 0
        self._first_token_s: float | None = None
        self._last_token_s: float | None = None
        self._usage: dict[str, Any] | None = None
        self._last: bytes | None = None

    def _encode(self, block: bytes) -> bytes:
        """Return the block's events, each chunk with the entry as its model, noting usage and token timing.

        The block is `data: <json>\\n\\n` events (a JSON text has no raw newline, so every blank line ends one):
        one regex pass each finds the usage object, counts the tokens and rewrites the `model` fields."""
        usage = [None, *USAGE_OBJECT.finditer(block)][-1]  # the last one counts
        if usage is not None:
            start = block.rfind(b"\n", 0, usage.start()) + 1 + len(DATA_PREFIX)
            self._usage = loads(block[start : block.find(EVENT_END, usage.end())]).get("usage")
        tokens = len(self._token.findall(block))
        if tokens:
            now = time.perf_counter()
            self._last_token_s = now
            if self._first_token_s is None:
                self._first_token_s = now
            self._content_chunks += tokens
        out, replaced = MODEL_FIELD.subn(self._model_template, block)
        if replaced != block.count(EVENT_END):  # a chunk without a model field (or with two): one by one
            out = b"".join(self._with_model(event) for event in block.split(EVENT_END)[:-1])
        self._last = block[block.rfind(b"\n", 0, len(block) - 2) + 1 + len(DATA_PREFIX) : -2]
        return out

    def _with_model(self, event: bytes) -> bytes:
        """Return one event (`data: <json>`, without its blank line) with the entry as its model, ended."""
        chunk, found = MODEL_FIELD.subn(self._model_template, event[len(DATA_PREFIX) :], count=1)
        if not found and chunk.startswith(b"{"):
            model = self._model_field
            chunk = b"{" + model + (b"," if chunk[1:].strip() != b"}" else b"") + chunk[1:]
        return DATA_PREFIX + chunk + EVENT_END

    async def events(self) -> AsyncIterator[bytes]:
        """Yield the client's SSE bytes: a piece per backend block, then the usage chunk and [DONE]."""
        m = self._m
        if self._first:
            yield self._encode(self._first)
        try:
            async for block in self._blocks:
                yield self._encode(block)
        except UpstreamError as exc:
            m.status, m.error = exc.status_code, exc.message
            yield (sse_event(exc.body) + SSE_DONE).encode()
            return
        except Exception as exc:  # a backend that breaks mid-stream: tell the client in the stream, then end it
            m.status, m.error = 500, f"{type(exc).__name__}: {exc}"
            failed = error_body(f"the backend failed this request: {m.error}", "server_error")
            yield (sse_event(failed) + SSE_DONE).encode()
            return
        last = loads(self._last) if self._last is not None else None
        tail = ""
        if self._usage is None or (last is not None and last.get("choices")):
            # the backend sent no usage-only last chunk: send one, as OpenAI does with include_usage
            ident = (last or {}).get("id") or f"portal-{m.request_id}"
            created = (last or {}).get("created") or int(time.time())
            tail = sse_event(self._endpoint.usage_chunk(ident, m.entry, created, usage(*self._tokens())))
        self._delivered = True  # the response ends with this piece (EventStream closes the stream after [DONE])
        await written(self._meter())  # billed before the client sees the stream complete
        yield (tail + SSE_DONE).encode()

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
            await self._blocks.aclose()  # type: ignore[attr-defined]
        self._meter()

    def _meter(self) -> asyncio.Future | None:
        """Meter the request once (tokens, timings, `finish`); return what `finish` returns (None the second time)."""
        if self._metered:
            return None
        self._metered = True
        m = self._m
        m.prompt_tokens, m.completion_tokens = self._tokens()
        if self._first_token_s is not None:
            m.ttft_s = self._first_token_s - m.started_s
            if m.completion_tokens > 1 and self._last_token_s is not None:
                m.tpot_s = (self._last_token_s - self._first_token_s) / (m.completion_tokens - 1)
        return self._finish(m)
