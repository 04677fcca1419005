"""`matrixstack catalog | tenant | key | deployment | usage`: the portal's state in the database, from the shell."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from rich.tree import Tree

from matrixstack.cli.common import console, err_console, print_json, user_errors_exit_2
from matrixstack.cli.matrix_cmd import DbOption, JsonOption
from matrixstack.errors import UserError

if TYPE_CHECKING:  # the services pull in SQLAlchemy: import them only when a command runs
    from matrixstack.matrix.database import Database
    from matrixstack.portal.key_service import KeyInfo
    from matrixstack.portal.spec import EntrySpec

catalog_app = typer.Typer(
    help="The model catalog: L0 foundation, L1 industry and L2 scenario entries.", no_args_is_help=True
)
tenant_app = typer.Typer(help="Tenants (shared with the matrix layer).", no_args_is_help=True)
key_app = typer.Typer(help="API keys of tenants: create, list, revoke, limits.", no_args_is_help=True)
deployment_app = typer.Typer(help="Deployments: named engines at a URL the catalog routes to.", no_args_is_help=True)

SINCE_PATTERN = re.compile(r"^(\d+)([smhd])$")
SINCE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
LEVEL_STYLES = {"L0": "bold cyan", "L1": "bold green", "L2": "bold magenta"}


def _database(db: str | None) -> Database:
    from matrixstack.portal.store import open_portal_database

    return open_portal_database(db)


# --- catalog ---------------------------------------------------------------------------------------------


def _backend_text(entry: EntrySpec) -> str:
    """Return a one-line description of an entry's backend ('-' for L1/L2, which use their L0's)."""
    if entry.backend is None:
        return "-"
    b = entry.backend
    extra = f" model {b.model}" if b.model else ""
    extra += f" deployment {b.deployment}" if b.deployment else ""
    extra += f", api_key {entry.view()['backend']['api_key']}" if b.api_key else ""  # "set" or the env: it names
    return f"{b.kind} {b.url}{extra}"


@catalog_app.command("add")
@user_errors_exit_2
def catalog_add(
    file: Path = typer.Argument(..., help="YAML or JSON file: one entry, or a list under `entries:`."),
    replace: bool = typer.Option(False, "--replace", help="Replace entries that exist already."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Add the entries of a file to the catalog (all or none)."""
    from matrixstack.portal.spec import load_entries

    specs = load_entries(file)
    from matrixstack.portal.catalog_service import add_entries

    with _database(db) as database:
        added = database.write(lambda session: add_entries(session, specs, replace=replace))
    if as_json:
        print_json([e.view() for e in added])
        return
    for e in added:
        parent = f" under {e.parent}" if e.parent else ""
        console.print(f"added {e.level} [bold]{e.name}[/]{parent} ({e.provider})", highlight=False)


@catalog_app.command("show")
@user_errors_exit_2
def catalog_show(
    name: str = typer.Argument(..., help="Entry name."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Show one entry, its lineage and its settings (a backend's api_key shows as "set")."""
    from matrixstack.portal.catalog_service import entry_chain

    with _database(db) as database:
        chain = database.read(lambda session: entry_chain(session, name))
    entry = chain[-1]
    if as_json:
        print_json(entry.view())
        return
    console.print(f"[{LEVEL_STYLES[entry.level]}]{entry.level}[/] [bold]{entry.name}[/]", highlight=False)
    console.print(f"  lineage: {' → '.join(e.name for e in chain)}", highlight=False)
    view = entry.view()
    view["backend"] = _backend_text(entry) if entry.backend else f"{_backend_text(chain[0])} (from {chain[0].name})"
    for field, value in view.items():
        if field in ("name", "level") or value in (None, "", [], {}):
            continue
        console.print(f"  {field}: {value}", highlight=False, markup=False)


@catalog_app.command("list")
@user_errors_exit_2
def catalog_list(
    tenant: str | None = typer.Option(None, "--tenant", help="Only what this tenant sees (default: everything)."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """List the catalog entries."""
    from matrixstack.portal.catalog_service import list_entries

    with _database(db) as database:
        entries = database.read(lambda session: list_entries(session, tenant, admin=tenant is None))
    if as_json:
        print_json([e.view() for e in entries])
        return
    table = Table(title="catalog", title_justify="left")
    for column in ("name", "level", "parent", "provider", "owner", "backend", "description"):
        table.add_column(column, no_wrap=column == "name")
    for e in entries:
        table.add_row(
            e.name, e.level, e.parent or "-", e.provider, e.owner or "public", _backend_text(e), e.description
        )
    console.print(table)


@catalog_app.command("remove")
@user_errors_exit_2
def catalog_remove(name: str = typer.Argument(..., help="Entry name."), db: str | None = DbOption) -> None:
    """Remove an entry (one with children is refused: remove them first)."""
    from matrixstack.portal.catalog_service import remove_entry

    with _database(db) as database:
        removed = database.write(lambda session: remove_entry(session, name))
    console.print(f"removed {removed.level} [bold]{removed.name}[/]", highlight=False)


@catalog_app.command("tree")
@user_errors_exit_2
def catalog_tree(db: str | None = DbOption, as_json: bool = JsonOption) -> None:
    """Draw the lineage L0 → L1 → L2, with each entry's provider and backend kind."""
    from matrixstack.portal.catalog_service import catalog_tree

    with _database(db) as database:
        roots = database.read(catalog_tree)
    if as_json:
        print_json(roots)
        return
    tree = Tree("[bold]catalog[/]")

    def add(branch: Tree, node: dict[str, Any]) -> None:
        owner = f" [yellow]private: {node['owner']}[/]" if node["owner"] else ""
        label = (
            f"[{LEVEL_STYLES[node['level']]}]{node['level']}[/] [bold]{node['name']}[/] "
            f"[dim]{node['provider']} · {node['backend_kind']}[/]{owner}"
        )
        child = branch.add(label)
        for c in node["children"]:
            add(child, c)

    for root in roots:
        add(tree, root)
    console.print(tree if roots else "the catalog is empty; add entries with `matrixstack catalog add FILE`")


# --- tenants ---------------------------------------------------------------------------------------------


@tenant_app.command("add")
@user_errors_exit_2
def tenant_add(name: str = typer.Argument(..., help="Tenant name."), db: str | None = DbOption) -> None:
    """Add a tenant (nothing happens when it exists)."""
    from matrixstack.matrix.tenants import create_tenant

    with _database(db) as database:
        database.write(lambda session: create_tenant(session, name))
    console.print(f"tenant [bold]{name}[/]", highlight=False)


@tenant_app.command("list")
@user_errors_exit_2
def tenant_list(db: str | None = DbOption, as_json: bool = JsonOption) -> None:
    """List the tenants and their number of valid keys."""
    from matrixstack.portal.key_service import list_tenants

    with _database(db) as database:
        tenants = database.read(list_tenants)
    if as_json:
        print_json(tenants)
        return
    table = Table(title="tenants", title_justify="left")
    for column in ("id", "name", "valid keys", "created"):
        table.add_column(column)
    for t in tenants:
        table.add_row(str(t["id"]), t["name"], str(t["keys"]), t["created_at"][:19])
    console.print(table)


# --- keys ------------------------------------------------------------------------------------------------


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def _keys_table(keys: list[KeyInfo]) -> Table:
    table = Table(title="API keys", title_justify="left")
    for column in ("id", "prefix", "tenant", "name", "admin", "rpm", "tpm", "quota", "state"):
        table.add_column(column, no_wrap=column == "prefix")
    for k in keys:
        table.add_row(
            str(k.id),
            k.prefix,
            k.tenant,
            k.name,
            "yes" if k.is_admin else "",
            _limit(k.rpm_limit),
            _limit(k.tpm_limit),
            _limit(k.token_quota),
            "revoked" if k.revoked else "valid",
        )
    return table


@key_app.command("create")
@user_errors_exit_2
def key_create(
    tenant: str = typer.Option(..., "--tenant", help="The tenant that owns the key (created if new)."),
    name: str = typer.Option("default", "--name", help="A label for the key."),
    admin: bool = typer.Option(False, "--admin", help="An admin key: the portal's /admin API and dashboard."),
    rpm: int | None = typer.Option(None, "--rpm", help="Requests per minute (default: no limit)."),
    tpm: int | None = typer.Option(None, "--tpm", help="Tokens per minute (default: no limit)."),
    quota: int | None = typer.Option(None, "--quota", help="Tokens over the key's life (default: no limit)."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Create an API key and print it once: only its hash is kept."""
    from matrixstack.portal.key_service import create_key

    with _database(db) as database:
        info, plaintext = database.write(lambda session: create_key(session, tenant, name, admin, rpm, tpm, quota))
    if as_json:
        print_json(info.to_dict() | {"key": plaintext})
    else:
        console.print(f"key {info.id} ({info.prefix}) for tenant [bold]{tenant}[/]:", highlight=False)
        console.print(plaintext, markup=False, highlight=False, soft_wrap=True)
    err_console.print("[yellow]warning:[/] store this key now; it will not be shown again", highlight=False)


@key_app.command("list")
@user_errors_exit_2
def key_list(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """List API keys (prefixes only)."""
    from matrixstack.portal.key_service import list_keys

    with _database(db) as database:
        keys = database.read(lambda session: list_keys(session, tenant))
    if as_json:
        print_json([k.to_dict() for k in keys])
        return
    console.print(_keys_table(keys))


@key_app.command("revoke")
@user_errors_exit_2
def key_revoke(
    prefix: str = typer.Argument(..., help="The key's prefix (sk-...) or id, from `key list`."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Revoke an API key: running portals refuse it within a second."""
    from matrixstack.portal.key_service import revoke_key

    with _database(db) as database:
        info = database.write(lambda session: revoke_key(session, prefix))
    if as_json:
        print_json(info.to_dict())
        return
    console.print(f"revoked key {info.id} ({info.prefix}) of tenant {info.tenant}", highlight=False)


@key_app.command("limits")
@user_errors_exit_2
def key_limits(
    prefix: str = typer.Argument(..., help="The key's prefix (sk-...) or id."),
    rpm: int | None = typer.Option(None, "--rpm", help="Requests per minute; 0 removes the limit."),
    tpm: int | None = typer.Option(None, "--tpm", help="Tokens per minute; 0 removes the limit."),
    quota: int | None = typer.Option(None, "--quota", help="Tokens over the key's life; 0 removes the limit."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Change a key's limits; limits not given stay as they are."""
    given = {k: (v or None) for k, v in (("rpm", rpm), ("tpm", tpm), ("quota", quota)) if v is not None}
    if not given:
        raise UserError("give at least one of --rpm, --tpm, --quota (0 removes that limit)")
    from matrixstack.portal.key_service import set_key_limits

    with _database(db) as database:
        info = database.write(lambda session: set_key_limits(session, prefix, **given))
    if as_json:
        print_json(info.to_dict())
        return
    console.print(_keys_table([info]))


# --- deployments -----------------------------------------------------------------------------------------


@deployment_app.command("add")
@user_errors_exit_2
def deployment_add(
    name: str = typer.Argument(..., help="Deployment name."),
    kind: str = typer.Option(..., "--kind", help="engine (matrixstack engine serve) or vllm."),
    url: str = typer.Option(..., "--url", help="OpenAI base URL, e.g. http://127.0.0.1:8001/v1."),
    arch: str | None = typer.Option(None, "--arch", help="The arch it runs."),
    pool: str | None = typer.Option(None, "--pool", help="Matrix pool of its slice."),
    slice_id: int | None = typer.Option(None, "--slice", help="Matrix slice id it runs on."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Register a deployment (replacing one of the same name)."""
    from matrixstack.portal.deployment_service import register_deployment

    with _database(db) as database:
        d = database.write(
            lambda session: register_deployment(session, name, kind, url, arch=arch, pool=pool, slice_id=slice_id)
        )
    if as_json:
        print_json(d)
        return
    where = f" on slice {d['slice_id']} of pool {d['pool']}" if d["pool"] else ""
    console.print(f"deployment [bold]{d['name']}[/]: {d['kind']} at {d['url']}{where}", highlight=False)


@deployment_app.command("list")
@user_errors_exit_2
def deployment_list(db: str | None = DbOption, as_json: bool = JsonOption) -> None:
    """List the deployments."""
    from matrixstack.portal.deployment_service import list_deployments

    with _database(db) as database:
        rows = database.read(list_deployments)
    if as_json:
        print_json(rows)
        return
    table = Table(title="deployments", title_justify="left")
    for column in ("name", "kind", "arch", "url", "pool", "slice", "status"):
        table.add_column(column)
    for d in rows:
        table.add_row(
            d["name"], d["kind"], d["arch"] or "-", d["url"], d["pool"] or "-", _limit(d["slice_id"]), d["status"]
        )
    console.print(table)


@deployment_app.command("remove")
@user_errors_exit_2
def deployment_remove(name: str = typer.Argument(..., help="Deployment name."), db: str | None = DbOption) -> None:
    """Remove a deployment and free the slice it holds."""
    from matrixstack.portal.deployment_service import remove_deployment

    with _database(db) as database:
        removed = database.write(lambda session: remove_deployment(session, name))
    freed = f", freed its slice {removed['slice_id']}" if removed["slice_freed"] else ""
    console.print(f"removed deployment [bold]{name}[/]{freed}", highlight=False)


@deployment_app.command("secret")
@user_errors_exit_2
def deployment_secret(name: str = typer.Argument(..., help="Deployment name.")) -> None:
    """Print the secret deployment NAME's engine requires (derived from the data key: $MATRIXSTACK_SECRET_KEY or
    the data directory's key file); for the Secret a k8s site's engine reads."""
    from matrixstack.portal.deployment_service import engine_secret

    print(engine_secret(name))


# --- usage -----------------------------------------------------------------------------------------------


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """Return the moment `text` names: an ISO 8601 time (naive = UTC) or an age like 30m, 1h, 24h, 7d before now."""
    match = SINCE_PATTERN.match(text.strip())
    if match:
        return (now or datetime.now(UTC)) - timedelta(**{SINCE_UNITS[match.group(2)]: int(match.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(
            f"--since {text!r} is neither an ISO time (2025-01-31T12:00) nor an age (30m, 1h, 7d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@user_errors_exit_2
def usage(
    by: str = typer.Option("tenant", "--by", help="Group by tenant, key, entry, or several: tenant,entry."),
    since: str | None = typer.Option(None, "--since", help="Only since an ISO time or an age: 1h, 24h, 7d."),
    limit: int = typer.Option(1000, "--limit", help="Groups to show (at most 1000)."),
    offset: int = typer.Option(0, "--offset", help="Groups to skip (the pages before)."),
    db: str | None = DbOption,
    as_json: bool = JsonOption,
) -> None:
    """Show usage (requests, tokens, errors) grouped by tenant, key or entry, a page of groups at a time."""
    groups = [g.strip() for g in by.split(",") if g.strip()]
    start = parse_since(since) if since else None
    from matrixstack.portal.usage_service import usage_report

    with _database(db) as database:
        rows = database.read(lambda session: usage_report(session, groups, start, limit, offset))
    if as_json:
        print_json(rows)
        return
    title = f"usage by {', '.join(groups) or 'nothing'}" + (
        f" since {start.isoformat(timespec='seconds')}" if start else ""
    )
    table = Table(title=title, title_justify="left")
    for column in [*groups, "requests", "prompt tokens", "completion tokens", "total tokens", "errors"]:
        table.add_column(column, no_wrap=column in groups, justify="left" if column in groups else "right")
    for r in rows:
        table.add_row(
            *(str(r[g] or "-") for g in groups),
            *(str(r[k]) for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "errors")),
        )
    console.print(table)
    if len(rows) == limit:
        console.print(f"the page is full; more groups may follow: --offset {offset + limit}")
