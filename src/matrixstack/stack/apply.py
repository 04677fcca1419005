"""Applying a shape to a database (`shape import`, and the first step of `matrixstack up`): pools, slices,
tenants and keys, catalog entries and deployments, and the stack's own record of what was applied.

`apply_shape` is idempotent, so that a restart applies the same shape again and keeps its state: a pool is
created unless it exists (over the same fabric; another fabric is an error naming the pool), a key is created
only when its tenant has no valid key of that name (the plaintext is returned once, in `new_keys`, and never
stored), a deployment keeps its slice while that slice is live and the deployment asks for the same slice,
catalog entries of the shape are upserted (entries added by hand are left alone), and each deployment is
registered with the portal as `stopped` at a placeholder URL until a site runs it (`record_started`).

Atomicity: the perf and catalog checks run first (`check_shape`, nothing written), then every write runs in ONE
unit of work (`matrix.database`) whose session the matrix and portal services and the stack tables share: a
failure in the middle, such as a slice that cannot be allocated, leaves the database as it was.

An upstream entry's secret comes from the environment variable its `api_key_env` names; when that is unset the
apply goes on (keeping a secret stored by an earlier apply, if any) and says so in `warnings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.fabric.spec import FabricSpec
from matrixstack.matrix.pools import create_pool, list_pools, show_pool
from matrixstack.matrix.slices import SliceInfo, alloc_slice, free_slice
from matrixstack.matrix.tenants import create_tenant
from matrixstack.perf.spec import Plan
from matrixstack.portal.catalog_service import add_entries, list_entries, update_entry
from matrixstack.portal.deployment_service import list_deployments, register_deployment
from matrixstack.portal.key_service import create_key, list_keys
from matrixstack.portal.spec import EntrySpec
from matrixstack.stack.site import STATUS_RUNNING, Launch, Started
from matrixstack.stack.spec import DeploymentShape, Shape, ShapeEntry
from matrixstack.stack.store import (
    SHAPE_ROW_ID,
    StackDeploymentRow,
    StackShapeRow,
    open_stack_database,
    read_deployment_rows,
    read_shape_row,
)
from matrixstack.stack.validate import PlannedDeployment, check_shape, shape_fabric

PLACEHOLDER_URL = "http://not-started.invalid/v1"  # a registered deployment's URL until a site runs it
SLICE_FIELDS = ("pool", "tenant", "slice", "policy")  # a change to any of these asks for a new slice


@dataclass(frozen=True)
class NewKey:
    """An API key the apply created: shown to the user once, never stored in plaintext."""

    tenant: str
    name: str
    plaintext: str
    admin: bool


@dataclass
class Applied:
    """What an apply did: the shape, one Launch per deployment, the plans, slices, new keys and warnings."""

    shape: Shape
    launches: list[Launch]
    planned: list[PlannedDeployment]
    slices: dict[str, int]  # deployment name -> slice id
    new_keys: list[NewKey] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def apply_shape(shape: Shape, db_url: str | None = None) -> Applied:
    """Apply `shape` to the database at `db_url` (default: the data directory's) and return what it did.

    Raises UserError (the database unchanged) when the shape does not check out or a write fails.
    """
    planned = check_shape(shape)
    fabric = shape_fabric(shape)
    warnings: list[str] = []
    secrets = _upstream_secrets(shape, warnings)

    def write(session: Session) -> tuple[dict[str, SliceInfo], list[NewKey], list[str]]:
        notes: list[str] = []  # this attempt's warnings (a unit of work may run again on contention)
        _ensure_pools(session, shape, fabric)
        slices = _ensure_slices(session, shape, notes)
        add_entries(session, _entry_specs(session, shape, secrets), replace=True)
        new_keys = _ensure_keys(session, shape)
        _register_deployments(session, shape, slices)
        _record(session, shape, fabric, planned, slices)
        return slices, new_keys, notes

    with open_stack_database(db_url) as database:
        slices, new_keys, notes = database.write(write)
    warnings.extend(notes)
    launches = [_launch(d, p, slices[d.name], fabric) for d, p in zip(shape.deployments, planned, strict=True)]
    return Applied(shape, launches, planned, {n: s.id for n, s in slices.items()}, new_keys, warnings)


def record_started(shape: Shape, started: list[Started], db_url: str | None = None) -> None:
    """Register each started deployment of `shape` at its URL with status `running`, and write that URL into the
    L0 entries of the shape that name it (what `catalog show` prints; the portal routes by the deployment either
    way); UserError for a deployment that is not in the shape or was never applied."""
    _record_states(shape, {run.name: (STATUS_RUNNING, run.url) for run in started}, db_url)


def record_status(shape: Shape, name: str, status: str, url: str, db_url: str | None = None) -> None:
    """Register deployment `name` of `shape` with `status` at `url` (a site's `on_status`: `restarting` while its
    engine is down, `running` at its URL once it answers again), and write that URL into the shape's L0 entries
    that name it, as `record_started` does; UserError for a deployment that is not in the shape or was never
    applied."""
    _record_states(shape, {name: (status, url)}, db_url)


def _record_states(shape: Shape, states: dict[str, tuple[str, str]], db_url: str | None) -> None:
    """Register each deployment named in `states` (name -> (status, url)) and point the shape's L0 entries that
    name it at its URL, in one unit of work."""

    def write(session: Session) -> None:
        current = _registered(session, shape)
        for name, (status, url) in states.items():
            row = current.get(name)
            if row is None:
                raise UserError(f"deployment {name} is not a deployment of shape {shape.name}; apply it first")
            register_deployment(
                session, name, row["kind"], url, row["arch"], row["pool"], row["slice_id"], status=status
            )
        for entry in shape.catalog:
            if entry.backend is not None and entry.backend.deployment in states:
                update_entry(session, entry.name, {"backend": {"url": states[entry.backend.deployment][1]}})

    with open_stack_database(db_url) as database:
        database.write(write)


def record_stopped(shape: Shape, db_url: str | None = None) -> None:
    """Set the status of every registered deployment of `shape` to `stopped` (their last URL is kept)."""

    def write(session: Session) -> None:
        for name, row in _registered(session, shape).items():
            register_deployment(
                session, name, row["kind"], row["url"], row["arch"], row["pool"], row["slice_id"], status="stopped"
            )

    with open_stack_database(db_url) as database:
        database.write(write)


def _registered(session: Session, shape: Shape) -> dict[str, dict]:
    """Return the portal's registered deployments that belong to `shape`, by name."""
    names = {d.name for d in shape.deployments}
    return {d["name"]: d for d in list_deployments(session) if d["name"] in names}


def _upstream_secrets(shape: Shape, warnings: list[str]) -> dict[str, str | None]:
    """Return entry name -> secret (None when its variable is unset, with a warning) for upstream entries."""
    secrets: dict[str, str | None] = {}
    for entry in shape.catalog:
        backend = entry.backend
        if backend is None or backend.kind != "upstream" or backend.api_key_env is None:
            continue
        secrets[entry.name] = os.environ.get(backend.api_key_env) or None
        if secrets[entry.name] is None:
            warnings.append(
                f"catalog entry {entry.name}: ${backend.api_key_env} is not set, so calls to {backend.url} will "
                f"fail upstream (a key stored by an earlier apply is kept); export {backend.api_key_env} and apply "
                "again"
            )
    return secrets


def _ensure_pools(session: Session, shape: Shape, fabric: FabricSpec) -> None:
    """Create each pool of the shape that does not exist; UserError when one exists over another fabric."""
    existing = {p["pool"]: p for p in list_pools(session)}
    for pool in shape.pools:
        wanted = [fabric.name] * pool.fabrics
        found = existing.get(pool.name)
        if found is None:
            create_pool(session, pool.name, [fabric] * pool.fabrics)
        elif found["fabrics"] != wanted or found["devices"] != fabric.device_count * pool.fabrics:
            raise UserError(
                f"pool {pool.name} exists over {' + '.join(found['fabrics'])} ({found['devices']} devices), but the "
                f"shape puts it over {pool.fabrics} x {fabric.name} ({fabric.device_count * pool.fabrics} devices); "
                "rename the pool in the shape, or apply it to another database (--db)"
            )


def _ensure_slices(session: Session, shape: Shape, warnings: list[str]) -> dict[str, SliceInfo]:
    """Return deployment name -> its slice: the one it holds when still live and asked the same way, else a new
    one (an outdated slice is freed first)."""
    stored = {row.name: row for row in read_deployment_rows(session)}
    pools = {p["pool"] for p in list_pools(session)}
    live: dict[str, dict[int, SliceInfo]] = {}
    out: dict[str, SliceInfo] = {}
    for d in shape.deployments:
        row = stored.get(d.name)
        held = None
        if row is not None and row.pool in pools:
            if row.pool not in live:
                live[row.pool] = {s.id: s for s in show_pool(session, row.pool).slices}
            held = live[row.pool].get(row.slice_id)
        if held is not None and _same_slice(row.spec, d):
            if held.state != "active":
                warnings.append(f"deployment {d.name}: slice {held.id} is {held.state} ({held.reason or 'no reason'})")
            out[d.name] = held
            continue
        if held is not None:
            free_slice(session, held.id)
            warnings.append(f"deployment {d.name}: freed slice {held.id}, the shape asks for another slice now")
        try:
            out[d.name] = alloc_slice(session, d.pool, d.tenant, d.slice, d.policy)
        except UserError as exc:
            raise UserError(f"deployment {d.name}: no slice: {exc}; nothing was applied") from None
    return out


def _same_slice(stored_spec: dict, d: DeploymentShape) -> bool:
    """Return whether a stored deployment asked for its slice as `d` does (pool, tenant, request, policy)."""
    now = d.model_dump(mode="json", include=set(SLICE_FIELDS))
    return all(stored_spec.get(k) == now[k] for k in SLICE_FIELDS)


def _entry_specs(session: Session, shape: Shape, secrets: dict[str, str | None]) -> list[EntrySpec]:
    """Return the shape's catalog entries as portal entries (a deployment's backend at the placeholder URL; an
    upstream's secret from its variable, or "set" to keep the one stored when the variable is unset)."""
    stored = {e.name: e for e in list_entries(session, admin=True)}
    return [_entry_spec(e, secrets.get(e.name), stored.get(e.name)) for e in shape.catalog]


def _entry_spec(entry: ShapeEntry, secret: str | None, stored: EntrySpec | None) -> EntrySpec:
    """Return one shape entry as a portal entry (see `_entry_specs`); a builtin-engine backend says `adapters: true`
    (the engine serves an L1's adapter by name), so the portal sends the adapter name as the model."""
    data = entry.model_dump(mode="json", exclude={"backend"})
    b = entry.backend
    if b is not None:
        if secret is None and stored is not None and stored.backend is not None and stored.backend.api_key:
            secret = "set"  # the portal keeps the stored key
        data["backend"] = {
            "kind": b.kind,
            "url": b.url or PLACEHOLDER_URL,
            "model": b.model,
            "deployment": b.deployment,
            "adapters": b.adapters or b.kind == "engine",  # the builtin engine serves adapters by name
            "api_key": secret if b.kind == "upstream" else None,
        }
    return EntrySpec.model_validate(data)


def _ensure_keys(session: Session, shape: Shape) -> list[NewKey]:
    """Create each tenant, and each key a tenant has no valid key of that name for; return the new keys."""
    new_keys: list[NewKey] = []
    for tenant in shape.tenants:
        create_tenant(session, tenant.name)
        valid = {k.name for k in list_keys(session, tenant.name) if not k.revoked}
        for key in tenant.keys:
            if key.name in valid:
                continue
            _, plaintext = create_key(
                session, tenant.name, key.name, key.admin, key.rpm_limit, key.tpm_limit, key.token_quota
            )
            new_keys.append(NewKey(tenant.name, key.name, plaintext, key.admin))
    return new_keys


def _register_deployments(session: Session, shape: Shape, slices: dict[str, SliceInfo]) -> None:
    """Register each deployment, `stopped` at the placeholder URL, unless it is registered already on the same
    slice (a restart: its URL and status stay until the site reports)."""
    current = {d["name"]: d for d in list_deployments(session)}
    for d in shape.deployments:
        kind = "engine" if d.engine == "matrixstack" else "vllm"
        slice_id = slices[d.name].id
        old = current.get(d.name)
        if old is not None and (old["kind"], old["arch"], old["pool"], old["slice_id"]) == (
            kind,
            d.arch,
            d.pool,
            slice_id,
        ):
            continue
        register_deployment(session, d.name, kind, PLACEHOLDER_URL, d.arch, d.pool, slice_id, status="stopped")


def _record(
    session: Session,
    shape: Shape,
    fabric: FabricSpec,
    planned: list[PlannedDeployment],
    slices: dict[str, SliceInfo],
) -> None:
    """Write the shape's metadata and each deployment's shape, slice and plan to the stack tables."""
    meta = read_shape_row(session)
    if meta is None:
        meta = StackShapeRow(id=SHAPE_ROW_ID)
        session.add(meta)
    envs = dict(meta.api_key_envs or {})
    for entry in shape.catalog:
        envs.pop(entry.name, None)
        if entry.backend is not None and entry.backend.api_key_env is not None:
            envs[entry.name] = entry.backend.api_key_env
    meta.name, meta.description = shape.name, shape.description
    meta.fabric = shape.fabric.model_dump(mode="json") if isinstance(shape.fabric, FabricSpec) else shape.fabric
    meta.fabric_name = fabric.name
    meta.site = shape.site.model_dump(mode="json")
    meta.api_key_envs = envs
    rows = {row.name: row for row in read_deployment_rows(session)}
    for d, p in zip(shape.deployments, planned, strict=True):
        row = rows.get(d.name)
        if row is None:
            row = StackDeploymentRow(name=d.name)
            session.add(row)
        row.spec = d.model_dump(mode="json")
        row.pool, row.slice_id = d.pool, slices[d.name].id
        row.plan = p.plan.model_dump(mode="json")
        row.workers, row.predicted = p.workers, p.predicted
    session.flush()


def device_kind(fabric: FabricSpec) -> str:
    """Return what a site runs an engine on for this fabric: "cpu" (CPU cores), "cuda" (NVIDIA GPUs), else the
    fabric's device kind lower-cased (e.g. "ascend 910c"; sites refuse what they cannot run)."""
    if fabric.device.kind.lower().startswith("cpu"):
        return "cpu"
    if fabric.device.vendor.lower() == "nvidia":
        return "cuda"
    return fabric.device.kind.lower()


def _launch(d: DeploymentShape, p: PlannedDeployment, s: SliceInfo, fabric: FabricSpec) -> Launch:
    """Return what a site starts for one deployment on its slice."""
    per_node = fabric.device.devices_per_node
    if len(s.nodes) == 1:
        strategy = "STRICT_PACK"
    elif d.slice.constraints.within_domain:
        strategy = "PACK"
    else:
        strategy = "SPREAD"
    return Launch(
        name=d.name,
        arch=d.arch,
        weights=d.weights,
        engine=d.engine,
        workers=p.workers,
        device_kind=device_kind(fabric),
        devices=tuple(device % per_node for device in s.devices),
        strategy=strategy,
        engine_args=d.engine_args,
        plan=p.plan.decode if isinstance(p.plan, Plan) else p.plan,
        dies_per_device=fabric.device.dies_per_device,
    )
