"""A lean HTTP/1.1 transport for the upstream clients: keep-alive connections on asyncio streams.

httpx's default transport (httpcore) spends most of a proxied request's CPU on its connection pool: every request
scans every pooled connection and polls each idle socket to see whether it is still open, which at 32 requests in
flight costs milliseconds per request. `KeepAliveTransport` keeps idle connections in a stack (the most recent
first) and checks only the one it takes, cheaply (`at_eof` / `is_closing`, which the event loop sets when the peer
closed it). It has two faces: `exchange(origin, head, body, timeouts)`, which `KeepAliveClient` uses (a
request head as bytes in, status, headers and a body stream out), and `handle_async_request`, which makes it an
`httpx.AsyncBaseTransport` for any httpx client (e.g. `HttpxClient(url, transport=KeepAliveTransport())`).

What it does: HTTP/1.1 over TCP or TLS; request bodies as bytes (what `json=` makes) or streamed; response bodies
by Content-Length, chunked transfer encoding or up to the close, streamed to the caller (an SSE relay gets each
chunk as it comes). A connection goes back to the stack once its response was read to the end and neither side
said `Connection: close`. A caller that stops reading early (a stream's reader stops at `data: [DONE]`, before
the last empty chunk) gets its connection kept when the rest of the body arrives within `DRAIN_S`; otherwise (a
cancelled stream) the connection is closed, so the backend sees the disconnect and aborts the request.

Timeouts come from httpx's per-request timeout extension. The read timeout is httpx's: the longest wait for the
next bytes. It is kept by one timer per response (not one per read): the timer aborts the connection when a
read has waited that long, and the read then raises `httpx.ReadTimeout`. Errors are httpx's (`ConnectError`,
`ConnectTimeout`, `ReadError`, `ReadTimeout`, `WriteError`, `RemoteProtocolError`), which `KeepAliveClient` and
`HttpxClient` map to 502 / 504. A request that fails on a reused connection before any response byte arrived (the
backend closed the idle connection at that moment) is sent again once on a fresh connection. No HTTP/2, no
proxies.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
CONNECT_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_S = 600.0  # a long generation is a slow response, not a dead upstream
MAX_IDLE_CONNECTIONS = 512  # per origin (scheme, host, port)
MAX_HEADER_BYTES = 64 * 1024
READ_CHUNK_BYTES = 64 * 1024
DRAIN_S = 0.05  # how long a body the caller stopped reading may take to end before its connection is dropped
DRAIN_MAX_BYTES = 64 * 1024
SMALL_BODY_BYTES = 64 * 1024  # request bodies up to this size go out in one write with the head


class _Connection:
    """One TCP (or TLS) connection to an origin: its streams, and the idle-read timer's state."""

    __slots__ = ("reader", "writer", "origin", "reused", "loop", "read_s", "waiting_since", "timer", "timed_out")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: tuple):
        self.reader, self.writer, self.origin, self.reused = reader, writer, origin, False
        self.loop = asyncio.get_running_loop()
        self.read_s: float | None = None
        self.waiting_since: float | None = None  # loop time when the pending read started (None: none pending)
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False

    def usable(self) -> bool:
        """Return True while neither side has closed the connection."""
        return not self.reader.at_eof() and not self.writer.is_closing() and not self.timed_out

    def arm(self, read_s: float | None) -> None:
        """Start keeping the read timeout `read_s` (None: none) for the reads of one response."""
        self.read_s = read_s
        if read_s is not None and self.timer is None:
            self.timer = self.loop.call_later(read_s, self._check)

    def disarm(self) -> None:
        """Stop the read timer (the response is done)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.waiting_since = None

    def _check(self) -> None:
        self.timer = None
        if self.read_s is None:
            return
        if self.waiting_since is not None and self.loop.time() - self.waiting_since >= self.read_s:
            self.timed_out = True
            self.writer.transport.abort()  # the pending read fails; `read` turns that into ReadTimeout
            return
        since = self.waiting_since if self.waiting_since is not None else self.loop.time()
        self.timer = self.loop.call_at(since + self.read_s, self._check)

    async def read(self, operation: Awaitable[T]) -> T:
        """Return what the read `operation` returns, under the read timeout; httpx errors for failures."""
        self.waiting_since = self.loop.time()
        try:
            return await operation
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            if self.timed_out:
                raise httpx.ReadTimeout(f"no data from the server for {self.read_s:g} s") from None
            raise _ReadFailed(exc) from None
        finally:
            self.waiting_since = None

    def close(self) -> None:
        """Close the connection (without waiting)."""
        self.disarm()
        self.writer.close()


class _ReadFailed(Exception):
    """A read failed (the peer closed or reset the connection, or sent something unreadable)."""

    def __init__(self, cause: BaseException):
        super().__init__(repr(cause))
        self.cause = cause


def _timeouts(request: httpx.Request) -> tuple[float | None, float | None, float | None]:
    timeout = request.extensions.get("timeout") or {}
    return timeout.get("connect"), timeout.get("read"), timeout.get("write")


class _ChunkedBody:
    """Decodes a chunked transfer-encoded body fed in pieces of any size: `feed(data)` returns the payload bytes
    the pieces so far complete, `done` turns True after the last chunk and its trailers."""

    __slots__ = ("_pending", "_left", "_after_data", "_trailers", "done")

    def __init__(self) -> None:
        self._pending = b""  # bytes not yet decoded (an incomplete size line, CRLF or trailer line)
        self._left = 0  # payload bytes of the current chunk still to come
        self._after_data = False  # the CRLF after a chunk's payload is next
        self._trailers = False  # the last chunk was seen: trailer lines until an empty one
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Return the payload bytes decoded from `data` (with what earlier calls left undecoded).

        A server that writes each event as a chunk of its own sends a dozen chunks per read: the loop keeps its
        state in locals and parses a size line with one `int()` (extensions only on the slow path)."""
        buf = self._pending + data if self._pending else data
        pos, end, out = 0, len(buf), []
        left, after_data, trailers, done = self._left, self._after_data, self._trailers, self.done
        while not done:
            if left:
                take = left if left <= end - pos else end - pos
                out.append(buf[pos : pos + take])
                pos += take
                left -= take
                if left:
                    break
                after_data = True
            if after_data:  # the CRLF that ends a chunk's payload
                if buf.startswith(b"\r\n", pos):
                    pos += 2
                    after_data = False
                elif buf[pos:] in (b"", b"\r"):
                    break
                else:
                    raise httpx.RemoteProtocolError("a chunk's payload is longer than its size")
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > MAX_HEADER_BYTES:
                    raise httpx.RemoteProtocolError("a chunk size or trailer line is too long")
                break
            line = buf[pos:line_end]
            pos = line_end + 2
            if trailers:
                done = not line
                continue
            try:
                left = int(line, 16)
            except ValueError:
                left = _chunk_size(line)
            if left < 0:  # int() takes a sign, HTTP does not
                raise httpx.RemoteProtocolError(f"bad chunk size line {line[:40]!r}")
            trailers = left == 0
        self._pending = buf[pos:]
        self._left, self._after_data, self._trailers, self.done = left, after_data, trailers, done
        return out[0] if len(out) == 1 else b"".join(out)


def _chunk_size(line: bytes) -> int:
    """Return the size of a chunk size line that has extensions (`1a;name=value`); RemoteProtocolError if bad."""
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise httpx.RemoteProtocolError(f"bad chunk size line {line[:40]!r}") from None


class ResponseStream(httpx.AsyncByteStream):
    """The body of one response, read as the caller iterates (see the module docstring for the ending).

    Each step reads what the connection has (up to READ_CHUNK_BYTES), so a chunked stream whose pieces arrived
    together (the events of a fast backend) comes out as one piece, not one per chunk."""

    def __init__(self, transport: KeepAliveTransport, conn: _Connection, length: int | None, chunked: bool, keep: bool):
        self._transport, self._conn = transport, conn
        self._left, self._keep = length, keep
        self._chunks = _ChunkedBody() if chunked else None
        self._done = False
        self._reading = False  # a read is under way

    @property
    def ended(self) -> bool:
        """Return True once the whole body was read."""
        return self._done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while data := await self.next_piece():
            yield data

    async def next_piece(self) -> bytes:
        """Return the next piece of the body, as much as the connection has (b"" once the body ended); httpx's
        errors when the read fails."""
        try:
            while not self._done:
                data = await self._read()
                if data:
                    return data
            return b""
        except _ReadFailed as exc:
            raise httpx.ReadError(f"reading the response body failed: {exc.cause!r}") from None

    async def _read(self) -> bytes:
        """Return the body bytes of one read of the connection (maybe none: a chunk's size line only)."""
        conn = self._conn
        if conn is None:
            raise httpx.StreamClosed()
        reader = conn.reader
        self._reading = True
        chunks = self._chunks
        if chunks is not None:
            raw = await conn.read(reader.read(READ_CHUNK_BYTES))
            if not raw:
                raise httpx.RemoteProtocolError("the server closed the connection before the body ended")
            data = chunks.feed(raw)
            self._done = chunks.done
            if self._done and chunks._pending:  # bytes after the body: the connection is not reusable
                self._keep = False
        elif self._left is not None:
            if self._left == 0:
                data, self._done = b"", True
            else:
                data = await conn.read(reader.read(min(self._left, READ_CHUNK_BYTES)))
                if not data:
                    raise httpx.RemoteProtocolError("the server closed the connection before the body ended")
                self._left -= len(data)
                self._done = self._left == 0
        else:  # neither length nor chunked: the body runs to the close
            self._keep = False
            data = await conn.read(reader.read(READ_CHUNK_BYTES))
            self._done = not data
        self._reading = False
        return data

    async def _drain(self) -> bool:
        """Return True when the rest of the body arrived within DRAIN_S (and was small)."""
        if self._reading:
            return False
        received = 0
        try:
            async with asyncio.timeout(DRAIN_S):
                while not self._done:
                    received += len(await self._read())
                    if received > DRAIN_MAX_BYTES:
                        return False
        except (TimeoutError, _ReadFailed, httpx.HTTPError):
            return False
        return self._done

    async def aclose(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if not self._done and self._keep and conn.usable():
            await self._drain()
        self._conn = None
        if self._done and self._keep:
            conn.disarm()
            self._transport._release(conn)
        else:
            conn.close()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """An httpx transport over a stack of keep-alive HTTP/1.1 connections per origin (see the module docstring)."""

    def __init__(self, max_idle: int = MAX_IDLE_CONNECTIONS, ssl_context: ssl.SSLContext | None = None):
        self._idle: dict[tuple, list[_Connection]] = {}
        self._max_idle = max_idle
        self._ssl_context = ssl_context
        self._closed = False

    async def _connect(self, origin: tuple, connect_s: float | None) -> _Connection:
        scheme, host, port = origin
        tls = (self._ssl_context or ssl.create_default_context()) if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_s):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None, limit=MAX_HEADER_BYTES
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        return _Connection(reader, writer, origin)

    def _take(self, origin: tuple) -> _Connection | None:
        stack = self._idle.get(origin)
        while stack:
            conn = stack.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        stack = self._idle.setdefault(conn.origin, [])
        if self._closed or len(stack) >= self._max_idle or not conn.usable():
            conn.close()
        else:
            stack.append(conn)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Return the response to `request`, its body streamed from the connection."""
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"{scheme}:// is not supported; use http:// or https://")
        origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        if isinstance(request.stream, httpx.ByteStream):
            body, chunks = request.read(), None
        else:  # a streamed body: httpx set Transfer-Encoding: chunked (or a Content-Length it knows)
            body, chunks = b"", request.stream
        chunked_body = chunks is not None and "chunked" in request.headers.get("transfer-encoding", "")
        status, headers, stream = await self.exchange(
            origin, _head(request), body, _timeouts(request), chunks, chunked_body, request.method == "HEAD"
        )
        return httpx.Response(status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"})

    async def exchange(
        self,
        origin: tuple[str, str, int],
        head: bytes,
        body: bytes,
        timeouts_s: tuple[float | None, float | None, float | None],
        chunks: Any = None,
        chunked_body: bool = False,
        head_request: bool = False,
    ) -> tuple[int, list[tuple[bytes, bytes]], ResponseStream]:
        """Send one request (its head, and its body as bytes or as `chunks`) to `origin` (scheme, host, port) and
        return (status, headers, body stream) once the response head arrived; `timeouts_s` = (connect, read, write).
        The caller reads the stream to its end or closes it (`aclose`), which gives the connection back."""
        connect_s, read_s, write_s = timeouts_s
        for attempt in (0, 1):
            conn = self._take(origin) if attempt == 0 else None
            if conn is None:
                conn = await self._connect(origin, connect_s)
            try:
                await _send(conn, head, body, chunks, chunked_body, write_s)
                return await self._response(conn, read_s, head_request)
            except _StaleConnection:
                conn.close()
                if chunks is not None:  # a streamed body cannot be sent twice
                    raise httpx.RemoteProtocolError("the server closed the connection") from None
            except BaseException:
                conn.close()
                raise
        raise httpx.RemoteProtocolError("the server closed the connection twice without answering")

    async def _response(
        self, conn: _Connection, read_s: float | None, head_request: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], ResponseStream]:
        """Return (status, headers, body stream) of the response whose head arrives on `conn`."""
        conn.arm(read_s)
        try:
            while True:
                raw = await conn.read(conn.reader.readuntil(b"\r\n\r\n"))
                version, status, headers = _parse_head(raw)
                if status != 100:
                    break
        except _ReadFailed as exc:
            cause = exc.cause
            if isinstance(cause, asyncio.IncompleteReadError) and conn.reused and not cause.partial:
                raise _StaleConnection from None
            if isinstance(cause, asyncio.LimitOverrunError | ValueError):
                raise httpx.RemoteProtocolError("the response head is too large") from None
            if isinstance(cause, OSError) and conn.reused:
                raise _StaleConnection from None
            raise httpx.RemoteProtocolError(f"the server closed the connection without a response: {cause!r}") from None
        length, chunked, keep = None, False, version != b"HTTP/1.0"
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"bad Content-Length {value[:40]!r}") from None
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lname == b"connection":
                keep = b"close" not in value.lower() and (keep or b"keep-alive" in value.lower())
        if head_request or status in (204, 304):
            length, chunked = 0, False
        return status, headers, ResponseStream(self, conn, length, chunked, keep)

    async def aclose(self) -> None:
        """Close every idle connection."""
        self._closed = True
        for stack in self._idle.values():
            for conn in stack:
                conn.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A reused connection that the server had closed before it answered."""


def _head(request: httpx.Request) -> bytes:
    """Return the request line and headers."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    lines += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _send(conn: _Connection, head: bytes, body: bytes, chunks: Any, chunked_body: bool, write_s) -> None:
    """Write the request; raise _StaleConnection when a reused connection turns out closed."""
    writer = conn.writer
    try:
        if len(body) <= SMALL_BODY_BYTES:
            writer.write(head + body)
        else:
            writer.write(head)
            writer.write(body)
        if chunks is not None:
            async for chunk in chunks:
                if chunk:
                    writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked_body else chunk)
            if chunked_body:
                writer.write(b"0\r\n\r\n")
        if writer.transport.get_write_buffer_size():  # only a full socket buffer makes drain() wait
            async with asyncio.timeout(write_s):
                await writer.drain()
    except TimeoutError:
        raise httpx.WriteTimeout("timed out sending the request") from None
    except OSError as exc:
        if conn.reused:
            raise _StaleConnection from None
        raise httpx.WriteError(f"sending the request failed: {exc}") from None


def _parse_head(raw: bytes) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """Return (HTTP version, status, headers) of a response head (status line, header lines, a blank line)."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x response: {lines[0][:60]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise httpx.RemoteProtocolError(f"bad status line {lines[0][:60]!r}") from None
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx.RemoteProtocolError(f"bad header line {line[:60]!r}")
        headers.append((name.strip(), value.strip()))
    return parts[0], status, headers
