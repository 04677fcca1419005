"""Running the portal: in the foreground on a socket (`matrixstack portal serve`), or on a background thread.

`serve_portal(db_url, host, port)` binds the port first (a taken port fails fast with a UserError), then runs
uvicorn until Ctrl-C; the app's lifespan starts the usage writer and, on the way out, writes what it still
holds. `PortalThread(db_url)` does the same on a daemon thread for tests and benchmarks (`start()` returns once
it accepts connections, `stop()` after the last usage batch is written). `log_to_stdout()` sends the
`matrixstack.portal` request log (one JSON line per request) to stdout through a queue, so that the event loop
never waits on the terminal.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import socket
import sys
from typing import TextIO

from fastapi import FastAPI

from matrixstack.engine.server import ServerThread, _uvicorn_server, bind_socket
from matrixstack.portal.app import Portal, create_portal_app

PORTAL_LOGGER = "matrixstack.portal"


def log_to_stdout(stream: TextIO | None = None) -> logging.handlers.QueueListener:
    """Send the portal's log lines (INFO and up, messages only) to `stream` (stdout) from a listener thread; return the
    listener (`stop()` it once, after the server stopped: it writes what is still queued)."""
    records: queue.SimpleQueue = queue.SimpleQueue()
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    listener = logging.handlers.QueueListener(records, handler)
    logger = logging.getLogger(PORTAL_LOGGER)
    logger.handlers = [logging.handlers.QueueHandler(records)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    listener.start()
    return listener


def serve_socket(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve the portal app on an already-bound socket until Ctrl-C (uvicorn, in the foreground)."""
    _uvicorn_server(app, log_level).run(sockets=[sock])


def serve_portal(
    db_url: str | None, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info", log_json: bool = True
) -> None:
    """Serve the portal on host:port until Ctrl-C; UserError when the port is taken or the database unreachable."""
    sock = bind_socket(host, port)
    try:
        serve_socket(create_portal_app(db_url, log_json=log_json), sock, log_level)
    finally:
        sock.close()


class PortalThread:
    """A portal on a background thread: `start()` returns once it accepts connections (tests, benchmarks)."""

    def __init__(
        self, db_url: str | None, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **app_options
    ):
        """`app_options` go to `create_portal_app` (log_json, cache_ttl_s, usage_interval_s)."""
        self.app = create_portal_app(db_url, **app_options)
        self._server = ServerThread(self.app, host, port, log_level)

    @property
    def portal(self) -> Portal:
        """Return the app's Portal (service, gateway, metrics, writer)."""
        return self.app.state.portal

    @property
    def url(self) -> str:
        """Return the portal's root URL (http://host:port)."""
        return self._server.url

    @property
    def base_url(self) -> str:
        """Return the OpenAI base URL (http://host:port/v1)."""
        return f"{self._server.url}/v1"

    def start(self, timeout_s: float = 30.0) -> PortalThread:
        """Start serving; raise RuntimeError when uvicorn is not up within `timeout_s`."""
        self._server.start(timeout_s)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut the portal down (the usage writer writes its last batch) and wait for its thread."""
        self._server.stop(timeout_s)

    def __enter__(self) -> PortalThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
