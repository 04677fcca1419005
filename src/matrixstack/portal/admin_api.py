"""The portal's admin API (an admin API key only): catalog, tenants, keys, usage, deployments.

Routes (all JSON; errors in OpenAI's format: 401 without a valid key, 403 with a key that is not an admin's,
400 for a user error naming the field (an unknown key or deployment too), 404 for an unknown catalog entry; each
route's statuses are in the OpenAPI schema):
- `GET /admin/catalog` every entry; `POST /admin/catalog[?replace=true]` one entry or `{"entries": [...]}`;
  `GET|PATCH|DELETE /admin/catalog/{name}` one entry (PATCH merges the given fields, a `backend` mapping into the
  stored backend); `GET /admin/catalog-tree` the L0 -> L1 -> L2 tree;
- `GET /admin/tenants`, `POST /admin/tenants {"name"}`;
- `GET /admin/keys[?tenant=]`, `POST /admin/keys {"tenant", "name", "admin", "rpm_limit", "tpm_limit",
  "token_quota"}` (the answer carries the plaintext `key`, the only time it is shown),
  `PATCH /admin/keys/{prefix} {"rpm_limit"?, "tpm_limit"?, "token_quota"?}` (a given null removes a limit),
  `DELETE /admin/keys/{prefix}` revokes;
- `GET /admin/usage?group_by=tenant,entry&since=ISO-8601&limit=100&offset=0`: one page of groups (`limit` at most
  `usage_service.MAX_PAGE`; a page shorter than `limit` is the last);
- `GET /admin/deployments`, `POST /admin/deployments {...}`, `DELETE /admin/deployments/{name}`.

A backend's `api_key` is never returned: entries show it as "set" (or null). Catalog changes reach /v1 at once
(the gateway's catalog cache is dropped); key revocations and limit changes too (the key cache is dropped).
Database work runs in worker threads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query
from pydantic import Field

from matrixstack.errors import UserError
from matrixstack.matrix import tenants
from matrixstack.openai.error_doc import error_responses
from matrixstack.portal import catalog_service, deployment_service, key_service, usage_service
from matrixstack.portal.gateway import Gateway, openai_error
from matrixstack.portal.key_service import KeyInfo
from matrixstack.portal.spec import parse_entries
from matrixstack.specio import Strict

USAGE_PAGE = 100  # groups in a page of /admin/usage when the request does not say


class TenantCreate(Strict):
    """`POST /admin/tenants`."""

    name: str = Field(description="1-64 letters, digits, '_', '.', '@' or '-'")


class KeyCreate(Strict):
    """`POST /admin/keys`."""

    tenant: str = Field(description="the tenant the key acts for (created if new)")
    name: str = "default"
    admin: bool = False
    rpm_limit: int | None = Field(None, description="requests per minute (null: no limit)")
    tpm_limit: int | None = Field(None, description="tokens per minute (null: no limit)")
    token_quota: int | None = Field(None, description="tokens over the key's life (null: no limit)")


class KeyLimitsChange(Strict):
    """`PATCH /admin/keys/{prefix}`: only the fields given change; null removes that limit."""

    rpm_limit: int | None = None
    tpm_limit: int | None = None
    token_quota: int | None = None


class DeploymentCreate(Strict):
    """`POST /admin/deployments`."""

    name: str
    kind: str = Field(description="engine or vllm")
    url: str = Field(description="its OpenAI base URL, e.g. http://127.0.0.1:8001/v1")
    arch: str | None = None
    pool: str | None = Field(None, description="matrix pool of its slice (with slice_id)")
    slice_id: int | None = None
    status: str = "running"


def parse_since(since: str | None) -> datetime | None:
    """Return the datetime of an ISO-8601 `since` (None when not given); a 400 naming `since` when malformed."""
    if not since:
        return None
    try:
        return datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        raise openai_error(400, f"since={since!r} is not an ISO-8601 time, e.g. 2025-01-31T12:00:00Z",
                           param="since") from None  # fmt: skip


def admin_router(gateway: Gateway, require_admin: Callable[..., Awaitable[KeyInfo]]) -> APIRouter:
    """Return the router of the admin API over `gateway.db`; `require_admin` is the app's admin dependency."""
    router = APIRouter(
        prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=error_responses(401, 403)
    )
    read, write = gateway.read, gateway.write  # each call one unit of work on a worker thread

    # ---- catalog ----

    @router.get("/catalog", summary="Every catalog entry")
    async def list_catalog() -> list[dict[str, Any]]:
        return [e.view() for e in await read(catalog_service.list_entries, None, True)]

    @router.post(
        "/catalog",
        summary="Add one entry, or {'entries': [...]} (parents before children)",
        responses=error_responses(400),
    )
    async def add_catalog(
        body: dict[str, Any] = Body(description="an EntrySpec, or {'entries': [EntrySpec, ...]}"),
        replace: bool = Query(False, description="replace entries of the same name"),
    ) -> list[dict[str, Any]]:
        specs = parse_entries(body, "request body")
        added = await write(catalog_service.add_entries, specs, replace)
        gateway.catalog_changed()
        return [e.view() for e in added]

    @router.get("/catalog-tree", summary="The catalog as a tree, L0 -> L1 -> L2")
    async def catalog_tree() -> list[dict[str, Any]]:
        return await read(catalog_service.catalog_tree)

    @router.get("/catalog/{name}", summary="One catalog entry", responses=error_responses(404))
    async def get_entry(name: str) -> dict[str, Any]:
        return (await read(catalog_service.get_entry, name)).view()

    @router.patch("/catalog/{name}", summary="Change fields of an entry", responses=error_responses(400, 404))
    async def patch_entry(name: str, changes: dict[str, Any] = Body(description="the fields to change")) -> dict:
        entry = await write(catalog_service.update_entry, name, changes)
        gateway.catalog_changed()
        return entry.view()

    @router.delete(
        "/catalog/{name}", summary="Remove an entry (not one with children)", responses=error_responses(400, 404)
    )
    async def delete_entry(name: str) -> dict[str, Any]:
        entry = await write(catalog_service.remove_entry, name)
        gateway.catalog_changed()
        return entry.view()

    # ---- tenants ----

    @router.get("/tenants", summary="Every tenant")
    async def list_tenants() -> list[dict[str, Any]]:
        return await read(key_service.list_tenants)

    @router.post("/tenants", summary="Create a tenant (nothing happens when it exists)", responses=error_responses(400))
    async def create_tenant(body: TenantCreate) -> dict[str, Any]:
        return {"name": await write(tenants.create_tenant, body.name)}

    # ---- keys ----

    @router.get("/keys", summary="API keys (never the keys themselves)")
    async def list_keys(tenant: str | None = None) -> list[dict[str, Any]]:
        return [k.to_dict() for k in await read(key_service.list_keys, tenant)]

    @router.post(
        "/keys",
        summary="Create an API key; the answer's `key` is the only time it is shown",
        responses=error_responses(400),
    )
    async def create_key(body: KeyCreate) -> dict[str, Any]:
        info, plaintext = await write(
            key_service.create_key, body.tenant, body.name, body.admin, body.rpm_limit, body.tpm_limit, body.token_quota
        )
        return info.to_dict() | {"key": plaintext}

    @router.patch(
        "/keys/{prefix}", summary="Change a key's limits (null removes a limit)", responses=error_responses(400)
    )
    async def set_limits(prefix: str, body: KeyLimitsChange) -> dict[str, Any]:
        given = body.model_dump(exclude_unset=True)
        if not given:
            raise UserError("give at least one of rpm_limit, tpm_limit, token_quota (null removes a limit)")
        names = {"rpm_limit": "rpm", "tpm_limit": "tpm", "token_quota": "quota"}
        info = await write(key_service.set_key_limits, prefix, **{names[k]: v for k, v in given.items()})
        gateway.keys_changed()
        return info.to_dict()

    @router.delete("/keys/{prefix}", summary="Revoke a key", responses=error_responses(400))
    async def revoke_key(prefix: str) -> dict[str, Any]:
        info = await write(key_service.revoke_key, prefix)
        gateway.keys_changed()
        return info.to_dict()

    # ---- usage ----

    @router.get("/usage", summary="Usage grouped by tenant, key and/or entry", responses=error_responses(400))
    async def usage(
        group_by: str = Query("tenant", description="comma-separated: tenant, key, entry"),
        since: str | None = Query(None, description="ISO-8601 time; only requests since then"),
        limit: int = Query(USAGE_PAGE, ge=1, le=usage_service.MAX_PAGE, description="groups in this page"),
        offset: int = Query(0, ge=0, description="groups to skip (the pages before)"),
    ) -> list[dict[str, Any]]:
        groups = tuple(g.strip() for g in group_by.split(",") if g.strip())
        return await read(usage_service.usage_report, groups, parse_since(since), limit, offset)

    # ---- deployments ----

    @router.get("/deployments", summary="Registered deployments")
    async def list_deployments() -> list[dict[str, Any]]:
        return await read(deployment_service.list_deployments)

    @router.post(
        "/deployments", summary="Register a deployment (replacing one of the same name)", responses=error_responses(400)
    )
    async def register_deployment(body: DeploymentCreate) -> dict[str, Any]:
        return await write(deployment_service.register_deployment, **body.model_dump())

    @router.delete("/deployments/{name}", summary="Remove a deployment", responses=error_responses(400))
    async def remove_deployment(name: str) -> dict[str, Any]:
        return await write(deployment_service.remove_deployment, name)

    return router
