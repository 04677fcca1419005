"""Placement policies: which free devices (and host CPUs / DRAM) of a pool a slice gets. Pure functions.

Every policy walks the tier ladder from the lowest tier up to the slice's ceiling (its `max_tier`, else the
top of the scale-up domain, else the top of the ladder when the slice may leave its scale-up domain) and, at
each tier, tries the domains that can hold the slice from the tightest (fewest free) up: best fit across
domains keeps emptier domains (and whole fabrics) for the big slices still to come. They differ in what they
take inside the chosen domain:

* `matrix` — matrix-level supply: any free devices of the domain. The fewest nodes (take the nodes with the
  most free devices while the rest does not fit one node), and the last piece on the node whose free count
  fits it most tightly, so partly used nodes get closed and wholly free nodes stay whole.
* `server` — server-level supply, the baseline: whole free nodes only, `ceil(devices / devices_per_node)` of
  them (more when the host CPUs or DRAM asked for need more nodes); the slice owns every device, CPU and GiB
  of those nodes, and what it did not ask for is wasted.
* `tiered` — Volcano's HyperNode scheduling: the lowest tier whose one domain fits the slice, then the free
  devices of that domain in node order, as a scheduler that knows the tiers but not the devices inside a
  node would fill them.

`whole_nodes=True` makes `matrix` and `tiered` take whole nodes the way `server` does.

Host CPUs and pooled DRAM come from the slice's own nodes first, then from the other nodes of the same
scale-up domain (the bus pools them), in node order.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from matrixstack.errors import UserError
from matrixstack.matrix.allocator import FabricState, MatrixPool

HostTake = tuple[tuple[int, int, float], ...]  # (node, cpus, dram_gib) per node


@dataclass(frozen=True)
class Placement:
    """Where a slice goes: its fabric, global device ids, and host resources per node."""

    fabric: int
    devices: tuple[int, ...]
    hosts: HostTake = ()


def resolve_ceilings(pool: MatrixPool, max_tier: int | str | None, within_domain: bool) -> list[int | None]:
    """Return, per fabric of the pool, the 0-based highest tier a slice may span (None: the fabric can't serve it).

    Raises a UserError when no fabric of the pool has the tier asked for.
    """
    ceilings: list[int | None] = []
    first_error: UserError | None = None
    for fs in pool.fabrics:
        try:
            ceilings.append(fs.topo.ceiling(max_tier, within_domain))
        except UserError as exc:
            first_error = first_error or exc
            ceilings.append(None)
    if all(c is None for c in ceilings):
        assert first_error is not None
        raise first_error
    return ceilings


def nodes_needed(fs: FabricState, devices: int, host_cpus: int, dram_gib: float) -> int:
    """Return how many whole nodes of this fabric a whole-node slice needs for these devices, CPUs and DRAM."""
    topo = fs.topo
    need = math.ceil(devices / topo.devices_per_node)
    if host_cpus:
        need = max(need, math.ceil(host_cpus / topo.cpus_per_node))
    if dram_gib:
        need = max(need, math.ceil(dram_gib / topo.dram_gib_per_node - 1e-9))
    return need


def place(
    pool: MatrixPool,
    policy: str,
    devices: int,
    ceilings: list[int | None],
    *,
    whole_nodes: bool = False,
    host_cpus: int = 0,
    dram_gib: float = 0.0,
) -> Placement | str:
    """Return where a new slice of `devices` devices goes under `policy`, or a reason why it does not fit now."""
    whole = policy == "server" or whole_nodes
    # whole nodes needed, per distinct fabric shape (a fleet of identical fabrics computes it once)
    need_of = {id(fs.topo): nodes_needed(fs, devices, host_cpus, dram_gib) for fs in pool.shapes} if whole else {}
    key = min(need_of.values()) if whole else devices
    depth = max(c for c in ceilings if c is not None)
    for t in range(depth + 1):
        index = pool.whole_index[t] if whole else pool.free_index[t]
        for j in range(bisect_left(index, (key,)), len(index)):
            available, f, domain = index[j]
            ceiling = ceilings[f]
            if ceiling is None or t > ceiling:
                continue
            fs = pool.fabrics[f]
            if whole and available < need_of[id(fs.topo)]:
                continue
            nodes = fs.topo.domain_nodes(t, domain)
            if whole:
                found = _whole_nodes(fs, nodes, need_of[id(fs.topo)], host_cpus, dram_gib)
            else:
                takes = _matrix_takes(fs, nodes, devices) if policy == "matrix" else _in_order_takes(fs, nodes, devices)
                found = _with_hosts(fs, takes, host_cpus, dram_gib)
            if found is not None:
                return found
    return _why_not(pool, policy, devices, ceilings, whole, need_of)


def never_fits(
    pool: MatrixPool,
    policy: str,
    devices: int,
    ceilings: list[int | None],
    *,
    whole_nodes: bool = False,
    host_cpus: int = 0,
    dram_gib: float = 0.0,
) -> str | None:
    """Return why a slice could not fit even in the empty pool (too big for any allowed domain), else None."""
    whole = policy == "server" or whole_nodes
    best = 0
    for fs in pool.fabrics:
        ceiling = ceilings[fs.index]
        if ceiling is None:
            continue
        topo = fs.topo
        span_nodes = min(topo.spans[ceiling], topo.node_count)
        host_nodes = min(topo.spans[topo.scale_up_top], topo.node_count)
        if whole:
            if nodes_needed(fs, devices, host_cpus, dram_gib) <= span_nodes:
                return None
        elif (
            devices <= span_nodes * topo.devices_per_node
            and host_cpus <= host_nodes * topo.cpus_per_node
            and dram_gib <= host_nodes * topo.dram_gib_per_node + 1e-9
        ):
            return None
        best = max(best, span_nodes * topo.devices_per_node)
    what = f"{devices} device{'s' if devices != 1 else ''}" + (f", {host_cpus} host CPUs" if host_cpus else "")
    what += f", {dram_gib:g} GiB DRAM" if dram_gib else ""
    return (
        f"a slice of {what} does not fit in any domain its constraints allow (the largest holds {best} devices"
        f"{' in whole nodes' if whole else ''}); ask for less, or raise --within-tier / allow --cross-domain"
    )


def extend(
    pool: MatrixPool,
    policy: str,
    fabric: int,
    held: list[int] | tuple[int, ...],
    more: int,
    ceiling: int,
    *,
    whole_nodes: bool = False,
) -> tuple[int, ...] | None:
    """Return `more` free devices to add to a slice holding `held`, in the same `ceiling`-tier domain, or None.

    Used to grow a slice and to replace its failed devices. `matrix` takes free devices on the slice's own
    nodes first (most free first), then places the rest as a new slice would; `tiered` fills the slice's
    nodes then the domain's nodes in order; whole-node slices (`server`, `whole_nodes`) take whole free nodes.
    """
    if not held:  # every device of the slice failed: place the lost devices as a new slice in the same fabric
        only_here = [ceiling if fs.index == fabric else None for fs in pool.fabrics]
        found = place(pool, policy, more, only_here, whole_nodes=whole_nodes)
        return found.devices if isinstance(found, Placement) else None
    fs = pool.fabrics[fabric]
    topo = fs.topo
    dpn = topo.devices_per_node
    own_nodes = sorted({d // dpn for d in held})
    domain = topo.domain_nodes(ceiling, own_nodes[0] // topo.spans[ceiling])
    if policy == "server" or whole_nodes:
        found = _whole_nodes(fs, [n for n in domain if n not in own_nodes], math.ceil(more / dpn), 0, 0.0)
        return found.devices if found is not None else None
    takes: list[tuple[int, int]] = []
    rest = more
    if policy == "matrix":
        for node in sorted(own_nodes, key=lambda n: -fs.free_count[n]):
            if rest and fs.free_count[node]:
                take = min(rest, fs.free_count[node])
                takes.append((node, take))
                rest -= take
        if rest:
            own = set(own_nodes)
            others = _matrix_takes(fs, [n for n in domain if n not in own], rest)
            if others is None:
                return None
            takes.extend(others)
    else:
        own = set(own_nodes)
        order = own_nodes + [n for n in domain if n not in own]
        found_takes = _in_order_takes(fs, order, rest)
        if found_takes is None:
            return None
        takes = found_takes
    return _devices_of(fs, takes)


def own_free(fs: FabricState, held: list[int] | tuple[int, ...], more: int) -> tuple[int, ...] | None:
    """Return `more` free devices on the nodes a slice already uses (e.g. its repaired device), or None."""
    dpn = fs.topo.devices_per_node
    takes = []
    rest = more
    for node in sorted({d // dpn for d in held}):
        if rest and fs.free_count[node]:
            take = min(rest, fs.free_count[node])
            takes.append((node, take))
            rest -= take
    return None if rest else _devices_of(fs, takes)


def shrink(fs: FabricState, held: list[int] | tuple[int, ...], release: int, *, whole_nodes: bool) -> tuple[int, ...]:
    """Return which `release` devices of a slice to give back: emptiest nodes first, so whole nodes come free."""
    dpn = fs.topo.devices_per_node
    by_node: dict[int, list[int]] = {}
    for d in sorted(held):
        by_node.setdefault(d // dpn, []).append(d)
    order = sorted(by_node, key=lambda n: (len(by_node[n]), -n))
    released: list[int] = []
    for node in order:
        if len(released) >= release:
            break
        devices = by_node[node]
        if whole_nodes:
            released.extend(devices)
        else:
            released.extend(devices[::-1][: release - len(released)])
    return tuple(sorted(released))


def _matrix_takes(fs: FabricState, nodes, devices: int) -> list[tuple[int, int]] | None:
    """Return (node, count) takes for the `matrix` policy: fewest nodes, tightest fit for the last piece."""
    free_count = fs.free_count
    candidates = sorted((free_count[n], -n) for n in nodes if free_count[n])  # equal counts: lowest node last
    counts = [c for c, _ in candidates]
    takes: list[tuple[int, int]] = []
    rest = devices
    while rest:
        if not candidates:
            return None
        at = bisect_left(counts, rest)
        if at < len(candidates):
            tightest = bisect_right(counts, counts[at]) - 1  # the lowest node among the tightest fits
            takes.append((-candidates[tightest][1], rest))
            return takes
        count, negative_node = candidates.pop()
        counts.pop()
        takes.append((-negative_node, count))
        rest -= count
    return takes


def _in_order_takes(fs: FabricState, nodes, devices: int) -> list[tuple[int, int]] | None:
    """Return (node, count) takes filling the nodes in the given order, or None when they hold too few."""
    takes: list[tuple[int, int]] = []
    rest = devices
    for node in nodes:
        count = fs.free_count[node]
        if count:
            take = min(count, rest)
            takes.append((node, take))
            rest -= take
            if not rest:
                return takes
    return None


def _devices_of(fs: FabricState, takes: list[tuple[int, int]]) -> tuple[int, ...]:
    """Return the global ids of the lowest `count` free devices of each (node, count)."""
    dpn = fs.topo.devices_per_node
    out: list[int] = []
    for node, count in takes:
        mask = fs.free_mask[node]
        base = node * dpn
        for _ in range(count):
            low = mask & -mask
            out.append(base + low.bit_length() - 1)
            mask ^= low
    return tuple(sorted(out))


def _with_hosts(
    fs: FabricState, takes: list[tuple[int, int]] | None, host_cpus: int, dram_gib: float
) -> Placement | None:
    """Return a placement of the takes with host CPUs and DRAM from the slice's scale-up domain, or None."""
    if takes is None:
        return None
    hosts: HostTake = ()
    if host_cpus or dram_gib:
        found = _host_takes(fs, [node for node, _ in takes], host_cpus, dram_gib)
        if found is None:
            return None
        hosts = found
    return Placement(fs.index, _devices_of(fs, takes), hosts)


def _host_takes(fs: FabricState, own_nodes: list[int], host_cpus: int, dram_gib: float) -> HostTake | None:
    """Return (node, cpus, dram_gib) takes: the slice's nodes first, then its scale-up domains' nodes in order."""
    order = list(dict.fromkeys(own_nodes))
    for node in own_nodes:
        order.extend(fs.topo.scale_up_domain(node))
    order = list(dict.fromkeys(order))  # own nodes first, then the rest of their domains, each node once
    cpus_left, dram_left = host_cpus, dram_gib
    per_node: dict[int, list[float]] = {}
    for node in order:
        if cpus_left <= 0 and dram_left <= 1e-9:
            break
        cpus = min(cpus_left, fs.free_cpus[node])
        dram = min(dram_left, fs.free_dram_gib[node])
        if cpus or dram > 0:
            per_node[node] = [cpus, dram]
            cpus_left -= cpus
            dram_left -= dram
    if cpus_left > 0 or dram_left > 1e-9:
        return None
    return tuple((node, int(c), float(d)) for node, (c, d) in per_node.items())


def _whole_nodes(fs: FabricState, nodes, count: int, host_cpus: int, dram_gib: float) -> Placement | None:
    """Return a placement of the first `count` wholly free nodes (all their devices, CPUs and DRAM), or None."""
    chosen = [n for n in nodes if fs.whole[n]][:count]
    if len(chosen) < count:
        return None
    topo = fs.topo
    devices = tuple(d for n in chosen for d in range(n * topo.devices_per_node, (n + 1) * topo.devices_per_node))
    hosts = tuple((n, topo.cpus_per_node, topo.dram_gib_per_node) for n in chosen) if (host_cpus or dram_gib) else ()
    return Placement(fs.index, devices, hosts)


def _why_not(
    pool: MatrixPool, policy: str, devices: int, ceilings: list[int | None], whole: bool, need_of: dict[int, int]
) -> str:
    """Return the reason a slice does not fit now: too big for any allowed domain, or no room at the moment."""
    never = never_fits(pool, policy, devices, ceilings, whole_nodes=whole)
    if never is not None:
        return never
    best, where = 0, ""
    for fs in pool.fabrics:
        ceiling = ceilings[fs.index]
        if ceiling is None:
            continue
        counts = fs.domain_whole[ceiling] if whole else fs.domain_free[ceiling]
        for domain, count in enumerate(counts):
            if count > best:
                best, where = count, f"fabric {fs.index}, {fs.topo.tiers[ceiling].name} domain {domain}"
    if not whole and best >= devices:
        return (
            f"no scale-up domain with {devices} free devices has the host CPUs and DRAM asked for free as well; "
            "ask for fewer host CPUs or less DRAM, or free a slice"
        )
    unit = "wholly free nodes" if whole else "free devices"
    wanted = f"{min(need_of.values())} whole nodes" if whole else f"{devices} devices"
    return (
        f"no room now for {wanted} under policy {policy!r}: the most {unit} in one allowed domain is {best}"
        + (f" ({where})" if where else "")
        + "; free a slice, wait, or relax the constraints"
    )
