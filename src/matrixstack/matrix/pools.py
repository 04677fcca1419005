"""Pools: create and list them, and show one as a tenant or the operator sees it (`PoolView`).

A pool is a name over one or more fabrics, stored with their full specs. `show_pool` is a tenant's view (its own
slices; another tenant's devices are only `OTHERS`) or, with `tenant=None`, the operator's (every slice, and the
devices each tenant holds). The functions take the caller's session and never commit (`matrix.database`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.events import record_event
from matrixstack.matrix.pool_state import fabric_spec, load_state, pool_row
from matrixstack.matrix.slices import SliceInfo, slice_info
from matrixstack.matrix.store import FailureRow, PoolFabricRow, PoolRow, SliceDeviceRow, SliceRow, iso
from matrixstack.matrix.tenants import check_name

FREE, FAILED, OTHERS = 0, -1, -2  # owner codes in PoolView.owners besides a slice id


@dataclass
class PoolView:
    """What `show_pool` returns: the pool's fabrics, counts, visible slices, failures, and who holds each device."""

    name: str
    fabrics: list[dict[str, Any]]
    stats: dict[str, Any]
    slices: list[SliceInfo]
    failures: list[dict[str, Any]]
    tenants: dict[str, int] | None  # devices held per tenant; None in a tenant's view
    owners: list[list[int]] = field(default_factory=list)  # per fabric, per device: slice id, FREE, FAILED, OTHERS
    tenant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the view as a JSON-ready dict (without the per-device owner map)."""
        out: dict[str, Any] = {
            "pool": self.name,
            "fabrics": self.fabrics,
            "stats": self.stats,
            "slices": [s.to_dict() for s in self.slices],
            "failures": self.failures,
        }
        if self.tenants is not None:
            out["tenants"] = self.tenants
        return out


def create_pool(session: Session, name: str, fabrics: list[FabricSpec]) -> dict[str, Any]:
    """Create a pool over these fabrics (in this order) and return its summary; the name must be new."""
    check_name(name, "pool")
    if not fabrics:
        raise UserError("a pool needs at least one fabric (--fabric NAME)")
    if session.scalars(select(PoolRow.id).where(PoolRow.name == name)).first() is not None:
        raise UserError(f"pool {name!r} exists already; pick another --pool name, or `matrix show --pool {name}`")
    row = PoolRow(name=name)
    session.add(row)
    session.flush()
    for i, spec in enumerate(fabrics):
        session.add(
            PoolFabricRow(pool_id=row.id, fabric_index=i, fabric_name=spec.name, spec_json=spec.model_dump_json())
        )
    record_event(session, row.id, "create", None, None, fabrics=[f.name for f in fabrics])
    session.flush()
    session.refresh(row)
    return _summary(session, row)


def list_pools(session: Session) -> list[dict[str, Any]]:
    """Return a summary of every pool: fabrics, devices, devices allocated, live slices."""
    return [_summary(session, row) for row in session.scalars(select(PoolRow).order_by(PoolRow.name))]


def show_pool(session: Session, pool: str, tenant: str | None = None) -> PoolView:
    """Return the pool as `tenant` sees it (its own slices), or everything when tenant is None."""
    if tenant is not None:
        check_name(tenant, "tenant")
    row = pool_row(session, pool, lock=False)
    state = load_state(session, row)
    visible = [s for s in state.slices.values() if tenant is None or s.tenant.name == tenant]
    owners = []
    for fs in state.pool.fabrics:
        owner_row = [FREE] * fs.topo.device_count
        for d in range(fs.topo.device_count):
            if state.pool.is_failed(fs.index, d):
                owner_row[d] = FAILED
        owners.append(owner_row)
    for (f, d), sid in state.owner.items():
        owners[f][d] = sid if tenant is None or state.slices[sid].tenant.name == tenant else OTHERS
    tenants = None
    if tenant is None:
        tenants = {}
        for s in state.slices.values():
            tenants[s.tenant.name] = tenants.get(s.tenant.name, 0) + len(state.held[s.id])
    failures = [
        {"device": f"{r.fabric_index}:{r.device}", "reason": r.reason, "failed_at": iso(r.failed_at)}
        for r in session.scalars(
            select(FailureRow)
            .where(FailureRow.pool_id == row.id, FailureRow.repaired_at.is_(None))
            .order_by(FailureRow.id)
        )
    ]
    return PoolView(
        name=row.name,
        fabrics=[_fabric_summary(fs.topo, i) for i, fs in enumerate(state.pool.fabrics)],
        stats=state.pool.stats().to_dict() | {"slices": len(state.slices)},
        slices=[slice_info(state, s) for s in sorted(visible, key=lambda s: s.id)],
        failures=failures,
        tenants=tenants,
        owners=owners,
        tenant=tenant,
    )


def _summary(session: Session, row: PoolRow) -> dict[str, Any]:
    """Return a pool's one-line summary."""
    specs = [fabric_spec(f) for f in row.fabrics]
    allocated = session.scalar(select(func.count()).where(SliceDeviceRow.pool_id == row.id)) or 0
    failed = session.scalar(select(func.count()).where(FailureRow.pool_id == row.id, FailureRow.repaired_at.is_(None)))
    live = session.scalar(select(func.count()).where(SliceRow.pool_id == row.id, SliceRow.state != "freed"))
    return {
        "pool": row.name,
        "fabrics": [s.name for s in specs],
        "devices": sum(s.device_count for s in specs),
        "allocated": allocated,
        "failed": failed or 0,
        "slices": live or 0,
        "created_at": iso(row.created_at),
    }


def _fabric_summary(topo, index: int) -> dict[str, Any]:
    """Return one fabric of a pool as shown to users: size and tier ladder."""
    return {
        "index": index,
        "name": topo.fabric.name,
        "nodes": topo.node_count,
        "devices_per_node": topo.devices_per_node,
        "devices": topo.device_count,
        "dies_per_device": topo.dies_per_device,
        "tiers": [{"number": t.number, "name": t.name, "nodes_per_domain": t.nodes_per_domain} for t in topo.tiers],
    }
