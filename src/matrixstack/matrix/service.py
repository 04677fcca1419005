"""Operations on persisted pools: create, alloc, free, resize, fail, repair, show, events. One transaction each.

Every mutation runs in ONE database transaction: lock the pool row (`SELECT ... FOR UPDATE` on PostgreSQL; on
SQLite the transaction starts with `BEGIN IMMEDIATE`, which takes the database's write lock), read the pool's
state into a `MatrixPool`, decide with the policies, write the rows and an event, commit. Two processes
allocating from one pool therefore queue on the lock and each sees what the other committed; a crash before
the commit leaves nothing behind. UNIQUE(pool, fabric, device) on `slice_devices` is the last line of
defence: a write that breaks it rolls back and the whole operation is retried on fresh state. Busy SQLite
locks, PostgreSQL serialization failures and deadlocks are retried too.

Tenancy: a slice belongs to the tenant that allocated it. Operations that take a `tenant` act as that
tenant: it sees only its own slices, and another tenant's slice id is "not found" for it (it can neither
free nor resize it). `tenant=None` is the operator's view, which sees and may act on every slice. The
caller asserts the tenant; authentication is the portal's job.

Devices are named `F:D` (fabric index in the pool, global device id in that fabric) or just `D` in a pool
of one fabric.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.allocator import MatrixPool
from matrixstack.matrix.policies import Placement, extend, own_free, place, resolve_ceilings, shrink
from matrixstack.matrix.spec import POLICIES, SliceRequest
from matrixstack.matrix.store import (
    WRITE_OPTION,
    EventRow,
    FailureRow,
    PoolFabricRow,
    PoolRow,
    SliceDeviceRow,
    SliceHostRow,
    SliceRow,
    TenantRow,
    iso,
    open_engine,
    transact,
    utcnow,
)

T = TypeVar("T")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
FREE, FAILED, OTHERS = 0, -1, -2  # owner codes in PoolView.owners besides a slice id


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


@dataclass
class PoolView:
    """What `show` returns: the pool's fabrics, counts, visible slices, failures, and who holds each device."""

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


@dataclass
class _State:
    """A pool's state as read inside a transaction."""

    row: PoolRow
    specs: list[FabricSpec]
    pool: MatrixPool
    slices: dict[int, SliceRow]
    held: dict[int, list[int]]
    host_rows: dict[int, list[SliceHostRow]]
    owner: dict[tuple[int, int], int]


def parse_device(text: str) -> tuple[int, int]:
    """Return (fabric index, device id) from `F:D` or `D`; raises a UserError on anything else."""
    match = re.fullmatch(r"\s*(?:(\d+):)?(\d+)\s*", text)
    if not match:
        raise UserError(f"device {text!r} is not F:D or D (fabric index in the pool, device id), e.g. 17 or 0:17")
    return int(match.group(1) or 0), int(match.group(2))


def check_name(name: str, what: str) -> str:
    """Return `name` when it is a valid pool or tenant name, else raise a UserError saying what is allowed."""
    if not NAME_PATTERN.match(name or ""):
        raise UserError(
            f"{what} name {name!r} is not allowed: use 1-64 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_policy(policy: str) -> str:
    """Return `policy` when it is known, else raise a UserError listing the policies."""
    if policy not in POLICIES:
        raise UserError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


class MatrixService:
    """Pools, slices, tenants, failures and events in a database (SQLite file by default, PostgreSQL by URL)."""

    def __init__(self, url: str | None = None):
        self.engine = open_engine(url)
        self._write = self.engine.execution_options(**{WRITE_OPTION: True})
        self._read = self.engine.execution_options(**{WRITE_OPTION: False})
        self._specs: dict[str, FabricSpec] = {}

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    def __enter__(self) -> MatrixService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- pools -------------------------------------------------------------------------------------------

    def create_pool(self, name: str, fabrics: list[FabricSpec]) -> dict[str, Any]:
        """Create a pool over these fabrics (in this order) and return its summary; the name must be new."""
        check_name(name, "pool")
        if not fabrics:
            raise UserError("a pool needs at least one fabric (--fabric NAME)")

        def op(session: Session) -> dict[str, Any]:
            if session.scalars(select(PoolRow.id).where(PoolRow.name == name)).first() is not None:
                raise UserError(
                    f"pool {name!r} exists already; pick another --pool name, or `matrix show --pool {name}`"
                )
            row = PoolRow(name=name)
            session.add(row)
            session.flush()
            for i, spec in enumerate(fabrics):
                session.add(
                    PoolFabricRow(
                        pool_id=row.id, fabric_index=i, fabric_name=spec.name, spec_json=spec.model_dump_json()
                    )
                )
            _event(session, row.id, "create", None, None, fabrics=[f.name for f in fabrics])
            session.flush()
            session.refresh(row)
            return self._summary(session, row)

        return self._transact(op)

    def list_pools(self) -> list[dict[str, Any]]:
        """Return a summary of every pool: fabrics, devices, devices allocated, live slices."""

        def op(session: Session) -> list[dict[str, Any]]:
            return [self._summary(session, row) for row in session.scalars(select(PoolRow).order_by(PoolRow.name))]

        return self._transact(op, write=False)

    # --- slices ------------------------------------------------------------------------------------------

    def alloc(self, pool: str, tenant: str, request: SliceRequest, policy: str = "matrix") -> SliceInfo:
        """Allocate a slice for `tenant` under `policy` and return it; raises a UserError when it does not fit."""
        check_name(tenant, "tenant")
        check_policy(policy)

        def op(session: Session) -> SliceInfo:
            state = self._locked(session, pool)
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
                tenant_id=_tenant_id(session, tenant),
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
            self._add_devices(session, state, row, found.devices, found.hosts)
            _event(session, state.row.id, "alloc", tenant, row.id, devices=list(found.devices), policy=policy)
            return self._info(state, row)

        return self._transact(op)

    def free(self, slice_id: int, tenant: str | None = None) -> SliceInfo:
        """Free a live slice (the tenant's own, or any when tenant is None) and return it as it was.

        Degraded slices of the pool that the freed devices can complete are healed in the same transaction.
        """

        def op(session: Session) -> SliceInfo:
            state, row = self._locked_slice(session, slice_id, tenant)
            info = self._info(state, row)
            self._remove_devices(session, state, row, list(state.held[row.id]), with_hosts=True)
            row.state, row.reason, row.freed_at = "freed", None, utcnow()
            _event(session, state.row.id, "free", row.tenant.name, row.id, devices=list(info.devices))
            self._heal(session, state)  # what was freed may complete a degraded slice
            return dataclasses.replace(info, state="freed")

        return self._transact(op)

    def resize(self, slice_id: int, devices: int, tenant: str | None = None) -> SliceInfo:
        """Grow or shrink a live slice to `devices` devices (whole nodes for whole-node slices) and return it."""
        if devices < 1:
            raise UserError("--devices must be at least 1; free the slice to give everything back")

        def op(session: Session) -> SliceInfo:
            state, row = self._locked_slice(session, slice_id, tenant)
            fs = state.pool.fabrics[row.fabric_index]
            whole = row.policy == "server" or row.whole_nodes
            dpn = fs.topo.devices_per_node
            target = math.ceil(devices / dpn) * dpn if whole else devices
            held = state.held[row.id]
            if target > len(held):
                more = extend(
                    state.pool,
                    row.policy,
                    row.fabric_index,
                    held,
                    target - len(held),
                    row.ceiling,
                    whole_nodes=row.whole_nodes,
                )
                if more is None:
                    tier = fs.topo.tiers[row.ceiling].name
                    raise UserError(
                        f"cannot grow slice {row.id} to {target} devices: its {tier} domain has too few free "
                        f"{'whole nodes' if whole else 'devices'}; free something there, or allocate a new slice"
                    )
                self._add_devices(session, state, row, more, ())
            elif target < len(held):
                released = shrink(fs, held, len(held) - target, whole_nodes=whole)
                self._remove_devices(session, state, row, list(released), with_hosts=whole)
            before = row.device_count
            row.device_count, row.requested_devices = target, devices
            if row.state == "degraded" and len(state.held[row.id]) >= target:
                row.state, row.reason = "active", None
            _event(session, state.row.id, "resize", row.tenant.name, row.id, devices_before=before, devices=target)
            return self._info(state, row)

        return self._transact(op)

    # --- failures ----------------------------------------------------------------------------------------

    def fail(self, pool: str, device: tuple[int, int], reason: str = "failed") -> dict[str, Any]:
        """Mark a device failed and return what happened to its slice: none, replaced or degraded."""

        def op(session: Session) -> dict[str, Any]:
            state = self._locked(session, pool)
            f, d = _check_device(state, device)
            if state.pool.is_failed(f, d):
                raise UserError(f"device {f}:{d} of pool {pool!r} is failed already; `matrix repair --device {f}:{d}`")
            session.add(FailureRow(pool_id=state.row.id, fabric_index=f, device=d, reason=reason))
            owner = state.owner.get((f, d))
            state.pool.fail(f, d)
            result: dict[str, Any] = {"device": f"{f}:{d}", "reason": reason, "slice": owner, "action": "none"}
            tenant = state.slices[owner].tenant.name if owner is not None else None
            _event(session, state.row.id, "fail", tenant, owner, device=f"{f}:{d}", reason=reason)
            if owner is not None:
                result.update(self._replace(session, state, state.slices[owner], d))
            return result

        return self._transact(op)

    def repair(self, pool: str, device: tuple[int, int]) -> dict[str, Any]:
        """Return a failed device to service, heal degraded slices where now possible, and say which."""

        def op(session: Session) -> dict[str, Any]:
            state = self._locked(session, pool)
            f, d = _check_device(state, device)
            failure = session.scalars(
                select(FailureRow).where(
                    FailureRow.pool_id == state.row.id,
                    FailureRow.fabric_index == f,
                    FailureRow.device == d,
                    FailureRow.repaired_at.is_(None),
                )
            ).first()
            if failure is None:
                raise UserError(f"device {f}:{d} of pool {pool!r} is not failed; nothing to repair")
            failure.repaired_at = utcnow()
            state.pool.repair(f, d, free=True)
            _event(session, state.row.id, "repair", None, None, device=f"{f}:{d}")
            healed = self._heal(session, state)
            return {"device": f"{f}:{d}", "healed_slices": healed}

        return self._transact(op)

    # --- views -------------------------------------------------------------------------------------------

    def show(self, pool: str, tenant: str | None = None) -> PoolView:
        """Return the pool as `tenant` sees it (its own slices), or everything when tenant is None."""
        if tenant is not None:
            check_name(tenant, "tenant")

        def op(session: Session) -> PoolView:
            row = _pool_row(session, pool, lock=False)
            state = self._load(session, row)
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
                slices=[self._info(state, s) for s in sorted(visible, key=lambda s: s.id)],
                failures=failures,
                tenants=tenants,
                owners=owners,
                tenant=tenant,
            )

        return self._transact(op, write=False)

    def events(self, pool: str, tenant: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Return the pool's latest events, oldest first (a tenant's view: only events about its own slices)."""

        def op(session: Session) -> list[dict[str, Any]]:
            row = _pool_row(session, pool, lock=False)
            query = select(EventRow).where(EventRow.pool_id == row.id)
            if tenant is not None:
                query = query.where(EventRow.tenant == tenant)
            rows = session.scalars(query.order_by(EventRow.id.desc()).limit(limit)).all()
            return [
                {
                    "id": e.id,
                    "at": iso(e.at),
                    "kind": e.kind,
                    "tenant": e.tenant,
                    "slice": e.slice_id,
                    "detail": e.detail,
                }
                for e in reversed(rows)
            ]

        return self._transact(op, write=False)

    # --- internals ---------------------------------------------------------------------------------------

    def _transact(self, op: Callable[[Session], T], *, write: bool = True) -> T:
        """Return `op(session)` run in one committed transaction (`matrix.store.transact`: retried on contention)."""
        return transact(self._write if write else self._read, op)

    def _spec(self, row: PoolFabricRow) -> FabricSpec:
        spec = self._specs.get(row.spec_json)
        if spec is None:
            spec = self._specs[row.spec_json] = FabricSpec.model_validate_json(row.spec_json)
        return spec

    def _locked(self, session: Session, pool: str) -> _State:
        """Return the state of a pool after locking its row for the rest of the transaction."""
        return self._load(session, _pool_row(session, pool, lock=True))

    def _locked_slice(self, session: Session, slice_id: int, tenant: str | None) -> tuple[_State, SliceRow]:
        """Return the locked state of a live slice's pool and the slice, if `tenant` (None: anyone) may see it."""
        pool_id = session.scalars(select(SliceRow.pool_id).where(SliceRow.id == slice_id)).first()
        row = None
        if pool_id is not None:
            pool_row = session.scalars(select(PoolRow).where(PoolRow.id == pool_id).with_for_update()).one()
            state = self._load(session, pool_row)
            row = state.slices.get(slice_id)
        if row is None or (tenant is not None and row.tenant.name != tenant):
            whose = f" of tenant {tenant!r}" if tenant is not None else ""
            raise UserError(
                f"no live slice {slice_id}{whose}; list the live slices with `matrix show"
                + (f" --tenant {tenant}`" if tenant is not None else "`")
            )
        return state, row

    def _load(self, session: Session, row: PoolRow) -> _State:
        """Return a pool's live slices, devices, hosts and open failures, replayed into a MatrixPool."""
        specs = [self._spec(f) for f in row.fabrics]
        pool = MatrixPool(specs)
        slices = {
            s.id: s
            for s in session.scalars(
                select(SliceRow).where(SliceRow.pool_id == row.id, SliceRow.state != "freed").order_by(SliceRow.id)
            )
        }
        held: dict[int, list[int]] = {sid: [] for sid in slices}
        host_rows: dict[int, list[SliceHostRow]] = {sid: [] for sid in slices}
        owner: dict[tuple[int, int], int] = {}
        devices = select(SliceDeviceRow.slice_id, SliceDeviceRow.fabric_index, SliceDeviceRow.device).where(
            SliceDeviceRow.pool_id == row.id
        )
        for slice_id, fabric_index, device in session.execute(devices):  # plain rows: a pool holds many
            held[slice_id].append(device)
            owner[(fabric_index, device)] = slice_id
        for h in session.scalars(select(SliceHostRow).where(SliceHostRow.pool_id == row.id)):
            host_rows[h.slice_id].append(h)
        for sid, s in slices.items():
            held[sid].sort()
            hosts = tuple((h.node, h.cpus, h.dram_gib) for h in host_rows[sid])
            pool.take(s.fabric_index, held[sid], hosts)
        for failure in session.scalars(
            select(FailureRow).where(FailureRow.pool_id == row.id, FailureRow.repaired_at.is_(None))
        ):
            pool.fail(failure.fabric_index, failure.device)
        return _State(row, specs, pool, slices, held, host_rows, owner)

    def _add_devices(
        self,
        session: Session,
        state: _State,
        row: SliceRow,
        devices: tuple[int, ...] | list[int],
        hosts: tuple[tuple[int, int, float], ...],
    ) -> None:
        """Give devices and host resources to a slice: in memory and as rows (flushed, so constraints bite now)."""
        f = row.fabric_index
        state.pool.take(f, devices, hosts)
        if devices:
            session.execute(
                insert(SliceDeviceRow),
                [{"slice_id": row.id, "pool_id": state.row.id, "fabric_index": f, "device": d} for d in devices],
            )
        for d in devices:
            state.owner[(f, d)] = row.id
        for node, cpus, dram_gib in hosts:
            host_row = SliceHostRow(
                slice_id=row.id, pool_id=state.row.id, fabric_index=f, node=node, cpus=cpus, dram_gib=dram_gib
            )
            session.add(host_row)
            state.host_rows[row.id].append(host_row)
        state.held[row.id] = sorted(state.held[row.id] + list(devices))
        session.flush()

    def _remove_devices(
        self, session: Session, state: _State, row: SliceRow, devices: list[int], *, with_hosts: bool
    ) -> None:
        """Take devices (and, with_hosts, the host resources on nodes it no longer uses) back from a slice."""
        f = row.fabric_index
        gone = set(devices)
        dpn = state.pool.fabrics[f].topo.devices_per_node
        if gone:
            session.execute(
                delete(SliceDeviceRow)
                .where(SliceDeviceRow.slice_id == row.id, SliceDeviceRow.device.in_(gone))
                .execution_options(synchronize_session=False)
            )
        for d in gone:
            del state.owner[(f, d)]
        state.held[row.id] = [d for d in state.held[row.id] if d not in gone]
        hosts: list[tuple[int, int, float]] = []
        if with_hosts:
            still_used = {d // dpn for d in state.held[row.id]}
            for host_row in [h for h in state.host_rows[row.id] if h.node not in still_used]:
                hosts.append((host_row.node, host_row.cpus, host_row.dram_gib))
                session.delete(host_row)
                state.host_rows[row.id].remove(host_row)
        state.pool.give_back(f, devices, tuple(hosts))
        session.flush()

    def _replace(self, session: Session, state: _State, row: SliceRow, device: int) -> dict[str, Any]:
        """Replace a failed device of a slice from the same domain, or mark the slice degraded; say which.

        A whole-node slice leaves the failed device's node for a whole free node, its host CPUs and DRAM too.
        """
        f = row.fabric_index
        topo = state.pool.fabrics[f].topo
        dpn = topo.devices_per_node
        whole = row.policy == "server" or row.whole_nodes
        held = state.held[row.id]
        lost = [d for d in held if d // dpn == device // dpn] if whole else [device]
        remaining = [d for d in held if d not in lost]
        found = extend(state.pool, row.policy, f, remaining, len(lost), row.ceiling, whole_nodes=row.whole_nodes)
        if found is None:
            self._remove_devices(session, state, row, [device], with_hosts=False)
            tier = topo.tiers[row.ceiling].name
            row.state = "degraded"
            row.reason = (
                f"device {f}:{device} failed and no free {'whole node' if whole else 'device'} is left in its "
                f"{tier} domain; it heals when a device there is repaired or freed"
            )
            _event(session, state.row.id, "degrade", row.tenant.name, row.id, device=f"{f}:{device}", reason=row.reason)
            return {"action": "degraded", "reason": row.reason}
        self._swap(session, state, row, lost, found)
        _event(
            session, state.row.id, "replace", row.tenant.name, row.id, failed=f"{f}:{device}", replacement=list(found)
        )
        return {"action": "replaced", "replacement": [f"{f}:{d}" for d in found]}

    def _heal(self, session: Session, state: _State) -> list[int]:
        """Give degraded slices the devices they lack where their domain now has them; return the healed ids.

        Free devices on a slice's own nodes come first (a repaired device comes home); a whole-node slice that
        cannot be completed there moves its partly held nodes to whole free nodes.
        """
        healed = []
        for row in [s for s in state.slices.values() if s.state == "degraded"]:
            f = row.fabric_index
            fs = state.pool.fabrics[f]
            held = state.held[row.id]
            missing = row.device_count - len(held)
            if missing > 0:
                found = own_free(fs, held, missing)
                if found is not None:
                    self._add_devices(session, state, row, found, ())
                else:
                    whole = row.policy == "server" or row.whole_nodes
                    lost = _partial(held, fs) if whole else []  # others: any free devices of the domain do
                    remaining = [d for d in held if d not in lost]
                    found = extend(
                        state.pool,
                        row.policy,
                        f,
                        remaining,
                        len(lost) + missing,
                        row.ceiling,
                        whole_nodes=row.whole_nodes,
                    )
                    if found is None:
                        continue
                    self._swap(session, state, row, lost, found)
            row.state, row.reason = "active", None
            healed.append(row.id)
            _event(session, state.row.id, "heal", row.tenant.name, row.id, devices=list(state.held[row.id]))
        return healed

    def _swap(self, session: Session, state: _State, row: SliceRow, lost: list[int], found: tuple[int, ...]) -> None:
        """Move a slice off `lost` devices onto `found` ones; host CPUs and DRAM on left nodes follow, node by node."""
        f = row.fabric_index
        dpn = state.pool.fabrics[f].topo.devices_per_node
        left_nodes = sorted({d // dpn for d in lost} - {d // dpn for d in state.held[row.id] if d not in lost})
        new_nodes = sorted({d // dpn for d in found} - {d // dpn for d in state.held[row.id]})
        self._remove_devices(session, state, row, lost, with_hosts=False)
        self._add_devices(session, state, row, found, ())
        destination = dict(zip(left_nodes, new_nodes, strict=False))
        moved = [h for h in state.host_rows[row.id] if h.node in destination]
        if moved:
            state.pool.give_back(f, (), tuple((h.node, h.cpus, h.dram_gib) for h in moved))
            state.pool.take(f, (), tuple((destination[h.node], h.cpus, h.dram_gib) for h in moved))
            for h in moved:
                h.node = destination[h.node]
            session.flush()

    def _info(self, state: _State, row: SliceRow) -> SliceInfo:
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

    def _summary(self, session: Session, row: PoolRow) -> dict[str, Any]:
        """Return a pool's one-line summary."""
        specs = [self._spec(f) for f in row.fabrics]
        allocated = session.scalar(select(func.count()).where(SliceDeviceRow.pool_id == row.id)) or 0
        failed = session.scalar(
            select(func.count()).where(FailureRow.pool_id == row.id, FailureRow.repaired_at.is_(None))
        )
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


def _partial(held: list[int], fs) -> list[int]:
    """Return the devices a whole-node slice holds on nodes it does not hold whole."""
    dpn = fs.topo.devices_per_node
    per_node: dict[int, int] = {}
    for d in held:
        per_node[d // dpn] = per_node.get(d // dpn, 0) + 1
    return [d for d in held if per_node[d // dpn] < dpn]


def _pool_row(session: Session, name: str, *, lock: bool) -> PoolRow:
    """Return the pool row by name (locked FOR UPDATE when `lock`), or raise a UserError saying how to make it."""
    query = select(PoolRow).where(PoolRow.name == name)
    row = session.scalars(query.with_for_update() if lock else query).first()
    if row is None:
        raise UserError(
            f"no pool named {name!r}; create it with `matrixstack matrix create --pool {name} --fabric "
            "cloudmatrix384`, or see the pools with `matrixstack matrix list`"
        )
    return row


def _tenant_id(session: Session, name: str) -> int:
    """Return the id of a tenant, creating it on first use."""
    tenant_id = session.scalars(select(TenantRow.id).where(TenantRow.name == name)).first()
    if tenant_id is None:
        row = TenantRow(name=name)
        session.add(row)
        session.flush()
        tenant_id = row.id
    return tenant_id


def _event(session: Session, pool_id: int, kind: str, tenant: str | None, slice_id: int | None, **detail: Any) -> None:
    """Add one row to the event log (committed with the mutation it describes)."""
    session.add(EventRow(pool_id=pool_id, kind=kind, tenant=tenant, slice_id=slice_id, detail=detail))


def _check_device(state: _State, device: tuple[int, int]) -> tuple[int, int]:
    """Return (fabric, device) when the pool has it, else raise a UserError giving the valid range."""
    f, d = device
    if not 0 <= f < len(state.pool.fabrics):
        raise UserError(f"pool {state.row.name!r} has fabrics 0..{len(state.pool.fabrics) - 1}; got fabric {f}")
    count = state.pool.fabrics[f].topo.device_count
    if not 0 <= d < count:
        raise UserError(f"fabric {f} of pool {state.row.name!r} has devices 0..{count - 1}; got device {d}")
    return f, d


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
