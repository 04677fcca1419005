"""The `local` site: each deployment's engine is a child process on this machine (`python -m matrixstack.engine.launch`
with the deployment's `EngineLaunch` spec, the code path of `matrixstack engine serve`).

Each engine runs in a session (and so a process group) of its own, bound to its slice's devices: CPU cores
(device kind "cpu") become the process's CPU affinity, which the expert-parallel workers it forks inherit; GPUs
(device kind "cuda") become its CUDA_VISIBLE_DEVICES. The affinity is set by the child itself (the spec's `cpus`)
before it imports the runtime or forks (no `preexec_fn`, which is unsafe while the parent runs threads, as it does
under a progress display). Its output goes to `data_dir()/logs/NAME.log` (replaced at each start); the engine
prints its URL there (port 0: it picks a free port), and the site waits for `/health` to answer.
`stop()` sends SIGTERM to each process group, SIGKILL to what is left after `STOP_TIMEOUT_S`, and returns once no
process of the group is alive, EP workers included.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from matrixstack.engine.launch import ENTRY_MODULE, EngineLaunch
from matrixstack.errors import UserError
from matrixstack.paths import data_dir
from matrixstack.stack.site import ENGINE_DEVICE_KINDS, Launch, Started
from matrixstack.stack.spec import WEIGHTS_PACKAGED, WEIGHTS_RANDOM, SiteShape

ENGINE_START_TIMEOUT_S = 600.0  # tiny-moe comes up in seconds; a big arch on a loaded machine takes minutes
STOP_TIMEOUT_S = 15.0  # SIGTERM lets the engine close its workers; SIGKILL after this
POLL_S = 0.2
HEALTH_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 20
URL_PATTERN = re.compile(r"(http://\S+:\d+/v1)")


@dataclass
class _Engine:
    """One started engine: its launch, process, log file and (once printed) URL."""

    launch: Launch
    process: subprocess.Popen
    log_path: Path
    url: str | None = None


def engine_command(launch: Launch) -> list[str]:
    """Return the argv that runs `launch`'s engine: `python -m matrixstack.engine.launch SPEC`, SPEC its
    `EngineLaunch` as JSON (port 0: a free one), bound to its devices.

    For CPU cores the spec names them (`cpus`, where the platform has `os.sched_setaffinity`): the entry point
    binds itself to them before it imports the runtime, so the engine and every worker it forks run on those
    cores only."""
    pinned = launch.device_kind == "cpu" and hasattr(os, "sched_setaffinity")
    spec = EngineLaunch(
        arch=launch.arch,
        weights=None if launch.weights in (WEIGHTS_PACKAGED, WEIGHTS_RANDOM) else launch.weights,
        random_weights=launch.weights == WEIGHTS_RANDOM,
        workers=launch.workers,
        host="127.0.0.1",
        port=0,
        model_id=launch.name,
        device=launch.device_kind,
        log_level="warning",
        cpus=sorted(launch.devices) if pinned else None,
        **launch.engine_args.model_dump(),
    )
    return [sys.executable, "-m", ENTRY_MODULE, spec.model_dump_json()]


def engine_env(launch: Launch) -> dict[str, str]:
    """Return the environment of `launch`'s engine: unbuffered output, and CUDA_VISIBLE_DEVICES for GPU slices."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if launch.device_kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in launch.devices)
    return env


def check_launch(launch: Launch) -> None:
    """Return None when this machine can run `launch`; UserError naming the deployment and the fix otherwise."""
    if launch.engine != "matrixstack":
        raise UserError(
            f"deployment {launch.name} runs engine {launch.engine}; a local site runs the builtin engine "
            "(engine: matrixstack), as the ray site does; a vllm deployment runs on k8s: `matrixstack stack render k8s`"
        )
    if launch.device_kind not in ENGINE_DEVICE_KINDS:
        raise UserError(
            f"deployment {launch.name} asks for {launch.device_kind} devices; a local site runs cpu or cuda slices; "
            "render it for k8s or use a local fabric"
        )
    if not launch.devices:
        raise UserError(f"deployment {launch.name} has no devices in its slice; ask for at least one")
    if launch.device_kind == "cpu" and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        missing = sorted(set(launch.devices) - allowed)
        if missing:
            raise UserError(
                f"deployment {launch.name}: its slice holds CPU cores {missing} that this process may not run on "
                f"(allowed: {sorted(allowed)}); use the local fabric, which describes this machine"
            )


def group_alive(pgid: int) -> bool:
    """Return whether any process of process group `pgid` is alive (zombies, which only wait to be reaped, not)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last `lines` lines of the log at `path` ('' when there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class LocalSite:
    """Runs a shape's engines as local processes (see the module docstring)."""

    kind = "local"

    def __init__(
        self,
        site: SiteShape,
        log_dir: Path | None = None,
        start_timeout_s: float = ENGINE_START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ):
        self.site = site
        self.log_dir = log_dir or data_dir() / "logs"
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._engines: list[_Engine] = []
        self._console = Console(stderr=True)

    @property
    def pids(self) -> dict[str, int]:
        """Return the process id (and process group id) of each started engine, by deployment name."""
        return {e.launch.name: e.process.pid for e in self._engines}

    def start(self, launches: list[Launch]) -> list[Started]:
        """Start every launch's engine and return them running, in order; UserError (with the end of the engine's
        log) when one exits or does not answer within the start timeout, after stopping all it started."""
        for launch in launches:
            check_launch(launch)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        engines = [self._spawn(launch) for launch in launches]
        try:
            self._wait_ready(engines)
        except BaseException:
            self.stop()
            raise
        return [Started(e.launch.name, e.url) for e in engines if e.url is not None]

    def _spawn(self, launch: Launch) -> _Engine:
        log_path = self.log_dir / f"{launch.name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                engine_command(launch),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=engine_env(launch),
                start_new_session=True,
            )
        engine = _Engine(launch, process, log_path)
        self._engines.append(engine)
        return engine

    def _wait_ready(self, engines: list[_Engine]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=self._console
        ) as progress:
            tasks = {
                e.launch.name: progress.add_task(f"starting {e.launch.name} ({_placement(e.launch)})", total=1)
                for e in engines
            }
            pending = list(engines)
            while pending:
                for engine in list(pending):
                    if self._ready(engine):
                        pending.remove(engine)
                        progress.update(
                            tasks[engine.launch.name], completed=1, description=f"{engine.launch.name} on {engine.url}"
                        )
                if pending and time.monotonic() > deadline:
                    names = ", ".join(e.launch.name for e in pending)
                    raise UserError(
                        f"deployment {pending[0].launch.name} did not answer within {self.start_timeout_s:.0f} s "
                        f"(still starting: {names}); its log {pending[0].log_path} ends with:\n"
                        f"{log_tail(pending[0].log_path)}"
                    )
                if pending:
                    time.sleep(POLL_S)

    def _ready(self, engine: _Engine) -> bool:
        """Return whether `engine` answers /health; UserError when its process has exited."""
        code = engine.process.poll()
        if code is not None:
            raise UserError(
                f"the engine of deployment {engine.launch.name} exited with code {code} while starting; "
                f"its log {engine.log_path} ends with:\n{log_tail(engine.log_path)}"
            )
        if engine.url is None:
            match = URL_PATTERN.search(engine.log_path.read_text(errors="replace"))
            if match is None:
                return False
            engine.url = match.group(1)
        try:
            return httpx.get(engine.url.removesuffix("/v1") + "/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        """Stop every engine this site started: SIGTERM to each process group, SIGKILL to what is left after the
        stop timeout; return once none of their processes is alive (or, for one stuck in the kernel, after another
        stop timeout). Safe to call more than once."""
        engines, self._engines = self._engines, []
        for engine in engines:
            _signal_group(engine.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for engine in engines:
            try:
                engine.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while any(group_alive(e.process.pid) for e in engines) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for engine in engines:
            _signal_group(engine.process.pid, signal.SIGKILL)
            engine.process.wait()
        deadline = time.monotonic() + self.stop_timeout_s  # SIGKILL is final; only a process stuck in the kernel waits
        while any(group_alive(e.process.pid) for e in engines) and time.monotonic() < deadline:
            time.sleep(POLL_S / 4)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _placement(launch: Launch) -> str:
    workers = f"{launch.workers} worker{'s' if launch.workers > 1 else ''}"
    devices = ",".join(str(d) for d in launch.devices)
    return f"{workers}, {launch.device_kind} {'cores' if launch.device_kind == 'cpu' else 'GPUs'} {devices}"
