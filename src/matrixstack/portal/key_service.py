"""API keys: create, authenticate, revoke, list and limit tenants' keys, and list tenants with their keys.

Secrets: a key is stored as its sha256 hash with its first 12 characters for display; the plaintext is returned
once, by `create_key`. A revocation or a change of limits, from the CLI or the admin API alike, adds a row to
`key_changes` in the same transaction; `key_generation` reads the last one, which every portal polls to drop its
cached keys (portal.gateway). A key's tenant is created on first use by the matrix layer's `tenants`, the tenants'
one owner. The functions take the caller's session and never commit (`matrix.database`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import EllipsisType
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.store import TenantRow, iso, utcnow
from matrixstack.matrix.tenants import check_name, tenant_id
from matrixstack.portal.keys import hash_key, key_prefix, new_key
from matrixstack.portal.spec import KeyLimits
from matrixstack.portal.store import ApiKeyRow, KeyChangeRow
from matrixstack.specio import format_validation_error


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


def list_tenants(session: Session) -> list[dict[str, Any]]:
    """Return every tenant: id, name, created_at, and its number of valid (unrevoked) keys."""
    valid = func.count(ApiKeyRow.id).filter(ApiKeyRow.revoked_at.is_(None))
    rows = session.execute(
        select(TenantRow, valid)
        .outerjoin(ApiKeyRow, ApiKeyRow.tenant_id == TenantRow.id)
        .group_by(TenantRow.id)
        .order_by(TenantRow.name)
    )
    return [{"id": t.id, "name": t.name, "created_at": iso(t.created_at), "keys": n} for t, n in rows]


def create_key(
    session: Session,
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
    row = ApiKeyRow(
        tenant_id=tenant_id(session, tenant),
        name=name,
        prefix=key_prefix(plaintext),
        key_hash=hash_key(plaintext),
        is_admin=admin,
        **limits.model_dump(),
    )
    session.add(row)
    session.flush()
    return _key_info(row, tenant), plaintext


def authenticate(session: Session, plaintext: str) -> KeyInfo | None:
    """Return the key's info when `plaintext` is a valid key, None when it is unknown or revoked."""
    if not isinstance(plaintext, str) or not plaintext:
        return None
    found = session.execute(
        select(ApiKeyRow, TenantRow.name)
        .join(TenantRow, TenantRow.id == ApiKeyRow.tenant_id)
        .where(ApiKeyRow.key_hash == hash_key(plaintext), ApiKeyRow.revoked_at.is_(None))
    ).first()
    return None if found is None else _key_info(*found)


def revoke_key(session: Session, prefix_or_id: str | int) -> KeyInfo:
    """Revoke a key (by its prefix, the full key, or its id) and return it; revoking twice changes nothing."""
    row, tenant = _find_key(session, prefix_or_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        _changed(session, row)
    return _key_info(row, tenant)


def list_keys(session: Session, tenant: str | None = None) -> list[KeyInfo]:
    """Return the keys of `tenant` (every key when None), oldest first, revoked ones included."""
    query = select(ApiKeyRow, TenantRow.name).join(TenantRow, TenantRow.id == ApiKeyRow.tenant_id)
    if tenant is not None:
        query = query.where(TenantRow.name == tenant)
    return [_key_info(row, name) for row, name in session.execute(query.order_by(ApiKeyRow.id))]


def set_key_limits(
    session: Session,
    prefix_or_id: str | int,
    rpm: int | None | EllipsisType = ...,
    tpm: int | None | EllipsisType = ...,
    quota: int | None | EllipsisType = ...,
) -> KeyInfo:
    """Set a key's limits and return it: a number sets a limit, None removes it, `...` (default) keeps it."""
    given = {k: v for k, v in (("rpm_limit", rpm), ("tpm_limit", tpm), ("token_quota", quota)) if v is not ...}
    limits = _limits(**given)
    row, tenant = _find_key(session, prefix_or_id)
    for column in given:
        setattr(row, column, getattr(limits, column))
    _changed(session, row)
    return _key_info(row, tenant)


def key_generation(session: Session) -> int:
    """Return the id of the last key change (0 when none): a portal that sees it grow drops its cached keys."""
    return session.scalar(select(func.max(KeyChangeRow.id))) or 0


def _changed(session: Session, row: ApiKeyRow) -> None:
    """Record that key `row` changed, in the caller's transaction: the one path by which every portal learns it."""
    session.add(KeyChangeRow(key_id=row.id))


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
