"""The catalog: add, replace, change, remove and read entries, and resolve one for a tenant.

Rules between entries are checked here, inside the transaction that writes: the parent exists and has the right
level (L1 under an L0, L2 under an L1 or an L0), a child of a private entry is private to the same tenant, and
the merged ranges and defaults of every chain through the entry still hold. Levels only grow down a chain, so
the rules leave no room for a cycle. An entry with children cannot be removed.

Visibility: an entry with an owner is private to that tenant (created on first use by the matrix layer's
`tenants`); to anyone else it does not exist (UnknownEntry, the same error as a name never added). `admin=True`
sees everything. A backend's api_key is stored in the entry spec sealed with the data key, or as an `env:NAME`
reference (`portal.upstream_secrets`), never in clear, and shown by `EntrySpec.view()` only as "set".
The functions take the caller's session and never commit (`matrix.database`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.tenants import check_name, tenant_id
from matrixstack.portal.deployment_service import routed
from matrixstack.portal.resolve import Resolved, resolve
from matrixstack.portal.spec import PARENT_LEVELS, EntrySpec, UnknownEntry
from matrixstack.portal.store import CatalogEntryRow
from matrixstack.portal.upstream_secrets import sealed_backend
from matrixstack.specio import validate_spec

MAX_CHAIN = 3  # L0 -> L1 -> L2


def add_entry(session: Session, spec: EntrySpec, replace: bool = False) -> EntrySpec:
    """Add a catalog entry (or replace one of that name with `replace=True`) and return it as stored.

    Raises UserError when the name exists (without replace) or a rule between entries breaks (see the module
    docstring). A backend's api_key is stored sealed (`upstream_secrets.stored_form`); one given as "set" (as shown
    by view()) keeps the stored key.
    """
    row = session.scalars(select(CatalogEntryRow).where(CatalogEntryRow.name == spec.name)).first()
    if row is not None and not replace:
        raise UserError(f"entry {spec.name!r} exists already; replace it (catalog add --replace) or pick a new name")
    if spec.backend is not None:
        stored = (row.spec.get("backend") or {}).get("api_key") if row is not None else None
        spec = spec.model_copy(update={"backend": sealed_backend(spec.backend, stored)})
    parent_id = None
    if spec.parent is not None:
        parent = session.scalars(select(CatalogEntryRow).where(CatalogEntryRow.name == spec.parent)).first()
        if parent is None:
            raise UserError(
                f"parent: entry {spec.name!r} names parent {spec.parent!r}, which is not in the catalog; add the "
                "parent first, or put it in the same file"
            )
        parent_id = parent.id
    if row is None:
        row = CatalogEntryRow(name=spec.name)
        session.add(row)
    row.level, row.parent_id, row.spec = spec.level, parent_id, spec.model_dump(mode="json")
    row.owner_tenant_id = None if spec.owner is None else tenant_id(session, check_name(spec.owner, "owner tenant"))
    session.flush()
    _check_subtree(session, row)
    return spec


def add_entries(session: Session, specs: list[EntrySpec], replace: bool = False) -> list[EntrySpec]:
    """Add several entries (parents before children; all or none with the unit of work) and return them as
    stored."""
    return [add_entry(session, spec, replace) for spec in sorted(specs, key=lambda spec: spec.level)]


def update_entry(session: Session, name: str, changes: dict[str, Any]) -> EntrySpec:
    """Change fields of an entry (a `backend` mapping is merged into the stored backend) and return it."""
    if "name" in changes and changes["name"] != name:
        raise UserError(f"name: an entry cannot be renamed; add {changes['name']!r} as a new entry instead")
    current = _entry_row(session, name).spec
    merged = {**current, **changes}
    if isinstance(current.get("backend"), dict) and isinstance(changes.get("backend"), dict):
        merged["backend"] = {**current["backend"], **changes["backend"]}
    return add_entry(session, validate_spec(EntrySpec, merged, f"changes to entry {name!r}"), True)


def remove_entry(session: Session, name: str) -> EntrySpec:
    """Remove an entry and return it; raises UserError naming its children when it has any."""
    row = _entry_row(session, name)
    children = session.scalars(
        select(CatalogEntryRow.name).where(CatalogEntryRow.parent_id == row.id).order_by(CatalogEntryRow.name)
    ).all()
    if children:
        raise UserError(
            f"entry {name!r} has children {', '.join(children)}; remove them first (or replace them "
            "with entries under another parent)"
        )
    session.delete(row)
    return EntrySpec.model_validate(row.spec)


def get_entry(session: Session, name: str) -> EntrySpec:
    """Return an entry as stored (a backend key sealed or an `env:` reference); UnknownEntry when there is none."""
    return EntrySpec.model_validate(_entry_row(session, name).spec)


def list_entries(session: Session, tenant: str | None = None, admin: bool = False) -> list[EntrySpec]:
    """Return the entries `tenant` may see, by name: public ones and its own private ones (all with admin)."""
    query = select(CatalogEntryRow.spec).order_by(CatalogEntryRow.name)
    rows = [EntrySpec.model_validate(spec) for spec in session.scalars(query)]
    return [e for e in rows if admin or e.owner is None or e.owner == tenant]


def entry_chain(session: Session, name: str) -> list[EntrySpec]:
    """Return an entry's lineage root first ([L0, ..., the entry]); UnknownEntry when there is none."""
    return _chain(session, _entry_row(session, name))


def resolve_entry(session: Session, name: str, tenant: str | None, admin: bool = False) -> Resolved:
    """Return the merged settings of entry `name` for `tenant`; UnknownEntry when it may not see it.

    When the L0's backend names a registered deployment, the request goes to that deployment's current URL,
    and DeploymentNotRunning is raised while its status is not `running`.
    """
    chain = entry_chain(session, name)
    owner = chain[-1].owner
    if not admin and owner is not None and owner != tenant:
        raise _unknown(name)
    return routed(session, resolve(chain))


def catalog_tree(session: Session) -> list[dict[str, Any]]:
    """Return the catalog as nested dicts, roots (L0) first by name: name, level, provider, backend_kind,
    owner, children (an entry's backend_kind is its L0's)."""
    children: dict[str | None, list[EntrySpec]] = {}
    for spec in list_entries(session, admin=True):
        children.setdefault(spec.parent, []).append(spec)

    def node(spec: EntrySpec, backend_kind: str) -> dict[str, Any]:
        return {
            "name": spec.name,
            "level": spec.level,
            "provider": spec.provider,
            "backend_kind": backend_kind,
            "owner": spec.owner,
            "children": [node(c, backend_kind) for c in children.get(spec.name, [])],
        }

    return [node(root, root.backend.kind) for root in children.get(None, []) if root.backend is not None]


def _unknown(name: str) -> UnknownEntry:
    """Return the error for an entry that does not exist or may not be seen (the same message for both)."""
    return UnknownEntry(f"unknown model {name!r}: no catalog entry of that name (see GET /v1/models)")


def _entry_row(session: Session, name: str) -> CatalogEntryRow:
    """Return the row of entry `name`; UnknownEntry when there is none."""
    row = session.scalars(select(CatalogEntryRow).where(CatalogEntryRow.name == name)).first()
    if row is None:
        raise _unknown(name)
    return row


def _chain(session: Session, row: CatalogEntryRow) -> list[EntrySpec]:
    """Return the lineage of a row, root first."""
    chain = [row]
    while chain[0].parent_id is not None and len(chain) < MAX_CHAIN:
        chain.insert(0, session.get(CatalogEntryRow, chain[0].parent_id))
    return [EntrySpec.model_validate(r.spec) for r in chain]


def _check_subtree(session: Session, row: CatalogEntryRow) -> None:
    """Raise UserError unless `row` and every entry below it keep the rules between an entry and its parent."""
    spec = EntrySpec.model_validate(row.spec)
    if row.parent_id is not None:
        parent = EntrySpec.model_validate(session.get(CatalogEntryRow, row.parent_id).spec)
        allowed = PARENT_LEVELS[spec.level]
        if parent.level not in allowed:
            raise UserError(
                f"parent: {spec.name!r} is an {spec.level} entry, so its parent must be an {' or an '.join(allowed)} "
                f"entry, but {parent.name!r} is {parent.level}"
            )
        if parent.owner is not None and spec.owner != parent.owner:
            raise UserError(
                f"owner: parent {parent.name!r} is private to tenant {parent.owner!r}, so {spec.name!r} must be "
                f"too; set owner: {parent.owner}"
            )
    resolve(_chain(session, row))
    for child in session.scalars(select(CatalogEntryRow).where(CatalogEntryRow.parent_id == row.id)):
        _check_subtree(session, child)
