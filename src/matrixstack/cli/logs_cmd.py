"""`matrixstack logs NAME [-n LINES] [--follow]`: the end of a deployment's engine log on the local site
(`data_dir()/logs/NAME.log`: the builtin engine's or vLLM's output, with a line at each restart), and with
`--follow` what is written to it after, until Ctrl-C (a log replaced by a new start is read from its beginning).
A name without a log is exit 2: an unknown deployment, or one whose engine has not run on this machine yet."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from matrixstack.cli.common import user_errors_exit_2
from matrixstack.cli.matrix_cmd import DbOption
from matrixstack.errors import UserError

FOLLOW_POLL_S = 0.5


@user_errors_exit_2
def logs(
    name: str = typer.Argument(..., help="deployment name"),
    lines: int = typer.Option(50, "-n", "--lines", min=0, help="integer count of last lines to show"),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing what is written until Ctrl-C"),
    db: str | None = DbOption,
) -> None:
    """Show the end of deployment NAME's engine log (the local site's); --follow keeps printing it."""
    from matrixstack.stack.local_site import engine_log_path

    path = engine_log_path(name)
    if not path.is_file():
        raise UserError(_missing(name, path, db))
    data = path.read_bytes()
    shown = data.decode(errors="replace").splitlines(keepends=True)[-lines:] if lines else []
    sys.stdout.write("".join(shown))
    sys.stdout.flush()
    if follow:
        try:
            _follow(path, len(data))
        except KeyboardInterrupt:
            pass


def _missing(name: str, path: Path, db: str | None) -> str:
    """Return why deployment `name` has no log at `path`: unknown, or known and not run here yet."""
    from matrixstack.portal.deployment_service import list_deployments
    from matrixstack.portal.store import open_portal_database

    with open_portal_database(db) as database:
        known = {d["name"]: d for d in database.read(list_deployments)}
    if name not in known:
        listed = ", ".join(known) or "none"
        return f"no deployment {name!r} (deployments: {listed}); see `matrixstack deployment list`"
    return (
        f"deployment {name} has no log yet ({path} does not exist): its engine has not run on this machine's local "
        "site; start it with `matrixstack up`"
    )


def _follow(path: Path, offset: int) -> None:
    """Print what is appended to `path` from byte `offset` on, forever (from the start again when it shrinks)."""
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < offset:
            offset = 0
        if size > offset:
            with open(path, "rb") as log:
                log.seek(offset)
                chunk = log.read(size - offset)
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        time.sleep(FOLLOW_POLL_S)


def register(app: typer.Typer) -> None:
    """Add `logs` to the top-level command."""
    app.command("logs")(logs)
