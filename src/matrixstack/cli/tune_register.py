"""`tune --register L1NAME`: the L1 catalog entry of a tune job's adapter, under the L0 entry that serves its base.

The catalog is the portal's floor, so the CLI (which may import everything) does it, not `adapt`. The L0 serving a
base arch is the one L0 entry whose backend is the builtin engine and that names the base: its deployment runs
that arch, its backend model is the base, or the entry itself is named after it; its backend must serve adapters
by name (`adapters: true`: the portal then sends the L1's adapter as the model). `check_registration` runs before
the job starts (the L1 name is free, exactly one L0 serves the base), so a job does not train for an entry that
cannot be made; `register_l1` writes the entry (adapter = the adapter name, parent = that L0, private to the job's
tenant when it has one) once the job succeeded.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.portal.catalog_service import add_entry, list_entries
from matrixstack.portal.deployment_service import list_deployments
from matrixstack.portal.spec import EntrySpec


def l0_serving(session: Session, base: str) -> EntrySpec:
    """Return the L0 entry whose builtin-engine backend serves arch `base`; UserError when none or several do."""
    archs = {d["name"]: d["arch"] for d in list_deployments(session)}
    found = [
        e
        for e in list_entries(session, admin=True)
        if e.level == "L0"
        and e.backend is not None
        and e.backend.kind == "engine"
        and base in (archs.get(e.backend.deployment), e.backend.model, e.name)
    ]
    if not found:
        raise UserError(
            f"--register: no L0 catalog entry serves {base} on the builtin engine; add one (catalog add, or a shape "
            "with a deployment of that arch) and tune again"
        )
    if len(found) > 1:
        names = ", ".join(e.name for e in found)
        raise UserError(f"--register: several L0 entries serve {base} ({names}); register by hand with catalog add")
    if not found[0].backend.adapters:
        raise UserError(
            f"--register: L0 {found[0].name} serves {base} but its backend does not serve adapters by name "
            f"(adapters: false), so the L1 would answer as the base; set its backend's adapters: true "
            "(catalog update) and tune again"
        )
    return found[0]


def check_registration(session: Session, l1_name: str, base: str) -> EntrySpec:
    """Return the L0 an L1 `l1_name` would go under; UserError when the name is taken or no single L0 serves
    `base`."""
    if any(e.name == l1_name for e in list_entries(session, admin=True)):
        raise UserError(f"--register {l1_name}: a catalog entry of that name exists; pick another name")
    return l0_serving(session, base)


def register_l1(
    session: Session, l1_name: str, base: str, adapter: str, tenant: str | None, description: str
) -> EntrySpec:
    """Add the L1 entry `l1_name` with `adapter` under the L0 serving `base` (private to `tenant` when given);
    return it as stored."""
    parent = check_registration(session, l1_name, base)
    spec = EntrySpec(
        name=l1_name, level="L1", parent=parent.name, owner=tenant, adapter=adapter, description=description
    )
    return add_entry(session, spec)
