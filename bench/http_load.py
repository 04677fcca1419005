"""A closed-loop HTTP load generator for OpenAI chat completions: N workers, each with its own keep-alive
connection, taking requests from one counter until the count is done. Used by `bench/portal_overhead.py`.

Two clients, the same requests and the same checks:

- `raw` (the default there): HTTP/1.1 on asyncio streams, written for this: the request bytes are built once per
  path, the response is read by Content-Length or chunked transfer encoding. It spends ~0.1 ms of CPU per request.
- `httpx`: one `httpx.AsyncClient` (one connection) per worker. It spends ~1 ms of CPU per request in the client
  (and ~3 ms with one client pooling 32 connections), which on a 2-core machine shared with the servers under test
  caps every path at the client's speed and hides part of what the servers cost.

A request is served when it answers 200 with `choices` and a `usage` object (streamed: a content chunk, a usage
chunk and `data: [DONE]`). Latency is from the first byte sent to the last byte read; the time to first token is
to the first SSE event with a non-empty `choices`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import httpx

REQUEST_TIMEOUT_S = 60.0
CLIENTS = ("raw", "httpx")


@dataclass
class Target:
    """One path to an OpenAI-compatible server: its name, base URL (with /v1), the model name it serves and the
    headers every request carries (the API key)."""

    name: str
    base_url: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Sample:
    """One timed request: latency, time to first token (streamed), whether it was served, and why not."""

    latency_s: float
    ttft_s: float | None
    ok: bool
    error: str | None = None
    completion_tokens: int | None = None  # the usage's count, when the response carried one


class Connection(Protocol):
    """One worker's keep-alive connection: `send()` one request and time it; `aclose()` at the end."""

    async def send(self) -> Sample: ...

    async def aclose(self) -> None: ...


def _check_json(raw: bytes, latency_s: float) -> Sample:
    data = json.loads(raw)
    ok = bool(data.get("usage")) and bool(data.get("choices"))
    return Sample(latency_s, None, ok, None if ok else "no usage or no choices")


class _SseCheck:
    """Reads SSE `data:` lines as they come: the time of the first content chunk, a usage chunk, `[DONE]`."""

    def __init__(self, start: float):
        self.start, self.ttft_s, self.usage, self.done = start, None, False, False
        self.completion_tokens: int | None = None

    def line(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if self.ttft_s is None and chunk.get("choices"):
            self.ttft_s = time.perf_counter() - self.start
        if chunk.get("usage"):
            self.usage, self.completion_tokens = True, chunk["usage"].get("completion_tokens")

    def sample(self) -> Sample:
        ok = self.usage and self.done and self.ttft_s is not None
        latency_s = time.perf_counter() - self.start
        error = None if ok else f"usage={self.usage} done={self.done}"
        return Sample(latency_s, self.ttft_s, ok, error, self.completion_tokens)


class HttpxConnection:
    """A worker's connection through `httpx.AsyncClient` (one keep-alive connection)."""

    def __init__(self, url: str, body: dict, headers: dict[str, str], stream: bool):
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._client = httpx.AsyncClient(headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S)
        self._url, self._body, self._stream = url, body, stream

    async def send(self) -> Sample:
        """Send the request once; return its sample."""
        start = time.perf_counter()
        try:
            if not self._stream:
                response = await self._client.post(self._url, json=self._body)
                latency_s = time.perf_counter() - start
                if response.status_code != 200:
                    return Sample(latency_s, None, False, f"HTTP {response.status_code}: {response.text[:200]}")
                return _check_json(response.content, latency_s)
            check = _SseCheck(start)
            async with self._client.stream("POST", self._url, json=self._body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return Sample(
                        time.perf_counter() - start, None, False, f"HTTP {response.status_code}: {text[:200]}"
                    )
                async for line in response.aiter_lines():
                    check.line(line)
            return check.sample()
        except (httpx.HTTPError, ValueError) as exc:
            return Sample(time.perf_counter() - start, None, False, f"{type(exc).__name__}: {exc}")

    async def aclose(self) -> None:
        """Close the client."""
        await self._client.aclose()


class _NoResponse(Exception):
    """The connection closed before a single byte of the response came."""


class RawConnection:
    """A worker's HTTP/1.1 keep-alive connection on asyncio streams (reconnects when the server closes it)."""

    def __init__(
        self, url: str, body: dict, headers: dict[str, str], stream: bool, timeout_s: float = REQUEST_TIMEOUT_S
    ):
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"the raw client speaks plain http only, not {url}")
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        payload = json.dumps(body).encode()
        head = [
            f"POST {parts.path} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Content-Type: application/json",
            "Accept: text/event-stream" if stream else "Accept: application/json",
            f"Content-Length: {len(payload)}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        self._request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
        self._stream, self._timeout_s = stream, timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self) -> Sample:
        """Send the request once; return its sample."""
        if self._reader is not None and self._reader.at_eof():  # the server closed it while idle (keep-alive timeout)
            await self.aclose()
        reused = self._writer is not None
        start = time.perf_counter()
        try:
            try:
                return await asyncio.wait_for(self._exchange(start), self._timeout_s)
            except (ConnectionError, _NoResponse):
                if not reused:
                    raise
                await self.aclose()  # a stale keep-alive connection: one retry on a new one, as HTTP clients do
                start = time.perf_counter()
                return await asyncio.wait_for(self._exchange(start), self._timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, _NoResponse) as exc:
            await self.aclose()
            return Sample(time.perf_counter() - start, None, False, f"{type(exc).__name__}: {exc}")

    async def _exchange(self, start: float) -> Sample:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._reader, self._writer
        writer.write(self._request)
        try:
            raw_head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            raise _NoResponse("the server closed the connection before answering") from None
        head = raw_head.decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
        chunked = headers.get("transfer-encoding") == "chunked"
        check = _SseCheck(start) if self._stream and status == 200 else None
        body = bytearray()
        pending = ""  # an SSE line split across chunks
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                        pass
                    break
                data = (await reader.readexactly(size + 2))[:-2]
                if check is None:
                    body += data
                    continue
                lines = (pending + data.decode()).split("\n")
                pending = lines.pop()
                for line in lines:
                    check.line(line)
        else:
            body += await reader.readexactly(int(headers.get("content-length", "0")))
            if check is not None:
                for line in body.decode().split("\n"):
                    check.line(line)
        if headers.get("connection") == "close":
            await self.aclose()
        if status != 200:
            return Sample(time.perf_counter() - start, None, False, f"HTTP {status}: {bytes(body[:200])!r}")
        if check is not None:
            if pending:
                check.line(pending)
            return check.sample()
        return _check_json(body, time.perf_counter() - start)

    async def aclose(self) -> None:
        """Close the connection (the next send opens a new one)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


def request_body(model: str, body: dict, stream: bool) -> dict:
    """Return `body` for `model`, streamed (with `stream_options.include_usage`) or not."""
    out = {"model": model, **body}
    if stream:
        out.update(stream=True, stream_options={"include_usage": True})
    return out


def connect(client: str, target: Target, body: dict, stream: bool) -> Connection:
    """Return one worker's connection to `target`'s chat completions with `client` (`raw` or `httpx`)."""
    url = f"{target.base_url}/chat/completions"
    payload = request_body(target.model, body, stream)
    if client == "raw":
        return RawConnection(url, payload, target.headers, stream)
    if client == "httpx":
        return HttpxConnection(url, payload, target.headers, stream)
    raise ValueError(f"unknown client {client!r}: choose one of {', '.join(CLIENTS)}")


async def run_load(
    connections: list[Connection], requests: int, advance: Callable[[], None]
) -> tuple[list[Sample], float]:
    """Send `requests` requests, one worker per connection; return the samples and the wall time."""
    counter = itertools.count()
    samples: list[Sample] = []

    async def worker(connection: Connection) -> None:
        while next(counter) < requests:
            samples.append(await connection.send())
            advance()

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections[:requests]))
    return samples, time.perf_counter() - start
