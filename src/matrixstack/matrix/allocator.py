"""In-memory state of a pool: which devices, host CPUs and DRAM are free, failed or taken. No placement logic.

One `FabricState` per fabric of the pool keeps, per node, a free bitmap of its devices (bit k = local device
k), a failed bitmap, the free count, and the free host CPUs (sockets) and DRAM GiB; per tier of the ladder
(`topology.Topology`), the free devices and the wholly free nodes of each domain. A node is *wholly free*
when all its devices are free and healthy and none of its CPUs or DRAM is taken: only such nodes can be
handed out by server-level supply.

`MatrixPool` keeps two sorted indexes per tier level across all fabrics, of `(free devices, fabric, domain)`
and `(wholly free nodes, fabric, domain)`, so that the policies find the tightest domain that fits with one
bisection instead of scanning the fleet. Every change to a node updates the indexes of the domains above it.

Fragmentation (reported by `stats`) = the share of free devices that do not sit on wholly free nodes: free
capacity that whole-node requests cannot use and that forces new slices to share nodes. 0 when every free
device is on an empty node, 1 when every node is partly used.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.topology import Topology, topology_of


class FabricState:
    """Free/failed bitmaps and host resources of one fabric of a pool, with per-domain counts per tier."""

    def __init__(self, topo: Topology, index: int):
        self.topo = topo
        self.index = index
        n = topo.node_count
        self.free_mask = [topo.full_mask] * n
        self.failed_mask = [0] * n
        self.free_count = [topo.devices_per_node] * n
        self.free_cpus = [topo.cpus_per_node] * n
        self.free_dram_gib = [topo.dram_gib_per_node] * n
        self.whole = [True] * n
        self.domain_free = [
            [len(topo.domain_nodes(t, d)) * topo.devices_per_node for d in range(count)]
            for t, count in enumerate(topo.domain_counts)
        ]
        self.domain_whole = [
            [len(topo.domain_nodes(t, d)) for d in range(count)] for t, count in enumerate(topo.domain_counts)
        ]

    def node_is_whole(self, node: int) -> bool:
        """Return whether the node's devices, CPUs and DRAM are all free and healthy."""
        return (
            self.free_mask[node] == self.topo.full_mask
            and self.free_cpus[node] == self.topo.cpus_per_node
            and self.free_dram_gib[node] >= self.topo.dram_gib_per_node
        )


@dataclass(frozen=True)
class PoolStats:
    """Counts of a pool at one instant; `fragmentation` as defined in the module docstring."""

    devices: int
    free: int
    failed: int
    allocated: int
    whole_free_nodes: int
    fragmentation: float

    def to_dict(self) -> dict[str, float | int]:
        """Return the counts as a JSON-ready dict."""
        return {
            "devices": self.devices,
            "free": self.free,
            "failed": self.failed,
            "allocated": self.allocated,
            "whole_free_nodes": self.whole_free_nodes,
            "fragmentation": round(self.fragmentation, 4),
        }


class MatrixPool:
    """The allocatable state of one or more fabrics: take, give back, fail and repair devices."""

    def __init__(self, fabrics: list[FabricSpec]):
        self.fabrics = [FabricState(topology_of(spec), i) for i, spec in enumerate(fabrics)]
        self.shapes = list({id(fs.topo): fs for fs in self.fabrics}.values())  # one fabric per distinct topology
        depth = max(len(fs.topo.tiers) for fs in self.fabrics)
        self.free_index: list[list[tuple[int, int, int]]] = [[] for _ in range(depth)]
        self.whole_index: list[list[tuple[int, int, int]]] = [[] for _ in range(depth)]
        for fs in self.fabrics:
            for t, counts in enumerate(fs.domain_free):
                self.free_index[t].extend((c, fs.index, d) for d, c in enumerate(counts))
                self.whole_index[t].extend((c, fs.index, d) for d, c in enumerate(fs.domain_whole[t]))
        for index in (*self.free_index, *self.whole_index):
            index.sort()
        self.device_total = sum(fs.topo.device_count for fs in self.fabrics)
        self.free_devices = self.device_total
        self.failed_devices = 0
        self.whole_free_nodes = sum(fs.topo.node_count for fs in self.fabrics)
        self.whole_free_devices = self.device_total

    def take(self, fabric: int, devices: list[int] | tuple[int, ...], hosts: tuple[tuple[int, int, float], ...] = ()):
        """Mark devices and host resources (node, cpus, dram_gib) taken; raises ValueError if one is not free."""
        fs = self.fabrics[fabric]
        dpn = fs.topo.devices_per_node
        masks: dict[int, int] = {}
        for device in devices:
            node, bit = divmod(device, dpn)
            masks[node] = masks.get(node, 0) | (1 << bit)
        for node, mask in masks.items():
            if fs.free_mask[node] & mask != mask:
                raise ValueError(f"devices {sorted(devices)} of fabric {fabric} are not all free")
        for node, cpus, dram_gib in hosts:
            if fs.free_cpus[node] < cpus or fs.free_dram_gib[node] + 1e-9 < dram_gib:
                raise ValueError(f"node {node} of fabric {fabric} lacks {cpus} CPUs or {dram_gib} GiB DRAM")
        changed = {node: (fs.free_mask[node] & ~mask, 0, 0.0) for node, mask in masks.items()}
        for node, cpus, dram_gib in hosts:
            mask = changed[node][0] if node in changed else fs.free_mask[node]
            changed[node] = (mask, cpus, dram_gib)
        self._apply(fs, changed, sign=-1)

    def give_back(
        self, fabric: int, devices: list[int] | tuple[int, ...], hosts: tuple[tuple[int, int, float], ...] = ()
    ) -> None:
        """Return devices (failed ones stay out of service) and host resources (node, cpus, dram_gib) to the pool."""
        fs = self.fabrics[fabric]
        dpn = fs.topo.devices_per_node
        changed: dict[int, tuple[int, int, float]] = {}
        for device in devices:
            node, bit = divmod(device, dpn)
            mask = changed[node][0] if node in changed else fs.free_mask[node]
            if not fs.failed_mask[node] >> bit & 1:
                mask |= 1 << bit
            changed[node] = (mask, 0, 0.0)
        for node, cpus, dram_gib in hosts:
            mask = changed[node][0] if node in changed else fs.free_mask[node]
            changed[node] = (mask, cpus, dram_gib)
        self._apply(fs, changed, sign=1)

    def fail(self, fabric: int, device: int) -> bool:
        """Mark a device failed; return True when it was free (False: it belongs to a slice, or already failed)."""
        fs = self.fabrics[fabric]
        node, bit = divmod(device, fs.topo.devices_per_node)
        if fs.failed_mask[node] >> bit & 1:
            return False
        fs.failed_mask[node] |= 1 << bit
        self.failed_devices += 1
        was_free = bool(fs.free_mask[node] >> bit & 1)
        if was_free:
            self._apply(fs, {node: (fs.free_mask[node] & ~(1 << bit), 0, 0.0)}, sign=-1)
        return was_free

    def repair(self, fabric: int, device: int, *, free: bool = True) -> None:
        """Return a failed device to service; `free=False` when a slice holds it (it stays taken)."""
        fs = self.fabrics[fabric]
        node, bit = divmod(device, fs.topo.devices_per_node)
        if not fs.failed_mask[node] >> bit & 1:
            return
        fs.failed_mask[node] &= ~(1 << bit)
        self.failed_devices -= 1
        if free:
            self._apply(fs, {node: (fs.free_mask[node] | 1 << bit, 0, 0.0)}, sign=1)

    def is_free(self, fabric: int, device: int) -> bool:
        """Return whether a device is free and healthy."""
        fs = self.fabrics[fabric]
        node, bit = divmod(device, fs.topo.devices_per_node)
        return bool(fs.free_mask[node] >> bit & 1)

    def is_failed(self, fabric: int, device: int) -> bool:
        """Return whether a device is marked failed."""
        fs = self.fabrics[fabric]
        node, bit = divmod(device, fs.topo.devices_per_node)
        return bool(fs.failed_mask[node] >> bit & 1)

    def stats(self) -> PoolStats:
        """Return the pool's counts and fragmentation now."""
        free = self.free_devices
        fragmentation = 1.0 - self.whole_free_devices / free if free else 0.0
        return PoolStats(
            devices=self.device_total,
            free=free,
            failed=self.failed_devices,
            allocated=self.device_total - free - self.failed_devices,
            whole_free_nodes=self.whole_free_nodes,
            fragmentation=fragmentation,
        )

    def _apply(self, fs: FabricState, changed: dict[int, tuple[int, int, float]], sign: int) -> None:
        """Set new free masks, add sign * (cpus, dram) per node, and carry the count changes up every tier."""
        topo = fs.topo
        dpn = topo.devices_per_node
        deltas: dict[tuple[int, int], list[int]] = {}
        for node, (mask, cpus, dram_gib) in changed.items():
            count = mask.bit_count()
            delta_free = count - fs.free_count[node]
            fs.free_mask[node] = mask
            fs.free_count[node] = count
            if cpus or dram_gib:
                fs.free_cpus[node] += sign * cpus
                fs.free_dram_gib[node] += sign * dram_gib
            whole = fs.node_is_whole(node)
            delta_whole = int(whole) - int(fs.whole[node])
            fs.whole[node] = whole
            if not delta_free and not delta_whole:
                continue
            self.free_devices += delta_free
            self.whole_free_nodes += delta_whole
            self.whole_free_devices += delta_whole * dpn
            for t, span in enumerate(topo.spans):
                key = (t, node // span)
                pair = deltas.get(key)
                if pair is None:
                    deltas[key] = [delta_free, delta_whole]
                else:
                    pair[0] += delta_free
                    pair[1] += delta_whole
        for (t, domain), (delta_free, delta_whole) in deltas.items():
            if delta_free:
                old = fs.domain_free[t][domain]
                fs.domain_free[t][domain] = old + delta_free
                _move(self.free_index[t], (old, fs.index, domain), old + delta_free)
            if delta_whole:
                old = fs.domain_whole[t][domain]
                fs.domain_whole[t][domain] = old + delta_whole
                _move(self.whole_index[t], (old, fs.index, domain), old + delta_whole)


def _move(index: list[tuple[int, int, int]], entry: tuple[int, int, int], new_key: int) -> None:
    """Replace `entry` in the sorted `index` by the same domain under `new_key`."""
    at = bisect_left(index, entry)
    del index[at]
    insort(index, (new_key, entry[1], entry[2]))
