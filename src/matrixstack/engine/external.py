"""Other engines a deployment can be: an external OpenAI-compatible URL, or vLLM launched on this host.

- `ExternalEngine(base_url, api_key)`: an async client (httpx) for any OpenAI-compatible server — another
  MatrixStack engine, vLLM, a hosted API. `models()`, `complete(body)`, `chat(body)`, `stream_complete(body)`,
  `stream_chat(body)` (async iterators of parsed chunks), `health()`. Bodies are OpenAI request dicts, passed
  through as they are (only `stream` is set). An upstream error is raised as `UpstreamError` carrying the upstream
  status and its OpenAI error body unchanged, so a portal relays it as is; an unreachable upstream is a 502
  (`upstream_unreachable`), a timeout a 504 (`upstream_timeout`), both in OpenAI's error format.
- `VllmLauncher(model_path, tensor_parallel_size, enable_expert_parallel, port, extra_args)`: builds the
  `vllm serve ...` command line (`command()`), runs it (`start()` waits for `/health`), and stops it (`stop()`).
  `VllmLauncher.from_plan(model_path, instance_plan)` takes the degrees from a perf plan: tp ->
  `--tensor-parallel-size`, pp > 1 -> `--pipeline-parallel-size`, dp -> `--data-parallel-size`, ep > 1 ->
  `--enable-expert-parallel`. vLLM's expert-parallel size is always tp x dp, so a plan whose ep differs is
  refused rather than silently run with another layout. Redundant experts (vLLM's EPLB) are left to
  `extra_args`, whose flags change between vLLM versions.
- `vllm_available()`: whether `vllm` is on PATH or importable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from matrixstack.engine.openai_types import error_body
from matrixstack.errors import UserError
from matrixstack.perf.spec import InstancePlan

DEFAULT_TIMEOUT_S = 600.0  # a long generation is a slow response, not a dead upstream
CONNECT_TIMEOUT_S = 10.0
VLLM_START_TIMEOUT_S = 900.0  # loading a large model's weights takes minutes
VLLM_STOP_TIMEOUT_S = 30.0
HEALTH_POLL_S = 1.0
LOG_TAIL_CHARS = 4000


class UpstreamError(Exception):
    """An upstream engine's error: its HTTP status and its OpenAI error body (`{"error": {...}}`)."""

    def __init__(self, status_code: int, body: dict[str, Any]):
        self.status_code = status_code
        self.body = body
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        self.message = str(error.get("message") or body)
        self.code = error.get("code")
        self.param = error.get("param")
        super().__init__(f"upstream {status_code}: {self.message}")


def _error_type(status_code: int) -> str:
    return "server_error" if status_code >= 500 else "invalid_request_error"


def upstream_error(status_code: int, text: str, reason: str = "") -> UpstreamError:
    """Return the error of a non-2xx upstream response with body `text`, keeping an OpenAI error body as it is."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return UpstreamError(status_code, body)
    message = text.strip()[:500] or reason or f"HTTP {status_code}"
    if isinstance(body, dict) and "detail" in body:  # FastAPI's default error shape
        message = str(body["detail"])
    return UpstreamError(status_code, error_body(message, _error_type(status_code), code="upstream_error"))


def transport_error(base_url: str, exc: httpx.TransportError) -> UpstreamError:
    """Return the error of an upstream that could not be reached (502) or did not answer in time (504)."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(
            504, error_body(f"upstream {base_url} timed out: {exc}", "server_error", code="upstream_timeout")
        )
    return UpstreamError(
        502, error_body(f"cannot reach upstream {base_url}: {exc}", "server_error", code="upstream_unreachable")
    )


def stream_error(chunk: dict[str, Any]) -> UpstreamError | None:
    """Return the error an SSE chunk carries (`{"error": {...}}`), None for an ordinary chunk."""
    if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
        status = chunk["error"].get("code")
        return UpstreamError(status if isinstance(status, int) and status >= 400 else 500, chunk)
    return None


class ExternalEngine:
    """An OpenAI-compatible server reached over HTTP (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        """`base_url` is the API root as OpenAI clients take it, e.g. `http://127.0.0.1:8000/v1`."""
        if not base_url.startswith(("http://", "https://")):
            raise UserError(f"external engine URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            transport=transport,
        )

    @property
    def root_url(self) -> str:
        """Return the server root (the base URL without a trailing /v1), where /health lives."""
        return self.base_url.removesuffix("/v1")

    async def __aenter__(self) -> ExternalEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = await self._client.request(method, url, json=body)
        except httpx.TransportError as exc:
            raise transport_error(self.base_url, exc) from None
        if response.status_code >= 400:
            raise upstream_error(response.status_code, response.text, response.reason_phrase)
        try:
            return response.json()
        except ValueError:
            raise UpstreamError(
                502, error_body(f"upstream {url} answered non-JSON", "server_error", code="upstream_error")
            ) from None

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        url = f"{self.base_url}{path}"
        try:
            async with self._client.stream("POST", url, json={**body, "stream": True}) as response:
                if response.status_code >= 400:
                    text = (await response.aread()).decode("utf-8", "replace")
                    raise upstream_error(response.status_code, text, response.reason_phrase)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments (": ping"), event names
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    error = stream_error(chunk)
                    if error is not None:
                        raise error
                    yield chunk
        except httpx.TransportError as exc:
            raise transport_error(self.base_url, exc) from None

    async def models(self) -> list[dict[str, Any]]:
        """Return the upstream's model cards (`GET /models`'s `data`)."""
        return (await self._request("GET", f"{self.base_url}/models")).get("data", [])

    async def model_ids(self) -> list[str]:
        """Return the upstream's model ids."""
        return [card["id"] for card in await self.models()]

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Return the upstream's non-streamed `/completions` response to the OpenAI request `body`."""
        return await self._request("POST", f"{self.base_url}/completions", {**body, "stream": False})

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """Return the upstream's non-streamed `/chat/completions` response to the OpenAI request `body`."""
        return await self._request("POST", f"{self.base_url}/chat/completions", {**body, "stream": False})

    def stream_complete(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield the parsed chunks of a streamed `/completions` (up to `[DONE]`); closing it closes the upstream
        request, which aborts it there."""
        return self._stream("/completions", body)

    def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield the parsed chunks of a streamed `/chat/completions` (up to `[DONE]`)."""
        return self._stream("/chat/completions", body)

    async def health(self) -> bool:
        """Return True when the upstream answers `GET /health` (or, lacking one, `GET /models`) with 200."""
        for url in (f"{self.root_url}/health", f"{self.base_url}/models"):
            try:
                response = await self._client.get(url, timeout=CONNECT_TIMEOUT_S)
            except httpx.TransportError:
                return False
            if response.status_code == 200:
                return True
            if response.status_code != 404:
                return False
        return False


# ---- vLLM ----------------------------------------------------------------------------------------------------


def vllm_available() -> bool:
    """Return True when vLLM is installed here (the `vllm` command, or the importable package)."""
    return shutil.which("vllm") is not None or importlib.util.find_spec("vllm") is not None


def _vllm_executable() -> list[str]:
    exe = shutil.which("vllm")
    return [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


class VllmLauncher:
    """Builds, runs and stops one `vllm serve` process (see the module docstring)."""

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
        """Return the `vllm serve ...` command line."""
        cmd = [*_vllm_executable(), "serve", self.model_path, "--host", self.host, "--port", str(self.port)]
        cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
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

    def client(self, api_key: str | None = None) -> ExternalEngine:
        """Return an ExternalEngine for the launched server."""
        return ExternalEngine(self.base_url, api_key)

    def log_tail(self) -> str:
        """Return the end of vLLM's log."""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def start(self, wait: bool = True, timeout_s: float = VLLM_START_TIMEOUT_S) -> VllmLauncher:
        """Start `vllm serve` (its output goes to `log_path`) and, when `wait`, return once /health answers."""
        if not vllm_available():
            raise UserError("vLLM is not installed here (no `vllm` command or package); pip install vllm")
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
                raise RuntimeError(f"vllm serve exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=HEALTH_POLL_S).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(HEALTH_POLL_S)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer {url} within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = VLLM_STOP_TIMEOUT_S) -> int | None:
        """Stop the server (SIGTERM to its process group, SIGKILL after `timeout_s`); return its exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)  # the session leader's pid is its group id
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
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
