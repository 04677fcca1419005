"""The pool event log: one row per mutation, written in the transaction of the mutation it describes.

The functions take the caller's session and never commit (`matrix.database`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from matrixstack.matrix.pool_state import pool_row
from matrixstack.matrix.store import EventRow, iso


def record_event(
    session: Session, pool_id: int, kind: str, tenant: str | None, slice_id: int | None, **detail: Any
) -> None:
    """Add one row to the event log (committed with the mutation it describes)."""
    session.add(EventRow(pool_id=pool_id, kind=kind, tenant=tenant, slice_id=slice_id, detail=detail))


def list_events(session: Session, pool: str, tenant: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Return the pool's latest events, oldest first (a tenant's view: only events about its own slices)."""
    row = pool_row(session, pool, lock=False)
    query = select(EventRow).where(EventRow.pool_id == row.id)
    if tenant is not None:
        query = query.where(EventRow.tenant == tenant)
    rows = session.scalars(query.order_by(EventRow.id.desc()).limit(limit)).all()
    return [
        {"id": e.id, "at": iso(e.at), "kind": e.kind, "tenant": e.tenant, "slice": e.slice_id, "detail": e.detail}
        for e in reversed(rows)
    ]
