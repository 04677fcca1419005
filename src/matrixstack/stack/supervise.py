"""One supervised engine process: started in a session of its own, dying with the process that started it, waited
for by its /health, probed while it runs, restarted with backoff when it exits or hangs, given up on after
`max_failed_starts` failed starts in a row, and stopped with every process it started.

`SupervisedProcess(name, command, env, log_path, host=..., on_status=..., backoff=..., on_spawn=...)`:

- `spawn()` starts `command(port)` (argv for a port) on a free port of `host` in a new session (so its process
  group is its own, and it takes every process it starts with it), its stdout and stderr in `log_path` (replaced
  at the first start, appended to at each restart after a line saying why), stdin closed, `env` its whole
  environment; then tells `on_spawn(self)` (a site records the new pid). The process dies with the process that
  started it, even by SIGKILL: it runs `DIE_WITH_PARENT` first, which sets Linux's parent-death signal (SIGKILL)
  and then execs the command (the signal survives exec; the pid stays the same). The parent-death signal fires
  when the *thread* that forked the child ends, so every spawn, the restarts of the watch threads included, runs
  on one thread that lives as long as this process (`_SPAWNER`). What the process starts in its group does not
  inherit that signal (vLLM's engine core and workers outlive a killed API server), so every group is also told to
  `_WATCHDOG`: one small process per supervising process, which reads the groups to watch from a pipe and, when
  that pipe ends (the supervising process ended, however it ended), kills the groups still watched; a group is
  forgotten once it is stopped.
- `url` is its OpenAI base URL (http://HOST:PORT/v1); `ready()` says whether HOST:PORT/health answers 200, raising
  UserError (with the end of its log) when the process has exited. `wait_ready(timeout_s)` polls it. A site
  spawns all its engines first and waits for them together.
- `watch()` starts a thread that waits for the process to exit, and probes its /health every `probe_interval_s`
  (each probe waiting `probe_timeout_s`): `probe_failures` probes in a row without a 200 mean it hangs. When it
  exits or hangs (and `stop` was not called), its group is killed (the process reaped: no zombie),
  `on_status(name, STATUS_RESTARTING, url)` is told, and after a delay it is started again: the delay doubles from
  `Backoff.first_s` up to `Backoff.max_s` after each start that did not become healthy (exited, or no /health
  within `start_timeout_s`), and starts from `first_s` again once it has run healthy `Backoff.healthy_reset_s`. A
  restart keeps the port of the last healthy start (its URL stays the same) unless a start on it failed, then it
  takes a new free port. Once /health answers, `on_status(name, STATUS_RUNNING, url)`. After `max_failed_starts`
  failed starts in a row the watch gives up: a line in the log says so and why (`matrixstack logs NAME` shows it,
  after the process's own last words), and `on_status(name, STATUS_FAILED, url)` is told. A callback that raises
  is logged, never stops the watch.
- `stop()` (and `stop_all(processes)`, the same for many at once, in parallel) ends the watch, sends SIGTERM to
  the process group, SIGKILL to what is left of it after `stop_timeout_s`, and returns once no process of the
  group is alive (or, for one stuck in the kernel, after another `stop_timeout_s`). It may be called again.

`group_alive(pgid)`, `group_members(pgid)` and `log_tail(path)` are the helpers it uses, for sites that report
on processes too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TextIO

import httpx

from matrixstack.errors import UserError
from matrixstack.procs import ENDED_STATES, PROC, proc_stat
from matrixstack.stack.site import STATUS_FAILED, STATUS_RESTARTING, STATUS_RUNNING, StatusCallback

START_TIMEOUT_S = 900.0  # a restart that does not answer /health within this counts as a failed start
STOP_TIMEOUT_S = 15.0  # SIGTERM lets the engine close its workers; SIGKILL after this
POLL_S = 0.2
HEALTH_TIMEOUT_S = 2.0
PROBE_INTERVAL_S = 5.0  # a running engine's /health is asked this often
PROBE_TIMEOUT_S = 5.0  # ... and given this long to answer (a busy engine still answers within it)
PROBE_FAILURES = 3  # probes in a row without an answer: it hangs, and is restarted
MAX_FAILED_STARTS = 5  # restarts in a row that do not come up: the supervisor gives up (status failed)
LOG_TAIL_LINES = 20
LOG = logging.getLogger("matrixstack.stack")
# run first by every supervised process, with its parent's pid and its command as arguments: die by SIGKILL when
# the parent dies (prctl PR_SET_PDEATHSIG, Linux), or at once if the parent is gone already, then become the command
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform == 'linux':\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "    if os.getppid() != int(sys.argv[1]):\n"
    "        os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
# the process that kills the groups it watches once its stdin ends (the process that started it is gone)
# (it forks away at once, so that it is no child of that process: its engines are)
GROUP_WATCHDOG = (
    "import os, signal, sys\n"
    "if os.fork():\n"
    "    os._exit(0)\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "groups = set()\n"
    "for line in sys.stdin:\n"
    "    verb, pgid = line.split()\n"
    "    (groups.add if verb == 'watch' else groups.discard)(int(pgid))\n"
    "for pgid in groups:\n"
    "    try:\n"
    "        os.killpg(pgid, signal.SIGKILL)\n"
    "    except OSError:\n"
    "        pass\n"
)
# the one thread every supervised process is forked from: it lives as long as this process, so the parent-death
# signal fires when the process dies, not when a watch thread ends
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervise-spawn")


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts: `first_s`, doubled after each failed start up to `max_s`; back to `first_s` once
    the process has run healthy `healthy_reset_s`."""

    first_s: float = 1.0
    max_s: float = 60.0
    healthy_reset_s: float = 60.0

    def delay_s(self, failures: int) -> float:
        """Return the delay before the next start after `failures` starts in a row that did not stay up."""
        return min(self.max_s, self.first_s * 2**failures)


class GroupWatchdog:
    """This process's `GROUP_WATCHDOG` process, started on first use (again, and told every watched group, when
    it died)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._pipe: TextIO | None = None  # the watchdog's stdin

    def watch(self, pgid: int) -> None:
        """Have process group `pgid` killed when this process ends before it is forgotten."""
        self._tell("watch", pgid)

    def forget(self, pgid: int) -> None:
        """Stop watching process group `pgid` (it is stopped)."""
        self._tell("forget", pgid)

    def _tell(self, verb: str, pgid: int) -> None:
        with self._lock:
            (self._groups.add if verb == "watch" else self._groups.discard)(pgid)
            if self._pipe is not None:
                try:
                    self._pipe.write(f"{verb} {pgid}\n")
                    self._pipe.flush()
                    return
                except (BrokenPipeError, ValueError):  # it died: start another
                    pass
            starter = subprocess.Popen(
                [sys.executable, "-c", GROUP_WATCHDOG],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
            starter.wait()  # the watchdog forked away from it; the pipe is the watchdog's now
            self._pipe = starter.stdin
            assert self._pipe is not None
            self._pipe.write("".join(f"watch {group}\n" for group in self._groups))
            self._pipe.flush()


_WATCHDOG = GroupWatchdog()


def free_port(host: str) -> int:
    """Return a TCP port of `host` that was free a moment ago."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """Return the live processes of process group `pgid` from /proc (zombies, which only wait to be reaped, not);
    empty where there is no /proc."""
    if not (PROC / "self" / "stat").exists():
        return []
    found = []
    for entry in PROC.iterdir():
        fields = proc_stat(entry.name) if entry.name.isdigit() else None
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ENDED_STATES:
            found.append(int(entry.name))
    return found


def group_alive(pgid: int) -> bool:
    """Return whether any process of process group `pgid` is alive (zombies, which only wait to be reaped, not)."""
    if (PROC / "self" / "stat").exists():
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last `lines` lines of the log at `path` ('' when there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send `sig` to process group `pgid` (nothing when it is gone)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(eq=False)
class SupervisedProcess:
    """One engine process, restarted when it exits unexpectedly (see the module docstring)."""

    name: str
    command: Callable[[int], list[str]]  # the argv for a port
    env: dict[str, str]
    log_path: Path
    _: KW_ONLY
    host: str = "127.0.0.1"
    on_status: StatusCallback | None = None
    backoff: Backoff = Backoff()
    start_timeout_s: float = START_TIMEOUT_S
    stop_timeout_s: float = STOP_TIMEOUT_S
    max_failed_starts: int = MAX_FAILED_STARTS
    probe_interval_s: float = PROBE_INTERVAL_S
    probe_timeout_s: float = PROBE_TIMEOUT_S
    probe_failures: int = PROBE_FAILURES
    on_spawn: Callable[[SupervisedProcess], None] | None = None
    port: int = field(default=0, init=False)  # 0 until the first spawn; kept across restarts while they come up
    restarts: int = field(default=0, init=False)  # starts after the first
    process: subprocess.Popen | None = field(default=None, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)
    _stopped: bool = field(default=False, init=False)  # stop_all has seen its group gone
    _watcher: threading.Thread | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        """Return the OpenAI base URL of the process (http://HOST:PORT/v1)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """Return the process id (and process group id) of the current process, None before the first spawn."""
        return self.process.pid if self.process is not None else None

    def spawn(self) -> None:
        """Start the process (see the module docstring)."""
        if self.port == 0:
            self.port = free_port(self.host)
        mode = "ab" if self.process is not None else "wb"
        argv = [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *self.command(self.port)]
        with open(self.log_path, mode) as log:
            self.process = _SPAWNER.submit(
                subprocess.Popen,
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            ).result()
        _WATCHDOG.watch(self.process.pid)
        if self.on_spawn is not None:
            self.on_spawn(self)

    def ready(self) -> bool:
        """Return whether the process answers /health; UserError (with the end of its log) when it has exited."""
        assert self.process is not None, "spawn() first"
        code = self.process.poll()
        if code is not None:
            raise UserError(
                f"the engine of deployment {self.name} exited with code {code} while starting; its log "
                f"{self.log_path} ends with:\n{log_tail(self.log_path)}"
            )
        return self._answers_health(HEALTH_TIMEOUT_S)

    def _answers_health(self, timeout_s: float) -> bool:
        """Return whether HOST:PORT/health answers 200 within `timeout_s`."""
        try:
            return httpx.get(self.url.removesuffix("/v1") + "/health", timeout=timeout_s).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float) -> None:
        """Return once the process answers /health; UserError when it exits or does not answer within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise UserError(
                    f"deployment {self.name} did not answer within {timeout_s:.0f} s; its log {self.log_path} ends "
                    f"with:\n{log_tail(self.log_path)}"
                )
            time.sleep(POLL_S)

    def watch(self) -> None:
        """Start restarting the process whenever it exits unexpectedly, until `stop()`."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name=f"supervise-{self.name}", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        """Stop the watch and the process with its whole group (see the module docstring)."""
        stop_all([self])

    # ---- the watch ------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        failures = 0
        while True:
            healthy_since = time.monotonic()
            why = self._wait_trouble()
            if why is None:
                return
            if time.monotonic() - healthy_since >= self.backoff.healthy_reset_s:
                failures = 0
            self._kill_rest()
            self._tell(STATUS_RESTARTING)
            while True:
                if failures >= self.max_failed_starts:
                    self._note(
                        f"{why}; gave up after {failures} failed starts in a row (the lines above say why): fix "
                        "that and run `matrixstack up` again"
                    )
                    LOG.error("deployment %s: gave up after %d failed starts in a row", self.name, failures)
                    self._tell(STATUS_FAILED)
                    return
                delay_s = self.backoff.delay_s(failures)
                self._note(f"{why}; starting it again in {delay_s:g} s")
                if self._stopping.wait(delay_s):
                    return
                self.restarts += 1
                self.spawn()
                healthy = self._await_health()
                if healthy is None:
                    return
                if healthy:
                    break
                failures += 1
                code = self.process.poll() if self.process is not None else None
                why = f"exited with code {code}" if code is not None else "gave no /health within its start timeout"
                self._kill_rest()
                self.port = 0  # the port may be what failed: take a new one
            self._tell(STATUS_RUNNING)

    def _wait_trouble(self) -> str | None:
        """Return why the process needs a restart once it exits or hangs (`probe_failures` probes of /health in a
        row unanswered), None when `stop()` ends the watch first."""
        assert self.process is not None
        missed, next_probe = 0, time.monotonic() + self.probe_interval_s
        while not self._stopping.wait(POLL_S):
            code = self.process.poll()
            if code is not None:
                return f"exited with code {code}"
            if time.monotonic() < next_probe:
                continue
            missed = 0 if self._answers_health(self.probe_timeout_s) else missed + 1
            if missed >= self.probe_failures:
                return f"stopped answering /health ({missed} probes in a row, {self.probe_timeout_s:g} s each)"
            next_probe = time.monotonic() + self.probe_interval_s
        return None

    def _await_health(self) -> bool | None:
        """Return True once a restarted process answers /health, False when it exits or does not answer within
        `start_timeout_s`, None when `stop()` ends the watch first."""
        deadline = time.monotonic() + self.start_timeout_s
        while not self._stopping.is_set():
            try:
                if self.ready():
                    return True
            except UserError:
                return False
            if time.monotonic() > deadline:
                return False
            self._stopping.wait(POLL_S)
        return None

    def _kill_rest(self) -> None:
        """SIGKILL what is left of the current process's group and wait until none of it is alive."""
        assert self.process is not None
        signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + self.stop_timeout_s
        while group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)
        _WATCHDOG.forget(self.process.pid)

    def _note(self, what: str) -> None:
        """Append a line about the supervision to the process's log."""
        with open(self.log_path, "a") as log:
            log.write(f"\n--- matrixstack: the engine of deployment {self.name} {what} ---\n")

    def _tell(self, status: str) -> None:
        """Tell `on_status` the new status; log (never raise) what it raises."""
        if self.on_status is None:
            return
        try:
            self.on_status(self.name, status, self.url)
        except Exception:
            LOG.exception("recording deployment %s as %s failed", self.name, status)


def stop_all(processes: list[SupervisedProcess]) -> None:
    """Stop `processes` together: end their watches, SIGTERM each group, SIGKILL what is left after the longest
    stop timeout, and return once none of their processes is alive (see the module docstring)."""
    for p in processes:
        p._stopping.set()
    for p in processes:
        if p._watcher is not None:
            p._watcher.join()
            p._watcher = None
    running = [p.process for p in processes if p.process is not None and not p._stopped]
    for p in processes:
        p._stopped = True
    if not running:
        return
    timeout_s = max(p.stop_timeout_s for p in processes)
    for process in running:
        signal_group(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while any(group_alive(p.pid) for p in running) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for process in running:
        signal_group(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + timeout_s  # SIGKILL is final; only a process stuck in the kernel waits
    while any(group_alive(p.pid) for p in running) and time.monotonic() < deadline:
        time.sleep(POLL_S / 4)
    for process in running:
        _WATCHDOG.forget(process.pid)
