"""Deployments: named engines (the builtin engine or vLLM) at a URL, optionally on a matrix slice, and routing a
resolved entry to the current URL of the deployment its L0 names, with the deployment's secret as its API key.

`engine_secret(name)` is a deployment's engine secret: derived from the data key (`datakey.derive_secret`), the
same in every process that holds that key, stored nowhere; a site gives it to the engine, the portal sends it.
Removing a deployment frees the slice it holds in the same unit of work.

The functions take the caller's session and never commit (`matrix.database`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from matrixstack.datakey import derive_secret
from matrixstack.errors import UserError
from matrixstack.matrix.slices import free_slice
from matrixstack.matrix.store import PoolRow, SliceRow, iso
from matrixstack.portal.resolve import DeploymentNotRunning, Resolved
from matrixstack.portal.store import DeploymentRow

DEPLOYMENT_KINDS = ("engine", "vllm")
LIVE_SLICE_STATES = ("active", "degraded")  # a slice in these states holds devices


def engine_secret(name: str) -> str:
    """Return deployment `name`'s engine secret (64 hex digits; see the module docstring)."""
    return derive_secret(f"engine:{name}")


def register_deployment(
    session: Session,
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
    if pool is not None:
        found = session.scalars(
            select(SliceRow.id)
            .join(PoolRow, PoolRow.id == SliceRow.pool_id)
            .where(PoolRow.name == pool, SliceRow.id == slice_id)
        ).first()
        if found is None:
            hint = f"matrixstack matrix show --pool {pool}"
            raise UserError(f"pool {pool!r} has no slice {slice_id}; see `{hint}`")
    row = _deployment_row(session, name)
    if row is None:
        row = DeploymentRow(name=name)
        session.add(row)
    row.kind, row.url, row.arch, row.pool, row.slice_id, row.status = kind, url, arch, pool, slice_id, status
    session.flush()
    return _deployment(row)


def list_deployments(session: Session) -> list[dict[str, Any]]:
    """Return every deployment by name: name, kind, arch, url, pool, slice_id, status, created_at."""
    return [_deployment(r) for r in session.scalars(select(DeploymentRow).order_by(DeploymentRow.name))]


def remove_deployment(session: Session, name: str) -> dict[str, Any]:
    """Remove a deployment, free the slice it holds (in the same unit of work) and return it as it was, with
    `slice_freed` saying whether a live slice was freed; UserError when there is none of that name."""
    row = _deployment_row(session, name)
    if row is None:
        raise UserError(f"no deployment {name!r}; see `matrixstack deployment list`")
    out = _deployment(row)
    held = None if row.slice_id is None else session.get(SliceRow, row.slice_id)
    out["slice_freed"] = held is not None and held.state in LIVE_SLICE_STATES
    if out["slice_freed"]:
        free_slice(session, held.id)
    session.delete(row)
    return out


def routed(session: Session, resolved: Resolved) -> Resolved:
    """Return `resolved` sent to its deployment's current URL with the deployment's secret as API key when its
    backend names a registered deployment (unchanged otherwise); DeploymentNotRunning when that deployment's status
    is not `running`."""
    name = resolved.backend.deployment
    if name is None:
        return resolved
    row = _deployment_row(session, name)
    if row is None:
        return resolved
    if row.status != "running":
        raise DeploymentNotRunning(name, row.status)
    update = {"url": row.url.rstrip("/"), "api_key": engine_secret(name)}
    resolved.backend = resolved.backend.model_copy(update=update)
    return resolved


def _deployment_row(session: Session, name: str) -> DeploymentRow | None:
    """Return the row of deployment `name`, or None."""
    return session.scalars(select(DeploymentRow).where(DeploymentRow.name == name)).first()


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
