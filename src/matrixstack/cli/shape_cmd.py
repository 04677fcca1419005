"""`matrixstack shape validate | import | export`: a whole shape (fabric, pools, deployments, catalog, tenants,
site) as one YAML file, checked, applied to a database, or rebuilt from one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
import yaml
from rich.table import Table

from matrixstack.cli.common import console, err_console, print_json, user_errors_exit_2, write_out
from matrixstack.cli.matrix_cmd import DbOption, ranges

if TYPE_CHECKING:  # the stack's modules pull in perf and SQLAlchemy: import them only when a command runs
    from matrixstack.stack.apply import Applied
    from matrixstack.stack.spec import Shape
    from matrixstack.stack.validate import PlannedDeployment

shape_app = typer.Typer(
    help="Shapes: fabric, pools, deployments, catalog and tenants as one portable YAML file.",
    no_args_is_help=True,
)

FILE_HELP = "Shape YAML file (see examples/shapes/)."
EXPORT_HEADER = (
    "# A MatrixStack shape exported by `matrixstack shape export`. Secrets are not in it: an upstream's\n"
    "# api_key_env names the environment variable that holds its key. Apply it with `matrixstack shape import`.\n"
)


def _slice_text(shape: Shape, name: str) -> str:
    """Return the slice a deployment asks for, e.g. "2 devices of main" or "320 dies of main"."""
    d = shape.deployment(name)
    amount = f"{d.slice.devices} devices" if d.slice.devices is not None else f"{d.slice.dies} dies"
    spans = "" if d.slice.constraints.within_domain else ", may span domains"
    return f"{amount} of {d.pool}{spans}"


def _plan_table(shape: Shape, planned: list[PlannedDeployment]) -> Table:
    """Return the deployments as a table: arch and engine, slice, plan (workers = its EP degree) and prediction."""
    table = Table(title=f"shape {shape.name}: deployments")
    for column in ("deployment", "arch", "slice", "plan"):
        table.add_column(column)
    for column in ("decode tok/s/dev", "TPOT ms", "TTFT ms"):
        table.add_column(column, justify="right")
    for p in planned:
        d = shape.deployment(p.name)
        table.add_row(
            p.name,
            d.arch if d.engine == "matrixstack" else f"{d.arch} ({d.engine})",
            _slice_text(shape, p.name),
            p.summary() + ("" if p.auto else " (given)"),
            f"{p.predicted['tokens_per_s_per_device']:,.0f}",
            f"{p.predicted['tpot_ms']:.1f}",
            f"{p.predicted['ttft_ms']:.0f}",
        )
    return table


def _fabric_text(shape: Shape) -> str:
    """Return the shape's fabric as written: its name or path, or "inline NAME"."""
    return shape.fabric if isinstance(shape.fabric, str) else f"inline {shape.fabric.name}"


@shape_app.command("validate")
@user_errors_exit_2
def validate(
    file: Path = typer.Argument(..., help=FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Check a shape: the file, the fabric, each deployment's arch, slice, weights and plan (perf plans `auto`)."""
    from matrixstack.stack.spec import load_shape
    from matrixstack.stack.validate import check_shape

    shape = load_shape(file)
    planned = check_shape(shape)
    if as_json:
        print_json(
            {
                "shape": shape.name,
                "valid": True,
                "fabric": _fabric_text(shape),
                "site": shape.site.model_dump(mode="json"),
                "pools": [p.model_dump(mode="json") for p in shape.pools],
                "deployments": [p.to_dict() for p in planned],
                "catalog": [{"name": e.name, "level": e.level, "parent": e.parent} for e in shape.catalog],
                "tenants": [t.name for t in shape.tenants],
            }
        )
        return
    if planned:
        console.print(_plan_table(shape, planned))
    console.print(
        f"shape [bold]{shape.name}[/] is valid: fabric {_fabric_text(shape)}, {len(shape.pools)} pool(s), "
        f"{len(shape.deployments)} deployment(s), {len(shape.catalog)} catalog entries, {len(shape.tenants)} "
        f"tenant(s), site {shape.site.kind} ({shape.site.name})",
        highlight=False,
    )


@shape_app.command("import")
@user_errors_exit_2
def import_(
    file: Path = typer.Argument(..., help=FILE_HELP),
    db: str | None = DbOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Apply a shape to the database without starting anything: pools, slices, catalog, tenants and keys, and
    the deployments (registered as stopped). Idempotent: importing again changes nothing."""
    from matrixstack.adapt.jobs import reclaim_dead
    from matrixstack.stack.apply import apply_shape
    from matrixstack.stack.spec import load_shape

    shape = load_shape(file)
    reclaim_dead(db)  # a killed tune job's slice is free for the shape's deployments
    applied = apply_shape(shape, db)
    if as_json:
        print_json(_applied_dict(applied))
    else:
        _print_applied(applied)
    for warning in applied.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if applied.new_keys:
        err_console.print("[yellow]warning:[/] store the new keys now; they will not be shown again", highlight=False)


def _applied_dict(applied: Applied) -> dict:
    """Return what an import did as JSON-ready data (new keys included: this is the only time they are shown)."""
    return {
        "shape": applied.shape.name,
        "deployments": [
            p.to_dict() | {"slice_id": applied.slices[p.name], "devices": list(launch.devices)}
            for p, launch in zip(applied.planned, applied.launches, strict=True)
        ],
        "catalog": [e.name for e in applied.shape.catalog],
        "new_keys": [
            {"tenant": k.tenant, "name": k.name, "admin": k.admin, "key": k.plaintext} for k in applied.new_keys
        ],
        "warnings": applied.warnings,
    }


def _print_applied(applied: Applied) -> None:
    """Print what an import did: each deployment's slice and plan, the catalog, and each new key (once)."""
    shape = applied.shape
    for p, launch in zip(applied.planned, applied.launches, strict=True):
        console.print(
            f"deployment [bold]{p.name}[/]: slice {applied.slices[p.name]} ({_slice_text(shape, p.name)}, devices "
            f"{ranges(launch.devices)} on their node), {p.summary()}, {p.workers} worker(s), registered (stopped "
            "until a site runs it)",
            highlight=False,
        )
    if shape.catalog:
        console.print(f"catalog: {', '.join(e.name for e in shape.catalog)}", highlight=False)
    for key in applied.new_keys:
        admin = " (admin)" if key.admin else ""
        console.print(f"new key {key.name!r} of tenant [bold]{key.tenant}[/]{admin}:", highlight=False)
        console.print(key.plaintext, markup=False, highlight=False, soft_wrap=True)
    console.print(f"shape [bold]{shape.name}[/] imported; start it with `matrixstack up FILE`", highlight=False)


@shape_app.command("export")
@user_errors_exit_2
def export(
    db: str | None = DbOption,
    out: Path | None = typer.Option(None, "--out", help="Write the YAML here instead of to stdout."),
) -> None:
    """Rebuild the shape a database holds (deployments, pools, the whole catalog, tenants) as YAML; no secrets."""
    from matrixstack.stack.export import export_shape

    text = EXPORT_HEADER + yaml.safe_dump(export_shape(db).dump(), sort_keys=False, allow_unicode=True)
    if write_out(text, out):
        console.print(f"wrote {out}", highlight=False)
