"""Serving an app over HTTP: a listening socket, uvicorn for an app, and that server on a background thread.

- `bind_socket(host, port)`: a listening TCP socket (with TCP_NODELAY);
- `uvicorn_server(app, log_level)`: a uvicorn server for an app (no access log, a graceful shutdown);
- `ServerThread(app)`: that server on a background thread (tests, embedding).
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from matrixstack.errors import UserError

GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to finish on Ctrl-C before they are cut


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
