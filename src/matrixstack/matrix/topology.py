"""The allocatable shape of a fabric: devices, nodes and the ladder of switch-tier domains. Pure, no state.

Device identity inside a fabric is the global device id, packed node-major as in `fabric.group`:
device = node * devices_per_node + local index; its dies (ranks) are device * dies_per_device + k.

The tier ladder is what placement constraints talk about. It is the scale-up plane's tiers, lowest first,
followed by the scale-out plane's tiers that span more nodes than the scale-up domain (only slices that may
leave their scale-up domain climb those). Tiers are numbered from 1, as Volcano's HyperNode tiers are, and
may also be named (`L1`, `L2`, `leaf`, ...). A tier whose span, capped at the fabric's size, adds no nodes
over the tier below is left out. One domain of tier k holds nodes [d * span_k, (d + 1) * span_k).

CloudMatrix384: tier 1 = L1 (one node, its 7 UB switch chips), tier 2 = L2 (all 48 nodes, the scale-up
domain). DGX H800: tier 1 = nvswitch (one node = the scale-up domain), tier 2 = leaf (16 nodes over IB),
tier 3 = spine (32 nodes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec


@dataclass(frozen=True)
class Tier:
    """One rung of the ladder: its 1-based number, name, plane, and the nodes one of its domains spans."""

    number: int
    name: str
    plane: str
    nodes_per_domain: int
    scale_up: bool


class Topology:
    """Index of one fabric for allocation: node of a device, tier domains of a node, the tier ladder."""

    def __init__(self, fabric: FabricSpec):
        self.fabric = fabric
        self.node_count = fabric.node_count
        self.devices_per_node = fabric.device.devices_per_node
        self.dies_per_device = fabric.device.dies_per_device
        self.device_count = fabric.device_count
        self.cpus_per_node = fabric.host.cpus_per_node
        self.dram_gib_per_node = float(fabric.host.dram_gib)
        self.full_mask = (1 << self.devices_per_node) - 1
        self.tiers = _ladder(fabric)
        self.scale_up_top = max(i for i, t in enumerate(self.tiers) if t.scale_up)  # 0-based index
        self.domain_counts = tuple(math.ceil(self.node_count / t.nodes_per_domain) for t in self.tiers)
        self.spans = tuple(t.nodes_per_domain for t in self.tiers)

    def ceiling(self, max_tier: int | str | None, within_domain: bool) -> int:
        """Return the 0-based index of the highest tier a slice may span, or raise a UserError naming the fix."""
        top = self.scale_up_top if within_domain else len(self.tiers) - 1
        if max_tier is None:
            return top
        index = self.tier_index(max_tier)
        if index > top:
            raise UserError(
                f"tier {self.tiers[index].name} (tier {index + 1}) of fabric {self.fabric.name!r} is above its "
                f"scale-up domain ({self.tiers[self.scale_up_top].name}); allow slices across scale-up domains "
                "(--cross-domain, within_domain=false) or pick a lower tier"
            )
        return index

    def tier_index(self, tier: int | str) -> int:
        """Return the 0-based ladder index of a tier given by 1-based number or by name (case-insensitive)."""
        if isinstance(tier, str) and tier.strip().isdigit():
            tier = int(tier)
        if isinstance(tier, int):
            if 1 <= tier <= len(self.tiers):
                return tier - 1
        else:
            for i, t in enumerate(self.tiers):
                if t.name.lower() == tier.strip().lower():
                    return i
        raise UserError(f"fabric {self.fabric.name!r} has no tier {tier!r}; its tiers are {self.describe_tiers()}")

    def describe_tiers(self) -> str:
        """Return the ladder as text, e.g. '1=L1 (1 node), 2=L2 (48 nodes)'."""
        return ", ".join(
            f"{t.number}={t.name} ({t.nodes_per_domain} node{'s' if t.nodes_per_domain > 1 else ''})"
            for t in self.tiers
        )

    def domain_nodes(self, tier_index: int, domain: int) -> range:
        """Return the nodes of one domain of a tier."""
        span = self.spans[tier_index]
        return range(domain * span, min((domain + 1) * span, self.node_count))

    def lowest_tier(self, nodes: list[int] | set[int] | tuple[int, ...]) -> int | None:
        """Return the 0-based index of the lowest tier one of whose domains holds all these nodes, or None."""
        low, high = min(nodes), max(nodes)
        for i, span in enumerate(self.spans):
            if low // span == high // span:
                return i
        return None

    def scale_up_domain(self, node: int) -> range:
        """Return the nodes of the scale-up domain that holds `node` (pooled host CPUs and DRAM come from it)."""
        return self.domain_nodes(self.scale_up_top, node // self.spans[self.scale_up_top])


def _ladder(fabric: FabricSpec) -> tuple[Tier, ...]:
    """Return the tier ladder of a fabric (see the module docstring)."""
    tiers: list[Tier] = []
    for kind in ("scale_up", "scale_out"):
        plane = fabric.plane(kind)
        if plane is None:
            continue
        for t in plane.tiers:
            span = min(t.nodes_per_domain, fabric.node_count)
            if tiers and span <= tiers[-1].nodes_per_domain:
                continue
            tiers.append(Tier(len(tiers) + 1, t.name, plane.name, span, kind == "scale_up"))
    return tuple(tiers)


@functools.lru_cache(maxsize=64)
def _topology_of_json(spec_json: str) -> Topology:
    return Topology(FabricSpec.model_validate_json(spec_json))


def topology_of(fabric: FabricSpec) -> Topology:
    """Return the (cached) topology of a fabric; identical specs share one instance."""
    return _topology_of_json(fabric.model_dump_json())
