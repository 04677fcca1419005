"""Running the portal: in the foreground on a socket (`matrixstack portal serve`), or on a background thread.

`serve_portal(db_url, host, port)` binds the port first (a taken port fails fast with a UserError), then runs
uvicorn until Ctrl-C; the app's lifespan starts the usage writer and, on the way out, writes what it still
holds. `PortalThread(db_url)` does the same on a daemon thread for tests and benchmarks (`start()` returns once
it accepts connections, `stop()` after the last usage batch is written). `log_to_stdout()` sends the
`matrixstack.portal` request log (one JSON line per request) to stdout from a thread that writes every 100 ms, so
that the event loop never waits on the terminal. Both that log and uvicorn's pass a `ScrubFilter` (`portal.scrub`):
no Bearer token, `sk-` key or backend key reaches them in clear.
"""

from __future__ import annotations

import gc
import logging
import socket
import sys
import threading
from collections import deque
from typing import TextIO

from fastapi import FastAPI

from matrixstack.openai.server import ServerThread, bind_socket, uvicorn_server
from matrixstack.portal.app import Portal, create_portal_app
from matrixstack.portal.scrub import ScrubFilter, scrub_handlers

PORTAL_LOGGER = "matrixstack.portal"
UVICORN_LOGGER = "uvicorn"  # uvicorn.error's records reach its handlers
LOG_INTERVAL_S = 0.1


class BatchedStreamHandler(logging.Handler):
    """A log handler that formats each record on the caller's thread and leaves the writing to a thread of its
    own, which writes what gathered every `interval_s`: the event loop neither waits on the terminal nor wakes a
    thread per line. `stop()` writes the rest and ends the thread; `close()` (which `logging.config.dictConfig`
    calls on every handler, as uvicorn's start-up does) only writes what is queued and keeps it working."""

    def __init__(self, stream: TextIO, interval_s: float = LOG_INTERVAL_S):
        super().__init__()
        self.stream = stream
        self._lines: deque[str] = deque()
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._write_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="portal-log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the formatted record."""
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self.flush()

    def _write(self) -> None:
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    def flush(self) -> None:
        """Write what is queued now."""
        with self._write_lock:
            self._write()

    def close(self) -> None:
        """Write what is queued (the thread goes on: see the class docstring)."""
        self.flush()
        super().close()

    def stop(self) -> None:
        """Write what is still queued and end the thread."""
        self._stopped.set()
        self._thread.join()
        self.flush()


def log_to_stdout(stream: TextIO | None = None) -> BatchedStreamHandler:
    """Send the portal's log lines (INFO and up, messages only) to `stream` (stdout) through a
    BatchedStreamHandler; return it (`stop()` it once the server stopped)."""
    handler = BatchedStreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(ScrubFilter())
    logger = logging.getLogger(PORTAL_LOGGER)
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def serve_socket(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve the portal app on an already-bound socket until Ctrl-C (uvicorn, in the foreground)."""
    server = uvicorn_server(app, log_level)
    scrub_handlers(logging.getLogger(UVICORN_LOGGER))  # uvicorn's handlers exist once its config is made
    # Objects created at start-up are never garbage; freezing them keeps full collections short.
    gc.collect()
    gc.freeze()
    server.run(sockets=[sock])


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
        """Return the app's Portal (database, gateway, metrics, writer)."""
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
        """Start serving and return self; raise RuntimeError when uvicorn is not up within `timeout_s`."""
        self._server.start(timeout_s)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut the portal down (the usage writer writes its last batch) and wait for its thread."""
        self._server.stop(timeout_s)

    def __enter__(self) -> PortalThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
