"""Groups of ranks on a fabric and the link each pair of ranks talks over.

A rank is a die where the device exposes dies (Ascend 910C), else a device. Global rank ids are packed
node-major: rank = (node * devices_per_node + device) * dies_per_device + die.

Path rule for two ranks a, b:
  * same device, other die        -> the device's die-to-die link;
  * otherwise the scale-up plane when one of its tier domains holds both nodes (a node is tier 0's domain);
  * otherwise the scale-out plane, climbing to the lowest tier whose domain holds both nodes.
A path's latency is the sum of `latency_us` of the tiers it climbs to. Its bandwidth per rank is the plane's
per-device bandwidth (per-node for node-attached planes) shared by the ranks behind it, times the plane's
achievable efficiency, divided by the largest oversubscription of the tiers it leaves on the way up.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec, PlaneKind, PlaneSpec

DIE_LINK = "die-link"


@dataclass(frozen=True)
class RankLocation:
    """Where a rank sits: node index, device index within the node, die index within the device."""

    node: int
    device: int
    die: int


@dataclass(frozen=True)
class Link:
    """The path between two ranks: which port it leaves by, the tier it climbs to, its cost terms."""

    port: str
    tier: str
    latency_us: float
    bandwidth_gbs: float


def locate(fabric: FabricSpec, rank: int) -> RankLocation:
    """Return the node, device and die of a global rank id."""
    dies = fabric.device.dies_per_device
    device_global, die = divmod(rank, dies)
    node, device = divmod(device_global, fabric.device.devices_per_node)
    return RankLocation(node, device, die)


def _plane_link(fabric: FabricSpec, plane: PlaneSpec, node_a: int, node_b: int) -> Link | None:
    """Return the link over `plane` between two nodes, or None when no tier domain holds both."""
    ranks_behind_port = fabric.device.dies_per_device * (
        fabric.device.devices_per_node if plane.attached == "node" else 1
    )
    per_rank_gbs = plane.bandwidth_gbs / ranks_behind_port * plane.efficiency
    latency_us = 0.0
    taper = 1.0
    for tier in plane.tiers:
        latency_us += tier.latency_us
        if node_a // tier.nodes_per_domain == node_b // tier.nodes_per_domain:
            return Link(plane.name, tier.name, latency_us, per_rank_gbs / taper)
        taper = max(taper, tier.oversubscription)  # leaving this tier's domain goes through its uplinks
    return None


def link_between(fabric: FabricSpec, a: int, b: int, plane_kind: PlaneKind | None = None) -> Link:
    """Return the link ranks `a` and `b` use; `plane_kind` forces one plane (e.g. RDMA-only EP kernels)."""
    loc_a, loc_b = locate(fabric, a), locate(fabric, b)
    same_device = (loc_a.node, loc_a.device) == (loc_b.node, loc_b.device)
    if same_device and plane_kind is None and fabric.device.dies_per_device > 1:
        assert fabric.device.die_link_gbs is not None and fabric.device.die_link_latency_us is not None
        return Link(DIE_LINK, DIE_LINK, fabric.device.die_link_latency_us, fabric.device.die_link_gbs)
    kinds: tuple[PlaneKind, ...] = (plane_kind,) if plane_kind else ("scale_up", "scale_out")
    for kind in kinds:
        plane = fabric.plane(kind)
        if plane is None:
            continue
        link = _plane_link(fabric, plane, loc_a.node, loc_b.node)
        if link is not None:
            return link
    raise UserError(
        f"ranks {a} (node {loc_a.node}) and {b} (node {loc_b.node}) of fabric {fabric.name!r} share no plane"
        + (f" of kind {plane_kind}" if plane_kind else "")
        + "; check the planes' tiers cover all nodes"
    )


class DeviceGroup:
    """A set of ranks of one fabric that run a collective together."""

    def __init__(self, fabric: FabricSpec, ranks: list[int] | tuple[int, ...]):
        if not ranks:
            raise UserError("a device group needs at least one rank")
        bad = [r for r in ranks if not 0 <= r < fabric.die_count]
        if bad:
            raise UserError(f"ranks {bad[:5]} are outside fabric {fabric.name!r} (0..{fabric.die_count - 1})")
        if len(set(ranks)) != len(ranks):
            raise UserError("a device group lists a rank twice")
        self.fabric = fabric
        self.ranks = tuple(ranks)

    @classmethod
    def first(cls, fabric: FabricSpec, rank_count: int, start: int = 0) -> DeviceGroup:
        """Return the group of `rank_count` consecutive ranks (packed node by node) from `start`."""
        if rank_count > fabric.die_count - start:
            raise UserError(
                f"fabric {fabric.name!r} has {fabric.die_count} ranks; cannot take {rank_count} from rank {start}"
            )
        return cls(fabric, list(range(start, start + rank_count)))

    @classmethod
    def of_devices(cls, fabric: FabricSpec, devices: list[int]) -> DeviceGroup:
        """Return the group of every die of the given global device ids."""
        dies = fabric.device.dies_per_device
        return cls(fabric, [d * dies + k for d in devices for k in range(dies)])

    def __len__(self) -> int:
        return len(self.ranks)

    @cached_property
    def locations(self) -> tuple[RankLocation, ...]:
        """Return the location of each rank, in group order."""
        return tuple(locate(self.fabric, r) for r in self.ranks)

    @cached_property
    def nodes(self) -> tuple[int, ...]:
        """Return the sorted distinct nodes the group touches."""
        return tuple(sorted({loc.node for loc in self.locations}))

    @cached_property
    def ranks_per_node(self) -> int:
        """Return the largest number of the group's ranks on one node."""
        counts: dict[int, int] = {}
        for loc in self.locations:
            counts[loc.node] = counts.get(loc.node, 0) + 1
        return max(counts.values())

    def links_from(self, rank: int, plane_kind: PlaneKind | None = None) -> list[Link]:
        """Return the link from `rank` to every other rank of the group.

        A link depends only on the destination's node and whether it shares the source's device, so it is
        worked out once per such class.
        """
        source = locate(self.fabric, rank)
        by_class: dict[tuple[int, bool], Link] = {}
        links = []
        for other, loc in zip(self.ranks, self.locations, strict=True):
            if other == rank:
                continue
            key = (loc.node, loc.node == source.node and loc.device == source.device)
            if key not in by_class:
                by_class[key] = link_between(self.fabric, rank, other, plane_kind)
            links.append(by_class[key])
        return links

    def node_leaders(self) -> DeviceGroup:
        """Return the group made of the first rank of the group on each node."""
        first: dict[int, int] = {}
        for rank, loc in zip(self.ranks, self.locations, strict=True):
            first.setdefault(loc.node, rank)
        return DeviceGroup(self.fabric, list(first.values()))

    def node_local(self) -> DeviceGroup:
        """Return the group's ranks on its first node."""
        node = self.locations[0].node
        local = [r for r, loc in zip(self.ranks, self.locations, strict=True) if loc.node == node]
        return DeviceGroup(self.fabric, local)
