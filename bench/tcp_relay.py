"""A TCP relay that does nothing but copy bytes: the floor of `bench/portal_overhead.py` (what one more hop costs).

Usage: `python bench/tcp_relay.py --port 9000 --upstream-port 8001 [--host 127.0.0.1]`. Every connection accepted
on the port gets its own connection to the upstream; bytes go both ways as they arrive (asyncio protocols on
uvloop, TCP_NODELAY on both sides, no parsing, no buffering beyond the kernel's). A request through it pays the
extra loopback hop and one more process on the shared cores, and nothing else: the difference between the portal
and this relay is the portal's own work (HTTP on both sides, keys, catalog, limits, metering).
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvloop


def _no_delay(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Upstream(asyncio.Protocol):
    """The relay's connection to the upstream: what it sends goes to the client."""

    def __init__(self, client: asyncio.Transport):
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    """One client connection: connects to the upstream, then copies what the client sends to it."""

    def __init__(self, host: str, upstream_port: int):
        self.host, self.upstream_port = host, upstream_port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []  # what the client sent before the upstream connection was up

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        _no_delay(transport)
        asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: _Upstream(self.transport), self.host, self.upstream_port)
        except OSError:
            self.transport.close()
            return
        _no_delay(upstream)
        self.upstream = upstream
        for data in self.early:
            upstream.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(host: str, port: int, upstream_port: int) -> None:
    """Relay connections on host:port to host:upstream_port until cancelled."""
    server = await asyncio.get_running_loop().create_server(lambda: _Client(host, upstream_port), host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Parse the options and relay until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.upstream_port))


if __name__ == "__main__":
    main()
