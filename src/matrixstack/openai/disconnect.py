"""A request's client going away: one watcher task per request notices it and ends the request's waits.

- `ClientWatch`, `client_watch(scope, receive)`: the watcher, made on first use and kept in the request's scope;
- `until_disconnect(request, awaitable)`: await something on the request's own task, cancelled with `ClientGone`
  when the client leaves first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from matrixstack.openai.errors import ClientGone

WATCH_SCOPE_KEY = "matrixstack.client_watch"


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


def client_watch(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]]) -> ClientWatch:
    """Return the request's ClientWatch, made on first use (call it once the request body has been read)."""
    watch = scope.get(WATCH_SCOPE_KEY)
    if watch is None:
        watch = scope[WATCH_SCOPE_KEY] = ClientWatch(receive)
    return watch


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
