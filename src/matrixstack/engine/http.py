"""The HTTP plumbing shared by the engine's server and the portal, free of torch: OpenAI-format errors, SSE,
client-disconnect handling and running an app under uvicorn.

- `OpenAIError(status, message, param, code)`: an error answered as OpenAI's `{"error": {...}}` with a status;
  `validation_error(errors)` turns pydantic / FastAPI validation errors into a 400 naming the first bad field;
- `ClientGone`, `ClientWatch`, `until_disconnect`: a request's client went away; one watcher task per request
  notices it and ends the request's waits;
- `sse_event(data)`, `SSE_DONE`, `EventStream`: server-sent events, and a streaming response that always runs
  its close callback, also when the client disconnected;
- `bind_socket(host, port)`, `uvicorn_server(app, log_level)`, `ServerThread(app)`: a listening socket (with
  TCP_NODELAY), a uvicorn server for an app, and that server on a background thread (tests, embedding).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from matrixstack.engine.openai_types import error_body
from matrixstack.errors import UserError

GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to finish on Ctrl-C before they are cut
SSE_DONE = "data: [DONE]\n\n"
SSE_DONE_BYTES = SSE_DONE.encode()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIError(Exception):
    """An error answered in OpenAI's format with an HTTP status."""

    def __init__(
        self, status_code: int, message: str, param: str | None = None, code: str | None = None, type_: str = ""
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("server_error" if status_code >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """Return the OpenAI error object."""
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        """Return the error as a JSON response."""
        return JSONResponse(self.body(), status_code=self.status_code)


class ClientGone(Exception):
    """The client of a non-streamed request disconnected; its request was aborted."""


def sse_event(data: dict[str, Any]) -> str:
    """Return one server-sent event (`data: {...}\\n\\n`) carrying `data` as compact JSON (orjson: the engine's
    stream and the portal's relay write their events with this one encoder)."""
    return f"data: {orjson.dumps(data).decode()}\n\n"


def _param_of(loc: tuple | list) -> str | None:
    """Return the dotted field path of a pydantic error location (without FastAPI's leading "body")."""
    parts = [str(p) for p in loc if p != "body"]
    # Union members appear in the path as type names ("str", "list[int]"); they are not fields.
    parts = [p for p in parts if not ("[" in p or p in ("str", "int", "float", "bool", "function-after"))]
    return ".".join(parts) or None


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """Return a 400 for pydantic / FastAPI validation errors, naming the first bad field."""
    if not errors:
        return OpenAIError(400, "the request is invalid")
    first = errors[0]
    kind = first.get("type", "")
    param = _param_of(first.get("loc", ()))
    if kind == "json_invalid":
        return OpenAIError(400, "the request body is not valid JSON; send a JSON object")
    if kind == "missing" and param is None:
        return OpenAIError(400, "the request has no body; send a JSON object")
    if kind == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return OpenAIError(400, f"'{param}' is a required property", param)
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    bad = first.get("input")
    if "input" in first and not isinstance(bad, dict | list) and repr(bad) not in message and str(bad) not in message:
        message = f"{message} (got {bad!r})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return OpenAIError(400, f"{param or 'the request body'}: {message}{more}", param)


def install_openai_error_handlers(app: FastAPI) -> None:
    """Register on `app` the handlers every OpenAI-compatible server here shares: an `OpenAIError` as its own
    response, Starlette's HTTP errors (unknown route, wrong method) in OpenAI's format, and `ClientGone` as a 499
    nobody reads. Validation and internal errors stay each app's own."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        return OpenAIError(exc.status_code, message, code=code).response()

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"


class ClientWatch:
    """One task per request that waits for its client to disconnect (`client_watch(scope, receive)` makes it on
    first use and keeps it in the request's scope, so the waits of one request share it).

    `async with watch:` marks a wait that the client's disconnect should end: when the client goes away inside
    it, the request's task is cancelled there, and the block raises `ClientGone` instead (raised at once when the
    client has gone already). What is awaited inside runs on the request's own task: no task per wait and no
    polling, so a wait that ends resumes the request in the same turn of the event loop. The watcher is never
    cancelled: it ends when the server answers its pending `receive()`, which uvicorn does as soon as the response
    is complete (cancelling it left a cycle of exception, traceback and frames per request for the garbage
    collector, whose full passes then stalled the event loop for tens of milliseconds).
    """

    __slots__ = ("_task", "_armed", "gone", "_watcher")  # _watcher: the task, kept referenced while it runs

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]):
        self._task: asyncio.Task | None = None  # the task waiting inside `async with` (the request's)
        self._armed = False
        self.gone = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        with contextlib.suppress(Exception):  # a server whose receive fails once the client left: gone as well
            while (await receive())["type"] != "http.disconnect":
                pass
        # uvicorn also answers http.disconnect once the response is complete; nothing is armed by then
        self.gone = True
        if self._armed and self._task is not None:
            self._task.cancel()

    async def __aenter__(self) -> None:
        if self.gone:
            raise ClientGone
        self._task = asyncio.current_task()
        self._armed = True

    async def __aexit__(self, exc_type, exc, tb) -> None:
        task, self._task, self._armed = self._task, None, False
        if exc_type is asyncio.CancelledError and self.gone and task is not None:
            task.uncancel()  # the cancellation was this watch's: it ends here
            raise ClientGone from None


WATCH_SCOPE_KEY = "matrixstack.client_watch"


def client_watch(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]]) -> ClientWatch:
    """Return the request's ClientWatch, made on first use (call it once the request body has been read)."""
    watch = scope.get(WATCH_SCOPE_KEY)
    if watch is None:
        watch = scope[WATCH_SCOPE_KEY] = ClientWatch(receive)
    return watch


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


async def until_disconnect(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Return the result of `awaitable`, awaited on the request's own task; cancel it and raise ClientGone when the
    client disconnects first."""
    try:
        watch = client_watch(request.scope, request.receive)
        async with watch:
            return await awaitable
    except ClientGone:
        close = getattr(awaitable, "close", None)  # not awaited when the client had gone already
        if close is not None:
            close()
        raise


def bind_socket(host: str, port: int) -> socket.socket:
    """Return a listening TCP socket on host:port (port 0 picks a free one); UserError when it cannot bind.

    TCP_NODELAY is set on it, and the connections it accepts inherit it: asyncio sets it itself only on sockets
    whose `proto` is IPPROTO_TCP, and without it every response written in two pieces (headers, then body) waits
    ~40 ms for the client's delayed ACK (Nagle's algorithm); measured 44 ms vs 0.7 ms per request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or --host"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: FastAPI, log_level: str) -> uvicorn.Server:
    """Return a uvicorn server for `app` (no access log; open streams get GRACEFUL_SHUTDOWN_S on shutdown)."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False)
    return uvicorn.Server(config)


class ServerThread:
    """Run an app under uvicorn on a background thread: `start()` returns once it accepts connections."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn_server(app, log_level)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        """Return the server's root URL (http://host:port)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        """Start serving and return self; raise RuntimeError if uvicorn is not up within `timeout_s`."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down and wait for its thread."""
        self.server.should_exit = True
        self._thread.join(timeout=timeout_s)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
