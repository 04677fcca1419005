"""The `matrixstack` command: one Typer app with a sub-command per layer.

Every command runs with umask 077: the files and folders it creates (in the data directory: the database, the key
file, engine logs, exported weights) are readable by their owner only.
"""

from __future__ import annotations

import os

import typer

from matrixstack.cli.arch_cmd import arch_app
from matrixstack.cli.calibrate_cmd import register as register_calibrate
from matrixstack.cli.dataset_cmd import dataset_app
from matrixstack.cli.engine_cmd import engine_app
from matrixstack.cli.fabric_cmd import fabric_app
from matrixstack.cli.logs_cmd import register as register_logs
from matrixstack.cli.matrix_cmd import matrix_app
from matrixstack.cli.model_cmd import model_app
from matrixstack.cli.perf_cmd import register as register_perf
from matrixstack.cli.portal_cmd import catalog_app, deployment_app, key_app, tenant_app, usage
from matrixstack.cli.portal_serve_cmd import portal_app
from matrixstack.cli.shape_cmd import shape_app
from matrixstack.cli.stack_cmd import stack_app
from matrixstack.cli.tune_cmd import tune_app
from matrixstack.cli.up_cmd import register as register_up

app = typer.Typer(
    name="matrixstack",
    help="MatrixStack: describe a fabric, supply slices of it, plan, run and serve models on them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
PRIVATE_UMASK = 0o077


@app.callback()
def _private_files() -> None:
    """MatrixStack: what it writes (the database, the key, logs, exported weights) is its user's only."""
    os.umask(PRIVATE_UMASK)


app.add_typer(fabric_app, name="fabric")
app.add_typer(arch_app, name="arch")
app.add_typer(matrix_app, name="matrix")
app.add_typer(engine_app, name="engine")
app.add_typer(model_app, name="model")
app.add_typer(portal_app, name="portal")
app.add_typer(catalog_app, name="catalog")
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.add_typer(deployment_app, name="deployment")
app.add_typer(dataset_app, name="dataset")
app.add_typer(shape_app, name="shape")
app.add_typer(stack_app, name="stack")
app.add_typer(tune_app, name="tune")
app.command("usage")(usage)
register_perf(app)
register_calibrate(app)
register_up(app)
register_logs(app)
