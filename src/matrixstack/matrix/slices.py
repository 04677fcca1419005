"""Slices: allocate, free and resize a tenant's slice of a pool, and how a caller sees a slice (`SliceInfo`).

Each mutation runs on the pool's locked state (`matrix.pool_state`): read what is committed, decide with the
policies, write the rows and an event. UNIQUE(pool, fabric, device) on `slice_devices` is the last line of
defence: a write that breaks it rolls the unit of work back and `matrix.database` runs it again on fresh state.

Tenancy: a slice belongs to the tenant that allocated it. Operations that take a `tenant` act as that tenant: it
sees only its own slices, and another tenant's slice id is "not found" for it (it can neither free nor resize
it). `tenant=None` is the operator's view, which sees and may act on every slice. The caller asserts the tenant;
authentication is the portal's job. The functions take the caller's session and never commit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.events import record_event
from matrixstack.matrix.failures import heal
from matrixstack.matrix.policies import Placement, extend, place, resolve_ceilings, shrink
from matrixstack.matrix.pool_state import PoolState, add_devices, locked_slice, locked_state, remove_devices
from matrixstack.matrix.spec import POLICIES, SliceRequest
from matrixstack.matrix.store import SliceRow, iso, utcnow
from matrixstack.matrix.tenants import check_name, tenant_id


@dataclass(frozen=True)
class SliceInfo:
    """A slice as a caller sees it."""

    id: int
    pool: str
    tenant: str
    state: str
    reason: str | None
    policy: str
    fabric_index: int
    fabric: str
    devices: tuple[int, ...]
    nodes: tuple[int, ...]
    dies_per_device: int
    device_count: int
    requested_devices: int
    requested_dies: int | None
    tier: str | None
    host_cpus: int
    dram_gib: float
    hosts: tuple[tuple[int, int, float], ...]
    constraints: dict[str, Any]
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """Return the slice as a JSON-ready dict (ranks are the dies: device * dies_per_device + k)."""
        return {
            "id": self.id,
            "pool": self.pool,
            "tenant": self.tenant,
            "state": self.state,
            "reason": self.reason,
            "policy": self.policy,
            "fabric_index": self.fabric_index,
            "fabric": self.fabric,
            "devices": list(self.devices),
            "device_count": self.device_count,
            "requested_devices": self.requested_devices,
            "requested_dies": self.requested_dies,
            "dies": len(self.devices) * self.dies_per_device,
            "ranks": [d * self.dies_per_device + k for d in self.devices for k in range(self.dies_per_device)],
            "nodes": list(self.nodes),
            "tier": self.tier,
            "host_cpus": self.host_cpus,
            "dram_gib": self.dram_gib,
            "hosts": [{"node": n, "cpus": c, "dram_gib": g} for n, c, g in self.hosts],
            "constraints": self.constraints,
            "created_at": self.created_at,
        }


def check_policy(policy: str) -> str:
    """Return `policy` when it is known, else raise a UserError listing the policies."""
    if policy not in POLICIES:
        raise UserError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def alloc_slice(session: Session, pool: str, tenant: str, request: SliceRequest, policy: str = "matrix") -> SliceInfo:
    """Allocate a slice for `tenant` under `policy` and return it; raises a UserError when it does not fit."""
    check_name(tenant, "tenant")
    check_policy(policy)
    state = locked_state(session, pool)
    dies_per_device = {fs.topo.dies_per_device for fs in state.pool.fabrics}
    if request.dies is not None and len(dies_per_device) > 1:
        raise UserError(f"pool {pool!r} mixes fabrics with different dies per device; ask in --devices")
    devices = request.device_count(dies_per_device.pop())
    c = request.constraints
    ceilings = resolve_ceilings(state.pool, c.max_tier, c.within_domain)
    found = place(
        state.pool,
        policy,
        devices,
        ceilings,
        whole_nodes=c.whole_nodes,
        host_cpus=request.host_cpus,
        dram_gib=request.dram_gib,
    )
    if not isinstance(found, Placement):
        raise UserError(f"pool {pool!r}: {found}")
    row = SliceRow(
        pool_id=state.row.id,
        tenant_id=tenant_id(session, tenant),
        fabric_index=found.fabric,
        policy=policy,
        state="active",
        requested_devices=devices,
        requested_dies=request.dies,
        device_count=len(found.devices),
        host_cpus=request.host_cpus,
        dram_gib=request.dram_gib,
        within_domain=c.within_domain,
        max_tier=None if c.max_tier is None else str(c.max_tier),
        whole_nodes=c.whole_nodes,
        ceiling=ceilings[found.fabric],
    )
    session.add(row)
    session.flush()
    state.slices[row.id] = row
    state.held[row.id] = []
    state.host_rows[row.id] = []
    add_devices(session, state, row, found.devices, found.hosts)
    record_event(session, state.row.id, "alloc", tenant, row.id, devices=list(found.devices), policy=policy)
    return slice_info(state, row)


def free_slice(session: Session, slice_id: int, tenant: str | None = None) -> SliceInfo:
    """Free a live slice (the tenant's own, or any when tenant is None) and return it as it was.

    Degraded slices of the pool that the freed devices can complete are healed in the same transaction.
    """
    state, row = locked_slice(session, slice_id, tenant)
    info = slice_info(state, row)
    remove_devices(session, state, row, list(state.held[row.id]), with_hosts=True)
    row.state, row.reason, row.freed_at = "freed", None, utcnow()
    record_event(session, state.row.id, "free", row.tenant.name, row.id, devices=list(info.devices))
    heal(session, state)  # what was freed may complete a degraded slice
    return dataclasses.replace(info, state="freed")


def resize_slice(session: Session, slice_id: int, devices: int, tenant: str | None = None) -> SliceInfo:
    """Grow or shrink a live slice to `devices` devices (whole nodes for whole-node slices) and return it."""
    if devices < 1:
        raise UserError("--devices must be at least 1; free the slice to give everything back")
    state, row = locked_slice(session, slice_id, tenant)
    fs = state.pool.fabrics[row.fabric_index]
    whole = row.policy == "server" or row.whole_nodes
    dpn = fs.topo.devices_per_node
    target = math.ceil(devices / dpn) * dpn if whole else devices
    held = state.held[row.id]
    if target > len(held):
        more = extend(
            state.pool, row.policy, row.fabric_index, held, target - len(held), row.ceiling, whole_nodes=row.whole_nodes
        )
        if more is None:
            tier = fs.topo.tiers[row.ceiling].name
            raise UserError(
                f"cannot grow slice {row.id} to {target} devices: its {tier} domain has too few free "
                f"{'whole nodes' if whole else 'devices'}; free something there, or allocate a new slice"
            )
        add_devices(session, state, row, more, ())
    elif target < len(held):
        released = shrink(fs, held, len(held) - target, whole_nodes=whole)
        remove_devices(session, state, row, list(released), with_hosts=whole)
    before = row.device_count
    row.device_count, row.requested_devices = target, devices
    if row.state == "degraded" and len(state.held[row.id]) >= target:
        row.state, row.reason = "active", None
    record_event(session, state.row.id, "resize", row.tenant.name, row.id, devices_before=before, devices=target)
    return slice_info(state, row)


def slice_info(state: PoolState, row: SliceRow) -> SliceInfo:
    """Return the caller's view of a slice."""
    topo = state.pool.fabrics[row.fabric_index].topo
    devices = tuple(state.held.get(row.id, ()))
    nodes = tuple(sorted({d // topo.devices_per_node for d in devices}))
    lowest = topo.lowest_tier(nodes) if nodes else None
    return SliceInfo(
        id=row.id,
        pool=state.row.name,
        tenant=row.tenant.name,
        state=row.state,
        reason=row.reason,
        policy=row.policy,
        fabric_index=row.fabric_index,
        fabric=state.specs[row.fabric_index].name,
        devices=devices,
        nodes=nodes,
        dies_per_device=topo.dies_per_device,
        device_count=row.device_count,
        requested_devices=row.requested_devices,
        requested_dies=row.requested_dies,
        tier=topo.tiers[lowest].name if lowest is not None else None,
        host_cpus=row.host_cpus,
        dram_gib=row.dram_gib,
        hosts=tuple((h.node, h.cpus, h.dram_gib) for h in state.host_rows.get(row.id, ())),
        constraints={"within_domain": row.within_domain, "max_tier": row.max_tier, "whole_nodes": row.whole_nodes},
        created_at=iso(row.created_at),
    )
