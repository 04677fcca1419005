"""Persisted state of the portal: SQLAlchemy tables beside the matrix tables, in the same database.

Tables: `api_keys` (only the sha256 of each key is kept, with its first 12 characters for display), `key_changes`
(one row per revocation or change of limits, which every portal process polls: `key_service.key_generation`),
`catalog_entries` (the entry spec as JSON; parent_id with ON DELETE RESTRICT, so an entry with children cannot
be removed), `deployments` (named engines at a URL, optionally on a matrix slice) and `usage_records` (one row
per request). Tenants are the matrix layer's `tenants` table.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from matrixstack.matrix.database import Database, open_database
from matrixstack.matrix.store import TenantRow, utcnow


class PortalBase(DeclarativeBase):
    """Declarative base of the portal tables (created next to the matrix tables)."""

    type_annotation_map = {dict[str, Any]: JSON}


class ApiKeyRow(PortalBase):
    """An API key of a tenant: its hash, display prefix, admin flag, limits, and when it was revoked."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(12), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    rpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token_quota: Mapped[int | None] = mapped_column(Integer, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class KeyChangeRow(PortalBase):
    """A change to an API key (revoked, limits changed); a portal that sees the last id grow drops its cached keys."""

    __tablename__ = "key_changes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey(ApiKeyRow.id), index=True)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CatalogEntryRow(PortalBase):
    """A catalog entry: name, level, parent, owner (null = public) and the full spec as JSON."""

    __tablename__ = "catalog_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    level: Mapped[str] = mapped_column(String(2))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("catalog_entries.id", ondelete="RESTRICT"), nullable=True, index=True
    )
    owner_tenant_id: Mapped[int | None] = mapped_column(ForeignKey(TenantRow.id), nullable=True, index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeploymentRow(PortalBase):
    """A named running engine (builtin engine or vLLM) at a URL, optionally on a matrix slice."""

    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    arch: Mapped[str | None] = mapped_column(String(128), nullable=True)
    url: Mapped[str] = mapped_column(String(512))
    pool: Mapped[str | None] = mapped_column(String(64), nullable=True)
    slice_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(32), default="running")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UsageRow(PortalBase):
    """One request through the portal: who, which entry, tokens, status, latency and time to first token."""

    __tablename__ = "usage_records"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey(TenantRow.id), nullable=True, index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey(ApiKeyRow.id), nullable=True, index=True)
    entry: Mapped[str] = mapped_column(String(128))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    status_code: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


def open_portal_database(url: str | None = None) -> Database:
    """Return the database at `url` (default: the matrix layer's SQLite file) with every matrix and portal table
    created and any backend key an earlier version stored in clear sealed (`upstream_secrets.seal_clear_keys`), to
    run units of work on (`matrix.database`).

    Raises a UserError (from the matrix layer) when the URL is malformed or the database cannot be reached.
    """
    from matrixstack.portal.upstream_secrets import seal_clear_keys  # it reads these tables: imported once defined

    database = open_database(url)
    PortalBase.metadata.create_all(database.engine)
    seal_clear_keys(database)
    return database
