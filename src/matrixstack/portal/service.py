"""Operations on the portal's state: tenants, API keys, the catalog, deployments, usage. One transaction each.

Tenants are the matrix layer's tenants; a tenant named for the first time (a key, a private entry) is created.
Catalog rules between entries are checked here, inside the transaction that writes: the parent exists and has
the right level (L1 under an L0, L2 under an L1 or an L0), a child of a private entry is private to the same
tenant, and the merged ranges and defaults of every chain through the entry still hold. Levels only grow
down a chain, so the rules leave no room for a cycle. An entry with children cannot be removed.

Visibility: an entry with an owner is private to that tenant; to anyone else it does not exist (UnknownEntry,
the same error as a name never added). `admin=True` sees everything.

Secrets: API keys are stored as sha256 hashes (the plaintext is returned once, by create_key); a backend's
api_key is stored in the entry spec and shown by `EntrySpec.view()` only as "set".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import EllipsisType
from typing import Any, TypeVar
from urllib.parse import urlparse

from pydantic import ValidationError
from sqlalchemy import case, func, insert, select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.service import _tenant_id, check_name
from matrixstack.matrix.store import WRITE_OPTION, PoolRow, SliceRow, TenantRow, iso, transact, utcnow
from matrixstack.portal.keys import hash_key, key_prefix, new_key
from matrixstack.portal.resolve import DeploymentNotRunning, Resolved, resolve
from matrixstack.portal.spec import PARENT_LEVELS, EntrySpec, KeyLimits, UnknownEntry
from matrixstack.portal.store import ApiKeyRow, CatalogEntryRow, DeploymentRow, UsageRow, open_portal_engine
from matrixstack.specio import format_validation_error, validate_spec

__all__ = ["KeyInfo", "PortalService", "UnknownEntry", "UsageRecord"]

T = TypeVar("T")
GROUPINGS = ("tenant", "key", "entry")
DEPLOYMENT_KINDS = ("engine", "vllm")
MAX_CHAIN = 3  # L0 -> L1 -> L2


@dataclass(frozen=True)
class KeyInfo:
    """An API key as callers see it: never the key itself, only its prefix."""

    id: int
    tenant: str
    name: str
    prefix: str
    is_admin: bool
    rpm_limit: int | None
    tpm_limit: int | None
    token_quota: int | None
    revoked: bool
    tenant_id: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the key as a JSON-ready dict."""
        return asdict(self)


@dataclass
class UsageRecord:
    """One request's usage, as the portal writes it (created_at in UTC)."""

    tenant_id: int | None
    key_id: int | None
    entry: str
    prompt_tokens: int
    completion_tokens: int
    status_code: int
    latency_ms: float
    ttft_ms: float | None = None
    created_at: datetime = field(default_factory=utcnow)


class PortalService:
    """Tenants, API keys, catalog entries, deployments and usage in a database (the matrix layer's by default)."""

    def __init__(self, url: str | None = None):
        self.engine = open_portal_engine(url)
        self._write = self.engine.execution_options(**{WRITE_OPTION: True})
        self._read = self.engine.execution_options(**{WRITE_OPTION: False})

    def close(self) -> None:
        """Close the database connections."""
        self.engine.dispose()

    def __enter__(self) -> PortalService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tenants -----------------------------------------------------------------------------------------

    def create_tenant(self, name: str) -> str:
        """Create a tenant (nothing happens when it exists) and return its name."""
        check_name(name, "tenant")
        self._transact(lambda session: _tenant_id(session, name))
        return name

    def list_tenants(self) -> list[dict[str, Any]]:
        """Return every tenant: id, name, created_at, and its number of valid (unrevoked) keys."""

        def op(session: Session) -> list[dict[str, Any]]:
            valid = func.count(ApiKeyRow.id).filter(ApiKeyRow.revoked_at.is_(None))
            rows = session.execute(
                select(TenantRow, valid)
                .outerjoin(ApiKeyRow, ApiKeyRow.tenant_id == TenantRow.id)
                .group_by(TenantRow.id)
                .order_by(TenantRow.name)
            )
            return [{"id": t.id, "name": t.name, "created_at": iso(t.created_at), "keys": n} for t, n in rows]

        return self._transact(op, write=False)

    # --- API keys ----------------------------------------------------------------------------------------

    def create_key(
        self,
        tenant: str,
        name: str = "default",
        admin: bool = False,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        token_quota: int | None = None,
    ) -> tuple[KeyInfo, str]:
        """Create an API key for `tenant` (created if new) and return (its info, the plaintext key).

        The plaintext ("sk-...") is returned only here; the database keeps its sha256 hash.
        """
        check_name(tenant, "tenant")
        if not 1 <= len(name) <= 64:
            raise UserError(f"key name {name!r} is not allowed: use 1-64 characters")
        limits = _limits(rpm_limit=rpm_limit, tpm_limit=tpm_limit, token_quota=token_quota)
        plaintext = new_key()

        def op(session: Session) -> KeyInfo:
            row = ApiKeyRow(
                tenant_id=_tenant_id(session, tenant),
                name=name,
                prefix=key_prefix(plaintext),
                key_hash=hash_key(plaintext),
                is_admin=admin,
                **limits.model_dump(),
            )
            session.add(row)
            session.flush()
            return _key_info(row, tenant)

        return self._transact(op), plaintext

    def authenticate(self, plaintext: str) -> KeyInfo | None:
        """Return the key's info when `plaintext` is a valid key, None when it is unknown or revoked."""
        if not isinstance(plaintext, str) or not plaintext:
            return None
        digest = hash_key(plaintext)

        def op(session: Session) -> KeyInfo | None:
            found = session.execute(
                select(ApiKeyRow, TenantRow.name)
                .join(TenantRow, TenantRow.id == ApiKeyRow.tenant_id)
                .where(ApiKeyRow.key_hash == digest, ApiKeyRow.revoked_at.is_(None))
            ).first()
            return None if found is None else _key_info(*found)

        return self._transact(op, write=False)

    def revoke_key(self, prefix_or_id: str | int) -> KeyInfo:
        """Revoke a key (by its prefix, the full key, or its id) and return it; revoking twice changes nothing."""

        def op(session: Session) -> KeyInfo:
            row, tenant = _find_key(session, prefix_or_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _key_info(row, tenant)

        return self._transact(op)

    def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        """Return the keys of `tenant` (every key when None), oldest first, revoked ones included."""

        def op(session: Session) -> list[KeyInfo]:
            query = select(ApiKeyRow, TenantRow.name).join(TenantRow, TenantRow.id == ApiKeyRow.tenant_id)
            if tenant is not None:
                query = query.where(TenantRow.name == tenant)
            return [_key_info(row, name) for row, name in session.execute(query.order_by(ApiKeyRow.id))]

        return self._transact(op, write=False)

    def set_key_limits(
        self,
        prefix_or_id: str | int,
        rpm: int | None | EllipsisType = ...,
        tpm: int | None | EllipsisType = ...,
        quota: int | None | EllipsisType = ...,
    ) -> KeyInfo:
        """Set a key's limits and return it: a number sets a limit, None removes it, `...` (default) keeps it."""
        given = {k: v for k, v in (("rpm_limit", rpm), ("tpm_limit", tpm), ("token_quota", quota)) if v is not ...}
        limits = _limits(**given)

        def op(session: Session) -> KeyInfo:
            row, tenant = _find_key(session, prefix_or_id)
            for column in given:
                setattr(row, column, getattr(limits, column))
            return _key_info(row, tenant)

        return self._transact(op)

    # --- catalog -----------------------------------------------------------------------------------------

    def add_entry(self, spec: EntrySpec, replace: bool = False) -> EntrySpec:
        """Add a catalog entry (or replace one of that name with `replace=True`) and return it as stored.

        Raises UserError when the name exists (without replace) or a rule between entries breaks (see the
        module docstring). A replaced backend whose api_key is "set" (as shown by view()) keeps the stored key.
        """
        return self._transact(lambda session: _put_entry(session, spec, replace))

    def add_entries(self, specs: list[EntrySpec], replace: bool = False) -> list[EntrySpec]:
        """Add several entries in one transaction (all or none; parents before children) and return them as stored."""
        ordered = sorted(specs, key=lambda spec: spec.level)
        return self._transact(lambda session: [_put_entry(session, spec, replace) for spec in ordered])

    def update_entry(self, name: str, changes: dict[str, Any]) -> EntrySpec:
        """Change fields of an entry (a `backend` mapping is merged into the stored backend) and return it."""
        if "name" in changes and changes["name"] != name:
            raise UserError(f"name: an entry cannot be renamed; add {changes['name']!r} as a new entry instead")

        def op(session: Session) -> EntrySpec:
            current = _entry_row(session, name).spec
            merged = {**current, **changes}
            if isinstance(current.get("backend"), dict) and isinstance(changes.get("backend"), dict):
                merged["backend"] = {**current["backend"], **changes["backend"]}
            return _put_entry(session, validate_spec(EntrySpec, merged, f"changes to entry {name!r}"), True)

        return self._transact(op)

    def remove_entry(self, name: str) -> EntrySpec:
        """Remove an entry and return it; raises UserError naming its children when it has any."""

        def op(session: Session) -> EntrySpec:
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

        return self._transact(op)

    def get_entry(self, name: str) -> EntrySpec:
        """Return an entry (the operator's view, secret included); UnknownEntry when there is none of that name."""
        return self._transact(lambda session: EntrySpec.model_validate(_entry_row(session, name).spec), write=False)

    def list_entries(self, tenant: str | None = None, admin: bool = False) -> list[EntrySpec]:
        """Return the entries `tenant` may see, by name: public ones and its own private ones (all with admin)."""

        def op(session: Session) -> list[EntrySpec]:
            query = select(CatalogEntryRow.spec).order_by(CatalogEntryRow.name)
            rows = [EntrySpec.model_validate(spec) for spec in session.scalars(query)]
            return [e for e in rows if admin or e.owner is None or e.owner == tenant]

        return self._transact(op, write=False)

    def chain(self, name: str) -> list[EntrySpec]:
        """Return an entry's lineage root first ([L0, ..., the entry]); UnknownEntry when there is none."""
        return self._transact(lambda session: _chain(session, _entry_row(session, name)), write=False)

    def resolve(self, name: str, tenant: str | None, admin: bool = False) -> Resolved:
        """Return the merged settings of entry `name` for `tenant`; UnknownEntry when it may not see it.

        When the L0's backend names a registered deployment, the request goes to that deployment's current URL,
        and DeploymentNotRunning is raised while its status is not `running`.
        """

        def op(session: Session) -> Resolved:
            chain = _chain(session, _entry_row(session, name))
            owner = chain[-1].owner
            if not admin and owner is not None and owner != tenant:
                raise _unknown(name)
            return _routed(session, resolve(chain))

        return self._transact(op, write=False)

    def tree(self) -> list[dict[str, Any]]:
        """Return the catalog as nested dicts, roots (L0) first by name: name, level, provider, backend_kind,
        owner, children (an entry's backend_kind is its L0's)."""
        specs = self.list_entries(admin=True)
        children: dict[str | None, list[EntrySpec]] = {}
        for spec in specs:
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

    # --- deployments -------------------------------------------------------------------------------------

    def register_deployment(
        self,
        name: str,
        kind: str,
        url: str,
        arch: str | None = None,
        pool: str | None = None,
        slice_id: int | None = None,
        status: str = "running",
    ) -> dict[str, Any]:
        """Register a deployment (replacing one of the same name) and return it as a dict.

        `pool` and `slice_id` go together and must name a slice of that matrix pool.
        """
        if not name or len(name) > 128:
            raise UserError(f"deployment name {name!r} is not allowed: use 1-128 characters")
        if kind not in DEPLOYMENT_KINDS:
            raise UserError(f"deployment kind {kind!r} is not known; use {' or '.join(DEPLOYMENT_KINDS)}")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"deployment url {url!r} is not an http(s) URL; give its OpenAI base URL, e.g. .../v1")
        if (pool is None) != (slice_id is None):
            raise UserError("a deployment on a matrix slice needs both --pool and --slice (or neither)")

        def op(session: Session) -> dict[str, Any]:
            if pool is not None:
                found = session.scalars(
                    select(SliceRow.id)
                    .join(PoolRow, PoolRow.id == SliceRow.pool_id)
                    .where(PoolRow.name == pool, SliceRow.id == slice_id)
                ).first()
                if found is None:
                    hint = f"matrixstack matrix show --pool {pool}"
                    raise UserError(f"pool {pool!r} has no slice {slice_id}; see `{hint}`")
            row = session.scalars(select(DeploymentRow).where(DeploymentRow.name == name)).first()
            if row is None:
                row = DeploymentRow(name=name)
                session.add(row)
            row.kind, row.url, row.arch, row.pool, row.slice_id, row.status = kind, url, arch, pool, slice_id, status
            session.flush()
            return _deployment(row)

        return self._transact(op)

    def list_deployments(self) -> list[dict[str, Any]]:
        """Return every deployment by name: name, kind, arch, url, pool, slice_id, status, created_at."""

        def op(session: Session) -> list[dict[str, Any]]:
            return [_deployment(r) for r in session.scalars(select(DeploymentRow).order_by(DeploymentRow.name))]

        return self._transact(op, write=False)

    def remove_deployment(self, name: str) -> dict[str, Any]:
        """Remove a deployment and return it as it was; UserError when there is none of that name."""

        def op(session: Session) -> dict[str, Any]:
            row = session.scalars(select(DeploymentRow).where(DeploymentRow.name == name)).first()
            if row is None:
                raise UserError(f"no deployment {name!r}; see `matrixstack deployment list`")
            out = _deployment(row)
            session.delete(row)
            return out

        return self._transact(op)

    # --- usage -------------------------------------------------------------------------------------------

    def record_usage(self, records: Iterable[UsageRecord]) -> None:
        """Write a batch of usage records in one transaction."""
        # vars(), not asdict(): asdict copies each field recursively, which cost most of the write (~50 -> ~17 us a row)
        rows = [{**vars(r), "created_at": _utc(r.created_at)} for r in records]
        if rows:
            self._transact(lambda session: session.execute(insert(UsageRow), rows))

    def tokens_used(self, key_id: int) -> int:
        """Return the tokens (prompt + completion) a key has used over its life."""
        total = func.coalesce(func.sum(UsageRow.prompt_tokens + UsageRow.completion_tokens), 0)
        return int(self._transact(lambda s: s.scalar(select(total).where(UsageRow.key_id == key_id)), write=False))

    def usage_report(
        self, group_by: Iterable[str] = ("tenant",), since: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Return usage rows grouped by any of tenant, key (its prefix), entry, with requests, prompt_tokens,
        completion_tokens, total_tokens and errors (status >= 400), since `since` (naive = UTC) when given.

        No grouping gives one row of totals. Raises UserError for an unknown grouping.
        """
        groups = list(dict.fromkeys(group_by))
        unknown = [g for g in groups if g not in GROUPINGS]
        if unknown:
            raise UserError(f"group by {', '.join(unknown)}: unknown; group by any of {', '.join(GROUPINGS)}")
        columns = {"tenant": TenantRow.name, "key": ApiKeyRow.prefix, "entry": UsageRow.entry}
        keys = [columns[g].label(g) for g in groups]
        prompt = func.coalesce(func.sum(UsageRow.prompt_tokens), 0)
        completion = func.coalesce(func.sum(UsageRow.completion_tokens), 0)
        errors = func.coalesce(func.sum(case((UsageRow.status_code >= 400, 1), else_=0)), 0)
        query = (
            select(*keys, func.count(UsageRow.id), prompt, completion, errors)
            .select_from(UsageRow)
            .outerjoin(TenantRow, TenantRow.id == UsageRow.tenant_id)
            .outerjoin(ApiKeyRow, ApiKeyRow.id == UsageRow.key_id)
        )
        if since is not None:
            query = query.where(UsageRow.created_at >= _utc(since))
        if keys:
            query = query.group_by(*(columns[g] for g in groups)).order_by(*(columns[g] for g in groups))

        def op(session: Session) -> list[dict[str, Any]]:
            out = []
            for row in session.execute(query):
                values = dict(zip(groups, row[: len(groups)], strict=True))
                n, p, c, e = (int(v) for v in row[len(groups) :])
                out.append(values | {"requests": n, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                                     "errors": e})  # fmt: skip
            return out

        return self._transact(op, write=False)

    # --- transactions ------------------------------------------------------------------------------------

    def _transact(self, op: Callable[[Session], T], *, write: bool = True) -> T:
        """Return `op(session)` run in one committed transaction (`matrix.store.transact`: retried on contention)."""
        return transact(self._write if write else self._read, op)


def _utc(moment: datetime) -> datetime:
    """Return a datetime in UTC (a naive one is taken as UTC already)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _limits(**values: int | None) -> KeyLimits:
    """Return validated key limits; UserError when one is not a positive integer."""
    try:
        return KeyLimits(**values)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, KeyLimits, "key limits") + "\n  (None = no limit)") from None


def _key_info(row: ApiKeyRow, tenant: str) -> KeyInfo:
    """Return the caller's view of a key row."""
    return KeyInfo(
        id=row.id,
        tenant=tenant,
        name=row.name,
        prefix=row.prefix,
        is_admin=row.is_admin,
        rpm_limit=row.rpm_limit,
        tpm_limit=row.tpm_limit,
        token_quota=row.token_quota,
        revoked=row.revoked_at is not None,
        tenant_id=row.tenant_id,
    )


def _find_key(session: Session, prefix_or_id: str | int) -> tuple[ApiKeyRow, str]:
    """Return (key row, tenant name) for an id, a 12-character prefix, or a full key; UserError if not exactly one."""
    query = select(ApiKeyRow, TenantRow.name).join(TenantRow, TenantRow.id == ApiKeyRow.tenant_id)
    text = str(prefix_or_id).strip()
    if text.isdigit():
        query = query.where(ApiKeyRow.id == int(text))
    else:
        query = query.where(ApiKeyRow.prefix == key_prefix(text))
    found = session.execute(query.order_by(ApiKeyRow.id)).all()
    if not found:
        raise UserError(f"no API key {text!r}; give a key's prefix (sk-...) or id from `matrixstack key list`")
    if len(found) > 1:
        ids = ", ".join(str(row.id) for row, _ in found)
        raise UserError(f"prefix {text!r} matches several keys (ids {ids}); give the id instead")
    row, tenant = found[0]
    return row, tenant


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


def _put_entry(session: Session, spec: EntrySpec, replace: bool) -> EntrySpec:
    """Insert or replace an entry, then check the rules for it and every entry below it; return it as stored."""
    row = session.scalars(select(CatalogEntryRow).where(CatalogEntryRow.name == spec.name)).first()
    if row is not None and not replace:
        raise UserError(f"entry {spec.name!r} exists already; replace it (catalog add --replace) or pick a new name")
    if row is not None and spec.backend is not None and spec.backend.api_key == "set":
        old = row.spec.get("backend") or {}
        spec = spec.model_copy(update={"backend": spec.backend.model_copy(update={"api_key": old.get("api_key")})})
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
    row.owner_tenant_id = None if spec.owner is None else _tenant_id(session, check_name(spec.owner, "owner tenant"))
    session.flush()
    _check_subtree(session, row)
    return spec


def _routed(session: Session, resolved: Resolved) -> Resolved:
    """Return `resolved` sent to its deployment's current URL when its backend names a registered deployment
    (unchanged otherwise); DeploymentNotRunning when that deployment's status is not `running`."""
    name = resolved.backend.deployment
    if name is None:
        return resolved
    row = session.scalars(select(DeploymentRow).where(DeploymentRow.name == name)).first()
    if row is None:
        return resolved
    if row.status != "running":
        raise DeploymentNotRunning(name, row.status)
    resolved.backend = resolved.backend.model_copy(update={"url": row.url.rstrip("/")})
    return resolved


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


def _deployment(row: DeploymentRow) -> dict[str, Any]:
    """Return a deployment row as a JSON-ready dict."""
    return {
        "name": row.name,
        "kind": row.kind,
        "arch": row.arch,
        "url": row.url,
        "pool": row.pool,
        "slice_id": row.slice_id,
        "status": row.status,
        "created_at": iso(row.created_at),
    }
