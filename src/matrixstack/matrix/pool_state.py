"""A pool's state inside a transaction: read it (locking the pool row for a mutation), and change its devices.

`locked_state` and `locked_slice` lock the pool row (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite a write
unit of work holds the database's write lock from its `BEGIN IMMEDIATE`) and replay the pool's live slices, hosts
and open failures into a `MatrixPool`, so the policies decide on what is committed and nobody changes it before
this transaction commits. `add_devices`, `remove_devices` and `swap` change a slice's devices in memory and as
rows together, flushed at once so UNIQUE(pool, fabric, device) bites inside the transaction. The functions take
the caller's session and never commit (`matrix.database`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.allocator import MatrixPool
from matrixstack.matrix.store import FailureRow, PoolFabricRow, PoolRow, SliceDeviceRow, SliceHostRow, SliceRow

SPEC_CACHE_SIZE = 64  # parsed fabric specs kept, by their stored JSON


@dataclass
class PoolState:
    """A pool's state as read inside a transaction."""

    row: PoolRow
    specs: list[FabricSpec]
    pool: MatrixPool
    slices: dict[int, SliceRow]
    held: dict[int, list[int]]
    host_rows: dict[int, list[SliceHostRow]]
    owner: dict[tuple[int, int], int]


@lru_cache(maxsize=SPEC_CACHE_SIZE)
def _parsed_spec(spec_json: str) -> FabricSpec:
    return FabricSpec.model_validate_json(spec_json)


def fabric_spec(row: PoolFabricRow) -> FabricSpec:
    """Return the fabric spec a pool row stores (parsed once per process and spec)."""
    return _parsed_spec(row.spec_json)


def pool_row(session: Session, name: str, *, lock: bool) -> PoolRow:
    """Return the pool row by name (locked FOR UPDATE when `lock`), or raise a UserError saying how to make it."""
    query = select(PoolRow).where(PoolRow.name == name)
    row = session.scalars(query.with_for_update() if lock else query).first()
    if row is None:
        raise UserError(
            f"no pool named {name!r}; create it with `matrixstack matrix create --pool {name} --fabric "
            "cloudmatrix384`, or see the pools with `matrixstack matrix list`"
        )
    return row


def locked_state(session: Session, pool: str) -> PoolState:
    """Return the state of a pool after locking its row for the rest of the transaction."""
    return load_state(session, pool_row(session, pool, lock=True))


def locked_slice(session: Session, slice_id: int, tenant: str | None) -> tuple[PoolState, SliceRow]:
    """Return the locked state of a live slice's pool and the slice, if `tenant` (None: anyone) may see it."""
    pool_id = session.scalars(select(SliceRow.pool_id).where(SliceRow.id == slice_id)).first()
    row = None
    if pool_id is not None:
        locked = session.scalars(select(PoolRow).where(PoolRow.id == pool_id).with_for_update()).one()
        state = load_state(session, locked)
        row = state.slices.get(slice_id)
    if row is None or (tenant is not None and row.tenant.name != tenant):
        whose = f" of tenant {tenant!r}" if tenant is not None else ""
        raise UserError(
            f"no live slice {slice_id}{whose}; list the live slices with `matrix show"
            + (f" --tenant {tenant}`" if tenant is not None else "`")
        )
    return state, row


def load_state(session: Session, row: PoolRow) -> PoolState:
    """Return a pool's live slices, devices, hosts and open failures, replayed into a MatrixPool."""
    specs = [fabric_spec(f) for f in row.fabrics]
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
    return PoolState(row, specs, pool, slices, held, host_rows, owner)


def add_devices(
    session: Session,
    state: PoolState,
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


def remove_devices(session: Session, state: PoolState, row: SliceRow, devices: list[int], *, with_hosts: bool) -> None:
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


def swap(session: Session, state: PoolState, row: SliceRow, lost: list[int], found: tuple[int, ...]) -> None:
    """Move a slice off `lost` devices onto `found` ones; host CPUs and DRAM on left nodes follow, node by node."""
    f = row.fabric_index
    dpn = state.pool.fabrics[f].topo.devices_per_node
    left_nodes = sorted({d // dpn for d in lost} - {d // dpn for d in state.held[row.id] if d not in lost})
    new_nodes = sorted({d // dpn for d in found} - {d // dpn for d in state.held[row.id]})
    remove_devices(session, state, row, lost, with_hosts=False)
    add_devices(session, state, row, found, ())
    destination = dict(zip(left_nodes, new_nodes, strict=False))
    moved = [h for h in state.host_rows[row.id] if h.node in destination]
    if moved:
        state.pool.give_back(f, (), tuple((h.node, h.cpus, h.dram_gib) for h in moved))
        state.pool.take(f, (), tuple((destination[h.node], h.cpus, h.dram_gib) for h in moved))
        for h in moved:
            h.node = destination[h.node]
        session.flush()
