"""Predicted time of point-to-point and collective operations on a group of ranks.

Every cost is latency + size / bandwidth per hop, on the links `group.link_between` picks (see group.py).
With n ranks, S bytes, alpha the path latency, B the per-rank achievable bandwidth, and the fabric's collective
library giving t_launch (per collective or send), t_a2a (fixed cost of an MoE dispatch/combine kernel) and t_peer
(signalling per destination):

  p2p(S)               = t_launch + alpha + S / B
  all_gather(S)        = t_launch + (n-1) * alpha + (n-1)/n * S / B        ring; S = gathered bytes per rank
  reduce_scatter(S)    = t_launch + (n-1) * alpha + (n-1)/n * S / B        ring; S = input bytes per rank
  all_reduce(S)        = t_launch + min(ring: 2(n-1) alpha + 2(n-1)/n S/B,
                                        tree: 2 ceil(log2 n) alpha + 2 S/B)
  all_to_all(S)        = t_a2a + alpha_max + (n-1) * t_peer + max over ports p of sum_{d via p} (S/n) / B_d
                         S = bytes each rank sends in total, spread evenly over the n ranks (its own share
                         stays local); ports (die link, scale-up, scale-out) work in parallel.

A ring step waits for its slowest edge, so ring formulas take the largest alpha and smallest B in the group.
Hierarchical algorithms, used when a group needs the scale-out plane (it spans scale-up domains), with g ranks
per node and m nodes:
  reduce_scatter = RS over the node (scale-up, S) + RS across nodes (scale-out, S/g)
  all_gather     = AG across nodes (scale-out, S/g) + AG over the node (scale-up, S)
  all_reduce     = reduce_scatter + all_gather of the two above (the middle is an all-reduce of S/g across nodes)
all_to_all needs no special case: its per-port sum already sends in-node bytes over the scale-up port and
cross-node bytes over the scale-out port at the same time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from matrixstack.fabric.group import DeviceGroup, Link, link_between
from matrixstack.fabric.spec import FabricSpec, PlaneKind

_BYTES_PER_GB = 1e9
_US_PER_S = 1e6
_SAMPLED_SOURCE_NODES = 8  # all-to-all: ranks on distinct nodes are evaluated, at most this many


@dataclass
class Phase:
    """One step of a collective: the ranks involved, the port and the cost terms."""

    name: str
    ports: list[str]
    ranks: int
    bytes: float
    latency_us: float
    bandwidth_gbs: float
    time_us: float


@dataclass
class CollectiveCost:
    """The predicted time of one operation, with the phases it is made of."""

    op: str
    ranks: int
    bytes: float
    time_us: float
    algorithm: str
    phases: list[Phase] = field(default_factory=list)

    @property
    def planes(self) -> list[str]:
        """Return the ports (planes or die link) the operation uses, in phase order, without repeats."""
        return list(dict.fromkeys(p for phase in self.phases for p in phase.ports))

    def to_dict(self) -> dict[str, object]:
        """Return the cost as a JSON-ready dict."""
        return {**asdict(self), "planes": self.planes}


def _transfer_us(size_bytes: float, bandwidth_gbs: float) -> float:
    return size_bytes / (bandwidth_gbs * _BYTES_PER_GB) * _US_PER_S


def _ring_links(group: DeviceGroup, plane_kind: PlaneKind | None) -> list[Link]:
    ranks = group.ranks
    return [link_between(group.fabric, ranks[i], ranks[(i + 1) % len(ranks)], plane_kind) for i in range(len(ranks))]


def _needs_scale_out(group: DeviceGroup) -> bool:
    scale_up_nodes = group.fabric.scale_up_domain_nodes
    return len({node // scale_up_nodes for node in group.nodes}) > 1


def p2p(
    fabric: FabricSpec, src: int, dst: int, size_bytes: float, plane_kind: PlaneKind | None = None
) -> CollectiveCost:
    """Return the predicted time of sending `size_bytes` from rank `src` to rank `dst`."""
    link = link_between(fabric, src, dst, plane_kind)
    time_us = fabric.collective_library.launch_us + link.latency_us + _transfer_us(size_bytes, link.bandwidth_gbs)
    phase = Phase("send", [link.port], 2, size_bytes, link.latency_us, link.bandwidth_gbs, time_us)
    return CollectiveCost("p2p", 2, size_bytes, time_us, f"direct via {link.port} ({link.tier})", [phase])


def _flat_ring(group: DeviceGroup, name: str, size_bytes: float, passes: int, plane_kind: PlaneKind | None) -> Phase:
    """Return the phase of `passes` ring sweeps (1: AG or RS, 2: AR) over the group on one plane."""
    n = len(group)
    if n == 1:
        return Phase(name, [], 1, size_bytes, 0.0, math.inf, 0.0)
    links = _ring_links(group, plane_kind)
    alpha = max(link.latency_us for link in links)
    bandwidth = min(link.bandwidth_gbs for link in links)
    time_us = passes * (n - 1) * alpha + passes * (n - 1) / n * _transfer_us(size_bytes, bandwidth)
    ports = sorted({link.port for link in links})
    return Phase(name, ports, n, size_bytes, alpha, bandwidth, time_us + group.fabric.collective_library.launch_us)


def _flat_tree_all_reduce(group: DeviceGroup, size_bytes: float, plane_kind: PlaneKind | None) -> Phase:
    links = _ring_links(group, plane_kind)
    alpha = max(link.latency_us for link in links)
    bandwidth = min(link.bandwidth_gbs for link in links)
    steps = math.ceil(math.log2(len(group)))
    time_us = 2 * steps * alpha + 2 * _transfer_us(size_bytes, bandwidth) + group.fabric.collective_library.launch_us
    ports = sorted({link.port for link in links})
    return Phase("tree all-reduce", ports, len(group), size_bytes, alpha, bandwidth, time_us)


def _across_nodes(group: DeviceGroup) -> DeviceGroup:
    return group.node_leaders()


def _one_pass(
    op: str, group: DeviceGroup, size_bytes: float, plane_kind: PlaneKind | None, inter_first: bool
) -> CollectiveCost:
    """Return a single-pass ring collective (all-gather or reduce-scatter), hierarchical when it must be.

    The hierarchy moves 1/g of the data across nodes: an all-gather gathers across nodes first, a
    reduce-scatter reduces in the node first.
    """
    label = op.replace("_", "-")
    if plane_kind is None and _needs_scale_out(group):
        inter = _flat_ring(_across_nodes(group), f"{label} across nodes", size_bytes / group.ranks_per_node, 1, None)
        intra = _flat_ring(group.node_local(), f"{label} in node", size_bytes, 1, None)
        phases = [inter, intra] if inter_first else [intra, inter]
        return CollectiveCost(op, len(group), size_bytes, inter.time_us + intra.time_us, "hierarchical ring", phases)
    phase = _flat_ring(group, label, size_bytes, 1, plane_kind)
    return CollectiveCost(op, len(group), size_bytes, phase.time_us, "ring", [phase])


def all_gather(group: DeviceGroup, size_bytes: float, plane_kind: PlaneKind | None = None) -> CollectiveCost:
    """Return the predicted time of an all-gather whose gathered output is `size_bytes` per rank."""
    return _one_pass("all_gather", group, size_bytes, plane_kind, inter_first=True)


def reduce_scatter(group: DeviceGroup, size_bytes: float, plane_kind: PlaneKind | None = None) -> CollectiveCost:
    """Return the predicted time of a reduce-scatter of `size_bytes` input per rank."""
    return _one_pass("reduce_scatter", group, size_bytes, plane_kind, inter_first=False)


def all_reduce(group: DeviceGroup, size_bytes: float, plane_kind: PlaneKind | None = None) -> CollectiveCost:
    """Return the predicted time of an all-reduce of a `size_bytes` buffer on every rank."""
    if len(group) == 1:
        return CollectiveCost("all_reduce", 1, size_bytes, 0.0, "none", [])
    if plane_kind is None and _needs_scale_out(group):
        g = group.ranks_per_node
        leaders = _across_nodes(group)
        rs = _flat_ring(group.node_local(), "reduce-scatter in node", size_bytes, 1, None)
        ring = _flat_ring(leaders, "ring all-reduce across nodes", size_bytes / g, 2, None)
        tree = _flat_tree_all_reduce(leaders, size_bytes / g, None) if len(leaders) > 1 else ring
        middle = min(ring, tree, key=lambda p: p.time_us)
        ag = _flat_ring(group.node_local(), "all-gather in node", size_bytes, 1, None)
        phases = [rs, middle, ag]
        total = sum(p.time_us for p in phases)
        return CollectiveCost("all_reduce", len(group), size_bytes, total, "hierarchical", phases)
    ring = _flat_ring(group, "ring all-reduce", size_bytes, 2, plane_kind)
    tree = _flat_tree_all_reduce(group, size_bytes, plane_kind)
    best = min(ring, tree, key=lambda p: p.time_us)
    algorithm = "ring" if best is ring else "tree"
    return CollectiveCost("all_reduce", len(group), size_bytes, best.time_us, algorithm, [best])


def _sample_sources(group: DeviceGroup) -> list[int]:
    """Return one rank per distinct node of the group, evenly sampled when there are many nodes."""
    first_per_node: dict[int, int] = {}
    for rank, loc in zip(group.ranks, group.locations, strict=True):
        first_per_node.setdefault(loc.node, rank)
    sources = list(first_per_node.values())
    if len(sources) <= _SAMPLED_SOURCE_NODES:
        return sources
    step = (len(sources) - 1) / (_SAMPLED_SOURCE_NODES - 1)
    return [sources[round(i * step)] for i in range(_SAMPLED_SOURCE_NODES)]


def all_to_all(
    group: DeviceGroup,
    size_bytes: float,
    plane_kind: PlaneKind | None = None,
    scale_out_share: float | None = None,
) -> CollectiveCost:
    """Return the predicted time of an all-to-all where each rank sends `size_bytes` spread over all ranks.

    `scale_out_share` is the fraction of `size_bytes` that leaves the node over the scale-out plane when the
    library deduplicates per node (DeepEP's normal kernels send a token once per remote node and forward it
    over NVLink); by default each remote rank gets its even share S/n.
    """
    n = len(group)
    if n == 1:
        return CollectiveCost("all_to_all", 1, size_bytes, 0.0, "none", [])
    library = group.fabric.collective_library
    scale_out = group.fabric.plane("scale_out")
    share = size_bytes / n
    worst: Phase | None = None
    for source in _sample_sources(group):
        links = group.links_from(source, plane_kind)
        remote = sum(1 for link in links if scale_out is not None and link.port == scale_out.name)
        per_port_us: dict[str, float] = {}
        for link in links:
            bytes_to_peer = share
            if scale_out_share is not None and remote and scale_out is not None and link.port == scale_out.name:
                bytes_to_peer = size_bytes * scale_out_share / remote
            per_port_us[link.port] = per_port_us.get(link.port, 0.0) + _transfer_us(bytes_to_peer, link.bandwidth_gbs)
        alpha = max(link.latency_us for link in links)
        transfer = max(per_port_us.values())
        time_us = library.all_to_all_launch_us + alpha + (n - 1) * library.per_peer_us + transfer
        sent = share * (n - 1)
        effective_gbs = sent / (transfer / _US_PER_S) / _BYTES_PER_GB if transfer else math.inf
        phase = Phase("all-to-all", sorted(per_port_us), n, size_bytes, alpha, effective_gbs, time_us)
        if worst is None or phase.time_us > worst.time_us:
            worst = phase
    assert worst is not None
    return CollectiveCost("all_to_all", n, size_bytes, worst.time_us, "direct (all peers at once)", [worst])


def moe_message_bytes(
    tokens_per_rank: int, hidden: int, top_k: int, bytes_per_element: float, scale_bytes: float = 0
) -> float:
    """Return the bytes one rank sends in an MoE dispatch or combine: one copy per (token, chosen expert)."""
    return tokens_per_rank * top_k * (hidden * bytes_per_element + scale_bytes)


def group_planes(group: DeviceGroup) -> dict[str, object]:
    """Return which ports the group's traffic uses, the highest tier it climbs to, and whether it is hierarchical."""
    links = [link for source in _sample_sources(group) for link in group.links_from(source)]
    tiers = list(dict.fromkeys(f"{link.port}:{link.tier}" for link in links))
    return {
        "ranks": len(group),
        "nodes": len(group.nodes),
        "ports": sorted({link.port for link in links}),
        "tiers": tiers,
        "hierarchical": _needs_scale_out(group),
    }
