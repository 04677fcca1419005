"""What a caller asks the pool for: a slice request (devices or dies, host CPUs, pooled DRAM, constraints).

Units: devices and dies are counts; host CPUs are CPU sockets (`FabricSpec.host.cpus_per_node` per node);
DRAM is GiB. A request in dies is served in whole devices: dies are rounded up to devices
(`ceil(dies / dies_per_device)`; an Ascend 910C has two), and the slice reports its dies (ranks) as
`device * dies_per_device + k`. Two dies of one package share its HBM stacks, its UB ports and its failure
domain, so handing out half a package would let two tenants contend for both without either owning them.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import Field, model_validator

from matrixstack.specio import Strict

PolicyName = Literal["matrix", "server", "tiered"]
POLICIES: tuple[str, ...] = get_args(PolicyName)

POLICY_HELP = {
    "matrix": "any free devices of one scale-up domain: lowest tier that fits, fewest nodes, tightest fit",
    "server": "whole servers only (ceil(devices / devices per node) free nodes): classic server-level supply",
    "tiered": "lowest switch tier whose one domain fits (Volcano HyperNode), nodes filled in index order",
}


class SliceConstraints(Strict):
    """Where a slice may lie."""

    within_domain: bool = Field(
        True,
        description="boolean, keep the slice inside one scale-up domain (the bus); false lets it span tiers "
        "of the scale-out plane",
    )
    max_tier: int | str | None = Field(
        None, description="highest switch tier the slice may span: 1-based number or name (e.g. 2 or 'L2')"
    )
    whole_nodes: bool = Field(False, description="boolean, hand out whole nodes only (devices rounded up)")


class SliceRequest(Strict):
    """A request for a slice: `devices` or `dies` (exactly one), optional host CPUs and pooled DRAM."""

    devices: int | None = Field(None, gt=0, description="integer count of devices")
    dies: int | None = Field(None, gt=0, description="integer count of dies; rounded up to whole devices")
    host_cpus: int = Field(0, ge=0, description="integer count of host CPU sockets")
    dram_gib: float = Field(0.0, ge=0, description="number, pooled host DRAM in GiB")
    constraints: SliceConstraints = Field(default_factory=SliceConstraints)

    @model_validator(mode="after")
    def _devices_or_dies(self) -> SliceRequest:
        if (self.devices is None) == (self.dies is None):
            raise ValueError("give exactly one of devices or dies")
        return self

    def device_count(self, dies_per_device: int) -> int:
        """Return the number of whole devices the request needs on a fabric with this many dies per device."""
        if self.devices is not None:
            return self.devices
        assert self.dies is not None
        return math.ceil(self.dies / dies_per_device)
