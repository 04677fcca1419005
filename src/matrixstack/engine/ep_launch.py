"""How the ranks of an expert-parallel deployment start, and how its driver (`engine.ep`) reaches and watches them.

A launcher's `launch(spec, workers, timeout_s)` starts `workers` ranks running `engine.ep_worker.worker_main` and
returns one `LocalRank` or `RemoteRank` per rank, in rank order. Each rank holds two duplex `Connection`s to the
driver: the command connection (the protocol of `engine.ep`) and the lifeline, which the driver never writes to
(the rank exits when it closes). `host` is the address the ranks' torch.distributed rendezvous binds (rank 0 hosts
it), so rank 0 must run on the driver's node.

- `ProcessLauncher(start_method)`, the default: each rank a local child process ("forkserver" or "spawn") over
  `multiprocessing` pipes, the rendezvous on loopback. The driver waits on each process's sentinel to see a death.
- `TcpLauncher(start_rank, host)`: each rank started wherever `start_rank(rank, spec, address, authkey)` puts it
  (the ray site: a Ray actor in the rank's bundle), which returns a callable that kills it. There the rank runs
  `connect_rank`: two `multiprocessing.connection.Client` connections back to the launcher's TCP listener on `host`
  (authenticated with `authkey`, then a hello naming its rank and which connection this is), then `worker_main`
  unchanged. A remote rank has no process sentinel; its lifeline stands in for one: nobody writes to it, so it turns
  readable (end of file) exactly when the rank's process ends, and the driver waits on it as on a sentinel.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import (
    AuthenticationError,
    Client,
    Connection,
    answer_challenge,
    deliver_challenge,
    wait,
)

import torch.multiprocessing as mp

from matrixstack.engine.ep_worker import WorkerSpec, worker_main
from matrixstack.errors import UserError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
COMMAND, LIFELINE = "command", "lifeline"  # the hello a remote rank sends first on each of its connections
AUTHKEY_BYTES = 32

StartRank = Callable[[int, WorkerSpec, tuple[str, int], bytes], Callable[[], None]]


def describe_exit(exitcode: int) -> str:
    """Return how a process ended, in words."""
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class LocalRank:
    """A rank that is a child process of the driver: its pid, connections and process sentinel."""

    def __init__(self, process, conn: Connection, lifeline: Connection):
        self.process = process
        self.conn = conn
        self.lifeline = lifeline
        self.pid: int | None = process.pid
        self.sentinel = process.sentinel

    def ended(self) -> str | None:
        """Return how the process ended, in words, or None while it runs (reaps it when it has exited)."""
        code = self.process.exitcode
        return None if code is None else describe_exit(code)

    def is_alive(self) -> bool:
        """Return whether the process still runs."""
        return self.process.is_alive()

    def kill(self) -> None:
        """Send SIGKILL unless it has exited."""
        if self.process.is_alive():
            self.process.kill()

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the process to exit, and reap it."""
        self.process.join(timeout=timeout_s)


class RemoteRank:
    """A rank started elsewhere that connected back over TCP; `kill` is what its launcher gave to kill it."""

    def __init__(self, conn: Connection, lifeline: Connection, kill: Callable[[], None]):
        self.conn = conn
        self.lifeline = lifeline
        self.pid: int | None = None  # known from its "ready" message
        self.sentinel = lifeline
        self._kill = kill

    def ended(self) -> str | None:
        """Return "its connection closed ..." once the rank's process is gone (its lifeline at end of file), else
        None."""
        try:
            gone = self.lifeline.poll()
        except OSError:
            gone = True
        return "its connection closed (its process exited or was killed)" if gone else None

    def is_alive(self) -> bool:
        """Return whether the rank's lifeline is still open."""
        return self.ended() is None

    def kill(self) -> None:
        """Kill the rank through its launcher (a failure to do so is logged: the lifeline's close ends it too)."""
        _kill_quietly(self._kill)

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the rank's process to end."""
        try:
            wait([self.lifeline], timeout=timeout_s)
        except OSError:
            pass


def _kill_quietly(kill: Callable[[], None]) -> None:
    """Call a launcher's kill callable; log instead of raising when it fails."""
    try:
        kill()
    except Exception as exc:  # e.g. Ray already shut down at interpreter exit
        log.warning("could not kill an expert-parallel rank: %s", exc)


class ProcessLauncher:
    """Starts each rank as a local child process of the driver (see the module docstring)."""

    local = True
    host = LOOPBACK

    def __init__(self, start_method: str = "forkserver"):
        if start_method not in ("forkserver", "spawn"):
            raise UserError(f"start_method={start_method!r}: use 'forkserver' (default) or 'spawn'")
        self.start_method = start_method

    def launch(self, spec: WorkerSpec, workers: int, timeout_s: float) -> list[LocalRank]:
        """Start the ranks and return them (they load their weights in the background)."""
        context = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            context.set_forkserver_preload([worker_main.__module__])
        ranks = []
        for rank in range(workers):
            parent_end, child_end = context.Pipe(duplex=True)
            lifeline_in, lifeline_out = context.Pipe(duplex=False)
            process = context.Process(
                target=worker_main,
                args=(rank, spec, child_end, lifeline_in),
                name=f"matrixstack-ep-{rank}",
                daemon=True,
            )
            process.start()
            child_end.close()
            lifeline_in.close()
            ranks.append(LocalRank(process, parent_end, lifeline_out))
        return ranks


def connect_rank(rank: int, spec: WorkerSpec, address: tuple[str, int], authkey: bytes) -> None:
    """Run rank `rank` of a deployment whose `TcpLauncher` listens at `address`: connect back twice, then
    `worker_main` (which ends this process when the rank stops)."""
    conn = Client(address, authkey=authkey)
    conn.send((rank, COMMAND))
    lifeline = Client(address, authkey=authkey)
    lifeline.send((rank, LIFELINE))
    worker_main(rank, spec, conn, lifeline)


class TcpLauncher:
    """Starts each rank through `start_rank`, which runs `connect_rank` somewhere reachable from `host` and returns
    a callable that kills that rank (see the module docstring)."""

    local = False

    def __init__(self, start_rank: StartRank, host: str = LOOPBACK):
        self.start_rank = start_rank
        self.host = host

    def launch(self, spec: WorkerSpec, workers: int, timeout_s: float) -> list[RemoteRank]:
        """Start the ranks, wait up to `timeout_s` for each to connect back, and return them; TimeoutError (after
        killing what it started) when one does not connect in time."""
        authkey = os.urandom(AUTHKEY_BYTES)
        kills: list[Callable[[], None]] = []
        accepted: dict[tuple[int, str], Connection] = {}
        with socket.create_server((self.host, 0)) as server:
            try:
                address = server.getsockname()[:2]
                for rank in range(workers):
                    kills.append(self.start_rank(rank, spec, address, authkey))
                self._accept(server, authkey, workers, accepted, time.monotonic() + timeout_s)
            except BaseException:
                for kill in kills:
                    _kill_quietly(kill)
                for conn in accepted.values():
                    conn.close()
                raise
        return [RemoteRank(accepted[r, COMMAND], accepted[r, LIFELINE], kills[r]) for r in range(workers)]

    @staticmethod
    def _accept(
        server: socket.socket,
        authkey: bytes,
        workers: int,
        accepted: dict[tuple[int, str], Connection],
        deadline: float,
    ) -> None:
        """Fill `accepted` with every rank's two connections, by (rank, COMMAND | LIFELINE)."""
        while len(accepted) < 2 * workers:
            left = deadline - time.monotonic()
            missing = sorted({r for r in range(workers) for k in (COMMAND, LIFELINE) if (r, k) not in accepted})
            if left <= 0:
                raise TimeoutError(f"ranks {missing} did not connect back to {server.getsockname()[:2]} in time")
            server.settimeout(left)
            try:
                sock, _ = server.accept()
            except TimeoutError:
                continue
            sock.setblocking(True)
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, authkey)
                answer_challenge(conn, authkey)
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise EOFError("no hello")
                rank, kind = conn.recv()
            except (AuthenticationError, EOFError, OSError, ValueError, TypeError) as exc:
                log.warning("dropped a connection to the expert-parallel listener: %s", exc)
                conn.close()
                continue
            if (rank, kind) in accepted or not 0 <= rank < workers or kind not in (COMMAND, LIFELINE):
                conn.close()
                continue
            accepted[rank, kind] = conn
