"""What a site is given and what it gives back: one `Launch` per deployment in, one OpenAI base URL per deployment out.

A site (local processes, a Ray cluster) starts the engines of a shape's deployments on their slices. The shape
has been applied before (pools made, slices allocated, plans found: `stack.apply`), so a site needs no database:
each `Launch` says what to run and on which devices. `Site.start` returns when every engine answers its health
check, or raises UserError naming the deployment that did not come up (after stopping what it started);
`Site.stop` stops everything it started and may be called more than once. `stack.sites.open_site` picks the
site a shape names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from matrixstack.stack.spec import EngineArgs

ENGINE_DEVICE_KINDS = ("cpu", "cuda")  # what the builtin engine runs on: CPU cores or CUDA GPUs


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


@dataclass(frozen=True)
class Started:
    """A running deployment: its name and the OpenAI base URL (…/v1) the portal routes to."""

    name: str
    url: str


class Site(Protocol):
    """Something that runs a shape's engines (see the module docstring)."""

    kind: str

    def start(self, launches: list[Launch]) -> list[Started]:
        """Start every launch's engine and return them running, in the same order; UserError when one fails."""
        ...

    def stop(self) -> None:
        """Stop every engine this site started (idempotent)."""
        ...
