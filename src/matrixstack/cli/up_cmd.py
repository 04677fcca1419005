"""`matrixstack up [SHAPE]`: run a shape (the embedded default when none is given) on this machine or a Ray
cluster, with the portal in the foreground, until Ctrl-C; the work is `stack.up`'s."""

from __future__ import annotations

from pathlib import Path

import typer

from matrixstack.cli.common import user_errors_exit_2
from matrixstack.cli.matrix_cmd import DbOption


@user_errors_exit_2
def up(
    shape: Path | None = typer.Argument(None, help="shape YAML file (default: the embedded default shape)"),
    db: str | None = DbOption,
    site: str | None = typer.Option(None, "--site", help="local or ray (default: the shape's site.kind)"),
    host: str | None = typer.Option(None, "--host", help="portal address (default: the shape's site.portal_host)"),
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="portal TCP port, 0: a free one (default: the shape's site.portal_port)"
    ),
) -> None:
    """Apply SHAPE, start its engines, serve the portal and print where to call it; Ctrl-C stops everything.

    New API keys are printed once. A restart keeps the state (keys, catalog, usage, slices) in the database."""
    from matrixstack.adapt.jobs import reclaim_dead
    from matrixstack.stack.up import choose_shape, run_up

    chosen, run_site = choose_shape(shape, site, host, port)
    reclaim_dead(db)  # a killed tune job's slice is free for the shape's deployments
    run_up(chosen, db, site=run_site)


def register(app: typer.Typer) -> None:
    """Add `up` to the top-level command."""
    app.command("up")(up)
