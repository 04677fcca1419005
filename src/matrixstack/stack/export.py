"""Exporting the shape a database holds, and the embedded default shape.

`export_shape` rebuilds a Shape from a database: its name, description, fabric (as given), site and deployments
(as given: `plan: auto` stays auto) from the stack tables; pools from the matrix (those over the shape's
fabric); the whole catalog from the portal, entries added by hand included (an L0 whose backend names one of the
shape's deployments as `deployment:`, any other as its URL; an upstream with the `api_key_env` the stack tables
know: secrets are never exported); tenants with the names, admin flag and limits of their valid keys.

Applying the export to an empty database and exporting that gives the same shape.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.pools import list_pools
from matrixstack.portal.catalog_service import list_entries
from matrixstack.portal.key_service import KeyInfo, list_keys, list_tenants
from matrixstack.portal.spec import EntrySpec
from matrixstack.stack.spec import SHAPE_VERSION, Shape, load_shape, parse_shape
from matrixstack.stack.store import open_stack_database, read_deployment_rows, read_shape_row

DEFAULT_SHAPE = "default.yaml"
LEVEL_ORDER = {"L0": 0, "L1": 1, "L2": 2}


def default_shape() -> Shape:
    """Return the embedded default shape (the package's stack/shapes/default.yaml)."""
    path = resources.files("matrixstack.stack.shapes") / DEFAULT_SHAPE
    with resources.as_file(path) as real_path:
        return load_shape(real_path)


def export_shape(db_url: str | None = None) -> Shape:
    """Return the shape the database at `db_url` holds (see the module docstring); UserError when no shape was
    ever applied to it, or when what it holds no longer makes a valid shape."""
    with open_stack_database(db_url) as database:
        data = database.read(_shape_data)
    return parse_shape(data, "the shape exported from the database")


def _shape_data(session: Session) -> dict[str, Any]:
    """Return the shape the database holds as data (see `export_shape`); UserError when it holds none."""
    meta = read_shape_row(session)
    if meta is None:
        raise UserError(
            "this database holds no shape yet: import one with `matrixstack shape import FILE` (or run "
            "`matrixstack up`), or pass the --db that holds it"
        )
    head: dict[str, Any] = {
        "version": SHAPE_VERSION,
        "name": meta.name,
        "description": meta.description,
        "fabric": meta.fabric,
    }
    fabric_name, site, envs = meta.fabric_name, meta.site, dict(meta.api_key_envs or {})
    deployments = [row.spec for row in read_deployment_rows(session)]
    pools = [
        {"name": p["pool"], "fabrics": len(p["fabrics"])}
        for p in list_pools(session)
        if p["fabrics"] and all(name == fabric_name for name in p["fabrics"])
    ]
    shape_deployments = {d["name"] for d in deployments}
    entries = sorted(list_entries(session, admin=True), key=lambda e: (LEVEL_ORDER[e.level], e.name))
    catalog = [_shape_entry(e, shape_deployments, envs) for e in entries]
    keys: dict[str, list[KeyInfo]] = {}
    for key in list_keys(session):
        if not key.revoked:
            keys.setdefault(key.tenant, []).append(key)
    tenants = [{"name": t["name"], "keys": _key_shapes(keys.get(t["name"], []))} for t in list_tenants(session)]
    return head | {"pools": pools, "deployments": deployments, "catalog": catalog, "tenants": tenants, "site": site}


def _shape_entry(entry: EntrySpec, deployments: set[str], envs: dict[str, str]) -> dict[str, Any]:
    """Return a portal entry as shape data: its backend by deployment name when the shape runs it, else by URL."""
    data = entry.model_dump(mode="json", exclude={"backend"})
    b = entry.backend
    if b is not None:
        backend: dict[str, Any] = {"kind": b.kind, "model": b.model, "adapters": b.adapters}
        if b.kind != "upstream" and b.deployment in deployments:
            backend["deployment"] = b.deployment
        else:
            backend["url"] = b.url
        if b.kind == "upstream" and entry.name in envs:
            backend["api_key_env"] = envs[entry.name]
        data["backend"] = backend
    return data


def _key_shapes(keys: list[KeyInfo]) -> list[dict[str, Any]]:
    """Return one key shape per key name (the oldest valid key of that name): name, admin flag and limits."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        out.setdefault(
            key.name,
            {
                "name": key.name,
                "admin": key.is_admin,
                "rpm_limit": key.rpm_limit,
                "tpm_limit": key.tpm_limit,
                "token_quota": key.token_quota,
            },
        )
    return list(out.values())
