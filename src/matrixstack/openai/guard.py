"""What an HTTP server here checks of a request before any route sees it: the body's size and its content type.

`RequestGuard(app, max_body_bytes)` is an ASGI middleware (the engine's and the portal's apps sit behind one):

- a body larger than `max_body_bytes` is refused with a 413 `request_too_large` in OpenAI's error format. A
  `Content-Length` over the limit is refused before a byte of the body is read; a body without one (chunked) is
  counted as it arrives and refused as soon as the count passes the limit, so a huge body is never held whole;
- a body declared with a content type that is not JSON (`text/plain`, a form) is refused with a 400 naming the
  fix, as OpenAI's API refuses it: every body these servers take is JSON. A request without a content type is
  read as JSON (FastAPI's rule). A server whose routes take a key gives `caller_refusal(scope)` (its 401 / 403, or
  None): a caller without a valid key gets that, not the 400, so a body never tells a stranger more than the key.

A refusal closes the connection (`Connection: close`) and leaves the rest of the body unread: uvicorn would read
and drop it (an endless chunked stream included) on the event loop, beside other requests. Clients still read the
answer: httpx and the `openai` client read it when their write fails.

A body that passes is read whole (at most `max_body_bytes`) before the app starts, and handed to it in the pieces
it arrived in, never joined: joining copies it, and a copy of a few MiB costs the event loop milliseconds. A route
that reads its own body takes it with `body_chunks(request)` (the pieces) and gives them to `openai.body_pool`,
which writes them to a child process one by one; the messages after the body (the client's disconnect) pass
through as they come.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request

from matrixstack.openai.errors import OpenAIError

MIB = 1024 * 1024
DEFAULT_MAX_BODY_MIB = 4.0
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_FIX = "send a JSON object with 'Content-Type: application/json'"

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def max_body_bytes(max_body_mib: float) -> int:
    """Return the body limit in bytes of a limit in MiB."""
    return int(max_body_mib * MIB)


def body_too_large(limit_bytes: int) -> OpenAIError:
    """Return the 413 of a body over `limit_bytes`."""
    return OpenAIError(
        413,
        f"the request body is larger than {limit_bytes / MIB:g} MiB ({limit_bytes} bytes), this server's limit; "
        "send a shorter prompt or fewer messages",
        code="request_too_large",
    )


def not_json(content_type: str) -> OpenAIError:
    """Return the 400 of a body declared with the non-JSON content type `content_type`."""
    message = f"the request body is declared as {content_type[:60]!r}, not JSON; {JSON_FIX}"
    return OpenAIError(400, message, code="invalid_content_type")


def is_json(content_type: str) -> bool:
    """Return True for a JSON media type (`application/json`, `application/x+json`), parameters ignored."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestGuard:
    """The ASGI middleware of the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        caller_refusal: Callable[[Scope], Awaitable[OpenAIError | None]] | None = None,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.caller_refusal = caller_refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, content_type = None, None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
        refusal = None
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            refusal = body_too_large(self.max_body_bytes)
        elif content_type is not None and scope["method"] in BODY_METHODS:
            text = content_type.decode("latin-1")
            if not is_json(text):
                refused = await self.caller_refusal(scope) if self.caller_refusal is not None else None
                refusal = refused or not_json(text)
        if refusal is None:
            body = await self._read(receive)
            if body is not None:
                await self.app(scope, _replay(body, receive), send)
                return
            refusal = body_too_large(self.max_body_bytes)
        response = refusal.response()
        response.headers["connection"] = "close"  # the body is left unread (module docstring)
        await response(scope, receive, send)

    async def _read(self, receive: Receive) -> list[Message] | None:
        """Return the body's `http.request` messages (or the disconnect that came first); None once it passed the
        limit."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # the client left: the app sees it at its first read
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """Return a receive that gives `messages`, then what `receive` gives."""
    pending = messages[::-1]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def body_chunks(request: Request) -> list[bytes]:
    """Return the request's body as the pieces it arrived in (not joined: see the module docstring); Starlette's
    ClientDisconnect when the client left first."""
    return [chunk async for chunk in request.stream() if chunk]
