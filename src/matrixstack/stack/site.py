"""What a site is given and what it gives back: one `Launch` per deployment in, one OpenAI base URL per deployment out.

A site (local processes, a Ray cluster) starts the engines of a shape's deployments on their slices: the builtin
engine (`engine: matrixstack`) or vLLM (`engine: vllm`, its command line and environment from
`stack.vllm_launch`). The shape has been applied before (pools made, slices allocated, plans found:
`stack.apply`), so a site needs no database: each `Launch` says what to run, on which devices and with which plan.
`Site.start` returns when every engine answers its health check, or raises UserError naming the deployment that
did not come up (after stopping what it started); `Site.stop` stops everything it started and may be called more
than once. `stack.sites.open_site` picks the site a shape names.

After `start` returns, a site keeps its engines up: one that exits unexpectedly is started again (with backoff,
`stack.supervise`), and each change is told to the `on_status` callback given to `start` as
`(deployment name, status, url)`: `STATUS_RESTARTING` while it is down, `STATUS_RUNNING` (with its URL, which may
have changed) once it answers again, `STATUS_FAILED` when the site gave up restarting it. `matrixstack up`
records these in the portal's database (`stack.apply.record_status`), which routes only to running deployments.
The first start is not told: it is what `start` returns.

Every engine a site starts requires its deployment's secret on each /v1 call (`engine_secret_env(launch)`: the
builtin engine reads `MATRIXSTACK_ENGINE_SECRET`, vLLM `VLLM_API_KEY`), the portal's
`deployment_service.engine_secret(name)`, which the portal sends as the backend's API key: a stray engine is not an
open door. It goes by environment variable, never on a command line (which `ps` shows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from matrixstack.engine.launch import ENGINE_SECRET_ENV
from matrixstack.perf.spec import InstancePlan
from matrixstack.portal.deployment_service import engine_secret
from matrixstack.stack.spec import EngineArgs

ENGINE_DEVICE_KINDS = ("cpu", "cuda")  # what the builtin engine and vLLM run on here: CPU cores or CUDA GPUs
STATUS_RUNNING = "running"  # answering its health check (the portal routes to it)
STATUS_RESTARTING = "restarting"  # exited or hung; being started again (the portal answers 503 with Retry-After)
STATUS_FAILED = "failed"  # its restarts kept failing; the site gave up on it (the portal answers 503)
VLLM_API_KEY_ENV = "VLLM_API_KEY"  # vLLM's OpenAI server requires this key on /v1 when it is set
StatusCallback = Callable[[str, str, str], None]  # (deployment name, status, its OpenAI base URL)


@dataclass(frozen=True)
class Launch:
    """One deployment's engine as a site starts it."""

    name: str  # the deployment's name; the engine serves it as its model id
    arch: str  # built-in arch name or arch YAML path
    weights: str  # "packaged", "random" or a folder path (spec.WEIGHTS_*)
    engine: str  # "matrixstack" or "vllm"
    workers: int  # engine worker processes: the plan's expert-parallel degree (1 = one process)
    device_kind: str  # "cpu" (devices are CPU cores) or "cuda" (devices are GPU indices)
    devices: tuple[int, ...]  # the slice's devices, as indices on their node (CPU core ids or GPU ids)
    strategy: str  # placement of the devices: "STRICT_PACK" (one node), "PACK" or "SPREAD" (Ray's words)
    engine_args: EngineArgs = field(default_factory=EngineArgs)
    # the instance the engine runs: the builtin engine's InstancePlan; for vllm its Plan's decode instance (vLLM
    # serves both phases in one server). None only for a Launch made by hand (tests): then tp = pp = 1, ep = workers
    plan: InstancePlan | None = None
    dies_per_device: int = 1  # ranks per device (fabric.device.dies_per_device), as InstancePlan.dp takes it


@dataclass(frozen=True)
class Started:
    """A running deployment: its name and the OpenAI base URL (…/v1) the portal routes to."""

    name: str
    url: str


class Site(Protocol):
    """Something that runs a shape's engines (see the module docstring)."""

    kind: str

    def start(self, launches: list[Launch], on_status: StatusCallback | None = None) -> list[Started]:
        """Start every launch's engine and return them running, in the same order; UserError when one fails.
        From then on, restarts of a crashed engine are told to `on_status` (see the module docstring)."""
        ...

    def stop(self) -> None:
        """Stop every engine this site started (idempotent)."""
        ...


def engine_secret_env(launch: Launch) -> dict[str, str]:
    """Return the environment variable that gives `launch`'s engine its deployment's secret: VLLM_API_KEY for vLLM,
    MATRIXSTACK_ENGINE_SECRET for the builtin engine."""
    return {VLLM_API_KEY_ENV if launch.engine == "vllm" else ENGINE_SECRET_ENV: engine_secret(launch.name)}
