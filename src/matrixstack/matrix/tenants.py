"""Tenants: the one owner of the `tenants` table, and the name rule tenants and pools share.

A tenant is created on first use: by name, when a slice is allocated for it, a key is made for it or a catalog
entry is made private to it (`tenant_id`), or explicitly (`create_tenant`). Nothing else writes the table. The
functions take the caller's session and never commit (`matrix.database`).
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.store import TenantRow

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def check_name(name: str, what: str) -> str:
    """Return `name` when it is a valid pool or tenant name, else raise a UserError saying what is allowed."""
    if not NAME_PATTERN.match(name or ""):
        raise UserError(
            f"{what} name {name!r} is not allowed: use 1-64 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def tenant_id(session: Session, name: str) -> int:
    """Return the id of a tenant, creating it on first use."""
    found = session.scalars(select(TenantRow.id).where(TenantRow.name == name)).first()
    if found is None:
        row = TenantRow(name=name)
        session.add(row)
        session.flush()
        found = row.id
    return found


def create_tenant(session: Session, name: str) -> str:
    """Create a tenant (nothing happens when it exists) and return its name; UserError for a bad name."""
    tenant_id(session, check_name(name, "tenant"))
    return name
