"""Device failures and repair: a failed device's slice is given a replacement or marked degraded, and degraded
slices heal when a repair (or a free, `matrix.slices`) leaves their domain the devices they lack.

Devices are named `F:D` (fabric index in the pool, global device id in that fabric) or just `D` in a pool of one
fabric. The functions take the caller's session and never commit (`matrix.database`); the mutations run on the
locked pool state (`matrix.pool_state`) and log an event each.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.events import record_event
from matrixstack.matrix.policies import extend, own_free
from matrixstack.matrix.pool_state import PoolState, add_devices, locked_state, remove_devices, swap
from matrixstack.matrix.store import FailureRow, SliceRow, utcnow


def parse_device(text: str) -> tuple[int, int]:
    """Return (fabric index, device id) from `F:D` or `D`; raises a UserError on anything else."""
    match = re.fullmatch(r"\s*(?:(\d+):)?(\d+)\s*", text)
    if not match:
        raise UserError(f"device {text!r} is not F:D or D (fabric index in the pool, device id), e.g. 17 or 0:17")
    return int(match.group(1) or 0), int(match.group(2))


def fail_device(session: Session, pool: str, device: tuple[int, int], reason: str = "failed") -> dict[str, Any]:
    """Mark a device failed and return what happened to its slice: none, replaced or degraded."""
    state = locked_state(session, pool)
    f, d = _check_device(state, device)
    if state.pool.is_failed(f, d):
        raise UserError(f"device {f}:{d} of pool {pool!r} is failed already; `matrix repair --device {f}:{d}`")
    session.add(FailureRow(pool_id=state.row.id, fabric_index=f, device=d, reason=reason))
    owner = state.owner.get((f, d))
    state.pool.fail(f, d)
    result: dict[str, Any] = {"device": f"{f}:{d}", "reason": reason, "slice": owner, "action": "none"}
    tenant = state.slices[owner].tenant.name if owner is not None else None
    record_event(session, state.row.id, "fail", tenant, owner, device=f"{f}:{d}", reason=reason)
    if owner is not None:
        result.update(_replace(session, state, state.slices[owner], d))
    return result


def repair_device(session: Session, pool: str, device: tuple[int, int]) -> dict[str, Any]:
    """Return a failed device to service, heal degraded slices where now possible, and say which."""
    state = locked_state(session, pool)
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
    record_event(session, state.row.id, "repair", None, None, device=f"{f}:{d}")
    healed = heal(session, state)
    return {"device": f"{f}:{d}", "healed_slices": healed}


def heal(session: Session, state: PoolState) -> list[int]:
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
                add_devices(session, state, row, found, ())
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
                swap(session, state, row, lost, found)
        row.state, row.reason = "active", None
        healed.append(row.id)
        record_event(session, state.row.id, "heal", row.tenant.name, row.id, devices=list(state.held[row.id]))
    return healed


def _replace(session: Session, state: PoolState, row: SliceRow, device: int) -> dict[str, Any]:
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
        remove_devices(session, state, row, [device], with_hosts=False)
        tier = topo.tiers[row.ceiling].name
        row.state = "degraded"
        row.reason = (
            f"device {f}:{device} failed and no free {'whole node' if whole else 'device'} is left in its "
            f"{tier} domain; it heals when a device there is repaired or freed"
        )
        record_event(
            session, state.row.id, "degrade", row.tenant.name, row.id, device=f"{f}:{device}", reason=row.reason
        )
        return {"action": "degraded", "reason": row.reason}
    swap(session, state, row, lost, found)
    record_event(
        session, state.row.id, "replace", row.tenant.name, row.id, failed=f"{f}:{device}", replacement=list(found)
    )
    return {"action": "replaced", "replacement": [f"{f}:{d}" for d in found]}


def _partial(held: list[int], fs) -> list[int]:
    """Return the devices a whole-node slice holds on nodes it does not hold whole."""
    dpn = fs.topo.devices_per_node
    per_node: dict[int, int] = {}
    for d in held:
        per_node[d // dpn] = per_node.get(d // dpn, 0) + 1
    return [d for d in held if per_node[d // dpn] < dpn]


def _check_device(state: PoolState, device: tuple[int, int]) -> tuple[int, int]:
    """Return (fabric, device) when the pool has it, else raise a UserError giving the valid range."""
    f, d = device
    if not 0 <= f < len(state.pool.fabrics):
        raise UserError(f"pool {state.row.name!r} has fabrics 0..{len(state.pool.fabrics) - 1}; got fabric {f}")
    count = state.pool.fabrics[f].topo.device_count
    if not 0 <= d < count:
        raise UserError(f"fabric {f} of pool {state.row.name!r} has devices 0..{count - 1}; got device {d}")
    return f, d
